//! The trust bundle publisher: names and contents (pure), and the running
//! publisher against a real sigil server and the fake kube-apiserver of
//! [`crate::fake_kube`]: objects follow a CA replacement (and a fresh agent
//! bootstraps from the published ConfigMap), namespaces opt in and out,
//! objects sigil does not own are left alone, API errors are retried.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::{Value, json};
use sigil_k8s_controller::publish::{
    self, PublishConfig, ServerBundles, check_signer_name, federated_bundle_name, object_label,
    own_bundle_name, trust_bundle_pem,
};
use sigil_k8s_controller::{ControllerConfig, kube_client, run};
use sigil_svid::bundle::Bundle;
use sigil_testkit::{Cluster, ClusterOptions};
use sigil_types::TrustDomain;
use tokio_util::sync::CancellationToken;

use crate::fake_kube::FakeKube;

const T: Duration = Duration::from_secs(30);

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + T;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

// ------------------------------------------------------------------ pure --

#[test]
fn names_follow_the_kubernetes_rules() {
    assert_eq!(
        own_bundle_name("sigil.dev/spiffe", &td("example.org")),
        "sigil.dev:spiffe:example.org"
    );
    assert_eq!(
        federated_bundle_name(&td("partner.test")),
        "sigil-federated.partner.test"
    );
    // Trust domains that are no DNS subdomain, or too long for a label
    // value, are hashed.
    for odd in ["under_score.org", &format!("{}.org", "a".repeat(70))] {
        let label = object_label(&td(odd));
        assert!(label.starts_with("td-"), "{label}");
        assert_eq!(label.len(), 35);
        assert!(
            label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
    assert_ne!(object_label(&td("a_b.org")), object_label(&td("a_c.org")));

    check_signer_name("sigil.dev/spiffe").unwrap();
    check_signer_name("example.com/my_signer-1").unwrap();
    for bad in [
        "",
        "spiffe",
        "sigil.dev/",
        "/spiffe",
        "localhost/spiffe",
        "Sigil.Dev/spiffe",
        "sigil.dev/a/b",
        "sigil.dev/a:b",
        "sigil.dev/a b",
        "sigil..dev/x",
    ] {
        assert!(check_signer_name(bad).is_err(), "{bad:?} accepted");
    }
    let mut c = PublishConfig::default();
    c.validate().unwrap();
    c.configmap_name = "Not_A_Name".into();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("ConfigMap name")
    );
    c = PublishConfig::default();
    c.namespaces.insert("a.b".into());
    assert!(c.validate().unwrap_err().to_string().contains("namespace"));
}

/// Two CA certificates as a server would publish them.
async fn two_cas() -> (Bundle, String) {
    let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let mut admin = sigil_client::AdminClient::connect(&cluster.admin_socket())
        .await
        .unwrap();
    admin.prepare_authority("x509").await.unwrap();
    let json = admin.bundle().await.unwrap().bundle_json;
    cluster.shutdown().await;
    (Bundle::from_json(td("example.org"), &json).unwrap(), json)
}

#[tokio::test]
async fn contents_are_exactly_the_servers_authorities() {
    let (bundle, json) = two_cas().await;
    assert_eq!(bundle.x509_authorities.len(), 2);
    // Duplicates are written once, in the server's order.
    let mut doubled = bundle.clone();
    doubled
        .x509_authorities
        .push(bundle.x509_authorities[0].clone());
    let pem = trust_bundle_pem(&doubled).unwrap();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert_eq!(pem, bundle.x509_pem());
    assert!(!pem.contains("PRIVATE"));

    let federated = vec![
        ("partner.test".to_owned(), json.clone()),
        ("jwt-only.test".to_owned(), r#"{"keys":[]}"#.to_owned()),
    ];
    let b = ServerBundles::from_answers("example.org", &json, &federated).unwrap();
    let data = b.configmap_data();
    assert_eq!(data[publish::KEY_PEM], pem);
    assert_eq!(data[publish::KEY_SPIFFE], json);
    assert_eq!(data[publish::KEY_TRUST_DOMAIN], "example.org");
    let ctbs = b.cluster_trust_bundles("sigil.dev/spiffe");
    assert_eq!(
        ctbs.keys().collect::<Vec<_>>(),
        [
            "sigil-federated.partner.test",
            "sigil.dev:spiffe:example.org"
        ],
        "no ClusterTrustBundle for a trust domain without X.509 authorities"
    );
    let own = &ctbs["sigil.dev:spiffe:example.org"];
    assert_eq!(own.spec.signer_name.as_deref(), Some("sigil.dev/spiffe"));
    assert_eq!(own.spec.trust_bundle, pem);
    let fed = &ctbs["sigil-federated.partner.test"];
    assert_eq!(fed.spec.signer_name, None);
    let labels = fed.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[publish::FEDERATED_LABEL], "true");
    assert_eq!(labels[publish::TRUST_DOMAIN_LABEL], "partner.test");
    assert_eq!(labels[publish::OWNER_LABEL], "example.org");

    // A bundle without X.509 authority, or one that does not parse, is
    // never published (it would lock new agents out, or delete objects).
    let refused = [
        ServerBundles::from_answers("example.org", r#"{"keys":[]}"#, &[]),
        ServerBundles::from_answers("example.org", "not json", &[]),
        ServerBundles::from_answers("example.org", &json, &[("p.test".into(), "{".into())]),
        ServerBundles::from_answers("Bad Domain", &json, &[]),
    ];
    for r in refused {
        assert!(r.is_err());
    }
}

// --------------------------------------------------------------- running --

fn namespace(name: &str, label: Option<&str>) -> Value {
    let mut labels = json!({"kubernetes.io/metadata.name": name});
    if let Some(v) = label {
        labels[publish::NAMESPACE_LABEL] = json!(v);
    }
    json!({"metadata": {"name": name, "labels": labels}})
}

fn data_of(fake: &FakeKube, ns: &str, name: &str) -> Option<Value> {
    fake.get("configmaps", ns, name).map(|o| o["data"].clone())
}

fn pem_of(fake: &FakeKube, ns: &str) -> Option<String> {
    data_of(fake, ns, "sigil-bundle").and_then(|d| d["bundle.pem"].as_str().map(str::to_owned))
}

/// Whether the server answers a TLS handshake anchored on this bundle file
/// with a GetBundle (what an agent does first).
async fn handshake_with(cluster: &Cluster, bundle_file: &std::path::Path) -> Result<(), String> {
    let bundle = sigil_agent::load_trust_bundle(bundle_file, cluster.trust_domain())
        .map_err(|e| e.to_string())?;
    let server_id = cluster
        .trust_domain()
        .id_with_path(sigil_types::SERVER_PATH)
        .unwrap();
    let attempt = async {
        let mut client = sigil_agent::client::connect(
            &cluster.agent_config.server_address,
            Arc::new(ArcSwap::from_pointee(bundle)),
            server_id,
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
        client
            .get_bundle(sigil_proto::server::v1::GetBundleRequest {})
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    };
    tokio::time::timeout(T, attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// The acceptance test of the publisher: the ConfigMap and the
/// ClusterTrustBundle follow a forced CA replacement on a real server, and
/// a fresh agent bootstraps from the new ConfigMap content while the old
/// content is refused by the server's TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_follows_a_ca_replacement_and_fresh_agents_bootstrap_from_it() {
    let fake = FakeKube::start().await;
    fake.put("namespaces", namespace("sigil", None));
    let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let client = kube_client(Some(&fake.kubeconfig(cluster.dir.path())))
        .await
        .unwrap();
    let mut config = ControllerConfig::new(cluster.admin_socket(), "demo");
    config.manage_federation = false;
    let mut p = PublishConfig::default();
    p.namespaces.insert("sigil".into());
    p.poll = Duration::from_millis(100);
    p.min_backoff = Duration::from_millis(100);
    config.publish = Some(p);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(client, config, shutdown.clone()));

    let mut admin = sigil_client::AdminClient::connect(&cluster.admin_socket())
        .await
        .unwrap();
    let server_pem = |json: String| {
        Bundle::from_json(td("example.org"), &json)
            .unwrap()
            .x509_pem()
    };
    eventually("the ConfigMap", || async {
        pem_of(&fake, "sigil").is_some()
    })
    .await;
    let old_pem = pem_of(&fake, "sigil").unwrap();
    assert_eq!(
        old_pem,
        server_pem(admin.bundle().await.unwrap().bundle_json)
    );
    let ctb = fake
        .get("clustertrustbundles", "", "sigil.dev:spiffe:example.org")
        .unwrap();
    assert_eq!(ctb["spec"]["signerName"], "sigil.dev/spiffe");
    assert_eq!(ctb["spec"]["trustBundle"], old_pem.as_str());

    let dir = tempfile::tempdir().unwrap();
    let old_file = dir.path().join("old-bundle.pem");
    std::fs::write(&old_file, &old_pem).unwrap();
    handshake_with(&cluster, &old_file).await.unwrap();

    // A forced replacement: prepare (published next to the old one),
    // activate, taint and revoke the old authority.
    let old_id = admin
        .list_authorities()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.kind == "x509" && a.state == "active")
        .unwrap()
        .id;
    admin.prepare_authority("x509").await.unwrap();
    eventually("both authorities in the ConfigMap", || async {
        pem_of(&fake, "sigil").is_some_and(|p| {
            p.matches("BEGIN CERTIFICATE").count() == 2 && p.contains(old_pem.trim_end())
        })
    })
    .await;
    admin.activate_authority("x509").await.unwrap();
    admin.taint_authority("x509", old_id.clone()).await.unwrap();
    // Still in the server's bundle: still published.
    let pem = pem_of(&fake, "sigil").unwrap();
    assert!(pem.contains(old_pem.trim_end()));
    admin.revoke_authority("x509", old_id).await.unwrap();
    let new_server_pem = server_pem(admin.bundle().await.unwrap().bundle_json);
    assert!(!new_server_pem.contains(old_pem.trim_end()));
    eventually("the ConfigMap to hold the server's new bundle", || async {
        pem_of(&fake, "sigil").as_deref() == Some(new_server_pem.as_str())
    })
    .await;
    eventually("the ClusterTrustBundle too", || async {
        fake.get("clustertrustbundles", "", "sigil.dev:spiffe:example.org")
            .is_some_and(|c| c["spec"]["trustBundle"] == new_server_pem.as_str())
    })
    .await;

    // A bundle file written from the ConfigMap: what the kubelet mounts.
    let new_file = dir.path().join("bundle.pem");
    std::fs::write(&new_file, pem_of(&fake, "sigil").unwrap()).unwrap();
    handshake_with(&cluster, &new_file).await.unwrap();
    let refused = handshake_with(&cluster, &old_file).await.unwrap_err();
    assert!(!refused.is_empty());
    // The SPIFFE JSON key works as a bundle file as well.
    let json_file = dir.path().join("bundle.spiffe.json");
    let data = data_of(&fake, "sigil", "sigil-bundle").unwrap();
    std::fs::write(&json_file, data["bundle.spiffe.json"].as_str().unwrap()).unwrap();
    handshake_with(&cluster, &json_file).await.unwrap();

    // A fresh agent (new data directory, join token) trusting the server
    // through the published file attests and connects.
    let token = cluster
        .server()
        .unwrap()
        .generate_join_token(None)
        .await
        .unwrap();
    let mut agent_config = sigil_agent::AgentConfig::with_defaults(
        cluster.trust_domain().clone(),
        cluster.server().unwrap().agent_api_addr().to_string(),
        dir.path().join("fresh-agent"),
    );
    agent_config.socket_path = dir.path().join("fresh-agent.sock");
    agent_config.join_token = Some(token.token);
    agent_config.trust_bundle_path = Some(new_file);
    let agent = tokio::time::timeout(T, sigil_agent::start(agent_config))
        .await
        .expect("the fresh agent did not start in time")
        .unwrap();
    let mut snaps = agent.snapshots.clone();
    tokio::time::timeout(T, snaps.wait_for(|s| s.connected))
        .await
        .unwrap()
        .unwrap();
    agent.shutdown().await;

    shutdown.cancel();
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    cluster.shutdown().await;
}

/// Namespaces opt in and out by label (exactly `"true"`), objects of the
/// wanted names that sigil does not own stay as they are and are reported,
/// federated bundles get their own ClusterTrustBundles, tampered objects
/// are repaired, and failing API requests are retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_opt_in_and_out_and_foreign_objects_stay() {
    let fake = FakeKube::start().await;
    fake.put("namespaces", namespace("sigil", None));
    fake.put("namespaces", namespace("team-a", Some("true")));
    fake.put("namespaces", namespace("team-b", Some("yes")));
    fake.put("namespaces", namespace("team-c", Some("true")));
    fake.put("namespaces", namespace("team-d", Some("")));
    let mine = json!({"metadata": {"name": "sigil-bundle", "namespace": "team-c"},
        "data": {"bundle.pem": "the team's own"}});
    fake.put("configmaps", mine.clone());
    let unrelated = json!({"metadata": {"name": "other", "namespace": "team-a",
        "labels": {"app.kubernetes.io/managed-by": "sigil-controller"}}, "data": {"x": "y"}});
    fake.put("configmaps", unrelated.clone());
    let squatter = json!({"metadata": {"name": "sigil-federated.partner.test"},
        "spec": {"trustBundle": "not sigil's"}});
    fake.put("clustertrustbundles", squatter);
    // Another server's objects (same managed-by label, other owner).
    let other_owner = json!({"metadata": {"name": "sigil-bundle", "namespace": "team-b",
        "labels": {"app.kubernetes.io/managed-by": "sigil-controller", "sigil.dev/owner": "other.org"}},
        "data": {"bundle.pem": "other.org's"}});
    fake.put("configmaps", other_owner.clone());

    let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let mut admin = sigil_client::AdminClient::connect(&cluster.admin_socket())
        .await
        .unwrap();
    let own_json = admin.bundle().await.unwrap().bundle_json;
    for d in ["partner.test", "other.test"] {
        admin
            .set_federated_bundle(&td(d), own_json.clone())
            .await
            .unwrap();
    }
    let client = kube_client(Some(&fake.kubeconfig(cluster.dir.path())))
        .await
        .unwrap();

    // One pass by hand: what it reports.
    let mut config = PublishConfig::default();
    config.namespaces.insert("sigil".into());
    let bundles = ServerBundles::from_answers(
        "example.org",
        &own_json,
        &[
            ("partner.test".into(), own_json.clone()),
            ("other.test".into(), own_json.clone()),
        ],
    )
    .unwrap();
    let wanted: BTreeSet<String> = ["sigil", "team-a", "team-c"]
        .into_iter()
        .map(String::from)
        .collect();
    let report = publish::publish_once(&client, &config, &bundles, &wanted).await;
    assert_eq!(
        report.conflicts,
        [
            "ConfigMap/team-c/sigil-bundle",
            "ClusterTrustBundle/sigil-federated.partner.test",
        ]
    );
    assert_eq!(report.created.len(), 4, "{report:?}");
    assert!(report.failures.is_empty(), "{report:?}");

    // The running publisher, with failing requests at first.
    fake.fail_next("configmaps", 3);
    fake.fail_next("clustertrustbundles", 2);
    config.poll = Duration::from_millis(100);
    config.resync = Duration::from_millis(500);
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(200);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(publish::run_publisher(
        client,
        cluster.admin_socket(),
        config,
        shutdown.clone(),
    ));
    eventually("the injected failures to be used up", || async {
        fake.failures_left("configmaps") == 0 && fake.failures_left("clustertrustbundles") == 0
    })
    .await;

    let pem = Bundle::from_json(td("example.org"), &own_json)
        .unwrap()
        .x509_pem();
    // A user tampers with a published ConfigMap: repaired at the resync.
    let mut tampered = fake.get("configmaps", "team-a", "sigil-bundle").unwrap();
    tampered["data"]["bundle.pem"] = json!("tampered");
    fake.put("configmaps", tampered);
    eventually("the tampered ConfigMap to be repaired", || async {
        pem_of(&fake, "team-a").as_deref() == Some(pem.as_str())
    })
    .await;
    assert_eq!(pem_of(&fake, "sigil").as_deref(), Some(pem.as_str()));
    for (ns, name, obj) in [
        ("team-c", "sigil-bundle", &mine),
        ("team-a", "other", &unrelated),
        ("team-b", "sigil-bundle", &other_owner),
    ] {
        assert_eq!(
            fake.get("configmaps", ns, name).unwrap()["data"],
            obj["data"],
            "{ns}/{name} is not sigil's and must stay"
        );
    }
    assert!(fake.get("configmaps", "team-d", "sigil-bundle").is_none());
    assert_eq!(
        fake.get("clustertrustbundles", "", "sigil-federated.partner.test")
            .unwrap()["spec"]["trustBundle"],
        "not sigil's"
    );
    let other = fake
        .get("clustertrustbundles", "", "sigil-federated.other.test")
        .unwrap();
    assert!(other["spec"]["signerName"].is_null());
    assert_eq!(other["spec"]["trustBundle"], pem.as_str());
    assert_eq!(
        other["metadata"]["annotations"][publish::TRUST_DOMAIN_ANNOTATION],
        "other.test"
    );

    // team-a leaves, team-b's label becomes "true" (its ConfigMap of the
    // same name belongs to another server: a conflict, left alone), team-e
    // comes labelled.
    fake.put("namespaces", namespace("team-a", None));
    fake.put("namespaces", namespace("team-b", Some("true")));
    fake.put("namespaces", namespace("team-e", Some("true")));
    eventually("team-e's ConfigMap and team-a's gone", || async {
        pem_of(&fake, "team-e").is_some()
            && fake.get("configmaps", "team-a", "sigil-bundle").is_none()
    })
    .await;
    assert_eq!(
        fake.get("configmaps", "team-b", "sigil-bundle").unwrap()["data"],
        other_owner["data"]
    );
    assert!(fake.get("configmaps", "team-a", "other").is_some());

    // A federated bundle leaves the server: its ClusterTrustBundle goes.
    admin
        .delete_federated_bundle(&td("other.test"))
        .await
        .unwrap();
    eventually("the federated ClusterTrustBundle to go", || async {
        fake.get("clustertrustbundles", "", "sigil-federated.other.test")
            .is_none()
    })
    .await;
    assert!(
        fake.get("clustertrustbundles", "", "sigil.dev:spiffe:example.org")
            .is_some()
    );

    shutdown.cancel();
    tokio::time::timeout(T, task).await.unwrap().unwrap();
    cluster.shutdown().await;
}

/// On a cluster that does not serve ClusterTrustBundles the ConfigMaps are
/// published all the same. The server's admin socket goes away: the
/// publisher keeps what it published (never an empty or partial bundle)
/// and catches up when the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cluster_trust_bundles_or_a_server_configmaps_stay() {
    let fake = FakeKube::start().await;
    fake.unserve("clustertrustbundles");
    fake.put("namespaces", namespace("sigil", None));
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let client = kube_client(Some(&fake.kubeconfig(cluster.dir.path())))
        .await
        .unwrap();
    let mut config = PublishConfig::default();
    config.namespaces.insert("sigil".into());
    config.poll = Duration::from_millis(100);
    config.resync = Duration::from_millis(200);
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(100);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(publish::run_publisher(
        client,
        cluster.admin_socket(),
        config,
        shutdown.clone(),
    ));
    eventually("the ConfigMap", || async {
        pem_of(&fake, "sigil").is_some()
    })
    .await;
    let before = pem_of(&fake, "sigil").unwrap();
    cluster.stop_server().await;
    let writes = fake.writes().len();
    // Several poll and backoff periods without a server.
    let waited = tokio::time::timeout(Duration::from_secs(1), async {
        std::future::pending::<()>().await;
    });
    assert!(waited.await.is_err());
    assert_eq!(
        fake.writes().len(),
        writes,
        "nothing written without the server"
    );
    assert_eq!(pem_of(&fake, "sigil").unwrap(), before);
    cluster.start_server().await.unwrap();
    let mut admin = sigil_client::AdminClient::connect(&cluster.admin_socket())
        .await
        .unwrap();
    admin.prepare_authority("x509").await.unwrap();
    eventually("the new authority after the outage", || async {
        pem_of(&fake, "sigil").is_some_and(|p| p.matches("BEGIN CERTIFICATE").count() == 2)
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(T, task).await.unwrap().unwrap();
    cluster.shutdown().await;
}
