//! Test helpers: a real sigil server and agent in this process, on a free
//! loopback port and Unix sockets in a temporary directory. Nothing here is
//! a mock: the server, agent, store, TLS and sockets are the product's own.
//! [`fake_k8s`] adds fake Kubernetes endpoints (API server, kubelet) fed with
//! recorded fixtures.

pub mod alloc;
pub mod fake_k8s;
pub mod hostile_config;
/// A private PostgreSQL server for tests (`sigil-pgtest`).
pub use sigil_pgtest as postgres;
pub mod web_pki;
pub mod wire;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use sigil_agent::{AgentConfig, AgentHandle};
use sigil_server::config::FederationConfig;
use sigil_server::{ServerConfig, ServerHandle};
use sigil_types::{Entry, Selectors, SpiffeId, TrustDomain};

/// Settings of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The trust domain.
    pub trust_domain: String,
    /// Default X509-SVID lifetime.
    pub x509_svid_ttl: Duration,
    /// CA lifetime.
    pub ca_ttl: Duration,
    /// How often the CA manager looks at rotation.
    pub rotation_tick: Duration,
    /// Agent SVID lifetime; by default the larger of the X509-SVID TTL and 1m.
    pub agent_svid_ttl: Option<Duration>,
    /// Pod attestation settings for the agent (a fake kubelet, a fake /proc).
    pub agent_k8s: Option<sigil_agent::config::K8sWorkloadConfig>,
    /// `spiffe_refresh_hint` the server publishes (what federated servers
    /// poll by).
    pub bundle_refresh_hint: Duration,
    /// The server's bundle endpoint and federation relationships.
    pub federation: FederationConfig,
    /// The server's `[server.limits]`.
    pub server_limits: sigil_server::limits::ServerLimits,
    /// The agent's `[agent.limits]`.
    pub agent_limits: sigil_agent::limits::AgentLimits,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            trust_domain: "example.org".into(),
            x509_svid_ttl: Duration::from_secs(3600),
            ca_ttl: Duration::from_secs(24 * 3600),
            rotation_tick: Duration::from_secs(10),
            agent_svid_ttl: None,
            agent_k8s: None,
            bundle_refresh_hint: Duration::from_secs(300),
            federation: FederationConfig::default(),
            server_limits: Default::default(),
            agent_limits: Default::default(),
        }
    }
}

/// A server and an agent, each of which can be stopped and restarted.
pub struct Cluster {
    /// Root of every file of the cluster (mode 0755, so other uids can reach the socket).
    pub dir: tempfile::TempDir,
    /// Server configuration (reused on restart).
    pub server_config: ServerConfig,
    /// Agent configuration (reused on restart).
    pub agent_config: AgentConfig,
    server: Option<ServerHandle>,
    agent: Option<AgentHandle>,
    agent_id: SpiffeId,
    _api_port: ReservedAddr,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// Whether this is a CI run (`CI` set, and not empty, `false` or `0`): there a
/// test that cannot run must fail, since CI is where it is meant to run.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// For a test that needs something a developer's machine may lack (root,
/// `ip`, a Python venv): `true` when `available`; otherwise it panics under
/// CI and elsewhere prints why it skips and returns `false`.
#[expect(clippy::panic, reason = "a test that cannot run in CI must fail there")]
pub fn runnable(test: &str, available: bool, missing: &str) -> bool {
    if available {
        return true;
    }
    if in_ci() {
        panic!("{test} cannot run under CI: {missing}");
    }
    println!("SKIP {test}: {missing} (CI runs it)");
    false
}

/// A loopback address with a port that was free a moment ago. Racy: the
/// port is released on return, and another test may take it before the
/// caller binds it. Prefer [`ReservedAddr`] for a port that must stay
/// usable, above all one a server is restarted on.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// A loopback port held for as long as this value lives, so that a server
/// can be SIGKILLed and restarted on it without another test taking it in
/// between.
///
/// The port is held by a socket bound with `SO_REUSEADDR` that never
/// listens. On Linux a listener that also sets `SO_REUSEADDR` (as tokio's
/// `TcpListener::bind`, which the server and the health listener use, does)
/// may bind the same address while it is held, whereas the kernel hands the
/// port to no other socket: not to `bind` on port 0 (with or without
/// `SO_REUSEADDR`), nor to a socket without `SO_REUSEADDR`, nor as the
/// local port of an outgoing connection.
#[derive(Debug)]
pub struct ReservedAddr {
    addr: SocketAddr,
    _held: tokio::net::TcpSocket,
}

impl ReservedAddr {
    /// Reserves a free loopback port.
    pub fn new() -> anyhow::Result<Self> {
        let held = tokio::net::TcpSocket::new_v4()?;
        held.set_reuseaddr(true)?;
        held.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = held.local_addr()?;
        Ok(Self { addr, _held: held })
    }

