//! sigil-testkit integration tests: the fake Kubernetes endpoints themselves,
//! and PSAT node attestation end to end: a real server whose PSAT cluster
//! profiles point at the fake kube-apiserver, called over its TLS agent API.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod fakes;
mod psat;
