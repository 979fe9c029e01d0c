//! The one place where certificate times (`SystemTime`) become tokio
//! deadlines, so scheduling follows tokio's clock.

use std::time::SystemTime;

/// The tokio instant at which the wall clock reaches `t` (now, if past).
pub(crate) fn instant_of(t: SystemTime) -> tokio::time::Instant {
    let now = SystemTime::now();
    tokio::time::Instant::now() + t.duration_since(now).unwrap_or_default()
}
