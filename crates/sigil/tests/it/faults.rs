//! Faults under running workloads, with the `sigil` binary as child
//! processes where a crash matters: the server SIGKILLed and restarted in a
//! loop, the server away for longer than SVID half-life, an agent cut off by
//! a network partition (in a network namespace of the test's own), and the
//! PostgreSQL database restarted under load. Workloads doing mutual TLS
//! (rustls with each side's material read from its `X509Source` at every
//! handshake) must not see a single failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sigil_testkit::postgres::PrivatePostgres;
use spiffe::{X509Source, X509Svid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::durability::Rng;
use crate::procs::{
    AgentBin, START, ServerBin, agent_connected, create_entry, create_entry_for_me, fetch_svid,
    server_and_agent, wait_for_svid_of, wait_until,
};

/// Picks the SVID with a given hint.
struct ByHint(String);

impl spiffe::x509_source::SvidPicker for ByHint {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0.as_str()))
    }
}

async fn source(uri: &str, hint: &str) -> X509Source {
    X509Source::builder()
        .endpoint(uri)
        .picker(ByHint(hint.to_owned()))
        .build()
        .await
        .unwrap()
}

/// The serial number and expiry of a DER certificate.
pub(crate) fn serial_and_expiry(der: &[u8]) -> (Vec<u8>, SystemTime) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    (cert.raw_serial().to_vec(), not_after)
}

/// What a pair of workloads saw while handshaking in a loop.
#[derive(Default)]
struct Tally {
    handshakes: AtomicU64,
    failures: AtomicU64,
    /// Distinct client-certificate serials the server side saw.
    serials: std::sync::Mutex<std::collections::BTreeSet<Vec<u8>>>,
    /// Failure descriptions (the first few).
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        let what = format!("{:?}: {what}", SystemTime::now());
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 10 {
            e.push(what);
        }
    }
}

/// A `frontend-<n>` / `backend-<n>` pair doing one mutual-TLS exchange after
/// another until `stop`, each side authorizing exactly the other's ID and
/// each checking that the certificate it was handed is within its validity.
pub(crate) struct Pair {
    tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pair {
    pub(crate) async fn start(uri: &str, n: usize, stop: Arc<AtomicBool>) -> Self {
        let fe = format!("frontend-{n}");
        let be = format!("backend-{n}");
        let server_src = source(uri, &be).await;
        let client_src = source(uri, &fe).await;
        // The material each side holds, read from its X509Source at every
        // handshake (as in authority.rs): a refused handshake is then a
        // fault of what sigil served, never the window in which a client
        // library converts a new source revision.
        use sigil_svid::tls::{Authorize, SpiffeClientVerifier, SpiffeServerVerifier};
        let server_side = Arc::new(crate::authority::FromSource(server_src));
        let client_side = Arc::new(crate::authority::FromSource(client_src.clone()));
        let mut server_cfg = rustls::ServerConfig::builder()
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                server_side.clone(),
                Authorize::Exact(format!("spiffe://example.org/{fe}").parse().unwrap()),
                false,
            )))
            .with_cert_resolver(server_side);
        server_cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server_cfg.send_tls13_tickets = 0;
        let mut client_cfg = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                client_side.clone(),
                Authorize::Exact(format!("spiffe://example.org/{be}").parse().unwrap()),
            )))
            .with_client_cert_resolver(client_side);
        client_cfg.resumption = rustls::client::Resumption::disabled();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let tally = Arc::new(Tally::default());
        let t = tally.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let t = t.clone();
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                            let (serial, not_after) = serial_and_expiry(peer.as_ref());
                            if not_after <= SystemTime::now() {
                                t.fail("the server accepted an expired client SVID".into());
                            }
                            t.serials.lock().unwrap().insert(serial);
                            let mut buf = [0u8; 4];
                            if tls.read_exact(&mut buf).await.is_ok() {
                                let _ = tls.write_all(b"pong").await;
                                let _ = tls.shutdown().await;
                            }
                        }
                        Err(e) => t.fail(format!("server handshake: {e}")),
                    }
                });
            }
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let t = tally.clone();
        let client = tokio::spawn(async move {
            let name = rustls_pki_types::ServerName::try_from("backend.local").unwrap();
            while !stop.load(Ordering::Relaxed) {
                // The SVID the workload holds right now must be valid.
                match client_src.svid() {
                    Ok(svid) => {
                        let (_, not_after) = serial_and_expiry(svid.leaf().as_bytes());
                        if not_after <= SystemTime::now() {
                            t.fail("the workload holds an expired SVID".into());
                        }
                    }
                    Err(e) => t.fail(format!("the workload has no SVID: {e}")),
                }
                let exchange = async {
                    let tcp = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                    let mut tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("client handshake: {e}"))?;
                    tls.write_all(b"ping")
                        .await
                        .map_err(|e| format!("write: {e}"))?;
                    let mut reply = Vec::new();
                    tls.read_to_end(&mut reply)
                        .await
                        .map_err(|e| format!("read: {e}"))?;
                    if reply != b"pong" {
                        return Err(format!("reply {reply:?}"));
                    }
                    Ok::<_, String>(())
                };
                match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                    Ok(Ok(())) => {
                        t.handshakes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => t.fail(e),
                    Err(_) => t.fail("exchange timed out".into()),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self {
            tally,
            tasks: vec![server, client],
        }
    }

    /// The serials of every client SVID the server side has seen so far.
    pub(crate) fn serials(&self) -> std::collections::BTreeSet<Vec<u8>> {
        self.tally.serials.lock().unwrap().clone()
    }

    /// Exchanges completed and failed so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.tally.handshakes.load(Ordering::Relaxed),
            self.tally.failures.load(Ordering::Relaxed),
        )
    }

    /// Stops the pair; returns (handshakes, failures, distinct client serials, errors).
    pub(crate) async fn finish(self) -> (u64, u64, usize, Vec<String>) {
        // The client loop ends by itself once `stop` is set.
        let mut tasks = self.tasks.into_iter();
        let server = tasks.next().unwrap();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("the client loop stops")
                .unwrap();
        }
        server.abort();
        let t = &self.tally;
        (
            t.handshakes.load(Ordering::Relaxed),
            t.failures.load(Ordering::Relaxed),
            t.serials.lock().unwrap().len(),
            t.errors.lock().unwrap().clone(),
        )
    }
}

