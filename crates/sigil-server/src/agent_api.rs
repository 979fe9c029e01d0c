//! The agent API (mutual TLS): bootstrap bundle, join-token and PSAT
//! attestation, renewal, the push sync, CSR signing and JWT minting.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::agent_api_server::{AgentApi, AgentApiServer};
use sigil_types::{AgentRecord, EntryId};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::ServerState;
use crate::error::{AgentRefusal, EntryRefusal, ServerError};
use crate::index::{Authorized, SetChange, Subscription};
use crate::tls::AgentPeer;

/// The agent API's interceptor (see [`service`]).
pub type CallMarker = fn(Request<()>) -> Result<Request<()>, Status>;

/// The tonic service of the agent API, behind an interceptor that tells the
/// connection a call arrived (which stops its first-request timeout), with
/// Sync's responses framed by [`SyncBody`].
pub fn service(state: Arc<ServerState>, cancel: CancellationToken) -> AgentApiRoutes {
    let max = state.config.limits.max_request_bytes;
    let limiter = Arc::new(crate::limits::AgentApiLimiter::new(&state.config.limits));
    let api = Arc::new(AgentService {
        state,
        cancel,
        limiter,
    });
    let server = AgentApiServer::from_arc(api.clone()).max_decoding_message_size(max);
    AgentApiRoutes {
        inner: InterceptedService::new(server, mark_first_call),
        sync: api,
        max_request_bytes: max,
    }
}

/// The agent API as served: every call through tonic's generated service,
/// but Sync's response body is [`SyncBody`] instead of tonic's encoder.
/// tonic encodes a response stream into one buffer that lives as long as
/// the stream and keeps the capacity of the largest burst it encoded (the
/// first sync: 32 KiB for 100 entries, megabytes for a large set), held by
/// every idle stream; [`SyncBody`] sends each page as the gRPC message the
/// stream's task wrote it into ([`crate::sync_pages::Pages`]), an
/// allocation of its own, freed once it is written.
#[derive(Clone)]
pub struct AgentApiRoutes {
    inner: InterceptedService<AgentApiServer<AgentService>, CallMarker>,
    sync: Arc<AgentService>,
    max_request_bytes: usize,
}

impl std::fmt::Debug for AgentApiRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentApiRoutes").finish_non_exhaustive()
    }
}

impl tonic::server::NamedService for AgentApiRoutes {
    const NAME: &'static str = <AgentApiServer<AgentService> as tonic::server::NamedService>::NAME;
}

/// The path of the Sync call.
const SYNC_PATH: &str = "/sigil.server.v1.AgentApi/Sync";

type HttpRequest = http::Request<tonic::body::Body>;
type HttpResponse = http::Response<tonic::body::Body>;

impl tonic::codegen::Service<HttpRequest> for AgentApiRoutes {
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = sigil_types::BoxFuture<'static, Result<HttpResponse, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::<HttpRequest>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        if req.uri().path() == SYNC_PATH {
            let api = self.sync.clone();
            let max = self.max_request_bytes;
            Box::pin(async move { Ok(serve_sync(&api, max, req).await) })
        } else {
            let call = self.inner.call(req);
            Box::pin(async move { Ok(call.await?.map(tonic::body::Body::new)) })
        }
    }
}

/// Answers a Sync call: the request decoded and the call made as tonic's
/// generated service would, the response stream framed by [`SyncBody`].
async fn serve_sync(api: &AgentService, max: usize, req: HttpRequest) -> HttpResponse {
    match open_sync(api, max, req).await {
        Ok(stream) => {
            let mut res = http::Response::new(tonic::body::Body::new(SyncBody {
                stream,
                done: false,
            }));
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            res
        }
        Err(status) => status.into_http(),
    }
}

