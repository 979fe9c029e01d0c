//! The two load phases.
//!
//! *Latency* runs a server whose store is on disk (as in production), one
//! real agent process, and workloads in this process: signing throughput
//! through the agent API, entry create → workload holds the SVID, and the
//! Workload API's first response under 1,000 concurrent clients, each beside
//! the same client pattern against a plain tonic server.
//!
//! *Scale* runs a server preloaded with N entries spread over A agents (its
//! store on tmpfs, so that preloading does not take N fsyncs), connects A
//! simulated agents that each hold a sync stream, measures first syncs from
//! 100 to 100,000 entries, server memory, the server's CPU per entry write
//! with A streams open, and an agent's memory per cached SVID.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use arc_swap::ArcSwap;
use serde_json::Value;
use sigil_agent::config::ServerAddresses;
use sigil_client::{AdminClient, UnixConnector, WorkloadClient};
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::agent_api_client::AgentApiClient;
use sigil_proto::workload as wpb;
use sigil_svid::bundle::Bundle;
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::RotatingCert;
use sigil_types::{Entry, Selectors, SpiffeId, TrustDomain};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::Sizes;
use crate::child::ChildProc;
use crate::inproc::sync_floor;
use crate::report::{Budget, Report};
use crate::sample::sample_entry;

const MIB: f64 = 1024.0 * 1024.0;

/// Seconds between an agent serving all its SVIDs and the RSS read of
/// `agent.rss_per_cached_svid`: past the agent's 2 s cache-save interval
/// while signing, so that the save and the allocator trim after it are
/// done whatever the machine's load (docs/benchmarks.md, "Agent memory per
/// cached SVID").
const AGENT_SETTLE_SECS: u64 = 4;

pub(crate) fn td() -> anyhow::Result<TrustDomain> {
    Ok(TrustDomain::new("example.org")?)
}

/// The `p`th percentile (nearest rank) of `v`, which this sorts.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ------------------------------------------------------------ connections --

/// Connect attempts retried while the listener's backlog is full (a burst
/// of 1,000 connects can fill it; a real client retries too).
const BUSY_RETRIES: u32 = 2000;

pub(crate) async fn unix_channel(path: &Path) -> anyhow::Result<Channel> {
    UnixConnector::new(path)
        .retry_when_busy(BUSY_RETRIES)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", path.display()))
}

async fn wl_connect(path: &Path) -> anyhow::Result<WorkloadClient> {
    Ok(WorkloadClient::new(unix_channel(path).await?))
}

/// A Workload API client and its open X509-SVID stream.
type Held = (WorkloadClient, Streaming<wpb::X509svidResponse>);

/// Connects and waits for the first X509-SVID response.
async fn first_response(path: PathBuf) -> anyhow::Result<(Duration, Held)> {
    let t0 = Instant::now();
    let (held, first) = fetch_first(&path).await?;
    ensure!(!first.svids.is_empty(), "first response without SVIDs");
    Ok((t0.elapsed(), held))
}

/// Connects, opens an X509-SVID stream and reads its first response.
async fn fetch_first(path: &Path) -> anyhow::Result<(Held, wpb::X509svidResponse)> {
    let mut client = wl_connect(path).await?;
    let mut stream = client
        .fetch_x509svid()
        .await
        .map_err(|s| anyhow::anyhow!("FetchX509SVID: {}", s.message()))?;
    let first = stream
        .message()
        .await?
        .context("the stream ended before its first response")?;
    Ok(((client, stream), first))
}

/// `n` clients connecting at once; returns their first-response latencies
/// (ms) and keeps their streams open.
async fn burst(path: &Path, n: usize) -> anyhow::Result<(Vec<f64>, Vec<Held>)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let b = barrier.clone();
        let p = path.to_path_buf();
        set.spawn(async move {
            b.wait().await;
            first_response(p).await
        });
    }
    let mut lat = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        let (d, h) = r??;
        lat.push(ms(d));
        held.push(h);
    }
    Ok((lat, held))
}

/// With `held` streams open, `n` new clients one after another.
async fn loaded(path: &Path, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let (d, h) = first_response(path.to_path_buf()).await?;
        lat.push(ms(d));
        drop(h);
    }
    Ok(lat)
}

pub(crate) type Admin = AdminClient;

async fn admin_create(admin: &mut Admin, entries: &[Entry]) -> anyhow::Result<Vec<pb::Entry>> {
    let results = admin
        .create_entries(entries.iter().map(pb::Entry::from).collect())
        .await?;
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        ensure!(r.error.is_empty(), "creating an entry: {}", r.error);
        out.push(r.entry.context("no entry in the result")?);
    }
    Ok(out)
}

pub(crate) async fn join_token(admin: &mut Admin) -> anyhow::Result<(String, SpiffeId)> {
    let t = admin
        .api()
        .create_join_token(pb::CreateJoinTokenRequest { ttl: 4 * 3600 })
        .await
        .map_err(|s| anyhow::anyhow!("CreateJoinToken: {}", s.message()))?
        .into_inner();
    Ok((t.token, t.agent_id.parse()?))
}

/// What the simulated agents share: the server address and its bundle.
struct AgentApi {
    addr: ServerAddresses,
    trust: Arc<ArcSwap<Bundle>>,
    server_id: SpiffeId,
    attest: AgentApiClient<Channel>,
}

