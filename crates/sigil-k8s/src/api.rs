//! The Kubernetes API client, configured the one way the server's PSAT
//! verification and the entry controller both use: from a kubeconfig file
//! when one is given, otherwise inferred (`KUBECONFIG`, `~/.kube/config`,
//! or the in-cluster service account).
//!
//! Building a client instantiates kube's configuration and tower stack.
//! It is done here, once, behind a boxed future, so the crates that call
//! it do not each compile that code again (docs/benchmarks.md, "First
//! build").

use std::path::Path;

/// The client type, for crates that hold one without depending on kube.
pub use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use sigil_types::BoxFuture;

/// Why no API client could be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiClientError {
    /// The kubeconfig file given could not be read or used.
    #[error("cannot use the kubeconfig {path}: {reason}")]
    File {
        /// The kubeconfig file.
        path: String,
        /// Why.
        reason: String,
    },
    /// No configuration was given and none could be inferred.
    #[error(
        "no Kubernetes API configuration in KUBECONFIG, ~/.kube/config or the in-cluster service account: {0}"
    )]
    Infer(String),
    /// A configuration was found, but no client could be built from it.
    #[error("cannot build a Kubernetes API client: {0}")]
    Build(String),
}

/// An API client from `kubeconfig`, or inferred when `None`.
#[inline(never)]
pub fn api_client(kubeconfig: Option<&Path>) -> BoxFuture<'_, Result<Client, ApiClientError>> {
    Box::pin(build(kubeconfig))
}

async fn build(kubeconfig: Option<&Path>) -> Result<Client, ApiClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = |e: &dyn std::fmt::Display| ApiClientError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            };
            let kc = Kubeconfig::read_from(path).map_err(|e| file(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| file(&e))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ApiClientError::Infer(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| ApiClientError::Build(e.to_string()))
}
