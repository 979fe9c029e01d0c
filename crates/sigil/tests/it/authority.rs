//! Forced CA rotation end to end, as after a key compromise: `sigil authority
//! prepare`, `activate`, `taint` and `revoke` while twenty pairs of
//! workloads keep completing mutual TLS (rustls) with SVIDs and bundles from
//! the `spiffe` crate's `X509Source`, read at each handshake. Not one
//! handshake may fail and no pair may stall; after the taint every SVID is
//! replaced by one of the new CA, and after the revoke the old CA is gone
//! from the bundle the workloads hold. A tainted JWT key's cached tokens are
//! never served again. Refused commands change nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_svid::x509::{sha256_hex, verify_svid};
use sigil_testkit::{Cluster, ClusterOptions};
use spiffe::{X509Source, X509Svid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::init;

/// Workload identities; pair `i` is a server with identity `i` and a client
/// with identity `i + 1`, so twenty identities make twenty pairs.
const PAIRS: usize = 20;
/// How long a propagation step (bundle or SVIDs reaching every workload)
/// may take before the test fails.
const STEP: Duration = Duration::from_secs(20);

fn sigil() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("sigil").unwrap()
}

/// Runs `sigil authority <args> --output json` against the cluster; the
/// parsed output on success, stderr on failure.
fn authority(cluster: &Cluster, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = sigil()
        .arg("authority")
        .args(args)
        .args(["--output", "json", "--admin-socket"])
        .arg(cluster.admin_socket())
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("JSON output"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The local active X.509 authority in `sigil authority list` output.
fn active_x509(list: &serde_json::Value) -> serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "x509" && a["state"] == "active" && a["local"] == true)
        .cloned()
        .expect("an active X.509 authority")
}

/// The deadline of a propagation step starting now.
fn step() -> tokio::time::Instant {
    tokio::time::Instant::now() + STEP
}

fn id_of(i: usize) -> String {
    format!("spiffe://example.org/w{i}")
}

/// Picks the SVID with a given hint.
struct ByHint(String);

impl spiffe::x509_source::SvidPicker for ByHint {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0.as_str()))
    }
}

fn chain_of(svid: &X509Svid) -> Vec<Vec<u8>> {
    svid.cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect()
}

