//! The entry controller: the generated CRD manifests, the reconciler core on
//! pods of the recorded two-zone EKS node list, and the admin-API side
//! against a real server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use serde_json::json;
use sigil_k8s_controller::crd::{ClusterStaticEntrySpec, LabelSelector};
use sigil_k8s_controller::reconcile::Owner;
use sigil_k8s_controller::{
    ClusterSPIFFEID, ClusterSPIFFEIDSpec, ClusterStaticEntry, Desired, Mode, Settings, Snapshot,
    crd_manifests, crds, plan, render,
};
use sigil_testkit::fake_k8s::fixture_json;
use sigil_types::{Entry, Selectors, TrustDomain};

// ------------------------------------------------------------------ CRDs --

fn crd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
}

#[test]
fn crds_are_current() {
    let fresh = crd_manifests().unwrap();
    let dir = crd_dir();
    if std::env::var_os("SIGIL_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in &fresh {
            std::fs::write(dir.join(name), text).unwrap();
            eprintln!("wrote deploy/crds/{name}");
        }
        return;
    }
    let mut problems = Vec::new();
    for (name, text) in &fresh {
        match std::fs::read_to_string(dir.join(name)) {
            Err(_) => problems.push(format!("deploy/crds/{name} is missing")),
            Ok(old) if &old != text => problems.push(format!("deploy/crds/{name} is out of date")),
            Ok(_) => {}
        }
    }
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && !fresh.contains_key(&name) {
            problems.push(format!("deploy/crds/{name} is no longer generated"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nthe CRD types changed: run `SIGIL_BLESS=1 cargo test -p sigil-k8s --test it controller::crds_are_current` and commit deploy/crds/",
        problems.join("\n")
    );
}

#[test]
fn crd_yaml_reads_back_as_the_crds() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let manifests = crd_manifests().unwrap();
    let mut parsed: Vec<CustomResourceDefinition> = manifests
        .values()
        .map(|y| serde_saphyr::from_str(y).unwrap())
        .collect();
    parsed.sort_by(|a, b| a.spec.names.kind.cmp(&b.spec.names.kind));
    let mut want = crds();
    want.sort_by(|a, b| a.spec.names.kind.cmp(&b.spec.names.kind));
    assert_eq!(
        serde_json::to_value(&parsed).unwrap(),
        serde_json::to_value(&want).unwrap()
    );
    for crd in &want {
        assert_eq!(crd.spec.group, "identity.sigil");
        assert_eq!(crd.spec.scope, "Cluster");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
    }
    let all = sigil_k8s_controller::crds_yaml().unwrap();
    assert_eq!(
        all.matches("\n---\n").count() + usize::from(all.starts_with("---\n")),
        3
    );
}

// -------------------------------------------------------------- fixtures --

const NODE_A: &str = "ip-10-0-10-170.ec2.internal"; // us-east-1a
const NODE_A_UID: &str = "d06a4e91-b2e9-4907-a60a-66fd3932aaea";
const NODE_B: &str = "ip-10-0-20-143.ec2.internal"; // us-east-1b

fn settings() -> Settings {
    Settings::new(TrustDomain::new("example.org").unwrap(), "eks-dev").unwrap()
}

fn nodes() -> Vec<Arc<Node>> {
    let list = fixture_json("nodes/eks131_nodelist_two_zones.json").unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| Arc::new(serde_json::from_value(n.clone()).unwrap()))
        .collect()
}

fn namespace(name: &str, labels: serde_json::Value) -> Arc<Namespace> {
    Arc::new(serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap())
}

fn pod(ns: &str, name: &str, sa: &str, node: &str, labels: serde_json::Value) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"), "labels": labels},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap(),
    )
}

fn csid(name: &str, spec: ClusterSPIFFEIDSpec) -> Arc<ClusterSPIFFEID> {
    let mut r = ClusterSPIFFEID::new(name, spec);
    r.metadata.generation = Some(3);
    Arc::new(r)
}

fn ns_sa_spec(mode: Mode) -> ClusterSPIFFEIDSpec {
    ClusterSPIFFEIDSpec {
        spiffe_id_template:
            "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
                .into(),
        mode,
        ..Default::default()
    }
}

/// Namespaces `shop` and `kube-system`, and `n` pods of `shop/web` spread
/// over both nodes.
fn pods_on_two_nodes(n: usize) -> Snapshot {
    Snapshot {
        namespaces: vec![
            namespace("shop", json!({"team": "shop"})),
            namespace("kube-system", json!({})),
        ],
        nodes: nodes(),
        pods: (0..n)
            .map(|i| {
                let node = if i % 2 == 0 { NODE_A } else { NODE_B };
                pod(
                    "shop",
                    &format!("web-{i}"),
                    "web",
                    node,
                    json!({"app": "web"}),
                )
            })
            .collect(),
        ..Default::default()
    }
}

fn workload_entries(d: &Desired) -> Vec<&Entry> {
    d.entries
        .values()
        .map(|d| &d.entry)
        .filter(|e| !e.is_node_alias())
        .collect()
}

fn sel(v: &[&str]) -> Selectors {
    Selectors::parse_all(v).unwrap()
}

// ------------------------------------------------------------- rendering --

#[test]
fn per_pod_renders_one_entry_per_pod_under_its_node_agent() {
    let mut snap = pods_on_two_nodes(4);
    snap.cluster_spiffe_ids = vec![csid("pods", ns_sa_spec(Mode::PerPod))];
    let s = settings();
    let d = render(&s, &snap);
    let entries = workload_entries(&d);
    assert_eq!(entries.len(), 4);
    assert_eq!(d.entries.len(), 4, "no node alias in PerPod mode");
    let e = entries
        .iter()
        .find(|e| e.selectors == sel(&["k8s:pod-uid:uid-shop-web-0"]))
        .unwrap();
    assert_eq!(e.spiffe_id.as_str(), "spiffe://example.org/ns/shop/sa/web");
    assert_eq!(
        e.parent_id.as_str(),
        format!("spiffe://example.org/sigil/agent/k8s_psat/eks-dev/{NODE_A_UID}")
    );
    assert!(s.is_owned(&e.id));
    assert!(e.id.as_str().starts_with("k8s-eks-dev-"));
    let st = &d.spiffe_id_status["pods"];
    assert_eq!(st.observed_generation, Some(3));
    assert_eq!(st.stats.pods_selected, 4);
    assert_eq!(st.stats.entries_rendered, 4);
    assert_eq!(st.stats.namespaces_selected, 1, "kube-system is ignored");
    assert!(st.errors.is_empty(), "{:?}", st.errors);
}

