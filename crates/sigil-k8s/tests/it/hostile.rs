//! Hostile `/proc/<pid>/cgroup` text (the proptest version of
//! `fuzz/fuzz_targets/cgroup.rs`): arbitrary text, text shaped like cgroup
//! lines, and one-byte edits of a real pod's file. The locators never panic,
//! errors carry a message, and whatever they report is a canonical pod UID
//! and a 64-hex container ID.

use proptest::prelude::*;
use sigil_k8s::cgroup::{ContainerInfo, KubeletCgroups, from_cgroup};

use crate::cgroup::{KIND_CID, KIND_POD};

/// Cases per property: bounded so that CI stays fast.
const CASES: u32 = 256;

/// A cgroup v2 file of a containerd pod container (systemd driver).
fn sample_cgroup() -> String {
    let pod = KIND_POD.replace('-', "_");
    format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod}.slice/cri-containerd-{KIND_CID}.scope\n"
    )
}

/// One edit of `sample`: flip (xor with a non-zero byte), insert or delete a
/// byte at `pos` (modulo the length).
fn mutate(sample: &[u8], op: u8, pos: usize, value: u8) -> Vec<u8> {
    let mut out = sample.to_vec();
    let pos = pos % out.len().max(1);
    match op % 3 {
        0 => {
            if let Some(b) = out.get_mut(pos) {
                *b ^= value.max(1);
            }
        }
        1 => out.insert(pos.min(out.len()), value),
        _ => {
            if pos < out.len() {
                out.remove(pos);
            }
        }
    }
    out
}

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
