//! The agent API (mutual TLS): bootstrap bundle, join-token and PSAT
//! attestation, renewal, the push sync, CSR signing and JWT minting.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::agent_api_server::{AgentApi, AgentApiServer};
use sigil_types::{AgentRecord, EntryId};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::ServerState;
use crate::index::{Authorized, IndexEvent};
use crate::tls::AgentPeer;

/// The agent API's interceptor (see [`service`]).
pub type CallMarker = fn(Request<()>) -> Result<Request<()>, Status>;

/// The tonic service of the agent API, behind an interceptor that tells the
/// connection a call arrived (which stops its first-request timeout).
pub fn service(
    state: Arc<ServerState>,
    cancel: CancellationToken,
) -> InterceptedService<AgentApiServer<AgentService>, CallMarker> {
    let max = state.config.limits.max_request_bytes;
    let limiter = Arc::new(crate::limits::AgentApiLimiter::new(&state.config.limits));
    let server = AgentApiServer::new(AgentService {
        state,
        cancel,
        limiter,
    })
    .max_decoding_message_size(max);
    InterceptedService::new(server, mark_first_call)
}

/// Runs on a call's headers, before its body is read, so that a large
/// request arriving slowly still counts as the connection's first call.
fn mark_first_call(req: Request<()>) -> Result<Request<()>, Status> {
    if let Some(peer) = req.extensions().get::<AgentPeer>() {
        peer.first_call.mark();
    }
    Ok(req)
}

/// Implements [`AgentApi`].
#[derive(Debug)]
pub struct AgentService {
    state: Arc<ServerState>,
    cancel: CancellationToken,
    limiter: Arc<crate::limits::AgentApiLimiter>,
}

impl AgentService {
    async fn agent<T>(&self, req: &Request<T>) -> Result<AgentRecord, Status> {
        let peer = req.extensions().get::<AgentPeer>();
        // Before the store is read: the limit bounds that work too. Without
        // a certificate the call is refused below, but counts per address.
        match peer.and_then(|p| p.spiffe_id.as_ref()) {
            Some(id) => self.limiter.agent(id)?,
            None => self.limiter.source(peer.map(|p| p.remote))?,
        }
        Ok(self.state.authenticate_agent(peer).await?)
    }

    /// Rate limit of unauthenticated calls, per source address.
    fn unauthenticated<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.limiter
            .source(req.extensions().get::<AgentPeer>().map(|p| p.remote))
    }
}

