//! The sigil server: the CA and the registry of a trust domain.
//!
//! It attests agents (join tokens, Kubernetes PSATs), issues their SVIDs, keeps every entry in
//! an in-memory [`index`] fed by the store's change feed, pushes each agent
//! exactly its authorized entries over a long-lived sync stream, signs CSRs
//! and mints JWT-SVIDs for those entries only, and serves the admin API on a
//! Unix socket.
//!
//! | module | role |
//! |---|---|
//! | [`config`] | the TOML config and its validation |
//! | [`ca`] | X.509 and JWT authorities, rotation, the bundle |
//! | [`index`] | entries in memory, authorized sets |
//! | [`agents`] | attested agents in memory, for authentication |
//! | [`registry`] | the operations behind both APIs |
//! | [`psat`] | Kubernetes PSAT node attestation (cargo feature `k8s`) |
//! | [`agent_api`] | what agents call, over mutual TLS |
//! | [`sync_pages`] | one sync update split into bounded pages |
//! | [`admin_api`] | what operators call, over the admin socket |
//! | [`tls`] | the TLS listener and peer identities |
//! | [`limits`] | message sizes, rate limits, connection caps, timeouts |
//! | [`federation`] | the bundle endpoint and federation with other trust domains |
//! | [`oidc`] | OIDC discovery and the JWKS for cloud IAMs |
//! | [`readiness`] | what `/readyz` checks |

pub mod admin_api;
pub mod agent_api;
pub mod agents;
pub mod ca;
mod cert_files;
pub mod config;
pub mod error;
pub mod federation;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod oidc;
pub mod psat;
pub mod readiness;
pub mod registry;
pub mod sync_pages;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_store::{ChangeKind, SqliteStore, Store};
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::RotatingCert;
use sigil_svid::x509::SvidRequest;
use sigil_types::SpiffeId;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ServerConfig;
pub use error::ServerError;

use crate::ca::CaManager;
use crate::index::EntryIndex;
use crate::metrics::Metrics;

/// Largest gRPC message the server accepts by default (a batch of CSRs or
/// entries); `[server.limits]` sets the actual caps.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Everything the server's tasks share.
pub struct ServerState {
    /// The validated configuration.
    pub config: ServerConfig,
    /// The source of truth.
    pub store: Arc<dyn Store>,
    /// Authorities and bundle.
    pub ca: Arc<CaManager>,
    /// Entries in memory.
    pub index: Arc<EntryIndex>,
    /// Attested agents in memory.
    pub agents: agents::AgentRecords,
    /// Federation relationships and the federated bundles.
    pub federation: Arc<federation::Federation>,
    /// `spiffe://<td>/sigil/server`.
    pub server_id: SpiffeId,
    /// The server's own SVID, presented to agents.
    pub server_cert: Arc<RotatingCert>,
    /// When the server SVID should be renewed.
    server_cert_renew_at: std::sync::Mutex<SystemTime>,
    /// Metrics.
    pub metrics: Metrics,
    /// Wakes the change follower after a local write.
    follower_wake: Notify,
    /// Agents with an open sync stream (count per agent).
    connected: std::sync::Mutex<std::collections::HashMap<SpiffeId, usize>>,
    ready: std::sync::atomic::AtomicBool,
    /// The `/readyz` check, its cache and the follower's progress.
    readiness: readiness::Readiness,
    /// One verifier per Kubernetes PSAT cluster profile.
    #[cfg_attr(
        not(feature = "k8s"),
        expect(
            dead_code,
            reason = "without Kubernetes support there are no verifiers to ask"
        )
    )]
    psat: psat::PsatVerifiers,
    /// Serializes read-modify-write of re-attestable agent records with bans.
    agent_writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("trust_domain", &self.config.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// Whether the server finished starting; [`ServerState::readiness`]
    /// says whether it can serve now.
    pub fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst)
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

    /// Mints a fresh server SVID with the active authority.
    fn renew_server_cert(&self, now: SystemTime) -> Result<(), ServerError> {
        let (chain, key) = mint_server_svid(
            &self.ca,
            &self.server_id,
            self.config.default_x509_svid_ttl,
            now,
        )?;
        self.server_cert.update(chain, &key)?;
        if let Ok(mut at) = self.server_cert_renew_at.lock() {
            *at = now + self.config.default_x509_svid_ttl / 2;
        }
        Ok(())
    }

    /// Deletes entries whose `expires_at` is at or before `now` (Unix
    /// seconds); returns how many were deleted.
    pub async fn prune_expired_entries(&self, now: i64) -> usize {
        let mut deleted = 0;
        for id in self.index.expired(now) {
            match self.store.delete_entry(&id).await {
                Ok(_) => {
                    deleted += 1;
                    tracing::info!(entry = %id, "expired entry deleted");
                }
                Err(e) => tracing::warn!(entry = %id, error = %e, "deleting expired entry failed"),
            }
        }
        if deleted > 0
            && let Ok(rev) = self.store.revision().await
        {
            self.settle(rev).await;
        }
        deleted
    }

    /// Waits until the index has caught up with `revision`, waking the follower.
    pub(crate) async fn settle(&self, revision: u64) {
        self.follower_wake.notify_one();
        self.index.wait_for(revision).await;
    }
}

