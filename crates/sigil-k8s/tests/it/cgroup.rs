//! Every cgroup and mountinfo fixture of `shared/fixtures/k8s` with the
//! result its README expects.

use std::path::PathBuf;

use serde_json::Value;
use sigil_k8s::cgroup::{
    CgroupError, CgroupFile, ContainerInfo, from_cgroup, from_mountinfo, locate, locate_pid,
};

pub(crate) const FIXTURES: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures/k8s");

pub(crate) fn fixture(rel: &str) -> String {
    let path = PathBuf::from(FIXTURES).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn info(pod: Option<&str>, cid: Option<&str>) -> ContainerInfo {
    ContainerInfo {
        pod_uid: pod.map(str::to_owned),
        container_id: cid.map(str::to_owned),
    }
}

pub(crate) const ZERO_POD: &str = "00000000-1111-2222-3333-444444444444";
pub(crate) const ZERO_CID: &str =
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub(crate) const KIND_POD: &str = "a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80";
pub(crate) const KIND_CID: &str =
    "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6";
pub(crate) const BLOG_POD: &str = "2c48913c-b29f-11e7-9350-020968147796";
pub(crate) const BLOG_CID: &str =
    "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

/// The cgroup table of fixtures/k8s/README.md, row by row.
#[test]
fn cgroup_fixtures_give_the_expected_pod_and_container() {
    let cases: &[(&str, Option<&str>, Option<&str>)] = &[
        (
            "SYNTH_eks131_v2_systemd_containerd_aws-node.txt",
            Some("26ad33eb-1244-4226-a6e8-e8ec77195044"),
            Some("6b4ed6d1b7259aeef27750cf1016fd6dd687ab54f3516ed3064ce0c225e63abf"),
        ),
        (
            "SYNTH_eks131_v2_systemd_containerd_coredns-knmwr.txt",
            Some("3032ab28-3ae1-44a6-9fb6-28f57a24e176"),
            Some("eff33af832d27ca7cbfa2b85293ff0f34fdf4ed4753e6f674886302312831d1b"),
        ),
        (
            "spire_cgroups_pid_in_pod.txt",
            Some(BLOG_POD),
            Some(BLOG_CID),
        ),
        (
            "spire_cgroups_init_pid_in_pod.txt",
            Some("d488cae9-b2a0-11e7-9350-020968147796"),
            Some("34a2062fd26c805aa8cf814cdfe479322b791f80afb9ea4db02d50375df14b41"),
        ),
        (
            "spire_systemd_cgroups_pid_in_pod.txt",
            Some(BLOG_POD),
            Some(BLOG_CID),
        ),
        (
            "spire_systemd_crio_cgroups_pid_in_pod.txt",
            Some(KIND_POD),
            Some(KIND_CID),
        ),
        // Not the outer docker ID 93529524… of the kind node.
        (
            "spire_cgroups_pid_in_kind_pod.txt",
            Some(KIND_POD),
            Some(KIND_CID),
        ),
        // cgroupns-relative CRI-O on KubeEdge: the pod is found by container ID.
        ("spire_cgroups_pid_in_crio_pod.txt", None, Some(KIND_CID)),
        ("spire_cgroups_pid_not_in_pod.txt", None, None),
        ("spire_impersonation_pair.cgroup", None, Some(ZERO_CID)),
        ("spire_mountinfo_fallback_pair.cgroup", None, None),
        (
            "qard_gke_v1_cgroupfs_docker_besteffort.txt",
            Some("74c13223-5a00-11e9-b385-42010a80018d"),
            Some("34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376"),
        ),
        (
            "issue2578_kind_v2_cgroupfs_besteffort.txt",
            Some("a1be83ac-553a-44cd-b1a8-b25d3060df8b"),
            Some("4ab945e34d3af794df40c541070fc9de0c83fc6e9af8b1114574c738bf913a7d"),
        ),
        (
            "issue2578_kind_v2_cgroupfs_burstable.txt",
            Some("bd445127-8720-434d-b38c-d308e9ff9b59"),
            Some("a6fa3112ac317b1f2e8986a1fb4b783add5cf3ee6b6c9947dc513a6984da88fb"),
        ),
        (
            "issue2578_kind_v2_containerd_daemon_not_in_pod.txt",
            None,
            None,
        ),
        (
            "issue949_v1_systemd_docker_besteffort_line.txt",
            Some("c68f332c-8897-11e9-9797-525400c9c704"),
            Some("ab704ba978feea085662fd58c3448624de9287dd50c7d01608b27b08f96c8725"),
        ),
        (
            "issue3183_v1_systemd_docker_besteffort_partial.txt",
            Some("169fbc47-41d0-4df5-be62-6b231010b6c4"),
            Some("bbf76635888294204963d9e32e4fae57dcbf8eddb7adeecbd55672cd5fbc2249"),
        ),
        // CRI-O's conmon carries the ID of the container it monitors, but is
        // not that container: no identity (SPIRE errors here instead).
        ("issue4088_v1_crio_conmon_not_a_workload.txt", None, None),
    ];
    for (file, pod, cid) in cases {
        let got = from_cgroup(&fixture(&format!("cgroup/{file}")))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got, info(*pod, *cid), "{file}");
    }
}