/// The serial of the SVID the call was authenticated with (empty without one).
fn peer_serial<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<AgentPeer>()
        .and_then(|p| p.serial.clone())
        .unwrap_or_default()
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for AgentService {
    async fn get_bundle(
        &self,
        req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        self.unauthenticated(&req)?;
        Ok(Response::new(pb::GetBundleResponse {
            bundle_json: self.state.ca.bundle().to_json(),
            trust_domain: self.state.config.trust_domain.to_string(),
        }))
    }

    async fn attest_join_token(
        &self,
        req: Request<pb::AttestJoinTokenRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        self.unauthenticated(&req)?;
        let req = req.into_inner();
        let (id, chain) = self.state.attest_join_token(&req.token, &req.csr).await?;
        Ok(Response::new(pb::AttestResponse {
            spiffe_id: id.to_string(),
            cert_chain: chain,
            bundle_json: self.state.ca.bundle().to_json(),
        }))
    }

    async fn attest_psat(
        &self,
        req: Request<pb::AttestPsatRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        self.unauthenticated(&req)?;
        let req = req.into_inner();
        let (id, chain) = self
            .state
            .attest_psat(&req.cluster, &req.token, &req.csr)
            .await?;
        Ok(Response::new(pb::AttestResponse {
            spiffe_id: id.to_string(),
            cert_chain: chain,
            bundle_json: self.state.ca.bundle().to_json(),
        }))
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let agent = self.agent(&req).await?;
        let presented = peer_serial(&req);
        let chain = self
            .state
            .renew_agent(&agent, &presented, &req.get_ref().csr)
            .await?;
        Ok(Response::new(pb::AttestResponse {
            spiffe_id: agent.spiffe_id.to_string(),
            cert_chain: chain,
            bundle_json: self.state.ca.bundle().to_json(),
        }))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let agent = self.agent(&req).await?;
        let serial = peer_serial(&req);
        let req = req.into_inner();
        let mut known = HashMap::new();
        if req.revision > 0 {
            for id in &req.known_entry_ids {
                let id: EntryId = id.parse().map_err(|e: sigil_types::EntryError| {
                    Status::invalid_argument(e.to_string())
                })?;
                known.insert(id, req.revision);
            }
        }
        let (tx, rx) = mpsc::channel(16);
        let state = self.state.clone();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            state.track_stream(&agent.spiffe_id, 1);
            let id = agent.spiffe_id.clone();
            let opened = Opened {
                agent,
                serial,
                sent: known,
                snapshot: req.revision == 0,
            };
            sync_loop(&state, opened, tx, cancel).await;
            state.track_stream(&id, -1);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<pb::BatchNewX509svidRequest>,
    ) -> Result<Response<pb::BatchNewX509svidResponse>, Status> {
        let agent = self.agent(&req).await?;
        let params = req
            .into_inner()
            .params
            .into_iter()
            .map(|p| (p.entry_id, p.csr))
            .collect();
        // Up to 500 signatures: CPU work that must not stall the runtime.
        let state = self.state.clone();
        let signed = tokio::task::spawn_blocking(move || state.sign_x509_svids(&agent, params))
            .await
            .map_err(|e| Status::internal(format!("signing task failed: {e}")))??;
        let results = signed
            .into_iter()
            .map(|(entry_id, r)| match r {
                Ok(chain) => pb::X509svidResult {
                    entry_id,
                    cert_chain: chain,
                    error: String::new(),
                },
                Err(error) => pb::X509svidResult {
                    entry_id,
                    cert_chain: vec![],
                    error,
                },
            })
            .collect();
        Ok(Response::new(pb::BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        req: Request<pb::NewJwtsvidRequest>,
    ) -> Result<Response<pb::NewJwtsvidResponse>, Status> {
        let agent = self.agent(&req).await?;
        let req = req.into_inner();
        let token = self
            .state
            .mint_jwt_svid(&agent, &req.entry_id, &req.audience)?;
        Ok(Response::new(pb::NewJwtsvidResponse { token }))
    }
}

/// What a sync stream has told its agent so far: entry ID → revision.
type Sent = HashMap<EntryId, u64>;

/// Computes the message that brings an agent holding `sent` to `auth`,
/// updating `sent`. `None` when nothing changed.
fn diff(
    sent: &mut Sent,
    auth: &Authorized,
    snapshot: bool,
    revision: u64,
) -> Option<pb::SyncMessage> {
    let mut upserted = Vec::new();
    for (id, e) in &auth.entries {
        // An entry's revision only grows, so one the agent holds at a
        // revision at least this entry's is already current there.
        if snapshot || sent.get(id).is_none_or(|held| e.revision > *held) {
            upserted.push(pb::Entry::from(e.as_ref()));
        }
    }
    let deleted_ids: Vec<String> = sent
        .keys()
        .filter(|id| !auth.entries.contains_key(*id))
        .map(|id| id.to_string())
        .collect();
    sent.retain(|id, _| auth.entries.contains_key(id));
    for (id, e) in &auth.entries {
        sent.insert(id.clone(), e.revision);
    }
    if upserted.is_empty() && deleted_ids.is_empty() && !snapshot {
        return None;
    }
    Some(pb::SyncMessage {
        revision,
        snapshot,
        upserted,
        deleted_ids: if snapshot { vec![] } else { deleted_ids },
        ..Default::default()
    })
}

/// The `federated_bundles` map of a sync message: trust domain name → JSON.
fn federated_map(
    set: &crate::federation::FederatedBundles,
) -> std::collections::HashMap<String, String> {
    set.iter()
        .map(|(td, json)| (td.name().to_owned(), json.clone()))
        .collect()
}

/// Names the tainted authorities in a sync message (the complete set).
fn set_tainted(m: &mut pb::SyncMessage, t: &crate::ca::Tainted) {
    m.tainted_x509_authorities = t.x509.clone();
    m.tainted_jwt_kids = t.jwt_kids.clone();
    m.tainted_changed = true;
}

/// Sends one update on a sync stream, in pages of at most
/// [`PAGE_BYTES`](crate::sync_pages::PAGE_BYTES), its entries in ID
/// order: every update goes through here, so no message grows with the
/// authorized set. False once the agent is gone.
async fn send_update(
    state: &ServerState,
    tx: &mpsc::Sender<Result<pb::SyncMessage, Status>>,
    mut update: pb::SyncMessage,
) -> bool {
    // In ID order, so that one set always pages the same way.
    update.upserted.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    for page in crate::sync_pages::pages(update, crate::sync_pages::PAGE_BYTES) {
        if tx.send(Ok(page)).await.is_err() {
            return false;
        }
        state.metrics.sync_pages.inc();
    }
    state.metrics.sync_messages.inc();
    true
}

/// A sync stream as the call opened it.
struct Opened {
    /// The agent's record when the stream was authenticated.
    agent: AgentRecord,
    /// The serial of the SVID the stream was opened with.
    serial: String,
    /// What the agent says it holds.
    sent: Sent,
    /// Whether the first message is a full snapshot.
    snapshot: bool,
}

/// One agent's sync stream: the first message at once (snapshot, or the
/// changes since the agent's revision, with the bundle, every federated
/// bundle and the tainted authorities), then a message whenever an entry
/// that concerns the agent, the bundle, the tainted authorities or a
/// federated bundle changes. Ends with PermissionDenied when the agent is
/// banned or evicted, or when the SVID the stream was opened with is no
/// longer accepted (the agent used a newer one: a copy of the old SVID must
/// not keep a stream open).
async fn sync_loop(
    state: &ServerState,
    opened: Opened,
    tx: mpsc::Sender<Result<pb::SyncMessage, Status>>,
    cancel: CancellationToken,
) {
    let Opened {
        mut agent,
        serial,
        mut sent,
        snapshot,
    } = opened;
    // Subscribe before computing the first set, so no change falls between.
    let mut events = state.index.subscribe();
    let mut bundle_rx = state.ca.subscribe_bundle();
    let mut tainted_rx = state.ca.subscribe_tainted();
    let mut federated_rx = state.federation.subscribe_bundles();
    let revision = state.index.revision();
    let mut auth = state.index.authorized(&agent.spiffe_id, &agent.selectors);
    let mut first = diff(&mut sent, &auth, snapshot, revision).unwrap_or(pb::SyncMessage {
        revision,
        ..Default::default()
    });
    first.bundle_json = bundle_rx.borrow_and_update().to_json();
    first.federated_bundles = federated_map(&federated_rx.borrow_and_update());
    first.federated_bundles_changed = true;
    set_tainted(&mut first, &tainted_rx.borrow_and_update());
    if !send_update(state, &tx, first).await {
        return;
    }
    tracing::debug!(agent = %agent.spiffe_id, entries = auth.entries.len(), "sync stream opened");
    loop {
        let mut recompute = false;
        let mut agent_changed = false;
        let mut bundle_json = String::new();
        let mut federated = None;
        let mut tainted = None;
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("server is shutting down"))).await;
                return;
            }
            _ = tx.closed() => return,
            changed = bundle_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                bundle_json = bundle_rx.borrow_and_update().to_json();
            }
            changed = tainted_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                tainted = Some(tainted_rx.borrow_and_update().clone());
            }
            changed = federated_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                federated = Some(federated_map(&federated_rx.borrow_and_update()));
            }
            ev = events.recv() => {
                let mut next = Some(ev);
                // Coalesce everything already queued into one message.
                while let Some(ev) = next.take() {
                    match ev {
                        Ok(ev) => match ev.as_ref() {
                            IndexEvent::Entry { old, new, .. } => {
                                recompute |= old.as_ref().is_some_and(|e| auth.concerns(e))
                                    || new.as_ref().is_some_and(|e| auth.concerns(e));
                            }
                            IndexEvent::Agent { id, .. } => {
                                agent_changed |= *id == agent.spiffe_id;
                            }
                        },
                        Err(RecvError::Lagged(_)) => recompute = true,
                        Err(RecvError::Closed) => return,
                    }
                    next = match events.try_recv() {
                        Ok(ev) => Some(Ok(ev)),
                        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                        Err(_) => None,
                    };
                }
            }
        }
        if agent_changed {
            match state.agents.get(&agent.spiffe_id) {
                Some(record) if !record.banned && record.serial_status(&serial).is_accepted() => {
                    recompute |= record.selectors != agent.selectors;
                    agent = record;
                }
                Some(record) if !record.banned => {
                    let refused = state.stale_serial(&record, &serial);
                    let _ = tx.send(Err(refused.into())).await;
                    return;
                }
                Some(_) => {
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "agent {} is banned",
                            agent.spiffe_id
                        ))))
                        .await;
                    return;
                }
                None => {
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "agent {} was evicted",
                            agent.spiffe_id
                        ))))
                        .await;
                    return;
                }
            }
        }
        let revision = state.index.revision();
        let mut msg = None;
        if recompute {
            auth = state.index.authorized(&agent.spiffe_id, &agent.selectors);
            msg = diff(&mut sent, &auth, false, revision);
        }
        if !bundle_json.is_empty() {
            let m = msg.get_or_insert_with(|| pb::SyncMessage {
                revision,
                ..Default::default()
            });
            m.bundle_json = bundle_json;
        }
        if let Some(set) = federated {
            let m = msg.get_or_insert_with(|| pb::SyncMessage {
                revision,
                ..Default::default()
            });
            m.federated_bundles = set;
            m.federated_bundles_changed = true;
        }
        if let Some(t) = tainted {
            let m = msg.get_or_insert_with(|| pb::SyncMessage {
                revision,
                ..Default::default()
            });
            set_tainted(m, &t);
        }
        if let Some(m) = msg
            && !send_update(state, &tx, m).await
        {
            return;
        }
    }
}
