//! Pod attestation end to end: a workload whose cgroup file places it in a
//! pod gets the pod's `k8s:` selectors from a (fake) kubelet, through the
//! real agent, and an identity registered on them.

use std::time::Duration;

use sigil_agent::config::K8sWorkloadConfig;
use sigil_testkit::fake_k8s::{FakeKubelet, fixture_bytes};
use sigil_testkit::{Cluster, ClusterOptions};
use spiffe::WorkloadApiClient;

use crate::init;

/// A /proc with this process's cgroup file replaced by a recorded one.
fn fake_proc(dir: &std::path::Path, cgroup_fixture: &str) -> std::path::PathBuf {
    let root = dir.join("proc");
    let me = root.join(std::process::id().to_string());
    std::fs::create_dir_all(&me).unwrap();
    std::fs::write(me.join("cgroup"), fixture_bytes(cgroup_fixture).unwrap()).unwrap();
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_in_a_pod_gets_the_identity_registered_for_its_pod() {
    init();
    let kubelet = FakeKubelet::start(fixture_bytes("kubelet/spire_pod_list.json").unwrap())
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let proc_root = fake_proc(work.path(), "cgroup/spire_cgroups_pid_in_pod.txt");
    let opts = ClusterOptions {
        agent_k8s: Some(K8sWorkloadConfig {
            kubelet_url: kubelet.url(),
            token_path: work.path().join("unused-token"),
            kubelet_ca_path: None,
            skip_kubelet_verification: false,
            node_name: Some("k8s-node-1".into()),
            proc_root,
            max_poll_attempts: 3,
            poll_retry_interval: Duration::from_millis(100),
            disable_container_selectors: false,
            kubelet_cgroup_root: "/".into(),
        }),
        ..Default::default()
    };
    let cluster = Cluster::start(opts).await.unwrap();
    let uid = nix::unistd::getuid();
    let blog = cluster
        .register(
            "/ns/default/sa/default/blog",
            &[
                "k8s:ns:default",
                "k8s:pod-label:k8s-app:blog",
                "k8s:container-name:blog",
            ],
        )
        .await
        .unwrap();
    let other = cluster
        .register(
            "/ns/kube-system/flannel",
            &["k8s:ns:kube-system", &format!("unix:uid:{uid}")],
        )
        .await
        .unwrap();
    cluster.wait_for_svid(&blog.spiffe_id).await.unwrap();
    cluster.wait_for_svid(&other.spiffe_id).await.unwrap();

    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let svids = client.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        vec!["spiffe://example.org/ns/default/sa/default/blog"],
        "only the pod's entry matches"
    );
    assert!(kubelet.requests() >= 1);

    // Concurrent callers share the cached pod list instead of one fetch each.
    let before = kubelet.requests();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = WorkloadApiClient::connect_to(cluster.socket_uri())
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            c.fetch_x509_svid().await.map(|s| s.spiffe_id().to_string())
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap().unwrap(),
            "spiffe://example.org/ns/default/sa/default/blog"
        );
    }
    assert!(
        kubelet.requests() - before <= 2,
        "{} kubelet requests for 8 callers",
        kubelet.requests() - before
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_outside_any_pod_gets_only_unix_selectors() {
    init();
    let work = tempfile::tempdir().unwrap();
    let proc_root = fake_proc(work.path(), "cgroup/spire_cgroups_pid_not_in_pod.txt");
    only_the_unix_identity(work.path(), proc_root, "k8s:ns:default").await;
}

/// Starts an agent that reads `proc_root` and the blog pod's kubelet, and
/// checks that this process gets its `unix:uid` entry and not the one on
/// `pod_selector`; returns the kubelet for more checks.
async fn only_the_unix_identity(
    work: &std::path::Path,
    proc_root: std::path::PathBuf,
    pod_selector: &str,
) -> FakeKubelet {
    let kubelet = FakeKubelet::start(fixture_bytes("kubelet/spire_pod_list.json").unwrap())
        .await
        .unwrap();
    let opts = ClusterOptions {
        agent_k8s: Some(K8sWorkloadConfig {
            kubelet_url: kubelet.url(),
            token_path: work.join("unused-token"),
            kubelet_ca_path: None,
            skip_kubelet_verification: false,
            node_name: None,
            proc_root,
            max_poll_attempts: 2,
            poll_retry_interval: Duration::from_millis(50),
            disable_container_selectors: false,
            kubelet_cgroup_root: "/".into(),
        }),
        ..Default::default()
    };
    let cluster = Cluster::start(opts).await.unwrap();
    let uid = nix::unistd::getuid();
    let pod_only = cluster
        .register("/pod-only", &[pod_selector])
        .await
        .unwrap();
    let host = cluster
        .register("/host", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    cluster.wait_for_svid(&pod_only.spiffe_id).await.unwrap();
    cluster.wait_for_svid(&host.spiffe_id).await.unwrap();
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let ids: Vec<String> = client
        .fetch_all_x509_svids()
        .await
        .unwrap()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(ids, vec!["spiffe://example.org/host"]);
    cluster.shutdown().await;
    kubelet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_attests_its_node_with_a_projected_token_and_reattests() {
    use sigil_server::config::{PsatCluster, PsatVerification};
    use sigil_testkit::fake_k8s::{FakeApiServer, NAMESPACE, NODE_UID, SERVICE_ACCOUNT};
    init();
    let api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let td = sigil_types::TrustDomain::new("example.org").unwrap();
    let mut scfg = sigil_server::ServerConfig::with_defaults(td.clone(), dir.path().join("server"));
    scfg.bind_address = sigil_testkit::free_addr().unwrap();
    scfg.admin_socket = dir.path().join("admin.sock");
    let mut cluster = PsatCluster::new(
        vec![format!("{NAMESPACE}:{SERVICE_ACCOUNT}")],
        PsatVerification::TokenReview,
    );
    cluster.kube_config_file = Some(api.kubeconfig(dir.path()).unwrap());
    scfg.k8s_psat.insert("eks-dev".into(), cluster);
    // Short agent SVIDs, so the agent re-attests with its token during the test.
    scfg.agent_svid_ttl = Duration::from_secs(4);
    let server = sigil_server::start(scfg.clone()).await.unwrap();

    // What a DaemonSet gives the agent: the projected token and the bundle.
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, api.token().unwrap()).unwrap();
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, server.state().ca().bundle().x509_pem()).unwrap();
    let mut acfg = sigil_agent::AgentConfig::with_defaults(
        td,
        server.agent_api_addr().to_string(),
        dir.path().join("agent"),
    );
    acfg.socket_path = dir.path().join("agent.sock");
    acfg.trust_bundle_path = Some(bundle_path);
    acfg.k8s_psat = Some(sigil_agent::config::PsatConfig {
        cluster: "eks-dev".into(),
        token_path: token_path.clone(),
    });
    let agent = sigil_agent::start(acfg.clone()).await.unwrap();
    let expected = format!("spiffe://example.org/sigil/agent/k8s_psat/eks-dev/{NODE_UID}");
    assert_eq!(agent.agent_id.to_string(), expected);
    let record = server
        .state()
        .store()
        .get_agent(&agent.agent_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.attestation_type, "k8s_psat");
    for want in [
        "k8s_psat:cluster:eks-dev",
        "k8s_psat:agent_ns:kube-system",
        "k8s_psat:agent_sa:aws-node",
        "k8s_psat:agent_node_uid:d06a4e91-b2e9-4907-a60a-66fd3932aaea",
        "k8s_psat:region:us-east-1",
        "k8s_psat:zone:us-east-1a",
    ] {
        assert!(
            record.selectors.iter().any(|s| s.to_string() == want),
            "missing {want}: {:?}",
            record.selectors
        );
    }

    // A node alias on the location selectors reaches this agent: identities
    // that depend on where the workload runs.
    let alias = sigil_types::Entry::new(
        "alias-us-east-1".parse().unwrap(),
        "spiffe://example.org/region/us-east-1".parse().unwrap(),
        "spiffe://example.org/sigil/server".parse().unwrap(),
        sigil_types::Selectors::parse_all([
            "k8s_psat:cluster:eks-dev",
            "k8s_psat:region:us-east-1",
        ])
        .unwrap(),
    );
    server.state().create_entry(alias).await.unwrap();
    let uid = nix::unistd::getuid();
    let e = sigil_types::Entry::new(
        "api-in-us-east-1".parse().unwrap(),
        "spiffe://example.org/region/us-east-1/ns/backend/sa/api"
            .parse()
            .unwrap(),
        "spiffe://example.org/region/us-east-1".parse().unwrap(),
        sigil_types::Selectors::parse_all([format!("unix:uid:{uid}")]).unwrap(),
    );
    server.state().create_entry(e).await.unwrap();
    let mut rx = agent.snapshots.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| {
            s.svids
                .values()
                .any(|v| v.spiffe_id.to_string().ends_with("/ns/backend/sa/api"))
        }),
    )
    .await
    .expect("the location-aware identity reaches the agent")
    .unwrap();

    // The agent renews by re-attesting with a fresh token: the same record,
    // a new serial, and the TokenReview asked again.
    let reviews = |api: &FakeApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.contains("tokenreviews"))
            .count()
    };
    let first_reviews = reviews(&api);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = server
            .state()
            .store()
            .get_agent(&agent.agent_id)
            .await
            .unwrap()
            .unwrap();
        if now.serial != record.serial && reviews(&api) > first_reviews {
            assert_eq!(now.created_at, record.created_at);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not re-attest"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Evicted, the agent is refused; it attests again with its token by
    // itself and keeps serving, under the same ID.
    server.state().evict_agent(&agent.agent_id).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let back = server
            .state()
            .store()
            .get_agent(&agent.agent_id)
            .await
            .unwrap();
        if back.is_some() && server.state().is_connected(&agent.agent_id) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the evicted agent did not attest again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The server away for longer than the agent SVID lives: when it is back,
    // the agent, whose SVID expired meanwhile, attests again by itself.
    let agent_id = agent.agent_id.clone();
    server.shutdown().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let server = sigil_server::start(scfg).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !server.state().is_connected(&agent_id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent with an expired SVID did not attest again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.shutdown().await;

    // Without a token file the agent cannot attest; with its saved SVID it
    // restarts anyway.
    std::fs::remove_file(&token_path).unwrap();
    let again = sigil_agent::start(acfg).await.unwrap();
    assert_eq!(again.agent_id.to_string(), expected);
    again.shutdown().await;
    server.shutdown().await;
}

/// Issue #12 item 4, through the real agent: a host process in a cgroup of
/// its user's systemd-delegated subtree named like the blog pod's container,
/// with a mount table (its own mount namespace) that bind-mounts the blog
/// pod's cgroup, gets its unix identity and not the pod's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_in_a_cgroup_shaped_like_a_pods_gets_only_unix_selectors() {
    init();
    let work = tempfile::tempdir().unwrap();
    let proc_root = work.path().join("proc");
    let me = proc_root.join(std::process::id().to_string());
    std::fs::create_dir_all(&me).unwrap();
    let blog = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/docker-9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961.scope";
    std::fs::write(
        me.join("cgroup"),
        format!("0::/user.slice/user-1000.slice/user@1000.service/app.slice/{blog}\n"),
    )
    .unwrap();
    std::fs::write(
        me.join("mountinfo"),
        format!("30 29 0:26 /{blog} /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"),
    )
    .unwrap();
    let pod = "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796";
    let kubelet = only_the_unix_identity(work.path(), proc_root, pod).await;
    assert_eq!(kubelet.requests(), 0, "no pod list is needed to refuse");
}
