//! The sigil agent: one per node.
//!
//! It attests itself to the server (join token, bootstrapping trust from a
//! bundle file or the CA fingerprint in the token), keeps its SVID and the
//! workload SVIDs on disk so that restarts need neither a token nor the
//! server, follows the server's push sync, generates workload keys locally
//! and gets them signed in batches, renews everything at half-life with
//! jitter, and serves the SPIFFE Workload API on a Unix socket, including
//! the federated bundles of the trust domains a workload's entries federate
//! with, and Envoy's Secret Discovery Service (SDS v3) on the same socket.
//!
//! | module | role |
//! |---|---|
//! | [`config`] | the TOML config and its validation |
//! | [`client`] | TLS connections to the server, trust bootstrap |
//! | [`core`] | the task that owns entries and SVIDs |
//! | [`server_api`] | the server's agent API as the core asks it (a trait), over gRPC |
//! | [`paging`] | paged sync updates, reassembled and bounded |
//! | [`persist`] | the on-disk state |
//! | [`peer`] | kernel peer credentials and PID-reuse checks |
//! | [`attest`] | the unix workload attestor |
//! | [`caller`] | who calls the socket: selectors from kernel peer credentials |
//! | `k8s` | pod selectors from the kubelet; PSAT tokens (feature `k8s`) |
//! | [`workload`] | the SPIFFE Workload API |
//! | [`jwt`] | JWT-SVIDs: fetched through the core's server client, cached |
//! | [`sds`] | Envoy's Secret Discovery Service (SDS v3) |
//! | [`limits`] | request size, per-uid rate limits, connection and stream caps, timeouts |
//! | [`idle`] | closing connections that hold no stream for the idle timeout |
//! | [`retry`] | waiting and retrying when the server's rate limit refuses a call |
//! | [`pending`] | the socket's answer while the agent waits for a server to attest to |

pub mod attest;
pub mod caller;
pub mod client;
pub mod config;
pub mod core;
pub mod demand;
pub mod idle;
pub mod jwt;
pub mod jwt_validation;
#[cfg(feature = "k8s")]
pub mod k8s;
pub mod limits;
pub mod metrics;
pub mod paging;
pub mod peer;
pub mod pending;
pub mod persist;
pub mod retry;
mod schedule;
pub mod sds;
mod selector_index;
pub mod server_api;
mod time;
mod trim;
pub mod workload;

/// The unit-test binary counts heap bytes per thread (`core::memory`).
#[cfg(test)]
#[global_allocator]
static COUNTING: sigil_testkit::alloc::Counting = sigil_testkit::alloc::Counting;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use sigil_proto::server::v1 as pb;
use sigil_svid::bundle::Bundle;
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::RotatingCert;
use sigil_types::BoxFuture;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::AgentConfig;

use crate::attest::{UnixAttestor, UnixAttestorConfig};
use crate::core::{Core, Snapshot};
use crate::persist::{AgentIdentity, Persist};

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Configuration is missing or wrong; the message says what to do.
    #[error("{0}")]
    Config(String),
    /// Trust could not be established with the server.
    #[error("bootstrap failed: {0}")]
    Bootstrap(String),
    /// The server refused the agent (bad or used token, banned, evicted).
    #[error("the server refused this agent: {0}")]
    Refused(String),
    /// The server could not be reached or failed.
    #[error("{0}")]
    Unavailable(String),
    /// A credential could not be made or parsed.
    #[error(transparent)]
    Svid(#[from] sigil_svid::SvidError),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Stored state does not parse.
    #[error("corrupt agent state: {0}")]
    Corrupt(String),
}

impl From<serde_json::Error> for AgentError {
    fn from(e: serde_json::Error) -> Self {
        AgentError::Corrupt(e.to_string())
    }
}

impl AgentError {
    /// Classifies a gRPC status from the server.
    pub fn from_status(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument => AgentError::Refused(s.message().to_owned()),
            _ => AgentError::Unavailable(format!("server error: {}", status_chain(&s))),
        }
    }
}

/// An error followed by its chain of causes, each said once. tonic reports
/// a TLS alert from the server, a reset connection, an HTTP/2 GOAWAY and a
/// failed reconnection all as "transport error"; which one it was is only
/// in the chain.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    chain_from(e.to_string(), e.source())
}

