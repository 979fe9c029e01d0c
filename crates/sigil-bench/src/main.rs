//! `sigil-bench`: the load generator. It measures sigil against the physical
//! limits of the machine it runs on: every figure is printed beside a
//! baseline measured in the same run (raw P-256 rates, plain rustls, a plain
//! tonic server, protobuf encoding) and the ratio between them, and checked
//! against DESIGN.md's performance budget where it sets one.
//!
//! ```text
//! cargo run --release -p sigil-bench                 # full run (a few minutes)
//! cargo run --release -p sigil-bench -- --quick      # seconds, tiny sizes
//! cargo run --release -p sigil-bench -- --json > report.json
//! cargo run --release -p sigil-bench -- --scenario bulk-registration
//! ```
//!
//! The server and agents run as child processes (this binary, with hidden
//! subcommands) on loopback and Unix sockets in temporary directories.

mod bulk;
mod child;
mod floor;
mod inproc;
mod load;
mod report;
mod sample;
mod stages;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::report::Report;

#[derive(Parser, Debug)]
#[command(
    name = "sigil-bench",
    about = "Load generator for sigil: a real server, agents and workloads on loopback, each figure beside a baseline measured in the same run",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand, Debug)]
enum Role {
    #[command(name = "__server", hide = true)]
    Server(child::ServerArgs),
    #[command(name = "__agent", hide = true)]
    Agent(child::AgentArgs),
    #[command(name = "__plain", hide = true)]
    Plain(child::PlainArgs),
}

/// What a run measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Scenario {
    /// Rates, latency and scale phases (every figure but bulk.*).
    #[default]
    Standard,
    /// Entries registered in batches through the admin API while one real
    /// agent is connected and authorized for them (bulk.* figures).
    BulkRegistration,
}

/// Sizes and switches of a run; unset sizes take the full or `--quick` default.
#[derive(clap::Args, Debug)]
struct Opts {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value_t)]
    scenario: Scenario,
    /// bulk-registration: entries registered under the connected agent [100000; quick 4000].
    #[arg(long)]
    bulk_entries: Option<usize>,
    /// bulk-registration: entries per BatchCreateEntry call [500; quick 500].
    #[arg(long)]
    bulk_batch: Option<usize>,
    /// bulk-registration: entries created, updated and deleted by the load
    /// phase, for an agent that never connects [--bulk-entries].
    #[arg(long)]
    bulk_load_entries: Option<usize>,
    /// bulk-registration: batch calls the load phase keeps in flight, each
    /// batch built while the calls before it are written; 1 sends one call
    /// after the other [2].
    #[arg(long, default_value_t = 2)]
    bulk_in_flight: usize,
    /// Tiny sizes: the whole run takes seconds (for tests and a first look).
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Run only the scale phase (no in-process rates, no latency phase).
    #[arg(long)]
    scale_only: bool,
    /// Run only the Workload API first-response rounds (burst and loaded,
    /// against the plain baseline and the agent): no rates, no other
    /// latency figures, no scale phase.
    #[arg(long, conflicts_with = "scale_only")]
    workload_only: bool,
    /// Pairs of Workload API rounds (plain and agent, alternating which goes first) [5; quick 2].
    #[arg(long)]
    burst_pairs: Option<usize>,
    /// Simulated agents holding sync streams in the scale phase [1000; quick 4].
    #[arg(long)]
    agents: Option<usize>,
    /// Entries spread over those agents [100000; quick 200].
    #[arg(long)]
    entries: Option<usize>,
    /// Concurrent Workload API clients [1000; quick 20].
    #[arg(long)]
    clients: Option<usize>,
    /// Entry → SVID latency samples [100; quick 5].
    #[arg(long)]
    latency_iterations: Option<usize>,
    /// New Workload API clients measured while the others hold streams [200; quick 10].
    #[arg(long)]
    loaded_iterations: Option<usize>,
    /// CSRs per signing request [500; quick 20].
    #[arg(long)]
    sign_batch: Option<usize>,
    /// Signing requests per concurrent sender [10; quick 2].
    #[arg(long)]
    sign_rounds: Option<usize>,
    /// Concurrent signing requests [2; quick 2].
    #[arg(long)]
    sign_concurrency: Option<usize>,
    /// Entry counts of one agent whose first sync is measured, comma-separated [1000,10000,100000; quick 100].
    #[arg(long, value_delimiter = ',')]
    sync_sweep: Option<Vec<usize>>,
    /// SVIDs the agent-memory agent caches [10000; quick 50].
    #[arg(long)]
    agent_svids: Option<usize>,
    /// Minimum time per in-process rate, in ms [1000; quick 50].
    #[arg(long)]
    rate_ms: Option<u64>,
    /// Seconds per `openssl speed` measurement; 0 skips it [3; quick 0].
    #[arg(long)]
    openssl_seconds: Option<u32>,
    /// Print where the CPU time of a first sync of this many entries goes,
    /// stage by stage, measured in this process (thread CPU time), and exit.
    #[arg(long)]
    sync_stages: Option<usize>,
    /// Directory for the latency phase's server and agent (store on disk) [the system temp dir].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Directory for the scale phase's server (store on tmpfs) [/dev/shm if present].
    #[arg(long)]
    scale_dir: Option<PathBuf>,
}

