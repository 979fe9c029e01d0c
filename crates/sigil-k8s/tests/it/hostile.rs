//! Hostile `/proc/<pid>/cgroup` text (the proptest version of
//! `fuzz/fuzz_targets/cgroup.rs`): arbitrary text, text shaped like cgroup
//! lines, and one-byte edits of a real pod's file. The locators never panic,
//! errors carry a message, and whatever they report is a canonical pod UID
//! and a 64-hex container ID.
//!
//! The same for the kubelet's pod list (`GET /pods`): arbitrary bytes,
//! generated pods and one-byte edits of a recorded list. Parsing and the
//! selector lookup never panic, refusals carry a message, and the selectors
//! of a found container are `k8s:` selectors of the pod the cgroup named.

use proptest::prelude::*;
use sigil_k8s::cgroup::{ContainerInfo, KubeletCgroups, from_cgroup};
use sigil_k8s::kubelet::{Lookup, LookupOptions, explain, parse_pod_list, selectors_with};
use sigil_types::Selectors;

use crate::cgroup::{KIND_CID, KIND_POD, fixture};

/// Cases per property: bounded so that CI stays fast.
const CASES: u32 = 256;

/// A cgroup v2 file of a containerd pod container (systemd driver).
fn sample_cgroup() -> String {
    let pod = KIND_POD.replace('-', "_");
    format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod}.slice/cri-containerd-{KIND_CID}.scope\n"
    )
}

/// One-byte edits, as the config property tests make them.
pub(crate) use sigil_testkit::hostile_config::mutate;

/// Checks the shape of a located container.
fn assert_well_formed(info: &ContainerInfo) {
    if let Some(id) = &info.container_id {
        assert_eq!(id.len(), 64, "container id {id:?}");
        assert!(
            id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "container id {id:?}"
        );
    }
    if let Some(uid) = &info.pod_uid {
        assert_eq!(uid.len(), 36, "pod uid {uid:?}");
        for (i, c) in uid.bytes().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                assert_eq!(c, b'-', "pod uid {uid:?}");
            } else {
                assert!(matches!(c, b'0'..=b'9' | b'a'..=b'f'), "pod uid {uid:?}");
            }
        }
    }
}

