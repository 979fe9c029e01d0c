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