#[test]
fn per_service_account_renders_one_entry_for_thirty_pods() {
    let mut snap = pods_on_two_nodes(30);
    snap.cluster_spiffe_ids = vec![csid("by-sa", ns_sa_spec(Mode::PerServiceAccount))];
    let d = render(&settings(), &snap);
    let entries = workload_entries(&d);
    assert_eq!(entries.len(), 1);
    let e = entries[0];
    assert_eq!(e.spiffe_id.as_str(), "spiffe://example.org/ns/shop/sa/web");
    assert_eq!(e.selectors, sel(&["k8s:ns:shop", "k8s:sa:web"]));
    assert_eq!(
        e.parent_id.as_str(),
        "spiffe://example.org/sigil/k8s/eks-dev/nodes"
    );
    let alias = &d
        .entries
        .values()
        .find(|d| d.entry.is_node_alias())
        .unwrap();
    assert_eq!(alias.entry.spiffe_id, e.parent_id);
    assert_eq!(alias.entry.selectors, sel(&["k8s_psat:cluster:eks-dev"]));
    assert_eq!(
        alias.owners.iter().collect::<Vec<_>>(),
        vec![&Owner::NodeAlias]
    );
    let st = &d.spiffe_id_status["by-sa"];
    assert_eq!((st.stats.pods_selected, st.stats.entries_rendered), (30, 1));

    // The same pods, one entry per pod in PerPod mode.
    snap.cluster_spiffe_ids = vec![csid("by-sa", ns_sa_spec(Mode::PerPod))];
    assert_eq!(workload_entries(&render(&settings(), &snap)).len(), 30);
}

#[test]
fn per_service_account_splits_by_zone_under_zone_aliases() {
    let mut spec = ns_sa_spec(Mode::PerServiceAccount);
    spec.spiffe_id_template = "spiffe://{{ .TrustDomain }}/zone/{{ index .NodeMeta.Labels \"topology.kubernetes.io/zone\" }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}".into();
    let mut snap = pods_on_two_nodes(10);
    snap.cluster_spiffe_ids = vec![csid("zonal", spec)];
    let d = render(&settings(), &snap);
    let mut ids: Vec<(String, String)> = workload_entries(&d)
        .iter()
        .map(|e| (e.spiffe_id.to_string(), e.parent_id.to_string()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            (
                "spiffe://example.org/zone/us-east-1a/ns/shop/sa/web".to_owned(),
                "spiffe://example.org/sigil/k8s/eks-dev/nodes/zone/us-east-1a".to_owned()
            ),
            (
                "spiffe://example.org/zone/us-east-1b/ns/shop/sa/web".to_owned(),
                "spiffe://example.org/sigil/k8s/eks-dev/nodes/zone/us-east-1b".to_owned()
            ),
        ]
    );
    let mut aliases: Vec<Selectors> = d
        .entries
        .values()
        .filter(|d| d.entry.is_node_alias())
        .map(|d| d.entry.selectors.clone())
        .collect();
    aliases.sort();
    assert_eq!(
        aliases,
        vec![
            sel(&["k8s_psat:cluster:eks-dev", "k8s_psat:zone:us-east-1a"]),
            sel(&["k8s_psat:cluster:eks-dev", "k8s_psat:zone:us-east-1b"]),
        ]
    );
    assert_eq!(d.spiffe_id_status["zonal"].stats.entries_rendered, 2);
}

#[test]
fn per_service_account_refuses_per_pod_fields() {
    for template in [
        "spiffe://example.org/{{ .PodMeta.Name }}",
        "spiffe://example.org/{{ index .PodMeta.Labels \"app\" }}",
        "spiffe://example.org/{{ .NodeMeta.UID }}",
        "spiffe://example.org/{{ index .NodeMeta.Labels \"kubernetes.io/hostname\" }}",
    ] {
        let mut spec = ns_sa_spec(Mode::PerServiceAccount);
        spec.spiffe_id_template = template.into();
        let mut snap = pods_on_two_nodes(3);
        snap.cluster_spiffe_ids = vec![csid("bad", spec)];
        let d = render(&settings(), &snap);
        assert!(d.entries.is_empty(), "{template}");
        let st = &d.spiffe_id_status["bad"];
        assert!(
            st.errors[0].contains("differs between the pods of a service account"),
            "{template}: {:?}",
            st.errors
        );
    }
}