impl AgentApi {
    /// Trusts the server through the fingerprint in `token`, as an agent does.
    async fn bootstrap(addr: &str, token: &str) -> anyhow::Result<Self> {
        let td = td()?;
        let addr = ServerAddresses::one(addr);
        let fp = token
            .split('.')
            .nth(2)
            .context("token without fingerprint")?;
        let bundle = sigil_agent::client::bootstrap_bundle_by_fingerprint(&addr, &td, fp).await?;
        let trust = Arc::new(ArcSwap::from_pointee(bundle));
        let server_id = td.id_with_path(sigil_types::SERVER_PATH)?;
        let attest =
            sigil_agent::client::connect(&addr, trust.clone(), server_id.clone(), None).await?;
        Ok(Self {
            addr,
            trust,
            server_id,
            attest,
        })
    }

    /// Attests with `token` and opens a mutual-TLS channel with the new SVID.
    async fn agent(&self, token: &str) -> anyhow::Result<(SpiffeId, AgentApiClient<Channel>)> {
        let key = PrivateKey::generate_p256()?;
        let csr = sigil_svid::x509::make_csr(&key)?;
        // As an agent does: refused by the per-address rate limit (every
        // simulated agent comes from 127.0.0.1), wait and try again.
        let resp = sigil_agent::retry::while_exhausted("AttestJoinToken", || {
            let mut attest = self.attest.clone();
            let req = pb::AttestJoinTokenRequest {
                token: token.to_owned(),
                csr: csr.clone(),
            };
            async move { attest.attest_join_token(req).await }
        })
        .await
        .map_err(|s| anyhow::anyhow!("AttestJoinToken: {}", s.message()))?
        .into_inner();
        let cert = Arc::new(RotatingCert::new(resp.cert_chain, &key)?);
        let client = sigil_agent::client::connect(
            &self.addr,
            self.trust.clone(),
            self.server_id.clone(),
            Some(cert),
        )
        .await?;
        Ok((resp.spiffe_id.parse()?, client))
    }
}

/// A first sync (revision 0) on an open channel: time to the decoded snapshot.
async fn first_sync(
    client: &mut AgentApiClient<Channel>,
) -> anyhow::Result<(Duration, pb::SyncMessage, Streaming<pb::SyncMessage>)> {
    let t0 = Instant::now();
    let mut stream = client
        .sync(pb::SyncRequest {
            revision: 0,
            known_entry_ids: vec![],
        })
        .await
        .map_err(|s| anyhow::anyhow!("Sync: {}", s.message()))?
        .into_inner();
    // The first update, whole: a large authorized set arrives as pages
    // (`continued`), which the agent applies only together.
    let mut first = next_page(&mut stream).await?;
    let mut more = first.continued;
    while more {
        let page = next_page(&mut stream).await?;
        more = page.continued;
        first.upserted.extend(page.upserted);
        first.deleted_ids.extend(page.deleted_ids);
    }
    first.continued = false;
    Ok((t0.elapsed(), first, stream))
}

async fn next_page(stream: &mut Streaming<pb::SyncMessage>) -> anyhow::Result<pb::SyncMessage> {
    stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("Sync: {}", s.message()))?
        .context("sync stream ended")
}

/// Follows an agent process's status lines.
pub(crate) fn follow_agent(agent: &mut ChildProc) -> watch::Receiver<Value> {
    let mut lines = agent.take_lines();
    let (tx, rx) = watch::channel(Value::Null);
    tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                tx.send_replace(v);
            }
        }
    });
    rx
}

pub(crate) async fn wait_status(
    rx: &watch::Receiver<Value>,
    timeout: Duration,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let mut rx = rx.clone();
    let v = tokio::time::timeout(timeout, rx.wait_for(|v| v.get("error").is_some() || f(v)))
        .await
        .with_context(|| format!("timed out waiting for the agent: {what}"))?
        .context("the agent process exited")?
        .clone();
    if let Some(e) = v.get("error") {
        bail!("the agent process failed: {e}");
    }
    Ok(v)
}

/// A server process with its data under `dir`, once it is ready: the
/// process, its agent API address and an admin client on its socket.
pub(crate) async fn spawn_server(dir: &Path) -> anyhow::Result<(ChildProc, String, Admin)> {
    let mut server = ChildProc::spawn(
        "server",
        &[
            "__server".into(),
            "--data-dir".into(),
            dir.join("server").display().to_string(),
        ],
    )?;
    let ready = server.next_json(Duration::from_secs(120)).await?;
    let addr = str_of(&ready, "agent_api")?.to_owned();
    let admin = AdminClient::new(unix_channel(Path::new(str_of(&ready, "admin_socket")?)).await?);
    Ok((server, addr, admin))
}

pub(crate) fn spawn_agent(addr: &str, token: &str, dir: &Path) -> anyhow::Result<ChildProc> {
    ChildProc::spawn(
        "agent",
        &[
            "__agent".into(),
            "--server".into(),
            addr.into(),
            "--token".into(),
            token.into(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--socket".into(),
            dir.join("agent.sock").display().to_string(),
        ],
    )
}

pub(crate) fn str_of<'a>(v: &'a Value, k: &str) -> anyhow::Result<&'a str> {
    v.get(k)
        .and_then(Value::as_str)
        .with_context(|| format!("no {k} in {v}"))
}

