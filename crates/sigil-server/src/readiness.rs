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

/// What a health listener reports of a running server (readiness and
/// metrics), holding nothing else of it: from [`ServerHandle::health`](crate::ServerHandle::health).
#[derive(Debug, Clone)]
pub struct ServerHealth(pub(crate) std::sync::Arc<ServerState>);

impl ServerHealth {
    /// Whether the server can serve now; if not, why (`/readyz`).
    pub async fn readiness(&self) -> Result<(), NotReady> {
        self.0.readiness().await
    }

    /// The Prometheus text exposition of the server's metrics (`/metrics`).
    pub fn metrics_text(&self) -> String {
        self.0.metrics_text()
    }
}

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use sigil_store::{
        AuthorityRecord, Change, EntrySnapshot, JoinToken, SqliteStore, Store, StoreError,
    };
    use sigil_types::{AgentRecord, Entry, EntryId, FederationRelationship, SpiffeId, TrustDomain};

    use super::*;

    /// SQLite that counts `revision` queries and can be made to never answer
    /// them, or to fail reads of the change feed.
    struct Counting {
        inner: SqliteStore,
        revisions: AtomicUsize,
        hang: AtomicBool,
        feed_broken: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for Counting {
        async fn revision(&self) -> Result<u64, StoreError> {
            self.revisions.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.inner.revision().await
        }
        async fn create_entry(&self, e: Entry) -> Result<Entry, StoreError> {
            self.inner.create_entry(e).await
        }
        async fn create_entries(
            &self,
            e: Vec<Entry>,
        ) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
            self.inner.create_entries(e).await
        }
        async fn update_entry(&self, e: Entry) -> Result<Entry, StoreError> {
            self.inner.update_entry(e).await
        }
        async fn delete_entry(&self, id: &EntryId) -> Result<Entry, StoreError> {
            self.inner.delete_entry(id).await
        }
        async fn update_entries(
            &self,
            e: Vec<Entry>,
        ) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
            self.inner.update_entries(e).await
        }
        async fn delete_entries(
            &self,
            ids: &[EntryId],
        ) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
            self.inner.delete_entries(ids).await
        }
        async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError> {
            self.inner.get_entry(id).await
        }
        async fn list_entries(&self) -> Result<EntrySnapshot, StoreError> {
            self.inner.list_entries().await
        }
        async fn changes_since(&self, after: u64, limit: u32) -> Result<Vec<Change>, StoreError> {
            if self.feed_broken.load(Ordering::SeqCst) {
                return Err(StoreError::Corrupt("feed broken by the test".to_owned()));
            }
            self.inner.changes_since(after, limit).await
        }
        async fn prune_changes(&self, up_to: u64) -> Result<u64, StoreError> {
            self.inner.prune_changes(up_to).await
        }
        async fn upsert_agent(&self, a: AgentRecord) -> Result<(), StoreError> {
            self.inner.upsert_agent(a).await
        }
        async fn renew_agent_serial(
            &self,
            id: &SpiffeId,
            presented: &str,
            serial: &str,
            expires_at: i64,
            updated_at: i64,
        ) -> Result<Option<AgentRecord>, StoreError> {
            self.inner
                .renew_agent_serial(id, presented, serial, expires_at, updated_at)
                .await
        }
        async fn mark_agent_serial_used(
            &self,
            id: &SpiffeId,
            serial: &str,
        ) -> Result<Option<AgentRecord>, StoreError> {
            self.inner.mark_agent_serial_used(id, serial).await
        }
        async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
            self.inner.get_agent(id).await
        }
        async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
            self.inner.list_agents().await
        }
        async fn delete_agent(&self, id: &SpiffeId) -> Result<AgentRecord, StoreError> {
            self.inner.delete_agent(id).await
        }
        async fn set_agent_banned(
            &self,
            id: &SpiffeId,
            banned: bool,
        ) -> Result<AgentRecord, StoreError> {
            self.inner.set_agent_banned(id, banned).await
        }
        async fn create_join_token(&self, t: JoinToken) -> Result<(), StoreError> {
            self.inner.create_join_token(t).await
        }
        async fn consume_join_token(&self, hash: &str, now: i64) -> Result<JoinToken, StoreError> {
            self.inner.consume_join_token(hash, now).await
        }
        async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
            self.inner.prune_join_tokens(now).await
        }
        async fn put_bundle(&self, td: &TrustDomain, json: &str) -> Result<(), StoreError> {
            self.inner.put_bundle(td, json).await
        }
        async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<String>, StoreError> {
            self.inner.get_bundle(td).await
        }
        async fn list_bundles(&self) -> Result<Vec<(TrustDomain, String)>, StoreError> {
            self.inner.list_bundles().await
        }
        async fn delete_bundle(&self, td: &TrustDomain) -> Result<(), StoreError> {
            self.inner.delete_bundle(td).await
        }
        async fn put_federation_relationship(
            &self,
            r: FederationRelationship,
        ) -> Result<(), StoreError> {
            self.inner.put_federation_relationship(r).await
        }
        async fn get_federation_relationship(
            &self,
            td: &TrustDomain,
        ) -> Result<Option<FederationRelationship>, StoreError> {
            self.inner.get_federation_relationship(td).await
        }
        async fn list_federation_relationships(
            &self,
        ) -> Result<Vec<FederationRelationship>, StoreError> {
            self.inner.list_federation_relationships().await
        }
        async fn delete_federation_relationship(
            &self,
            td: &TrustDomain,
        ) -> Result<FederationRelationship, StoreError> {
            self.inner.delete_federation_relationship(td).await
        }
        async fn put_authority(&self, a: AuthorityRecord) -> Result<(), StoreError> {
            self.inner.put_authority(a).await
        }
        async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
            self.inner.list_authorities().await
        }
        async fn delete_authority(&self, id: &str) -> Result<(), StoreError> {
            self.inner.delete_authority(id).await
        }
    }

    async fn server(dir: &tempfile::TempDir) -> (crate::ServerHandle, Arc<Counting>) {
        let store = Arc::new(Counting {
            inner: SqliteStore::open(&dir.path().join("sigil.db"))
                .await
                .unwrap(),
            revisions: AtomicUsize::new(0),
            hang: AtomicBool::new(false),
            feed_broken: AtomicBool::new(false),
        });
        let config = crate::ServerConfig::for_test(dir.path());
        let server = crate::start_with_store(config, store.clone())
            .await
            .unwrap();
        (server, store)
    }

    /// Polls the readiness until `done` holds for it; panics after `limit`.
    async fn readiness_until(
        state: &crate::ServerState,
        limit: Duration,
        done: impl Fn(&Result<(), NotReady>) -> bool,
    ) -> Result<(), NotReady> {
        tokio::time::timeout(limit, async {
            loop {
                let r = state.readiness().await;
                if done(&r) {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the readiness changed in time")
    }

    /// A probe flood costs the store one query per [`CACHE_FOR`]; a store
    /// that does not answer makes the server not ready after
    /// [`STORE_TIMEOUT`], not never.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_share_one_store_query_and_a_silent_store_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let (server, store) = server(&dir).await;

        let before = store.revisions.load(Ordering::SeqCst);
        let probes: Vec<_> = (0..50)
            .map(|_| {
                let state = server.state().clone();
                tokio::spawn(async move { state.readiness().await })
            })
            .collect();
        for p in probes {
            assert_eq!(p.await.unwrap(), Ok(()));
        }
        assert_eq!(store.revisions.load(Ordering::SeqCst) - before, 1);

        store.hang.store(true, Ordering::SeqCst);
        let limit = STORE_TIMEOUT + CACHE_FOR * 5;
        let answer = readiness_until(server.state(), limit, Result::is_err).await;
        let expected = NotReady::StoreUnreachable("no answer within 2s".to_owned());
        assert_eq!(answer, Err(expected));
        server.shutdown().await;
    }

    /// A change follower that cannot read the feed, while the store still
    /// answers, makes the server not ready after [`FOLLOWER_STALE_AFTER`];
    /// it is ready again once the follower reads the feed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_change_follower_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let (server, store) = server(&dir).await;
        assert_eq!(server.state().readiness().await, Ok(()));
        store.feed_broken.store(true, Ordering::SeqCst);
        let limit = FOLLOWER_STALE_AFTER + Duration::from_secs(5);
        let answer = readiness_until(server.state(), limit, Result::is_err).await;
        assert!(
            matches!(answer, Err(NotReady::FollowerStale(n)) if n >= 10),
            "{answer:?}"
        );
        store.feed_broken.store(false, Ordering::SeqCst);
        let back = readiness_until(server.state(), limit, Result::is_ok).await;
        assert_eq!(back, Ok(()));
        server.shutdown().await;
    }
}
