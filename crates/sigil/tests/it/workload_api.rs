//! The Workload API, through the `spiffe` crate's client and X509Source.

use std::time::Duration;

use futures_util::StreamExt;
use spiffe::{WorkloadApiClient, X509Source};

use crate::{PROMPT, cluster_with_me};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_client_gets_svids_bundles_and_jwts() {
    let (cluster, me) = cluster_with_me(Default::default()).await;
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();

    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id(), &me);
    assert_eq!(svid.cert_chain().len(), 1);

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = bundles.get(&td).expect("own trust domain bundle");
    assert!(!bundle.authorities().is_empty());

    let jwt = client
        .fetch_jwt_svid(["audience-a", "audience-b"], None)
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id(), &me);
    let mut aud = jwt.audience().to_vec();
    aud.sort();
    assert_eq!(aud, vec!["audience-a", "audience-b"]);

    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let jb = jwt_bundles.get(&td).expect("own JWT bundle");
    assert!(
        jb.find_jwt_authority(jwt.key_id()).is_some(),
        "the JWT's kid is in the bundle"
    );

    // Validation through the agent, and refusal of a wrong audience.
    let validated = client
        .validate_jwt_token("audience-a", jwt.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), &me);
    assert!(
        client
            .validate_jwt_token("someone-else", jwt.token())
            .await
            .is_err()
    );

    // Offline verification against the JWT bundle by the spiffe crate itself.
    let verified =
        spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["audience-b"]).unwrap();
    assert_eq!(verified.spiffe_id(), &me);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_starts_and_reports_the_identity() {
    let (cluster, me) = cluster_with_me(Default::default()).await;
    let source = X509Source::builder()
        .endpoint(cluster.socket_uri())
        .build()
        .await
        .unwrap();
    assert_eq!(source.svid().unwrap().spiffe_id(), &me);
    source.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_entry_reaches_a_waiting_stream_at_once() {
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), 1);

    let uid = nix::unistd::getuid();
    let started = std::time::Instant::now();
    cluster
        .register("/second", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    let next = tokio::time::timeout(PROMPT, stream.next())
        .await
        .expect("the stream was pushed an update")
        .unwrap()
        .unwrap();
    let ids: Vec<String> = next
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert!(
        ids.contains(&"spiffe://example.org/second".to_string()),
        "{ids:?}"
    );
    // Push, not polling: the peer's poll interval alone is 5 s.
    eprintln!("entry create -> workload update: {:?}", started.elapsed());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttls_rotate_and_the_stream_follows() {
    let opts = sigil_testkit::ClusterOptions {
        x509_svid_ttl: Duration::from_secs(4),
        ca_ttl: Duration::from_secs(600),
        ..Default::default()
    };
    let (cluster, _me) = cluster_with_me(opts).await;
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    let mut serials = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while serials.len() < 3 {
        let svid = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("rotated SVIDs keep arriving")
            .unwrap()
            .unwrap();
        let leaf = svid.leaf().as_bytes().to_vec();
        let info = sigil_svid::x509::cert_info(&leaf).unwrap();
        // Each one pushed is valid now.
        assert!(info.not_after > std::time::SystemTime::now());
        serials.insert(info.serial_hex);
    }
    cluster.shutdown().await;
}

/// Spends the agent's whole allowance of server calls (the server is set to
/// one a second), so that the agent's next signing request is refused with
/// ResourceExhausted for up to a second.
async fn drain_agent_calls(cluster: &sigil_testkit::Cluster) {
    let mut client = crate::agent_api_as_the_agent(cluster).await;
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        let err = client
            .new_jwtsvid(sigil_proto::server::v1::NewJwtsvidRequest {
                entry_id: "no-such-entry".into(),
                audience: vec!["x".into()],
            })
            .await
            .unwrap_err();
        if err.code() == tonic::Code::ResourceExhausted {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent's calls were never limited: {err:?}"
        );
    }
}

