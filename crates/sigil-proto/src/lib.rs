//! Protocol buffers of sigil: the SPIFFE Workload API that the agent serves to
//! workloads, and sigil's own server API that agents and operators call.
//!
//! # Layout
//!
//! | path | what it holds |
//! |---|---|
//! | `proto/workload.proto` | the SPIFFE Workload API, deliberately without a package so that its methods live at `/SpiffeWorkloadAPI/<Method>` |
//! | `proto/server.proto` | package `sigil.server.v1`: `AgentApi` (agents, over mutual TLS) and `AdminApi` (operators, over the admin socket) |
//! | `src/gen/_.rs` | generated code of `workload.proto`, exposed as [`workload`] |
//! | `src/gen/sigil.server.v1.rs` | generated code of `server.proto`, exposed as [`server::v1`] |
//! | [`convert`] | conversions between [`server::v1`] messages and [`sigil_types`] |
//!
//! Each generated module holds the prost messages, a `<service>_server`
//! module with the service trait and its tonic server wrapper, and a
//! `<service>_client` module with the tonic client (including `connect`):
//!
//! - [`workload::spiffe_workload_api_server::SpiffeWorkloadApi`],
//!   [`workload::spiffe_workload_api_server::SpiffeWorkloadApiServer`],
//!   [`workload::spiffe_workload_api_client::SpiffeWorkloadApiClient`];
//! - [`server::v1::agent_api_server::AgentApi`],
//!   [`server::v1::agent_api_server::AgentApiServer`],
//!   [`server::v1::agent_api_client::AgentApiClient`];
//! - [`server::v1::admin_api_server::AdminApi`],
//!   [`server::v1::admin_api_server::AdminApiServer`],
//!   [`server::v1::admin_api_client::AdminApiClient`].
//!
//! Prost turns acronyms into camel case, so `X509SVIDRequest` becomes
//! [`workload::X509svidRequest`] and `JWTSVID` becomes [`workload::Jwtsvid`].
//! `google.protobuf.Struct` maps to [`prost_types::Struct`].
//!
//! # Regenerating
//!
//! The generated code is committed, so building this crate needs neither
//! `protoc` nor a build script. After editing a `.proto` file, run
//!
//! ```text
//! SIGIL_BLESS=1 cargo test -p sigil-proto
//! ```
//!
//! which compiles the protos with protox and tonic-prost-build (the test
//! `generated_code_is_current` in `tests/it/`) and rewrites `src/gen/`.
//! Without `SIGIL_BLESS=1` the same test fails whenever `src/gen/` differs
//! from what the protos generate. The generated files are pulled in with
//! `include!`, so `cargo fmt` leaves them as generated.

pub mod convert;

pub use convert::{ConvertError, entry_from_proto};

/// The SPIFFE Workload API (`proto/workload.proto`, no package): messages,
/// [`spiffe_workload_api_server`](workload::spiffe_workload_api_server) and
/// [`spiffe_workload_api_client`](workload::spiffe_workload_api_client).
#[rustfmt::skip]
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod workload {
    include!("gen/_.rs");
}

/// sigil's own server API.
pub mod server {
    /// Package `sigil.server.v1` (`proto/server.proto`): messages such as
    /// [`Entry`](v1::Entry) and [`Agent`](v1::Agent), `AgentApi`
    /// ([`agent_api_server`](v1::agent_api_server),
    /// [`agent_api_client`](v1::agent_api_client)) and `AdminApi`
    /// ([`admin_api_server`](v1::admin_api_server),
    /// [`admin_api_client`](v1::admin_api_client)).
    #[rustfmt::skip]
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        include!("gen/sigil.server.v1.rs");
    }
}
