//! `/proc/<pid>/cgroup` and `/proc/<pid>/mountinfo` text: the container
//! locators never panic, and what they report is a well-formed pod UID and
//! container ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil_k8s::cgroup::{ContainerInfo, from_cgroup, from_mountinfo, locate};

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

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = from_cgroup(text) {
        check(&info);
    }
    if let Ok(info) = from_mountinfo(text) {
        check(&info);
    }
    let (cgroup, mountinfo) = text.split_once('\0').unwrap_or((text, ""));
    if let Ok(info) = locate(cgroup, Some(mountinfo)) {
        check(&info);
    }
    if let Ok(info) = locate(cgroup, None) {
        check(&info);
    }
});
