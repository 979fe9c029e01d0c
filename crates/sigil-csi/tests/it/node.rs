//! NodePublishVolume and NodeUnpublishVolume with real mounts, the
//! Workload API through the mounted directory, and the hostile requests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sigil_csi::{CsiConfig, CsiHandle, StartError};
use sigil_proto::csi::v1 as csi;
use sigil_testkit::Cluster;
use tokio::time::timeout;
use tonic::Code;
use tonic::transport::Channel;

use crate::{
    STEP, channel, in_private_mount_ns, kubelet_target, mounts_at, mounts_under, publish_request,
    test_name, unpublish_request,
};

type Node = csi::node_client::NodeClient<Channel>;
type Identity = csi::identity_client::IdentityClient<Channel>;

/// A driver on a socket in `root`, serving `source`, with `root/pods` as
/// the kubelet's pods directory.
struct Driver {
    handle: CsiHandle,
    pods: PathBuf,
    node: Node,
    identity: Identity,
}

async fn driver(root: &Path, source: &Path, driver_name: &str) -> Driver {
    let pods = root.join("kubelet/pods");
    std::fs::create_dir_all(&pods).unwrap();
    let config = CsiConfig {
        csi_socket: root.join("plugins/csi.sock"),
        driver_name: driver_name.into(),
        node_id: "node-a".into(),
        workload_api_socket_dir: source.to_path_buf(),
        kubelet_pods_dir: pods.clone(),
    };
    let handle = sigil_csi::start(config).unwrap();
    let ch = channel(handle.socket_path()).await;
    Driver {
        handle,
        pods,
        node: Node::new(ch.clone()),
        identity: Identity::new(ch),
    }
}

impl Driver {
    async fn publish(&mut self, req: csi::NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        timeout(STEP, self.node.node_publish_volume(req))
            .await
            .expect("NodePublishVolume answers in time")
            .map(drop)
    }

    async fn unpublish(
        &mut self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<(), tonic::Status> {
        timeout(STEP, self.node.node_unpublish_volume(req))
            .await
            .expect("NodeUnpublishVolume answers in time")
            .map(drop)
    }
}

type Change = Box<dyn Fn(&mut csi::NodePublishVolumeRequest)>;

/// A change to a kubelet's request.
fn change(f: impl Fn(&mut csi::NodePublishVolumeRequest) + 'static) -> Change {
    Box::new(f)
}

fn code(r: Result<(), tonic::Status>) -> Code {
    r.err().map_or(Code::Ok, |s| s.code())
}

/// A socket directory that is not the agent's: a marker file tells it apart.
fn plain_source(root: &Path) -> PathBuf {
    let dir = root.join("agent-socket");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("marker"), b"socket dir").unwrap();
    dir
}

/// Mounts a tmpfs at `at`, as something other than the driver would.
fn mount_tmpfs(at: &Path) {
    nix::mount::mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
}