/// Issue #12 item 7: once an entry's SPIFFE ID changes, the SVID signed for
/// the old ID is served to nobody, not even while the new one cannot be
/// signed yet (here: the server's rate limit refuses the first attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_entry_never_serves_the_svid_of_its_old_id() {
    let opts = sigil_testkit::ClusterOptions {
        server_limits: sigil_server::limits::ServerLimits {
            agent_calls: sigil_types::ratelimit::Rate::new(1, 1),
            ..Default::default()
        },
        ..Default::default()
    };
    let (cluster, me) = cluster_with_me(opts).await;
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = tokio::time::timeout(PROMPT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.spiffe_id(), &me);

    let mut snapshots = cluster.agent().unwrap().snapshots.clone();
    let mut entry: sigil_types::Entry = snapshots
        .borrow()
        .entries
        .iter()
        .find(|e| e.spiffe_id.to_string() == me.to_string())
        .map(|e| (**e).clone())
        .unwrap();
    let renamed: sigil_types::SpiffeId = "spiffe://example.org/renamed".parse().unwrap();
    entry.spiffe_id = renamed.clone();
    drain_agent_calls(&cluster).await;
    cluster
        .server()
        .unwrap()
        .state()
        .update_entry(entry)
        .await
        .unwrap();
    // The first state the agent publishes with the renamed entry.
    let snap = tokio::time::timeout(
        PROMPT,
        snapshots.wait_for(|s| s.entries.iter().any(|e| e.spiffe_id == renamed)),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(
        snap.svids
            .values()
            .all(|s| s.spiffe_id.to_string() != me.to_string()),
        "the agent offers the SVID of the entry's old ID"
    );
    // A new caller matching the entry gets the new ID (once signed), never the old.
    let svid = tokio::time::timeout(Duration::from_secs(15), client.fetch_x509_svid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(svid.spiffe_id().to_string(), renamed.to_string());
    // The open stream moves on to the new ID.
    let next = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.spiffe_id().to_string(), renamed.to_string());
    cluster.shutdown().await;
}

/// The lifetime a JWT-SVID was minted with (`exp - iat`), read unverified.
fn jwt_lifetime(token: &str) -> i64 {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&json).unwrap();
    claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap()
}

/// Issue #12 item 7: two entries with the same SPIFFE ID but different
/// attributes and JWT TTLs, for two callers (this process and uid 65534):
/// each caller gets a token minted for its own entry, not the other's from
/// the agent's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_sharing_a_spiffe_id_do_not_share_jwt_svids() {
    use std::os::unix::process::CommandExt;
    if !crate::need_root("entries_sharing_a_spiffe_id_do_not_share_jwt_svids") {
        return;
    }
    crate::init();
    let cluster = sigil_testkit::Cluster::start(Default::default())
        .await
        .unwrap();
    let uid = nix::unistd::getuid();
    let mine = cluster
        .register_with("/shared", &[&format!("unix:uid:{uid}")], |e| {
            e.jwt_svid_ttl = 600;
        })
        .await
        .unwrap();
    let theirs = cluster
        .register_with("/shared", &["unix:uid:65534"], |e| {
            e.jwt_svid_ttl = 1200;
            e.attributes = vec![sigil_types::Attribute::Cluster];
        })
        .await
        .unwrap();
    let mut snapshots = cluster.agent().unwrap().snapshots.clone();
    tokio::time::timeout(
        PROMPT,
        snapshots.wait_for(|s| {
            [&mine.id, &theirs.id]
                .iter()
                .all(|id| s.entries.iter().any(|e| &e.id == *id))
        }),
    )
    .await
    .unwrap()
    .unwrap();

    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let own = client.fetch_jwt_svid(["api"], None).await.unwrap();
    assert_eq!(own.spiffe_id().to_string(), "spiffe://example.org/shared");
    assert_eq!(jwt_lifetime(own.token()), 600);

    let copy = cluster.dir.path().join("sigil");
    std::fs::copy(assert_cmd::cargo::cargo_bin("sigil"), &copy).unwrap();
    let out = tokio::task::spawn_blocking({
        let socket = cluster.socket_uri();
        move || {
            std::process::Command::new(&copy)
                .args(["jwt", "fetch", "--audience", "api"])
                .env("SPIFFE_ENDPOINT_SOCKET", socket)
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Token     : "))
        .unwrap_or_else(|| panic!("no token in {stdout}"));
    assert_ne!(token, own.token(), "uid 65534 got this process's token");
    assert_eq!(jwt_lifetime(token), 1200);
    cluster.shutdown().await;
}