#[test]
fn invalid_templates_and_ids_are_reported_and_create_nothing() {
    let cases = [
        ("spiffe://{{ .TrustDomain }/x", "unclosed"),
        ("spiffe://{{ .PodMeta.Nope }}/x", "unknown field"),
        (
            "spiffe://other.org/{{ .PodMeta.Name }}",
            "not in the trust domain",
        ),
        ("https://example.org/{{ .PodMeta.Name }}", "scheme"),
        (
            "spiffe://example.org/{{ index .PodMeta.Labels \"tier\" }}",
            "pod label \"tier\" is not set",
        ),
        (
            "spiffe://example.org/a/{{ .PodMeta.Name }}/b c",
            "path segment",
        ),
        // sigil's own identities: the server, the agents, the /sigil space.
        ("spiffe://{{ .TrustDomain }}/sigil/server", "reserved"),
        (
            "spiffe://{{ .TrustDomain }}/sigil/agent/k8s_psat/eks-dev/{{ .PodMeta.Name }}",
            "reserved",
        ),
        (
            "spiffe://{{ .TrustDomain }}/Sigil/{{ .PodMeta.Name }}",
            "reserved",
        ),
    ];
    for (template, want) in cases {
        let mut spec = ns_sa_spec(Mode::PerPod);
        spec.spiffe_id_template = template.into();
        let mut snap = pods_on_two_nodes(3);
        snap.cluster_spiffe_ids = vec![csid("bad", spec)];
        let d = render(&settings(), &snap);
        assert!(d.entries.is_empty(), "{template}");
        let st = &d.spiffe_id_status["bad"];
        assert!(
            st.errors.iter().any(|e| e.contains(want)),
            "{template}: want {want:?} in {:?}",
            st.errors
        );
        assert_eq!(st.stats.entries_rendered, 0);
    }
    // Bad extra settings are errors of the resource as a whole.
    for (mutate, want) in [
        (
            Box::new(|s: &mut ClusterSPIFFEIDSpec| s.x509_svid_ttl = Some("10 parsecs".into()))
                as Box<dyn Fn(&mut ClusterSPIFFEIDSpec)>,
            "x509SVIDTTL",
        ),
        (
            Box::new(|s: &mut ClusterSPIFFEIDSpec| s.federates_with = vec!["Bad Domain".into()]),
            "federatesWith",
        ),
        (
            Box::new(|s: &mut ClusterSPIFFEIDSpec| {
                s.workload_selector_templates = vec!["nocolon".into()]
            }),
            "type:value",
        ),
        (
            Box::new(|s: &mut ClusterSPIFFEIDSpec| s.dns_name_templates = vec!["a_b".into()]),
            "invalid DNS name",
        ),
        (
            Box::new(|s: &mut ClusterSPIFFEIDSpec| {
                s.pod_selector = Some(
                    serde_json::from_value(
                        json!({"matchExpressions": [{"key": "a", "operator": "Gt"}]}),
                    )
                    .unwrap(),
                )
            }),
            "operator",
        ),
    ] {
        let mut spec = ns_sa_spec(Mode::PerPod);
        mutate(&mut spec);
        let mut snap = pods_on_two_nodes(2);
        snap.cluster_spiffe_ids = vec![csid("bad", spec)];
        let d = render(&settings(), &snap);
        assert!(d.entries.is_empty(), "{want}");
        let errors = &d.spiffe_id_status["bad"].errors;
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "want {want:?} in {errors:?}"
        );
    }
}

#[test]
fn templates_fill_selectors_dns_names_and_settings() {
    let spec = ClusterSPIFFEIDSpec {
        spiffe_id_template: "spiffe://{{ .TrustDomain }}/{{ .ClusterName }}/{{ .PodMeta.Namespace }}/{{ index .PodMeta.Labels \"app\" }}".into(),
        workload_selector_templates: vec!["k8s:pod-label:app:{{ index .PodMeta.Labels \"app\" }}".into()],
        dns_name_templates: vec![
            "{{ .PodMeta.Name }}.{{ .PodMeta.Namespace }}.svc.{{ .ClusterDomain }}".into(),
            "{{ index .PodMeta.Labels \"app\" }}.{{ .PodMeta.Namespace }}".into(),
        ],
        federates_with: vec!["partner.org".into(), "partner.org".into()],
        attributes: vec!["region".into(), "namespace".into(), "region".into()],
        x509_svid_ttl: Some("30m".into()),
        jwt_svid_ttl: Some("5m".into()),
        hint: Some("internal".into()),
        ..Default::default()
    };
    let mut snap = pods_on_two_nodes(1);
    snap.cluster_spiffe_ids = vec![csid("full", spec)];
    let d = render(&settings(), &snap);
    let e = workload_entries(&d)[0];
    assert_eq!(
        e.spiffe_id.as_str(),
        "spiffe://example.org/eks-dev/shop/web"
    );
    assert_eq!(
        e.selectors,
        sel(&["k8s:pod-label:app:web", "k8s:pod-uid:uid-shop-web-0"])
    );
    assert_eq!(
        e.dns_names,
        vec!["web-0.shop.svc.cluster.local", "web.shop"]
    );
    assert_eq!(
        e.federates_with,
        vec![TrustDomain::new("partner.org").unwrap()]
    );
    assert_eq!(
        e.attributes,
        vec![
            sigil_types::Attribute::Region,
            sigil_types::Attribute::Namespace
        ]
    );
    assert_eq!((e.x509_svid_ttl, e.jwt_svid_ttl), (1800, 300));
    assert_eq!(e.hint, "internal");
}

#[test]
fn selection_by_namespace_and_pod_labels_and_pod_state() {
    let mut snap = pods_on_two_nodes(2);
    snap.namespaces
        .push(namespace("other", json!({"team": "other"})));
    snap.pods
        .push(pod("other", "api-0", "api", NODE_A, json!({"app": "api"})));
    snap.pods.push(pod(
        "kube-system",
        "dns-0",
        "dns",
        NODE_A,
        json!({"app": "web"}),
    ));
    // Not scheduled, on an unknown node, finished: no entry.
    let mut pending = (*pod("shop", "web-pending", "web", NODE_A, json!({"app": "web"}))).clone();
    pending.spec.as_mut().unwrap().node_name = None;
    snap.pods.push(Arc::new(pending));
    snap.pods.push(pod(
        "shop",
        "web-lost",
        "web",
        "no-such-node",
        json!({"app": "web"}),
    ));
    let mut done = (*pod("shop", "web-done", "web", NODE_A, json!({"app": "web"}))).clone();
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    snap.pods.push(Arc::new(done));

    let mut by_ns = ns_sa_spec(Mode::PerPod);
    by_ns.namespace_selector = Some(LabelSelector {
        match_labels: BTreeMap::from([("team".into(), "other".into())]),
        ..Default::default()
    });
    let mut by_label = ns_sa_spec(Mode::PerPod);
    by_label.pod_selector = Some(LabelSelector {
        match_labels: BTreeMap::from([("app".into(), "web".into())]),
        ..Default::default()
    });
    let everything = ns_sa_spec(Mode::PerPod);
    snap.cluster_spiffe_ids = vec![
        csid("by-ns", by_ns),
        csid("by-label", by_label),
        csid("everything", everything),
    ];
    let d = render(&settings(), &snap);
    let stats = |n: &str| d.spiffe_id_status[n].stats.clone();
    assert_eq!(
        (
            stats("by-ns").namespaces_selected,
            stats("by-ns").pods_selected
        ),
        (1, 1)
    );
    assert_eq!(
        stats("by-label").pods_selected,
        2,
        "shop/web-0 and web-1 only"
    );
    assert_eq!(stats("everything").pods_selected, 3);
    assert_eq!(stats("everything").namespaces_selected, 2);
    // by-label's entries are everything's too: same key and settings, so shared.
    assert_eq!(d.entries.len(), 3);
    let shared = d
        .entries
        .values()
        .find(|d| d.entry.selectors == sel(&["k8s:pod-uid:uid-shop-web-0"]))
        .unwrap();
    assert_eq!(
        shared.owners.iter().collect::<Vec<_>>(),
        vec![
            &Owner::SpiffeId("by-label".into()),
            &Owner::SpiffeId("everything".into())
        ]
    );

    // The ignore list is configurable.
    let mut s = settings();
    s.ignore_namespaces.clear();
    let d = render(&s, &snap);
    assert_eq!(d.spiffe_id_status["everything"].stats.pods_selected, 4);
}

