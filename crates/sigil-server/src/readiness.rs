//! Whether the server can serve now, as `/readyz` reports it: started, an
//! unexpired authority to sign with, a store that answers, and a change
//! follower that keeps up with the feed.
//!
//! The store is asked with one cheap query under a short timeout, and the
//! answer is kept for [`CACHE_FOR`], so a flood of probes costs the database
//! at most one query per [`CACHE_FOR`].

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::ServerState;

/// How long the store may take to answer the readiness query.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one readiness answer is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(1);

/// How long the change follower may go without reaching the end of the feed
/// (it reads it at least every second) before the server is not ready.
pub const FOLLOWER_STALE_AFTER: Duration = Duration::from_secs(10);

/// Why the server is not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    /// `start` has not finished.
    #[error("starting")]
    Starting,
    /// The active X.509 or JWT authority has expired: rotation has been
    /// failing for longer than the authority's life, and nothing it signs
    /// would verify.
    #[error("the active {0} authority has expired")]
    AuthorityExpired(&'static str),
    /// The readiness query failed; the message is the store's error.
    #[error("store unreachable: {0}")]
    StoreUnreachable(String),
    /// The change follower has not reached the end of the feed for this
    /// long: entry changes made through other servers are not applied.
    #[error("change follower stale: last caught up {0}s ago")]
    FollowerStale(u64),
}

/// The readiness check with its cache; one per server.
#[derive(Debug)]
pub(crate) struct Readiness {
    /// The last answer and when it was made. A tokio mutex, held across the
    /// check, so that concurrent probes wait for one query instead of each
    /// sending their own.
    cache: tokio::sync::Mutex<Option<(Instant, Result<(), NotReady>)>>,
    /// When the change follower last read the feed to its end.
    follower_caught_up: Mutex<Instant>,
}

impl Readiness {
    /// A check for a server whose follower has just read the whole feed.
    pub(crate) fn new() -> Self {
        Self {
            cache: tokio::sync::Mutex::new(None),
            follower_caught_up: Mutex::new(Instant::now()),
        }
    }

    /// Records that the change follower has read the feed to its end.
    pub(crate) fn follower_caught_up(&self) {
        if let Ok(mut at) = self.follower_caught_up.lock() {
            *at = Instant::now();
        }
    }

    fn follower_lag(&self) -> Duration {
        self.follower_caught_up
            .lock()
            .map(|at| at.elapsed())
            .unwrap_or(Duration::MAX)
    }
}

impl ServerState {
    /// Whether the server can serve now, and if not, why. Answers from a
    /// cache younger than [`CACHE_FOR`]; otherwise waits at most
    /// [`STORE_TIMEOUT`] for the store.
    pub async fn readiness(&self) -> Result<(), NotReady> {
        let mut cache = self.readiness.cache.lock().await;
        if let Some((at, answer)) = cache.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return answer.clone();
        }
        let answer = self.check_readiness().await;
        if let Err(why) = &answer {
            tracing::warn!(reason = %why, "not ready");
        }
        *cache = Some((Instant::now(), answer.clone()));
        answer
    }

    async fn check_readiness(&self) -> Result<(), NotReady> {
        if !self.ready() {
            return Err(NotReady::Starting);
        }
        let now = SystemTime::now();
        let active = self.ca.active();
        if active.x509.info().not_after <= now {
            return Err(NotReady::AuthorityExpired("X.509"));
        }
        if active.jwt.not_after() <= now {
            return Err(NotReady::AuthorityExpired("JWT"));
        }
        match tokio::time::timeout(STORE_TIMEOUT, self.store.revision()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(NotReady::StoreUnreachable(e.to_string())),
            Err(_) => {
                return Err(NotReady::StoreUnreachable(format!(
                    "no answer within {}s",
                    STORE_TIMEOUT.as_secs()
                )));
            }
        }
        let lag = self.readiness.follower_lag();
        if lag > FOLLOWER_STALE_AFTER {
            return Err(NotReady::FollowerStale(lag.as_secs()));
        }
        Ok(())
    }
}
