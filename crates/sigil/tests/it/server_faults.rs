//! Faults on the server side, with the `sigil` binary as child processes: a
//! server of two that goes silent (its packets dropped, its sockets left
//! open) while workloads do mutual TLS; SIGKILL in the middle of CA rotation,
//! automatic or forced; a CA that expires while its server is down; SVID
//! lifetimes longer than the signing authority's remaining life; and agents
//! whose clock is off by minutes.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use sigil_proto::server::v1 as pb;
use sigil_svid::x509::{sha256_hex, verify_svid};
use sigil_testkit::free_addr;
use sigil_testkit::postgres::PrivatePostgres;

use crate::durability::Rng;
use crate::faults::{Pair, ip, register_pairs, serial_and_expiry};
use crate::procs::{
    AgentBin, START, ServerBin, create_entry, server_and_agent, server_sync_streams, wait_until,
};

/// How soon an agent syncs with another server after its server went
/// silent (docs/operations.md, "High availability"): HTTP/2 keepalive
/// notices after at most 10 s without a frame plus 5 s for the unanswered
/// ping, the reconnection waits its backoff (at most 0.5 s), and the silent
/// address, tried first, gets its 3 s connect timeout.
const SILENT_FAILOVER: Duration = Duration::from_secs(20);

/// A network namespace for an agent, with one veth link per server, named
/// uniquely for this run; deleted (links included) when dropped. Link `i`
/// is 10.204.N.(4i+1) on the root side (where server `i` listens) and
/// 10.204.N.(4i+2) in the namespace. Taking a link down on the root side
/// drops every packet between the agent and that server, and nothing closes
/// a socket.
struct AgentNetns {
    name: String,
    links: Vec<String>,
    net: u8,
}

impl AgentNetns {
    /// `None` (after saying why) when this process cannot create one.
    fn create(test: &str, links: usize) -> Option<Self> {
        let (name, tag) = crate::faults::add_netns(test, "sigil-silent")?;
        let mut ns = Self {
            name,
            links: Vec::new(),
            net: (std::process::id() % 250) as u8,
        };
        let n = ns.net;
        for i in 0..links {
            let root = format!("sgs{i}{tag}");
            let peer = format!("srv{i}");
            ip(&[
                "link",
                "add",
                &root,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{root}p"),
            ]);
            ns.links.push(root.clone());
            ip(&["link", "set", &format!("{root}p"), "netns", &ns.name]);
            ip(&[
                "-n",
                &ns.name,
                "link",
                "set",
                &format!("{root}p"),
                "name",
                &peer,
            ]);
            let base = 4 * i as u8;
            ip(&[
                "addr",
                "add",
                &format!("10.204.{n}.{}/30", base + 1),
                "dev",
                &root,
            ]);
            ip(&["link", "set", &root, "up"]);
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("10.204.{n}.{}/30", base + 2),
                "dev",
                &peer,
            ]);
            ip(&["-n", &ns.name, "link", "set", &peer, "up"]);
        }
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// The root-side address of link `i`, where server `i` listens.
    fn server_ip(&self, i: usize) -> IpAddr {
        IpAddr::from([10, 204, self.net, 4 * i as u8 + 1])
    }
}

impl Drop for AgentNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        for l in &self.links {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", l])
                .output();
        }
    }
}

/// Every authority `server` lists, from its admin API.
async fn authorities(server: &ServerBin) -> Vec<pb::Authority> {
    server
        .admin()
        .await
        .list_authorities(pb::ListAuthoritiesRequest {})
        .await
        .unwrap_or_else(|e| panic!("listing authorities: {e}\n{}", server.log()))
        .into_inner()
        .authorities
}

