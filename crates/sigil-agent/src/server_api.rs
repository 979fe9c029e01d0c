//! The server's agent API as the agent's core uses it: the trait
//! [`ServerClient`], so that the core depends on what it asks of the server
//! rather than on a transport, and its product implementation over gRPC,
//! [`GrpcServer`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::agent_api_client::AgentApiClient;
use sigil_svid::bundle::Bundle;
use sigil_svid::tls::RotatingCert;
use sigil_types::SpiffeId;
use tokio_stream::Stream;
use tonic::transport::Channel;

use crate::config::{AgentConfig, PsatConfig, ServerAddresses};
use crate::persist::AgentIdentity;
use crate::{AgentError, client};

/// The server's push sync: one page of an update per message.
pub type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncMessage, tonic::Status>> + Send>>;

/// The connection to the server, replaced when the core reconnects.
type SharedClient = Arc<ArcSwap<Option<AgentApiClient<Channel>>>>;

/// What the core asks of the server. Calls other than [`open_sync`] use the
/// connection the last successful [`open_sync`] opened, until
/// [`disconnect`].
///
/// [`open_sync`]: ServerClient::open_sync
/// [`disconnect`]: ServerClient::disconnect
pub trait ServerClient: Send + Sync + 'static {
    /// Connects, presenting the agent SVID, and opens the sync stream.
    fn open_sync(
        &self,
        req: pb::SyncRequest,
    ) -> impl Future<Output = Result<SyncStream, AgentError>> + Send;

    /// Drops the connection (the stream broke, or the agent SVID changed).
    fn disconnect(&self);

    /// Whether a connection is open.
    fn is_connected(&self) -> bool;

    /// Signs workload CSRs.
    fn sign_x509svids(
        &self,
        req: pb::BatchNewX509svidRequest,
    ) -> impl Future<Output = Result<pb::BatchNewX509svidResponse, tonic::Status>> + Send;

    /// A new agent SVID (its chain) for `csr`.
    fn renew_agent(
        &self,
        csr: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, AgentError>> + Send;

    /// A JWT-SVID for an entry and audiences.
    fn new_jwtsvid(
        &self,
        req: pb::NewJwtsvidRequest,
    ) -> impl Future<Output = Result<String, tonic::Status>> + Send;

    /// Attests again from scratch, without the current agent SVID (refused
    /// or expired); `None` when this agent has no way to (only PSAT agents
    /// have one).
    fn reattest(&self) -> impl Future<Output = Result<Option<AgentIdentity>, AgentError>> + Send;
}

/// [`ServerClient`] over gRPC and rustls, the server authenticated as
/// `spiffe://<td>/sigil/server` against the current bundle.
#[derive(Clone)]
pub struct GrpcServer {
    servers: ServerAddresses,
    trust: Arc<ArcSwap<Bundle>>,
    server_id: SpiffeId,
    cert: Arc<RotatingCert>,
    #[cfg_attr(not(feature = "k8s"), expect(dead_code, reason = "used by PSAT only"))]
    psat: Option<PsatConfig>,
    conn: SharedClient,
    /// Why the last connection to fail did (a TLS alert, a reset).
    failure: client::ConnectionFailure,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("servers", &self.servers.to_string())
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// A client of the servers in `cfg`, trusting `trust` and presenting
    /// `cert`; not connected yet.
    pub fn new(
        cfg: &AgentConfig,
        trust: Arc<ArcSwap<Bundle>>,
        cert: Arc<RotatingCert>,
    ) -> Result<Self, AgentError> {
        let server_id = cfg
            .trust_domain
            .id_with_path(sigil_types::SERVER_PATH)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        Ok(Self {
            servers: cfg.server_address.clone(),
            trust,
            server_id,
            cert,
            psat: cfg.k8s_psat.clone(),
            conn: Arc::new(ArcSwap::from_pointee(None)),
            failure: client::ConnectionFailure::default(),
        })
    }

    fn current(&self) -> Option<AgentApiClient<Channel>> {
        (**self.conn.load()).clone()
    }

    /// [`AgentError::from_status`], followed by the error that ended the
    /// connection when the status does not name it already.
    fn call_failed(&self, s: tonic::Status) -> AgentError {
        match (AgentError::from_status(s), self.failure.take()) {
            (AgentError::Unavailable(msg), Some(cause)) if !msg.contains(&cause) => {
                AgentError::Unavailable(format!("{msg} (the connection failed: {cause})"))
            }
            (e, _) => e,
        }
    }
}

impl ServerClient for GrpcServer {
    async fn open_sync(&self, req: pb::SyncRequest) -> Result<SyncStream, AgentError> {
        // What an earlier connection died of says nothing about this one.
        self.failure.take();
        let mut client = client::connect_watched(
            &self.servers,
            self.trust.clone(),
            self.server_id.clone(),
            Some(self.cert.clone()),
            self.failure.clone(),
        )
        .await?;
        let stream = client
            .sync(req)
            .await
            .map_err(|s| self.call_failed(s))?
            .into_inner();
        self.conn.store(Arc::new(Some(client)));
        Ok(Box::pin(stream))
    }

    fn disconnect(&self) {
        self.conn.store(Arc::new(None));
    }

    fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    async fn sign_x509svids(
        &self,
        req: pb::BatchNewX509svidRequest,
    ) -> Result<pb::BatchNewX509svidResponse, tonic::Status> {
        let Some(mut client) = self.current() else {
            return Err(tonic::Status::unavailable("not connected to a server"));
        };
        client.batch_new_x509svid(req).await.map(|r| r.into_inner())
    }

    async fn renew_agent(&self, csr: Vec<u8>) -> Result<Vec<Vec<u8>>, AgentError> {
        let Some(mut client) = self.current() else {
            return Err(AgentError::Unavailable("not connected to a server".into()));
        };
        // PSAT agents re-attest with a fresh token, so the server checks
        // the pod and node again; others renew with their current SVID.
        #[cfg(feature = "k8s")]
        if let Some(psat) = &self.psat {
            let resp =
                crate::k8s::attest_psat(&mut client, psat, csr, crate::k8s::WhenLimited::Fail)
                    .await?;
            return Ok(resp.cert_chain);
        }
        let resp = client
            .renew_agent(pb::RenewAgentRequest { csr })
            .await
            .map_err(|s| self.call_failed(s))?
            .into_inner();
        Ok(resp.cert_chain)
    }

    async fn new_jwtsvid(&self, req: pb::NewJwtsvidRequest) -> Result<String, tonic::Status> {
        let Some(mut client) = self.current() else {
            return Err(tonic::Status::unavailable("server unreachable"));
        };
        client.new_jwtsvid(req).await.map(|r| r.into_inner().token)
    }

    async fn reattest(&self) -> Result<Option<AgentIdentity>, AgentError> {
        #[cfg(feature = "k8s")]
        if let Some(psat) = &self.psat {
            let mut client = client::connect(
                &self.servers,
                self.trust.clone(),
                self.server_id.clone(),
                None,
            )
            .await?;
            let (identity, _) = crate::k8s::attest_psat_with_new_key(
                &mut client,
                psat,
                crate::k8s::WhenLimited::Fail,
            )
            .await?;
            return Ok(Some(identity));
        }
        Ok(None)
    }
}