/// elastic/apm's cgroup parsing table. The ECS row's ID is not 64 hex, so
/// SPIRE-style rules find no container there (README).
#[test]
fn elastic_apm_cgroup_table() {
    let table: Value =
        serde_json::from_str(&fixture("cgroup/elastic_apm_cgroup_parsing_cases.json")).unwrap();
    let rows = table.as_object().unwrap();
    assert_eq!(rows.len(), 4);
    for (name, row) in rows {
        let line = row["groupLine"].as_str().unwrap();
        let mut want_cid = row["containerId"].as_str();
        let want_pod = row["podId"].as_str();
        if name == "testAwsEcsCGroup" {
            assert_eq!(
                want_cid,
                Some("03752a671e744971a862edcee6195646-4015103728")
            );
            want_cid = None;
        }
        let got = from_cgroup(&format!("{line}\n")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, info(want_pod, want_cid), "{name}");
    }
}

/// SPIRE's legacy-locator path table (expected/spire_cgroup_path_cases.json):
/// all 15 cases hold under our rules too.
#[test]
fn spire_cgroup_path_cases() {
    let table: Value =
        serde_json::from_str(&fixture("expected/spire_cgroup_path_cases.json")).unwrap();
    let cases = table["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let path = case["cgroup_path"].as_str().unwrap();
        // Some entries keep their `N:ctrl:` prefix; the others are bare paths.
        let line = if path.starts_with('/') {
            format!("0::{path}")
        } else {
            path.to_owned()
        };
        let want = if case["expect_match"].as_bool().unwrap() {
            let nonempty = |k: &str| case[k].as_str().filter(|s| !s.is_empty());
            info(nonempty("expect_pod_uid"), nonempty("expect_container_id"))
        } else {
            info(None, None)
        };
        let got = from_cgroup(&line).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, want, "{name}");
    }
}