/// The DER of this server's active X.509 authority, found in `bundle` by the
/// SHA-256 the authority list names.
async fn active_x509_der(server: &ServerBin, bundle: &[Vec<u8>]) -> Vec<u8> {
    let list = authorities(server).await;
    let active = list
        .iter()
        .find(|a| a.local && a.kind == "x509" && a.state == "active")
        .unwrap_or_else(|| panic!("no active X.509 authority: {list:?}"));
    bundle
        .iter()
        .find(|c| sha256_hex(c) == active.public_key_id)
        .unwrap_or_else(|| panic!("the active CA {} is not in the bundle", active.id))
        .clone()
}

/// The X.509 authorities of the bundle `server` serves (GetBundle on its
/// admin API, the bundle every agent receives).
async fn served_x509_bundle(server: &ServerBin) -> Vec<Vec<u8>> {
    let r = server
        .admin()
        .await
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap_or_else(|e| panic!("GetBundle: {e}\n{}", server.log()))
        .into_inner();
    sigil_svid::bundle::Bundle::from_json(
        sigil_types::TrustDomain::new("example.org").unwrap(),
        &r.bundle_json,
    )
    .unwrap()
    .x509_authorities
}

/// Every X509-SVID the agent at `uri` serves to this process, as DER chains.
async fn served_chains(uri: &str) -> Option<Vec<Vec<Vec<u8>>>> {
    let c = spiffe::WorkloadApiClient::connect_to(uri).await.ok()?;
    let svids = c.fetch_all_x509_svids().await.ok()?;
    Some(
        svids
            .iter()
            .map(|s| {
                s.cert_chain()
                    .iter()
                    .map(|c| c.as_bytes().to_vec())
                    .collect()
            })
            .collect(),
    )
}

