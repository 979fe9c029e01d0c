//! [`ServerState`]: what the server's tasks share. Each piece has one
//! owner that writes it (the change follower the index and the agents in
//! memory, the rotation loop the server SVID, the sync streams the
//! connection counts); everyone else reads.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use sigil_store::Store;
use sigil_svid::tls::RotatingCert;
use sigil_types::SpiffeId;
use tokio::sync::Notify;

use crate::agents::AgentRecords;
use crate::ca::CaManager;
use crate::config::ServerConfig;
use crate::federation::Federation;
use crate::index::EntryIndex;
use crate::metrics::Metrics;
use crate::psat::PsatVerifiers;
use crate::readiness::Readiness;

/// Everything the server's tasks share.
pub struct ServerState {
    /// The validated configuration.
    pub(crate) config: ServerConfig,
    /// The source of truth.
    pub(crate) store: Arc<dyn Store>,
    /// Authorities and bundle.
    pub(crate) ca: Arc<CaManager>,
    /// Entries in memory; written by the change follower only.
    pub(crate) index: Arc<EntryIndex>,
    /// Attested agents in memory; written by the change follower only.
    pub(crate) agents: AgentRecords,
    /// Federation relationships and the federated bundles.
    pub(crate) federation: Arc<Federation>,
    /// `spiffe://<td>/sigil/server`.
    pub(crate) server_id: SpiffeId,
    /// The server's own SVID, presented to agents; renewed by the rotation loop.
    pub(crate) server_cert: Arc<RotatingCert>,
    /// When the server SVID should be renewed.
    pub(crate) server_cert_renew_at: std::sync::Mutex<SystemTime>,
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// Wakes the change follower after a local write.
    pub(crate) follower_wake: Notify,
    /// Cancelled when the server stops (the follower with it): nothing
    /// waits for the index past that.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
    /// Agents with an open sync stream (count per agent).
    pub(crate) connected: std::sync::Mutex<HashMap<SpiffeId, usize>>,
    /// Set once every listener runs.
    pub(crate) ready: AtomicBool,
    /// The `/readyz` check, its cache and the follower's progress.
    pub(crate) readiness: Readiness,
    /// One verifier per Kubernetes PSAT cluster profile.
    #[cfg_attr(
        not(feature = "k8s"),
        expect(
            dead_code,
            reason = "without Kubernetes support there are no verifiers to ask"
        )
    )]
    pub(crate) psat: PsatVerifiers,
    /// Serializes read-modify-write of re-attestable agent records with bans.
    pub(crate) agent_writes: tokio::sync::Mutex<()>,
    /// One slot per core for CSR signing tasks.
    pub(crate) signing_slots: crate::signing::SigningSlots,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("trust_domain", &self.config.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// The validated configuration the server runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The store: the source of truth.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The authorities and the trust domain's bundle.
    pub fn ca(&self) -> &Arc<CaManager> {
        &self.ca
    }

    /// The entries in memory.
    pub fn index(&self) -> &EntryIndex {
        &self.index
    }

    /// Federation relationships and the federated bundles.
    pub fn federation(&self) -> &Federation {
        &self.federation
    }

    /// The server's SPIFFE ID, `spiffe://<td>/sigil/server`.
    pub fn server_id(&self) -> &SpiffeId {
        &self.server_id
    }

    /// The server's own SVID, as presented to agents now.
    pub fn server_cert(&self) -> &Arc<RotatingCert> {
        &self.server_cert
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the server finished starting; [`ServerState::readiness`]
    /// says whether it can serve now.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Marks the start finished.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Prometheus text of the server's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.entries.set(self.index.len() as i64);
        self.metrics.render()
    }

    /// Whether an agent holds an open sync stream to this server.
    pub fn is_connected(&self, id: &SpiffeId) -> bool {
        self.connected
            .lock()
            .map(|m| m.get(id).copied().unwrap_or(0) > 0)
            .unwrap_or(false)
    }

    /// Counts a sync stream of `id` opening (`delta` 1) or closing (-1).
    pub(crate) fn track_stream(&self, id: &SpiffeId, delta: isize) {
        if let Ok(mut m) = self.connected.lock() {
            let n = m.entry(id.clone()).or_insert(0);
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                m.remove(id);
            }
        }
        self.metrics.sync_streams.inc_by(delta as i64);
    }

    /// Waits until the index has caught up with `revision`, waking the
    /// follower; or until the server stops, when the follower no longer
    /// runs. A call that reached the server as it was stopping must end,
    /// not hold the graceful shutdown until it is killed.
    pub(crate) async fn settle(&self, revision: u64) {
        self.follower_wake.notify_one();
        tokio::select! {
            () = self.index.wait_for(revision) => {}
            () = self.stopping.cancelled() => {}
        }
    }
}
