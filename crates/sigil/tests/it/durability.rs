//! Durability under SIGKILL, with the `sigil` binary as child processes:
//! what the server acknowledged is in its database after a crash at any
//! moment, and an agent killed mid-flight restarts from its own files,
//! serving the same SVID without the server and keeping its identity.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::procs::{
    START, ServerBin, agent_connected, create_entry, create_entry_for_me, fetch_svid,
    list_entry_ids, server_and_agent, wait_for_svid_of, wait_until,
};

/// A small deterministic generator (SplitMix64), so a failing run can be
/// replayed with `SIGIL_TEST_SEED`.
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded from `SIGIL_TEST_SEED` or the clock; prints the seed.
    pub(crate) fn from_env(test: &str) -> Self {
        let seed = std::env::var("SIGIL_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{test}: SIGIL_TEST_SEED={seed}");
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A duration uniformly in `lo..hi` milliseconds.
    pub(crate) fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_admin_writes_survive_sigkill_of_the_server() {
    const CYCLES: usize = 5;
    const WRITERS: usize = 3;
    let mut rng = Rng::from_env("acknowledged_admin_writes_survive_sigkill_of_the_server");
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerBin::new(dir.path(), "");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    for cycle in 0..=CYCLES {
        server.start().await;
        // Everything acknowledged before any earlier crash is there, and the
        // database opened (the server is ready).
        let mut admin = server.admin().await;
        let held: BTreeSet<String> = list_entry_ids(&mut admin).await.into_iter().collect();
        let want = acked.lock().unwrap().clone();
        let lost: Vec<_> = want.iter().filter(|id| !held.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "cycle {cycle}: {} of {} acknowledged entries lost after SIGKILL: {lost:?}",
            lost.len(),
            want.len()
        );
        if cycle == CYCLES {
            break;
        }

        // Writers create entries as fast as the server acknowledges them,
        // until the server dies under them.
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut admin = server.admin().await;
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                for n in 0.. {
                    let r = create_entry(
                        &mut admin,
                        &format!("spiffe://example.org/durable/{cycle}/{w}/{n}"),
                        "spiffe://example.org/node",
                        &[format!("unix:uid:{}", 100_000 + n)],
                        "",
                    )
                    .await;
                    match r {
                        Ok(id) => acked.lock().unwrap().push(id),
                        Err(_) => return n,
                    }
                }
                unreachable!()
            }));
        }
        let before = acked.lock().unwrap().len();
        tokio::time::sleep(rng.millis(150, 700)).await;
        server.kill9();
        for w in writers {
            tokio::time::timeout(START, w)
                .await
                .expect("writers stop once the server is gone")
                .unwrap();
        }
        let written = acked.lock().unwrap().len() - before;
        println!("cycle {cycle}: {written} writes acknowledged before SIGKILL");
        assert!(
            written > 0,
            "cycle {cycle}: the server acknowledged no write"
        );
    }
    assert!(server.stop(), "clean exit:\n{}", server.log());
}

/// Asserts every file under `dir` is 0600 and every directory 0700.
fn assert_private_tree(dir: &Path) {
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", dir.display());
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            assert_private_tree(&e.path());
        } else {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", e.path().display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_state_survives_sigkill_and_restart_without_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, mut agent, agent_id) = server_and_agent(dir.path(), "").await;
    let mut admin = server.admin().await;
    create_entry_for_me(
        &mut admin,
        "spiffe://example.org/durable-workload",
        &agent_id,
    )
    .await;
    let uri = agent.uri();
    let before = wait_until(START, "the workload's SVID", || fetch_svid(&uri)).await;
    assert_eq!(
        before.spiffe_id().to_string(),
        "spiffe://example.org/durable-workload"
    );
    // The agent writes its cache after it serves it; give the write a moment
    // to land (kill -9 may still hit it; what must hold is that the agent
    // comes back with whatever it had durably written).
    // The cache is cache.json plus its journal; read it as the agent does.
    let cache = sigil_agent::persist::Persist::open(&agent.data_dir).unwrap();
    wait_until(START, "the SVID in the agent's cache files", || async {
        let cached = cache.load_cache(std::time::SystemTime::now()).ok()?;
        (cached.svids.len() == 1).then_some(())
    })
    .await;

    agent.kill9();
    assert_private_tree(&agent.data_dir);
    assert!(server.stop(), "clean exit:\n{}", server.log());

    // No server, no token: the agent starts from its files and serves the
    // very same SVID.
    agent.start(None).await;
    let after = wait_until(START, "the cached SVID", || fetch_svid(&uri)).await;
    assert_eq!(
        after.leaf().as_bytes(),
        before.leaf().as_bytes(),
        "the cached SVID is served after SIGKILL, without the server:\n{}",
        agent.log()
    );
    assert_eq!(
        after.private_key().as_ref(),
        before.private_key().as_ref(),
        "with its key"
    );
    assert_eq!(
        agent_connected(agent.health).await,
        Some(false),
        "the agent reports that it serves from its cache"
    );

    // The server comes back: the agent reconnects on its own, as the same
    // agent (no new attestation: the server still knows exactly one).
    server.start().await;
    wait_until(START, "the agent to report connected", || async {
        agent_connected(agent.health).await.filter(|c| *c)
    })
    .await;
    let rec = wait_until(START, "the agent to reconnect", || async {
        server.agent(&agent_id).await.filter(|a| a.connected)
    })
    .await;
    assert_eq!(rec.spiffe_id, agent_id);
    let all = server.agents().await.expect("the server lists its agents");
    assert_eq!(all.len(), 1, "no second agent was attested: {all:?}");
    let mut admin = server.admin().await;
    create_entry_for_me(&mut admin, "spiffe://example.org/after-comeback", &agent_id).await;
    wait_for_svid_of(
        &uri,
        "spiffe://example.org/after-comeback",
        "the new entry's SVID at the agent",
    )
    .await;
    assert_private_tree(&agent.data_dir);
    agent.kill9();
    server.kill9();
}