/// Two `sigil server` processes on one PostgreSQL database; an agent process
/// (in a network namespace of its own) lists both, and workloads do mutual
/// TLS with short-lived SVIDs. The server the agent syncs with goes silent:
/// every packet between them is dropped, and neither process closes a
/// socket. The agent moves to the other server within the documented bound,
/// renewal continues there, and no mutual-TLS exchange fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_left_within_the_bound_and_mtls_never_fails() {
    const TEST: &str = "a_silent_server_is_left_within_the_bound_and_mtls_never_fails";
    const PAIRS: usize = 2;
    // The SVID renewed just before the silence (at 40-60% of its life) must
    // outlive the failover: 40% of 80 s is 32 s, above SILENT_FAILOVER.
    const SVID_TTL: Duration = Duration::from_secs(80);
    let Some(ns) = AgentNetns::create(TEST, 2) else {
        return;
    };
    let Some(pg) = PrivatePostgres::start_or_skip(TEST).unwrap() else {
        return;
    };
    crate::init();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "default_x509_svid_ttl = \"{}s\"\n[server.store]\ndriver = \"postgres\"\nurl = \"{}\"",
        SVID_TTL.as_secs(),
        pg.url()
    );
    let mut servers = Vec::new();
    for i in 0..2 {
        let d = dir.path().join(format!("s{i}"));
        std::fs::create_dir(&d).unwrap();
        let bind = SocketAddr::new(ns.server_ip(i), free_addr().unwrap().port());
        let mut s = ServerBin::with_bind(&d, bind, &extra);
        s.start().await;
        servers.push(s);
    }
    let (token, agent_id) = servers[0].join_token().await;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir(&agent_dir).unwrap();
    // Its health listener is on the namespace's loopback; the test watches
    // the servers' stream gauges instead.
    let health = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), free_addr().unwrap().port());
    let mut agent = AgentBin::with_servers(&agent_dir, &[servers[0].api, servers[1].api], health)
        .wrapped(&["ip", "netns", "exec", &ns.name]);
    agent.start(Some(&token)).await;
    register_pairs(&servers[1], &agent, &agent_id, PAIRS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut pairs = Vec::new();
    for i in 0..PAIRS {
        pairs.push(Pair::start(&agent.uri(), i, stop.clone()).await);
    }
    let syncing = |i: usize| {
        let health = servers[i].health;
        async move { server_sync_streams(health).await == Some(1) }
    };
    let silent = wait_until(START, "the agent syncing with one server", || async {
        if syncing(0).await {
            Some(0)
        } else if syncing(1).await {
            Some(1)
        } else {
            None
        }
    })
    .await;
    let other = 1 - silent;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Silence: the link to that server loses its carrier; the server process
    // runs on (still on the database), its sockets open.
    let leaf_serials = |chains: Vec<Vec<Vec<u8>>>| {
        chains
            .into_iter()
            .map(|c| serial_and_expiry(&c[0]).0)
            .collect::<Vec<_>>()
    };
    let mut before: BTreeSet<Vec<u8>> = leaf_serials(served_chains(&agent.uri()).await.unwrap())
        .into_iter()
        .collect();
    ip(&["link", "set", &ns.links[silent], "down"]);
    let cut = std::time::Instant::now();
    // Whatever the silent server signed reached the agent before the cut:
    // every SVID held now counts as from before.
    before.extend(pairs.iter().flat_map(|p| p.serials()));
    before.extend(leaf_serials(served_chains(&agent.uri()).await.unwrap()));
    let other_health = servers[other].health;
    wait_until(
        Duration::from_secs(90),
        "the agent syncing with the other server",
        || async { (server_sync_streams(other_health).await == Some(1)).then_some(()) },
    )
    .await;
    let took = cut.elapsed();
    println!("failover from a silent server took {took:?}");
    assert!(
        took <= SILENT_FAILOVER,
        "failover from a silent server took {took:?}, more than the documented \
         {SILENT_FAILOVER:?}\nagent:\n{}",
        agent.log()
    );
    servers[silent].assert_running();

    // Renewal continues through the other server: every workload presents
    // a new SVID, signed by that server's own CA.
    wait_until(
        SVID_TTL,
        "a renewed SVID in every pair after failover",
        || async {
            pairs
                .iter()
                .all(|p| p.serials().iter().any(|s| !before.contains(s)))
                .then_some(())
        },
    )
    .await;
    let bundle = served_x509_bundle(&servers[other]).await;
    let other_ca = active_x509_der(&servers[other], &bundle).await;
    let chains = served_chains(&agent.uri()).await.unwrap();
    let renewed: Vec<_> = chains
        .iter()
        .filter(|c| !before.contains(&serial_and_expiry(&c[0]).0))
        .collect();
    assert!(!renewed.is_empty(), "no SVID renewed after the failover");
    for chain in renewed {
        verify_svid(chain, std::slice::from_ref(&other_ca), SystemTime::now())
            .expect("an SVID renewed after failover is signed by the other server's CA");
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for (i, p) in pairs.into_iter().enumerate() {
        let (ok, failed, serials, errors) = p.finish().await;
        println!("pair {i}: {ok} exchanges, {failed} failures, {serials} client SVIDs");
        assert_eq!(failed, 0, "pair {i}: {errors:?}\n{}", agent.log());
        assert!(ok > 0, "pair {i} completed no exchange");
    }
    let agents = servers[other].agents().await.expect("the agent list");
    assert_eq!(agents.len(), 1, "no second attestation: {agents:?}");
    agent.kill9();
}

/// The authorities of `kind` in `state` that `list` marks as the answering
/// server's own.
fn own<'a>(list: &'a [pb::Authority], kind: &str, state: &str) -> Vec<&'a pb::Authority> {
    list.iter()
        .filter(|a| a.local && a.kind == kind && a.state == state)
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// What must hold whenever a server has come back, whatever moment it was
/// killed at: one active authority of each kind, valid now; every SVID the
/// agent holds (its own and its workloads') verifies against the bundle the
/// server serves; and the authority that signed each one is in the journal
/// with its key file still on disk. Returns the IDs of the signing
/// authorities.
async fn check_after_restart(
    server: &ServerBin,
    keys: &Path,
    agent: &AgentBin,
    round: usize,
) -> BTreeSet<String> {
    let list = authorities(server).await;
    for kind in ["x509", "jwt"] {
        let active = own(&list, kind, "active");
        assert_eq!(
            active.len(),
            1,
            "round {round}: one active {kind} authority: {list:#?}\n{}",
            server.log()
        );
        assert!(
            active[0].not_after > unix_now(),
            "round {round}: the active {kind} authority has expired"
        );
        assert!(own(&list, kind, "prepared").len() <= 1, "{list:#?}");
    }
    // Before the next kill, the agent syncs with the restarted server: it
    // trusts the certificate the server now serves (signed by an authority
    // the agent received while it was prepared), and the outages of
    // successive rounds do not add up, from the agent's side, to more than
    // the life of its own SVID, which the product does not survive
    // (operations.md, "Recovery after a long outage"). Within its
    // reconnection bound: 30 s, or before its own SVID expires.
    let health = agent.health;
    within_reconnection_bound(
        server,
        agent,
        round,
        "the agent did not reconnect",
        || async { (crate::procs::agent_connected(health).await == Some(true)).then_some(()) },
    )
    .await;
    // An SVID signed in the last seconds of a CA's life ends with the CA,
    // so the agent may be between one and the next when the server was down
    // right then. It serves one again once it has reconnected and signed.
    let uri = agent.uri();
    let mut chains =
        within_reconnection_bound(server, agent, round, "the agent serves no SVID", || async {
            served_chains(&uri).await.filter(|c| !c.is_empty())
        })
        .await;
    let bundle = served_x509_bundle(server).await;
    let identity = sigil_agent::persist::Persist::open(&agent.data_dir)
        .unwrap()
        .load_identity()
        .unwrap()
        .expect("the agent's own SVID");
    chains.push(identity.chain);
    let now = SystemTime::now();
    let mut signers = BTreeSet::new();
    for chain in &chains {
        verify_svid(chain, &bundle, now).unwrap_or_else(|e| {
            panic!(
                "round {round}: an SVID the agent holds does not verify against the served \
                 bundle: {e}\n{}",
                server.log()
            )
        });
        let ca = bundle
            .iter()
            .find(|c| verify_svid(chain, std::slice::from_ref(*c), now).is_ok())
            .unwrap();
        let fingerprint = sha256_hex(ca);
        let authority = list
            .iter()
            .find(|a| a.kind == "x509" && a.public_key_id == fingerprint)
            .unwrap_or_else(|| {
                panic!("round {round}: the CA of a valid SVID is not in the journal: {list:#?}")
            });
        assert!(
            keys.join(format!("{}.key", authority.id)).exists(),
            "round {round}: the key of {}, which signed a valid SVID, is gone",
            authority.id
        );
        signers.insert(authority.id.clone());
    }
    signers
}

