//! The sigil server: the CA and the registry of a trust domain.
//!
//! It attests agents (join tokens, Kubernetes PSATs), issues their SVIDs, keeps every entry in
//! an in-memory [`index`] fed by the store's change feed, pushes each agent
//! exactly its authorized entries over a long-lived sync stream, signs CSRs
//! and mints JWT-SVIDs for those entries only, and serves the admin API on a
//! Unix socket.
//!
//! | module | role |
//! |---|---|
//! | `start` | [`start`]: builds the [`ServerState`], starts every listener and loop; [`ServerHandle`] |
//! | `state` | [`ServerState`], shared by every task, and who writes what |
//! | `follower` | the change-feed follower, the one writer of the index and the agents in memory |
//! | `background` | server SVID renewal, CA rotation, pruning |
//! | [`config`] | the TOML config and its validation |
//! | [`error`] | [`ServerError`] and its one mapping to gRPC statuses |
//! | [`ca`] | X.509 and JWT authorities, rotation, the bundle |
//! | [`index`] | entries in memory, authorized sets |
//! | [`agents`] | attested agents in memory, for authentication |
//! | [`registry`] | entries: create, update, delete, expire |
//! | [`attestation`] | join tokens, agent SVIDs, agent authentication, renewal, bans |
//! | [`psat`] | Kubernetes PSAT node attestation (cargo feature `k8s`) |
//! | [`signing`] | X.509-SVIDs and JWT-SVIDs for authorized entries |
//! | [`pod_certificate`] | X509-SVIDs of Kubernetes PodCertificateRequests, for the entry controller |
//! | [`agent_api`] | what agents call, over mutual TLS |
//! | [`sync_pages`] | one sync update split into bounded pages |
//! | [`admin_api`] | what operators call, over the admin socket |
//! | [`tls`] | the TLS listener and peer identities |
//! | [`limits`] | message sizes, rate limits, connection caps, timeouts |
//! | [`federation`] | the bundle endpoint and federation with other trust domains |
//! | [`oidc`] | OIDC discovery and the JWKS for cloud IAMs |
//! | [`readiness`] | what `/readyz` checks |

pub mod admin_api;
pub mod agent_api;
pub mod agents;
pub mod attestation;
mod background;
pub mod ca;
mod cert_files;
pub mod config;
pub mod error;
pub mod federation;
mod follower;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod oidc;
pub mod pod_certificate;
pub mod psat;
pub mod readiness;
pub mod registry;
pub mod signing;
mod start;
mod state;
pub mod sync_pages;
pub mod tls;

#[cfg(test)]
mod test_alloc;

pub use config::ServerConfig;
pub use error::ServerError;
pub use start::{ServerHandle, open_store, start, start_with_store};
pub use state::ServerState;

/// Largest gRPC message the server accepts by default (a batch of CSRs or
/// entries); `[server.limits]` sets the actual caps.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How long connections of the agent and admin APIs get to finish once the
/// server stops (calls in flight complete; sync streams end at once): after
/// it, those still open are closed.
pub const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);