/// Issue #13: the agent SIGKILLed at random moments while its own SVID
/// renews every second or two. Each time it restarts from its files, without
/// a join token, serves the workload's SVID and reconnects as the same agent:
/// no kill leaves a key beside a chain it does not belong to. (Replay a
/// failing run with the printed `SIGIL_TEST_SEED`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_at_random_moments_during_renewals_restarts_by_itself() {
    const KILLS: usize = 20;
    const WORKLOAD: &str = "spiffe://example.org/kill-loop";
    let mut rng =
        Rng::from_env("agent_killed_at_random_moments_during_renewals_restarts_by_itself");
    let dir = tempfile::tempdir().unwrap();
    // The agent renews at 40-60% of its SVID's 10 s: kills up to 6 s after
    // it is back land before, during and after renewals. The SVID on disk
    // then has at least some 3 s left (4 s, less up to 1 s that `notAfter`'s
    // whole seconds cut), far more than a restart takes. With 4 s, as
    // before, as little as 0.6 s could be left, a restart on a loaded
    // machine outlived it, and the agent rightly refused to start from an
    // expired SVID.
    let (server, mut agent, agent_id) =
        server_and_agent(dir.path(), "agent_svid_ttl = \"10s\"").await;
    let mut admin = server.admin().await;
    create_entry_for_me(&mut admin, WORKLOAD, &agent_id).await;
    let uri = agent.uri();
    for kill in 0..=KILLS {
        wait_for_svid_of(
            &uri,
            WORKLOAD,
            &format!("the workload's SVID after {kill} kills"),
        )
        .await;
        wait_until(
            START,
            &format!("the agent to reconnect after {kill} kills"),
            || async { agent_connected(agent.health).await.filter(|c| *c) },
        )
        .await;
        if kill == KILLS {
            break;
        }
        tokio::time::sleep(rng.millis(0, 6000)).await;
        agent.kill9();
        assert_private_tree(&agent.data_dir);
        // No join token: the agent must find a whole identity on disk.
        agent.start(None).await;
    }

    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    let renewals = log.matches("agent SVID renewed").count();
    assert!(
        renewals >= KILLS / 2,
        "only {renewals} renewals happened around {KILLS} kills: the kills did not cover renewals"
    );
    assert_eq!(
        log.matches("restored the agent SVID from disk").count(),
        KILLS,
        "every restart used the saved identity"
    );
    let rec = wait_until(START, "the agent at the server", || async {
        server.agent(&agent_id).await.filter(|a| a.connected)
    })
    .await;
    assert_eq!(rec.spiffe_id, agent_id);
    let all = server.agents().await.expect("the server lists its agents");
    assert_eq!(all.len(), 1, "the agent never attested again: {all:?}");
    println!("{KILLS} kills, {renewals} renewals");
}

/// An agent of an earlier version kept its SVID and key in two files,
/// `agent.json` and `agent.key`: upgraded, it starts from them without a
/// join token, as the same agent, and its next renewal replaces them with
/// the one file `identity.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_saved_as_two_files_restarts_and_moves_to_one_file() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use sigil_svid::keys::{PrivateKey, write_private_file};

    const WORKLOAD: &str = "spiffe://example.org/upgraded";
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agent, agent_id) =
        server_and_agent(dir.path(), "agent_svid_ttl = \"6s\"").await;
    let mut admin = server.admin().await;
    create_entry_for_me(&mut admin, WORKLOAD, &agent_id).await;
    let uri = agent.uri();
    wait_for_svid_of(&uri, WORKLOAD, "the workload's SVID").await;
    agent.kill9();

    // Rewrite the saved identity in the layout of earlier versions.
    let data = agent.data_dir.clone();
    let one = data.join("identity.json");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&one).unwrap()).unwrap();
    let key = STANDARD.decode(saved["key"].as_str().unwrap()).unwrap();
    let key = PrivateKey::from_pkcs8_der(&key).unwrap();
    write_private_file(&data.join("agent.key"), key.to_pem().as_bytes()).unwrap();
    let chain = serde_json::json!({ "chain": saved["chain"] });
    write_private_file(&data.join("agent.json"), chain.to_string().as_bytes()).unwrap();
    std::fs::remove_file(&one).unwrap();

    agent.start(None).await;
    wait_for_svid_of(&uri, WORKLOAD, "the workload's SVID after the upgrade").await;
    wait_until(START, "identity.json in place of the two files", || async {
        (one.exists() && !data.join("agent.key").exists() && !data.join("agent.json").exists())
            .then_some(())
    })
    .await;
    assert_private_tree(&data);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert_eq!(
        log.matches("restored the agent SVID from disk").count(),
        1,
        "the upgraded agent started from the two files:\n{}",
        agent.log()
    );
    wait_until(
        START,
        "the agent to reconnect after its renewal",
        || async { server.agent(&agent_id).await.filter(|a| a.connected) },
    )
    .await;
    let all = server.agents().await.expect("the server lists its agents");
    assert_eq!(all.len(), 1, "the agent never attested again: {all:?}");

    // And it restarts from the new file.
    agent.kill9();
    agent.start(None).await;
    wait_for_svid_of(&uri, WORKLOAD, "the workload's SVID from identity.json").await;
}
