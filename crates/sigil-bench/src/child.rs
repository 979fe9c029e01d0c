//! Child processes: the server, the agents and the plain gRPC baseline each
//! run in a process of their own (this binary, re-executed with a hidden
//! subcommand), so that their resident memory and CPU time can be read from
//! `/proc/<pid>` without the load generator's own share.
//!
//! A child prints JSON lines on stdout (its first line says it is ready),
//! takes commands as lines on stdin, and exits when stdin closes, so it never
//! outlives the load generator.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use sigil_proto::workload as wpb;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_server::{ServerConfig, ServerHandle};
use sigil_types::{SpiffeId, TrustDomain};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// A running child process and its line channels.
pub(crate) struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    pid: u32,
    what: &'static str,
}

impl ChildProc {
    /// Starts this binary with `args`.
    pub(crate) fn spawn(what: &'static str, args: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the sigil-bench binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {what} process"))?;
        let pid = child.id().context("child has no pid")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut rd = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = rd.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
            pid,
            what,
        })
    }

    /// The next JSON line, waiting at most `timeout`.
    pub(crate) async fn next_json(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let line = tokio::time::timeout(timeout, self.lines.recv())
            .await
            .with_context(|| format!("the {} process did not answer in {timeout:?}", self.what))?
            .with_context(|| format!("the {} process exited", self.what))?;
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("bad line from the {} process: {line}", self.what))?;
        if let Some(e) = v.get("error") {
            bail!("the {} process failed: {e}", self.what);
        }
        Ok(v)
    }

    /// Hands the line receiver to the caller (for a status follower).
    pub(crate) fn take_lines(&mut self) -> mpsc::UnboundedReceiver<String> {
        let (_, empty) = mpsc::unbounded_channel();
        std::mem::replace(&mut self.lines, empty)
    }

    /// Sends a command line.
    pub(crate) async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Resident memory now, in bytes.
    pub(crate) fn rss(&self) -> anyhow::Result<u64> {
        rss_of(&format!("/proc/{}/status", self.pid), "VmRSS")
    }

    /// Peak resident memory so far, in bytes.
    pub(crate) fn peak_rss(&self) -> anyhow::Result<u64> {
        rss_of(&format!("/proc/{}/status", self.pid), "VmHWM")
    }

    /// User + system CPU time used so far, in seconds.
    pub(crate) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(&format!("/proc/{}/stat", self.pid))
    }

    /// Bytes written so far (`/proc/<pid>/io`).
    pub(crate) fn io(&self) -> anyhow::Result<Written> {
        written_of(&format!("/proc/{}/io", self.pid))
    }

    /// Closes stdin and waits for the child to exit (killing it after 20 s).
    pub(crate) async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A memory field (`VmRSS`, `VmHWM`) of a `/proc/<pid>/status` file, in bytes.
pub(crate) fn rss_of(path: &str, field: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let kb = s
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no {field} in {path}"))?;
    Ok(kb * 1024)
}

/// What a process wrote, from `/proc/<pid>/io`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Written {
    /// Bytes sent to the storage layer (`write_bytes`).
    pub(crate) write_bytes: u64,
    /// Bytes passed to write calls of any kind (`wchar`).
    pub(crate) wchar: u64,
}

/// The write counters of a `/proc/<pid>/io` file.
pub(crate) fn written_of(path: &str) -> anyhow::Result<Written> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok(Written {
        write_bytes: field("write_bytes")?,
        wchar: field("wchar")?,
    })
}

/// utime + stime of a `/proc/<pid>/stat` file, in seconds.
pub(crate) fn cpu_seconds_of(path: &str) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = s.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come state (field 3) ...; utime is field 14, stime 15.
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok((utime + stime) / hz)
}

/// Prints one JSON line on stdout (line-buffered, so the parent sees it at once).
fn emit(v: &Value) {
    println!("{v}");
}

// ------------------------------------------------------------------ server --

/// `__server`: a sigil server, optionally preloaded with agents' join tokens
/// and entries written straight into its store.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServerArgs {
    /// Data directory (store, keys, admin socket).
    #[arg(long)]
    data_dir: PathBuf,
    /// Join tokens to create before reporting ready.
    #[arg(long, default_value_t = 0)]
    preload_agents: usize,
    /// Entries to create before reporting ready, spread over those agents.
    #[arg(long, default_value_t = 0)]
    preload_entries: usize,
}

/// Creates `n` entries parented round-robin to `parents`, one transaction
/// each, as the admin API does, but with one wait for the index after the
/// last instead of one after each.
async fn preload(
    server: &ServerHandle,
    parents: &[SpiffeId],
    n: usize,
    tag: &str,
) -> anyhow::Result<()> {
    if n == 0 || parents.is_empty() {
        return Ok(());
    }
    let td = server.trust_domain();
    // Made one at a time as they are written, not all held at once: the
    // server's memory is measured after.
    let mut failed = None;
    let entries = (0..n).map_while(|i| {
        crate::sample::sample_entry(td, &parents[i % parents.len()], tag, i)
            .map_err(|e| failed = Some(e))
            .ok()
    });
    tokio::time::timeout(Duration::from_secs(1800), server.preload_entries(entries))
        .await
        .context("the preloaded entries were not all written and indexed in 30 minutes")??;
    failed.map_or(Ok(()), Err)
}