#[test]
fn publish_serves_the_workload_api_and_unpublish_cleans_up() {
    let name = test_name(
        module_path!(),
        "publish_serves_the_workload_api_and_unpublish_cleans_up",
    );
    in_private_mount_ns(&name, || async {
        // A real server and agent; the agent's socket in its own directory,
        // as in the DaemonSet (/run/sigil/agent/api.sock).
        let mut cluster = timeout(STEP, Cluster::start(Default::default()))
            .await
            .unwrap()
            .unwrap();
        let socket_dir = cluster.dir.path().join("run-sigil-agent");
        cluster.stop_agent().await;
        cluster.agent_config.socket_path = socket_dir.join("api.sock");
        timeout(STEP, cluster.start_agent()).await.unwrap().unwrap();
        cluster.wait_connected(true).await.unwrap();
        let uid = nix::unistd::getuid();
        let entry = timeout(
            STEP,
            cluster.register("/csi-pod", &[&format!("unix:uid:{uid}")]),
        )
        .await
        .unwrap()
        .unwrap();
        cluster.wait_for_svid(&entry.spiffe_id).await.unwrap();

        let root = tempfile::tempdir().unwrap();
        let mut d = driver(root.path(), &socket_dir, sigil_csi::DEFAULT_DRIVER_NAME).await;

        // What the registrar and the kubelet ask first.
        let info = timeout(
            STEP,
            d.identity.get_plugin_info(csi::GetPluginInfoRequest {}),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert_eq!(info.name, "csi.sigil.dev");
        assert!(!info.vendor_version.is_empty());
        let probe = timeout(STEP, d.identity.probe(csi::ProbeRequest {}))
            .await
            .unwrap()
            .unwrap()
            .into_inner();
        assert_eq!(probe.ready, Some(true));
        let caps = timeout(
            STEP,
            d.identity
                .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert!(caps.capabilities.is_empty(), "a node plugin only");
        let node_info = timeout(STEP, d.node.node_get_info(csi::NodeGetInfoRequest {}))
            .await
            .unwrap()
            .unwrap()
            .into_inner();
        assert_eq!(node_info.node_id, "node-a");
        let node_caps = timeout(
            STEP,
            d.node
                .node_get_capabilities(csi::NodeGetCapabilitiesRequest {}),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert!(node_caps.capabilities.is_empty(), "no staging");

        // The kubelet publishes; the target directory does not exist yet.
        let target = kubelet_target(&d.pods, "7d1f0c4e", "spiffe-workload-api");
        assert!(!target.exists());
        d.publish(publish_request(&target)).await.unwrap();
        assert_eq!(mounts_at(&target), [true], "one read-only mount");

        // An independent Workload API client reaches the agent through it.
        let uri = format!("unix://{}", target.join("api.sock").display());
        let client = timeout(STEP, spiffe::WorkloadApiClient::connect_to(uri.clone()))
            .await
            .unwrap()
            .unwrap();
        let svid = timeout(STEP, client.fetch_x509_svid())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/csi-pod");

        // Read-only: a pod can neither add nor remove anything there.
        let err = std::fs::write(target.join("planted"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        let err = std::fs::remove_file(target.join("api.sock")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));

        // The kubelet retries: nothing is stacked.
        d.publish(publish_request(&target)).await.unwrap();
        assert_eq!(mounts_at(&target), [true]);

        // The agent restarts and makes a new socket: the directory mount
        // shows it, where a mount of the old socket file would not.
        cluster.stop_agent().await;
        timeout(STEP, cluster.start_agent()).await.unwrap().unwrap();
        cluster.wait_connected(true).await.unwrap();
        let client = timeout(STEP, spiffe::WorkloadApiClient::connect_to(uri))
            .await
            .unwrap()
            .unwrap();
        let svid = timeout(STEP, client.fetch_x509_svid())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/csi-pod");
        drop(client);

        // The pod goes away: the mount and the directory with it.
        d.unpublish(unpublish_request(&target)).await.unwrap();
        assert!(mounts_at(&target).is_empty());
        assert!(!target.exists(), "the target directory is removed");
        assert!(
            socket_dir.join("api.sock").exists(),
            "the source is untouched"
        );
        // Again, as the kubelet may: nothing left to do is success.
        d.unpublish(unpublish_request(&target)).await.unwrap();
        // Even when the volume directory itself is gone.
        std::fs::remove_dir_all(target.parent().unwrap()).unwrap();
        d.unpublish(unpublish_request(&target)).await.unwrap();

        // A second publish cycle works the same.
        let target = kubelet_target(&d.pods, "7d1f0c4e", "spiffe-workload-api");
        d.publish(publish_request(&target)).await.unwrap();
        assert_eq!(mounts_at(&target), [true]);
        d.unpublish(unpublish_request(&target)).await.unwrap();
        assert!(mounts_at(&target).is_empty());

        d.handle.shutdown().await;
        cluster.shutdown().await;
    });
}

#[test]
fn the_spiffe_driver_name_is_served() {
    let name = test_name(module_path!(), "the_spiffe_driver_name_is_served");
    // No mount here; the namespace only keeps a bug from reaching the host.
    in_private_mount_ns(&name, || async {
        let root = tempfile::tempdir().unwrap();
        let source = plain_source(root.path());
        let mut d = driver(root.path(), &source, sigil_csi::SPIFFE_DRIVER_NAME).await;
        let info = timeout(
            STEP,
            d.identity.get_plugin_info(csi::GetPluginInfoRequest {}),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert_eq!(info.name, "csi.spiffe.io");
        d.handle.shutdown().await;
    });
}

#[test]
fn hostile_target_paths_are_refused() {
    let name = test_name(module_path!(), "hostile_target_paths_are_refused");
    in_private_mount_ns(&name, || async {
        let root = tempfile::tempdir().unwrap();
        let source = plain_source(root.path());
        let mut d = driver(root.path(), &source, sigil_csi::DEFAULT_DRIVER_NAME).await;
        let outside = root.path().join("etc");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("shadow"), b"secret").unwrap();
        let before = mounts_under(root.path());
        let pods = d.pods.clone();

        // `..` out of the pods directory, in the kubelet's shape.
        std::fs::create_dir_all(root.path().join("x/volumes/kubernetes.io~csi/v")).unwrap();
        let traversal = pods.join("../../x/volumes/kubernetes.io~csi/v/mount");
        // `..` that stays inside.
        let inside = kubelet_target(&pods, "uid-1", "v");
        let inside_dotdot =
            pods.join("uid-1/volumes/kubernetes.io~csi/../kubernetes.io~csi/v/mount");
        // Outside the pods directory altogether.
        let elsewhere = root.path().join("x/volumes/kubernetes.io~csi/v/mount");
        // The target is a symbolic link to a directory outside.
        let link_target = kubelet_target(&pods, "uid-2", "v");
        std::os::unix::fs::symlink(&outside, &link_target).unwrap();
        // The volume directory is a link to a directory outside.
        std::fs::create_dir_all(outside.join("mount")).unwrap();
        std::fs::create_dir_all(pods.join("uid-3/volumes/kubernetes.io~csi")).unwrap();
        std::os::unix::fs::symlink(&outside, pods.join("uid-3/volumes/kubernetes.io~csi/v"))
            .unwrap();
        let link_parent = pods.join("uid-3/volumes/kubernetes.io~csi/v/mount");
        // The pod directory is a link to another pod's.
        std::os::unix::fs::symlink(pods.join("uid-1"), pods.join("uid-4")).unwrap();
        let link_pod = pods.join("uid-4/volumes/kubernetes.io~csi/v/mount");
        // A file instead of a directory.
        let file_target = kubelet_target(&pods, "uid-5", "v");
        std::fs::write(&file_target, b"not a dir").unwrap();
        // Not the kubelet's layout for a CSI volume.
        std::fs::create_dir_all(pods.join("uid-6/volumes/kubernetes.io~secret/v")).unwrap();
        let other_plugin = pods.join("uid-6/volumes/kubernetes.io~secret/v/mount");
        let pod_dir = pods.join("uid-6/mount");

        for (what, path) in [
            ("traversal", traversal.display().to_string()),
            ("dot-dot inside", inside_dotdot.display().to_string()),
            ("outside", elsewhere.display().to_string()),
            ("symlinked target", link_target.display().to_string()),
            ("symlinked volume dir", link_parent.display().to_string()),
            ("symlinked pod dir", link_pod.display().to_string()),
            ("file", file_target.display().to_string()),
            ("other plugin", other_plugin.display().to_string()),
            ("pod dir", pod_dir.display().to_string()),
            (
                "relative",
                "uid-1/volumes/kubernetes.io~csi/v/mount".to_owned(),
            ),
            ("etc", "/etc".to_owned()),
        ] {
            let mut req = publish_request(Path::new("/"));
            req.target_path = path.clone();
            let status = d.publish(req).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{what}: {path}: {status:?}"
            );
            let mut req = unpublish_request(Path::new("/"));
            req.target_path = path.clone();
            assert_eq!(
                code(d.unpublish(req).await),
                Code::InvalidArgument,
                "unpublish {what}: {path}"
            );
        }
        assert_eq!(mounts_under(root.path()), before, "nothing was mounted");
        assert!(!inside.exists(), "nothing was created");
        assert!(
            std::fs::symlink_metadata(&link_target)
                .unwrap()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&file_target).unwrap(), b"not a dir");
        assert_eq!(std::fs::read(outside.join("shadow")).unwrap(), b"secret");
        assert!(
            outside.join("mount").is_dir(),
            "unpublish removed nothing outside"
        );
        d.handle.shutdown().await;
    });
}

#[test]
fn writable_persistent_block_and_unknown_attribute_requests_are_refused() {
    let name = test_name(
        module_path!(),
        "writable_persistent_block_and_unknown_attribute_requests_are_refused",
    );
    in_private_mount_ns(&name, || async {
        let root = tempfile::tempdir().unwrap();
        let source = plain_source(root.path());
        let mut d = driver(root.path(), &source, sigil_csi::DEFAULT_DRIVER_NAME).await;
        let target = kubelet_target(&d.pods, "uid-1", "v");
        let before = mounts_under(root.path());

        let cases: Vec<(&str, Change)> = vec![
            ("writable", change(|r| r.readonly = false)),
            (
                "persistent (no ephemeral key)",
                change(|r| {
                    r.volume_context.remove(sigil_csi::EPHEMERAL_KEY);
                }),
            ),
            (
                "ephemeral = false",
                change(|r| {
                    r.volume_context
                        .insert(sigil_csi::EPHEMERAL_KEY.into(), "false".into());
                }),
            ),
            (
                "unknown attribute",
                change(|r| {
                    r.volume_context
                        .insert("socketDir".into(), "/var/run/secrets".into());
                }),
            ),
            (
                "block",
                change(|r| {
                    if let Some(c) = r.volume_capability.as_mut() {
                        c.access_type = Some(csi::volume_capability::AccessType::Block(
                            csi::volume_capability::BlockVolume {},
                        ));
                    }
                }),
            ),
            (
                "mount flags",
                change(|r| {
                    if let Some(c) = r.volume_capability.as_mut() {
                        c.access_type = Some(csi::volume_capability::AccessType::Mount(
                            csi::volume_capability::MountVolume {
                                mount_flags: vec!["rw".into(), "suid".into()],
                                ..Default::default()
                            },
                        ));
                    }
                }),
            ),
            ("no volume_id", change(|r| r.volume_id.clear())),
            ("no target_path", change(|r| r.target_path.clear())),
            (
                "no volume_capability",
                change(|r| r.volume_capability = None),
            ),
        ];
        for (what, change) in cases {
            let mut req = publish_request(&target);
            change(&mut req);
            let status = d.publish(req).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        }
        let mut req = unpublish_request(&target);
        req.volume_id.clear();
        assert_eq!(code(d.unpublish(req).await), Code::InvalidArgument);
        let mut req = unpublish_request(&target);
        req.target_path.clear();
        assert_eq!(code(d.unpublish(req).await), Code::InvalidArgument);

        assert_eq!(mounts_under(root.path()), before, "nothing was mounted");
        assert!(!target.exists(), "nothing was created");
        d.handle.shutdown().await;
    });
}

#[test]
fn mounts_the_driver_did_not_make_are_left_alone() {
    let name = test_name(
        module_path!(),
        "mounts_the_driver_did_not_make_are_left_alone",
    );
    in_private_mount_ns(&name, || async {
        let root = tempfile::tempdir().unwrap();
        let source = plain_source(root.path());
        let mut d = driver(root.path(), &source, sigil_csi::DEFAULT_DRIVER_NAME).await;

        // Someone else's mount at a target: not unmounted, not mounted over.
        let target = kubelet_target(&d.pods, "uid-1", "v");
        std::fs::create_dir(&target).unwrap();
        mount_tmpfs(&target);
        std::fs::write(target.join("theirs"), b"x").unwrap();
        let status = d.unpublish(unpublish_request(&target)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let status = d.publish(publish_request(&target)).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(
            mounts_at(&target),
            [false],
            "their mount is still there, alone"
        );
        assert!(target.join("theirs").exists());
        nix::mount::umount(&target).unwrap();

        // A mount stacked on top of the driver's: left alone too.
        d.publish(publish_request(&target)).await.unwrap();
        mount_tmpfs(&target);
        let status = d.unpublish(unpublish_request(&target)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(mounts_at(&target), [true, false]);
        nix::mount::umount(&target).unwrap();
        d.unpublish(unpublish_request(&target)).await.unwrap();
        assert!(mounts_at(&target).is_empty());
        assert!(!target.exists());

        // Files in an unmounted target are not deleted.
        let target = kubelet_target(&d.pods, "uid-2", "v");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        let status = d.unpublish(unpublish_request(&target)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(target.join("keep").exists());
        d.handle.shutdown().await;
    });
}

#[tokio::test]
async fn other_rpcs_are_unimplemented() {
    // No mount can happen here: runs anywhere.
    let root = tempfile::tempdir().unwrap();
    let source = plain_source(root.path());
    let d = driver(root.path(), &source, sigil_csi::DEFAULT_DRIVER_NAME).await;
    let ch = channel(d.handle.socket_path()).await;
    for path in [
        "/csi.v1.Node/NodeStageVolume",
        "/csi.v1.Node/NodeUnstageVolume",
        "/csi.v1.Node/NodeGetVolumeStats",
        "/csi.v1.Node/NodeExpandVolume",
        "/csi.v1.Controller/CreateVolume",
    ] {
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        timeout(STEP, grpc.ready()).await.unwrap().unwrap();
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let status = timeout(
            STEP,
            grpc.unary(
                tonic::Request::new(()),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                codec,
            ),
        )
        .await
        .unwrap()
        .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}");
    }
    d.handle.shutdown().await;
}

#[tokio::test]
async fn bad_settings_are_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let source = plain_source(root.path());
    let pods = root.path().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let good = CsiConfig {
        csi_socket: root.path().join("csi/csi.sock"),
        driver_name: sigil_csi::DEFAULT_DRIVER_NAME.into(),
        node_id: "node-a".into(),
        workload_api_socket_dir: source.clone(),
        kubelet_pods_dir: pods,
    };
    let start = |c: CsiConfig| sigil_csi::start(c).map(drop).unwrap_err();
    let mut c = good.clone();
    c.driver_name = "csi.sigil.dev/evil".into();
    assert!(matches!(start(c), StartError::DriverName(_)));
    let mut c = good.clone();
    c.node_id = String::new();
    assert!(matches!(start(c), StartError::NodeId(_)));
    let mut c = good.clone();
    c.workload_api_socket_dir = root.path().join("missing");
    assert!(matches!(start(c), StartError::Directory { .. }));
    let mut c = good.clone();
    c.kubelet_pods_dir = source.join("marker");
    assert!(matches!(start(c), StartError::Directory { .. }));
    // A regular file where the socket goes is not deleted.
    let mut c = good.clone();
    c.csi_socket = source.join("marker");
    assert!(matches!(start(c), StartError::Socket { .. }));
    assert_eq!(std::fs::read(source.join("marker")).unwrap(), b"socket dir");
    // A stale socket (its server gone) is replaced.
    std::fs::create_dir_all(root.path().join("csi")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&good.csi_socket).unwrap());
    let h = sigil_csi::start(good).unwrap();
    let mode = std::fs::metadata(h.socket_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only root may connect");
    h.shutdown().await;
}
