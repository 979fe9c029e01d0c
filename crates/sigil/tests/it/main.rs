//! Integration tests of sigil as users run it: a real server and agent (in
//! process, from sigil-testkit, or as the `sigil` binary), driven by clients
//! nobody here wrote (the `spiffe` and `spiffe-rustls` crates, `openssl`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod agent_faults;
mod attributes;
mod authority;
mod bad_input;
mod bounds;
mod cli;
mod consistency;
mod durability;
mod faults;
mod federation;
mod fuzz_replay;
mod h2_authority;
mod ha;
mod kubernetes;
mod mtls;
mod oidc;
mod paging;
mod powercut;
mod procedures;
mod processes;
mod procs;
mod proxy;
mod pyspiffe;
mod readiness;
mod resilience;
mod rotation;
mod sds;
mod security;
mod server_faults;
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

/// Whether a test that needs root (to run a process as another uid or in a
/// mount namespace of its own) can run. Without root it is skipped with a
/// message, except under `CI=true`, where CI runs as root and not being root
/// is a failure.
fn need_root(test: &str) -> bool {
    sigil_testkit::runnable(test, nix::unistd::geteuid().is_root(), "needs root")
}

/// A gRPC channel over the Unix socket at `path`.
async fn unix_channel(path: std::path::PathBuf) -> tonic::transport::Channel {
    sigil_client::channel(&path)
        .await
        .expect("connects to the Unix socket")
}

/// An agent API client that presents the cluster agent's own SVID (read
/// from its data directory), as the agent itself would.
async fn agent_api_as_the_agent(
    cluster: &Cluster,
) -> sigil_proto::server::v1::agent_api_client::AgentApiClient<tonic::transport::Channel> {
    let identity = sigil_agent::persist::Persist::open(&cluster.agent_config.data_dir)
        .unwrap()
        .load_identity()
        .unwrap()
        .unwrap();
    security::agent_client_with(cluster, identity.chain, &identity.key).await
}
