//! Identity attributes end to end: an agent attested with a Kubernetes PSAT
//! (fake API server: cluster eks-dev, node in us-east-1), a workload in a pod
//! (fake kubelet and /proc), and an entry that asks for attributes. Its
//! X509-SVIDs carry the attributes extension (read by sigil and by
//! `openssl x509 -text`), its JWT-SVIDs the claims; an entry without
//! attributes gets neither. The admin API refuses unknown attribute names.

use std::time::Duration;

use base64::Engine;
use serde_json::{Map, Value};
use sigil_agent::config::K8sWorkloadConfig;
use sigil_proto::server::v1 as pb;
use sigil_server::config::{PsatCluster, PsatVerification};
use sigil_svid::x509::{ATTRIBUTES_OID_STR, svid_attributes};
use sigil_testkit::fake_k8s::{
    FakeApiServer, FakeKubelet, NAMESPACE, SERVICE_ACCOUNT, fixture_bytes,
};
use sigil_types::{Attribute, Entry, Selectors, TrustDomain};
use spiffe::WorkloadApiClient;

use crate::init;
use crate::oidc::validate_raw;

/// A /proc with this process's cgroup file placing it in the `blog` pod
/// (namespace `default`, service account `default`) of the kubelet fixture.
fn fake_proc(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("proc");
    let me = root.join(std::process::id().to_string());
    std::fs::create_dir_all(&me).unwrap();
    std::fs::write(
        me.join("cgroup"),
        fixture_bytes("cgroup/spire_cgroups_pid_in_pod.txt").unwrap(),
    )
    .unwrap();
    root
}