/// Polls `check` every 100 ms until it yields a value; after the agent's
/// longest reconnection backoff (30 s, after the failures of the earlier
/// rounds; operations.md: "agents reconnect within 30 s") plus the time to
/// start and sign, panics with `what` and both logs.
async fn within_reconnection_bound<T, F, Fut>(
    server: &ServerBin,
    agent: &AgentBin,
    round: usize,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30) + START;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "round {round}: {what}\nagent:\n{}\nserver:\n{}",
            agent.log(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One forced rotation step through the admin API, chosen by the state
/// (prepare, activate, or taint a retired authority), for `kind`.
async fn forced_step(server: &ServerBin, kind: &str) -> (&'static str, pb::AuthorityRequest) {
    let list = authorities(server).await;
    let retired: Vec<_> = own(&list, kind, "retired")
        .into_iter()
        .filter(|a| !a.tainted)
        .collect();
    let req = |id: &str| pb::AuthorityRequest {
        kind: kind.to_owned(),
        id: id.to_owned(),
    };
    if let Some(r) = retired.first() {
        ("taint", req(&r.id))
    } else if own(&list, kind, "prepared").is_empty() {
        ("prepare", req(""))
    } else {
        ("activate", req(""))
    }
}

/// The server is SIGKILLed at random moments while its CA rotates: during
/// automatic rotation (two-minute CAs), right after a forced prepare,
/// activate or taint was sent, and while it starts (when it catches up with
/// the rotation schedule). After every restart it must come up by itself,
/// have the agent (a join-token agent whose own SVID lives 30 s, less than
/// its longest reconnection backoff) connected again before the next kill,
/// serve a bundle that verifies everything the agent holds, have lost no
/// key that signed something still valid, and keep exactly one active
/// authority per kind; and rotation goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_ca_rotation_loses_nothing_and_rotation_goes_on() {
    const TEST: &str = "sigkill_during_ca_rotation_loses_nothing_and_rotation_goes_on";
    const ROUNDS: usize = 14;
    let mut rng = Rng::from_env(TEST);
    let dir = tempfile::tempdir().unwrap();
    let (mut server, agent, agent_id) = server_and_agent(
        dir.path(),
        "ca_ttl = \"2m\"\ndefault_x509_svid_ttl = \"20s\"\nagent_svid_ttl = \"30s\"",
    )
    .await;
    let keys = dir.path().join("server/keys");
    let mut admin = server.admin().await;
    let uid = nix::unistd::getuid();
    create_entry(
        &mut admin,
        "spiffe://example.org/rotating",
        &agent_id,
        &[format!("unix:uid:{uid}")],
        "",
    )
    .await
    .unwrap();
    let uri = agent.uri();
    wait_until(START, "the workload's SVID", || async {
        served_chains(&uri).await.filter(|c| !c.is_empty())
    })
    .await;

    let mut signers = check_after_restart(&server, &keys, &agent, 0).await;
    let mut seen_x509: BTreeSet<String> = BTreeSet::new();
    for round in 1..=ROUNDS {
        let how = match round % 3 {
            0 => {
                let wait = rng.millis(500, 5000);
                tokio::time::sleep(wait).await;
                server.kill9();
                format!("after {wait:?}")
            }
            1 => {
                let kind = if rng.next().is_multiple_of(3) {
                    "jwt"
                } else {
                    "x509"
                };
                let (op, req) = forced_step(&server, kind).await;
                let mut admin = server.admin().await;
                let call = tokio::spawn(async move {
                    match op {
                        "prepare" => admin.prepare_authority(req).await,
                        "activate" => admin.activate_authority(req).await,
                        _ => admin.taint_authority(req).await,
                    }
                });
                let wait = rng.millis(0, 40);
                tokio::time::sleep(wait).await;
                server.kill9();
                let answered = call.await.unwrap().is_ok();
                format!("{wait:?} into a forced {kind} {op} (answered: {answered})")
            }
            _ => {
                server.kill9();
                server.spawn();
                let wait = rng.millis(20, 600);
                tokio::time::sleep(wait).await;
                server.kill9();
                format!("{wait:?} into a start")
            }
        };
        tokio::time::sleep(rng.millis(100, 1000)).await;
        server.start().await;
        println!("round {round}: killed {how}; back");
        signers.extend(check_after_restart(&server, &keys, &agent, round).await);
        for a in authorities(&server).await {
            if a.local && a.kind == "x509" {
                seen_x509.insert(a.id);
            }
        }
    }

    // Rotation goes on by itself: the active X.509 authority is replaced on
    // schedule (at 5/6 of a two-minute life, checked every 10 s), and the
    // agent's workload is renewed by the new one.
    let active_id = |list: Vec<pb::Authority>| own(&list, "x509", "active")[0].id.clone();
    let last = active_id(authorities(&server).await);
    let next = wait_until(
        Duration::from_secs(150),
        "an automatic activation after the crashes",
        || async {
            let now = active_id(authorities(&server).await);
            (now != last).then_some(now)
        },
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !signers.contains(&next) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no SVID signed by the newly activated CA {next} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        signers.extend(check_after_restart(&server, &keys, &agent, ROUNDS + 1).await);
    }
    seen_x509.insert(next);
    println!(
        "{} X.509 authorities over the run; {} of them signed what the agent held",
        seen_x509.len(),
        signers.len()
    );
    let rec = wait_until(START, "the agent connected", || async {
        server.agent(&agent_id).await.filter(|a| a.connected)
    })
    .await;
    assert!(!rec.banned);
}