#[test]
fn conflicting_settings_for_one_key_are_masked() {
    let mut snap = pods_on_two_nodes(2);
    let mut slow = ns_sa_spec(Mode::PerPod);
    slow.x509_svid_ttl = Some("2h".into());
    snap.cluster_spiffe_ids = vec![
        csid("a-first", ns_sa_spec(Mode::PerPod)),
        csid("b-second", slow),
    ];
    let d = render(&settings(), &snap);
    assert_eq!(d.entries.len(), 2);
    assert!(d.entries.values().all(|e| e.entry.x509_svid_ttl == 0));
    let st = &d.spiffe_id_status["b-second"];
    assert_eq!((st.stats.entries_masked, st.stats.entries_rendered), (2, 0));
}

#[test]
fn static_entries_render_literally() {
    let spec = ClusterStaticEntrySpec {
        spiffe_id: "spiffe://example.org/db".into(),
        parent_id: "spiffe://example.org/sigil/agent/k8s_psat/eks-dev/node-1".into(),
        selectors: vec!["k8s:ns:db".into(), "k8s:sa:postgres".into()],
        x509_svid_ttl: Some("1h".into()),
        dns_names: vec!["db.example.org".into()],
        ..Default::default()
    };
    let bad = ClusterStaticEntrySpec {
        spiffe_id: "spiffe://example.org/db".into(),
        parent_id: "spiffe://example.org/sigil/server".into(),
        selectors: vec![],
        ..Default::default()
    };
    let posing = ClusterStaticEntrySpec {
        spiffe_id: "spiffe://example.org/sigil/server".into(),
        parent_id: "spiffe://example.org/sigil/agent/k8s_psat/eks-dev/node-1".into(),
        selectors: vec!["k8s:ns:db".into()],
        ..Default::default()
    };
    let snap = Snapshot {
        static_entries: vec![
            Arc::new(ClusterStaticEntry::new("db", spec)),
            Arc::new(ClusterStaticEntry::new("empty", bad)),
            Arc::new(ClusterStaticEntry::new("posing", posing)),
        ],
        ..Default::default()
    };
    let d = render(&settings(), &snap);
    assert_eq!(d.entries.len(), 1);
    let e = &d.entries.values().next().unwrap().entry;
    assert_eq!(e.spiffe_id.as_str(), "spiffe://example.org/db");
    assert_eq!(e.x509_svid_ttl, 3600);
    assert!(settings().is_owned(&e.id));
    let ok = &d.static_status["db"];
    assert!(ok.rendered && ok.set && !ok.masked && ok.errors.is_empty());
    let failed = &d.static_status["empty"];
    assert!(!failed.rendered && !failed.set);
    assert!(
        failed.errors[0].contains("at least one selector"),
        "{:?}",
        failed.errors
    );
    let posing = &d.static_status["posing"];
    assert!(!posing.rendered && !posing.set);
    assert!(
        posing.errors[0].contains("is reserved"),
        "{:?}",
        posing.errors
    );
}

// -------------------------------------------------------------- planning --

/// The server's entries after applying `p` to `existing` (IDs kept).
fn applied(existing: &[Entry], p: &sigil_k8s_controller::Plan) -> Vec<Entry> {
    let mut out: BTreeMap<String, Entry> = existing
        .iter()
        .map(|e| (e.id.to_string(), e.clone()))
        .collect();
    for e in p.create.iter().chain(&p.update) {
        out.insert(e.id.to_string(), e.clone());
    }
    for id in &p.delete {
        out.remove(id.as_str());
    }
    out.into_values().collect()
}

fn hand_made() -> Vec<Entry> {
    let mut by_hand = Entry::new(
        "web-by-hand".parse().unwrap(),
        "spiffe://example.org/ns/shop/sa/web".parse().unwrap(),
        "spiffe://example.org/sigil/agent/join_token/abc"
            .parse()
            .unwrap(),
        sel(&["unix:uid:1000"]),
    );
    by_hand.hint = "mine".into();
    // An entry of the controller of another cluster.
    let other = Settings::new(TrustDomain::new("example.org").unwrap(), "eks-prod").unwrap();
    let mut theirs = by_hand.clone();
    theirs.selectors = sel(&["k8s:ns:shop"]);
    theirs.id = other.entry_id(&theirs).unwrap();
    // In ID order, as `applied` returns entries.
    vec![theirs, by_hand]
}

