//! Keep serving while the server is away; resume when it is back.

use spiffe::WorkloadApiClient;

use crate::cluster_with_me;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_while_the_server_is_down_serves_its_cache() {
    let (mut cluster, me) = cluster_with_me(Default::default()).await;
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let before = client.fetch_x509_svid().await.unwrap();
    drop(client);

    cluster.stop_server().await;
    cluster.stop_agent().await;
    cluster
        .start_agent()
        .await
        .expect("agent starts without server and without a token");

    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let after = client.fetch_x509_svid().await.unwrap();
    assert_eq!(after.spiffe_id(), &me);
    assert_eq!(
        after.leaf().as_bytes(),
        before.leaf().as_bytes(),
        "the cached SVID is served"
    );
    assert!(!cluster.agent().unwrap().snapshots.borrow().connected);

    // The server comes back; the agent reconnects by itself and resumes.
    cluster.start_server().await.unwrap();
    cluster.wait_connected(true).await.unwrap();
    let uid = nix::unistd::getuid();
    let e = cluster
        .register("/after-restart", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    cluster.wait_for_svid(&e.spiffe_id).await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_deleted_while_disconnected_are_dropped_on_resume() {
    let (mut cluster, _me) = cluster_with_me(Default::default()).await;
    let doomed = cluster
        .register("/doomed", &["unix:uid:5555"])
        .await
        .unwrap();
    cluster.wait_for_svid(&doomed.spiffe_id).await.unwrap();
    cluster.stop_agent().await;
    cluster
        .server()
        .unwrap()
        .state()
        .delete_entry(&doomed.id)
        .await
        .unwrap();
    let kept = cluster.register("/kept", &["unix:uid:5556"]).await.unwrap();
    cluster.start_agent().await.unwrap();
    cluster.wait_for_svid(&kept.spiffe_id).await.unwrap();
    let snap = cluster.agent().unwrap().snapshots.borrow().clone();
    assert!(
        snap.entries.iter().all(|e| e.id != doomed.id),
        "deleted entry is gone after resume"
    );
    assert!(snap.svids.values().all(|s| s.spiffe_id != doomed.spiffe_id));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_state_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let dir = &cluster.agent_config.data_dir;
    assert_eq!(
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for name in ["identity.json", "bundle.json", "cache.json"] {
        let mode = std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let admin = std::fs::metadata(cluster.admin_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(admin, 0o600, "admin socket");
    let api = std::fs::metadata(&cluster.agent_config.socket_path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        api, 0o777,
        "Workload API socket is open to every local user"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_are_deleted_and_leave_the_agent() {
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let e = cluster
        .register_with("/short-lived", &["unix:uid:7777"], |e| {
            e.expires_at = Some(now + 3600)
        })
        .await
        .unwrap();
    cluster.wait_for_svid(&e.spiffe_id).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    assert_eq!(state.prune_expired_entries(now).await, 0, "not yet expired");
    assert_eq!(state.prune_expired_entries(now + 3600).await, 1);
    assert!(state.index().get(&e.id).is_none());
    let mut rx = cluster.agent().unwrap().snapshots.clone();
    tokio::time::timeout(
        crate::PROMPT,
        rx.wait_for(|s| s.entries.iter().all(|x| x.id != e.id)),
    )
    .await
    .expect("the deletion is pushed to the agent")
    .unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_svids_are_withdrawn_while_the_server_is_down() {
    let (mut cluster, _me) = cluster_with_me(sigil_testkit::ClusterOptions {
        x509_svid_ttl: std::time::Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    cluster.stop_server().await;
    // Nothing else happens while the server is away: the expiry alone must
    // take the SVID out of what the agent serves.
    let mut rx = cluster.agent().unwrap().snapshots.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(15),
        rx.wait_for(|s| s.svids.is_empty()),
    )
    .await
    .expect("the expired SVID was withdrawn")
    .unwrap();
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let served = client.fetch_x509_svid().await;
    assert!(
        served.is_err(),
        "no expired SVID is served: {:?}",
        served.map(|s| s.leaf().as_bytes().len())
    );
    cluster.shutdown().await;
}
