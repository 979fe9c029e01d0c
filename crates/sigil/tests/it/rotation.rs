//! Rotation end to end: agent SVIDs renew, and a CA rotation happens under
//! running workloads without a single SVID that fails verification.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use sigil_testkit::ClusterOptions;
use spiffe::WorkloadApiClient;

use crate::cluster_with_me;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_own_svid_and_keeps_working() {
    let opts = ClusterOptions {
        agent_svid_ttl: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let (cluster, _me) = cluster_with_me(opts).await;
    let state = cluster.server().unwrap().state().clone();
    let first = state
        .store()
        .get_agent(cluster.agent_id())
        .await
        .unwrap()
        .unwrap()
        .serial;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut serials = BTreeSet::from([first]);
    while serials.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent SVID was not renewed twice"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        serials.insert(
            state
                .store()
                .get_agent(cluster.agent_id())
                .await
                .unwrap()
                .unwrap()
                .serial,
        );
    }
    // Past the first SVID's expiry the agent still syncs and gets SVIDs signed.
    let uid = nix::unistd::getuid();
    let e = cluster
        .register("/after-renewals", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    cluster.wait_for_svid(&e.spiffe_id).await.unwrap();
    cluster.shutdown().await;
}

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
