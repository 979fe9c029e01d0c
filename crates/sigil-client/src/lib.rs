//! Clients of sigil's gRPC APIs on Unix sockets.
//!
//! One connector opens a tonic [`Channel`](tonic::transport::Channel) over a
//! Unix socket, from a path or a `unix:` address ([`address`], [`connect`]).
//! On top of it: the SPIFFE Workload API client, which sends the
//! `workload.spiffe.io` header on every call itself ([`workload`]), and the
//! server's admin API client, with paged listing and batched writes
//! ([`admin`]). The CLI, the Kubernetes controller, the proxy and the load
//! generator all reach the agent and the server through this crate.

pub mod address;
pub mod admin;
pub mod connect;
pub mod workload;

pub use address::{AddressError, socket_path};
pub use admin::{AdminClient, AdminError};
pub use connect::{ConnectError, UnixConnector, channel};
pub use workload::WorkloadClient;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn spawnable<F: Future + Send + 'static>(_: F) {}

    /// Callers run these calls in spawned tasks: every future must be `Send`
    /// for any lifetime of the borrowed arguments.
    #[test]
    fn futures_can_be_spawned() {
        spawnable(async {
            let p = PathBuf::from("/nonexistent.sock");
            let _ = channel(&p).await;
        });
        spawnable(async {
            let p = PathBuf::from("/nonexistent.sock");
            let _ = WorkloadClient::connect(&p).await;
        });
        spawnable(async {
            let Ok(mut c) = AdminClient::connect(Path::new("/nonexistent.sock")).await else {
                return;
            };
            let _ = c.trust_domain().await;
            let _ = c.get_entry(String::new()).await;
            let _ = c.list_entries(Default::default()).await;
            let _ = c.create_entries(Vec::new()).await;
            let _ = c.update_entries(Vec::new()).await;
            let _ = c.delete_entries(Vec::new()).await;
        });
    }
}