fn mint_server_svid(
    ca: &CaManager,
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Result<(Vec<Vec<u8>>, PrivateKey), ServerError> {
    let key = PrivateKey::generate_p256()?;
    let leaf =
        ca.active()
            .x509
            .sign_svid(&SvidRequest::new(id, ttl), &key.public_key_spki_der(), now)?;
    Ok((vec![leaf], key))
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    /// Shared state, for in-process callers (`sigil dev`, tests).
    pub state: Arc<ServerState>,
    /// The agent API's bound address.
    pub agent_api_addr: SocketAddr,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// The OIDC discovery listener's bound address, when `[server.oidc]` is set.
    pub oidc_addr: Option<SocketAddr>,
    /// The SPIFFE bundle endpoint's bound address, when
    /// `[server.federation.bundle_endpoint]` is set.
    pub bundle_endpoint_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl ServerHandle {
    /// Stops every task and waits for them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let _ = std::fs::remove_file(&self.admin_socket);
    }

    /// A token cancelled when the server stops.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// Opens the store, loads the CA, builds the index and starts every listener
/// and background task.
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    sigil_svid::install_crypto_provider();
    sigil_svid::keys::ensure_private_dir(&config.data_dir)?;
    let store = open_store(&config).await?;
    start_with_store(config, store).await
}

/// Opens the configured store: SQLite in the data directory, or PostgreSQL.
pub async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>, ServerError> {
    match &config.store {
        config::StoreConfig::Sqlite => Ok(Arc::new(
            SqliteStore::open(&config.data_dir.join("sigil.db")).await?,
        )),
        #[cfg(feature = "postgres")]
        config::StoreConfig::Postgres { url } => {
            let store = sigil_store::PostgresStore::connect(url).await?;
            tracing::info!("using the PostgreSQL store");
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "postgres"))]
        config::StoreConfig::Postgres { .. } => Err(ServerError::Internal(
            "this build of sigil has no PostgreSQL support".into(),
        )),
    }
}