/// The server is stopped and stays down past the end of its active CA's
/// life. At restart it replaces the expired authority at once, says so in
/// its log, and the expired one leaves the bundle; an agent attested again
/// (its own SVID died with the CA) gets SVIDs from the new CA that verify
/// against the served bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_expired_while_the_server_was_down_is_replaced_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, mut agent, agent_id) = server_and_agent(
        dir.path(),
        "ca_ttl = \"1m\"\ndefault_x509_svid_ttl = \"20s\"\nagent_svid_ttl = \"30s\"",
    )
    .await;
    let list = authorities(&server).await;
    let old = own(&list, "x509", "active")[0].clone();
    // Down before the successor is prepared (at half of the minute): with a
    // prepared authority still valid, the server would activate that one.
    assert!(own(&list, "x509", "prepared").is_empty(), "{list:#?}");
    let old_der = active_x509_der(&server, &served_x509_bundle(&server).await).await;
    assert!(server.stop(), "a clean stop:\n{}", server.log());
    agent.kill9();
    let wait = (old.not_after + 2 - unix_now()).max(0) as u64;
    println!("waiting {wait} s for the active CA to expire");
    tokio::time::sleep(Duration::from_secs(wait)).await;

    server.start().await;
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("active authority had expired; replaced"),
        "the server says it replaced the expired CA:\n{}",
        server.log()
    );
    let list = authorities(&server).await;
    let new = own(&list, "x509", "active")[0].clone();
    assert_ne!(new.id, old.id);
    assert!(new.not_after > unix_now());
    // The expired one leaves the bundle at the next rotation pass (10 s).
    wait_until(
        Duration::from_secs(30),
        "the expired CA to leave the bundle",
        || async { (!served_x509_bundle(&server).await.contains(&old_der)).then_some(()) },
    )
    .await;

    // The agent's SVID expired with the CA: it is attested again, under a
    // new agent ID, and its entries are made for that ID.
    let (token, new_agent_id) = server.join_token().await;
    assert_ne!(new_agent_id, agent_id);
    agent.start(Some(&token)).await;
    let mut admin = server.admin().await;
    let uid = nix::unistd::getuid();
    create_entry(
        &mut admin,
        "spiffe://example.org/after-expiry",
        &new_agent_id,
        &[format!("unix:uid:{uid}")],
        "",
    )
    .await
    .unwrap();
    let uri = agent.uri();
    let chains = wait_until(START, "an SVID from the new CA", || async {
        served_chains(&uri).await.filter(|c| !c.is_empty())
    })
    .await;
    let bundle = served_x509_bundle(&server).await;
    let new_der = active_x509_der(&server, &bundle).await;
    for chain in &chains {
        verify_svid(chain, &bundle, SystemTime::now()).expect("verifies against the bundle");
        verify_svid(chain, std::slice::from_ref(&new_der), SystemTime::now())
            .expect("signed by the new CA");
    }
    // The workload's own view of the bundle agrees.
    let roots: Vec<Vec<u8>> = spiffe::WorkloadApiClient::connect_to(&uri)
        .await
        .unwrap()
        .fetch_x509_bundles()
        .await
        .unwrap()
        .get(&spiffe::TrustDomain::new("example.org").unwrap())
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert!(roots.contains(&new_der) && !roots.contains(&old_der));
    agent.kill9();
}