/// The mountinfo table of the README (SPIRE rules: only cgroup/cgroup2 mounts
/// whose root is not `/`).
#[test]
fn mountinfo_fixtures() {
    let cases: &[(&str, Option<&str>, Option<&str>)] = &[
        (
            "spire_k8s_v1_kind_systemd_containerd.mountinfo",
            Some(ZERO_POD),
            Some(ZERO_CID),
        ),
        (
            "spire_k8s_v2_cgroupns_kind_systemd_containerd.mountinfo",
            Some(ZERO_POD),
            Some(ZERO_CID),
        ),
        (
            "spire_k8s_pod_uid_override.mountinfo",
            Some(ZERO_POD),
            Some(ZERO_CID),
        ),
        (
            "spire_mountinfo_fallback_pair.mountinfo",
            Some(ZERO_POD),
            Some(ZERO_CID),
        ),
        // On its own it names another pod: that is the impersonation attempt.
        (
            "spire_impersonation_pair.mountinfo",
            Some("ffffffff-ffff-ffff-ffff-ffffffffffff"),
            Some("deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef"),
        ),
        (
            "otel_containerd_v1_systemd_inside_container.mountinfo",
            Some("321c09bf-282b-44e4-a467-39daf144ef1f"),
            Some("f2a44bc8e090f93a2b4d7f510bdaff0615ad52906e3287ee956dcf5aa5012a91"),
        ),
        // cgroup2 mounted at its root; the IDs in other (bind) mounts are
        // workload-controlled and not used.
        (
            "otel_crio_v2_cgroupns_openshift_inside_container.mountinfo",
            None,
            None,
        ),
    ];
    for (file, pod, cid) in cases {
        let got = from_mountinfo(&fixture(&format!("mountinfo/{file}")))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got, info(*pod, *cid), "{file}");
    }
}

#[test]
fn mountinfo_conflicts_are_errors() {
    let err =
        from_mountinfo(&fixture("mountinfo/spire_k8s_pod_uid_conflict.mountinfo")).unwrap_err();
    assert!(
        matches!(&err, CgroupError::MultiplePodUids { file: CgroupFile::Mountinfo, first, second }
            if first == ZERO_POD && second == "76543210-89ab-cdef-0123-456789abcdef"),
        "{err}"
    );
    let err = from_mountinfo(&fixture(
        "mountinfo/spire_k8s_container_id_conflict.mountinfo",
    ))
    .unwrap_err();
    assert!(
        matches!(&err, CgroupError::MultipleContainerIds { file: CgroupFile::Mountinfo, first, .. } if first == ZERO_CID),
        "{err}"
    );
    assert!(err.to_string().contains("names two container IDs"), "{err}");
}

/// elastic/apm's docker mount table: the ID is in a `/var/lib/docker/containers`
/// bind mount, not in a cgroup mount, so nothing is extracted.
#[test]
fn elastic_apm_mounts_give_nothing_from_cgroup_mounts() {
    let case: Value = serde_json::from_str(&fixture(
        "mountinfo/elastic_apm_docker_v2_mounts_parsing_case.json",
    ))
    .unwrap();
    assert_eq!(
        case["containerId"],
        "6548c6863fb748e72d1e2a4f824fde92f720952d062dede1318c2d6219a672d6"
    );
    let text: Vec<&str> = case["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(from_mountinfo(&text.join("\n")).unwrap(), info(None, None));
}

#[test]
fn cgroup_wins_over_a_spoofed_mountinfo() {
    let got = locate(
        &fixture("cgroup/spire_impersonation_pair.cgroup"),
        Some(&fixture("mountinfo/spire_impersonation_pair.mountinfo")),
    )
    .unwrap();
    assert_eq!(got, info(None, Some(ZERO_CID)));
}

#[test]
fn mountinfo_is_the_fallback_when_cgroup_says_nothing() {
    let got = locate(
        &fixture("cgroup/spire_mountinfo_fallback_pair.cgroup"),
        Some(&fixture(
            "mountinfo/spire_mountinfo_fallback_pair.mountinfo",
        )),
    )
    .unwrap();
    assert_eq!(got, info(Some(ZERO_POD), Some(ZERO_CID)));
    // Without a mountinfo there is nothing.
    let got = locate(
        &fixture("cgroup/spire_mountinfo_fallback_pair.cgroup"),
        None,
    )
    .unwrap();
    assert_eq!(got, info(None, None));
}

/// A cgroup file that names a container (even one that gets no identity)
/// has spoken: the workload's mount table must not override it.
#[test]
fn mountinfo_is_not_consulted_for_conmon_or_containers_outside_pods() {
    let spoof = fixture("mountinfo/spire_impersonation_pair.mountinfo");
    for cgroup in [
        fixture("cgroup/issue4088_v1_crio_conmon_not_a_workload.txt"),
        format!("0::/system.slice/docker-{ZERO_CID}.scope\n"),
        format!("0::/docker/{ZERO_CID}\n"),
    ] {
        assert_eq!(
            locate(&cgroup, Some(&spoof)).unwrap(),
            info(None, None),
            "{cgroup}"
        );
    }
}

#[test]
fn cgroup_conflicts_are_errors_and_block_the_fallback() {
    let other = "7654321089abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let two_containers = format!(
        "2:cpu:/kubepods/pod{ZERO_POD}/{ZERO_CID}\n1:name=systemd:/kubepods/pod{ZERO_POD}/{other}\n"
    );
    let err = locate(
        &two_containers,
        Some(&fixture(
            "mountinfo/spire_k8s_v1_kind_systemd_containerd.mountinfo",
        )),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the cgroup file names two container IDs: {ZERO_CID} and {other}")
    );
    let two_pods = format!(
        "2:cpu:/kubepods/pod{ZERO_POD}/{ZERO_CID}\n1:name=systemd:/kubepods/pod{KIND_POD}/{ZERO_CID}\n"
    );
    assert!(matches!(
        from_cgroup(&two_pods).unwrap_err(),
        CgroupError::MultiplePodUids {
            file: CgroupFile::Cgroup,
            ..
        }
    ));
    // Two different IDs without any pod UID conflict too.
    let podless = format!("2:cpu:/../{ZERO_CID}\n1:name=systemd:/../{other}\n");
    assert!(matches!(
        from_cgroup(&podless).unwrap_err(),
        CgroupError::MultipleContainerIds { .. }
    ));
}

