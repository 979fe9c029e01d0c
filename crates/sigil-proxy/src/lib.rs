//! `sigil proxy`: identity without code changes. A sidecar (or node) proxy
//! that gives an application mutual TLS with SPIFFE identities and
//! least-privilege authorization, while the application speaks plain TCP or
//! HTTP on loopback.
//!
//! - **Inbound** listeners terminate mutual TLS, authenticate the caller's
//!   X509-SVID against the trust bundles, ask the [`policy`] whether the
//!   caller may call this proxy's SPIFFE ID, and forward plaintext to the
//!   local application (optionally with the caller's ID in an HTTP header).
//! - **Outbound** listeners take plaintext from the local application and
//!   open mutual TLS to an upstream, refusing it unless it presents the
//!   expected SPIFFE ID (or, without one configured, an ID the policy lets
//!   this proxy call).
//!
//! The proxy's SVID and bundles come from the SPIFFE Workload API and
//! follow rotation ([`source`]); the policy reloads on change ([`reload`]).
//! The proxy never mints or stores keys.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the TOML configuration (docs/proxy.md) |
//! | [`policy`] | the authorization policy: rules, decisions, explanations, graphs (docs/policy.md) |
//! | [`reload`] | the policy in force and its reloading |
//! | [`source`] | the X509-SVID and bundles from the Workload API |
//! | [`tls`] | the rustls configurations and the SPIFFE peer verifier |
//! | [`metrics`] | Prometheus metrics and their HTTP listener |

pub mod config;
mod http;
mod inbound;
pub mod metrics;
mod outbound;
pub mod policy;
pub mod reload;
pub mod source;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use sigil_types::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, Protocol, ProxyConfig};
pub use metrics::Metrics;
pub use policy::{Decision, Policy, PolicyError};
pub use reload::PolicyStore;
pub use source::{SourceError, SourceOptions, X509Source};

/// The buffer size of each direction of a forwarded connection: large
/// enough for full TLS records (16 KiB) several at a time.
pub(crate) const COPY_BUF: usize = 64 * 1024;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The policy file is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No SVID could be had from the Workload API.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    /// The bound address of each inbound listener, in configuration order.
    pub inbound: Vec<SocketAddr>,
    /// The bound address of each outbound listener, in configuration order.
    pub outbound: Vec<SocketAddr>,
    /// The bound metrics address, if configured.
    pub metrics_address: Option<SocketAddr>,
    /// The SVID source.
    pub source: Arc<X509Source>,
    /// The policy in force.
    pub policy: Arc<PolicyStore>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl ProxyHandle {
    /// Stops every listener and open connection.
    #[inline(never)]
    pub fn shutdown(mut self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            while self.tasks.join_next().await.is_some() {}
        })
    }

    /// Runs until `stop` completes, then shuts down.
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()>) {
        stop.await;
        self.shutdown().await;
    }
}

/// Starts a proxy: waits for an SVID from the Workload API named in
/// `config`, loads the policy, binds every listener.
#[inline(never)]
pub fn start(config: ProxyConfig) -> BoxFuture<'static, Result<ProxyHandle, ProxyError>> {
    Box::pin(start_from_config(config))
}

async fn start_from_config(config: ProxyConfig) -> Result<ProxyHandle, ProxyError> {
    sigil_svid::install_crypto_provider();
    let metrics = Arc::new(Metrics::default());
    let cancel = CancellationToken::new();
    // Load the policy first: a bad file should fail before waiting for an SVID.
    let policy = load_policy(&config, &metrics)?;
    let source = X509Source::connect(
        SourceOptions {
            socket: config.workload_api_socket.clone(),
            spiffe_id: config.spiffe_id.clone(),
        },
        metrics.clone(),
        cancel.child_token(),
    )
    .await?;
    start_inner(config, source, policy, metrics, cancel).await
}

/// Starts a proxy with an SVID source made elsewhere (embedding, benchmarks).
#[inline(never)]
pub fn start_with_source(
    config: ProxyConfig,
    source: Arc<X509Source>,
) -> BoxFuture<'static, Result<ProxyHandle, ProxyError>> {
    Box::pin(async move {
        sigil_svid::install_crypto_provider();
        let metrics = Arc::new(Metrics::default());
        let policy = load_policy(&config, &metrics)?;
        start_inner(config, source, policy, metrics, CancellationToken::new()).await
    })
}

