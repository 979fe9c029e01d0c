//! Integration tests of sigil as users run it: a real server and agent (in
//! process, from sigil-testkit, or as the `sigil` binary), driven by clients
//! nobody here wrote (the `spiffe` and `spiffe-rustls` crates, `openssl`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod attributes;
mod authority;
mod cli;
mod durability;
mod faults;
mod federation;
mod h2_authority;
mod ha;
mod kubernetes;
mod mtls;
mod oidc;
mod processes;
mod procs;
mod proxy;
mod pyspiffe;
mod resilience;
mod rotation;
mod sds;
mod security;
mod workload_api;

use std::time::Duration;

use sigil_testkit::{Cluster, ClusterOptions};

/// Runs the rustls provider setup once for the test process.
fn init() {
    sigil_svid::install_crypto_provider();
}

/// A cluster with the caller (this test process, by uid) registered as
/// `spiffe://example.org/test`, waited for until the agent holds its SVID.
async fn cluster_with_me(opts: ClusterOptions) -> (Cluster, spiffe::SpiffeId) {
    init();
    let cluster = Cluster::start(opts).await.expect("cluster starts");
    let uid = nix::unistd::getuid();
    let entry = cluster
        .register("/test", &[&format!("unix:uid:{uid}")])
        .await
        .expect("entry created");
    cluster
        .wait_for_svid(&entry.spiffe_id)
        .await
        .expect("SVID issued");
    (
        cluster,
        "spiffe://example.org/test".parse().expect("valid id"),
    )
}

/// A bound for waits that should take milliseconds; exceeding it is a failure.
const PROMPT: Duration = Duration::from_secs(5);
