//! `/proc/<pid>/cgroup` text: the container locator never panics, and what
//! it reports is a well-formed pod UID and container ID.

use sigil_k8s::cgroup::{ContainerInfo, KubeletCgroups, from_cgroup};

fn check(info: &ContainerInfo) {
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

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = from_cgroup(text) {
        check(&info);
    }
    if let Ok(cgroups) = KubeletCgroups::new("/kubelet")
        && let Ok(location) = cgroups.locate(text)
    {
        check(&location.into_info());
    }
}
