//! Running a server: opening the store, building the shared state, and
//! starting every listener and background task; [`ServerHandle`] stops them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use sigil_store::{SqliteStore, Store};
use sigil_svid::tls::RotatingCert;
use sigil_types::{BoxFuture, Entry, LocalBoxFuture, TrustDomain};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attestation::NewJoinToken;
use crate::ca::{self, CaManager};
use crate::config::{self, ServerConfig};
use crate::error::ServerError;
use crate::index::EntryIndex;
use crate::metrics::Metrics;
use crate::readiness::{Readiness, ServerHealth};
use crate::state::ServerState;
use crate::{admin_api, agent_api, agents, background, federation, follower, oidc, psat, tls};

/// A running server: what in-process callers (`sigil dev`, the testkit, the
/// bench, tests) reach it through, and what stops it.
#[derive(Debug)]
pub struct ServerHandle {
    state: Arc<ServerState>,
    agent_api_addr: SocketAddr,
    admin_socket: PathBuf,
    oidc_addr: Option<SocketAddr>,
    bundle_endpoint_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl ServerHandle {
    /// For tests: the whole shared state.
    #[cfg(any(test, feature = "test-util"))]
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// The trust domain the server issues identities in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.state.config.trust_domain
    }

    /// Creates a single-use join token, as `CreateJoinToken` does (the
    /// configured TTL when `None`).
    pub async fn generate_join_token(
        &self,
        ttl: Option<Duration>,
    ) -> Result<NewJoinToken, ServerError> {
        self.state.generate_join_token(ttl).await
    }

    /// Registers one entry, with the checks `BatchCreateEntry` makes, and
    /// returns once the server's index holds it.
    pub async fn create_entry(&self, entry: Entry) -> Result<Entry, ServerError> {
        self.state.create_entry(entry).await
    }

    /// Registers entries one after the other, each with the checks and the
    /// transaction of [`create_entry`](Self::create_entry) (so what it costs
    /// per entry is what a single create costs), but returns once the index
    /// holds them all, with one wait after the last instead of one after
    /// each: for preloading many. Returns how many were created. The first
    /// refusal stops it, and the entries before it stay (the index catches
    /// up with them on its own). `BatchCreateEntry` is the bulk path: one
    /// transaction per batch.
    pub async fn preload_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<usize, ServerError> {
        let mut created = 0;
        let mut last_revision = None;
        for entry in entries {
            last_revision = Some(self.state.store_new_entry(entry).await?.revision);
            created += 1;
        }
        if let Some(revision) = last_revision {
            self.state.settle(revision).await;
        }
        Ok(created)
    }

    /// How many entries the server's index holds.
    pub fn entry_count(&self) -> usize {
        self.state.index.len()
    }

    /// Readiness and metrics, for a health listener.
    pub fn health(&self) -> ServerHealth {
        ServerHealth(self.state.clone())
    }

    /// The agent API's bound address.
    pub fn agent_api_addr(&self) -> SocketAddr {
        self.agent_api_addr
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The OIDC discovery listener's bound address, when `[server.oidc]` is set.
    pub fn oidc_addr(&self) -> Option<SocketAddr> {
        self.oidc_addr
    }

    /// The SPIFFE bundle endpoint's bound address, when
    /// `[server.federation.bundle_endpoint]` is set.
    pub fn bundle_endpoint_addr(&self) -> Option<SocketAddr> {
        self.bundle_endpoint_addr
    }

    /// Stops every task and waits for them.
    #[inline(never)]
    pub fn shutdown(self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            self.tracker.close();
            self.tracker.wait().await;
            let _ = std::fs::remove_file(&self.admin_socket);
        })
    }

    /// A token cancelled when the server stops.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// Opens the store, loads the CA, builds the index and starts every listener
/// and background task.
#[inline(never)]
pub fn start(config: ServerConfig) -> LocalBoxFuture<'static, Result<ServerHandle, ServerError>> {
    Box::pin(start_from_config(config))
}

async fn start_from_config(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    sigil_svid::install_crypto_provider();
    sigil_svid::keys::ensure_private_dir(&config.data_dir)?;
    let store = open_configured_store(&config).await?;
    start_on(config, store).await
}

/// Opens the configured store: SQLite in the data directory, or PostgreSQL.
#[inline(never)]
pub fn open_store(
    config: &ServerConfig,
) -> LocalBoxFuture<'_, Result<Arc<dyn Store>, ServerError>> {
    Box::pin(open_configured_store(config))
}

async fn open_configured_store(config: &ServerConfig) -> Result<Arc<dyn Store>, ServerError> {
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
        config::StoreConfig::Postgres { .. } => Err(crate::error::InternalError::NoPostgres.into()),
    }
}

/// Like [`start`], with a store opened by the caller.
#[inline(never)]
pub fn start_with_store(
    config: ServerConfig,
    store: Arc<dyn Store>,
) -> LocalBoxFuture<'static, Result<ServerHandle, ServerError>> {
    Box::pin(start_on(config, store))
}