/// Runs the locator on `cgroup` with the default and a custom kubelet root.
fn locate_everywhere(cgroup: &str) {
    let kind = KubeletCgroups::new("/kubelet").unwrap();
    for result in [
        from_cgroup(cgroup),
        kind.locate(cgroup).map(|l| l.into_info()),
    ] {
        match result {
            Ok(info) => assert_well_formed(&info),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

/// Lines built from the pieces the locator looks for (hex words, `pod`
/// prefixes, runtime scopes, separators), so that near-matches are common.
fn cgroup_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just("kubepods".to_owned()),
        Just("pod".to_owned()),
        Just(".slice".to_owned()),
        Just(".scope".to_owned()),
        Just("cri-containerd-".to_owned()),
        Just("crio-conmon-".to_owned()),
        Just("docker-".to_owned()),
        Just("/../".to_owned()),
        Just(KIND_CID.to_owned()),
        Just(KIND_POD.to_owned()),
        Just(KIND_POD.replace('-', "_")),
        "[0-9a-fA-F_-]{1,70}",
        "[0-9]{1,2}:[a-z,=_]{0,12}:",
        Just("\n".to_owned()),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn locators_survive_arbitrary_text(cgroup in any::<String>()) {
        locate_everywhere(&cgroup);
    }

    #[test]
    fn locators_survive_cgroup_like_text(cgroup in cgroup_like()) {
        locate_everywhere(&cgroup);
    }

    #[test]
    fn edited_cgroup_files_are_well_formed_or_refused(
        op in any::<u8>(),
        pos in any::<usize>(),
        value in any::<u8>(),
    ) {
        let edited = mutate(sample_cgroup().as_bytes(), op, pos, value);
        let edited = String::from_utf8_lossy(&edited);
        locate_everywhere(&edited);
    }
}

#[test]
fn the_sample_locates_its_pod() {
    let info = from_cgroup(&sample_cgroup()).unwrap();
    assert_eq!(info.pod_uid.as_deref(), Some(KIND_POD));
    assert_eq!(info.container_id.as_deref(), Some(KIND_CID));
}

/// The kind cluster's recorded pod list, which lists `KIND_POD` / `KIND_CID`.
fn sample_pods() -> Vec<u8> {
    fixture("kubelet/spire_kind_pod_list.json").into_bytes()
}

/// The kind container, with and without its pod UID.
fn kind_infos() -> [ContainerInfo; 2] {
    [
        ContainerInfo {
            pod_uid: Some(KIND_POD.to_owned()),
            container_id: Some(KIND_CID.to_owned()),
        },
        ContainerInfo {
            pod_uid: None,
            container_id: Some(KIND_CID.to_owned()),
        },
    ]
}

/// What a found container's selectors must satisfy: all `k8s:`, naming the
/// pod the cgroup names (when it names one) and the node asked for.
fn assert_selectors_fit(sel: &Selectors, info: &ContainerInfo, node: Option<&str>) {
    let values: Vec<&str> = sel.iter().map(|s| s.value()).collect();
    assert!(sel.iter().all(|s| s.kind() == "k8s"), "{values:?}");
    let uids: Vec<&str> = values
        .iter()
        .filter_map(|v| v.strip_prefix("pod-uid:"))
        .collect();
    assert_eq!(uids.len(), 1, "one pod UID: {values:?}");
    if let Some(want) = &info.pod_uid {
        assert!(uids[0].eq_ignore_ascii_case(want), "{values:?}");
    }
    if let Some(node) = node {
        assert!(
            values.contains(&format!("node-name:{node}").as_str()),
            "{values:?}"
        );
    }
}

/// Parses `json` and looks every kind container up in it with every option,
/// and as `sigil k8s selectors` explains it.
fn look_up_everywhere(json: &[u8]) {
    let node = "kind-control-plane";
    match explain(&sample_cgroup(), None, json, Some(node)) {
        Ok(sel) => assert_selectors_fit(&sel, &kind_infos()[0], Some(node)),
        Err(e) => assert!(!e.is_empty()),
    }
    let pods = match parse_pod_list(json) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    for info in kind_infos() {
        for node in [None, Some("kind-control-plane")] {
            for disable in [false, true] {
                let options = LookupOptions {
                    node_name: node.map(str::to_owned),
                    disable_container_selectors: disable,
                };
                match selectors_with(&pods, &info, &options) {
                    Ok(Lookup::Found(sel)) => {
                        assert_selectors_fit(&sel, &info, node);
                        if disable {
                            assert!(
                                sel.iter().all(|s| !s.value().starts_with("container-")),
                                "container selectors although disabled"
                            );
                        }
                    }
                    Ok(Lookup::NotInPod) => panic!("a container ID was given"),
                    Ok(Lookup::ContainerNotListed { container_id, .. }) => {
                        assert_eq!(container_id, KIND_CID);
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        }
    }
}

/// A pod of the generated lists: the kind pod's UID or another, the kind
/// container or another, arbitrary names and labels.
fn pod_json() -> impl Strategy<Value = serde_json::Value> {
    let uid = prop_oneof![
        Just(KIND_POD.to_owned()),
        Just(KIND_POD.to_ascii_uppercase()),
        Just(String::new()),
        "[0-9a-f-]{0,40}",
    ];
    let cid = prop_oneof![
        Just(format!("containerd://{KIND_CID}")),
        Just(format!("docker://{KIND_CID}/")),
        Just(KIND_CID.to_owned()),
        Just("://".to_owned()),
        any::<String>(),
    ];
    let text = || prop_oneof![Just(String::new()), "[a-z0-9./:-]{1,20}", any::<String>()];
    (
        uid,
        proptest::collection::vec((cid, text(), text()), 0..3),
        proptest::collection::vec((label_key(), text()), 0..3),
        text(),
        text(),
        prop_oneof![Just("kind-control-plane".to_owned()), text()],
        any::<bool>(),
    )
        .prop_map(|(uid, statuses, labels, name, ns, node, init)| {
            let statuses: Vec<serde_json::Value> = statuses
                .into_iter()
                .map(|(cid, name, image)| {
                    serde_json::json!({"name": name, "image": image, "imageID": image, "containerID": cid})
                })
                .collect();
            let labels: serde_json::Map<String, serde_json::Value> =
                labels.into_iter().map(|(k, v)| (k, v.into())).collect();
            let key = if init { "initContainerStatuses" } else { "containerStatuses" };
            serde_json::json!({
                "metadata": {"uid": uid, "name": name, "namespace": ns, "labels": labels},
                "spec": {"nodeName": node, "serviceAccountName": "default"},
                "status": {key: statuses}
            })
        })
}

/// Label keys: short text, sometimes with the separators selectors use.
fn label_key() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9./:-]{1,20}", any::<String>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn pod_lists_survive_arbitrary_bytes(json in proptest::collection::vec(any::<u8>(), 0..512)) {
        look_up_everywhere(&json);
    }

    #[test]
    fn generated_pod_lists_give_the_named_pods_selectors(
        pods in proptest::collection::vec(pod_json(), 0..4),
        kind in prop_oneof![Just("PodList"), Just("List"), Just("Pod"), Just("")],
    ) {
        let list = serde_json::json!({"kind": kind, "items": pods});
        look_up_everywhere(list.to_string().as_bytes());
    }

    #[test]
    fn edited_pod_lists_are_the_pods_own_or_refused(
        op in any::<u8>(),
        pos in any::<usize>(),
        value in any::<u8>(),
    ) {
        look_up_everywhere(&mutate(&sample_pods(), op, pos, value));
    }
}

#[test]
fn the_sample_pod_list_gives_the_kind_pods_selectors() {
    let pods = parse_pod_list(&sample_pods()).unwrap();
    for info in kind_infos() {
        let found = selectors_with(&pods, &info, &LookupOptions::default()).unwrap();
        let Lookup::Found(sel) = found else {
            panic!("kind container not found: {found:?}");
        };
        assert_selectors_fit(&sel, &info, Some("kind-control-plane"));
    }
}