/// Like [`start`], with a store opened by the caller.
pub async fn start_with_store(
    config: ServerConfig,
    store: Arc<dyn Store>,
) -> Result<ServerHandle, ServerError> {
    sigil_svid::install_crypto_provider();
    // First, so that a bad JWKS or kubeconfig stops the start before anything listens.
    let psat = psat::PsatVerifiers::build(&config.k8s_psat).await?;
    let now = SystemTime::now();
    let instance_id = ca::load_or_create_instance_id(&config.data_dir)?;
    let ca = CaManager::load(
        config.trust_domain.clone(),
        store.clone(),
        &instance_id,
        &config.data_dir.join("keys"),
        config.ca_ttl,
        config.bundle_refresh_hint,
        config.jwt_key_type,
        now,
    )
    .await?;
    let index = Arc::new(EntryIndex::new(store.list_entries().await?));
    // After the entries: changes between the two reads are applied again by
    // the follower, which re-reads the agents they name.
    let agents = agents::AgentRecords::load(store.as_ref()).await?;
    let server_id = config
        .trust_domain
        .id_with_path(sigil_types::SERVER_PATH)
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    let (chain, key) = mint_server_svid(&ca, &server_id, config.default_x509_svid_ttl, now)?;
    let server_cert = Arc::new(RotatingCert::new(chain, &key)?);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let federation = federation::Federation::new(
        config.trust_domain.clone(),
        store.clone(),
        ca.clone(),
        &config.federation,
        cancel.clone(),
        tracker.clone(),
    )
    .await?;
    let state = Arc::new(ServerState {
        server_cert_renew_at: std::sync::Mutex::new(now + config.default_x509_svid_ttl / 2),
        config,
        store,
        ca,
        index,
        agents,
        federation,
        server_id,
        server_cert,
        metrics: Metrics::default(),
        follower_wake: Notify::new(),
        connected: std::sync::Mutex::new(Default::default()),
        ready: std::sync::atomic::AtomicBool::new(false),
        readiness: readiness::Readiness::new(),
        psat,
        agent_writes: tokio::sync::Mutex::new(()),
    });

    tracker.spawn(follow_changes(state.clone(), cancel.clone()));
    tracker.spawn(rotate_loop(state.clone(), cancel.clone()));
    tracker.spawn(prune_loop(state.clone(), cancel.clone()));

    // Agent API over mutual TLS.
    let listener = TcpListener::bind(state.config.bind_address).await?;
    let agent_api_addr = listener.local_addr()?;
    let tls_config = Arc::new(tls::server_config(
        state.ca.clone(),
        state.server_cert.clone(),
    )?);
    let limits = state.config.limits.clone();
    let incoming = tls::incoming(listener, tls_config, cancel.clone(), &limits);
    let agent_service = agent_api::service(state.clone(), cancel.clone());
    let c = cancel.clone();
    tracker.spawn(async move {
        // The request timeout ends a call that has not answered; a stream
        // (Sync) runs on after its first answer.
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(crate::limits::KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(crate::limits::KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(limits.max_streams_per_connection)
            .timeout(limits.request_timeout)
            .add_service(agent_service)
            .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "agent API stopped");
        }
    });

    // Admin API on a private Unix socket.
    let admin_socket = state.config.admin_socket.clone();
    let admin_listener = bind_private_socket(&admin_socket)?;
    let admin_service = admin_api::service(state.clone());
    let c = cancel.clone();
    tracker.spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(admin_service)
            .serve_with_incoming_shutdown(
                // Clients of every gRPC stack, whatever :authority they send.
                sigil_uds::incoming(tokio_stream::wrappers::UnixListenerStream::new(
                    admin_listener,
                )),
                c.cancelled_owned(),
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "admin API stopped");
        }
    });

    // OIDC discovery for cloud IAMs, when configured.
    let oidc_addr = match &state.config.oidc {
        Some(oidc_config) => {
            let bound = oidc::bind(
                oidc_config,
                state.ca.clone(),
                state.config.ca_ttl,
                cancel.clone(),
            )
            .await;
            let (addr, serve) = bound.inspect_err(|_| cancel.cancel())?;
            tracker.spawn(serve);
            Some(addr)
        }
        None => None,
    };

    // The SPIFFE bundle endpoint and the pollers of federated bundles.
    let bundle_endpoint_addr = match &state.config.federation.bundle_endpoint {
        Some(endpoint) => Some(
            federation::endpoint::serve(
                endpoint,
                state.ca.clone(),
                state.server_cert.clone(),
                cancel.clone(),
                &tracker,
            )
            .await
            .inspect_err(|_| cancel.cancel())?,
        ),
        None => None,
    };
    state
        .federation
        .start()
        .await
        .inspect_err(|_| cancel.cancel())?;

    if let Some(addr) = bundle_endpoint_addr {
        tracing::info!(address = %addr, "SPIFFE bundle endpoint listening");
    }
    state.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(
        trust_domain = %state.config.trust_domain,
        agent_api = %agent_api_addr,
        admin_socket = %admin_socket.display(),
        "server started"
    );
    Ok(ServerHandle {
        state,
        agent_api_addr,
        admin_socket,
        oidc_addr,
        bundle_endpoint_addr,
        cancel,
        tracker,
    })
}

/// Binds a Unix socket only its owner can use: the parent directory is
/// created 0700 if missing, a stale socket file is replaced, and the socket
/// is made 0600.
fn bind_private_socket(path: &std::path::Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        sigil_svid::keys::ensure_private_dir(dir)?;
    }
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        ServerError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot bind admin socket {}: {e}", path.display()),
        ))
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Applies the store's change feed to the index, in revision order. Woken by
/// local writes and, on a shared database, by other servers' commits
/// (PostgreSQL `LISTEN`); a slow tick reads the feed anyway, in case a
/// notification was lost. The feed, read in revision order, is the truth;
/// the wake-ups only say when to read it.
async fn follow_changes(state: Arc<ServerState>, cancel: CancellationToken) {
    let mut remote = state.store.subscribe_changes();
    loop {
        catch_up(&state).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = state.follower_wake.notified() => {}
            changed = remote_change(&mut remote) => if !changed {
                remote = None;
            },
            _ = tokio::time::sleep(FOLLOWER_POLL) => {}
        }
    }
}