/// Rows of the plain SQLite floor the preload is compared with: enough that
/// the per-row CPU is steady, few enough to add a second or two.
const FLOOR_ROWS: usize = 2000;

/// Inserts up to [`FLOOR_ROWS`] of the rows `preload` would write into a
/// plain SQLite database beside the store, one transaction each as the
/// preload's creates are, in this process (so with the same runtime around
/// it); returns the rows and the CPU seconds they took.
async fn floor(
    server: &ServerHandle,
    data_dir: &Path,
    parents: &[SpiffeId],
    n: usize,
) -> anyhow::Result<(usize, f64)> {
    let n = n.min(FLOOR_ROWS);
    if n == 0 || parents.is_empty() {
        return Ok((0, 0.0));
    }
    let td = server.trust_domain();
    let rows = (0..n)
        .map(|i| crate::sample::sample_entry(td, &parents[i % parents.len()], "floor", i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cpu0 = self_cpu();
    crate::floor::plain_inserts(&data_dir.join("floor.db"), &rows, 1).await?;
    Ok((n, self_cpu() - cpu0))
}

/// User + system CPU time of this process, in seconds, at microsecond
/// resolution (`/proc/<pid>/stat` counts whole clock ticks, too coarse for a
/// few hundred entry writes).
pub(crate) fn self_cpu() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            secs(u.user_time()) + secs(u.system_time())
        })
        .unwrap_or(0.0)
}

pub(crate) async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let td = TrustDomain::new("example.org")?;
    let mut cfg = ServerConfig::with_defaults(td, args.data_dir.clone());
    cfg.bind_address = "127.0.0.1:0".parse()?;
    cfg.admin_socket = args.data_dir.join("admin.sock");
    cfg.join_token_ttl = Duration::from_secs(4 * 3600);
    // Every simulated agent connects from 127.0.0.1, as a fleet behind one
    // address would: the caps are raised to fit them, as
    // docs/configuration.md says to for such a fleet.
    let fleet = args.preload_agents + 1000;
    cfg.limits.max_connections = cfg.limits.max_connections.max(fleet);
    cfg.limits.max_connections_per_source = cfg.limits.max_connections_per_source.max(fleet);
    let server = sigil_server::start(cfg).await?;

    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..args.preload_agents {
        let t = server.generate_join_token(None).await?;
        ids.push(t.agent_id.clone());
        agents.push(json!({"token": t.token, "agent_id": t.agent_id.to_string()}));
    }
    let floor = floor(&server, &args.data_dir, &ids, args.preload_entries).await?;
    let (cpu0, t0) = (self_cpu(), std::time::Instant::now());
    preload(&server, &ids, args.preload_entries, "p").await?;
    emit(&json!({
        "floor_rows": floor.0,
        "floor_cpu_s": floor.1,
        "agent_api": server.agent_api_addr().to_string(),
        "admin_socket": server.admin_socket().display().to_string(),
        "agents": agents,
        "preload_cpu_s": self_cpu() - cpu0,
        "preload_wall_s": t0.elapsed().as_secs_f64(),
        "entries": server.entry_count(),
    }));

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut big = 0usize;
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let result: anyhow::Result<Value> = async {
            match words.as_slice() {
                // A new agent token with `n` entries of its own.
                ["big", n] => {
                    let n: usize = n.parse()?;
                    big += 1;
                    let t = server.generate_join_token(None).await?;
                    let (cpu0, t0) = (self_cpu(), std::time::Instant::now());
                    preload(
                        &server,
                        std::slice::from_ref(&t.agent_id),
                        n,
                        &format!("big{big}"),
                    )
                    .await?;
                    Ok(json!({
                        "token": t.token,
                        "agent_id": t.agent_id.to_string(),
                        "cpu_s": self_cpu() - cpu0,
                        "wall_s": t0.elapsed().as_secs_f64(),
                        "entries": server.entry_count(),
                    }))
                }
                _ => bail!("unknown command {line:?}"),
            }
        }
        .await;
        match result {
            Ok(v) => emit(&v),
            Err(e) => emit(&json!({"error": format!("{e:#}")})),
        }
    }
    server.shutdown().await;
    Ok(())
}

// ------------------------------------------------------------------- agent --

/// Shortest time between two status lines of `__agent`.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// `__agent`: a sigil agent; prints its state after every change (at most
/// every [`STATUS_EVERY`]).
#[derive(Args, Debug, Clone)]
pub(crate) struct AgentArgs {
    /// The server's agent API address.
    #[arg(long)]
    server: String,
    /// Join token.
    #[arg(long)]
    token: String,
    /// Data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Workload API socket.
    #[arg(long)]
    socket: PathBuf,
}