async fn start_on(
    config: ServerConfig,
    store: Arc<dyn Store>,
) -> Result<ServerHandle, ServerError> {
    sigil_svid::install_crypto_provider();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let state = build_state(config, store, &cancel, &tracker).await?;

    tracker.spawn(follower::follow_changes(state.clone(), cancel.clone()));
    tracker.spawn(background::rotate_loop(state.clone(), cancel.clone()));
    tracker.spawn(background::prune_loop(state.clone(), cancel.clone()));

    let agent_api_addr = serve_agent_api(&state, &cancel, &tracker).await?;
    let admin_socket = serve_admin_api(&state, &cancel, &tracker)?;
    // From here on a failure stops what already runs.
    let listeners = serve_http(&state, &cancel, &tracker)
        .await
        .inspect_err(|_| cancel.cancel())?;

    state.set_ready();
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
        oidc_addr: listeners.oidc,
        bundle_endpoint_addr: listeners.bundle_endpoint,
        cancel,
        tracker,
    })
}

/// Reads everything the server starts from (PSAT verifiers, authorities,
/// entries, agents, federation) and mints the server's own SVID.
async fn build_state(
    config: ServerConfig,
    store: Arc<dyn Store>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Arc<ServerState>, ServerError> {
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
    let server_id = crate::error::own_id(&config.trust_domain, sigil_types::SERVER_PATH)?;
    let (chain, key) =
        background::mint_server_svid(&ca, &server_id, config.default_x509_svid_ttl, now)?;
    let server_cert = Arc::new(RotatingCert::new(chain, &key)?);
    let federation = federation::Federation::new(
        config.trust_domain.clone(),
        store.clone(),
        ca.clone(),
        &config.federation,
        cancel.clone(),
        tracker.clone(),
    )
    .await?;
    Ok(Arc::new(ServerState {
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
        stopping: cancel.clone(),
        connected: std::sync::Mutex::new(Default::default()),
        ready: AtomicBool::new(false),
        readiness: Readiness::new(),
        psat,
        agent_writes: tokio::sync::Mutex::new(()),
        signing_slots: crate::signing::SigningSlots::per_core(),
    }))
}

/// Binds the agent API (mutual TLS) and serves it until cancelled.
async fn serve_agent_api(
    state: &Arc<ServerState>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, ServerError> {
    let listener = TcpListener::bind(state.config.bind_address).await?;
    let addr = listener.local_addr()?;
    let tls_config = Arc::new(tls::server_config(
        state.ca.clone(),
        state.server_cert.clone(),
    )?);
    let limits = state.config.limits.clone();
    let incoming = tls::incoming(listener, tls_config, cancel.clone(), &limits);
    let service = agent_api::service(state.clone(), cancel.clone());
    let stopping = cancel.clone();
    tracker.spawn(async move {
        // The request timeout ends a call that has not answered; a stream
        // (Sync) runs on after its first answer. Connections still open
        // SHUTDOWN_DRAIN after the server began to stop are ended.
        let hard_stop = CancellationToken::new();
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(crate::limits::KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(crate::limits::KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(limits.max_streams_per_connection)
            .timeout(limits.request_timeout)
            .add_service(service)
            .serve_with_incoming_shutdown(
                sigil_uds::stop::stoppable(incoming, hard_stop.clone()),
                stopping.clone().cancelled_owned(),
            );
        let result = sigil_uds::stop::serve_draining(
            serve,
            stopping,
            hard_stop,
            crate::SHUTDOWN_DRAIN,
            "agent API",
        )
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "agent API stopped");
        }
    });
    Ok(addr)
}

/// Binds the admin API's private Unix socket and serves it until cancelled.
fn serve_admin_api(
    state: &Arc<ServerState>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<PathBuf, ServerError> {
    let socket = state.config.admin_socket.clone();
    let listener = bind_private_socket(&socket)?;
    let service = admin_api::service(state.clone());
    let stopping = cancel.clone();
    tracker.spawn(async move {
        let hard_stop = CancellationToken::new();
        let serve = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                // Clients of every gRPC stack, whatever :authority they send.
                sigil_uds::incoming(sigil_uds::stop::stoppable(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    hard_stop.clone(),
                )),
                stopping.clone().cancelled_owned(),
            );
        let result = sigil_uds::stop::serve_draining(
            serve,
            stopping,
            hard_stop,
            crate::SHUTDOWN_DRAIN,
            "admin API",
        )
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    Ok(socket)
}

/// The bound addresses of the optional HTTP listeners.
struct HttpListeners {
    oidc: Option<SocketAddr>,
    bundle_endpoint: Option<SocketAddr>,
}

/// Starts OIDC discovery and the SPIFFE bundle endpoint when configured,
/// then the pollers of federated bundles.
async fn serve_http(
    state: &Arc<ServerState>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<HttpListeners, ServerError> {
    let oidc = match &state.config.oidc {
        Some(oidc_config) => {
            let (addr, serve) = oidc::bind(
                oidc_config,
                state.ca.clone(),
                state.config.ca_ttl,
                cancel.clone(),
            )
            .await?;
            tracker.spawn(serve);
            Some(addr)
        }
        None => None,
    };
    let bundle_endpoint = match &state.config.federation.bundle_endpoint {
        Some(endpoint) => Some(
            federation::endpoint::serve(
                endpoint,
                state.ca.clone(),
                state.server_cert.clone(),
                cancel.clone(),
                tracker,
            )
            .await?,
        ),
        None => None,
    };
    state.federation.start().await?;
    if let Some(addr) = bundle_endpoint {
        tracing::info!(address = %addr, "SPIFFE bundle endpoint listening");
    }
    Ok(HttpListeners {
        oidc,
        bundle_endpoint,
    })
}

/// Binds a Unix socket only its owner can use: the parent directory is
/// created 0700 if missing, a stale socket file is replaced, and the socket
/// is made 0600.
fn bind_private_socket(path: &Path) -> Result<UnixListener, ServerError> {
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