/// Applies every change after the index's revision, in order; stops (to be
/// called again at the next wake-up) when the feed or an agent cannot be read.
async fn catch_up(state: &ServerState) {
    loop {
        let changes = match state
            .store
            .changes_since(state.index.revision(), 1000)
            .await
        {
            Ok(changes) if changes.is_empty() => {
                state.readiness.follower_caught_up();
                return;
            }
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!(error = %e, "reading the change feed failed; retrying");
                return;
            }
        };
        for c in changes {
            if let Err(e) = apply_agent_change(state, &c.kind).await {
                // Not applied: read again from this change on.
                tracing::warn!(error = %e, "re-reading an agent failed; retrying");
                return;
            }
            // Federation next, so that once the index shows a revision,
            // what it changed is visible everywhere.
            match &c.kind {
                ChangeKind::BundleChanged(td) if *td == state.config.trust_domain => {
                    // The own bundle: a peer server's authorities may have changed.
                    if let Err(e) = state.ca.refresh_peers(SystemTime::now()).await {
                        tracing::warn!(error = %e, "re-reading the peers' authorities failed");
                    }
                }
                ChangeKind::BundleChanged(td) | ChangeKind::BundleDeleted(td) => {
                    state.federation.reload_bundle(td).await;
                }
                ChangeKind::FederationChanged(td) | ChangeKind::FederationDeleted(td) => {
                    state.federation.reconcile(td).await;
                }
                _ => {}
            }
            state.index.apply(c);
        }
    }
}

/// Brings the agents in memory up to a change, before the index publishes
/// it, so that a sync stream told of the change finds the new record. A
/// corrupt record is logged and skipped (retrying cannot help, and it must
/// not stall every later change); other errors are returned.
async fn apply_agent_change(
    state: &ServerState,
    kind: &ChangeKind,
) -> Result<(), sigil_store::StoreError> {
    let result = match kind {
        ChangeKind::AgentChanged(id) => state.agents.reload(state.store.as_ref(), id).await,
        ChangeKind::AgentDeleted(id) => {
            state.agents.remove(id);
            Ok(())
        }
        _ => Ok(()),
    };
    match result {
        Err(sigil_store::StoreError::Corrupt(e)) => {
            tracing::error!(error = %e, "an agent record is corrupt");
            Ok(())
        }
        other => other,
    }
}

/// How often the change follower reads the feed without being woken.
const FOLLOWER_POLL: Duration = Duration::from_secs(1);

/// Waits for the store's wake-up; `false` if it ended (never, if there is none).
async fn remote_change(remote: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match remote {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

async fn rotate_loop(state: Arc<ServerState>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(state.config.rotation_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = SystemTime::now();
        // The server's own SVID first: renewing it needs no database, so an
        // outage (during which a rotation pass fails, or waits for a
        // connection) never lets it expire and lock agents out.
        let due = state
            .server_cert_renew_at
            .lock()
            .map(|at| now >= *at)
            .unwrap_or(true);
        if due && let Err(e) = state.renew_server_cert(now) {
            tracing::error!(error = %e, "renewing the server SVID failed; will retry");
        }
        match state.ca.rotate(now).await {
            Ok(true) => {
                state.metrics.ca_activations.inc();
                // Signed by the authority that signs from now on.
                if let Err(e) = state.renew_server_cert(SystemTime::now()) {
                    tracing::error!(error = %e, "renewing the server SVID failed; will retry");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "CA rotation failed; will retry"),
        }
    }
}

async fn prune_loop(state: Arc<ServerState>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = ca::unix(SystemTime::now());
        state.prune_expired_entries(now).await;
        if let Err(e) = state.store.prune_join_tokens(now).await {
            tracing::warn!(error = %e, "pruning join tokens failed");
        }
        // Keep a generous tail of the feed for followers; entries themselves
        // are always in the entries table.
        let keep_from = state.index.revision().saturating_sub(100_000);
        if keep_from > 0
            && let Err(e) = state.store.prune_changes(keep_from).await
        {
            tracing::warn!(error = %e, "pruning the change feed failed");
        }
    }
}