#[test]
fn malformed_cgroup_lines_are_errors() {
    for text in ["not a cgroup file\n", "x::/kubepods\n", "0::relative\n"] {
        assert!(
            matches!(
                from_cgroup(text),
                Err(CgroupError::Malformed { line: 1, .. })
            ),
            "{text:?}"
        );
    }
    assert!(matches!(
        from_mountinfo("1 2 3\n"),
        Err(CgroupError::Malformed {
            file: CgroupFile::Mountinfo,
            ..
        })
    ));
}

#[test]
fn locate_pid_reads_proc() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("123");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("cgroup"),
        fixture("cgroup/spire_mountinfo_fallback_pair.cgroup"),
    )
    .unwrap();
    // No mountinfo: nothing, and no error.
    assert_eq!(locate_pid(root.path(), 123).unwrap(), info(None, None));
    std::fs::write(
        dir.join("mountinfo"),
        fixture("mountinfo/spire_mountinfo_fallback_pair.mountinfo"),
    )
    .unwrap();
    assert_eq!(
        locate_pid(root.path(), 123).unwrap(),
        info(Some(ZERO_POD), Some(ZERO_CID))
    );
    std::fs::write(
        dir.join("cgroup"),
        fixture("cgroup/spire_cgroups_pid_in_kind_pod.txt"),
    )
    .unwrap();
    assert_eq!(
        locate_pid(root.path(), 123).unwrap(),
        info(Some(KIND_POD), Some(KIND_CID))
    );
    // A process that is gone is an error, not "not in a pod".
    assert!(matches!(
        locate_pid(root.path(), 124),
        Err(CgroupError::Read { .. })
    ));
}

#[test]
fn locate_pid_on_this_process_does_not_fail() {
    // Whatever this test runs in (host, container, CI pod), reading a live
    // process works and yields either nothing or a well-formed answer.
    let got = locate_pid(
        std::path::Path::new("/proc"),
        i32::try_from(std::process::id()).unwrap(),
    )
    .unwrap();
    if let Some(cid) = &got.container_id {
        assert_eq!(cid.len(), 64);
    }
    if let Some(uid) = &got.pod_uid {
        assert_eq!(uid.len(), 36);
    }
}