pub(crate) async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let td = TrustDomain::new("example.org")?;
    let mut cfg = sigil_agent::AgentConfig::with_defaults(td, args.server, args.data_dir);
    cfg.socket_path = args.socket;
    cfg.join_token = Some(args.token);
    cfg.min_backoff = Duration::from_millis(100);
    cfg.max_backoff = Duration::from_secs(1);
    // Every Workload API round opens over a thousand streams from this
    // process's uid, several rounds in a row: past the default 100 streams
    // a second (burst 2000) the second round would be refused. The limiter
    // is still consulted on every call, at the same cost at any rate.
    cfg.limits.streams = sigil_types::ratelimit::Rate::new(100_000, 100_000);
    let agent = sigil_agent::start(cfg).await?;
    let mut rx = agent.snapshots.clone();
    let status = |s: &sigil_agent::core::Snapshot| {
        let bytes: usize = s.svids.values().map(|v| v.der.len()).sum();
        json!({
            "agent_id": agent.agent_id.to_string(),
            "connected": s.connected,
            "entries": s.entries.len(),
            "svids": s.svids.len(),
            "svid_bytes": bytes,
        })
    };
    emit(&status(&rx.borrow_and_update()));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let v = status(&rx.borrow_and_update());
                emit(&v);
                // At most ten lines a second: the status reads every SVID,
                // and at one line per snapshot this instrumentation would
                // cost the agent's process as much as the agent's own work.
                // A change during the pause is reported right after it.
                tokio::time::sleep(STATUS_EVERY).await;
            }
            line = lines.next_line() => {
                if !matches!(line, Ok(Some(_))) {
                    break;
                }
            }
        }
    }
    agent.shutdown().await;
    Ok(())
}

// ------------------------------------------------------------------- plain --

/// `__plain`: the baseline for the Workload API: the same proto over the
/// same transport (tonic, HTTP/2 on a Unix socket), answering every
/// FetchX509SVID with a fixed response of the same shape and size as the
/// agent's, without attestation or matching.
#[derive(Args, Debug, Clone)]
pub(crate) struct PlainArgs {
    /// The socket to serve on.
    #[arg(long)]
    socket: PathBuf,
}

struct Plain {
    response: wpb::X509svidResponse,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Plain {
    type FetchX509SVIDStream = BoxStream<wpb::X509svidResponse>;
    async fn fetch_x509svid(
        &self,
        _req: Request<wpb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let first = tokio_stream::once(Ok(self.response.clone()));
        // Like the agent, keep the stream open after the first answer.
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::chain(
            first,
            tokio_stream::pending(),
        ))))
    }
    type FetchX509BundlesStream = BoxStream<wpb::X509BundlesResponse>;
    async fn fetch_x509_bundles(
        &self,
        _req: Request<wpb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }
    async fn fetch_jwtsvid(
        &self,
        _req: Request<wpb::JwtsvidRequest>,
    ) -> Result<Response<wpb::JwtsvidResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }
    type FetchJWTBundlesStream = BoxStream<wpb::JwtBundlesResponse>;
    async fn fetch_jwt_bundles(
        &self,
        _req: Request<wpb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }
    async fn validate_jwtsvid(
        &self,
        _req: Request<wpb::ValidateJwtsvidRequest>,
    ) -> Result<Response<wpb::ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

/// A response like the agent's: one SVID (leaf + key) and the bundle.
fn plain_response() -> anyhow::Result<wpb::X509svidResponse> {
    let td = TrustDomain::new("example.org")?;
    let now = SystemTime::now();
    let ca = sigil_svid::x509::X509Authority::generate(&td, Duration::from_secs(3600), now)?;
    let key = sigil_svid::keys::PrivateKey::generate_p256()?;
    let id = td.id_with_path("/bench/workload")?;
    let leaf = ca.sign_svid(
        &sigil_svid::x509::SvidRequest {
            spiffe_id: &id,
            dns_names: &[],
            ttl: Duration::from_secs(3600),
            attributes: &[],
        },
        &key.public_key_spki_der(),
        now,
    )?;
    Ok(wpb::X509svidResponse {
        svids: vec![wpb::X509svid {
            spiffe_id: id.to_string(),
            x509_svid: leaf,
            x509_svid_key: key.pkcs8_der().to_vec(),
            bundle: ca.cert_der().to_vec(),
            hint: String::new(),
        }],
        crl: vec![],
        federated_bundles: Default::default(),
    })
}

pub(crate) async fn run_plain(args: PlainArgs) -> anyhow::Result<()> {
    sigil_svid::install_crypto_provider();
    let listener = bind_socket(&args.socket)?;
    let svc = SpiffeWorkloadApiServer::new(Plain {
        response: plain_response()?,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    emit(&json!({"ready": true}));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {}
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

fn bind_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    Ok(tokio::net::UnixListener::bind(path)?)
}

/// Runs a child role; a failure is reported to the parent as a JSON line.
pub(crate) async fn run_role(
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let r = f.await;
    if let Err(e) = &r {
        emit(&json!({"error": format!("{e:#}")}));
    }
    r
}