/// The resolved sizes of a run.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    pub(crate) agents: usize,
    pub(crate) entries: usize,
    pub(crate) clients: usize,
    pub(crate) latency_iterations: usize,
    pub(crate) loaded_iterations: usize,
    pub(crate) sign_batch: usize,
    pub(crate) sign_rounds: usize,
    pub(crate) sign_concurrency: usize,
    pub(crate) sweep: Vec<usize>,
    pub(crate) agent_svids: usize,
    pub(crate) rate_time: Duration,
    pub(crate) openssl_seconds: u32,
    pub(crate) burst_pairs: usize,
    /// Only the Workload API rounds of the latency phase.
    pub(crate) workload_only: bool,
}

impl Sizes {
    fn from(o: &Opts) -> anyhow::Result<Self> {
        let q = o.quick;
        let pick =
            |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
        let s = Self {
            agents: pick(o.agents, 1000, 4),
            entries: pick(o.entries, 100_000, 200),
            clients: pick(o.clients, 1000, 20),
            latency_iterations: pick(o.latency_iterations, 100, 5),
            loaded_iterations: pick(o.loaded_iterations, 200, 10),
            sign_batch: pick(o.sign_batch, 500, 20),
            sign_rounds: pick(o.sign_rounds, 10, 2),
            sign_concurrency: pick(o.sign_concurrency, 2, 2),
            sweep: o.sync_sweep.clone().unwrap_or_else(|| {
                if q {
                    vec![100]
                } else {
                    vec![1000, 10_000, 100_000]
                }
            }),
            agent_svids: pick(o.agent_svids, 10_000, 50),
            rate_time: Duration::from_millis(o.rate_ms.unwrap_or(if q { 50 } else { 1000 })),
            openssl_seconds: o.openssl_seconds.unwrap_or(if q { 0 } else { 3 }),
            burst_pairs: pick(o.burst_pairs, 5, 2),
            workload_only: o.workload_only,
        };
        anyhow::ensure!(
            s.agents >= 1 && s.entries >= s.agents,
            "--entries must be at least --agents (and --agents at least 1)"
        );
        anyhow::ensure!(
            s.clients >= 1
                && s.latency_iterations >= 1
                && s.loaded_iterations >= 1
                && s.burst_pairs >= 1,
            "sizes must be at least 1"
        );
        anyhow::ensure!(
            (1..=500).contains(&s.sign_batch),
            "--sign-batch must be 1..=500 (the server's batch limit)"
        );
        anyhow::ensure!(
            s.sign_rounds >= 1 && s.sign_concurrency >= 1 && s.agent_svids >= 1,
            "sizes must be at least 1"
        );
        Ok(s)
    }
}

/// Free space the scale phase wants for its store (about 1 KiB per entry).
const SCALE_DIR_MIN_FREE: u64 = 1 << 30;

/// Bytes available to an unprivileged user under `path` (0 when unknown).
fn free_bytes(path: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|v| v.blocks_available() * v.fragment_size())
        .unwrap_or(0)
}

/// Lets 1,000 clients (two descriptors each, across processes) open sockets.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

async fn run(o: Opts) -> anyhow::Result<()> {
    if let Some(n) = o.sync_stages {
        return stages::run(n);
    }
    if o.scenario == Scenario::BulkRegistration {
        return run_bulk(&o).await;
    }
    let sizes = Sizes::from(&o)?;
    let mut report = Report::new(if o.quick { "quick" } else { "full" });
    eprintln!("sizes: {sizes:?}");
    let work = o.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    if !o.scale_only && !o.workload_only {
        // The in-process rates run first, while no child process competes for the CPU.
        inproc::measure(&mut report, sizes.rate_time, sizes.openssl_seconds)?;
        load::latency_phase(&sizes, &mut report, &work).await?;
    }
    if o.workload_only {
        load::latency_phase(&sizes, &mut report, &work).await?;
        return finish(report, o.json);
    }
    let scale_dir = o.scale_dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if free_bytes(&shm) >= SCALE_DIR_MIN_FREE {
            shm
        } else {
            eprintln!("/dev/shm is missing or small; the scale phase's store goes to {} (entry writes will fsync)", work.display());
            work.clone()
        }
    });
    load::scale_phase(&sizes, &mut report, &scale_dir).await?;
    finish(report, o.json)
}

/// Prints the report, as text or as JSON.
fn finish(mut report: Report, json: bool) -> anyhow::Result<()> {
    report.loadavg_at_end = report::loadavg();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

async fn run_bulk(o: &Opts) -> anyhow::Result<()> {
    let entries = o
        .bulk_entries
        .unwrap_or(if o.quick { 4000 } else { 100_000 });
    let sizes = bulk::BulkSizes {
        entries,
        batch: o.bulk_batch.unwrap_or(500),
        load_entries: o.bulk_load_entries.unwrap_or(entries),
        in_flight: o.bulk_in_flight,
    };
    let mode = if o.quick {
        "bulk-registration quick"
    } else {
        "bulk-registration"
    };
    let mut report = Report::new(mode);
    eprintln!("sizes: {sizes:?}");
    let work = o.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    bulk::bulk_registration(&sizes, &mut report, &work).await?;
    finish(report, o.json)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raise_fd_limit();
    let cli = Cli::parse();
    match cli.role {
        Some(Role::Server(a)) => child::run_role(child::run_server(a)).await,
        Some(Role::Agent(a)) => child::run_role(child::run_agent(a)).await,
        Some(Role::Plain(a)) => child::run_role(child::run_plain(a)).await,
        None => run(cli.opts).await,
    }
}