pub(crate) fn num_of(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

// ----------------------------------------------------------------- latency --

pub(crate) async fn latency_phase(
    s: &Sizes,
    report: &mut Report,
    work: &Path,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sigil-bench-latency-")
        .tempdir_in(work)?;
    let td = td()?;
    let (server, addr, mut admin) = spawn_server(dir.path()).await?;
    let uid = nix::unistd::getuid().as_raw();
    let me = Selectors::parse_all([format!("unix:uid:{uid}")])?;

    // One real agent process, and this process registered as its workload.
    let (token, agent_id) = join_token(&mut admin).await?;
    let mut base = sample_entry(&td, &agent_id, "wl", 0)?;
    base.spiffe_id = td.id_with_path("/bench/workload")?;
    base.selectors = me.clone();
    admin_create(&mut admin, &[base]).await?;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let mut agent = spawn_agent(&addr, &token, &agent_dir)?;
    let status = follow_agent(&mut agent);
    wait_status(&status, Duration::from_secs(60), "first SVID", |v| {
        v["connected"] == true && num_of(v, "svids") >= 1.0
    })
    .await?;
    let socket = agent_dir.join("agent.sock");

    // The plain gRPC baseline process.
    let plain_socket = dir.path().join("plain.sock");
    let mut plain = ChildProc::spawn(
        "plain",
        &[
            "__plain".into(),
            "--socket".into(),
            plain_socket.display().to_string(),
        ],
    )?;
    plain.next_json(Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.baseline(
        "baseline.plain_grpc_rss",
        plain.rss()? as f64 / MIB,
        "MiB",
        "resident memory of a tonic process serving a fixed Workload API answer on a Unix socket",
    );
    report.figure(
        "agent.rss_idle",
        agent.rss()? as f64 / MIB,
        "MiB",
        "baseline.plain_grpc_rss",
        None,
        "agent process with one entry and its SVID",
    );

    // Entry create -> workload holds the new SVID.
    if !s.workload_only {
        let mut client = wl_connect(&socket).await?;
        let mut stream = client
            .fetch_x509svid()
            .await
            .map_err(|s| anyhow::anyhow!("FetchX509SVID: {}", s.message()))?;
        let (tx, ids) = watch::channel(HashSet::<String>::new());
        let reader = tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                tx.send_replace(m.svids.into_iter().map(|s| s.spiffe_id).collect());
            }
        });
        let mut lat = Vec::with_capacity(s.latency_iterations);
        for i in 0..s.latency_iterations {
            let mut e = sample_entry(&td, &agent_id, "lat", i)?;
            e.selectors = me.clone();
            let want = e.spiffe_id.to_string();
            let mut rx = ids.clone();
            let t0 = Instant::now();
            let created = admin_create(&mut admin, &[e]).await?;
            tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| s.contains(&want)))
                .await
                .context("the workload never received the new SVID")??;
            lat.push(ms(t0.elapsed()));
            admin
                .delete_entries(created.iter().map(|e| e.id.clone()).collect())
                .await?;
            tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| !s.contains(&want)))
                .await
                .context("the deleted SVID was never withdrawn")??;
        }
        reader.abort();
        let note = format!(
            "{} entries created through the admin API (store on disk) while a FetchX509SVID stream waits; until that stream delivers the SVID",
            lat.len()
        );
        for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
            report.figure(
                &format!("latency.entry_to_svid_{name}"),
                percentile(&mut lat, p),
                "ms",
                "baseline.svid_crypto_floor",
                (name == "p99").then_some(Budget::Max(1000.0)),
                &note,
            );
        }
    }

    workload_first_response(s, report, [(&plain, &plain_socket), (&agent, &socket)]).await?;

    // Signing throughput through the agent API.
    if !s.workload_only {
        let (token, _) = join_token(&mut admin).await?;
        let api = AgentApi::bootstrap(&addr, &token).await?;
        let (sim_id, client) = api.agent(&token).await?;
        let entries: Vec<Entry> = (0..s.sign_batch)
            .map(|i| sample_entry(&td, &sim_id, "sign", i))
            .collect::<anyhow::Result<_>>()?;
        let created = admin_create(&mut admin, &entries).await?;
        let mut params = Vec::with_capacity(created.len());
        for e in &created {
            let key = PrivateKey::generate_p256()?;
            params.push(pb::X509svidParams {
                entry_id: e.id.clone(),
                csr: sigil_svid::x509::make_csr(&key)?,
            });
        }
        // Every request of the window built before it: the clock measures
        // the server signing them, the transport and the responses read,
        // not this process copying the batch.
        let senders: Vec<Vec<pb::BatchNewX509svidRequest>> = (0..s.sign_concurrency)
            .map(|_| {
                (0..s.sign_rounds)
                    .map(|_| pb::BatchNewX509svidRequest {
                        params: params.clone(),
                    })
                    .collect()
            })
            .collect();
        // The floor again, just before the run: on one thread, then on as
        // many threads as there are cores, as the server signs (and the
        // pause lets the server settle after the entry writes).
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let (_, one_cpu) = tokio::task::spawn_blocking(|| {
            crate::inproc::sign_verify_on_threads(1, Duration::from_millis(400))
        })
        .await??;
        let (all_rate, all_cpu) = tokio::task::spawn_blocking(move || {
            crate::inproc::sign_verify_on_threads(cores, Duration::from_millis(400))
        })
        .await??;
        report.baseline(
            "baseline.p256_sign_plus_verify_cpu_one_thread",
            one_cpu,
            "µs",
            "thread CPU time of one sign + verify on one thread, measured just before the signing run (the mean of a 0.4 s window, not the best)",
        );
        report.baseline(
            "baseline.p256_sign_plus_verify_cpu_all_cores",
            all_cpu,
            "µs",
            &format!("the same with {cores} threads at once, one per core, as the server signs"),
        );
        report.baseline(
            "baseline.p256_sign_plus_verify_all_cores",
            all_rate,
            "/s",
            &format!("sign + verify per second of those {cores} threads together (wall clock): what the cores give with no server, no TLS, no gRPC"),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cpu0 = server.cpu_seconds()?;
        let (self0, machine0) = (crate::child::self_cpu(), machine_cpu()?);
        let t0 = Instant::now();
        let mut set = JoinSet::new();
        for requests in senders {
            let mut c = client.clone();
            set.spawn(async move {
                let mut n = 0usize;
                for request in requests {
                    let resp = c
                        .batch_new_x509svid(request)
                        .await
                        .map_err(|s| anyhow::anyhow!("BatchNewX509SVID: {}", s.message()))?
                        .into_inner();
                    for r in &resp.results {
                        ensure!(r.error.is_empty(), "signing refused: {}", r.error);
                    }
                    n += resp.results.len();
                }
                Ok::<_, anyhow::Error>(n)
            });
        }
        let mut total = 0usize;
        while let Some(r) = set.join_next().await {
            total += r??;
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = server.cpu_seconds()? - cpu0;
        let client_cpu = crate::child::self_cpu() - self0;
        let machine = machine_cpu()?.since(machine0);
        let note = format!(
            "{total} CSRs in batches of {} on {} concurrent requests over one mTLS connection; keys, CSRs and requests made before the clock starts",
            s.sign_batch, s.sign_concurrency
        );
        report.figure(
            "api.signing_throughput",
            total as f64 / wall,
            "CSRs/s",
            "baseline.p256_sign",
            Some(Budget::MinRatio(0.6)),
            &note,
        );
        report.figure(
            "api.signing_per_server_cpu_second",
            total as f64 / cpu.max(0.01),
            "CSRs/CPU-s",
            "baseline.p256_sign_plus_verify",
            None,
            "the same run, divided by the server process's CPU time (all cores)",
        );
        report.figure(
            "api.signing_server_cpu_per_csr",
            per_csr_us(cpu, total),
            "µs",
            "baseline.p256_sign_plus_verify_cpu_all_cores",
            None,
            "the server's CPU time per CSR in the same run, against the sign + verify done with every core busy",
        );
        // Where the two cores went while signing: the server, this process
        // (sending the requests, reading the answers), other processes, idle.
        report.baseline(
            "api.signing_server_cores",
            cpu / wall,
            "cores",
            "the server's CPU time during the signing run divided by its wall time",
        );
        report.baseline(
            "api.signing_client_cpu_per_csr",
            per_csr_us(client_cpu, total),
            "µs",
            "this process's CPU time during the signing run (the load generator's side: encoding, TLS, decoding the answers), per CSR",
        );
        report.baseline(
            "api.signing_machine_idle_cores",
            machine.idle / wall,
            "cores",
            "CPU time the machine left idle during the signing run (/proc/stat), divided by its wall time",
        );
        report.baseline(
            "api.signing_other_cores",
            (machine.busy - cpu - client_cpu).max(0.0) / wall,
            "cores",
            "CPU time of every other process during the signing run (the machine's busy time less the server's and this process's), divided by its wall time",
        );
    }

    agent.stop().await;
    plain.stop().await;
    server.stop().await;
    Ok(())
}

/// `cpu` seconds over `n` CSRs, in µs each.
fn per_csr_us(cpu: f64, n: usize) -> f64 {
    cpu / n.max(1) as f64 * 1e6
}

/// The machine's CPU time so far (`/proc/stat`, all CPUs), in seconds.
#[derive(Debug, Clone, Copy)]
struct MachineCpu {
    /// user, nice, system, irq, softirq and steal.
    busy: f64,
    /// idle and iowait.
    idle: f64,
}

impl MachineCpu {
    /// The time spent between `earlier` and this reading.
    fn since(self, earlier: Self) -> Self {
        Self {
            busy: self.busy - earlier.busy,
            idle: self.idle - earlier.idle,
        }
    }
}

/// Reads [`MachineCpu`] from the first line of `/proc/stat`.
fn machine_cpu() -> anyhow::Result<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0.0) / hz;
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    Ok(MachineCpu {
        busy: field(0) + field(1) + field(2) + field(5) + field(6) + field(7),
        idle: field(3) + field(4),
    })
}