/// A status's message followed by the chain of causes behind it (a status
/// that tonic made from a transport failure keeps that failure as its
/// source), each said once: what the agent logs of a failed call.
pub fn status_chain(s: &tonic::Status) -> String {
    chain_from(s.message().to_owned(), std::error::Error::source(s))
}

fn chain_from(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// A running agent.
pub struct AgentHandle {
    /// The agent's SPIFFE ID.
    pub agent_id: sigil_types::SpiffeId,
    /// The Workload API socket.
    pub socket_path: PathBuf,
    /// Snapshots of what the agent serves.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("agent_id", &self.agent_id)
            .field("socket_path", &self.socket_path)
            .finish_non_exhaustive()
    }
}

impl AgentHandle {
    /// Stops the agent and waits for its tasks; the socket file is removed.
    #[inline(never)]
    pub fn shutdown(self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            self.tracker.close();
            self.tracker.wait().await;
            let _ = std::fs::remove_file(&self.socket_path);
        })
    }

    /// Whether the agent serves at least one SVID and its bundle.
    pub fn ready(&self) -> bool {
        !self.snapshots.borrow().bundle.x509_authorities.is_empty()
    }
}

/// Reads a bootstrap bundle: SPIFFE bundle JSON or PEM CA certificates
/// (the one strict parser, [`Bundle::parse`]).
pub fn load_trust_bundle(path: &Path, td: &sigil_types::TrustDomain) -> Result<Bundle, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AgentError::Config(format!("cannot read trust bundle {}: {e}", path.display()))
    })?;
    Bundle::parse(td.clone(), &text)
        .map_err(|e| AgentError::Config(format!("trust bundle {}: {e}", path.display())))
}

async fn attest(
    cfg: &AgentConfig,
    persist: &Persist,
) -> Result<(AgentIdentity, Bundle), AgentError> {
    #[cfg(feature = "k8s")]
    if let Some(psat) = &cfg.k8s_psat {
        let Some(path) = &cfg.trust_bundle_path else {
            return Err(AgentError::Config(
                "PSAT attestation needs agent.trust_bundle_path (the server's bundle, e.g. from a ConfigMap)".into(),
            ));
        };
        let trust = Arc::new(ArcSwap::from_pointee(load_trust_bundle(
            path,
            &cfg.trust_domain,
        )?));
        let server_id = cfg
            .trust_domain
            .id_with_path(sigil_types::SERVER_PATH)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let mut client = client::connect(&cfg.server_address, trust, server_id, None).await?;
        let (identity, resp) =
            k8s::attest_psat_with_new_key(&mut client, psat, k8s::WhenLimited::Retry).await?;
        let bundle = Bundle::from_json(cfg.trust_domain.clone(), &resp.bundle_json)?;
        // The bundle first: a saved identity is used only with a saved
        // bundle, so a kill between the two must not leave the identity alone.
        persist.save_bundle(&bundle)?;
        persist.save_identity(&identity)?;
        tracing::info!(agent = %identity.id, "attested to the server with a projected service-account token");
        return Ok((identity, bundle));
    }
    let Some(token) = cfg.join_token.as_deref() else {
        return Err(AgentError::Config(format!(
            "the agent has no valid SVID in {}; start it once with a join token (`sigil token generate` on the server)",
            cfg.data_dir.display()
        )));
    };
    let bundle = match (&cfg.trust_bundle_path, token.split('.').nth(2)) {
        (Some(path), _) => load_trust_bundle(path, &cfg.trust_domain)?,
        (None, Some(fp)) if !fp.is_empty() => {
            client::bootstrap_bundle_by_fingerprint(&cfg.server_address, &cfg.trust_domain, fp)
                .await?
        }
        _ => {
            return Err(AgentError::Config(
                "no way to trust the server: set trust_bundle_path or use a join token that carries the CA fingerprint".into(),
            ));
        }
    };
    let trust = Arc::new(ArcSwap::from_pointee(bundle));
    let server_id = cfg
        .trust_domain
        .id_with_path(sigil_types::SERVER_PATH)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let client = client::connect(&cfg.server_address, trust.clone(), server_id, None).await?;
    let key = PrivateKey::generate_p256()?;
    let csr = sigil_svid::x509::make_csr(&key)?;
    // A fleet restarting behind one address meets the server's rate limit:
    // wait and try again rather than fail the start.
    let resp = retry::while_exhausted("AttestJoinToken", || {
        let mut client = client.clone();
        let req = pb::AttestJoinTokenRequest {
            token: token.to_owned(),
            csr: csr.clone(),
        };
        async move { client.attest_join_token(req).await }
    })
    .await
    .map_err(AgentError::from_status)?
    .into_inner();
    let identity = AgentIdentity::new(resp.cert_chain, key)?;
    let bundle = Bundle::from_json(cfg.trust_domain.clone(), &resp.bundle_json)?;
    // The bundle first, as above.
    persist.save_bundle(&bundle)?;
    persist.save_identity(&identity)?;
    tracing::info!(agent = %identity.id, "attested to the server with a join token");
    Ok((identity, bundle))
}

