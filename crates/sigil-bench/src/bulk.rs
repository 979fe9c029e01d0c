//! The bulk-registration scenario (`--scenario bulk-registration`): many
//! entries registered in batches through the admin API while one real agent
//! process is connected and authorized for all of them.
//!
//! It measures what registration costs while an agent is concerned: each
//! batch's latency (first, median, last: a cost that grows with the registry
//! shows as last >> first), the server's CPU time, and the bytes the agent
//! wrote to keep its cache on disk. The entries are parented to the agent,
//! with selectors that match no workload; the agent still signs one SVID per
//! entry (it signs ahead for every entry it holds), and that signing is part
//! of the server CPU and of the cache the agent writes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sigil_proto::server::v1 as pb;
use sigil_types::SpiffeId;

use crate::load::{
    Admin, follow_agent, join_token, num_of, percentile, spawn_agent, spawn_server, td, wait_status,
};
use crate::report::{Budget, Report};
use crate::sample::sample_entry;

const MIB: f64 = 1024.0 * 1024.0;

/// Entries a second the bulk path is to load (#15 item 1).
const BULK_LOAD_TARGET: f64 = 20_000.0;

/// Batches measured with no agent concerned, for the baseline.
const BASELINE_BATCHES: usize = 3;

/// Most the agent's CPU for the second half of the entries may be, as a
/// multiple of its CPU for the first half. Work in proportion to the change
/// gives about 1; work in proportion to everything held gives about 3.
pub(crate) const SECOND_HALF_MAX_RATIO: f64 = 1.8;

/// The sizes of the scenario.
#[derive(Debug, Clone)]
pub(crate) struct BulkSizes {
    /// Entries registered under the connected agent.
    pub(crate) entries: usize,
    /// Entries per BatchCreateEntry call.
    pub(crate) batch: usize,
    /// Entries the load phase creates, updates and deletes.
    pub(crate) load_entries: usize,
    /// Batch calls the load phase keeps in flight.
    pub(crate) in_flight: usize,
}

/// Creates `n` entries parented to `parent` in one BatchCreateEntry call
/// and returns its latency; `offset` keeps their SPIFFE IDs distinct.
async fn one_batch(
    admin: &mut Admin,
    parent: &SpiffeId,
    tag: &str,
    offset: usize,
    n: usize,
) -> anyhow::Result<Duration> {
    Ok(create_batch(admin, parent, tag, offset, n).await?.0)
}

