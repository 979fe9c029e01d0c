//! Kubernetes support for sigil.
//!
//! | module | role |
//! |---|---|
//! | [`cgroup`] | `/proc/<pid>/cgroup` → pod UID and container ID, only under the kubelet's cgroup root |
//! | [`kubelet`] | the kubelet pod list: client, shared cache, pod lookup, `k8s:` selectors |
//! | [`psat`] | projected service-account token node attestation (agent and server sides) |
//! | [`controller`] | the entry controller: `ClusterSPIFFEID` / `ClusterStaticEntry` resources to registration entries |

pub mod cgroup;
#[cfg(feature = "controller")]
pub mod controller;
#[cfg(feature = "kubelet")]
pub mod kubelet;
#[cfg(feature = "psat")]
pub mod psat;