async fn open_sync(
    api: &AgentService,
    max: usize,
    req: HttpRequest,
) -> Result<FrameStream, Status> {
    // What the interceptor does for the other calls: on the headers, before
    // the body is read.
    if let Some(peer) = req.extensions().get::<AgentPeer>() {
        peer.first_call.mark();
    }
    // No compression is accepted on the agent API (tonic's answer alike).
    if req
        .headers()
        .get("grpc-encoding")
        .is_some_and(|e| e.as_bytes() != b"identity")
    {
        return Err(Status::unimplemented(
            "Content is compressed with an encoding the server does not accept",
        ));
    }
    let (parts, body) = req.into_parts();
    // The same bound on the request as every other call's.
    let mut body = tonic::codec::Streaming::new_request(RequestDecoder, body, None, Some(max));
    let message = body
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    let req = Request::from_http(http::Request::from_parts(parts, message));
    api.open_sync(req).await
}

/// Decodes the Sync request.
struct RequestDecoder;

impl tonic::codec::Decoder for RequestDecoder {
    type Item = pb::SyncRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::SyncRequest>, Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// A Sync response body: one gRPC message per page, each in an allocation
/// of its own (freed when h2 has written it), then the status in the
/// trailers, as tonic's server encoder sends them.
struct SyncBody {
    stream: FrameStream,
    done: bool,
}

impl hyper::body::Body for SyncBody {
    type Data = hyper::body::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Status>>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.stream.as_mut().poll_next(cx)) {
            Some(Ok(page)) => return Poll::Ready(Some(Ok(hyper::body::Frame::data(page)))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        Poll::Ready(Some(
            status
                .add_header(&mut trailers)
                .map(|()| hyper::body::Frame::trailers(trailers)),
        ))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A page's message as [`SyncBody`] sent it, decoded (the generated
/// service's form of the Sync stream).
fn decode_frame(frame: &[u8]) -> Result<pb::SyncMessage, Status> {
    let body = frame
        .get(crate::sync_pages::FRAME_PREFIX..)
        .ok_or_else(|| Status::internal("a sync page without its gRPC prefix"))?;
    prost::Message::decode(body).map_err(|e| Status::internal(e.to_string()))
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
        Ok(self
            .limiter
            .source(req.extensions().get::<AgentPeer>().map(|p| p.remote))?)
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

/// A Sync stream as [`SyncBody`] sends it: each page already a gRPC message.
type FrameStream = Pin<Box<dyn Stream<Item = Result<hyper::body::Bytes, Status>> + Send>>;

impl AgentService {
    /// Opens a sync stream for the calling agent: its pages as gRPC
    /// messages, the first (the snapshot or the changes since the request's
    /// revision) at once.
    async fn open_sync(&self, req: Request<pb::SyncRequest>) -> Result<FrameStream, Status> {
        let agent = self.agent(&req).await?;
        let serial = peer_serial(&req);
        let req = req.into_inner();
        let mut known = HashMap::new();
        if req.revision > 0 {
            for id in &req.known_entry_ids {
                let id: EntryId = id
                    .parse()
                    .map_err(|e| ServerError::from(EntryRefusal::BadId(e)))?;
                known.insert(id, req.revision);
            }
        }
        let (tx, rx) = send_queue();
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
        Ok(Box::pin(rx))
    }
}

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

    /// The stream of [`AgentService::open_sync`], decoded. [`AgentApiRoutes`]
    /// serves Sync with the pages as written ([`serve_sync`]); this is the
    /// generated service's form, for a server built without the routes.
    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        use tokio_stream::StreamExt;
        let frames = self.open_sync(req).await?;
        Ok(Response::new(Box::pin(
            frames.map(|f| f.and_then(|f| decode_frame(&f))),
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
        // Up to 500 signatures: CPU work that must not stall the runtime,
        // spread over the cores.
        let signed = self.state.sign_x509_svids_spread(agent, params).await?;
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
                    error: error.to_string(),
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

/// Pages a sync stream queues for tonic to encode: the one being encoded
/// and the next, built meanwhile. Each is up to
/// [`PAGE_BYTES`](crate::sync_pages::PAGE_BYTES), so this bounds what an
/// agent that reads slowly makes the server hold for it (with h2's send
/// buffer), and the agent still decodes one page while the next is built.
const QUEUED_PAGES: usize = 2;

/// One item of a sync stream's queue: a page as its gRPC message. Boxed:
/// the queue's storage is allocated in blocks of 32 slots whatever its
/// capacity, and is held as long as the stream, so every byte of a slot
/// costs each connected agent 32 (a whole message, about 200 bytes, cost
/// some 6 KiB; `Bytes` unboxed, 512 bytes more than the box).
type Queued = Result<Box<hyper::body::Bytes>, Status>;

/// The sending end of a sync stream's queue.
type Outbox = mpsc::Sender<Queued>;

/// A sync stream's queue: the sender the stream's task writes pages to, and
/// the stream tonic encodes them from.
fn send_queue() -> (
    Outbox,
    impl Stream<Item = Result<hyper::body::Bytes, Status>> + Send,
) {
    use tokio_stream::StreamExt;
    let (tx, rx) = mpsc::channel::<Queued>(QUEUED_PAGES);
    let rx = tokio_stream::wrappers::ReceiverStream::new(rx).map(|m| m.map(|m| *m));
    (tx, rx)
}

/// What a sync stream has told its agent so far: entry ID → revision.
type Sent = HashMap<EntryId, u64>;

/// One update for an agent: its message without entries (the header and
/// the deleted IDs), and the upserted entries, converted to their wire form
/// only page by page as they are sent (see [`send_update`]).
struct Update {
    msg: pb::SyncMessage,
    upserted: Vec<Arc<sigil_types::Entry>>,
}

impl Update {
    /// An update of nothing but a header, at `revision`.
    fn at(revision: u64) -> Self {
        Self {
            msg: pb::SyncMessage {
                revision,
                ..Default::default()
            },
            upserted: Vec::new(),
        }
    }
}

/// Computes the message that brings an agent holding `sent` to `auth`,
/// updating `sent`. `None` when nothing changed.
fn diff(sent: &mut Sent, auth: &Authorized, snapshot: bool, revision: u64) -> Option<Update> {
    let update = changes(sent, auth, snapshot, revision);
    record(sent, auth);
    update
}

/// The message of [`diff`], without updating `sent` (see [`record`]).
fn changes(sent: &Sent, auth: &Authorized, snapshot: bool, revision: u64) -> Option<Update> {
    let mut upserted = Vec::with_capacity(if snapshot { auth.entries.len() } else { 0 });
    for (id, e) in &auth.entries {
        // An entry's revision only grows, so one the agent holds at a
        // revision at least this entry's is already current there.
        if snapshot || sent.get(id).is_none_or(|held| e.revision > *held) {
            upserted.push(e.clone());
        }
    }
    let deleted_ids: Vec<String> = sent
        .keys()
        .filter(|id| !auth.entries.contains_key(*id))
        .map(|id| id.to_string())
        .collect();
    if upserted.is_empty() && deleted_ids.is_empty() && !snapshot {
        return None;
    }
    Some(Update {
        msg: pb::SyncMessage {
            revision,
            snapshot,
            deleted_ids: if snapshot { vec![] } else { deleted_ids },
            ..Default::default()
        },
        upserted,
    })
}

/// Records that the agent holds `auth`'s entries, and nothing else: `sent`
/// once the message of [`changes`] is applied.
fn record(sent: &mut Sent, auth: &Authorized) {
    sent.retain(|id, _| auth.entries.contains_key(id));
    // Room for the whole set at once: growing would hash every ID again.
    sent.reserve(auth.entries.len().saturating_sub(sent.len()));
    for (id, e) in &auth.entries {
        sent.insert(id.clone(), e.revision);
    }
}

/// Computes the message that brings an agent holding `sent` up to date
/// when only the `changed` entries may differ (see
/// [`Subscription::catch_up`]), updating `sent`. The
/// same message [`diff`] would compute from the whole set, at a cost in
/// proportion to the change. `None` when nothing changed for the agent.
fn diff_changed(
    sent: &mut Sent,
    changed: &[(EntryId, Option<Arc<sigil_types::Entry>>)],
    revision: u64,
) -> Option<Update> {
    let mut upserted = Vec::new();
    let mut deleted_ids = Vec::new();
    for (id, now) in changed {
        match now {
            Some(e) => {
                if sent.get(id).is_none_or(|held| e.revision > *held) {
                    upserted.push(e.clone());
                }
                sent.insert(id.clone(), e.revision);
            }
            None => {
                if sent.remove(id).is_some() {
                    deleted_ids.push(id.to_string());
                }
            }
        }
    }
    if upserted.is_empty() && deleted_ids.is_empty() {
        return None;
    }
    Some(Update {
        msg: pb::SyncMessage {
            revision,
            deleted_ids,
            ..Default::default()
        },
        upserted,
    })
}

/// Brings `sent`, current at revision `*synced`, to the index's current
/// revision: incrementally from the entries routed to the subscription,
/// else from the whole set (`full`, or when the index says so). Returns the
/// message for the agent, if anything changed for it, and advances `*synced`.
fn catch_up(
    sub: &Subscription<'_>,
    sent: &mut Sent,
    synced: &mut u64,
    full: bool,
) -> Option<Update> {
    match sub.catch_up(|id| sent.contains_key(id), full) {
        SetChange::Full(auth) => {
            *synced = auth.revision;
            diff(sent, &auth, false, auth.revision)
        }
        SetChange::Entries { revision, changed } => {
            *synced = revision;
            diff_changed(sent, &changed, revision)
        }
    }
}

/// The `federated_bundles` map of a sync message: trust domain name → JSON.
fn federated_map(
    set: &crate::federation::FederatedBundles,
) -> std::collections::HashMap<String, String> {
    crate::federation::within_budget(set)
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
/// authorized set. Each page is built (its entries encoded straight into
/// its gRPC message) only when the previous one is handed to the stream,
/// so that the agent decodes a page while the next is built, and a large
/// set never exists in wire form at once. False once the agent is gone.
async fn send_update(state: &ServerState, tx: &Outbox, update: Update) -> bool {
    let Update { msg, mut upserted } = update;
    crate::sync_pages::sort_by_id(&mut upserted);
    for page in crate::sync_pages::Pages::new(msg, upserted, crate::sync_pages::PAGE_BYTES) {
        let page = page
            .map(|p| Box::new(hyper::body::Bytes::from(p)))
            .map_err(|e| Status::internal(e.to_string()));
        let refused = page.is_err();
        if tx.send(page).await.is_err() || refused {
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
async fn sync_loop(state: &ServerState, opened: Opened, tx: Outbox, cancel: CancellationToken) {
    let Opened {
        mut agent,
        serial,
        mut sent,
        snapshot,
    } = opened;
    // Subscribe before computing the first set, so no change falls between.
    let mut sub = state
        .index
        .subscribe(agent.spiffe_id.clone(), agent.selectors.clone());
    let mut bundle_rx = state.ca.subscribe_bundle();
    let mut tainted_rx = state.ca.subscribe_tainted();
    let mut federated_rx = state.federation.subscribe_bundles();
    let auth = sub.authorized();
    // The revision `sent` is current with: what the agent may resume from,
    // and where the next incremental catch-up starts.
    let mut synced = auth.revision;
    let revision = synced;
    let mut first =
        changes(&sent, &auth, snapshot, revision).unwrap_or_else(|| Update::at(revision));
    first.msg.bundle_json = bundle_rx.borrow_and_update().to_json();
    first.msg.federated_bundles = federated_map(&federated_rx.borrow_and_update());
    first.msg.federated_bundles_changed = true;
    set_tainted(&mut first.msg, &tainted_rx.borrow_and_update());
    if !send_update(state, &tx, first).await {
        return;
    }
    // Recorded once the last pages are queued, while the agent decodes
    // them, rather than before the first page: nothing reads `sent` until
    // the next catch-up.
    record(&mut sent, &auth);
    tracing::debug!(agent = %agent.spiffe_id, entries = auth.entries.len(), "sync stream opened");
    drop(auth);
    loop {
        let mut recompute = false;
        let mut entries_changed = false;
        let mut agent_changed = false;
        let mut bundle_json = String::new();
        let mut federated = None;
        let mut tainted = None;
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = tx.send(Err(ServerError::ShuttingDown.into())).await;
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
            // Only changes that concern this agent arrive here; which
            // entries changed, the subscription holds.
            wake = sub.changed() => {
                entries_changed = true;
                agent_changed = wake.agent;
            }
        }
        if agent_changed {
            match state.agents.get(&agent.spiffe_id) {
                Some(record) if !record.banned && record.serial_status(&serial).is_accepted() => {
                    if record.selectors != agent.selectors {
                        // Routed by the new selectors from here on; the
                        // whole set is recomputed after, so an alias change
                        // routed by the old ones in between is not missed.
                        sub.set_selectors(record.selectors.clone());
                        recompute = true;
                    }
                    agent = record;
                }
                Some(record) if !record.banned => {
                    let refused = state.stale_serial(&record, &serial);
                    let _ = tx.send(Err(refused.into())).await;
                    return;
                }
                Some(_) => {
                    let refused = AgentRefusal::Banned(agent.spiffe_id.clone());
                    let _ = tx.send(Err(ServerError::from(refused).into())).await;
                    return;
                }
                None => {
                    let refused = AgentRefusal::Evicted(agent.spiffe_id.clone());
                    let _ = tx.send(Err(ServerError::from(refused).into())).await;
                    return;
                }
            }
        }
        let mut msg = None;
        if recompute || entries_changed {
            msg = catch_up(&sub, &mut sent, &mut synced, recompute);
        }
        // Not the index's revision: entry changes not yet handled may lie
        // between, and an agent that resumed from it would never get them.
        let revision = synced;
        if !bundle_json.is_empty() {
            msg.get_or_insert_with(|| Update::at(revision))
                .msg
                .bundle_json = bundle_json;
        }
        if let Some(set) = federated {
            let m = &mut msg.get_or_insert_with(|| Update::at(revision)).msg;
            m.federated_bundles = set;
            m.federated_bundles_changed = true;
        }
        if let Some(t) = tainted {
            set_tainted(&mut msg.get_or_insert_with(|| Update::at(revision)).msg, &t);
        }
        if let Some(m) = msg
            && !send_update(state, &tx, m).await
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use sigil_store::{Change, ChangeKind, EntrySnapshot};
    use sigil_types::{Entry, Selectors, SpiffeId};

    use super::*;
    use crate::index::EntryIndex;

    const AGENT: &str = "spiffe://td/sigil/agent/join_token/a1";

    /// IDs a random entry's SPIFFE ID is drawn from: a small pool, so that
    /// entries often parent one another and share SPIFFE IDs. The last is
    /// reserved (never served).
    const SPIFFE: [&str; 5] = [
        "spiffe://td/a",
        "spiffe://td/b",
        "spiffe://td/c",
        "spiffe://td/nodes/x",
        "spiffe://td/sigil/web",
    ];
    /// Parents: the agent, another agent, the server (a node alias) and the pool.
    const PARENTS: [&str; 8] = [
        AGENT,
        "spiffe://td/sigil/agent/join_token/b2",
        "spiffe://td/sigil/server",
        "spiffe://td/a",
        "spiffe://td/b",
        "spiffe://td/c",
        "spiffe://td/nodes/x",
        "spiffe://td/sigil/web",
    ];
    /// Selectors by bit of a mask (node selectors for aliases and agents).
    const SELECTORS: [&str; 3] = ["node:r:1", "node:r:2", "unix:uid:1"];

    fn selectors(mask: u8) -> Selectors {
        Selectors::parse_all(
            SELECTORS
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, s)| *s),
        )
        .unwrap()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upsert {
            id: u8,
            spiffe: usize,
            parent: usize,
            sel: u8,
        },
        Delete(u8),
        /// The agent's own (node) selectors change: the stream recomputes.
        AgentSelectors(u8),
        /// The stream catches up now.
        Sync,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0..SPIFFE.len(), 0..PARENTS.len(), 0u8..8).prop_map(
                |(id, spiffe, parent, sel)| Op::Upsert { id, spiffe, parent, sel }
            ),
            2 => (0u8..6).prop_map(Op::Delete),
            1 => (0u8..8).prop_map(Op::AgentSelectors),
            3 => Just(Op::Sync),
        ]
    }

    /// The message's content in a comparable form: upserted (ID, revision)
    /// and deleted IDs, sorted.
    fn content(m: &Option<Update>) -> (Vec<(String, u64)>, Vec<String>) {
        let Some(m) = m else {
            return (vec![], vec![]);
        };
        let mut up: Vec<(String, u64)> = m
            .upserted
            .iter()
            .map(|e| (e.id.to_string(), e.revision))
            .collect();
        let mut del = m.msg.deleted_ids.clone();
        up.sort();
        del.sort();
        (up, del)
    }

    fn sorted(sent: &Sent) -> Vec<(EntryId, u64)> {
        let mut v: Vec<_> = sent.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort();
        v
    }

    /// Runs `ops` against one index, following one agent's set two ways:
    /// the incremental catch-up and the whole-set recompute (`authorized` +
    /// `diff`, the old sync). They must send the same messages and end
    /// holding the same set; returns how many catch-ups were incremental.
    fn follow(ops: &[Op], inbox: usize) -> usize {
        let idx = EntryIndex::with_inbox_capacity(
            EntrySnapshot {
                entries: vec![],
                revision: 1,
            },
            inbox,
        );
        let agent: SpiffeId = AGENT.parse().unwrap();
        let mut node = Selectors::new();
        let mut sub = idx.subscribe(agent.clone(), node.clone());
        let (mut full_sent, mut inc_sent) = (Sent::new(), Sent::new());
        let mut force_full = false;
        let mut revision = 1;
        let mut incremental = 0;
        for op in ops.iter().chain([&Op::Sync]) {
            match op {
                Op::Upsert {
                    id,
                    spiffe,
                    parent,
                    sel,
                } => {
                    revision += 1;
                    let mut e = Entry::new(
                        format!("e{id}").parse().unwrap(),
                        SPIFFE[*spiffe].parse().unwrap(),
                        PARENTS[*parent].parse().unwrap(),
                        selectors(*sel),
                    );
                    e.revision = revision;
                    idx.apply(Change {
                        revision,
                        kind: ChangeKind::EntryUpserted(e),
                    });
                }
                Op::Delete(id) => {
                    let Some(e) = idx.get(&format!("e{id}").parse().unwrap()) else {
                        continue;
                    };
                    revision += 1;
                    idx.apply(Change {
                        revision,
                        kind: ChangeKind::EntryDeleted((*e).clone()),
                    });
                }
                Op::AgentSelectors(mask) => {
                    node = selectors(*mask);
                    sub.set_selectors(node.clone());
                    force_full = true;
                }
                Op::Sync => {
                    let auth = idx.authorized(&agent, &node);
                    let expected = diff(&mut full_sent, &auth, false, auth.revision);
                    // A stream nothing was routed to sleeps: then nothing
                    // changed for its agent.
                    if !force_full && !sub.is_pending() {
                        assert_eq!(
                            content(&expected),
                            (vec![], vec![]),
                            "unwoken after {ops:?}"
                        );
                    }
                    let change = sub.catch_up(|id| inc_sent.contains_key(id), force_full);
                    let (got, synced) = match change {
                        SetChange::Full(a) => {
                            (diff(&mut inc_sent, &a, false, a.revision), a.revision)
                        }
                        SetChange::Entries { revision, changed } => {
                            incremental += 1;
                            (diff_changed(&mut inc_sent, &changed, revision), revision)
                        }
                    };
                    force_full = false;
                    assert_eq!(content(&got), content(&expected), "after {op:?} in {ops:?}");
                    assert_eq!(sorted(&inc_sent), sorted(&full_sent), "{ops:?}");
                    assert_eq!(synced, idx.revision());
                    if let Some(m) = &got {
                        assert_eq!(m.msg.revision, synced);
                    }
                }
            }
        }
        incremental
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Creates, updates (parent, SPIFFE ID, selectors, alias or not),
        /// deletes and agent selector changes in any order, caught up after
        /// any number of changes, with a log long enough or too short.
        #[test]
        fn incremental_sync_equals_the_whole_set_recompute(
            ops in proptest::collection::vec(op(), 1..60),
            inbox in prop_oneof![Just(1usize), Just(4), Just(1000)],
        ) {
            follow(&ops, inbox);
        }
    }

    /// A page of `n` entries, as the first sync of an agent sends it.
    fn page_of(n: usize) -> pb::SyncMessage {
        pb::SyncMessage {
            revision: 9,
            snapshot: true,
            upserted: (0..n)
                .map(|i| pb::Entry {
                    id: format!("e{i}"),
                    spiffe_id: format!("spiffe://td/w{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// `m` as the one gRPC message a sync stream's task writes for it.
    fn frame_of(m: pb::SyncMessage) -> hyper::body::Bytes {
        use crate::sync_pages::{PAGE_BYTES, Pages};
        let mut header = m;
        let upserted = std::mem::take(&mut header.upserted);
        let mut pages: Vec<_> = Pages::new(header, upserted, PAGE_BYTES).collect();
        assert_eq!(pages.len(), 1);
        pages.remove(0).unwrap().into()
    }

    fn body_of(items: Vec<Result<pb::SyncMessage, Status>>) -> SyncBody {
        let frames = items.into_iter().map(|m| m.map(frame_of));
        SyncBody {
            stream: Box::pin(tokio_stream::iter(frames)),
            done: false,
        }
    }

    /// The next frame of `body` (its stream never waits).
    fn next_frame(body: &mut SyncBody) -> Option<hyper::body::Frame<hyper::body::Bytes>> {
        use hyper::body::Body;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match Pin::new(body).poll_frame(&mut cx) {
            std::task::Poll::Ready(f) => f.map(|f| f.unwrap()),
            std::task::Poll::Pending => panic!("the stream never waits"),
        }
    }

    #[test]
    fn sync_pages_are_grpc_messages_then_the_status_in_the_trailers() {
        let page = page_of(3);
        let mut body = body_of(vec![Ok(page.clone()), Ok(Update::at(10).msg)]);
        let data = next_frame(&mut body).unwrap().into_data().unwrap();
        assert_eq!(data[0], 0, "not compressed");
        let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, data.len() - 5);
        assert_eq!(
            <pb::SyncMessage as prost::Message>::decode(&data[5..]).unwrap(),
            page
        );
        let data = next_frame(&mut body).unwrap().into_data().unwrap();
        assert_eq!(
            <pb::SyncMessage as prost::Message>::decode(&data[5..]).unwrap(),
            Update::at(10).msg
        );
        let trailers = next_frame(&mut body).unwrap().into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert!(next_frame(&mut body).is_none());

        // A refusal ends the stream with its status.
        let mut body = body_of(vec![
            Ok(page),
            Err(ServerError::ShuttingDown.into()),
            Ok(page_of(1)),
        ]);
        assert!(next_frame(&mut body).unwrap().is_data());
        let trailers = next_frame(&mut body).unwrap().into_trailers().unwrap();
        let code = Status::from(ServerError::ShuttingDown).code() as i32;
        assert_eq!(trailers["grpc-status"], code.to_string().as_str());
        assert!(next_frame(&mut body).is_none());
    }

    /// A sync stream's task can queue only [`QUEUED_PAGES`] pages ahead of
    /// an agent that does not read: the next waits (the task with it), so
    /// a slow or stalled agent pins at most that many pages of the server,
    /// not the whole update.
    #[test]
    fn a_stream_queues_at_most_two_pages_for_an_agent_that_does_not_read() {
        let (tx, _rx) = send_queue();
        for _ in 0..QUEUED_PAGES {
            tx.try_send(Ok(Box::new(frame_of(page_of(1))))).unwrap();
        }
        assert!(matches!(
            tx.try_send(Ok(Box::new(frame_of(page_of(1))))),
            Err(mpsc::error::TrySendError::Full(_))
        ));
        assert_eq!(QUEUED_PAGES, 2);
    }

    /// What an open sync stream holds once its pages are written, against
    /// the size of the first sync it sent (a ratio of two counts of this
    /// thread's heap, see `crate::test_alloc`). tonic's encoder kept a
    /// buffer of the largest burst for the stream's life: 32 KiB after a
    /// 17 KiB first sync of 100 entries, about 1.9x. Here only the stream's
    /// queue and body remain, whatever the first sync's size.
    #[test]
    fn an_idle_sync_stream_holds_no_page_it_sent() {
        use crate::test_alloc::held;
        let page = frame_of(page_of(2000));
        let page_bytes = page.len();
        let before = held();
        let (tx, rx) = send_queue();
        let mut body = SyncBody {
            stream: Box::pin(rx),
            done: false,
        };
        let queue = held() - before;
        tx.try_send(Ok(Box::new(page))).unwrap();
        // h2 writes the frame and drops it.
        drop(next_frame(&mut body).unwrap());
        let idle = held() - before;
        // About 1.1 KiB; with whole messages in its slots, over 6 KiB.
        assert!(
            queue.chunks < 2048,
            "an empty sync queue holds {} bytes",
            queue.chunks
        );
        assert!(
            idle.chunks * 50 < page_bytes as i64,
            "an idle stream holds {} bytes after a first sync of {page_bytes}",
            idle.chunks
        );
        drop((tx, body));
    }

    #[test]
    fn changes_that_move_no_subtree_are_caught_up_incrementally() {
        // Entries created under the agent, one at a time, then updated and
        // deleted: every catch-up is incremental.
        let mut ops = Vec::new();
        for id in 0..3 {
            ops.push(Op::Upsert {
                id,
                spiffe: id as usize,
                parent: 0,
                sel: 4,
            });
            ops.push(Op::Sync);
        }
        ops.push(Op::Upsert {
            id: 1,
            spiffe: 1,
            parent: 1,
            sel: 4,
        });
        ops.push(Op::Sync);
        ops.push(Op::Delete(0));
        ops.push(Op::Sync);
        assert_eq!(follow(&ops, 1000), 6);
        // With a log of one change, two changes between catch-ups fall back
        // to the whole set (and still agree, as `follow` checks).
        let two = [
            Op::Upsert {
                id: 0,
                spiffe: 0,
                parent: 0,
                sel: 4,
            },
            Op::Upsert {
                id: 1,
                spiffe: 1,
                parent: 0,
                sel: 4,
            },
        ];
        assert_eq!(follow(&two, 1), 0);
        assert_eq!(follow(&two, 2), 1);
    }

    #[test]
    fn a_moved_parent_recomputes_the_whole_set() {
        let idx = EntryIndex::new(EntrySnapshot {
            entries: vec![],
            revision: 1,
        });
        let agent: SpiffeId = AGENT.parse().unwrap();
        let other: SpiffeId = "spiffe://td/sigil/agent/join_token/b2".parse().unwrap();
        let third: SpiffeId = "spiffe://td/sigil/agent/join_token/c3".parse().unwrap();
        let none = Selectors::new();
        let mine = idx.subscribe(agent.clone(), none.clone());
        let theirs = idx.subscribe(other.clone(), none.clone());
        let nobody = idx.subscribe(third, none.clone());
        let e = |rev, id: &str, spiffe: &str, parent: &str| {
            let mut e = Entry::new(
                id.parse().unwrap(),
                spiffe.parse().unwrap(),
                parent.parse().unwrap(),
                Selectors::parse_all(["unix:uid:1"]).unwrap(),
            );
            e.revision = rev;
            idx.apply(Change {
                revision: rev,
                kind: ChangeKind::EntryUpserted(e),
            });
        };
        e(2, "top", "spiffe://td/top", AGENT);
        e(3, "child", "spiffe://td/child", "spiffe://td/top");
        let auth = mine.authorized();
        assert_eq!(auth.entries.len(), 2);
        let held: Vec<EntryId> = auth.entries.keys().cloned().collect();
        // The parent moves to another agent: its child leaves the set with
        // it, which only the whole set shows.
        e(4, "top", "spiffe://td/top", other.as_str());
        match mine.catch_up(|id| held.contains(id), false) {
            SetChange::Full(a) => assert!(a.entries.is_empty()),
            other => panic!("expected the whole set, got {other:?}"),
        }
        // The new parent's agent gets both, as a whole set too.
        match theirs.catch_up(|_| false, false) {
            SetChange::Full(a) => assert_eq!(a.entries.len(), 2),
            other => panic!("expected the whole set, got {other:?}"),
        }
        // An agent that never held it and does not now is not even woken.
        assert_eq!(nobody.routed(), 0);
    }
}
