//! Protocol buffers of sigil: the SPIFFE Workload API that the agent serves to
//! workloads, sigil's own server API that agents and operators call, and the
//! subset of Envoy's xDS API behind the agent's Secret Discovery Service.
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
//! | `proto/envoy/**`, `proto/google/rpc/status.proto` | the subset of Envoy's xDS API that the agent's Secret Discovery Service needs, one file per protobuf package |
//! | `src/gen/envoy.*.rs`, `src/gen/google.rpc.rs` | their generated code, exposed as [`envoy`] and [`google::rpc`] (nested like the packages, because the generated code refers to other packages by relative paths) |
//! | `proto/csi/v1/csi.proto` | package `csi.v1`: the subset of the Container Storage Interface that the CSI node plugin (`sigil csi`) serves |
//! | `src/gen/csi.v1.rs` | its generated code, exposed as [`csi::v1`] |
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
//!   [`server::v1::admin_api_client::AdminApiClient`];
//! - [`envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService`],
//!   [`envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer`],
//!   [`envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient`];
//! - [`csi::v1::identity_server::Identity`], [`csi::v1::identity_server::IdentityServer`],
//!   [`csi::v1::identity_client::IdentityClient`], and
//!   [`csi::v1::node_server::Node`], [`csi::v1::node_server::NodeServer`],
//!   [`csi::v1::node_client::NodeClient`].
//!
//! The Envoy protos are written from the wire facts of Envoy's API (package,
//! message and field names and numbers), not copied; messages hold only the
//! fields sigil reads or writes, and protobuf skips the others on decoding.
//! Prost spells `SPIFFECertValidatorConfig` as
//! [`SpiffeCertValidatorConfig`](envoy::extensions::transport_sockets::tls::v3::SpiffeCertValidatorConfig);
//! the `Any` type URLs of the messages sigil packs are in [`type_urls`].
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

pub use convert::{ConvertError, entry_from_proto, entry_with_id_from_proto};

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

/// Envoy's xDS API, the subset the agent's Secret Discovery Service uses
/// (`proto/envoy/`).
pub mod envoy {
    /// Package family `envoy.config`.
    pub mod config {
        /// Package family `envoy.config.core`.
        pub mod core {
            /// Package `envoy.config.core.v3`: `Node`, `BuildVersion`,
            /// `DataSource`, `TypedExtensionConfig`, `ControlPlane`.
            #[rustfmt::skip]
            #[allow(missing_docs, unreachable_pub, clippy::all)]
            pub mod v3 {
                include!("gen/envoy.config.core.v3.rs");
            }
        }
    }

    /// Package family `envoy.type`.
    pub mod r#type {
        /// Package `envoy.type.v3`: `SemanticVersion`.
        #[rustfmt::skip]
        #[allow(missing_docs, unreachable_pub, clippy::all)]
        pub mod v3 {
            include!("gen/envoy.r#type.v3.rs");
        }
    }

    /// Package family `envoy.service`.
    pub mod service {
        /// Package family `envoy.service.discovery`.
        pub mod discovery {
            /// Package `envoy.service.discovery.v3`: `DiscoveryRequest`,
            /// `DiscoveryResponse` and the delta messages.
            #[rustfmt::skip]
            #[allow(missing_docs, unreachable_pub, clippy::all)]
            pub mod v3 {
                include!("gen/envoy.service.discovery.v3.rs");
            }
        }

        /// Package family `envoy.service.secret`.
        pub mod secret {
            /// Package `envoy.service.secret.v3`: the `SecretDiscoveryService`
            /// ([`secret_discovery_service_server`](v3::secret_discovery_service_server),
            /// [`secret_discovery_service_client`](v3::secret_discovery_service_client)).
            #[rustfmt::skip]
            #[allow(missing_docs, unreachable_pub, clippy::all)]
            pub mod v3 {
                include!("gen/envoy.service.secret.v3.rs");
            }
        }
    }

    /// Package family `envoy.extensions`.
    pub mod extensions {
        /// Package family `envoy.extensions.transport_sockets`.
        pub mod transport_sockets {
            /// Package family `envoy.extensions.transport_sockets.tls`.
            pub mod tls {
                /// Package `envoy.extensions.transport_sockets.tls.v3`:
                /// `Secret`, `TlsCertificate`, `CertificateValidationContext`,
                /// `SPIFFECertValidatorConfig`.
                #[rustfmt::skip]
                #[allow(missing_docs, unreachable_pub, clippy::all)]
                pub mod v3 {
                    include!("gen/envoy.extensions.transport_sockets.tls.v3.rs");
                }
            }
        }
    }
}

/// Google's API messages that xDS uses (`proto/google/rpc/`).
pub mod google {
    /// Package `google.rpc`: `Status`, the `error_detail` of a rejected
    /// (NACKed) xDS response.
    #[rustfmt::skip]
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod rpc {
        include!("gen/google.rpc.rs");
    }
}

/// The Container Storage Interface (`proto/csi/`).
pub mod csi {
    /// Package `csi.v1`: the `Identity` service
    /// ([`identity_server`](v1::identity_server),
    /// [`identity_client`](v1::identity_client)) and the `Node` RPCs of an
    /// ephemeral-volume node plugin ([`node_server`](v1::node_server),
    /// [`node_client`](v1::node_client)). Names and numbers are the CSI
    /// specification's; the messages hold only the fields sigil uses.
    #[rustfmt::skip]
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        include!("gen/csi.v1.rs");
    }
}

/// The `google.protobuf.Any` type URLs of the Envoy messages the agent packs.
pub mod type_urls {
    /// `envoy.extensions.transport_sockets.tls.v3.Secret`: the resource type
    /// of the Secret Discovery Service.
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    /// `envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig`:
    /// the typed config of the SPIFFE certificate validator.
    pub const SPIFFE_CERT_VALIDATOR_CONFIG: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
}