/// One burst-and-loaded round against one server process.
struct Round {
    /// Burst first-response latencies, ms.
    burst: Vec<f64>,
    /// Loaded first-response latencies, ms.
    loaded: Vec<f64>,
    /// The server's resident memory with the burst's streams open.
    rss_streams: u64,
    /// The server's CPU time during the burst, per client, µs.
    cpu_per_client_us: f64,
}

/// `s.clients` clients connect at once to `server` at `path`, then
/// `s.loaded_iterations` connect one after another while those streams stay
/// open; the streams are closed and the server left to settle.
async fn round(s: &Sizes, server: &ChildProc, path: &Path) -> anyhow::Result<Round> {
    let cpu0 = server.cpu_seconds()?;
    let (burst, held) = burst(path, s.clients).await?;
    let cpu_per_client_us = (server.cpu_seconds()? - cpu0) / s.clients as f64 * 1e6;
    let loaded = loaded(path, s.loaded_iterations).await?;
    let rss_streams = server.rss()?;
    drop(held);
    settle(server).await?;
    Ok(Round {
        burst,
        loaded,
        rss_streams,
        cpu_per_client_us,
    })
}

/// Waits (at most 5 s) until `server` uses under 2% of a core over 100 ms,
/// so that one round's teardown does not land on the next round's burst.
async fn settle(server: &ChildProc) -> anyhow::Result<()> {
    let step = Duration::from_millis(100);
    for _ in 0..50 {
        let c0 = server.cpu_seconds()?;
        tokio::time::sleep(step).await;
        if server.cpu_seconds()? - c0 < 0.02 * step.as_secs_f64() {
            break;
        }
    }
    Ok(())
}