#[test]
fn plan_creates_then_converges_and_leaves_other_entries_alone() {
    let s = settings();
    let mut snap = pods_on_two_nodes(3);
    snap.cluster_spiffe_ids = vec![
        csid("pods", ns_sa_spec(Mode::PerPod)),
        csid("by-sa", {
            let mut spec = ns_sa_spec(Mode::PerServiceAccount);
            spec.spiffe_id_template =
                "spiffe://example.org/sa/{{ .PodSpec.ServiceAccountName }}".into();
            spec
        }),
    ];
    let existing = hand_made();
    let d = render(&s, &snap);
    let p = plan(&s, &d, &existing);
    assert_eq!(
        p.create.len(),
        3 + 1 + 1,
        "3 pods, 1 service account, 1 alias"
    );
    assert!(p.create[0].is_node_alias(), "aliases come first");
    assert!(p.update.is_empty() && p.delete.is_empty());
    let server = applied(&existing, &p);
    assert!(
        plan(&s, &d, &server).is_empty(),
        "a second pass changes nothing"
    );
    for e in &existing {
        assert!(server.contains(e), "{} was touched", e.id);
    }
}

#[test]
fn deleted_pods_and_resources_lose_their_entries() {
    let s = settings();
    let mut snap = pods_on_two_nodes(3);
    snap.cluster_spiffe_ids = vec![
        csid("pods", ns_sa_spec(Mode::PerPod)),
        csid("by-sa", ns_sa_spec(Mode::PerServiceAccount)),
    ];
    let mut server = hand_made();
    server = applied(&server, &plan(&s, &render(&s, &snap), &server));
    assert_eq!(server.len(), 2 + 3 + 2);

    // A pod goes: its PerPod entry goes; the service account entry stays.
    let gone = snap.pods.remove(0);
    let p = plan(&s, &render(&s, &snap), &server);
    assert!(p.create.is_empty() && p.update.is_empty());
    assert_eq!(p.delete.len(), 1);
    let deleted = server.iter().find(|e| e.id == p.delete[0]).unwrap();
    assert_eq!(
        deleted.selectors,
        sel(&[&format!(
            "k8s:pod-uid:{}",
            gone.metadata.uid.as_deref().unwrap()
        )])
    );
    server = applied(&server, &p);

    // The last pods of the service account go: its entry and the alias go.
    snap.pods.clear();
    let p = plan(&s, &render(&s, &snap), &server);
    assert_eq!(p.delete.len(), 2 + 2);
    server = applied(&server, &p);
    assert_eq!(server, hand_made());

    // Pods back, then the resources go: everything of theirs goes.
    snap = pods_on_two_nodes(3);
    snap.cluster_spiffe_ids = vec![csid("pods", ns_sa_spec(Mode::PerPod))];
    server = applied(&server, &plan(&s, &render(&s, &snap), &server));
    assert_eq!(server.len(), 2 + 3);
    snap.cluster_spiffe_ids.clear();
    let p = plan(&s, &render(&s, &snap), &server);
    assert_eq!(p.delete.len(), 3);
    assert_eq!(applied(&server, &p), hand_made());
}

#[test]
fn changed_settings_update_in_place_and_changed_ids_replace() {
    let s = settings();
    let mut snap = pods_on_two_nodes(2);
    snap.cluster_spiffe_ids = vec![csid("pods", ns_sa_spec(Mode::PerPod))];
    let server = applied(&[], &plan(&s, &render(&s, &snap), &[]));

    let mut spec = ns_sa_spec(Mode::PerPod);
    spec.jwt_svid_ttl = Some("1m".into());
    snap.cluster_spiffe_ids = vec![csid("pods", spec)];
    let p = plan(&s, &render(&s, &snap), &server);
    assert!(p.create.is_empty() && p.delete.is_empty());
    assert_eq!(p.update.len(), 2);
    assert!(p.update.iter().all(|e| e.jwt_svid_ttl == 60));
    let ids: Vec<_> = server.iter().map(|e| &e.id).collect();
    assert!(p.update.iter().all(|e| ids.contains(&&e.id)), "same IDs");

    // An entry edited by hand on the server is put back.
    let mut edited = server.clone();
    edited[0].hint = "edited".into();
    let p = plan(
        &s,
        &render(&s, &{
            let mut s2 = snap.clone();
            s2.cluster_spiffe_ids = vec![csid("pods", ns_sa_spec(Mode::PerPod))];
            s2
        }),
        &edited,
    );
    assert_eq!(p.update.len(), 1);
    assert_eq!(p.update[0].hint, "");

    // A new SPIFFE ID is a new key: create the new entries, delete the old.
    let mut spec = ns_sa_spec(Mode::PerPod);
    spec.spiffe_id_template = "spiffe://example.org/v2/{{ .PodMeta.Name }}".into();
    snap.cluster_spiffe_ids = vec![csid("pods", spec)];
    let p = plan(&s, &render(&s, &snap), &server);
    assert_eq!((p.create.len(), p.update.len(), p.delete.len()), (2, 0, 2));
}

#[test]
fn refused_entries_show_in_the_status() {
    let s = settings();
    let mut snap = pods_on_two_nodes(1);
    snap.cluster_spiffe_ids = vec![csid("pods", ns_sa_spec(Mode::PerPod))];
    let mut d = render(&s, &snap);
    let id = d.entries.keys().next().unwrap().clone();
    d.record_failure(
        &id,
        "entry web-by-hand already has this parent ID, SPIFFE ID and selectors",
    );
    let st = &d.spiffe_id_status["pods"];
    assert_eq!(st.stats.entry_failures, 1);
    assert!(
        st.errors[0].contains("already has this parent ID"),
        "{:?}",
        st.errors
    );
}

// ------------------------------------------------- admin API, real server --

mod admin_api {
    use sigil_k8s_controller::admin::{AdminClient, MAX_BATCH};
    use sigil_testkit::{Cluster, ClusterOptions};

    use super::*;

    async fn owned(s: &Settings, admin: &mut AdminClient) -> Vec<Entry> {
        admin.list_entries(|id| s.is_owned(id)).await.unwrap()
    }

    /// One reconcile pass as the running controller does it.
    async fn reconcile(
        s: &Settings,
        snap: &Snapshot,
        admin: &mut AdminClient,
    ) -> (Desired, sigil_k8s_controller::admin::ApplyReport) {
        let mut d = render(s, snap);
        let existing = owned(s, admin).await;
        let p = plan(s, &d, &existing);
        let report = admin.apply(&p).await.unwrap();
        for (id, e) in &report.failures {
            d.record_failure(id, e);
        }
        (d, report)
    }

