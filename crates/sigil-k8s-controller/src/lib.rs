//! The entry controller of `sigil k8s controller`: registration entries from Kubernetes custom
//! resources, kept in sync with the cluster's pods, like
//! spire-controller-manager.
//!
//! | module | role |
//! |---|---|
//! | [`crd`] | `ClusterSPIFFEID` and `ClusterStaticEntry` (group `identity.sigil`, `v1alpha1`, cluster-scoped), their status, and the CRD manifests of `deploy/crds/` |
//! | [`template`] | the template language of `ClusterSPIFFEID` (Go-template field lookups, nothing else) |
//! | [`reconcile`] | the pure core: objects → desired entries and statuses → create/update/delete |
//! | [`federation`] | `ClusterFederatedTrustDomain` resources → the server's federation relationships |
//! | [`admin`] | the server's admin API over its Unix socket: list entries, apply a plan in batches |
//! | [`leader`] | leader election on a Lease: of several controllers (one per server replica) one acts |
//! | [`publish`] | the trust bundle in `ClusterTrustBundle`s and in a ConfigMap per opted-in namespace |
//! | [`run`] | the running controller: watchers, debounced full reconciles, status updates |
//!
//! # Which entries
//!
//! A `ClusterSPIFFEID` selects pods by namespace and pod labels. In mode
//! `PerPod` (the default, as spire-controller-manager) each running,
//! scheduled pod gets one entry parented to the PSAT agent of its node,
//! `spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node UID>`, with the
//! selector `k8s:pod-uid:<uid>` plus the rendered `workloadSelectorTemplates`.
//! In mode `PerServiceAccount` the pods of one namespace and service account
//! (and region or zone, when the templates use node labels whose key ends in
//! `/region` or `/zone`) share one entry with the selectors `k8s:ns:<ns>` and
//! `k8s:sa:<sa>`, parented to a node alias
//! `spiffe://<td>/sigil/k8s/<cluster>/nodes[/region/<r>][/zone/<z>]` that
//! matches the agents attested with `k8s_psat:cluster:<cluster>` (and
//! `k8s_psat:region:` / `k8s_psat:zone:`, which the server gives only for
//! trusted location labels). So 30 pods of one service account cost one
//! entry instead of 30, and scaling a deployment changes no entry.
//!
//! A `ClusterStaticEntry` is one entry, given literally.
//!
//! A `ClusterFederatedTrustDomain` is one federation relationship (see
//! [`federation`] for which relationships the controller owns).
//!
//! The controller owns exactly the entries whose ID is `k8s-<cluster>-` and 32
//! hex digits (see [`reconcile`]); it never changes any other entry.
//!
//! # Permissions
//!
//! The controller runs next to the server (it needs the admin socket) with a
//! Kubernetes identity allowed to `list` and `watch` pods, namespaces,
//! nodes, `clusterspiffeids`, `clusterstaticentries` and
//! `clusterfederatedtrustdomains`, and to `patch` the `status` subresource
//! of the last three; for the trust bundle ([`publish`]), to `list`,
//! `create`, `update` and `delete` ConfigMaps and `ClusterTrustBundle`s.

pub mod admin;
pub mod crd;
pub mod federation;
pub mod leader;
pub mod publish;
pub mod reconcile;
pub mod run;
pub mod template;

pub use crd::{
    ClusterFederatedTrustDomain, ClusterFederatedTrustDomainSpec,
    ClusterFederatedTrustDomainStatus, ClusterSPIFFEID, ClusterSPIFFEIDSpec, ClusterSPIFFEIDStatus,
    ClusterStaticEntry, ClusterStaticEntrySpec, ClusterStaticEntryStatus, Mode, crd_manifests,
    crds, crds_yaml,
};
pub use reconcile::{Desired, Plan, Settings, Snapshot, plan, render};
pub use run::{ControllerConfig, run};
/// The API client the controller runs with: from a kubeconfig file (its
/// current context), or inferred (`KUBECONFIG`, `~/.kube/config`, then the
/// in-cluster service account). The server's PSAT verification builds its
/// client the same way.
pub use sigil_k8s::api::{ApiClientError, api_client as kube_client};

/// Why the controller could not start or reconcile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// The cluster name is not 1 to 63 letters, digits, `.`, `-` or `_`.
    #[error(
        "invalid cluster name {0:?}: use 1 to 63 letters, digits, '.', '-' or '_' (the server's PSAT cluster profile name)"
    )]
    InvalidClusterName(String),
    /// Leader election is misconfigured.
    #[error("leader election: {0}")]
    Leader(String),
    /// A setting of the bundle publisher is invalid.
    #[error(transparent)]
    Publish(#[from] publish::PublishConfigError),
    /// The server's admin socket could not be reached.
    #[error("cannot connect to the admin socket {path}: {reason}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// An admin API call failed as a whole.
    #[error("admin API {call}: {status}")]
    Admin {
        /// The method.
        call: &'static str,
        /// The server's answer.
        status: String,
    },
    /// The server answered with something that is not a valid entry or trust domain.
    #[error("the server sent {0}")]
    BadAnswer(String),
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A watcher's cache was dropped before it filled.
    #[error("the {0} watcher stopped before its first list")]
    WatcherStopped(&'static str),
    /// A CRD could not be written as YAML.
    #[error("cannot write the CRD as YAML: {0}")]
    Yaml(String),
    /// A value the controller built itself was invalid (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}
