//! Kubernetes support for sigil.
//!
//! | module | role |
//! |---|---|
//! | [`api`] | the Kubernetes API client, from a kubeconfig file or inferred |
//! | [`cgroup`] | `/proc/<pid>/cgroup` → pod UID and container ID, only under the kubelet's cgroup root |
//! | [`kubelet`] | the kubelet pod list: client, shared cache, pod lookup, `k8s:` selectors |
//! | [`selectors`] | the `k8s:` selectors of a pod (agent and controller alike) |
//! | [`psat`] | projected service-account token node attestation (agent and server sides) |
//!
//! The entry controller is the crate `sigil-k8s-controller`, so that the agent
//! and the server, which use the parts above, need not wait for it to build.

#[cfg(feature = "psat")]
pub mod api;
pub mod cgroup;
#[cfg(feature = "kubelet")]
pub mod kubelet;
#[cfg(feature = "psat")]
pub mod psat;
pub mod selectors;