/// Binds the Workload API socket: every local user may connect (identity
/// comes from attestation, not from file permissions).
fn bind_public_socket(path: &Path) -> Result<UnixListener, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        AgentError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot bind Workload API socket {}: {e}", path.display()),
        ))
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// How long connections of the agent's socket get to finish once the agent
/// stops (calls in flight complete; streams end at once): after it, those
/// still open are closed.
pub const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// The first wait between attestation attempts of [`start_when_attested`].
pub const ATTEST_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest wait between attestation attempts: a server that comes back
/// is attested to within this (plus one attempt).
pub const ATTEST_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Like [`start`], except that an agent that has to attest and cannot reach
/// a server does not fail: it serves its socket at once, answering every
/// call with `Unavailable` ([`pending::NOT_ATTESTED`]), and tries again
/// (random waits under a ceiling doubling from [`ATTEST_RETRY_FIRST`] to
/// [`ATTEST_RETRY_MAX`]) until it attests, then serves as [`start`] does.
/// Any other failure (a refused or used token, a fingerprint that does not
/// match, bad configuration) is returned as [`start`] returns it. This is
/// how `sigil agent run` starts: an agent and its server booting in any
/// order must not need a supervisor's restarts. [`start`] suits callers
/// that want the first error.
#[inline(never)]
pub fn start_when_attested(
    cfg: AgentConfig,
) -> BoxFuture<'static, Result<AgentHandle, AgentError>> {
    Box::pin(start_retrying(cfg))
}

async fn start_retrying(cfg: AgentConfig) -> Result<AgentHandle, AgentError> {
    let mut why = match start_once(cfg.clone()).await {
        Err(AgentError::Unavailable(why)) => why,
        other => return other,
    };
    let pending = pending::Pending::serve(&cfg.socket_path, &cfg.limits)?;
    let mut ceiling = ATTEST_RETRY_FIRST;
    loop {
        let wait = retry::full_jitter(ceiling);
        tracing::warn!(
            error = %why,
            retry_in_ms = wait.as_millis() as u64,
            socket = %cfg.socket_path.display(),
            "cannot attest: no server reachable; the Workload API answers Unavailable until the agent attests"
        );
        tokio::time::sleep(wait).await;
        match start_once(cfg.clone()).await {
            Err(AgentError::Unavailable(w)) => why = w,
            Ok(handle) => {
                pending.hand_over();
                return Ok(handle);
            }
            Err(e) => return Err(e),
        }
        ceiling = (ceiling * 2).min(ATTEST_RETRY_MAX);
    }
}

/// Starts the agent: restores or obtains its identity, then serves.
#[inline(never)]
pub fn start(cfg: AgentConfig) -> BoxFuture<'static, Result<AgentHandle, AgentError>> {
    Box::pin(start_once(cfg))
}

