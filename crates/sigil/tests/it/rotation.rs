//! Rotation end to end: a CA rotation happens under running workloads
//! without a single SVID that fails verification, while the agent renews its
//! own SVID under the new CA and stays connected. Renewal, backoff and
//! expiry timing are tested on paused time beside the agent's core
//! (`sigil_agent::core::tests::paused`).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use sigil_testkit::ClusterOptions;
use spiffe::WorkloadApiClient;

use crate::cluster_with_me;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_under_load_never_serves_an_unverifiable_svid() {
    let opts = ClusterOptions {
        x509_svid_ttl: Duration::from_secs(2),
        agent_svid_ttl: Some(Duration::from_secs(4)),
        ca_ttl: Duration::from_secs(12),
        rotation_tick: Duration::from_millis(250),
        ..Default::default()
    };
    let (cluster, _me) = cluster_with_me(opts).await;
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let mut issuers = BTreeSet::new();
    let mut updates = 0;
    let end = tokio::time::Instant::now() + Duration::from_secs(16);
    while tokio::time::Instant::now() < end {
        let Ok(next) = tokio::time::timeout_at(end, stream.next()).await else {
            break;
        };
        let ctx = next.expect("stream stays open").expect("valid context");
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        let roots: Vec<Vec<u8>> = ctx
            .bundle_set()
            .get(&td)
            .unwrap()
            .authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        for svid in ctx.svids() {
            let chain: Vec<Vec<u8>> = svid
                .cert_chain()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect();
            sigil_svid::x509::verify_svid(&chain, &roots, SystemTime::now())
                .expect("every pushed SVID verifies against the bundle pushed with it");
            let parsed = x509_parser::parse_x509_certificate(&chain[0]).unwrap().1;
            issuers.insert(parsed.issuer().to_string());
        }
        updates += 1;
    }
    assert!(updates >= 4, "SVIDs kept rotating ({updates} updates)");
    assert!(
        issuers.len() >= 2,
        "SVIDs from more than one CA were served: {issuers:?}"
    );
    // The agent is still connected across the rotation (its SVID was renewed
    // under the new CA and the server's SVID re-minted).
    assert!(cluster.agent().unwrap().snapshots.borrow().connected);
    cluster.shutdown().await;
}