/// [`one_batch`], also returning the entries as created.
async fn create_batch(
    admin: &mut Admin,
    parent: &SpiffeId,
    tag: &str,
    offset: usize,
    n: usize,
) -> anyhow::Result<(Duration, Vec<pb::Entry>)> {
    let td = td()?;
    // Without IDs: the server assigns them, as it does for `sigil entry
    // create` and for most registration pipelines.
    let entries = (offset..offset + n)
        .map(|i| {
            sample_entry(&td, parent, tag, i).map(|e| pb::Entry {
                id: String::new(),
                ..pb::Entry::from(&e)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let resp = admin
        .api()
        .batch_create_entry(pb::BatchCreateEntryRequest { entries })
        .await
        .map_err(|s| anyhow::anyhow!("BatchCreateEntry: {}", s.message()))?
        .into_inner();
    Ok((t0.elapsed(), entries_of("creating", resp, n)?))
}

/// The entries of a batch call's answer, every one of the `n` written.
fn entries_of(
    what: &str,
    resp: pb::BatchEntryResponse,
    n: usize,
) -> anyhow::Result<Vec<pb::Entry>> {
    ensure!(
        resp.results.len() == n,
        "{} results for {n}",
        resp.results.len()
    );
    resp.results
        .into_iter()
        .map(|r| {
            ensure!(r.error.is_empty(), "{what} an entry: {}", r.error);
            r.entry.context("a result without its entry")
        })
        .collect()
}

/// Wall seconds and server CPU seconds of one kind of write.
type Cost = (f64, f64);

/// What the load phase measured: creating, updating, then deleting the
/// same entries, each in batches.
struct LoadCosts {
    create: Cost,
    update: Cost,
    delete: Cost,
}

/// Runs `calls` in their order with up to `in_flight` of them at once, each
/// on a task of its own: a call builds its batch while the ones before it
/// are being written, as a registration pipeline does. Their outputs, in
/// the order of `calls`; the first failure ends the run.
async fn pipelined<T, F>(
    in_flight: usize,
    calls: impl IntoIterator<Item = F>,
) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut running = std::collections::VecDeque::new();
    let mut out = Vec::new();
    for call in calls {
        if running.len() >= in_flight.max(1)
            && let Some(first) = running.pop_front()
        {
            out.push(joined(first).await?);
        }
        running.push_back(tokio::spawn(call));
    }
    while let Some(next) = running.pop_front() {
        out.push(joined(next).await?);
    }
    Ok(out)
}

/// The output of a call [`pipelined`] spawned.
async fn joined<T>(call: tokio::task::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    call.await.context("a batch call's task")?
}

/// Sends each of `batches` with `call` (a batch write call on a client of
/// its own), `in_flight` at a time; the entries of all the answers, each
/// batch's every item written.
async fn write_batches<I, F, Fut>(
    in_flight: usize,
    admin: &Admin,
    what: &'static str,
    batches: Vec<Vec<I>>,
    call: F,
) -> anyhow::Result<Vec<pb::Entry>>
where
    F: Fn(Admin, Vec<I>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<pb::BatchEntryResponse>, tonic::Status>>
        + Send
        + 'static,
{
    let answers = pipelined(
        in_flight,
        batches.into_iter().map(|items| {
            let n = items.len();
            let sent = call(admin.clone(), items);
            async move {
                let resp = sent
                    .await
                    .map_err(|s| anyhow::anyhow!("{what} a batch: {}", s.message()))?
                    .into_inner();
                entries_of(what, resp, n)
            }
        }),
    )
    .await?;
    Ok(answers.into_iter().flatten().collect())
}

/// Registers `s.load_entries` entries in batches of `s.batch`, `s.in_flight`
/// calls at a time, for an agent that never connects (the bulk load a
/// registration pipeline does), then changes each of them (a new hint) in
/// BatchUpdateEntry calls and deletes them in BatchDeleteEntry calls, the
/// same way.
async fn load_phase(
    admin: &mut Admin,
    server: &crate::child::ChildProc,
    s: &BulkSizes,
) -> anyhow::Result<LoadCosts> {
    let (_, parent) = join_token(admin).await?;
    let cpu0 = server.cpu_seconds()?;
    let t0 = Instant::now();
    let created = pipelined(
        s.in_flight,
        (0..s.load_entries).step_by(s.batch).map(|offset| {
            let (mut admin, parent) = (admin.clone(), parent.clone());
            let n = s.batch.min(s.load_entries - offset);
            async move {
                Ok(create_batch(&mut admin, &parent, "load", offset, n)
                    .await?
                    .1)
            }
        }),
    )
    .await?;
    let create = (t0.elapsed().as_secs_f64(), server.cpu_seconds()? - cpu0);

    // The batches as created, with a new hint (made before the clock starts).
    let updates: Vec<Vec<pb::Entry>> = created
        .into_iter()
        .map(|mut batch| {
            for e in &mut batch {
                e.hint = "updated".into();
            }
            batch
        })
        .collect();
    let ids: Vec<Vec<String>> = updates
        .iter()
        .map(|batch| batch.iter().map(|e| e.id.clone()).collect())
        .collect();
    let cpu0 = server.cpu_seconds()?;
    let t0 = Instant::now();
    let updated = write_batches(
        s.in_flight,
        admin,
        "updating",
        updates,
        |mut a, entries| async move {
            a.api()
                .batch_update_entry(pb::BatchUpdateEntryRequest { entries })
                .await
        },
    )
    .await?;
    let update = (t0.elapsed().as_secs_f64(), server.cpu_seconds()? - cpu0);
    ensure!(
        updated.iter().all(|e| e.hint == "updated"),
        "an update that did not take"
    );

    let cpu0 = server.cpu_seconds()?;
    let t0 = Instant::now();
    write_batches(
        s.in_flight,
        admin,
        "deleting",
        ids,
        |mut a, ids| async move {
            a.api()
                .batch_delete_entry(pb::BatchDeleteEntryRequest { ids })
                .await
        },
    )
    .await?;
    let delete = (t0.elapsed().as_secs_f64(), server.cpu_seconds()? - cpu0);
    Ok(LoadCosts {
        create,
        update,
        delete,
    })
}

/// Wall seconds and CPU seconds (this process) of the load phase's rows
/// inserted into plain SQLite, `s.batch` to a transaction.
async fn load_floor(dir: &Path, s: &BulkSizes) -> anyhow::Result<(f64, f64)> {
    let td = td()?;
    let parent = td.id_with_path("/sigil/agent/bench/floor")?;
    let rows = (0..s.load_entries)
        .map(|i| sample_entry(&td, &parent, "load", i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cpu0 = crate::child::self_cpu();
    let wall = crate::floor::plain_inserts(&dir.join("floor.db"), &rows, s.batch).await?;
    Ok((wall.as_secs_f64(), crate::child::self_cpu() - cpu0))
}

pub(crate) async fn bulk_registration(
    s: &BulkSizes,
    report: &mut Report,
    work: &Path,
) -> anyhow::Result<()> {
    ensure!(
        (1..=500).contains(&s.batch) && s.entries >= s.batch && s.load_entries >= s.batch,
        "--bulk-batch must be 1..=500, and --bulk-entries and --bulk-load-entries at least one batch"
    );
    ensure!(s.in_flight >= 1, "--bulk-in-flight must be at least 1");
    // On disk, not tmpfs: the agent's writes are read from the block layer.
    let dir = tempfile::Builder::new()
        .prefix("sigil-bench-bulk-")
        .tempdir_in(work)?;
    let (server, addr, mut admin) = spawn_server(dir.path()).await?;

    // Baseline: the same batches for an agent that never connects.
    let (_, idle_agent) = join_token(&mut admin).await?;
    let cpu0 = server.cpu_seconds()?;
    let mut idle = Vec::new();
    for b in 0..BASELINE_BATCHES {
        idle.push(
            one_batch(&mut admin, &idle_agent, "idle", b * s.batch, s.batch)
                .await?
                .as_secs_f64()
                * 1000.0,
        );
    }
    let idle_cpu_per_entry = (server.cpu_seconds()? - cpu0) / (BASELINE_BATCHES * s.batch) as f64;
    report.baseline(
        "baseline.bulk_batch_no_agent",
        percentile(&mut idle, 50.0),
        "ms",
        &format!(
            "median of {BASELINE_BATCHES} BatchCreateEntry calls of {} entries (store on disk) while no agent is concerned",
            s.batch
        ),
    );
    report.baseline(
        "baseline.bulk_server_cpu_no_agent",
        idle_cpu_per_entry * s.entries as f64,
        "CPU-s",
        &format!(
            "server CPU per entry in those batches, times {} entries",
            s.entries
        ),
    );

    // One real agent, authorized for everything registered from now on.
    let (token, agent_id) = join_token(&mut admin).await?;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let mut agent = spawn_agent(&addr, &token, &agent_dir)?;
    let status = follow_agent(&mut agent);
    wait_status(&status, Duration::from_secs(60), "connected", |v| {
        v["connected"] == true
    })
    .await?;
    let io0 = agent.io()?;
    let agent_cpu0 = agent.cpu_seconds()?;
    let cpu0 = server.cpu_seconds()?;
    let t0 = Instant::now();
    let mut lat = Vec::new();
    let mut registered = 0.0;
    let mut synced = 0.0;
    let mut signed = 0.0;
    // Two halves, the second registered once the agent holds every SVID
    // of the first: the agent's CPU for each tells whether its work is in
    // proportion to the change (the same for both) or to what it already
    // holds (about three times as much for the second).
    let half = s.entries / 2;
    let mut half_cpu = [0.0; 2];
    let mut offset = 0;
    for (h, end) in [half, s.entries].into_iter().enumerate() {
        let cpu_at_start = agent.cpu_seconds()?;
        let registering = Instant::now();
        while offset < end {
            let n = s.batch.min(end - offset);
            let d = one_batch(&mut admin, &agent_id, "bulk", offset, n).await?;
            lat.push(d.as_secs_f64() * 1000.0);
            offset += n;
            if lat.len() % 20 == 0 {
                eprintln!(
                    "bulk: {offset} entries registered, last batch {:.0} ms",
                    lat[lat.len() - 1]
                );
            }
        }
        registered += registering.elapsed().as_secs_f64();
        let held = end as f64;
        wait_status(
            &status,
            Duration::from_secs(3600),
            "all entries synced",
            |v| num_of(v, "entries") >= held,
        )
        .await?;
        synced = t0.elapsed().as_secs_f64();
        wait_status(&status, Duration::from_secs(3600), "all SVIDs", |v| {
            num_of(v, "svids") >= held
        })
        .await?;
        signed = t0.elapsed().as_secs_f64();
        half_cpu[h] = agent.cpu_seconds()? - cpu_at_start;
    }
    // The cache write that follows the last signing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = server.cpu_seconds()? - cpu0;
    let io = agent.io()?;
    let agent_cpu = agent.cpu_seconds()? - agent_cpu0;
    let on_disk: u64 = std::fs::read_dir(agent_dir.join("data"))
        .context("the agent's data directory")?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    agent.stop().await;
    let load = load_phase(&mut admin, &server, s).await?;
    server.stop().await;
    let floor = load_floor(dir.path(), s).await?;

    report.baseline(
        "baseline.bulk_registration_wall",
        registered,
        "s",
        "wall time of all the BatchCreateEntry calls",
    );
    let batches = lat.len();
    let note = format!(
        "{} entries in {batches} BatchCreateEntry calls of {} while one agent process holds a sync stream and is authorized for all of them ({registered:.1} s in all)",
        s.entries, s.batch
    );
    let (first, last) = (lat[0], lat[batches - 1]);
    let median = percentile(&mut lat, 50.0);
    for (name, v) in [("first", first), ("median", median), ("last", last)] {
        report.figure(
            &format!("bulk.batch_{name}"),
            v,
            "ms",
            "baseline.bulk_batch_no_agent",
            None,
            &note,
        );
    }
    report.figure(
        "bulk.agent_synced",
        synced,
        "s",
        "baseline.bulk_registration_wall",
        None,
        "from the first batch until the agent holds every entry",
    );
    report.figure(
        "bulk.server_cpu",
        cpu,
        "CPU-s",
        "baseline.bulk_server_cpu_no_agent",
        None,
        &format!(
            "server CPU from the first batch until the agent holds an SVID for every entry ({signed:.1} s): registration, sync and signing {} SVIDs",
            s.entries
        ),
    );
    report.figure(
        "bulk.agent_cpu",
        agent_cpu,
        "CPU-s",
        "baseline.bulk_server_cpu_no_agent",
        None,
        &format!(
            "agent process CPU over the same span: sync, key generation and CSRs for {} SVIDs, cache writes",
            s.entries
        ),
    );
    report.baseline(
        "baseline.bulk_agent_cpu_first_half",
        half_cpu[0],
        "CPU-s",
        &format!(
            "agent CPU while the first {half} entries were registered, synced and signed, from an empty agent"
        ),
    );
    report.figure(
        "bulk.agent_cpu_second_half",
        half_cpu[1],
        "CPU-s",
        "baseline.bulk_agent_cpu_first_half",
        Some(Budget::MaxRatio(SECOND_HALF_MAX_RATIO)),
        &format!(
            "agent CPU for the next {} entries while it holds the first {half}: about 1x when the agent's work follows the change, about 3x when it follows everything held",
            s.entries - half
        ),
    );
    report.baseline(
        "baseline.bulk_agent_on_disk",
        on_disk as f64 / MIB,
        "MiB",
        "size of the agent's data directory at the end (identity, bundle, cache)",
    );
    report.figure(
        "bulk.agent_write_bytes",
        (io.write_bytes - io0.write_bytes) as f64 / MIB,
        "MiB",
        "baseline.bulk_agent_on_disk",
        None,
        "bytes the agent process wrote to storage over the run (/proc/<pid>/io write_bytes)",
    );
    report.figure(
        "bulk.agent_write_calls_bytes",
        (io.wchar - io0.wchar) as f64 / MIB,
        "MiB",
        "baseline.bulk_agent_on_disk",
        None,
        "bytes the agent process passed to write calls over the run (/proc/<pid>/io wchar: files, sockets, its status lines)",
    );

    let (load_wall, load_cpu) = load.create;
    let (floor_wall, floor_cpu) = floor;
    let entries = s.load_entries as f64;
    report.baseline(
        "baseline.sqlite_batch_insert_rate",
        entries / floor_wall,
        "rows/s",
        &format!(
            "{} plain SQLite inserts of the same rows through sqlx, {} to a transaction, the store's pragmas (WAL, synchronous=FULL), in the load generator",
            s.load_entries, s.batch
        ),
    );
    report.baseline(
        "baseline.sqlite_batch_insert_cpu",
        floor_cpu / entries * 1e6,
        "us",
        "CPU per row of those inserts (the load generator's process)",
    );
    report.figure(
        "bulk.load_rate",
        entries / load_wall,
        "entries/s",
        "baseline.sqlite_batch_insert_rate",
        Some(Budget::Min(BULK_LOAD_TARGET)),
        &format!(
            "{} more entries in BatchCreateEntry calls of {}, {} in flight, for an agent that never connects (registry of {} already), each call acknowledged once the index holds it",
            s.load_entries, s.batch, s.in_flight, s.entries + BASELINE_BATCHES * s.batch
        ),
    );
    report.figure(
        "bulk.load_server_cpu",
        load_cpu / entries * 1e6,
        "us",
        "baseline.sqlite_batch_insert_cpu",
        None,
        "server CPU per entry over those calls: gRPC, checks, one store transaction per call, the index",
    );
    for (kind, call, (wall, cpu)) in [
        ("update", "BatchUpdateEntry", load.update),
        ("delete", "BatchDeleteEntry", load.delete),
    ] {
        report.figure(
            &format!("bulk.{kind}_rate"),
            entries / wall,
            "entries/s",
            "baseline.sqlite_batch_insert_rate",
            None,
            &format!(
                "the same {} entries again, in {call} calls of {}, {} in flight, each call acknowledged once the index holds it",
                s.load_entries, s.batch, s.in_flight
            ),
        );
        report.figure(
            &format!("bulk.{kind}_server_cpu"),
            cpu / entries * 1e6,
            "us",
            "baseline.sqlite_batch_insert_cpu",
            None,
            &format!("server CPU per entry over those {call} calls"),
        );
    }
    Ok(())
}
