//! The socket of an agent that has no identity yet and cannot reach a
//! server to attest: every Workload API and SDS call is answered at once
//! with `Unavailable` and a message saying so, while the agent keeps trying.
//!
//! Without it the socket would not exist until the server is back, and a
//! workload could not tell "no agent on this node" from "the agent is
//! waiting for its server". `Unavailable` is what SPIFFE clients retry, so a
//! workload started with the agent gets its SVID once the agent attests.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use sigil_proto::envoy::service::discovery::v3 as disc;
use sigil_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::limits::AgentLimits;
use crate::{AgentError, bind_public_socket, peer};

/// What every caller is told. It names no address and no error: those are
/// the operator's business and go to the agent's log.
pub const NOT_ATTESTED: &str =
    "the agent has not attested yet: no server is reachable; it keeps trying, retry";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers every call with `Unavailable` ([`NOT_ATTESTED`]).
#[derive(Debug, Clone, Copy)]
struct NotAttested;

fn refusal() -> Status {
    Status::unavailable(NOT_ATTESTED)
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for NotAttested {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        _: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Err(refusal())
    }

    type FetchX509BundlesStream = BoxStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        _: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(refusal())
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        Err(refusal())
    }

    type FetchJWTBundlesStream = BoxStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        _: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(refusal())
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        Err(refusal())
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for NotAttested {
    type DeltaSecretsStream = BoxStream<disc::DeltaDiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<disc::DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(refusal())
    }

    type StreamSecretsStream = BoxStream<disc::DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        _: Request<Streaming<disc::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Err(refusal())
    }

    async fn fetch_secrets(
        &self,
        _: Request<disc::DiscoveryRequest>,
    ) -> Result<Response<disc::DiscoveryResponse>, Status> {
        Err(refusal())
    }
}

/// The socket served with [`NotAttested`] until dropped. Dropping it stops
/// the server and removes the socket file, unless [`Pending::hand_over`]
/// said the file now belongs to the attested agent.
#[derive(Debug)]
pub(crate) struct Pending {
    cancel: CancellationToken,
    socket: Option<PathBuf>,
}

impl Pending {
    /// Binds `path` (replacing a stale socket, as the agent does) and serves
    /// it under the same connection caps as the real Workload API.
    pub(crate) fn serve(path: &Path, limits: &AgentLimits) -> Result<Self, AgentError> {
        let listener = bind_public_socket(path)?;
        let cancel = CancellationToken::new();
        let incoming = sigil_uds::incoming(crate::limits::incoming(
            peer::incoming(listener),
            limits.max_connections,
            limits.max_connections_per_uid,
        ));
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_streams_per_connection)
            .timeout(limits.request_timeout)
            .add_service(
                SpiffeWorkloadApiServer::new(NotAttested)
                    .max_decoding_message_size(limits.max_request_bytes),
            )
            .add_service(
                SecretDiscoveryServiceServer::new(NotAttested)
                    .max_decoding_message_size(limits.max_request_bytes),
            )
            .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "Workload API (not attested) stopped");
            }
        });
        Ok(Self {
            cancel,
            socket: Some(path.to_owned()),
        })
    }

    /// Stops serving, leaving the socket file alone: the attested agent has
    /// bound a socket of its own at the same path.
    pub(crate) fn hand_over(mut self) {
        self.socket = None;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(path) = self.socket.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