/// An entry asking for X.509 and JWT lifetimes of an hour from a server
/// whose authorities live two minutes: the SVID ends with its CA, and the
/// JWT-SVID's `exp` with its signing key, never later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_lifetimes_are_clamped_to_the_signing_authority() {
    const ASKED: i64 = 3600;
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = server_and_agent(
        dir.path(),
        "ca_ttl = \"2m\"\ndefault_x509_svid_ttl = \"30s\"",
    )
    .await;
    let uid = nix::unistd::getuid();
    let r = server
        .admin()
        .await
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![pb::Entry {
                spiffe_id: "spiffe://example.org/long-lived".into(),
                parent_id: agent_id.clone(),
                selectors: vec![format!("unix:uid:{uid}")],
                x509_svid_ttl: ASKED,
                jwt_svid_ttl: ASKED,
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].error.is_empty(), "{:?}", r.results);
    let uri = agent.uri();
    let chains = wait_until(START, "the long-lived entry's SVID", || async {
        served_chains(&uri).await.filter(|c| !c.is_empty())
    })
    .await;
    let bundle = served_x509_bundle(&server).await;
    let ca = active_x509_der(&server, &bundle).await;
    let ca_info = sigil_svid::x509::cert_info(&ca).unwrap();
    let leaf = sigil_svid::x509::cert_info(&chains[0][0]).unwrap();
    verify_svid(&chains[0], std::slice::from_ref(&ca), SystemTime::now()).unwrap();
    assert!(
        leaf.not_after <= ca_info.not_after,
        "the SVID outlives its CA: {:?} > {:?}",
        leaf.not_after,
        ca_info.not_after
    );
    // Clamped, not merely short: it ends exactly with the CA (an hour was asked).
    assert_eq!(leaf.not_after, ca_info.not_after);

    let client = spiffe::WorkloadApiClient::connect_to(&uri).await.unwrap();
    let jwt = client.fetch_jwt_svid(["api"], None).await.unwrap();
    let exp = jwt.expiry().unix_timestamp();
    let list = authorities(&server).await;
    let key = list
        .iter()
        .find(|a| a.kind == "jwt" && a.public_key_id == jwt.key_id())
        .unwrap_or_else(|| panic!("the JWT key {} is not listed: {list:#?}", jwt.key_id()));
    assert_eq!(key.state, "active");
    assert!(
        exp <= key.not_after,
        "the JWT-SVID outlives its key: exp {exp} > {}",
        key.not_after
    );
    assert_eq!(exp, key.not_after, "exp is clamped to the key's end");
    assert!(exp < unix_now() + ASKED - 60);
}