fn claims_of(token: &str) -> Map<String, Value> {
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

fn pair(n: &str, v: &str) -> (String, String) {
    (n.to_owned(), v.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_attributes_reach_x509_and_jwt_svids_only_when_asked_for() {
    init();
    let api = FakeApiServer::start().await.unwrap();
    let kubelet = FakeKubelet::start(fixture_bytes("kubelet/spire_pod_list.json").unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let mut scfg = sigil_server::ServerConfig::with_defaults(td.clone(), dir.path().join("server"));
    scfg.bind_address = sigil_testkit::free_addr().unwrap();
    scfg.admin_socket = dir.path().join("admin.sock");
    scfg.jwt_issuer = Some("https://oidc.example.org".into());
    let mut cluster = PsatCluster::new(
        vec![format!("{NAMESPACE}:{SERVICE_ACCOUNT}")],
        PsatVerification::TokenReview,
    );
    cluster.kube_config_file = Some(api.kubeconfig(dir.path()).unwrap());
    scfg.k8s_psat.insert("eks-dev".into(), cluster);
    let server = sigil_server::start(scfg).await.unwrap();

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
        token_path,
    });
    acfg.k8s = Some(K8sWorkloadConfig {
        kubelet_url: kubelet.url(),
        token_path: dir.path().join("unused-token"),
        kubelet_ca_path: None,
        skip_kubelet_verification: false,
        node_name: Some("k8s-node-1".into()),
        proc_root: fake_proc(dir.path()),
        max_poll_attempts: 3,
        poll_retry_interval: Duration::from_millis(100),
        disable_container_selectors: false,
        kubelet_cgroup_root: "/".into(),
    });
    let agent = sigil_agent::start(acfg).await.unwrap();

    let pod = Selectors::parse_all(["k8s:ns:default", "k8s:sa:default"]).unwrap();
    let mut with = Entry::new(
        sigil_server::registry::new_entry_id().unwrap(),
        "spiffe://example.org/ns/default/sa/default/blog"
            .parse()
            .unwrap(),
        agent.agent_id.clone(),
        pod.clone(),
    );
    with.attributes = vec![
        Attribute::Cluster,
        Attribute::Region,
        Attribute::Namespace,
        Attribute::ServiceAccount,
    ];
    let with = server.state().create_entry(with).await.unwrap();
    let without = server
        .state()
        .create_entry(Entry::new(
            sigil_server::registry::new_entry_id().unwrap(),
            "spiffe://example.org/blog-plain".parse().unwrap(),
            agent.agent_id.clone(),
            pod,
        ))
        .await
        .unwrap();

    let mut rx = agent.snapshots.clone();
    tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|s| {
            [&with.spiffe_id, &without.spiffe_id]
                .iter()
                .all(|id| s.svids.values().any(|v| &v.spiffe_id == *id))
        }),
    )
    .await
    .expect("both SVIDs reach the agent")
    .unwrap();

    let client = WorkloadApiClient::connect_to(format!(
        "unix://{}",
        dir.path().join("agent.sock").display()
    ))
    .await
    .unwrap();
    let svids = client.fetch_all_x509_svids().await.unwrap();
    assert_eq!(svids.len(), 2);
    let leaf_of = |id: &str| {
        svids
            .iter()
            .find(|s| s.spiffe_id().to_string() == id)
            .unwrap_or_else(|| panic!("no SVID for {id}"))
            .leaf()
            .as_ref()
            .to_vec()
    };
    let leaf = leaf_of(with.spiffe_id.as_str());
    assert_eq!(
        svid_attributes(&leaf).unwrap(),
        vec![
            pair("cluster", "eks-dev"),
            pair("namespace", "default"),
            pair("region", "us-east-1"),
            pair("service_account", "default"),
        ]
    );
    let plain = leaf_of(without.spiffe_id.as_str());
    assert!(svid_attributes(&plain).unwrap().is_empty());

    // What OpenSSL shows: the extension by OID, non-critical, the values in it.
    let pem_path = dir.path().join("leaf.pem");
    std::fs::write(&pem_path, sigil_svid::pem::certs_to_pem(&[leaf])).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&pem_path)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(ATTRIBUTES_OID_STR))
        .unwrap_or_else(|| panic!("no attributes extension in:\n{text}"));
    assert!(!line.contains("critical"), "{line}");
    for v in [
        "cluster",
        "eks-dev",
        "region",
        "us-east-1",
        "service_account",
    ] {
        assert!(text.contains(v), "{v} not shown:\n{text}");
    }
    std::fs::write(&pem_path, sigil_svid::pem::certs_to_pem(&[plain])).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&pem_path)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(ATTRIBUTES_OID_STR));

    // JWT-SVIDs: flat claims named like the attributes.
    let jwt = client
        .fetch_jwt_svid(
            ["sts.amazonaws.com"],
            Some(&with.spiffe_id.as_str().parse().unwrap()),
        )
        .await
        .unwrap();
    let claims = claims_of(jwt.token());
    assert_eq!(claims["sub"], with.spiffe_id.as_str());
    assert_eq!(claims["iss"], "https://oidc.example.org");
    assert_eq!(claims["cluster"], "eks-dev");
    assert_eq!(claims["region"], "us-east-1");
    assert_eq!(claims["namespace"], "default");
    assert_eq!(claims["service_account"], "default");
    assert!(!claims.contains_key("zone") && !claims.contains_key("node_name"));
    // ValidateJWTSVID hands them to the relying workload.
    let validated = validate_raw(
        &dir.path().join("agent.sock"),
        "sts.amazonaws.com",
        jwt.token(),
    )
    .await
    .unwrap();
    let fields = validated.claims.unwrap().fields;
    assert_eq!(
        fields["region"].kind,
        Some(prost_types::value::Kind::StringValue("us-east-1".into()))
    );

    let jwt = client
        .fetch_jwt_svid(
            ["sts.amazonaws.com"],
            Some(&without.spiffe_id.as_str().parse().unwrap()),
        )
        .await
        .unwrap();
    let mut names: Vec<String> = claims_of(jwt.token()).keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["aud", "exp", "iat", "iss", "sub"]);

    agent.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_unknown_attribute_names() {
    init();
    let cluster = sigil_testkit::Cluster::start(Default::default())
        .await
        .unwrap();
    let channel = sigil_client::channel(&cluster.admin_socket())
        .await
        .unwrap();
    let mut admin = pb::admin_api_client::AdminApiClient::new(channel);
    let entry = |attributes: &[&str]| pb::Entry {
        spiffe_id: "spiffe://example.org/attr".into(),
        parent_id: cluster.agent_id().to_string(),
        selectors: vec!["unix:uid:1234".into()],
        attributes: attributes.iter().map(|a| (*a).to_owned()).collect(),
        ..Default::default()
    };
    let refused = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![entry(&["region", "planet"])],
        })
        .await
        .unwrap()
        .into_inner();
    let error = &refused.results[0].error;
    assert!(
        error.contains("unknown attribute \"planet\"") && error.contains("service_account"),
        "{error}"
    );
    let server = cluster.server().unwrap();
    assert!(
        server
            .state()
            .store()
            .list_entries()
            .await
            .unwrap()
            .entries
            .is_empty(),
        "a refused entry is not stored"
    );

    // Known names are taken, and an update with an unknown one changes nothing.
    let created = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![entry(&["zone", "cluster"])],
        })
        .await
        .unwrap()
        .into_inner();
    let stored = created.results[0].entry.clone().expect("created");
    assert_eq!(stored.attributes, ["cluster", "zone"]);
    let mut update = stored.clone();
    update.attributes = vec!["Cluster".into()];
    let refused = admin
        .batch_update_entry(pb::BatchUpdateEntryRequest {
            entries: vec![update],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        refused.results[0]
            .error
            .contains("unknown attribute \"Cluster\""),
        "{}",
        refused.results[0].error
    );
    let entries = server.state().store().list_entries().await.unwrap().entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].attributes, [Attribute::Cluster, Attribute::Zone]);
    cluster.shutdown().await;
}