/// The median of `v` (the lower middle value for an even count).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

/// Workload API first response: `s.burst_pairs` pairs of rounds against the
/// plain baseline and the agent, alternating which goes first (plain, agent;
/// agent, plain; ...) so that neither always runs on a warmer or cooler
/// machine. Burst figures are medians over the pairs and the ratio is the
/// median of each pair's ratio; loaded figures pool the pairs' samples.
async fn workload_first_response(
    s: &Sizes,
    report: &mut Report,
    [(plain, plain_socket), (agent, socket)]: [(&ChildProc, &PathBuf); 2],
) -> anyhow::Result<()> {
    // The comparison is fair only if both answer alike: the same message
    // shape (SVIDs, their chain and bundle certificates) and about the same
    // encoded size.
    let plain_shape = response_shape(plain_socket).await?;
    let agent_shape = response_shape(socket).await?;
    eprintln!("first response: plain {plain_shape:?}, agent {agent_shape:?}");
    report.baseline(
        "baseline.plain_grpc_first_response_bytes",
        plain_shape.bytes as f64,
        "B",
        "encoded size of the plain server's X509-SVID response",
    );
    report.figure(
        "workload.first_response_bytes",
        agent_shape.bytes as f64,
        "B",
        "baseline.plain_grpc_first_response_bytes",
        None,
        "encoded size of the agent's first X509-SVID response",
    );
    ensure!(
        plain_shape.same_shape(&agent_shape),
        "the plain baseline answers unlike the agent: plain {plain_shape:?}, agent {agent_shape:?}"
    );
    let mut plains = Vec::with_capacity(s.burst_pairs);
    let mut agents = Vec::with_capacity(s.burst_pairs);
    for pair in 0..s.burst_pairs {
        if pair % 2 == 0 {
            plains.push(round(s, plain, plain_socket).await?);
            agents.push(round(s, agent, socket).await?);
        } else {
            agents.push(round(s, agent, socket).await?);
            plains.push(round(s, plain, plain_socket).await?);
        }
        let (p, a) = (&plains[pair], &agents[pair]);
        eprintln!(
            "burst pair {pair} ({} first): plain p99 {:.1} ms, agent p99 {:.1} ms ({:.2}x); CPU per client plain {:.0} us, agent {:.0} us",
            if pair % 2 == 0 { "plain" } else { "agent" },
            percentile(&mut p.burst.clone(), 99.0),
            percentile(&mut a.burst.clone(), 99.0),
            percentile(&mut a.burst.clone(), 99.0) / percentile(&mut p.burst.clone(), 99.0),
            p.cpu_per_client_us,
            a.cpu_per_client_us,
        );
    }
    let pairs = s.burst_pairs;
    let burst_note = format!(
        "{} clients connect at once; each from connect to first X509-SVID response; median over {pairs} rounds alternating with the other server",
        s.clients
    );
    let loaded_note = format!(
        "{} new clients one after another while {} streams stay open; {pairs} rounds pooled",
        s.loaded_iterations, s.clients
    );
    let median_of = |rounds: &[Round], p: f64| {
        let mut per: Vec<f64> = rounds
            .iter()
            .map(|r| percentile(&mut r.burst.clone(), p))
            .collect();
        median(&mut per)
    };
    let pooled = |rounds: &[Round]| -> Vec<f64> {
        rounds
            .iter()
            .flat_map(|r| r.loaded.iter().copied())
            .collect()
    };
    let cpu_of = |rounds: &[Round]| {
        let mut per: Vec<f64> = rounds.iter().map(|r| r.cpu_per_client_us).collect();
        median(&mut per)
    };
    let rss_of = |rounds: &[Round]| rounds.iter().map(|r| r.rss_streams).max().unwrap_or(0);

    for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
        report.baseline(
            &format!("baseline.plain_grpc_burst_{name}"),
            median_of(&plains, p),
            "ms",
            &burst_note,
        );
    }
    let mut l = pooled(&plains);
    for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
        report.baseline(
            &format!("baseline.plain_grpc_loaded_{name}"),
            percentile(&mut l, p),
            "ms",
            &loaded_note,
        );
    }
    report.baseline(
        "baseline.plain_grpc_rss_streams",
        rss_of(&plains) as f64 / MIB,
        "MiB",
        &format!("plain server with {} streams open", s.clients),
    );
    // CPU time is counted in clock ticks (10 ms): at small sizes the plain
    // server's share may round to nothing, and the pair is left out.
    let cpu_measured = cpu_of(&plains) > 0.0;
    if cpu_measured {
        let note = format!(
            "plain server process CPU time during a burst of {} clients, per client; median over {pairs} rounds",
            s.clients
        );
        report.baseline(
            "baseline.plain_grpc_burst_cpu_per_client",
            cpu_of(&plains),
            "us",
            &note,
        );
    }

    for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
        report.figure(
            &format!("workload.first_response_burst_{name}"),
            median_of(&agents, p),
            "ms",
            &format!("baseline.plain_grpc_burst_{name}"),
            (name == "p99").then_some(Budget::Max(5.0)),
            &burst_note,
        );
    }
    let mut ratios: Vec<f64> = plains
        .iter()
        .zip(&agents)
        .map(|(p, a)| {
            percentile(&mut a.burst.clone(), 99.0) / percentile(&mut p.burst.clone(), 99.0)
        })
        .collect();
    let listed = ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    report.ratio(
        "workload.first_response_burst_p99_pair_ratio",
        median(&mut ratios),
        BURST_P99_MAX_RATIO,
        &format!(
            "median over {pairs} pairs of (agent burst p99 / plain burst p99), each pair measured back to back: {listed}"
        ),
    );
    if cpu_measured {
        let note = format!(
            "agent process CPU time during a burst of {} clients, per client (accept, attestation, matching, response, HTTP/2); median over {pairs} rounds",
            s.clients
        );
        report.figure(
            "workload.burst_cpu_per_client",
            cpu_of(&agents),
            "us",
            "baseline.plain_grpc_burst_cpu_per_client",
            None,
            &note,
        );
    }
    let mut l = pooled(&agents);
    for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
        report.figure(
            &format!("workload.first_response_loaded_{name}"),
            percentile(&mut l, p),
            "ms",
            &format!("baseline.plain_grpc_loaded_{name}"),
            (name == "p99").then_some(Budget::Max(5.0)),
            &loaded_note,
        );
    }
    report.figure(
        "agent.rss_streams",
        rss_of(&agents) as f64 / MIB,
        "MiB",
        "baseline.plain_grpc_rss_streams",
        None,
        &format!("agent with {} Workload API streams open", s.clients),
    );
    Ok(())
}