/// Registers `n` frontend/backend pairs for this process's uid and waits
/// until the agent serves all of them.
pub(crate) async fn register_pairs(server: &ServerBin, agent: &AgentBin, agent_id: &str, n: usize) {
    let uid = nix::unistd::getuid();
    let mut admin = server.admin().await;
    for i in 0..n {
        for role in ["frontend", "backend"] {
            let name = format!("{role}-{i}");
            create_entry(
                &mut admin,
                &format!("spiffe://example.org/{name}"),
                agent_id,
                &[format!("unix:uid:{uid}")],
                &name,
            )
            .await
            .unwrap();
        }
    }
    let uri = agent.uri();
    wait_until(START, "every pair's SVID at the agent", || async {
        let c = spiffe::WorkloadApiClient::connect_to(&uri).await.ok()?;
        let svids = c.fetch_all_x509_svids().await.ok()?;
        (svids.len() == 2 * n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_keeps_working_while_the_server_is_sigkilled_in_a_loop() {
    const PAIRS: usize = 2;
    const KILLS: usize = 6;
    let mut rng = Rng::from_env("mtls_keeps_working_while_the_server_is_sigkilled_in_a_loop");
    let dir = tempfile::tempdir().unwrap();
    // Short lifetimes, so that workload and agent SVIDs are renewed several
    // times across the crashes. A workload SVID is renewed with 40-60% of
    // its life left, less up to a second that the certificate's whole-second
    // `notAfter` takes off: 10 s leaves at least 3 s, more than an outage
    // here lasts (up to 1.5 s down, a restart, and a reconnection that the
    // agent hastens as the SVID nears its expiry).
    const TTL: Duration = Duration::from_secs(10);
    let (mut server, agent, agent_id) = server_and_agent(
        dir.path(),
        "default_x509_svid_ttl = \"10s\"\nagent_svid_ttl = \"12s\"",
    )
    .await;
    register_pairs(&server, &agent, &agent_id, PAIRS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut pairs = Vec::new();
    for i in 0..PAIRS {
        pairs.push(Pair::start(&agent.uri(), i, stop.clone()).await);
    }
    for k in 0..KILLS {
        tokio::time::sleep(rng.millis(2000, 4000)).await;
        server.kill9();
        tokio::time::sleep(rng.millis(200, 1500)).await;
        server.start().await;
        println!("SIGKILL {}/{KILLS}: server back", k + 1);
    }
    // One more SVID lifetime after the last crash.
    tokio::time::sleep(TTL).await;
    stop.store(true, Ordering::Relaxed);
    for (i, p) in pairs.into_iter().enumerate() {
        let (ok, failed, serials, errors) = p.finish().await;
        println!("pair {i}: {ok} exchanges, {failed} failures, {serials} client SVIDs");
        assert_eq!(failed, 0, "pair {i}: {errors:?}\n{}", agent.log());
        assert!(ok > 0, "pair {i} completed no exchange");
        // 23-41 s of 10 s SVIDs renewed every 4-6 s: several renewals went
        // through the crashes.
        assert!(serials >= 4, "pair {i}: only {serials} client SVIDs seen");
    }
    // The agent is still the same, connected one.
    let rec = wait_until(START, "the agent connected", || async {
        server.agent(&agent_id).await.filter(|a| a.connected)
    })
    .await;
    assert!(!rec.banned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_recover_by_themselves_after_an_outage_longer_than_svid_half_life() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, agent, agent_id) =
        server_and_agent(dir.path(), "default_x509_svid_ttl = \"8s\"").await;
    let mut admin = server.admin().await;
    create_entry_for_me(&mut admin, "spiffe://example.org/outage", &agent_id).await;
    let uri = agent.uri();
    let first = wait_until(START, "the workload's SVID", || fetch_svid(&uri)).await;

    // Down for 6 s, longer than the 4 s half-life: the agent's renewal
    // attempts fail meanwhile.
    server.kill9();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = fetch_svid(&uri)
        .await
        .expect("the agent still answers the Workload API during the outage");
    assert_eq!(
        during.spiffe_id().to_string(),
        "spiffe://example.org/outage"
    );

    // Back, with nobody touching the agent: it reconnects and the workload
    // gets a fresh SVID (new serial, valid now, verifying against the bundle).
    server.start().await;
    let (first_serial, _) = serial_and_expiry(first.leaf().as_bytes());
    let (during_serial, _) = serial_and_expiry(during.leaf().as_bytes());
    let fresh = wait_until(
        Duration::from_secs(30),
        "a fresh SVID after the outage",
        || async {
            let s = fetch_svid(&uri).await?;
            let (serial, not_after) = serial_and_expiry(s.leaf().as_bytes());
            (serial != first_serial && serial != during_serial && not_after > SystemTime::now())
                .then_some(s)
        },
    )
    .await;
    let bundle = spiffe::WorkloadApiClient::connect_to(&uri)
        .await
        .unwrap()
        .fetch_x509_bundles()
        .await
        .unwrap();
    let roots: Vec<Vec<u8>> = bundle
        .get(&spiffe::TrustDomain::new("example.org").unwrap())
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let chain: Vec<Vec<u8>> = fresh
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    sigil_svid::x509::verify_svid(&chain, &roots, SystemTime::now())
        .expect("the fresh SVID verifies against the served bundle");

    // Registrations made after the comeback reach the agent.
    let mut admin = server.admin().await;
    create_entry_for_me(&mut admin, "spiffe://example.org/after-outage", &agent_id).await;
    wait_for_svid_of(
        &uri,
        "spiffe://example.org/after-outage",
        "the post-outage entry's SVID",
    )
    .await;
}

/// Runs `op` (a restart, a stop…) on the PostgreSQL server off the async
/// runtime, since it waits for the process; panics if it fails.
async fn on_postgres(pg: &Arc<PrivatePostgres>, op: fn(&PrivatePostgres) -> anyhow::Result<()>) {
    let pg = pg.clone();
    tokio::task::spawn_blocking(move || op(&pg))
        .await
        .unwrap()
        .unwrap();
}

/// One admin write of the writer loop.
struct Write {
    started: tokio::time::Instant,
    took: Duration,
    result: Result<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarted_under_load() {
    const PAIRS: usize = 2;
    let Some(pg) = PrivatePostgres::start_or_skip("the_database_restarted_under_load").unwrap()
    else {
        return;
    };
    let pg = Arc::new(pg);
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) = server_and_agent(
        dir.path(),
        &format!(
            "default_x509_svid_ttl = \"16s\"\n[server.store]\ndriver = \"postgres\"\nurl = \"{}\"",
            pg.url()
        ),
    )
    .await;
    assert!(
        server.log().contains("PostgreSQL"),
        "the server uses PostgreSQL:\n{}",
        server.log()
    );
    register_pairs(&server, &agent, &agent_id, PAIRS).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut pairs = Vec::new();
    for i in 0..PAIRS {
        pairs.push(Pair::start(&agent.uri(), i, stop.clone()).await);
    }

    // An admin writer starting one create every 100 ms (each its own call,
    // so calls pile up rather than queue while the database is away), each
    // call bounded.
    let writes = Arc::new(std::sync::Mutex::new(Vec::<Write>::new()));
    let writer = {
        let admin = server.admin().await;
        let writes = writes.clone();
        let stop = stop.clone();
        let agent_id = agent_id.clone();
        tokio::spawn(async move {
            let mut calls = Vec::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut admin = admin.clone();
                let writes = writes.clone();
                let agent_id = agent_id.clone();
                calls.push(tokio::spawn(async move {
                    let started = tokio::time::Instant::now();
                    let id = format!("spiffe://example.org/load/{n}");
                    let selectors = [format!("unix:uid:{}", 200_000 + n)];
                    let call = create_entry(&mut admin, &id, &agent_id, &selectors, "");
                    let result = match tokio::time::timeout(Duration::from_secs(40), call).await {
                        Ok(r) => r,
                        Err(_) => Err("no answer within 40 s".into()),
                    };
                    writes.lock().unwrap().push(Write {
                        started,
                        took: started.elapsed(),
                        result,
                    });
                }));
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for c in calls {
                c.await.unwrap();
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    // A fast restart, as an operator or a failover does it.
    on_postgres(&pg, PrivatePostgres::restart).await;
    println!("PostgreSQL restarted");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // And an outage of a few seconds.
    on_postgres(&pg, PrivatePostgres::stop).await;
    let down = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    on_postgres(&pg, PrivatePostgres::start_again).await;
    let up = tokio::time::Instant::now();
    println!("PostgreSQL back after {:?}", up - down);

    // Writes succeed again, by themselves.
    wait_until(
        Duration::from_secs(30),
        "admin writes to succeed again",
        || {
            let writes = writes.clone();
            async move {
                let w = writes.lock().unwrap();
                let after: Vec<_> = w.iter().filter(|w| w.started > up).collect();
                (after.len() >= 5 && after.iter().rev().take(5).all(|w| w.result.is_ok()))
                    .then_some(())
            }
        },
    )
    .await;
    // A registration made now reaches the agent: the server's change
    // follower survived the database going away.
    let mut admin = server.admin().await;
    create_entry_for_me(
        &mut admin,
        "spiffe://example.org/after-db-restart",
        &agent_id,
    )
    .await;
    let uri = agent.uri();
    wait_for_svid_of(
        &uri,
        "spiffe://example.org/after-db-restart",
        "the post-restart entry's SVID",
    )
    .await;
    // Mutual TLS goes on for a while after the outage.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(45), writer)
        .await
        .expect("the writer stops")
        .unwrap();

    // Every write got an answer (none hung past the bound), every refusal
    // says why, and every acknowledged write is in the database.
    let mut w = std::mem::take(&mut *writes.lock().unwrap());
    w.sort_by_key(|x| x.started);
    let t0 = w[0].started;
    for x in w
        .iter()
        .filter(|x| x.result.is_err() || x.took > Duration::from_secs(1))
    {
        println!(
            "write at +{:?} took {:?}: {:?}",
            x.started - t0,
            x.took,
            x.result
        );
    }
    for x in &w {
        if let Err(e) = &x.result {
            assert!(
                !e.contains("no answer within"),
                "a write hung: {e}\n{}",
                server.log()
            );
            assert!(e.len() > 10, "a refusal without a reason: {e:?}");
        }
    }
    let touched = w
        .iter()
        .filter(|x| x.started < up && x.started + x.took > down)
        .count();
    assert!(touched > 0, "some writes met the outage");
    // What the server holds is the truth to compare with: a write may have
    // committed and still reported an error to its caller (its answer lost
    // with the connection to the database), so the number of acknowledged
    // writes does not tell how many entries exist. Every acknowledged write
    // must be among them, and the agent must end up with exactly that set
    // (every entry here is the agent's), each with its SVID.
    let mut admin = server.admin().await;
    let held: std::collections::BTreeSet<String> = crate::procs::list_entry_ids(&mut admin)
        .await
        .into_iter()
        .collect();
    let acked: Vec<&String> = w.iter().filter_map(|x| x.result.as_ref().ok()).collect();
    let lost: Vec<&&String> = acked.iter().filter(|id| !held.contains(**id)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost in the restarts: {lost:?}"
    );
    let ambiguous = held.len().saturating_sub(2 * PAIRS + 1 + acked.len());
    println!(
        "{} writes, {} acknowledged, {ambiguous} committed though reported failed, \
         {touched} met the outage",
        w.len(),
        acked.len()
    );
    let data_dir = agent.data_dir.clone();
    let health = agent.health;
    let want = held.len().to_string();
    wait_until(
        START,
        "the agent to hold exactly the server's entries",
        || {
            let data_dir = data_dir.clone();
            let held = &held;
            let want = &want;
            async move {
                // The agent's own record of what it serves (its cache file,
                // written after every change) and the gauge of what it serves.
                let cache = sigil_agent::persist::Persist::open(&data_dir)
                    .ok()?
                    .load_cache(SystemTime::now())
                    .ok()?;
                let entries: std::collections::BTreeSet<String> =
                    cache.entries.iter().map(|e| e.id.to_string()).collect();
                let svids: std::collections::BTreeSet<String> =
                    cache.svids.iter().map(|s| s.entry_id.to_string()).collect();
                let (_, body) = crate::procs::http_get(health, "/metrics").await?;
                let gauge = body
                    .lines()
                    .find_map(|l| l.strip_prefix("sigil_agent_cached_svids "))?
                    .trim()
                    .to_owned();
                (&entries == held && &svids == held && &gauge == want).then_some(())
            }
        },
    )
    .await;

    // The workloads never noticed.
    for (i, p) in pairs.into_iter().enumerate() {
        let (ok, failed, serials, errors) = p.finish().await;
        println!("pair {i}: {ok} exchanges, {failed} failures, {serials} client SVIDs");
        assert_eq!(
            failed,
            0,
            "pair {i}: {errors:?}\nagent:\n{}\nserver:\n{}",
            agent.log(),
            server.log()
        );
        assert!(ok > 0, "pair {i} completed no exchange");
    }
}

/// Creates a network namespace `<prefix>-<tag>` for `test`, with a tag
/// unique among concurrent runs (the process ID and a clock tick); returns
/// its name and the tag. `None` (after saying why) when this process cannot:
/// no root, no `ip`, or root without CAP_NET_ADMIN (some containers); under
/// CI that fails the test instead, since CI is where it is meant to run.
pub(crate) fn add_netns(test: &str, prefix: &str) -> Option<(String, String)> {
    if !crate::need_root(test) {
        return None;
    }
    let has_ip = std::process::Command::new("ip").arg("-V").output().is_ok();
    if !sigil_testkit::runnable(test, has_ip, "the `ip` command (iproute2) is missing") {
        return None;
    }
    let tick = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_micros()
        % 100;
    let tag = format!("{}{tick}", std::process::id() % 100_000);
    let name = format!("{prefix}-{tag}");
    let add = std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .unwrap();
    if !add.status.success() {
        let why = String::from_utf8_lossy(&add.stderr);
        sigil_testkit::runnable(test, false, &format!("ip netns add {name}: {why}"));
        return None;
    }
    Some((name, tag))
}

/// Runs `ip` with these arguments; panics with its stderr on failure.
pub(crate) fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with two veth links to the root namespace, named
/// uniquely for this run; deleted (links included) when dropped.
///
/// `data`: 10.203.N.1 (root side) – 10.203.N.2 (namespace), the link the
/// agent reaches the server over and that a partition cuts.
/// `mgmt`: 10.203.N.5 – 10.203.N.6, over which the test reads the agent's
/// metrics, left up throughout.
struct Netns {
    name: String,
    data_root: String,
    mgmt_root: String,
    net: u8,
}

impl Netns {
    /// `None` (after printing why) when this process cannot create one.
    fn create() -> Option<Self> {
        let (name, tag) = add_netns("network partition test", "sigil-part")?;
        let ns = Self {
            name,
            data_root: format!("sgd{tag}"),
            mgmt_root: format!("sgm{tag}"),
            net: (std::process::id() % 250) as u8,
        };
        let n = ns.net;
        for (root, peer, a, b) in [
            (&ns.data_root, "data0", 1, 2),
            (&ns.mgmt_root, "mgmt0", 5, 6),
        ] {
            ip(&[
                "link",
                "add",
                root,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{root}p"),
            ]);
            ip(&["link", "set", &format!("{root}p"), "netns", &ns.name]);
            ip(&[
                "-n",
                &ns.name,
                "link",
                "set",
                &format!("{root}p"),
                "name",
                peer,
            ]);
            ip(&["addr", "add", &format!("10.203.{n}.{a}/30"), "dev", root]);
            ip(&["link", "set", root, "up"]);
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("10.203.{n}.{b}/30"),
                "dev",
                peer,
            ]);
            ip(&["-n", &ns.name, "link", "set", peer, "up"]);
        }
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        Some(ns)
    }

    fn addr(&self, host: u8) -> std::net::IpAddr {
        std::net::IpAddr::from([10, 203, self.net, host])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth ends, and with them the pairs.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        for l in [&self.data_root, &self.mgmt_root] {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", l])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_by_a_network_partition_serves_its_cache_and_recovers() {
    let Some(ns) = Netns::create() else {
        return;
    };
    crate::init();
    let dir = tempfile::tempdir().unwrap();
    let port = sigil_testkit::free_addr().unwrap().port();
    let mut server =
        ServerBin::with_bind(dir.path(), std::net::SocketAddr::new(ns.addr(1), port), "");
    server.start().await;
    let (token, agent_id) = server.join_token().await;
    let health = std::net::SocketAddr::new(ns.addr(6), port);
    let mut agent = AgentBin::new(dir.path(), &server.api.to_string(), health)
        .wrapped(&["ip", "netns", "exec", &ns.name]);
    agent.start(Some(&token)).await;

    // The test talks to the agent's Unix socket from the root namespace
    // (Unix sockets are not network-namespaced).
    let mut admin = server.admin().await;
    create_entry_for_me(&mut admin, "spiffe://example.org/partitioned", &agent_id).await;
    let uri = agent.uri();
    let before = wait_until(START, "the workload's SVID", || fetch_svid(&uri)).await;
    wait_until(START, "the agent to report connected", || async {
        agent_connected(health).await.filter(|c| *c)
    })
    .await;

    // Cut the agent's link (its carrier drops; packets go nowhere).
    ip(&["link", "set", &ns.data_root, "down"]);
    create_entry_for_me(
        &mut admin,
        "spiffe://example.org/registered-during-partition",
        &agent_id,
    )
    .await;
    // The agent notices through its HTTP/2 keepalive (a silent partition
    // gives no other signal), and serves its cache all along.
    wait_until(
        Duration::from_secs(75),
        "the agent to report disconnected",
        || async {
            let svid = fetch_svid(&uri).await.expect("the cached SVID is served");
            assert_eq!(svid.leaf().as_bytes(), before.leaf().as_bytes());
            agent_connected(health).await.filter(|c| !*c)
        },
    )
    .await;
    let svids = spiffe::WorkloadApiClient::connect_to(&uri)
        .await
        .unwrap()
        .fetch_all_x509_svids()
        .await
        .unwrap();
    assert!(
        svids
            .iter()
            .all(|s| !s.spiffe_id().to_string().ends_with("during-partition")),
        "the partition is real: nothing crossed it"
    );

    // Heal: the agent reconnects by itself and receives what it missed.
    ip(&["link", "set", &ns.data_root, "up"]);
    wait_until(
        Duration::from_secs(30),
        "the agent to reconnect",
        || async { agent_connected(health).await.filter(|c| *c) },
    )
    .await;
    wait_for_svid_of(
        &uri,
        "spiffe://example.org/registered-during-partition",
        "the entry registered during the partition",
    )
    .await;
    let agents = server.agents().await.expect("the server lists its agents");
    assert_eq!(agents.len(), 1, "the same agent, not a new one: {agents:?}");
    assert_eq!(agents[0].spiffe_id, agent_id);
    agent.kill9();
    server.kill9();
}