/// The wrapper that runs an agent with its clock moved by `offset`
/// (libfaketime: `+5m`, `-5s`), or `None` (after saying why) without
/// `faketime`. Only the wall clock moves: the monotonic clock, which the
/// agent's timers run on, is left alone. The library is preloaded through
/// `env`, which execs the agent in its own place: the `faketime` command
/// forks it instead and waits, so killing the test's child (the wrapper)
/// left the agent running after the test.
fn skewed(test: &str, offset: &str) -> Option<Vec<String>> {
    let has = std::process::Command::new("faketime")
        .arg("--version")
        .output()
        .is_ok();
    if !sigil_testkit::runnable(
        test,
        has,
        "the `faketime` command (package faketime) is missing",
    ) {
        return None;
    }
    Some(
        [
            "env".to_owned(),
            "FAKETIME_DONT_FAKE_MONOTONIC=1".to_owned(),
            format!("FAKETIME={offset}"),
            // `$LIB` is the loader's own (lib/x86_64-linux-gnu and the like).
            "LD_PRELOAD=/usr/$LIB/faketime/libfaketimeMT.so.1".to_owned(),
        ]
        .into(),
    )
}

/// An agent started fresh (join token) under `wrapper`, with one workload
/// entry for this process; returns it with its server once the workload's
/// SVID is served.
async fn skewed_agent(dir: &Path, wrapper: &[String]) -> (ServerBin, AgentBin) {
    crate::init();
    let mut server = ServerBin::new(dir, "");
    server.start().await;
    let (token, agent_id) = server.join_token().await;
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent =
        AgentBin::new(dir, &server.api.to_string(), free_addr().unwrap()).wrapped(&wrapper);
    agent.start(Some(&token)).await;
    let mut admin = server.admin().await;
    let uid = nix::unistd::getuid();
    create_entry(
        &mut admin,
        "spiffe://example.org/skewed",
        &agent_id,
        &[format!("unix:uid:{uid}")],
        "",
    )
    .await
    .unwrap();
    let uri = agent.uri();
    wait_until(START, "the workload's SVID", || async {
        served_chains(&uri).await.filter(|c| !c.is_empty())
    })
    .await;
    (server, agent)
}