/// What a first X509-SVID response holds, to compare the baseline's with
/// the agent's.
#[derive(Debug, PartialEq, Eq)]
struct ResponseShape {
    /// Encoded message size.
    bytes: usize,
    /// Per SVID: certificates in the chain and in the bundle, key size.
    svids: Vec<(usize, usize, usize)>,
    federated_bundles: usize,
}

impl ResponseShape {
    fn of(r: &wpb::X509svidResponse) -> anyhow::Result<Self> {
        use prost::Message as _;
        let certs = |der: &[u8]| sigil_svid::x509::split_der_certs(der).map(|v| v.len());
        let svids = r
            .svids
            .iter()
            .map(|s| {
                Ok((
                    certs(&s.x509_svid)?,
                    certs(&s.bundle)?,
                    s.x509_svid_key.len(),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            bytes: r.encoded_len(),
            svids,
            federated_bundles: r.federated_bundles.len(),
        })
    }

    /// The same SVIDs, certificates and keys, sizes within 10%.
    fn same_shape(&self, other: &Self) -> bool {
        self.svids == other.svids
            && self.federated_bundles == other.federated_bundles
            && self.bytes.abs_diff(other.bytes) * 10 <= self.bytes.max(other.bytes)
    }
}

/// The shape of the first X509-SVID response of the server at `path`.
async fn response_shape(path: &Path) -> anyhow::Result<ResponseShape> {
    let (_held, first) = fetch_first(path).await?;
    ResponseShape::of(&first)
}

/// Issue #15 item 7: a burst's p99 at most this multiple of plain tonic's
/// in the same run.
pub(crate) const BURST_P99_MAX_RATIO: f64 = 1.2;

// ------------------------------------------------------------------- scale --

/// Most the server's CPU per entry created may be, as a multiple of plain
/// SQLite inserts of the same rows in the same process and run: about 3x in
/// a debug build, less in release (docs/benchmarks.md, "Bulk registration
/// in one transaction per batch"); a 3x regression of the write path lands
/// well above it.
pub(crate) const ENTRY_CREATE_MAX_RATIO: f64 = 6.0;

pub(crate) async fn scale_phase(
    s: &Sizes,
    report: &mut Report,
    dir_root: &Path,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sigil-bench-scale-")
        .tempdir_in(dir_root)?;
    let mut server = ChildProc::spawn(
        "server",
        &[
            "__server".into(),
            "--data-dir".into(),
            dir.path().join("server").display().to_string(),
            "--preload-agents".into(),
            s.agents.to_string(),
            "--preload-entries".into(),
            s.entries.to_string(),
        ],
    )?;
    let ready = server.next_json(Duration::from_secs(3600)).await?;
    let addr = str_of(&ready, "agent_api")?.to_owned();
    let tokens: Vec<String> = ready["agents"]
        .as_array()
        .context("no agents")?
        .iter()
        .filter_map(|a| a["token"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        tokens.len() == s.agents,
        "the server made {} tokens",
        tokens.len()
    );
    report.baseline(
        "baseline.entry_write_cpu_no_streams",
        num_of(&ready, "preload_cpu_s") / s.entries.max(1) as f64 * 1e6,
        "us",
        &format!(
            "server CPU per entry written while no agent is connected ({} entries preloaded in {:.1} s)",
            s.entries,
            num_of(&ready, "preload_wall_s")
        ),
    );

    let floor_rows = num_of(&ready, "floor_rows");
    if floor_rows > 0.0 {
        report.baseline(
            "baseline.sqlite_insert_cpu",
            num_of(&ready, "floor_cpu_s") / floor_rows * 1e6,
            "us",
            &format!(
                "server process CPU per row of {floor_rows} plain SQLite inserts of the same rows through sqlx, one transaction each, the store's pragmas (WAL, synchronous=FULL), its own file"
            ),
        );
        report.figure(
            "server.entry_create_cpu",
            num_of(&ready, "preload_cpu_s") / s.entries.max(1) as f64 * 1e6,
            "us",
            "baseline.sqlite_insert_cpu",
            Some(Budget::MaxRatio(ENTRY_CREATE_MAX_RATIO)),
            &format!(
                "baseline.entry_write_cpu_no_streams again: server CPU per entry created through Store::create_entry, one transaction each, into the index ({} entries)",
                s.entries
            ),
        );
    }

    let api = Arc::new(AgentApi::bootstrap(&addr, &tokens[0]).await?);
    let per_agent = s.entries / s.agents.max(1);
    let (floor, bytes) = sync_floor(per_agent.max(1))?;
    report.baseline(
        "baseline.sync_floor_per_agent",
        ms(floor),
        "ms",
        &format!("protobuf encode + decode + entry conversion of a {per_agent}-entry sync message ({bytes} bytes), in process"),
    );

    // A agents attest and open their sync streams, 8 at a time.
    let sem = Arc::new(Semaphore::new(8));
    let mut set = JoinSet::new();
    for token in tokens {
        let api = api.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let (_, mut client) = api.agent(&token).await?;
            let (d, first, mut stream) = first_sync(&mut client).await?;
            let n = first.upserted.len();
            // Hold the stream open and drained, as an agent does.
            tokio::spawn(async move {
                let _client = client;
                while let Ok(Some(_)) = stream.message().await {}
            });
            Ok::<_, anyhow::Error>((ms(d), n))
        });
    }
    let mut lat = Vec::with_capacity(s.agents);
    while let Some(r) = set.join_next().await {
        let (d, n) = r??;
        ensure!(
            n >= per_agent,
            "an agent got {n} entries, expected {per_agent}"
        );
        lat.push(d);
    }
    let note = format!(
        "{} agents each authorized for {per_agent} of {} entries; Sync(revision 0) on an open mTLS channel until the snapshot is decoded",
        s.agents, s.entries
    );
    for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        report.figure(
            &format!("sync.first_sync_{per_agent}_entries_{name}"),
            percentile(&mut lat, p),
            "ms",
            "baseline.sync_floor_per_agent",
            (name == "p99").then_some(Budget::Max(1000.0)),
            &note,
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let registry_bytes = bytes as f64 / per_agent.max(1) as f64 * s.entries as f64;
    report.baseline(
        "baseline.registry_encoded",
        registry_bytes / MIB,
        "MiB",
        &format!("the {} entries as protobuf", s.entries),
    );
    report.figure(
        "server.rss",
        server.rss()? as f64 / MIB,
        "MiB",
        "baseline.registry_encoded",
        Some(Budget::Max(1024.0)),
        &format!(
            "{} entries, {} agents with open sync streams",
            s.entries, s.agents
        ),
    );

    // One agent authorized for M entries, for each M of the sweep.
    let mut write_cpu = 0.0;
    let mut written = 0usize;
    for &m in &s.sweep {
        server.send(&format!("big {m}")).await?;
        let v = server.next_json(Duration::from_secs(3600)).await?;
        write_cpu += num_of(&v, "cpu_s");
        written += m;
        let (_, mut client) = api.agent(str_of(&v, "token")?).await?;
        let mut times = Vec::new();
        let mut size = 0;
        let mut first_entry = None;
        for _ in 0..3 {
            let (d, first, stream) = first_sync(&mut client).await?;
            first_entry = first.upserted.first().map(|e| e.id.clone());
            ensure!(
                first.upserted.len() == m,
                "got {} of {m} entries",
                first.upserted.len()
            );
            size = prost::Message::encoded_len(&first);
            drop(stream);
            times.push(ms(d));
        }
        // One JWT-SVID minted through the agent API for one of these entries.
        if let Some(entry) = first_entry {
            let mut jwt = Vec::new();
            for _ in 0..5 {
                let t0 = Instant::now();
                client
                    .new_jwtsvid(pb::NewJwtsvidRequest {
                        entry_id: entry.clone(),
                        audience: vec!["bench".into()],
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("NewJWTSVID: {}", s.message()))?;
                jwt.push(ms(t0.elapsed()));
            }
            report.figure(
                &format!("api.jwt_mint_agent_with_{m}_entries"),
                percentile(&mut jwt, 50.0),
                "ms",
                "baseline.jwt_sign_time",
                None,
                &format!("median of 5 NewJWTSVID calls on an open mTLS channel by an agent authorized for {m} entries"),
            );
        }
        let (floor, _) = sync_floor(m)?;
        report.baseline(
            &format!("baseline.sync_floor_{m}"),
            ms(floor),
            "ms",
            &format!("protobuf encode + decode + conversion of {m} entries, in process"),
        );
        report.figure(
            &format!("sync.first_sync_{m}_entries"),
            percentile(&mut times, 50.0),
            "ms",
            &format!("baseline.sync_floor_{m}"),
            Some(Budget::Max(1000.0)),
            &format!(
                "median of 3; one agent authorized for {m} entries, registry of {} entries; {size} bytes (in pages of at most 4 MiB)",
                num_of(&v, "entries")
            ),
        );
    }
    if written > 0 {
        report.figure(
            "server.entry_write_cpu_with_streams",
            write_cpu / written as f64 * 1e6,
            "us",
            "baseline.entry_write_cpu_no_streams",
            None,
            &format!(
                "server CPU per entry written while {} agents hold sync streams (none concerned by the entries)",
                s.agents
            ),
        );
    }

    // Agent memory: an idle agent, then one with K SVIDs.
    server.send("big 0").await?;
    let v = server.next_json(Duration::from_secs(60)).await?;
    let idle_dir = dir.path().join("agent-idle");
    std::fs::create_dir_all(&idle_dir)?;
    let mut idle = spawn_agent(&addr, str_of(&v, "token")?, &idle_dir)?;
    let st = follow_agent(&mut idle);
    wait_status(&st, Duration::from_secs(60), "connected", |v| {
        v["connected"] == true
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = idle.rss()?;
    idle.stop().await;

    server.send(&format!("big {}", s.agent_svids)).await?;
    let v = server.next_json(Duration::from_secs(3600)).await?;
    let full_dir = dir.path().join("agent-full");
    std::fs::create_dir_all(&full_dir)?;
    let t0 = Instant::now();
    let mut full = spawn_agent(&addr, str_of(&v, "token")?, &full_dir)?;
    let st = follow_agent(&mut full);
    let k = s.agent_svids as f64;
    let last = wait_status(&st, Duration::from_secs(3600), "all SVIDs", |v| {
        num_of(v, "svids") >= k
    })
    .await?;
    let cold = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_full_1s = full.rss()?;
    // Past the agent's cache-save interval while signing (2 s,
    // `SAVE_WHILE_SIGNING`) and the trim after that save, however late the
    // last answers came: the figure is what the agent keeps, not how far it
    // got in giving back the buffers of its start.
    tokio::time::sleep(Duration::from_secs(AGENT_SETTLE_SECS - 1)).await;
    let rss_full = full.rss()?;
    let peak_full = full.peak_rss()?;
    full.stop().await;
    report.figure(
        "agent.cold_start_svids_rate",
        k / cold,
        "SVIDs/s",
        "baseline.svid_crypto_floor_rate",
        None,
        &format!(
            "agent process start (join token) until it serves {} SVIDs ({cold:.1} s): attestation, sync, key generation, CSRs, signing",
            s.agent_svids
        ),
    );
    report.baseline(
        "baseline.svid_payload",
        num_of(&last, "svid_bytes") / k,
        "B",
        "DER certificate chain + PKCS#8 key of one cached SVID",
    );
    report.figure(
        "agent.rss_per_cached_svid",
        (rss_full as f64 - rss_idle as f64) / k,
        "B",
        "baseline.svid_payload",
        Some(Budget::Max(4096.0)),
        &format!(
            "(RSS with {} entries and SVIDs {:.1} MiB, {AGENT_SETTLE_SECS} s after it serves them all - RSS of an idle agent {:.1} MiB) / {}; 1 s after: {:.1} MiB; peak RSS {:.1} MiB",
            s.agent_svids,
            rss_full as f64 / MIB,
            rss_idle as f64 / MIB,
            s.agent_svids,
            rss_full_1s as f64 / MIB,
            peak_full as f64 / MIB
        ),
    );

    let total = s.entries + written + s.agent_svids;
    report.baseline(
        "baseline.registry_encoded_end",
        registry_bytes / s.entries.max(1) as f64 * total as f64 / MIB,
        "MiB",
        &format!("{total} entries as protobuf"),
    );
    report.figure(
        "server.rss_end",
        server.rss()? as f64 / MIB,
        "MiB",
        "baseline.registry_encoded_end",
        None,
        &format!("{total} entries, {} agents connected", s.agents),
    );
    server.stop().await;
    Ok(())
}
