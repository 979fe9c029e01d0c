//! Calls the server refused for its rate limit, tried again later.
//!
//! The server limits unauthenticated calls (attestation, bundle fetches) per
//! source address, and a whole fleet may sit behind one address (a NAT, a
//! load balancer) and restart at once. Each agent then waits a random time
//! up to a ceiling that doubles after every refusal ("full jitter"), never
//! less than the server's `retry-after-ms` hint, so that the fleet spreads
//! its attempts over the limit's rate instead of retrying in lockstep.

use std::future::Future;
use std::time::Duration;

use sigil_types::ratelimit::RETRY_AFTER_KEY;
use tokio::time::Instant;
use tonic::{Code, Status};

/// The ceiling of the first wait.
pub const FIRST_WAIT: Duration = Duration::from_millis(500);
/// The largest ceiling: no wait is longer.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// After this long, a refusal is returned instead of retried.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// Runs `call` until it returns anything but `ResourceExhausted`, waiting
/// between attempts as described in the module docs; gives up (returning the
/// refusal) after [`GIVE_UP_AFTER`]. `what` names the call in logs.
pub async fn while_exhausted<T, F, Fut>(what: &str, call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let policy = Policy {
        first_wait: FIRST_WAIT,
        max_wait: MAX_WAIT,
        give_up_after: GIVE_UP_AFTER,
    };
    retry(&policy, what, call).await
}

/// The waits of [`retry`]; the constants above in the product.
#[derive(Debug, Clone, Copy)]
struct Policy {
    first_wait: Duration,
    max_wait: Duration,
    give_up_after: Duration,
}

/// [`while_exhausted`] with the waits of `policy`.
async fn retry<T, F, Fut>(policy: &Policy, what: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let start = Instant::now();
    let mut ceiling = policy.first_wait;
    loop {
        match call().await {
            Err(s)
                if s.code() == Code::ResourceExhausted
                    && start.elapsed() < policy.give_up_after =>
            {
                let wait = full_jitter(ceiling).max(hint(&s).min(policy.max_wait));
                tracing::info!(
                    call = what,
                    wait_ms = wait.as_millis() as u64,
                    reason = s.message(),
                    "refused by the server's rate limit; retrying"
                );
                tokio::time::sleep(wait).await;
                ceiling = (ceiling * 2).min(policy.max_wait);
            }
            other => return other,
        }
    }
}

/// The server's `retry-after-ms` hint; zero without one.
fn hint(s: &Status) -> Duration {
    s.metadata()
        .get(RETRY_AFTER_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
}

/// A uniformly random duration in `[0, ceiling]`.
pub(crate) fn full_jitter(ceiling: Duration) -> Duration {
    let mut r = [0u8; 4];
    // Without randomness the full ceiling is waited: slower, never a stampede.
    if aws_lc_rs::rand::fill(&mut r).is_err() {
        return ceiling;
    }
    ceiling.mul_f64(f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn refusal(retry_after_ms: Option<&str>) -> Status {
        let mut s = Status::resource_exhausted("rate limit exceeded");
        if let Some(v) = retry_after_ms {
            s.metadata_mut().insert(RETRY_AFTER_KEY, v.parse().unwrap());
        }
        s
    }

    #[test]
    fn jitter_stays_under_the_ceiling_and_spreads() {
        let waits: Vec<_> = (0..200).map(|_| full_jitter(FIRST_WAIT)).collect();
        assert!(waits.iter().all(|w| *w <= FIRST_WAIT));
        assert!(waits.iter().any(|w| *w < FIRST_WAIT / 2));
        assert!(waits.iter().any(|w| *w > FIRST_WAIT / 2));
    }

    #[test]
    fn the_hint_is_read_from_metadata() {
        assert_eq!(hint(&refusal(Some("1500"))), Duration::from_millis(1500));
        assert_eq!(hint(&refusal(Some("soon"))), Duration::ZERO);
        assert_eq!(hint(&refusal(None)), Duration::ZERO);
    }

    /// Waits short enough for a test (tokio's paused clock is not built here).
    const QUICK: Policy = Policy {
        first_wait: Duration::from_millis(1),
        max_wait: Duration::from_millis(5),
        give_up_after: Duration::from_millis(200),
    };

    #[tokio::test]
    async fn refusals_are_retried_no_sooner_than_the_hint() {
        let calls = AtomicU32::new(0);
        let t0 = Instant::now();
        let out = retry(&QUICK, "test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(refusal(Some("4")))
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(out, 3);
        assert!(
            t0.elapsed() >= Duration::from_millis(12),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn other_errors_are_returned_at_once_and_refusals_in_the_end() {
        let calls = AtomicU32::new(0);
        let err = retry(&QUICK, "test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Status::permission_denied("no")) }
        })
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let t0 = Instant::now();
        let err = retry(&QUICK, "test", || async { Err::<(), _>(refusal(None)) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(t0.elapsed() >= QUICK.give_up_after);
    }
}