async fn start_once(mut cfg: AgentConfig) -> Result<AgentHandle, AgentError> {
    sigil_svid::install_crypto_provider();
    trim::limit_arenas();
    // Each caller's connection holds two open files: the caps must fit the
    // limit, or a flood of one uid makes accept() fail for everyone.
    match limits::raise_open_files_limit() {
        Ok(open_files) => {
            if let Some(lowered) = cfg.limits.fit_to_open_files(open_files) {
                tracing::warn!("{lowered}");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-files limit; connection caps as configured");
        }
    }
    // First, before a join token is spent: on a kernel without SO_PEERPIDFD
    // a recycled PID cannot be caught, and serving needs the operator's
    // explicit consent to that.
    peer::decide_pid_attestation(
        peer::probe_peer_pidfd()?,
        cfg.allow_insecure_pid_attestation,
    )
    .map_err(|e| AgentError::Config(e.to_string()))?;
    let persist = Persist::open(&cfg.data_dir)?;
    let now = SystemTime::now();
    let saved = persist
        .load_identity()?
        .filter(|i| i.not_after > now)
        .zip(persist.load_bundle(&cfg.trust_domain)?);
    let (identity, bundle) = match saved {
        Some(s) => {
            tracing::info!(agent = %s.0.id, "restored the agent SVID from disk");
            s
        }
        None => attest(&cfg, &persist).await?,
    };
    let cert = Arc::new(RotatingCert::new(identity.chain.clone(), &identity.key)?);
    let cached = persist.load_cache(now)?;
    let federated: Arc<core::FederatedBundles> = Arc::new(
        persist
            .load_federated(&cfg.trust_domain)?
            .into_iter()
            .map(|b| (b.trust_domain.clone(), Arc::new(b)))
            .collect(),
    );
    let metrics = Arc::new(metrics::Metrics::default());
    let trust = Arc::new(ArcSwap::from_pointee(bundle));
    let server = server_api::GrpcServer::new(&cfg, trust.clone(), cert.clone())?;
    let (mut core, snapshots) = Core::new(core::CoreParts {
        cfg: cfg.clone(),
        persist,
        identity,
        trust,
        federated,
        cert,
        server,
        metrics: metrics.clone(),
    });
    core.restore(cached);
    let demand = core.demand.clone();
    let jwt = Arc::new(core.jwt_svids().with_budget(
        cfg.limits.jwt_cache_bytes,
        cfg.limits.jwt_cache_bytes_per_uid,
    ));
    // Serve what is cached before the server is even contacted.
    core.publish();
    let agent_id = core.identity.id.clone();

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(core.run(cancel.clone()));

    let listener = bind_public_socket(&cfg.socket_path)?;
    let attestor = Arc::new(UnixAttestor::new(UnixAttestorConfig {
        discover_workload_path: cfg.discover_workload_path,
        workload_size_limit: 512 * 1024 * 1024,
    }));
    #[allow(unused_mut, reason = "extended only with the k8s feature")]
    let mut callers = workload::CallerAttestor::new(attestor)
        .with_limiter(Arc::new(crate::limits::CallerLimiter::new(&cfg.limits)));
    #[cfg(feature = "k8s")]
    if let Some(k) = &cfg.k8s {
        callers = callers.with_pod_attestor(k8s::PodAttestor::new(k)?);
    }
    let callers = Arc::new(callers);
    let limits = cfg.limits.clone();
    let svc = workload::service_with_limit(
        workload::WorkloadService::new(
            snapshots.clone(),
            callers.clone(),
            jwt,
            metrics.clone(),
            cancel.clone(),
        )
        .with_demand(demand.clone()),
        limits.max_request_bytes,
    );
    let sds_svc = sds::service(
        sds::SdsService::new(
            snapshots.clone(),
            callers,
            cfg.sds.clone(),
            metrics.clone(),
            cancel.clone(),
        )
        .with_demand(demand),
    );
    let c = cancel.clone();
    tracker.spawn(async move {
        // The request timeout ends a call that has not answered; a stream
        // runs on after its first answer.
        // The :authority shim wraps each connection after its peer
        // credentials were taken and its slots counted, so that clients of
        // every gRPC stack (C-core, Java) reach the services. The idle
        // watch sits below the shim, on the bytes as the client sent them.
        // On stop, connections get SHUTDOWN_DRAIN to finish; then `hard_stop`
        // ends those still open, so that a client that never sent a byte, or
        // stopped reading, cannot hold the agent's shutdown.
        let hard_stop = CancellationToken::new();
        let incoming = sigil_uds::incoming(sigil_uds::stop::stoppable(
            idle::incoming(
                crate::limits::incoming(
                    peer::incoming(listener),
                    limits.max_connections,
                    limits.max_connections_per_uid,
                ),
                limits.idle_timeout,
            ),
            hard_stop.clone(),
        ));
        let serve = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_streams_per_connection)
            .timeout(limits.request_timeout)
            .add_service(svc)
            .add_service(sds_svc)
            .serve_with_incoming_shutdown(incoming, c.clone().cancelled_owned());
        let result =
            sigil_uds::stop::serve_draining(serve, c, hard_stop, SHUTDOWN_DRAIN, "Workload API")
                .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "Workload API stopped");
        }
    });
    tracing::info!(agent = %agent_id, socket = %cfg.socket_path.display(), "agent started");
    Ok(AgentHandle {
        agent_id,
        socket_path: cfg.socket_path.clone(),
        snapshots,
        metrics,
        cancel,
        tracker,
    })
}