    /// The reserved address (127.0.0.1 and the port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Cluster {
    /// Starts a server, attests an agent to it with a join token, and waits
    /// until the agent is connected.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("sigil-test-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let td = TrustDomain::new(&opts.trust_domain)?;
        let mut server_config = ServerConfig::with_defaults(td.clone(), dir.path().join("server"));
        // Held for the cluster's life: stop_server/start_server come back on it.
        let api_port = ReservedAddr::new()?;
        server_config.bind_address = api_port.addr();
        server_config.admin_socket = dir.path().join("admin.sock");
        server_config.default_x509_svid_ttl = opts.x509_svid_ttl;
        server_config.agent_svid_ttl = opts
            .agent_svid_ttl
            .unwrap_or_else(|| opts.x509_svid_ttl.max(Duration::from_secs(60)));
        server_config.ca_ttl = opts.ca_ttl;
        server_config.rotation_tick = opts.rotation_tick;
        server_config.bundle_refresh_hint = opts.bundle_refresh_hint;
        server_config.federation = opts.federation.clone();
        server_config.limits = opts.server_limits.clone();
        let server = sigil_server::start(server_config.clone())
            .await
            .context("starting server")?;
        let token = server.generate_join_token(None).await?;
        let mut agent_config = AgentConfig::with_defaults(
            td,
            server.agent_api_addr().to_string(),
            dir.path().join("agent"),
        );
        agent_config.socket_path = dir.path().join("agent.sock");
        agent_config.join_token = Some(token.token);
        agent_config.min_backoff = Duration::from_millis(100);
        agent_config.max_backoff = Duration::from_secs(1);
        agent_config.k8s = opts.agent_k8s.clone();
        agent_config.limits = opts.agent_limits.clone();
        let agent = sigil_agent::start(agent_config.clone())
            .await
            .context("starting agent")?;
        let agent_id = agent.agent_id.clone();
        let cluster = Self {
            dir,
            server_config,
            agent_config,
            server: Some(server),
            agent: Some(agent),
            agent_id,
            _api_port: api_port,
        };
        cluster.wait_connected(true).await?;
        Ok(cluster)
    }

    /// The running server.
    pub fn server(&self) -> anyhow::Result<&ServerHandle> {
        self.server.as_ref().context("server is stopped")
    }

    /// The running agent.
    pub fn agent(&self) -> anyhow::Result<&AgentHandle> {
        self.agent.as_ref().context("agent is stopped")
    }

    /// The agent's SPIFFE ID.
    pub fn agent_id(&self) -> &SpiffeId {
        &self.agent_id
    }

    /// `unix:///…` address of the Workload API, for SPIFFE clients.
    pub fn socket_uri(&self) -> String {
        format!("unix://{}", self.agent_config.socket_path.display())
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.server_config.admin_socket.clone()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.server_config.trust_domain
    }

    /// The bound address of the server's SPIFFE bundle endpoint.
    pub fn bundle_endpoint_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server()?
            .bundle_endpoint_addr()
            .context("the server has no [server.federation.bundle_endpoint]")
    }

    /// Registers `spiffe://<td><path>` under the agent for these selectors.
    pub async fn register(&self, path: &str, selectors: &[&str]) -> anyhow::Result<Entry> {
        self.register_with(path, selectors, |_| {}).await
    }

    /// Like [`Cluster::register`], letting the caller adjust the entry first.
    pub async fn register_with(
        &self,
        path: &str,
        selectors: &[&str],
        adjust: impl FnOnce(&mut Entry),
    ) -> anyhow::Result<Entry> {
        let mut entry = Entry::new(
            sigil_server::registry::new_entry_id()?,
            self.server_config.trust_domain.id_with_path(path)?,
            self.agent_id.clone(),
            Selectors::parse_all(selectors)?,
        );
        adjust(&mut entry);
        Ok(self.server()?.create_entry(entry).await?)
    }

    /// Waits until the agent serves an SVID for `spiffe_id`.
    pub async fn wait_for_svid(&self, spiffe_id: &SpiffeId) -> anyhow::Result<()> {
        let mut rx = self.agent()?.snapshots.clone();
        let fut = rx.wait_for(|s| s.svids.values().any(|v| &v.spiffe_id == spiffe_id));
        tokio::time::timeout(Duration::from_secs(15), fut)
            .await
            .context("timed out waiting for the SVID")??;
        Ok(())
    }

    /// Waits until the agent's connection state is `connected`.
    pub async fn wait_connected(&self, connected: bool) -> anyhow::Result<()> {
        let mut rx = self.agent()?.snapshots.clone();
        let fut = rx.wait_for(|s| s.connected == connected);
        tokio::time::timeout(Duration::from_secs(15), fut)
            .await
            .with_context(|| format!("timed out waiting for connected={connected}"))??;
        Ok(())
    }

    /// Stops the server (its data stays).
    pub async fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// Starts the server again on the same address and data.
    pub async fn start_server(&mut self) -> anyhow::Result<()> {
        let s = sigil_server::start(self.server_config.clone()).await?;
        self.server = Some(s);
        Ok(())
    }

    /// Stops the agent (its data stays).
    pub async fn stop_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            a.shutdown().await;
        }
    }

    /// Starts the agent again from its saved state (no join token).
    pub async fn start_agent(&mut self) -> anyhow::Result<()> {
        let mut cfg = self.agent_config.clone();
        cfg.join_token = None;
        self.agent = Some(sigil_agent::start(cfg).await?);
        Ok(())
    }

    /// Stops everything.
    pub async fn shutdown(mut self) {
        self.stop_agent().await;
        self.stop_server().await;
    }
}
