//! The server's error type and its one mapping to gRPC statuses.

use tonic::Status;

/// Everything that can go wrong inside the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The store failed or refused a write.
    #[error(transparent)]
    Store(#[from] sigil_store::StoreError),
    /// Minting, parsing or verifying a credential failed.
    #[error(transparent)]
    Svid(#[from] sigil_svid::SvidError),
    /// A file or socket operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The caller sent something malformed; the message says what.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller is not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller could not be authenticated.
    #[error("{0}")]
    Unauthenticated(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A bug or broken invariant; details go to the log, not the caller.
    #[error("internal error: {0}")]
    Internal(String),
    /// The server is shutting down or not ready, or a service it depends on
    /// (a cluster's Kubernetes API server) is unreachable; worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// The call needs a feature this server was built without.
    #[error("{0}")]
    Unimplemented(String),
    /// The configuration was rejected when the server started (a PSAT
    /// cluster's JWKS or kubeconfig); the error names the key.
    #[error(transparent)]
    Config(#[from] sigil_types::config::ConfigError),
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        use sigil_store::StoreError as S;
        match e {
            ServerError::InvalidArgument(m) => Status::invalid_argument(m),
            ServerError::PermissionDenied(m) => Status::permission_denied(m),
            ServerError::Unauthenticated(m) => Status::unauthenticated(m),
            ServerError::NotFound(m) => Status::not_found(m),
            ServerError::Unavailable(m) => Status::unavailable(m),
            ServerError::Unimplemented(m) => Status::unimplemented(m),
            ServerError::Store(e @ S::NotFound(_)) => Status::not_found(e.to_string()),
            ServerError::Store(e @ S::AlreadyExists(_)) => Status::already_exists(e.to_string()),
            ServerError::Store(S::TokenExpired) => {
                Status::permission_denied("join token has expired")
            }
            ServerError::Svid(e) => Status::invalid_argument(e.to_string()),
            other => {
                tracing::error!(error = %other, "internal error");
                Status::internal("internal error; see the server log")
            }
        }
    }
}
