//! The `sigil` binary as child processes, for tests where a real process
//! boundary matters (SIGKILL at any moment, a process in a network
//! namespace): a server and an agent written as an operator would configure
//! them, an admin client on the admin socket, and bounded waits. Every child
//! is killed when its handle drops, so a failing test leaves no process behind.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::admin_api_client::AdminApiClient;
use sigil_testkit::ReservedAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// How long a process may take to start serving.
pub(crate) const START: Duration = Duration::from_secs(20);

/// The `sigil` binary under test.
pub(crate) fn bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("sigil")
}

/// Polls `check` every 50 ms until it yields a value; panics naming `what`
/// once `within` has passed.
pub(crate) async fn wait_until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One plain HTTP GET; `None` when nothing answers.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, out))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// A child process, SIGKILLed and reaped when dropped. Its stdout and
/// stderr go to a log file (appended across restarts) that failures quote.
pub(crate) struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its output appended to `log`.
    pub(crate) fn spawn(mut cmd: Command, log: &Path) -> Self {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Self {
            child,
            log: log.to_owned(),
        }
    }

    /// SIGKILL (nothing runs after it: no flush, no cleanup) and reap.
    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if the process lingers past 10 s.
    pub(crate) fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if std::time::Instant::now() > deadline {
                self.kill9();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. SIGSTOP, SIGCONT) to the process. For SIGSTOP
    /// it returns only once every thread is stopped: `kill` merely queues
    /// the stop, and on a loaded machine a thread already running can go on
    /// serving for a while before it is parked.
    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        if signal == nix::sys::signal::Signal::SIGSTOP {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !all_threads_stopped(self.child.id()) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "process {pid} not stopped 10 s after SIGSTOP"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Panics (quoting the log) if the process has exited.
    pub(crate) fn assert_running(&mut self) {
        if let Some(s) = self.child.try_wait().unwrap() {
            panic!("process exited ({s}):\n{}", log_tail(&self.log));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last lines of a log file.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Writes `dir/{table}.toml`: a `[{table}]` table in trust domain
/// `example.org` with `keys` (TOML lines) added; returns its path.
fn config_file(dir: &Path, table: &str, keys: &str) -> PathBuf {
    let path = dir.join(format!("{table}.toml"));
    std::fs::write(
        &path,
        format!("[{table}]\ntrust_domain = \"example.org\"\n{keys}"),
    )
    .unwrap();
    path
}

/// `sigil server run` on a config file in `dir`, with SQLite in `dir/server`.
pub(crate) struct ServerBin {
    /// The agent API address (`bind_address`).
    pub(crate) api: SocketAddr,
    /// The admin socket.
    pub(crate) admin: PathBuf,
    /// The health listener.
    pub(crate) health: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    /// The loopback ports of `api` and `health`, held for as long as this
    /// value lives, so that no other test takes them while the server is
    /// down between a kill and a restart.
    _ports: Vec<ReservedAddr>,
}

impl ServerBin {
    /// Writes the config (listening on a reserved loopback port); `extra` is
    /// appended to the `[server]` table (e.g. `default_x509_svid_ttl = "8s"`).
    pub(crate) fn new(dir: &Path, extra: &str) -> Self {
        let api = ReservedAddr::new().unwrap();
        let mut server = Self::with_bind(dir, api.addr(), extra);
        server._ports.push(api);
        server
    }

    /// Like [`ServerBin::new`], listening on `api` (which the caller keeps
    /// free).
    pub(crate) fn with_bind(dir: &Path, api: SocketAddr, extra: &str) -> Self {
        let admin = dir.join("admin.sock");
        let health_port = ReservedAddr::new().unwrap();
        let health = health_port.addr();
        let data_dir = dir.join("server");
        let config = config_file(
            dir,
            "server",
            &format!(
                "bind_address = \"{api}\"\nadmin_socket = \"{}\"\ndata_dir = \"{}\"\n\
                 health_address = \"{health}\"\n{extra}\n",
                admin.display(),
                data_dir.display()
            ),
        );
        Self {
            api,
            admin,
            health,
            config,
            log: dir.join("server.log"),
            proc: None,
            _ports: vec![health_port],
        }
    }

    /// Starts the process without waiting for it.
    pub(crate) fn spawn(&mut self) {
        let mut cmd = Command::new(bin());
        cmd.args(["server", "run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info");
        self.proc = Some(Proc::spawn(cmd, &self.log));
    }

    /// Starts the process and waits until it is ready (`/readyz` 200 and the
    /// admin socket answering).
    pub(crate) async fn start(&mut self) {
        self.spawn();
        let deadline = Instant::now() + START;
        while !matches!(http_get(self.health, "/readyz").await, Some((200, _))) {
            if let Some(p) = self.proc.as_mut() {
                p.assert_running();
            }
            assert!(
                Instant::now() < deadline,
                "server not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let admin = self.admin.clone();
        wait_until(START, "the admin socket", || async {
            admin_client(&admin).await.ok().map(|_| ())
        })
        .await;
    }

    /// SIGKILL.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Sends `signal` to the running server (SIGSTOP freezes it: its
    /// sockets stay open and nothing answers).
    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) {
        self.proc.as_ref().expect("the server runs").signal(signal);
    }

    /// Panics (quoting the log) if the server process has exited.
    pub(crate) fn assert_running(&mut self) {
        self.proc
            .as_mut()
            .expect("the server was started")
            .assert_running();
    }

    /// SIGTERM; returns whether the exit was clean.
    pub(crate) fn stop(&mut self) -> bool {
        self.proc.take().is_some_and(|mut p| p.stop().success())
    }

    /// The process's log so far.
    pub(crate) fn log(&self) -> String {
        log_tail(&self.log)
    }

    /// An admin API client on the admin socket.
    pub(crate) async fn admin(&self) -> AdminApiClient<Channel> {
        admin_client(&self.admin)
            .await
            .unwrap_or_else(|e| panic!("admin socket: {e}\n{}", self.log()))
    }

    /// A join token for a new agent: (token, agent ID).
    pub(crate) async fn join_token(&self) -> (String, String) {
        let t = self
            .admin()
            .await
            .create_join_token(pb::CreateJoinTokenRequest { ttl: 600 })
            .await
            .unwrap()
            .into_inner();
        (t.token, t.agent_id)
    }

    /// Every agent the server knows; `None` when the admin call fails.
    pub(crate) async fn agents(&self) -> Option<Vec<pb::Agent>> {
        let r = self
            .admin()
            .await
            .list_agents(pb::ListAgentsRequest {})
            .await
            .ok()?;
        Some(r.into_inner().agents)
    }

    /// The agent `id` as the server lists it.
    pub(crate) async fn agent(&self, id: &str) -> Option<pb::Agent> {
        self.agents().await?.into_iter().find(|a| a.spiffe_id == id)
    }
}

/// Connects to an admin socket (fails at once if nothing listens).
pub(crate) async fn admin_client(path: &Path) -> Result<AdminApiClient<Channel>, String> {
    let p = path.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| format!("connecting to {}: {e}", path.display()))?;
    Ok(AdminApiClient::new(channel))
}

/// Creates one entry; `Ok(id)` only when the server acknowledged it.
pub(crate) async fn create_entry(
    admin: &mut AdminApiClient<Channel>,
    spiffe_id: &str,
    parent_id: &str,
    selectors: &[String],
    hint: &str,
) -> Result<String, String> {
    let r = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![pb::Entry {
                spiffe_id: spiffe_id.to_owned(),
                parent_id: parent_id.to_owned(),
                selectors: selectors.to_vec(),
                hint: hint.to_owned(),
                ..Default::default()
            }],
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let res = r.results.into_iter().next().ok_or("no result")?;
    if !res.error.is_empty() {
        return Err(res.error);
    }
    Ok(res.entry.ok_or("no entry in the result")?.id)
}

/// Creates an entry `spiffe_id` under `parent_id` for this test process (by
/// uid), with no hint; panics if the server does not acknowledge it.
pub(crate) async fn create_entry_for_me(
    admin: &mut AdminApiClient<Channel>,
    spiffe_id: &str,
    parent_id: &str,
) {
    let uid = nix::unistd::getuid();
    create_entry(
        admin,
        spiffe_id,
        parent_id,
        &[format!("unix:uid:{uid}")],
        "",
    )
    .await
    .unwrap();
}

/// The default X509-SVID the Workload API at `uri` serves now.
pub(crate) async fn fetch_svid(uri: &str) -> Option<spiffe::X509Svid> {
    let c = spiffe::WorkloadApiClient::connect_to(uri).await.ok()?;
    c.fetch_x509_svid().await.ok()
}

/// Waits until the Workload API at `uri` serves an SVID for `spiffe_id`;
/// panics naming `what` once [`START`] has passed.
pub(crate) async fn wait_for_svid_of(uri: &str, spiffe_id: &str, what: &str) {
    wait_until(START, what, || async {
        let c = spiffe::WorkloadApiClient::connect_to(uri).await.ok()?;
        let svids = c.fetch_all_x509_svids().await.ok()?;
        svids
            .iter()
            .any(|s| s.spiffe_id().to_string() == spiffe_id)
            .then_some(())
    })
    .await;
}

/// Every entry ID the server holds.
pub(crate) async fn list_entry_ids(admin: &mut AdminApiClient<Channel>) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = admin
            .list_entries(pb::ListEntriesRequest {
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(r.entries.into_iter().map(|e| e.id));
        if r.next_page_token.is_empty() {
            return ids;
        }
        page_token = r.next_page_token;
    }
}

/// `sigil agent run` on a config file in `dir`.
pub(crate) struct AgentBin {
    /// The Workload API socket.
    pub(crate) socket: PathBuf,
    /// `data_dir`.
    pub(crate) data_dir: PathBuf,
    /// The health listener.
    pub(crate) health: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    /// A command the agent runs under (e.g. `ip netns exec NAME`).
    wrapper: Vec<String>,
    proc: Option<Proc>,
    /// The health port, when reserved (see [`AgentBin::holding`]).
    _health_port: Option<ReservedAddr>,
}

impl AgentBin {
    /// Writes the config of an agent of `server` (an address), with its
    /// health listener on `health`.
    pub(crate) fn new(dir: &Path, server: &str, health: SocketAddr) -> Self {
        Self::with_address(dir, &format!("{server:?}"), health)
    }

    /// Like [`AgentBin::new`], for an agent that lists several servers.
    pub(crate) fn with_servers(dir: &Path, servers: &[SocketAddr], health: SocketAddr) -> Self {
        let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        Self::with_address(dir, &format!("[{}]", list.join(", ")), health)
    }

    /// `server_address` is TOML: a string or an array of strings.
    fn with_address(dir: &Path, server_address: &str, health: SocketAddr) -> Self {
        let socket = dir.join("agent.sock");
        let data_dir = dir.join("agent");
        let config = config_file(
            dir,
            "agent",
            &format!(
                "server_address = {server_address}\ndata_dir = \"{}\"\nsocket_path = \"{}\"\n\
                 health_address = \"{health}\"\n",
                data_dir.display(),
                socket.display()
            ),
        );
        Self {
            socket,
            data_dir,
            health,
            config,
            log: dir.join("agent.log"),
            wrapper: Vec::new(),
            proc: None,
            _health_port: None,
        }
    }

    /// Appends `toml` (e.g. an `[agent.limits]` table) to the config file.
    pub(crate) fn with_config(self, toml: &str) -> Self {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push_str(toml);
        std::fs::write(&self.config, text).unwrap();
        self
    }

    /// Keeps `health` (the reservation of the health address) for as long
    /// as this agent lives, so a restarted agent finds its port free.
    pub(crate) fn holding(mut self, health: ReservedAddr) -> Self {
        self._health_port = Some(health);
        self
    }

    /// Runs the agent under `wrapper` (the program and its arguments).
    pub(crate) fn wrapped(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// `unix://` URI of the Workload API.
    pub(crate) fn uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Starts the agent (with a join token on its first start) and waits
    /// until its Workload API socket exists.
    pub(crate) async fn start(&mut self, join_token: Option<&str>) {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.args(["agent", "run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info");
        if let Some(t) = join_token {
            cmd.arg("--join-token").arg(t);
        }
        self.proc = Some(Proc::spawn(cmd, &self.log));
        let deadline = Instant::now() + START;
        while !self.socket.exists() {
            if let Some(p) = self.proc.as_mut() {
                p.assert_running();
            }
            assert!(
                Instant::now() < deadline,
                "no agent socket:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// The process's log so far.
    pub(crate) fn log(&self) -> String {
        log_tail(&self.log)
    }

    /// Panics (quoting the log) unless the agent runs.
    pub(crate) fn assert_running(&mut self) {
        self.proc
            .as_mut()
            .expect("the agent was started")
            .assert_running();
    }

    /// The running agent's process ID.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }
}

/// A server binary (SQLite unless `server_extra` configures `[server.store]`)
/// and an agent binary attested to it, in `dir`.
pub(crate) async fn server_and_agent(
    dir: &Path,
    server_extra: &str,
) -> (ServerBin, AgentBin, String) {
    server_and_agent_with(dir, server_extra, "").await
}

/// Like [`server_and_agent`], with `agent_extra` (TOML tables such as
/// `[agent.limits]`) appended to the agent's config.
pub(crate) async fn server_and_agent_with(
    dir: &Path,
    server_extra: &str,
    agent_extra: &str,
) -> (ServerBin, AgentBin, String) {
    crate::init();
    let mut server = ServerBin::new(dir, server_extra);
    server.start().await;
    let (token, agent_id) = server.join_token().await;
    let health = ReservedAddr::new().unwrap();
    let mut agent = AgentBin::new(dir, &server.api.to_string(), health.addr())
        .with_config(agent_extra)
        .holding(health);
    agent.start(Some(&token)).await;
    (server, agent, agent_id)
}

/// A server's `sigil_server_sync_streams` gauge (agents syncing with it),
/// if its metrics answer.
pub(crate) async fn server_sync_streams(health: SocketAddr) -> Option<i64> {
    let (code, body) = http_get(health, "/metrics").await?;
    if code != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix("sigil_server_sync_streams "))
        .and_then(|v| v.trim().parse().ok())
}

/// The agent's `sigil_agent_connected` gauge (read from its health
/// listener), if its metrics answer.
pub(crate) async fn agent_connected(health: SocketAddr) -> Option<bool> {
    let (code, body) = http_get(health, "/metrics").await?;
    if code != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix("sigil_agent_connected "))
        .map(|v| v.trim() == "1")
}

/// Whether every thread of process `pid` is in the stopped state (`T` in
/// `/proc/<pid>/task/<tid>/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses
            // and may itself hold spaces or parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    })
}