    #[tokio::test]
    async fn entries_follow_the_cluster_and_hand_made_ones_stay() {
        let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
        let mut admin = AdminClient::connect(&cluster.admin_socket()).await.unwrap();
        assert_eq!(admin.trust_domain().await.unwrap().name(), "example.org");
        let s = settings();
        let by_hand = cluster
            .register("/by-hand", &["unix:uid:1000"])
            .await
            .unwrap();

        let mut snap = pods_on_two_nodes(3);
        snap.cluster_spiffe_ids = vec![
            csid("pods", ns_sa_spec(Mode::PerPod)),
            csid("by-sa", {
                let mut spec = ns_sa_spec(Mode::PerServiceAccount);
                spec.spiffe_id_template =
                    "spiffe://example.org/sa/{{ .PodSpec.ServiceAccountName }}".into();
                spec
            }),
        ];
        let (d, report) = reconcile(&s, &snap, &mut admin).await;
        assert_eq!((report.created, report.updated, report.deleted), (5, 0, 0));
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let on_server = owned(&s, &mut admin).await;
        assert_eq!(on_server.len(), 5);
        assert!(
            plan(&s, &d, &on_server).is_empty(),
            "the server holds what was rendered"
        );
        for e in &on_server {
            assert_eq!(&d.entries[&e.id].entry.spiffe_id, &e.spiffe_id);
        }

        // Nothing changed: nothing to do.
        let (_, report) = reconcile(&s, &snap, &mut admin).await;
        assert_eq!(report, Default::default());

        // A pod goes.
        snap.pods.remove(0);
        let (_, report) = reconcile(&s, &snap, &mut admin).await;
        assert_eq!((report.created, report.updated, report.deleted), (0, 0, 1));
        assert_eq!(owned(&s, &mut admin).await.len(), 4);

        // The resources go: every owned entry goes, the hand-made one stays.
        snap.cluster_spiffe_ids.clear();
        let (_, report) = reconcile(&s, &snap, &mut admin).await;
        assert_eq!(report.deleted, 4);
        let all = admin.list_entries(|_| true).await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, by_hand.id);
        cluster.shutdown().await;
    }

    #[tokio::test]
    async fn large_plans_go_in_batches_and_refusals_reach_the_status() {
        let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
        let mut admin = AdminClient::connect(&cluster.admin_socket()).await.unwrap();
        let s = settings();
        let n = 2 * MAX_BATCH + 7;
        let mut snap = pods_on_two_nodes(n);
        snap.cluster_spiffe_ids = vec![csid("pods", ns_sa_spec(Mode::PerPod))];

        // A hand-made entry with the key of one pod's entry: the server
        // refuses the controller's copy, which shows in the status.
        let d = render(&s, &snap);
        let clash = d.entries.values().next().unwrap().entry.clone();
        let server = cluster.server().unwrap();
        let mut copy = clash.clone();
        copy.id = "clash-by-hand".parse().unwrap();
        server.create_entry(copy).await.unwrap();

        let (d, report) = reconcile(&s, &snap, &mut admin).await;
        assert_eq!(report.created, n - 1);
        assert_eq!(report.failures.len(), 1);
        assert_eq!(report.failures[0].0, clash.id);
        let st = &d.spiffe_id_status["pods"];
        assert_eq!(st.stats.entry_failures, 1);
        assert!(
            st.errors[0].contains("already has this parent ID"),
            "{:?}",
            st.errors
        );
        assert_eq!(owned(&s, &mut admin).await.len(), n - 1);

        snap.pods.clear();
        let (_, report) = reconcile(&s, &snap, &mut admin).await;
        assert_eq!(report.deleted, n - 1);
        assert_eq!(admin.list_entries(|_| true).await.unwrap().len(), 1);
        cluster.shutdown().await;
    }
}

// ----------------------------------- the running controller, fake API server --

/// A fake kube-apiserver with list, watch and status patches for the kinds
/// the controller watches (enough for kube-runtime's watcher).
mod fake_api {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::extract::{Path, State};
    use axum::http::{StatusCode, Uri, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, patch};
    use serde_json::{Value, json};
    use tokio::sync::{broadcast, mpsc};

    /// (resource version, plural, event type, object)
    type Event = (u64, String, &'static str, Value);

    #[derive(Default)]
    struct Data {
        rv: u64,
        /// plural → name (with namespace) → object
        objects: BTreeMap<String, BTreeMap<String, Value>>,
        history: Vec<Event>,
    }

    struct Shared {
        data: Mutex<Data>,
        events: broadcast::Sender<Event>,
    }

    impl Shared {
        fn emit(&self, plural: &str, kind: &'static str, mut obj: Value) {
            let mut d = self.data.lock().unwrap();
            d.rv += 1;
            let (api_version, k) = kind_of(plural);
            obj["apiVersion"] = json!(api_version);
            obj["kind"] = json!(k);
            obj["metadata"]["resourceVersion"] = json!(d.rv.to_string());
            let map = d.objects.entry(plural.to_owned()).or_default();
            if kind == "DELETED" {
                map.remove(&key(&obj));
            } else {
                map.insert(key(&obj), obj.clone());
            }
            let ev = (d.rv, plural.to_owned(), kind, obj);
            d.history.push(ev.clone());
            let _ = self.events.send(ev);
        }
    }

    pub(super) struct FakeApi {
        shared: Arc<Shared>,
        pub(super) url: String,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeApi {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn kind_of(plural: &str) -> (&'static str, &'static str) {
        match plural {
            "pods" => ("v1", "Pod"),
            "namespaces" => ("v1", "Namespace"),
            "nodes" => ("v1", "Node"),
            "clusterspiffeids" => ("identity.sigil/v1alpha1", "ClusterSPIFFEID"),
            "clusterfederatedtrustdomains" => {
                ("identity.sigil/v1alpha1", "ClusterFederatedTrustDomain")
            }
            _ => ("identity.sigil/v1alpha1", "ClusterStaticEntry"),
        }
    }

    fn key(obj: &Value) -> String {
        let m = &obj["metadata"];
        format!(
            "{}/{}",
            m["namespace"].as_str().unwrap_or_default(),
            m["name"].as_str().unwrap_or_default()
        )
    }

    impl FakeApi {
        pub(super) async fn start() -> Self {
            let (events, _) = broadcast::channel(1024);
            let shared = Arc::new(Shared {
                data: Mutex::new(Data::default()),
                events,
            });
            let app = Router::new()
                .route("/api/v1/{plural}", get(list_or_watch))
                .route("/apis/identity.sigil/v1alpha1/{plural}", get(list_or_watch))
                .route(
                    "/apis/identity.sigil/v1alpha1/{plural}/{name}/status",
                    patch(patch_status),
                )
                .with_state(shared.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Self { shared, url, task }
        }

        fn emit(&self, plural: &str, kind: &'static str, obj: Value) {
            self.shared.emit(plural, kind, obj);
        }

        /// Adds or replaces an object.
        pub(super) fn put(&self, plural: &str, obj: Value) {
            let exists = self.get(plural, &key(&obj)).is_some();
            self.emit(plural, if exists { "MODIFIED" } else { "ADDED" }, obj);
        }

        /// Deletes an object (`<namespace>/<name>`, namespace empty for cluster-scoped kinds).
        pub(super) fn delete(&self, plural: &str, key: &str) {
            let obj = self.get(plural, key).unwrap();
            self.emit(plural, "DELETED", obj);
        }

        pub(super) fn get(&self, plural: &str, key: &str) -> Option<Value> {
            let d = self.shared.data.lock().unwrap();
            d.objects.get(plural).and_then(|m| m.get(key)).cloned()
        }

        /// A kubeconfig for this server.
        pub(super) fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
            let path = dir.join("kubeconfig");
            let config = json!({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "controller", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "controller"}}],
                "current-context": "fake",
            });
            std::fs::write(&path, config.to_string()).unwrap();
            path
        }
    }

