//! Paged sync end to end: a server and an agent process, the agent
//! authorized for a set several times larger than a sync page. Its
//! workloads get SVIDs for entries of the last page, it syncs once instead
//! of reconnecting in a loop, its memory stays modest, and a restart that
//! needs the whole set again works too.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use sigil_proto::server::v1 as pb;

use crate::procs::{self, AgentBin, START, http_get, wait_until};

/// Entries that no workload matches, each about 66 KiB on the wire (64
/// selectors near their 1 KiB cap): 240 of them make about 15.8 MB, over
/// three times the 4 MiB page.
const BIG_ENTRIES: usize = 240;
/// Per admin request: 50 big entries stay under its 4 MiB request limit.
const BATCH: usize = 50;
/// How much of the agent's resident memory, at its peak, counts as normal
/// for a set of this size: a few copies of 16 MB, not a reconnect loop's
/// growth.
const MAX_AGENT_PEAK_RSS_KB: u64 = 400 * 1024;

/// A counter or gauge from a `/metrics` page.
async fn metric(health: SocketAddr, name: &str) -> Option<f64> {
    let (code, body) = http_get(health, "/metrics").await?;
    if code != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A big entry under `parent`: 64 selectors of 1024 bytes, one of them a
/// uid nobody runs as.
fn big_entry(n: usize, parent: &str) -> pb::Entry {
    let mut selectors = vec!["unix:uid:4000000000".to_owned()];
    for k in 0..63 {
        let head = format!("k8s:pod-label:n{n:04}-k{k:02}:");
        selectors.push(format!("{head}{}", "v".repeat(1024 - head.len())));
    }
    pb::Entry {
        id: format!("big-{n:04}"),
        spiffe_id: format!("spiffe://example.org/big/{n}"),
        parent_id: parent.to_owned(),
        selectors,
        ..Default::default()
    }
}

/// Creates `entries` in one admin request; panics on any refusal.
async fn create_all(
    admin: &mut pb::admin_api_client::AdminApiClient<tonic::transport::Channel>,
    entries: Vec<pb::Entry>,
) {
    let r = admin
        .batch_create_entry(pb::BatchCreateEntryRequest { entries })
        .await
        .unwrap()
        .into_inner();
    for res in r.results {
        assert!(res.error.is_empty(), "{}", res.error);
    }
}

/// The agent's peak resident memory (VmHWM) in KiB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits until the Workload API at `uri` serves exactly `want` (SPIFFE IDs).
async fn wait_for_svids(uri: &str, want: &BTreeSet<String>, what: &str) {
    wait_until(START * 3, what, || async {
        let c = spiffe::WorkloadApiClient::connect_to(uri).await.ok()?;
        let svids = c.fetch_all_x509_svids().await.ok()?;
        let got: BTreeSet<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
        (got == *want).then_some(())
    })
    .await;
}

/// How often the agent's log says it connected, and whether it mentions a
/// broken or refused sync.
fn connections(agent_log: &std::path::Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(agent_log).unwrap_or_default();
    let connected = text.matches("connected to a server").count();
    let trouble = text
        .lines()
        .filter(|l| {
            l.contains("sync stream broke")
                || l.contains("refusing the server's sync update")
                || l.contains("inside an update")
        })
        .map(str::to_owned)
        .collect();
    (connected, trouble)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorized_set_of_several_pages_reaches_the_workloads() {
    crate::init();
    let dir = tempfile::tempdir().unwrap();
    // The agent's entries are registered before it first syncs, so that
    // its first update is one snapshot of the whole set.
    let mut server = procs::ServerBin::new(dir.path(), "");
    server.start().await;
    let (token, agent_id) = server.join_token().await;
    let mut admin = server.admin().await;
    let big: Vec<pb::Entry> = (0..BIG_ENTRIES).map(|n| big_entry(n, &agent_id)).collect();
    for chunk in big.chunks(BATCH) {
        create_all(&mut admin, chunk.to_vec()).await;
    }
    // Entries are paged in ID order: "zz-" puts these three on the last page.
    let uid = nix::unistd::getuid();
    let mine: Vec<pb::Entry> = (1..=3)
        .map(|n| pb::Entry {
            id: format!("zz-mine-{n}"),
            spiffe_id: format!("spiffe://example.org/mine/{n}"),
            parent_id: agent_id.clone(),
            selectors: vec![format!("unix:uid:{uid}")],
            ..Default::default()
        })
        .collect();
    let want: BTreeSet<String> = mine.iter().map(|e| e.spiffe_id.clone()).collect();
    create_all(&mut admin, mine).await;

    let mut agent = AgentBin::new(
        dir.path(),
        &server.api.to_string(),
        sigil_testkit::free_addr().unwrap(),
    );
    let agent_log = dir.path().join("agent.log");
    let started = std::time::Instant::now();
    agent.start(Some(&token)).await;
    wait_for_svids(&agent.uri(), &want, "SVIDs of the entries on the last page").await;
    let first_sync = started.elapsed();

    // Every entry arrived, not only the last page's: the agent holds an
    // SVID for each.
    let total = (BIG_ENTRIES + 3) as f64;
    wait_until(START * 3, "an SVID for every entry of the set", || async {
        (metric(agent.health, "sigil_agent_cached_svids").await? == total).then_some(())
    })
    .await;
    let pages = metric(server.health, "sigil_server_sync_pages_total")
        .await
        .unwrap();
    let updates = metric(server.health, "sigil_server_sync_messages_total")
        .await
        .unwrap();
    assert!(pages >= 4.0, "{pages} pages for {updates} updates");
    // No reconnect loop: one connection, no broken or refused stream, and
    // still connected a while later (a loop would reconnect within it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (connected, trouble) = connections(&agent_log);
    assert_eq!(connected, 1, "{}", agent.log());
    assert!(trouble.is_empty(), "{trouble:?}");
    assert_eq!(procs::server_sync_streams(server.health).await, Some(1));
    assert_eq!(procs::agent_connected(agent.health).await, Some(true));
    let pid = agent.pid().unwrap();
    let peak = peak_rss_kb(pid);
    assert!(peak < MAX_AGENT_PEAK_RSS_KB, "agent peak RSS {peak} kB");
    println!(
        "paged sync: {pages} pages, {updates} updates, first SVIDs after {first_sync:?}, agent peak RSS {peak} kB"
    );

    // A restart that needs the whole set again (its cache gone) pages it
    // again and serves the same SVIDs.
    agent.kill9();
    std::fs::remove_file(agent.data_dir.join("cache.json")).unwrap();
    agent.start(None).await;
    wait_for_svids(&agent.uri(), &want, "SVIDs after the restart").await;
    wait_until(START * 3, "every SVID after the restart", || async {
        (metric(agent.health, "sigil_agent_cached_svids").await? == total).then_some(())
    })
    .await;
    let again = metric(server.health, "sigil_server_sync_pages_total")
        .await
        .unwrap();
    assert!(again >= pages + 4.0, "{again} pages after {pages}");
    let (connected, trouble) = connections(&agent_log);
    assert_eq!(connected, 2, "{}", agent.log());
    assert!(trouble.is_empty(), "{trouble:?}");
}
