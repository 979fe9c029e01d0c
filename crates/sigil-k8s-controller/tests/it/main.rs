//! sigil-k8s-controller integration tests: the entry controller against a
//! fake kube-apiserver serving recorded objects and a real sigil server,
//! federation resources, the trust bundle publisher, and the shipped RBAC against the requests the code
//! makes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod controller;
mod fake_kube;
mod federation;
mod leader;
mod publish;
mod rbac;