/// Agents whose clock is off still work within the documented tolerance
/// (docs/operations.md, "Clock skew"): five minutes ahead, or five seconds
/// behind (inside the 10 s by which the server backdates every
/// certificate's notBefore). The SVIDs they serve verify on a correct clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_a_skewed_clock_within_the_tolerance_work() {
    const TEST: &str = "agents_with_a_skewed_clock_within_the_tolerance_work";
    for offset in ["+5m", "-5s"] {
        let Some(wrapper) = skewed(TEST, offset) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (server, agent) = skewed_agent(dir.path(), &wrapper).await;
        let chains = served_chains(&agent.uri()).await.unwrap();
        let bundle = served_x509_bundle(&server).await;
        let now = SystemTime::now();
        verify_svid(&chains[0], &bundle, now)
            .unwrap_or_else(|e| panic!("agent at {offset}: the SVID does not verify: {e}"));
        // notBefore is backdated by BACKDATE from issuance, which was a
        // moment ago on the server's (correct) clock.
        let leaf = sigil_svid::x509::cert_info(&chains[0][0]).unwrap();
        let issued = leaf.not_before + sigil_svid::x509::BACKDATE;
        assert!(
            issued <= now + Duration::from_secs(1)
                && now.duration_since(issued).unwrap_or_default() < START,
            "agent at {offset}: notBefore {:?} is not BACKDATE before issuance",
            leaf.not_before
        );
        let health = agent.health;
        wait_until(START, "the skewed agent connected", || async {
            crate::procs::agent_connected(health).await.filter(|c| *c)
        })
        .await;
        assert!(
            !agent.log().contains("server unreachable"),
            "agent at {offset}:\n{}",
            agent.log()
        );
    }
}

/// An agent whose clock is five minutes behind refuses the server's
/// certificate (not yet valid by its clock) and says so, naming its clock;
/// meanwhile it serves what it has cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_five_minutes_behind_says_its_clock_is_wrong() {
    const TEST: &str = "an_agent_five_minutes_behind_says_its_clock_is_wrong";
    let Some(wrapper) = skewed(TEST, "-5m") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Attested with a correct clock, then restarted five minutes behind (as
    // after a bad clock step on the node).
    let (server, mut agent) = skewed_agent(dir.path(), &[]).await;
    let before = served_chains(&agent.uri()).await.unwrap();
    agent.kill9();
    let mut agent = agent.wrapped(&wrapper.iter().map(String::as_str).collect::<Vec<_>>());
    agent.start(None).await;
    let log = dir.path().join("agent.log");
    let line = wait_until(START, "the agent's clock error", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .rev()
            .find(|l| l.contains("clock is behind"))
            .map(str::to_owned)
    })
    .await;
    println!("{line}");
    assert!(line.contains("not valid yet"), "{line}");
    assert!(line.contains("server unreachable"), "{line}");
    assert_eq!(
        served_chains(&agent.uri()).await.unwrap(),
        before,
        "the cached SVID is still served"
    );
    assert_eq!(
        crate::procs::agent_connected(agent.health).await,
        Some(false)
    );
    drop(server);
}
