//! The driver's errors and their one mapping to gRPC status codes.

use std::path::PathBuf;

/// Why the driver could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// `--driver-name` is not a CSI driver name (63 characters or less,
    /// alphanumerics at both ends, `-`, `_`, `.` and alphanumerics between).
    #[error(
        "invalid driver name {0:?}: 1 to 63 characters, alphanumerics at both ends, '-', '_', '.' and alphanumerics between"
    )]
    DriverName(String),
    /// `--node-id` is empty or longer than the CSI limit of 256 bytes.
    #[error("invalid node ID {0:?}: 1 to 256 bytes")]
    NodeId(String),
    /// A directory the driver needs (`--workload-api-socket-dir`,
    /// `--kubelet-pods-dir`) is missing or not a directory.
    #[error("{flag} {}: {source}", path.display())]
    Directory {
        /// The flag that names it.
        flag: &'static str,
        /// The path as given.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The CSI socket could not be created.
    #[error("cannot listen on the CSI socket {}: {source}", path.display())]
    Socket {
        /// `--csi-socket`.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Why a CSI request was refused or failed. Each variant maps to one gRPC
/// code in [`RequestError::to_status`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// A field the CSI specification makes REQUIRED is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// The request asks for something this driver does not do: a block
    /// volume, a writable volume, a persistent volume, mount flags, volume
    /// attributes it does not know.
    #[error("{0}")]
    Unsupported(String),
    /// `target_path` is not where the kubelet publishes an ephemeral CSI
    /// volume: outside `--kubelet-pods-dir` once resolved, `..` in it, a
    /// symbolic link or a file at it.
    #[error("target_path {path:?} refused: {reason}")]
    TargetPath {
        /// The path as the caller sent it.
        path: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Something other than the socket directory is already mounted at
    /// `target_path` (NodePublishVolume).
    #[error("target_path {0:?} already has another mount; not mounting over it")]
    AlreadyPublished(String),
    /// Something other than the socket directory is mounted at
    /// `target_path` (NodeUnpublishVolume): the driver never unmounts what
    /// it did not mount.
    #[error("target_path {0:?} has a mount this driver did not make; not unmounting it")]
    ForeignMount(String),
    /// `target_path` holds files after the unmount, so it is not removed.
    #[error("target_path {0:?} is not empty after the unmount; not removing it")]
    NotEmpty(String),
    /// The Workload API socket directory is gone.
    #[error("the Workload API socket directory is unavailable: {0}")]
    SourceUnavailable(std::io::Error),
    /// A system call failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl RequestError {
    /// The gRPC status for the kubelet, with the codes of the CSI
    /// specification: INVALID_ARGUMENT for a missing or unusable field,
    /// ALREADY_EXISTS for a target published differently, FAILED_PRECONDITION
    /// when the node's state forbids the call, INTERNAL for a failed system
    /// call. The caller is the kubelet (root on the node), so the message
    /// names the path and the reason; it never carries request values other
    /// than the path.
    pub fn to_status(&self) -> tonic::Status {
        let code = match self {
            Self::Missing(_) | Self::Unsupported(_) | Self::TargetPath { .. } => {
                tonic::Code::InvalidArgument
            }
            Self::AlreadyPublished(_) => tonic::Code::AlreadyExists,
            Self::ForeignMount(_) | Self::NotEmpty(_) | Self::SourceUnavailable(_) => {
                tonic::Code::FailedPrecondition
            }
            Self::Io { .. } => tonic::Code::Internal,
        };
        tonic::Status::new(code, self.to_string())
    }
}