    fn json_response(body: &Value) -> Response {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }

    async fn list_or_watch(
        State(s): State<Arc<Shared>>,
        Path(plural): Path<String>,
        uri: Uri,
    ) -> Response {
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let since: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::channel::<Bytes>(256);
            let (backlog, mut live) = {
                let d = s.data.lock().unwrap();
                let backlog: Vec<Event> = d
                    .history
                    .iter()
                    .filter(|e| e.0 > since && e.1 == plural)
                    .cloned()
                    .collect();
                (backlog, s.events.subscribe())
            };
            tokio::spawn(async move {
                let line =
                    |e: &Event| Bytes::from(format!("{}\n", json!({"type": e.2, "object": e.3})));
                for e in &backlog {
                    if tx.send(line(e)).await.is_err() {
                        return;
                    }
                }
                while let Ok(e) = live.recv().await {
                    if e.1 == plural && e.0 > since && tx.send(line(&e)).await.is_err() {
                        return;
                    }
                }
            });
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
            });
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                Body::from_stream(stream),
            )
                .into_response();
        }
        let d = s.data.lock().unwrap();
        let items: Vec<Value> = d
            .objects
            .get(&plural)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let (api_version, kind) = kind_of(&plural);
        json_response(&json!({
            "apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": d.rv.to_string()},
            "items": items,
        }))
    }

    async fn patch_status(
        State(s): State<Arc<Shared>>,
        Path((plural, name)): Path<(String, String)>,
        body: Bytes,
    ) -> Response {
        let patch: Value = serde_json::from_slice(&body).unwrap();
        let obj = {
            let d = s.data.lock().unwrap();
            d.objects
                .get(&plural)
                .and_then(|m| m.get(&format!("/{name}")))
                .cloned()
        };
        let Some(mut obj) = obj else {
            return (StatusCode::NOT_FOUND, "not found").into_response();
        };
        obj["status"] = patch["status"].clone();
        s.emit(&plural, "MODIFIED", obj);
        let d = s.data.lock().unwrap();
        json_response(&d.objects[&plural][&format!("/{name}")])
    }
}

mod running {
    use std::time::Duration;

    use sigil_k8s_controller::admin::AdminClient;
    use sigil_k8s_controller::{ControllerConfig, kube_client, run};
    use sigil_testkit::{Cluster, ClusterOptions};
    use tokio_util::sync::CancellationToken;

    use super::fake_api::FakeApi;
    use super::*;

    fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).unwrap()
    }

    async fn eventually<F, Fut>(what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controller_follows_the_cluster_through_watches() {
        let fake = FakeApi::start().await;
        let snap = pods_on_two_nodes(3);
        for n in &snap.namespaces {
            fake.put("namespaces", to_json(&**n));
        }
        for n in &snap.nodes {
            fake.put("nodes", to_json(&**n));
        }
        for p in &snap.pods {
            fake.put("pods", to_json(&**p));
        }
        let mut spec = ns_sa_spec(Mode::PerPod);
        spec.spiffe_id_template = "spiffe://example.org/pod/{{ .PodMeta.Name }}".into();
        fake.put("clusterspiffeids", to_json(&*csid("pods", spec)));

        let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
        let kubeconfig = fake.kubeconfig(cluster.dir.path());
        let client = kube_client(Some(&kubeconfig)).await.unwrap();
        let mut config = ControllerConfig::new(cluster.admin_socket(), "eks-dev");
        config.debounce = Duration::from_millis(50);
        config.resync = Duration::from_secs(2);
        config.retry = Duration::from_millis(200);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(client, config, shutdown.clone()));

        let s = settings();
        let mut admin = AdminClient::connect(&cluster.admin_socket()).await.unwrap();
        let by_hand = cluster
            .register("/by-hand", &["unix:uid:1000"])
            .await
            .unwrap();
        let count = |admin: AdminClient| {
            let s = s.clone();
            async move {
                let mut admin = admin;
                admin.list_entries(|id| s.is_owned(id)).await.unwrap().len()
            }
        };
        eventually("3 pod entries", || {
            let a = admin.clone();
            async { count(a).await == 3 }
        })
        .await;
        eventually("the status", || async {
            fake.get("clusterspiffeids", "/pods")
                .is_some_and(|o| o["status"]["stats"]["entriesRendered"] == 3)
        })
        .await;
        let status = fake.get("clusterspiffeids", "/pods").unwrap()["status"].clone();
        assert_eq!(status["observedGeneration"], 3);
        assert_eq!(status["stats"]["podsSelected"], 3);
        assert_eq!(status["errors"], json!([]));

        // A pod is deleted; another is added.
        fake.delete("pods", "shop/web-0");
        fake.put(
            "pods",
            to_json(&*pod("shop", "web-new", "web", NODE_B, json!({}))),
        );
        eventually(
            "the deleted pod's entry to go and the new one's to come",
            || {
                let mut a = admin.clone();
                let s = s.clone();
                async move {
                    let mut ids: Vec<String> = a
                        .list_entries(|id| s.is_owned(id))
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|e| e.spiffe_id.to_string())
                        .collect();
                    ids.sort();
                    ids == [
                        "spiffe://example.org/pod/web-1",
                        "spiffe://example.org/pod/web-2",
                        "spiffe://example.org/pod/web-new",
                    ]
                }
            },
        )
        .await;

        // A resource with a bad template: its status says why; nothing else changes.
        let mut bad = ns_sa_spec(Mode::PerPod);
        bad.spiffe_id_template = "spiffe://other.org/{{ .PodMeta.Name }}".into();
        fake.put("clusterspiffeids", to_json(&*csid("bad", bad)));
        eventually("the bad resource's errors", || async {
            fake.get("clusterspiffeids", "/bad").is_some_and(|o| {
                o["status"]["errors"][0]
                    .as_str()
                    .is_some_and(|e| e.contains("not in the trust domain"))
            })
        })
        .await;
        assert_eq!(count(admin.clone()).await, 3);

        // The resource goes: so do its entries; the hand-made entry stays.
        fake.delete("clusterspiffeids", "/pods");
        eventually("no owned entries", || {
            let a = admin.clone();
            async { count(a).await == 0 }
        })
        .await;
        let all = admin.list_entries(|_| true).await.unwrap();
        assert_eq!(
            all.iter().map(|e| &e.id).collect::<Vec<_>>(),
            vec![&by_hand.id]
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        cluster.shutdown().await;
    }

    /// Federation relationships follow `ClusterFederatedTrustDomain`
    /// resources on a real server: created, updated, a hand-made dynamic one
    /// deleted, statuses written, and removed with the resource.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controller_manages_federation_relationships() {
        use sigil_proto::server::v1 as pb;

        let fake = FakeApi::start().await;
        let cftd = |url: &str| {
            json!({
                "metadata": {"name": "partner", "generation": 1},
                "spec": {
                    "trustDomain": "partner.test",
                    "bundleEndpointURL": url,
                    "bundleEndpointProfile": {"type": "https_web"},
                    "trustDomainBundle": "{\"keys\":[]}",
                },
            })
        };
        fake.put("clusterfederatedtrustdomains", cftd("https://127.0.0.1:9/"));
        fake.put(
            "clusterfederatedtrustdomains",
            json!({
                "metadata": {"name": "broken", "generation": 1},
                "spec": {
                    "trustDomain": "broken.test",
                    "bundleEndpointURL": "http://broken.test/",
                    "bundleEndpointProfile": {"type": "https_web"},
                },
            }),
        );

        let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
        // A relationship made by hand before the controller starts: it is
        // not declared by any resource, so the controller removes it.
        let mut raw = sigil_client::AdminClient::connect(&cluster.admin_socket())
            .await
            .unwrap();
        raw.api()
            .create_federation_relationship(pb::FederationRelationship {
                trust_domain: "stale.test".into(),
                bundle_endpoint_url: "https://127.0.0.1:9/".into(),
                bundle_endpoint_profile: "https_web".into(),
                ..Default::default()
            })
            .await
            .unwrap();

        let kubeconfig = fake.kubeconfig(cluster.dir.path());
        let client = kube_client(Some(&kubeconfig)).await.unwrap();
        let mut config = ControllerConfig::new(cluster.admin_socket(), "eks-dev");
        config.debounce = Duration::from_millis(50);
        config.resync = Duration::from_secs(2);
        config.retry = Duration::from_millis(200);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(client, config, shutdown.clone()));

        let mut admin = AdminClient::connect(&cluster.admin_socket()).await.unwrap();
        let urls = |admin: AdminClient| async move {
            let mut admin = admin;
            admin
                .list_federation_relationships()
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.trust_domain, r.bundle_endpoint_url))
                .collect::<Vec<_>>()
        };
        eventually("the declared relationship only", || {
            let a = admin.clone();
            async move {
                urls(a).await == [("partner.test".to_owned(), "https://127.0.0.1:9/".to_owned())]
            }
        })
        .await;
        // The bootstrap bundle was stored with the relationship.
        let bundle = raw
            .api()
            .get_federated_bundle(pb::TrustDomainRequest {
                trust_domain: "partner.test".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(bundle.bundle_json.contains("keys"), "{bundle:?}");
        eventually("the statuses", || async {
            fake.get("clusterfederatedtrustdomains", "/partner")
                .is_some_and(|o| o["status"]["set"] == true)
                && fake
                    .get("clusterfederatedtrustdomains", "/broken")
                    .is_some_and(|o| {
                        o["status"]["errors"][0]
                            .as_str()
                            .is_some_and(|e| e.contains("https://"))
                    })
        })
        .await;

        fake.put(
            "clusterfederatedtrustdomains",
            cftd("https://127.0.0.1:10/v2"),
        );
        eventually("the updated URL", || {
            let a = admin.clone();
            async move {
                urls(a).await
                    == [(
                        "partner.test".to_owned(),
                        "https://127.0.0.1:10/v2".to_owned(),
                    )]
            }
        })
        .await;

        fake.delete("clusterfederatedtrustdomains", "/partner");
        eventually("no relationships", || {
            let a = admin.clone();
            async move { urls(a).await.is_empty() }
        })
        .await;
        assert!(
            admin
                .list_federation_relationships()
                .await
                .unwrap()
                .is_empty()
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        cluster.shutdown().await;
    }
}