/// The CA certificates of example.org a source holds.
fn roots_of(src: &X509Source) -> Vec<Vec<u8>> {
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    src.try_bundle_for_trust_domain(&td)
        .map(|b| {
            b.authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `check` holds for every source, failing at `deadline`.
async fn until_all(
    sources: &[X509Source],
    deadline: tokio::time::Instant,
    what: &str,
    check: impl Fn(&X509Source) -> bool,
) {
    loop {
        let pending = sources.iter().filter(|s| !check(s)).count();
        if pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pending} of {} workloads still wait for: {what}",
            sources.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Handshake outcomes: successes per pair, and every failure.
struct Tally {
    ok: Vec<AtomicU64>,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn new() -> Self {
        Self {
            ok: (0..PAIRS).map(|_| AtomicU64::new(0)).collect(),
            failures: Mutex::new(Vec::new()),
        }
    }
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
    fn ok_of(&self, pair: usize) -> u64 {
        self.ok[pair].load(Ordering::Relaxed)
    }
}

/// A workload's TLS material, read from its `X509Source` at each handshake:
/// the SVID and its key from one update, the roots from the source's
/// current bundle. What the Workload API hands out is used as it is, with
/// no conversion step in between that could lag behind the source, so a
/// refused handshake is a fault of the certificates, never a window of the
/// client library.
pub(crate) struct FromSource(pub(crate) X509Source);

impl std::fmt::Debug for FromSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FromSource")
    }
}

impl FromSource {
    fn certified_key(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let svid = self.0.try_svid()?;
        let chain = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).ok()?;
        Some(Arc::new(rustls::sign::CertifiedKey::new(chain, signer)))
    }
}

impl sigil_svid::tls::TrustRoots for FromSource {
    fn roots_for(&self, td: &sigil_types::TrustDomain) -> Vec<CertificateDer<'static>> {
        let Ok(td) = spiffe::TrustDomain::new(td.name()) else {
            return Vec::new();
        };
        self.0
            .try_bundle_for_trust_domain(&td)
            .map(|b| {
                b.authorities()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl rustls::server::ResolvesServerCert for FromSource {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.certified_key()
    }
}

impl rustls::client::ResolvesClientCert for FromSource {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.certified_key()
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Runs pair `i` until `stop`: the server side accepts and answers, the
/// client side connects again and again, each side with the material its
/// workload holds at that moment. Every failed handshake is a failure.
fn spawn_pair(
    i: usize,
    server_src: X509Source,
    client_src: X509Source,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use sigil_svid::tls::{Authorize, SpiffeClientVerifier, SpiffeServerVerifier};
    let client_id: sigil_types::SpiffeId = id_of((i + 1) % PAIRS).parse().unwrap();
    let server_id: sigil_types::SpiffeId = id_of(i).parse().unwrap();
    let server_side = Arc::new(FromSource(server_src));
    let client_side = Arc::new(FromSource(client_src));
    let mut server_cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            server_side.clone(),
            Authorize::Exact(client_id),
            false,
        )))
        .with_cert_resolver(server_side);
    // Every connection is a full handshake against the current material.
    server_cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server_cfg.send_tls13_tickets = 0;
    let mut client_cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            client_side.clone(),
            Authorize::Exact(server_id),
        )))
        .with_client_cert_resolver(client_side);
    client_cfg.resumption = rustls::client::Resumption::disabled();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let s = stop.clone();
    let server = tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) {
            let Ok(Ok((tcp, _))) =
                tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
            else {
                continue;
            };
            // A handshake the server refuses fails on the client side too,
            // which counts it.
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let mut buf = [0u8; 4];
                if tls.read_exact(&mut buf).await.is_ok() {
                    let _ = tls.write_all(b"pong").await;
                    let _ = tls.shutdown().await;
                }
            }
        }
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let client = tokio::spawn(async move {
        let name = rustls_pki_types::ServerName::try_from("pair.local").unwrap();
        while !stop.load(Ordering::Relaxed) {
            let result = async {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let mut tls = connector.connect(name.clone(), tcp).await?;
                tls.write_all(b"ping").await?;
                let mut reply = [0u8; 4];
                tls.read_exact(&mut reply).await?;
                std::io::Result::Ok(reply)
            }
            .await;
            match result {
                Ok(r) if &r == b"pong" => {
                    tally.ok[i].fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => tally.fail(format!("pair {i}: unexpected reply {r:?}")),
                Err(e) => tally.fail(format!("pair {i} client side: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    vec![server, client]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_rotation_under_mtls_load_fails_no_handshake() {
    init();
    // SVIDs (and the agent's own) live 60 s and renew by themselves no
    // earlier than 40% into their life, so a renewal before that comes from
    // the taint.
    let started = tokio::time::Instant::now();
    let natural_renewal = started + Duration::from_secs(24);
    let opts = ClusterOptions {
        x509_svid_ttl: Duration::from_secs(60),
        rotation_tick: Duration::from_millis(250),
        ..Default::default()
    };
    let cluster = Cluster::start(opts).await.expect("cluster starts");
    let sel = format!("unix:uid:{}", nix::unistd::getuid());
    let mut entries = Vec::new();
    for i in 0..PAIRS {
        let e = cluster
            .register_with(&format!("/w{i}"), &[&sel], |e| e.hint = format!("w{i}"))
            .await
            .unwrap();
        entries.push(e);
    }
    for e in &entries {
        cluster.wait_for_svid(&e.spiffe_id).await.unwrap();
    }
    let uri = cluster.socket_uri();
    let mut sources = Vec::new();
    for i in 0..PAIRS {
        let src = X509Source::builder()
            .endpoint(&uri)
            .picker(ByHint(format!("w{i}")))
            .build()
            .await
            .unwrap();
        sources.push(src);
    }

    let tally = Arc::new(Tally::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..PAIRS {
        tasks.extend(spawn_pair(
            i,
            sources[i].clone(),
            sources[(i + 1) % PAIRS].clone(),
            tally.clone(),
            stop.clone(),
        ));
    }
    // Every pair completes at least two more handshakes: a pair that stops
    // working fails the test, whatever the others do.
    let wait_handshakes = |what: &'static str| {
        let tally = tally.clone();
        async move {
            let from: Vec<u64> = (0..PAIRS).map(|p| tally.ok_of(p)).collect();
            let deadline = tokio::time::Instant::now() + STEP;
            loop {
                let stalled: Vec<usize> = (0..PAIRS)
                    .filter(|&p| tally.ok_of(p) < from[p] + 2)
                    .collect();
                if stalled.is_empty() {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "pairs {stalled:?} stopped completing handshakes {what}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_handshakes("before the rotation").await;

    let old = active_x509(&authority(&cluster, &["list"]).unwrap());
    let old_id = old["id"].as_str().unwrap().to_owned();
    let old_sha = old["public_key_id"].as_str().unwrap().to_owned();
    let state = cluster.server().unwrap().state().clone();
    let agent_serial = || async {
        state
            .store()
            .get_agent(cluster.agent_id())
            .await
            .unwrap()
            .unwrap()
            .serial
    };

    // 1. Prepare: the new CA reaches every workload's bundle before it signs.
    let prepared = authority(&cluster, &["prepare", "--kind", "x509"]).unwrap();
    assert_eq!(prepared["state"], "prepared");
    let new_sha = prepared["public_key_id"].as_str().unwrap().to_owned();
    until_all(&sources, step(), "the prepared CA in the bundle", |s| {
        roots_of(s).iter().any(|c| sha256_hex(c) == new_sha)
    })
    .await;
    let new_ca = roots_of(&sources[0])
        .into_iter()
        .find(|c| sha256_hex(c) == new_sha)
        .unwrap();

    // 2. Activate: new SVIDs come from the new CA; the old one stays trusted.
    let activated = authority(&cluster, &["activate", "--kind", "x509"]).unwrap();
    assert_eq!(activated["id"], prepared["id"]);
    assert_eq!(activated["state"], "active");
    wait_handshakes("after the activation").await;

    // 3. Taint: every SVID the old CA signed, and the agent's own, is
    // replaced at once, not at its half-life.
    let serial_before = agent_serial().await;
    let tainted = authority(&cluster, &["taint", "--kind", "x509", "--id", &old_id]).unwrap();
    assert_eq!(tainted["tainted"], true);
    let deadline = step().min(natural_renewal);
    until_all(&sources, deadline, "an SVID signed by the new CA", |s| {
        s.try_svid().is_some_and(|svid| {
            verify_svid(
                &chain_of(&svid),
                std::slice::from_ref(&new_ca),
                SystemTime::now(),
            )
            .is_ok()
        })
    })
    .await;
    while agent_serial().await == serial_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent kept its SVID of the tainted CA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_handshakes("after the taint").await;

    // 4. Revoke: the old CA leaves every workload's bundle.
    let revoked = authority(&cluster, &["revoke", "--kind", "x509", "--id", &old_id]).unwrap();
    assert_eq!(revoked["id"].as_str(), Some(old_id.as_str()));
    until_all(&sources, step(), "a bundle without the revoked CA", |s| {
        let roots = roots_of(s);
        !roots.is_empty() && roots.iter().all(|c| sha256_hex(c) != old_sha)
    })
    .await;
    wait_handshakes("after the revocation").await;
    let list = authority(&cluster, &["list"]).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|a| a["id"].as_str() != Some(old_id.as_str())),
        "{list}"
    );
    // The agent still talks to the server (both on the new CA only): a new
    // entry gets its SVID.
    let late = cluster.register("/late", &[&sel]).await.unwrap();
    cluster.wait_for_svid(&late.spiffe_id).await.unwrap();

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = tally.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} handshakes failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    for s in &sources {
        s.shutdown().await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_authority_commands_change_nothing() {
    init();
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let state = cluster.server().unwrap().state().clone();
    let list = authority(&cluster, &["list"]).unwrap();
    let bundle = state.ca().bundle();
    let active = active_x509(&list);
    let active_id = active["id"].as_str().unwrap();

    let refusals: [(&[&str], &str); 6] = [
        (&["taint", "--kind", "x509", "--id", active_id], "active"),
        (
            &["revoke", "--kind", "x509", "--id", active_id],
            "not tainted",
        ),
        (
            &["taint", "--kind", "x509", "--id", "x509-0bad"],
            "no x509 authority x509-0bad",
        ),
        (
            &["revoke", "--kind", "jwt", "--id", "jwt-nope"],
            "no jwt authority jwt-nope",
        ),
        (
            &["taint", "--kind", "jwt", "--id", active_id],
            "no jwt authority",
        ),
        (&["activate", "--kind", "jwt"], "no prepared jwt authority"),
    ];
    for (args, want) in refusals {
        let err = authority(&cluster, args).expect_err("refused");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(authority(&cluster, &["list"]).unwrap(), list, "{args:?}");
        assert_eq!(state.ca().bundle(), bundle, "{args:?}");
    }
    // Malformed requests never reach the server.
    for args in [
        &["taint", "--kind", "rsa", "--id", active_id][..],
        &["taint", "--kind", "x509"][..],
    ] {
        let err = authority(&cluster, args).expect_err("refused");
        assert!(err.contains("--kind") || err.contains("--id"), "{err}");
    }

    // A prepared authority cannot be tainted, nor a second one prepared.
    let prepared = authority(&cluster, &["prepare", "--kind", "x509"]).unwrap();
    let list = authority(&cluster, &["list"]).unwrap();
    let bundle = state.ca().bundle();
    let id = prepared["id"].as_str().unwrap();
    let err = authority(&cluster, &["taint", "--kind", "x509", "--id", id]).unwrap_err();
    assert!(err.contains("prepared"), "{err}");
    let err = authority(&cluster, &["prepare", "--kind", "x509"]).unwrap_err();
    assert!(err.contains("already prepared"), "{err}");
    assert_eq!(authority(&cluster, &["list"]).unwrap(), list);
    assert_eq!(state.ca().bundle(), bundle);

    // The text output names the states.
    let out = sigil()
        .args(["authority", "list", "--admin-socket"])
        .arg(cluster.admin_socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("Found 3 authorities"), "{text}");
    assert!(
        text.contains("prepared") && text.contains("(this server)"),
        "{text}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tainted_jwt_key_is_never_served_again() {
    let (cluster, _me) = crate::cluster_with_me(ClusterOptions::default()).await;
    let client = spiffe::WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let first = client.fetch_jwt_svid(["api"], None).await.unwrap();
    let old_kid = first.key_id().to_owned();
    let fetch = || async {
        client
            .fetch_jwt_svid(["api"], None)
            .await
            .unwrap()
            .token()
            .to_owned()
    };
    // Cached: the same token again.
    assert_eq!(fetch().await, first.token());

    authority(&cluster, &["prepare", "--kind", "jwt"]).unwrap();
    let active = authority(&cluster, &["activate", "--kind", "jwt"]).unwrap();
    let new_kid = active["public_key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    // A retired key still verifies, so the cached token is still served.
    assert_eq!(fetch().await, first.token());

    let old_id = format!("jwt-{old_kid}");
    authority(&cluster, &["taint", "--kind", "jwt", "--id", &old_id]).unwrap();
    let mut snapshots = cluster.agent().unwrap().snapshots.clone();
    tokio::time::timeout(
        STEP,
        snapshots.wait_for(|s| s.tainted.jwt_kids.contains(&old_kid)),
    )
    .await
    .expect("the agent learns of the taint")
    .unwrap();
    let fresh = client.fetch_jwt_svid(["api"], None).await.unwrap();
    assert_ne!(fresh.token(), first.token());
    assert_eq!(fresh.key_id(), new_kid);
    client
        .validate_jwt_token("api", fresh.token())
        .await
        .unwrap();

    // Revoked: the old key leaves the workloads' JWT bundle, and what it
    // signed no longer validates.
    authority(&cluster, &["revoke", "--kind", "jwt", "--id", &old_id]).unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let deadline = step();
    loop {
        let bundles = client.fetch_jwt_bundles().await.unwrap();
        let bundle = bundles.get(&td).unwrap();
        if bundle.find_jwt_authority(&old_kid).is_none() {
            assert!(bundle.find_jwt_authority(&new_kid).is_some());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked JWT key stayed in the bundle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        client
            .validate_jwt_token("api", first.token())
            .await
            .is_err()
    );
    cluster.shutdown().await;
}