fn load_policy(
    config: &ProxyConfig,
    metrics: &Arc<Metrics>,
) -> Result<Arc<PolicyStore>, ProxyError> {
    Ok(Arc::new(match &config.policy_file {
        Some(p) => PolicyStore::load(p, metrics.clone())?,
        None => PolicyStore::fixed(Policy::deny_all("(no policy file)"), metrics.clone()),
    }))
}

async fn start_inner(
    config: ProxyConfig,
    source: Arc<X509Source>,
    policy: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<ProxyHandle, ProxyError> {
    let mut tasks = JoinSet::new();
    let bind = |addr: SocketAddr, what: String| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind { addr, what, source })
    };

    let mut inbound = Vec::new();
    let mut outbound = Vec::new();
    let mut serving = Vec::new();
    for cfg in &config.inbound {
        let listener = bind(cfg.listen, format!("inbound {:?}", cfg.name)).await?;
        inbound.push(listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: cfg.listen,
            what: cfg.name.clone(),
            source,
        })?);
        let alpn: &[&[u8]] = match cfg.protocol {
            Protocol::Tcp => &[],
            Protocol::Http => &[b"h2", b"http/1.1"],
        };
        let server = tls::server_config(&source, alpn)?;
        let state = Arc::new(inbound::Inbound {
            cfg: cfg.clone(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            source: source.clone(),
            policy: policy.clone(),
            metrics: metrics.clone(),
            handshake_timeout: config.handshake_timeout,
        });
        serving.push(Listener::In(state, listener));
    }
    for cfg in &config.outbound {
        let listener = bind(cfg.listen, format!("outbound {:?}", cfg.name)).await?;
        outbound.push(listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: cfg.listen,
            what: cfg.name.clone(),
            source,
        })?);
        let client = tls::client_config(&source, cfg.upstream_spiffe_id.clone())?;
        let state = Arc::new(outbound::Outbound {
            cfg: cfg.clone(),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            server_name: outbound::server_name(&cfg.upstream),
            source: source.clone(),
            policy: cfg.upstream_spiffe_id.is_none().then(|| policy.clone()),
            metrics: metrics.clone(),
            handshake_timeout: config.handshake_timeout,
        });
        serving.push(Listener::Out(state, listener));
    }
    let metrics_address = match config.metrics_address {
        Some(addr) => Some(
            metrics::serve(
                addr,
                metrics.clone(),
                Arc::new(|| true),
                cancel.child_token(),
            )
            .await
            .map_err(|source| ProxyError::Bind {
                addr,
                what: "metrics_address".to_owned(),
                source,
            })?,
        ),
        None => None,
    };

    for (l, addr) in serving
        .into_iter()
        .zip(inbound.iter().chain(outbound.iter()))
    {
        let c = cancel.child_token();
        match l {
            Listener::In(state, listener) => {
                tracing::info!(listener = %state.cfg.name, %addr, forward_to = %state.cfg.forward_to,
                    protocol = ?state.cfg.protocol, "inbound listening");
                tasks.spawn(state.serve(listener, c));
            }
            Listener::Out(state, listener) => {
                tracing::info!(listener = %state.cfg.name, %addr, upstream = %state.cfg.upstream,
                    expect = ?state.cfg.upstream_spiffe_id.as_ref().map(|i| i.to_string()),
                    "outbound listening");
                tasks.spawn(state.serve(listener, c));
            }
        }
    }
    let watcher = policy.clone().watch(cancel.child_token());
    tasks.spawn(async move {
        let _ = watcher.await;
    });
    tracing::info!(spiffe_id = %source.identity().spiffe_id, "proxy running");
    Ok(ProxyHandle {
        inbound,
        outbound,
        metrics_address,
        source,
        policy,
        metrics,
        cancel,
        tasks,
    })
}

enum Listener {
    In(Arc<inbound::Inbound>, TcpListener),
    Out(Arc<outbound::Outbound>, TcpListener),
}
