//! The agent core's two clocks, read in one place.
//!
//! Deadlines the core sets itself (when to retry a connection or a signing
//! request) are `tokio::time::Instant`s, and the core sleeps on tokio's
//! clock, so that its scheduling can be tested on paused time.
//!
//! Certificate times stay wall-clock `SystemTime`s while held: `not_after`
//! and the renewal times derived from a certificate's validity are wall
//! times, and the wall clock is what peers check them against. Held as wall
//! times, they follow a stepped clock or a host that was suspended (tokio's
//! clock does not count a suspension), so an SVID is renewed and stops
//! being served when its validity says, not that much later. They become
//! tokio deadlines in one place, [`Clock::deadline`], when the core decides
//! how long to sleep.

use std::time::SystemTime;

use tokio::time::Instant;

/// Where the core reads the wall clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// `None`: the system's wall clock. `Some((wall, at))`: a wall clock
    /// that reads `wall` at tokio instant `at` and moves with tokio's clock
    /// (tests on paused time).
    origin: Option<(SystemTime, Instant)>,
}

impl Clock {
    /// The system's wall clock.
    pub(crate) fn system() -> Self {
        Self { origin: None }
    }

    /// A wall clock that reads `wall` now and then moves with tokio's
    /// clock, paused or not.
    #[cfg(test)]
    pub(crate) fn following_tokio(wall: SystemTime) -> Self {
        Self {
            origin: Some((wall, Instant::now())),
        }
    }

    /// The wall time now.
    pub(crate) fn wall(&self) -> SystemTime {
        match self.origin {
            None => SystemTime::now(),
            Some((wall, at)) => wall + Instant::now().saturating_duration_since(at),
        }
    }

    /// The tokio instant at which the wall clock reaches `t` (now, if past).
    pub(crate) fn deadline(&self, t: SystemTime) -> Instant {
        Instant::now() + t.duration_since(self.wall()).unwrap_or_default()
    }
}
