//! The CSI driver through its public interface: a fake kubelet (a tonic
//! CSI client on the driver's Unix socket) against the driver in this
//! process, with real bind mounts.
//!
//! Every test that may mount runs in a private mount namespace: the test
//! binary runs itself again for that one test under
//! `unshare --mount --propagation private`, so no mount reaches the host,
//! even when a test fails half-way. That needs root and unshare(1); without
//! them the tests skip with a message, and fail under CI.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod node;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use sigil_proto::csi::v1 as csi;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Set in the re-executed test binary, inside the namespace.
const IN_NAMESPACE: &str = "SIGIL_CSI_TEST_IN_PRIVATE_MOUNT_NS";
/// How long one test may take in its namespace.
const TEST_DEADLINE: Duration = Duration::from_secs(180);
/// The bound on every await of the tests.
pub(crate) const STEP: Duration = Duration::from_secs(20);

/// Whether a private mount namespace can be made here.
fn can_unshare() -> bool {
    nix::unistd::geteuid().is_root()
        && Command::new("unshare")
            .args(["--mount", "--propagation", "private", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Runs `body` (the test `test`, its name as the harness knows it) in a
/// private mount namespace, on a multi-threaded runtime.
pub(crate) fn in_private_mount_ns<F, Fut>(test: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var_os(IN_NAMESPACE).is_some() {
        sigil_svid::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(TEST_DEADLINE, body())
                .await
                .unwrap_or_else(|_| panic!("{test} took more than {TEST_DEADLINE:?}"));
        });
        return;
    }
    if !sigil_testkit::runnable(
        test,
        can_unshare(),
        "needs root and unshare(1) for a private mount namespace",
    ) {
        return;
    }
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TEST_DEADLINE + Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{test} in its namespace did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    log.reopen().unwrap().read_to_string(&mut out).unwrap();
    println!("{out}");
    assert!(status.success(), "{test} failed in its namespace");
    assert!(
        out.contains("test result: ok. 1 passed"),
        "{test} did not run in its namespace (wrong test name?)"
    );
}

/// The harness name of a test in module `module` (from `module_path!()`).
pub(crate) fn test_name(module: &str, function: &str) -> String {
    let module = module.split_once("::").map_or("", |(_, rest)| rest);
    format!("{module}::{function}")
}

/// A channel on the driver's socket, as the kubelet opens one.
pub(crate) async fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tokio::time::timeout(
        STEP,
        Endpoint::from_static("http://localhost").connect_with_connector(tower::service_fn(
            move |_| {
                let p = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            },
        )),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

/// The mounts at `target` in this mount namespace, with whether each is
/// read-only.
pub(crate) fn mounts_at(target: &Path) -> Vec<bool> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 5 && Path::new(f[4]) == target).then(|| f[5].split(',').any(|o| o == "ro"))
        })
        .collect()
}

/// How many mounts lie under `dir`.
pub(crate) fn mounts_under(dir: &Path) -> usize {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| Path::new(m).starts_with(dir))
        })
        .count()
}

/// The kubelet's target path of volume `volume` of pod `uid`, its parent
/// created as the kubelet does.
pub(crate) fn kubelet_target(pods: &Path, uid: &str, volume: &str) -> PathBuf {
    let dir = pods
        .join(uid)
        .join("volumes/kubernetes.io~csi")
        .join(volume);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("mount")
}

/// A NodePublishVolumeRequest as the kubelet sends it for a read-only
/// ephemeral inline volume with `podInfoOnMount: true`.
pub(crate) fn publish_request(target: &Path) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: "csi-5f0c3e8a0b6f4c7e9d1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f70".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Mount(
                csi::volume_capability::MountVolume::default(),
            )),
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: [
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", "web-0"),
            ("csi.storage.k8s.io/pod.namespace", "default"),
            (
                "csi.storage.k8s.io/pod.uid",
                "7d1f0c4e-1111-2222-3333-444455556666",
            ),
            ("csi.storage.k8s.io/serviceAccount.name", "web"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Default::default()
    }
}

/// A NodeUnpublishVolumeRequest for `target`.
pub(crate) fn unpublish_request(target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: publish_request(target).volume_id,
        target_path: target.display().to_string(),
    }
}
