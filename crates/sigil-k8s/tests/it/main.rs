//! sigil-k8s integration tests: cgroup parsing, the kubelet client and PSAT
//! node attestation, each against recorded fixtures served by local fakes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod cgroup;
mod hostile;
mod kubelet;
mod psat;
