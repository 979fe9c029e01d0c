//! The sigil CSI node plugin (`sigil csi`): pods get the agent's Workload
//! API socket through an ephemeral inline CSI volume instead of a hostPath
//! volume, which Pod Security "restricted" (and "baseline") forbid.
//!
//! The driver serves the CSI v1 Identity service and the Node RPCs
//! NodeGetInfo, NodeGetCapabilities, NodePublishVolume and
//! NodeUnpublishVolume on a Unix socket, for the kubelet (found through the
//! node-driver-registrar). Every other RPC answers UNIMPLEMENTED.
//!
//! NodePublishVolume bind-mounts the socket *directory* read-only (and
//! nosuid, nodev, noexec) at the kubelet's target directory; it serves only
//! ephemeral inline volumes that the pod declares read-only, and only
//! targets of the kubelet's layout inside the pods directory, reached
//! without a symbolic link. NodeUnpublishVolume unmounts only
//! a mount of that directory and removes the target. docs/kubernetes.md
//! ("Workload API in restricted pods: the CSI driver") shows the
//! deployment; docs/design-notes.md explains the choices.

mod error;
mod mount;
mod service;
mod target;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

pub use error::{RequestError, StartError};
pub use service::{EPHEMERAL_KEY, KUBELET_KEY_PREFIX};

/// The driver name by default, as in deploy/'s CSIDriver object.
pub const DEFAULT_DRIVER_NAME: &str = "csi.sigil.dev";
/// The driver name of SPIRE's CSI driver, which manifests written for it
/// use; `--driver-name csi.spiffe.io` serves them unchanged.
pub const SPIFFE_DRIVER_NAME: &str = "csi.spiffe.io";
/// Where the node-driver-registrar expects the socket by default.
pub const DEFAULT_CSI_SOCKET: &str = "/csi/csi.sock";
/// The kubelet's pods directory by default.
pub const DEFAULT_KUBELET_PODS_DIR: &str = "/var/lib/kubelet/pods";
/// The agent's socket directory by default (its `socket_path` is
/// `/run/sigil/agent/api.sock`).
pub const DEFAULT_SOCKET_DIR: &str = "/run/sigil/agent";

/// The longest a CSI call may take before it is answered DEADLINE_EXCEEDED.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The CSI limit on a node ID.
const MAX_NODE_ID: usize = 256;

/// Settings of the driver (the flags of `sigil csi`).
#[derive(Debug, Clone)]
pub struct CsiConfig {
    /// The Unix socket to serve CSI on (`--csi-socket`).
    pub csi_socket: PathBuf,
    /// The name in GetPluginInfo and the CSIDriver object (`--driver-name`).
    pub driver_name: String,
    /// This node's ID in NodeGetInfo (`--node-id`), the node's name.
    pub node_id: String,
    /// The directory mounted into pods (`--workload-api-socket-dir`).
    pub workload_api_socket_dir: PathBuf,
    /// The only place targets may be (`--kubelet-pods-dir`).
    pub kubelet_pods_dir: PathBuf,
}

impl CsiConfig {
    /// The defaults, with this node ID.
    pub fn with_defaults(node_id: impl Into<String>) -> Self {
        Self {
            csi_socket: DEFAULT_CSI_SOCKET.into(),
            driver_name: DEFAULT_DRIVER_NAME.into(),
            node_id: node_id.into(),
            workload_api_socket_dir: DEFAULT_SOCKET_DIR.into(),
            kubelet_pods_dir: DEFAULT_KUBELET_PODS_DIR.into(),
        }
    }
}

/// Whether `name` is a CSI driver name: 63 characters or less, beginning
/// and ending with an alphanumeric, with `-`, `_`, `.` and alphanumerics
/// between (CSI spec, GetPluginInfo).
pub fn is_valid_driver_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn directory(flag: &'static str, path: &Path) -> Result<PathBuf, StartError> {
    let err = |source| StartError::Directory {
        flag,
        path: path.to_path_buf(),
        source,
    };
    let resolved = std::fs::canonicalize(path).map_err(err)?;
    if !resolved.is_dir() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    Ok(resolved)
}

/// Creates the CSI socket, replacing a stale socket (never another kind of
/// file); only root may connect.
fn bind(path: &Path) -> Result<UnixListener, StartError> {
    let err = |source| StartError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// A running driver.
#[derive(Debug)]
pub struct CsiHandle {
    socket: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl CsiHandle {
    /// The CSI socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Stops serving and removes the socket. Mounts stay: pods keep their
    /// volume, and the kubelet unpublishes them through the next driver.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Checks the settings and starts serving CSI on a task of the current
/// tokio runtime (nothing here waits, so this is not `async`).
pub fn start(config: CsiConfig) -> Result<CsiHandle, StartError> {
    if !is_valid_driver_name(&config.driver_name) {
        return Err(StartError::DriverName(config.driver_name));
    }
    if config.node_id.is_empty() || config.node_id.len() > MAX_NODE_ID {
        return Err(StartError::NodeId(config.node_id));
    }
    let source = directory("--workload-api-socket-dir", &config.workload_api_socket_dir)?;
    let pods =
        target::PodsDir::new(&config.kubelet_pods_dir).map_err(|source| StartError::Directory {
            flag: "--kubelet-pods-dir",
            path: config.kubelet_pods_dir.clone(),
            source,
        })?;
    let listener = bind(&config.csi_socket)?;
    let driver = Arc::new(service::Driver {
        name: config.driver_name.clone(),
        node_id: config.node_id.clone(),
        source,
        pods,
        lock: tokio::sync::Mutex::new(()),
    });
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let identity = sigil_proto::csi::v1::identity_server::IdentityServer::from_arc(driver.clone());
    let node = sigil_proto::csi::v1::node_server::NodeServer::from_arc(driver);
    let task = tokio::spawn(async move {
        // The :authority shim: grpc-go (the kubelet, the registrar) and
        // every other stack reach the services over a Unix socket.
        let incoming =
            sigil_uds::incoming(tokio_stream::wrappers::UnixListenerStream::new(listener));
        let result = tonic::transport::Server::builder()
            .timeout(REQUEST_TIMEOUT)
            .add_service(identity)
            .add_service(node)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "CSI server stopped");
        }
    });
    tracing::info!(
        socket = %config.csi_socket.display(),
        driver = %config.driver_name,
        node = %config.node_id,
        source = %config.workload_api_socket_dir.display(),
        pods = %config.kubelet_pods_dir.display(),
        "CSI driver started"
    );
    Ok(CsiHandle {
        socket: config.csi_socket,
        cancel,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names() {
        for ok in [DEFAULT_DRIVER_NAME, SPIFFE_DRIVER_NAME, "a", "a-b_c.d9"] {
            assert!(is_valid_driver_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a.", "a b", "a/b", &"a".repeat(64), "é"] {
            assert!(!is_valid_driver_name(bad), "{bad}");
        }
    }
}
