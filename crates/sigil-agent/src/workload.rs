//! The SPIFFE Workload API on the agent's Unix socket.
//!
//! Callers are identified by kernel peer credentials and attested by the unix
//! attestor; the caller's process is re-checked after attestation so that a
//! reused PID gets nothing. Semantics follow the SPIFFE Workload API
//! standard and what the common clients expect: the security header is
//! required, a caller without identity gets PermissionDenied "no identity
//! issued", streams answer at once and then push a full response on every
//! change, and never end with OK.
//!
//! Federated bundles go only to callers entitled to them: the bundle of a
//! foreign trust domain is served (in `federated_bundles` of X509-SVID
//! responses, in the bundle streams, and for ValidateJWTSVID) when one of the
//! caller's matched entries federates with that trust domain.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use sigil_proto::server::v1 as spb;
use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_types::{Attribute, Entry, EntryId, Selectors, SpiffeId};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::attest::UnixAttestor;
use crate::core::{SharedClient, Snapshot};
use crate::limits::StreamSlot;
use crate::metrics::Metrics;
use crate::peer::peer_of;
use crate::persist::WorkloadSvid;

/// The gRPC metadata key every Workload API request must carry with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// The message of PermissionDenied when a caller has no identity.
pub const NO_IDENTITY: &str = "no identity issued";
/// How long a first response may wait for an SVID that is being signed.
const FIRST_SVID_WAIT: Duration = Duration::from_secs(10);
/// Most JWT-SVIDs the agent caches (SPIRE's agent uses the same bound),
/// besides the byte budget; see `JwtCache` for what makes room.
pub const JWT_CACHE_LIMIT: usize = 1000;
/// The claims ValidateJWTSVID returns for a token of a foreign (federated)
/// trust domain; other claims are that domain's business and are dropped, as
/// SPIRE does.
pub const FOREIGN_JWT_CLAIMS: &[&str] = &["sub", "aud", "exp", "iat", "iss"];

/// Rejects requests without `workload.spiffe.io: true`.
pub fn check_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    let values: Vec<_> = req.metadata().get_all(SECURITY_HEADER).iter().collect();
    if values.len() == 1 && values[0] == "true" {
        Ok(req)
    } else {
        Err(Status::invalid_argument(
            "security header missing from request",
        ))
    }
}

/// The Workload API service with its header check.
pub type WorkloadServer = InterceptedService<
    SpiffeWorkloadApiServer<WorkloadService>,
    fn(Request<()>) -> Result<Request<()>, Status>,
>;

/// Builds the tonic service, requests capped at the default
/// `[agent.limits] max_request_bytes`.
pub fn service(svc: WorkloadService) -> WorkloadServer {
    service_with_limit(svc, crate::limits::AgentLimits::default().max_request_bytes)
}

/// Builds the tonic service; a request message over `max_request_bytes` is
/// refused with `OutOfRange` before it is decoded.
pub fn service_with_limit(svc: WorkloadService, max_request_bytes: usize) -> WorkloadServer {
    InterceptedService::new(
        SpiffeWorkloadApiServer::new(svc).max_decoding_message_size(max_request_bytes),
        check_security_header as fn(Request<()>) -> Result<Request<()>, Status>,
    )
}

/// What a cached JWT-SVID was minted for. Keyed by entry, not by SPIFFE ID
/// alone: two entries may share an ID but differ in what the token carries
/// (attributes become claims, TTLs differ), and a token minted for one must
/// never reach a caller entitled only to the other. The entry's revision
/// (and its identity-bearing fields) are in the key too, so a token minted
/// before any change to the entry (its selectors included: who may hold
/// the token) is not served after.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct JwtKey {
    entry_id: EntryId,
    /// The store revision of the entry's last write.
    revision: u64,
    spiffe_id: SpiffeId,
    attributes: Vec<Attribute>,
    ttl: u64,
    /// Sorted, without duplicates.
    audience: Vec<String>,
}

impl JwtKey {
    fn new(e: &Entry, audience: &[String]) -> Self {
        Self {
            entry_id: e.id.clone(),
            revision: e.revision,
            spiffe_id: e.spiffe_id.clone(),
            attributes: e.attributes.clone(),
            ttl: e.jwt_svid_ttl,
            audience: audience.to_vec(),
        }
    }
}

/// One cached JWT-SVID (no `Debug`: the token is a credential).
struct CachedJwt {
    token: String,
    expiry: SystemTime,
    refresh_at: SystemTime,
    /// The key ID in the token's header, to drop it if the key is tainted.
    kid: Option<String>,
    /// The uid whose request fetched it: its share of the cache pays for it.
    owner: u32,
    /// What it costs in the byte budget.
    bytes: usize,
    /// When it was cached, as the cache's insertion counter.
    seq: u64,
}

/// The `kid` in a JWT's header, if it has one; the token is not verified
/// (only for tokens this agent fetched itself).
fn jwt_kid(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
    value.get("kid")?.as_str().map(str::to_owned)
}

/// Bytes a cached token costs beyond its text and key strings: the map
/// slot, times and bookkeeping, rounded up.
const JWT_ENTRY_OVERHEAD: usize = 256;

/// Most JWT-SVIDs the requests of one uid may have in the cache: a quarter
/// of [`JWT_CACHE_LIMIT`], like the byte share by default.
pub const JWT_CACHE_LIMIT_PER_UID: usize = JWT_CACHE_LIMIT / 4;

/// What the cache holds of one uid's requests.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    tokens: usize,
    bytes: usize,
}

/// JWT-SVIDs by [`JwtKey`], bounded in count and bytes, in all and per uid
/// (the uid whose request fetched a token): a uid at its share makes room
/// among its own tokens, oldest first, so one uid cannot evict the tokens of
/// every other. When the whole cache is full, the oldest token of the uid
/// holding the most bytes goes.
struct JwtCache {
    tokens: HashMap<JwtKey, CachedJwt>,
    limit: usize,
    limit_per_uid: usize,
    max_bytes: usize,
    max_bytes_per_uid: usize,
    bytes: usize,
    held: HashMap<u32, Held>,
    /// Insertion counter: the age of a token.
    next_seq: u64,
    /// The snapshot the tokens were last checked against by
    /// [`JwtCache::drop_stale`], so that is done once per snapshot.
    checked: Weak<Snapshot>,
}

impl JwtCache {
    fn new(limit: usize) -> Self {
        let d = crate::limits::AgentLimits::default();
        Self::with_budget(
            limit,
            JWT_CACHE_LIMIT_PER_UID.min(limit),
            d.jwt_cache_bytes,
            d.jwt_cache_bytes_per_uid,
        )
    }

    fn with_budget(
        limit: usize,
        limit_per_uid: usize,
        max_bytes: usize,
        max_bytes_per_uid: usize,
    ) -> Self {
        Self {
            tokens: HashMap::new(),
            limit: limit.max(1),
            limit_per_uid: limit_per_uid.max(1),
            max_bytes: max_bytes.max(1),
            max_bytes_per_uid: max_bytes_per_uid.max(1),
            bytes: 0,
            held: HashMap::new(),
            next_seq: 0,
            checked: Weak::new(),
        }
    }

    /// The token for `key` if it is not yet due for refresh (half its life).
    fn fresh(&self, key: &JwtKey, now: SystemTime) -> Option<String> {
        self.tokens
            .get(key)
            .filter(|c| now < c.refresh_at && now < c.expiry)
            .map(|c| c.token.clone())
    }

    /// The token for `key` if it has not expired, due for refresh or not.
    fn valid(&self, key: &JwtKey, now: SystemTime) -> Option<&CachedJwt> {
        self.tokens.get(key).filter(|c| now < c.expiry)
    }

    /// What `token` under `key` costs in the byte budget.
    fn cost(key: &JwtKey, token: &str) -> usize {
        let attributes = key.attributes.len() * std::mem::size_of::<Attribute>();
        token.len()
            + key.audience.iter().map(String::len).sum::<usize>()
            + key.spiffe_id.as_str().len()
            + key.entry_id.as_str().len()
            + attributes
            + JWT_ENTRY_OVERHEAD
    }

    /// Caches a token fetched for a request of `owner`; drops expired ones,
    /// then makes room as the type's docs say. A token larger than a uid's
    /// whole share is not cached.
    fn insert(
        &mut self,
        key: JwtKey,
        token: String,
        expiry: SystemTime,
        now: SystemTime,
        owner: u32,
    ) {
        let life = expiry.duration_since(now).unwrap_or_default();
        self.remove(&key);
        self.retain(|c| c.expiry > now);
        let cost = Self::cost(&key, &token);
        if cost > self.max_bytes_per_uid {
            return;
        }
        loop {
            let mine = self.held.get(&owner).copied().unwrap_or_default();
            if mine.tokens < self.limit_per_uid && mine.bytes + cost <= self.max_bytes_per_uid {
                break;
            }
            if !self.evict_oldest_of(owner) {
                break;
            }
        }
        while self.tokens.len() >= self.limit || self.bytes + cost > self.max_bytes {
            let Some(largest) = self
                .held
                .iter()
                .max_by_key(|(uid, h)| (h.bytes, **uid))
                .map(|(uid, _)| *uid)
            else {
                break;
            };
            if !self.evict_oldest_of(largest) {
                break;
            }
        }
        self.next_seq += 1;
        let held = self.held.entry(owner).or_default();
        held.tokens += 1;
        held.bytes += cost;
        self.bytes += cost;
        self.tokens.insert(
            key,
            CachedJwt {
                kid: jwt_kid(&token),
                token,
                expiry,
                refresh_at: now + life / 2,
                owner,
                bytes: cost,
                seq: self.next_seq,
            },
        );
    }

    /// Drops the oldest token of `owner`; `false` if it holds none.
    fn evict_oldest_of(&mut self, owner: u32) -> bool {
        let oldest = self
            .tokens
            .iter()
            .filter(|(_, c)| c.owner == owner)
            .min_by_key(|(_, c)| c.seq)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => {
                self.remove(&k);
                true
            }
            None => {
                // The counts disagree with the tokens: nothing of this uid
                // is held, so forget its count rather than loop on it.
                self.held.remove(&owner);
                false
            }
        }
    }

    /// Keeps the tokens `keep` accepts, with the byte and uid counts.
    fn retain(&mut self, mut keep: impl FnMut(&CachedJwt) -> bool) {
        let gone: Vec<JwtKey> = self
            .tokens
            .iter()
            .filter(|(_, c)| !keep(c))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// Bytes the cache holds, as counted against its budget.
    fn bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, key: &JwtKey) {
        let Some(c) = self.tokens.remove(key) else {
            return;
        };
        self.bytes = self.bytes.saturating_sub(c.bytes);
        if let Some(h) = self.held.get_mut(&c.owner) {
            h.tokens = h.tokens.saturating_sub(1);
            h.bytes = h.bytes.saturating_sub(c.bytes);
            if h.tokens == 0 {
                self.held.remove(&c.owner);
            }
        }
    }

    /// Drops the tokens signed with a tainted key, so they are never served
    /// again (not even while the server is unreachable).
    fn drop_tainted(&mut self, tainted_kids: &std::collections::BTreeSet<String>) {
        if tainted_kids.is_empty() {
            return;
        }
        self.retain(|c| c.kid.as_ref().is_none_or(|k| !tainted_kids.contains(k)));
    }

    /// Drops the tokens of entries that `snap` no longer holds as they were
    /// when the token was minted (deleted, or changed since), so that no
    /// path, not even the unreachable-server fallback, can serve them again.
    fn drop_stale(&mut self, snap: &Arc<Snapshot>) {
        // The weak reference keeps the allocation, so an address seen here
        // is never reused by a later snapshot.
        if std::ptr::eq(self.checked.as_ptr(), Arc::as_ptr(snap)) {
            return;
        }
        self.checked = Arc::downgrade(snap);
        if self.tokens.is_empty() {
            return;
        }
        let current: HashSet<(&EntryId, u64)> =
            snap.entries.iter().map(|e| (&e.id, e.revision)).collect();
        let gone: Vec<JwtKey> = self
            .tokens
            .keys()
            .filter(|k| !current.contains(&(&k.entry_id, k.revision)))
            .cloned()
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// Why a JWT-SVID could not be obtained from the server.
#[derive(Debug)]
enum JwtFetchError {
    /// The server could not be reached (or is not answering); a cached
    /// token that is still valid may be served instead.
    Unreachable(String),
    /// The server answered and refused, with its status code; nothing
    /// cached is served.
    Refused(tonic::Code, String),
    /// The server was not asked: the caller's uid used up its share of the
    /// agent's calls to the server. A cached token that is still valid is
    /// served instead; otherwise the caller gets this status.
    OverShare(Status),
}

impl JwtFetchError {
    fn from_status(s: &tonic::Status) -> Self {
        use tonic::Code;
        match s.code() {
            // ResourceExhausted: the server's rate limit; not a verdict on the token.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::ResourceExhausted => Self::Unreachable(s.message().to_owned()),
            code => Self::Refused(code, s.message().to_owned()),
        }
    }
}

fn lock(cache: &Mutex<JwtCache>) -> MutexGuard<'_, JwtCache> {
    // The cache holds no invariant a panicking holder could break.
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cached token for `key` while it is fresh; otherwise one from `fetch`,
/// cached until half its life. If the server is unreachable, a cached token
/// that has not expired yet is served instead of an error.
async fn cached_or_fetch<F, Fut>(
    cache: &Mutex<JwtCache>,
    key: JwtKey,
    now: SystemTime,
    owner: u32,
    fetch: F,
) -> Result<String, Status>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<String, JwtFetchError>>,
{
    if let Some(token) = lock(cache).fresh(&key, now) {
        return Ok(token);
    }
    match fetch().await {
        Ok(token) => {
            if let Ok(info) = sigil_svid::jwt::parse_jwt_unverified(&token) {
                lock(cache).insert(key, token.clone(), info.expiry, now, owner);
            }
            Ok(token)
        }
        Err(JwtFetchError::Unreachable(why)) => {
            if let Some(c) = lock(cache).valid(&key, now) {
                tracing::info!(
                    spiffe_id = %key.spiffe_id,
                    entry = %key.entry_id,
                    error = %why,
                    expires = %humantime::format_rfc3339_seconds(c.expiry),
                    "server unreachable; serving the cached JWT-SVID until it expires"
                );
                return Ok(c.token.clone());
            }
            Err(Status::unavailable(format!(
                "could not fetch JWT-SVID: {why}"
            )))
        }
        Err(JwtFetchError::OverShare(status)) => match lock(cache).valid(&key, now) {
            Some(c) => Ok(c.token.clone()),
            None => Err(status),
        },
        Err(JwtFetchError::Refused(code, why)) => {
            lock(cache).remove(&key);
            // A request the server found wrong (too many audiences, say) or
            // not allowed stays so however often it is retried: the caller
            // gets that code, not `Unavailable`, which clients retry.
            let code = match code {
                tonic::Code::InvalidArgument
                | tonic::Code::OutOfRange
                | tonic::Code::PermissionDenied => code,
                _ => tonic::Code::Unavailable,
            };
            let why = sigil_types::text::clip(&why, sigil_types::text::MAX_ECHO_BYTES);
            Err(Status::new(
                code,
                format!("could not fetch JWT-SVID: {why}"),
            ))
        }
    }
}

/// Identifies the callers of the agent's socket from their kernel peer
/// credentials: the unix attestor (and, with the `k8s` feature and
/// `[agent.k8s]`, pod selectors from the kubelet). Shared by the Workload API
/// and the Envoy SDS service, so both attest callers the same way.
pub struct CallerAttestor {
    attestor: Arc<UnixAttestor>,
    limiter: Arc<crate::limits::CallerLimiter>,
    #[cfg(feature = "k8s")]
    pods: Option<Arc<crate::k8s::PodAttestor>>,
}

impl std::fmt::Debug for CallerAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerAttestor").finish_non_exhaustive()
    }
}

impl CallerAttestor {
    /// Attests callers with the unix attestor only.
    pub fn new(attestor: Arc<UnixAttestor>) -> Self {
        Self {
            attestor,
            limiter: Arc::default(),
            #[cfg(feature = "k8s")]
            pods: None,
        }
    }

    /// Uses `limiter`'s per-uid rate limits instead of the default ones.
    pub fn with_limiter(mut self, limiter: Arc<crate::limits::CallerLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// The per-uid rate limits of the socket's callers.
    pub fn limiter(&self) -> &crate::limits::CallerLimiter {
        &self.limiter
    }

    /// Adds pod selectors from the kubelet to every caller's unix selectors.
    #[cfg(feature = "k8s")]
    pub fn with_pod_attestor(mut self, pods: Arc<crate::k8s::PodAttestor>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// The caller's selectors, from its kernel credentials; refuses a caller
    /// whose process changed while it was being attested. Every failure is
    /// `Unavailable` "workload attestation failed" (the cause is logged).
    pub async fn identify<T>(&self, req: &Request<T>) -> Result<Selectors, Status> {
        let peer = peer_of(req).map_err(|e| {
            tracing::warn!(error = %e, "cannot identify caller");
            Status::unavailable("workload attestation failed")
        })?;
        #[allow(unused_mut, reason = "extended only with the k8s feature")]
        let mut selectors = self.attestor.attest(&peer).await.map_err(|e| {
            tracing::warn!(pid = peer.pid, error = %e, "workload attestation failed");
            Status::unavailable("workload attestation failed")
        })?;
        #[cfg(feature = "k8s")]
        if let Some(pods) = &self.pods {
            let pod = pods.attest(peer.pid).await.map_err(|e| {
                tracing::warn!(pid = peer.pid, error = %e, "pod attestation failed");
                Status::unavailable("workload attestation failed")
            })?;
            for s in pod.iter() {
                selectors.insert(s.clone());
            }
        }
        peer.check_same_process().map_err(|e| {
            tracing::warn!(pid = peer.pid, error = %e, "caller changed during attestation");
            Status::unavailable("workload attestation failed")
        })?;
        Ok(selectors)
    }
}

/// Implements [`SpiffeWorkloadApi`].
pub struct WorkloadService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    callers: Arc<CallerAttestor>,
    client: SharedClient,
    jwt_cache: Mutex<JwtCache>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for WorkloadService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadService").finish_non_exhaustive()
    }
}

impl WorkloadService {
    /// A service serving from `snapshots` to the callers `callers` attests,
    /// with the default JWT cache budget.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        callers: Arc<CallerAttestor>,
        client: SharedClient,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            snapshots,
            callers,
            client,
            jwt_cache: Mutex::new(JwtCache::new(JWT_CACHE_LIMIT)),
            metrics,
            cancel,
        }
    }

    /// Bounds the JWT-SVID cache to `bytes`, of which the requests of one
    /// uid may fill `bytes_per_uid` (`[agent.limits] jwt_cache_bytes`,
    /// `jwt_cache_bytes_per_uid`).
    pub fn with_jwt_cache_budget(mut self, bytes: usize, bytes_per_uid: usize) -> Self {
        self.jwt_cache = Mutex::new(JwtCache::with_budget(
            JWT_CACHE_LIMIT,
            JWT_CACHE_LIMIT_PER_UID,
            bytes,
            bytes_per_uid,
        ));
        self
    }

    async fn identify<T>(&self, req: &Request<T>) -> Result<Selectors, Status> {
        self.callers.identify(req).await
    }

    fn refuse(&self, s: Status) -> Status {
        self.metrics.workload_refusals.inc();
        s
    }
}

/// The entries whose selectors the caller satisfies, default identity first.
pub(crate) fn matching(snap: &Snapshot, selectors: &Selectors) -> Vec<Arc<Entry>> {
    snap.entries
        .iter()
        .filter(|e| e.selectors.is_subset_of(selectors))
        .cloned()
        .collect()
}

/// The federated bundles the caller is entitled to: those of every trust
/// domain one of its matched entries federates with, that the agent holds.
pub(crate) fn federated_for<'a>(
    snap: &'a Snapshot,
    matched: &[Arc<Entry>],
) -> Vec<&'a Arc<Bundle>> {
    let wanted: BTreeSet<_> = matched.iter().flat_map(|e| &e.federates_with).collect();
    wanted
        .into_iter()
        .filter(|td| **td != snap.bundle.trust_domain)
        .filter_map(|td| snap.federated.get(td))
        .collect()
}

/// The X509-SVID response for the matched entries; `None` while none of
/// them has an SVID yet.
fn x509_response(snap: &Snapshot, matched: &[Arc<Entry>]) -> Option<pb::X509svidResponse> {
    let mut hints = HashSet::new();
    let mut seen_ids = HashSet::new();
    let bundle = snap.bundle.x509_der_concat();
    let mut svids = Vec::new();
    for e in matched {
        let Some(s) = snap.svids.get(&e.id) else {
            continue;
        };
        // One SVID per SPIFFE ID; and hints must be unique (the first wins).
        if !seen_ids.insert(s.spiffe_id.clone()) {
            continue;
        }
        if !e.hint.is_empty() && !hints.insert(e.hint.clone()) {
            continue;
        }
        svids.push(svid_message(s, &e.hint, &bundle));
    }
    if svids.is_empty() {
        return None;
    }
    Some(pb::X509svidResponse {
        svids,
        crl: vec![],
        federated_bundles: federated_for(snap, matched)
            .into_iter()
            .map(|b| (b.trust_domain.id_string(), b.x509_der_concat()))
            .collect(),
    })
}

fn svid_message(s: &WorkloadSvid, hint: &str, bundle: &[u8]) -> pb::X509svid {
    pb::X509svid {
        spiffe_id: s.spiffe_id.to_string(),
        x509_svid: s.chain.concat(),
        x509_svid_key: s.key.pkcs8_der().to_vec(),
        bundle: bundle.to_vec(),
        hint: hint.to_owned(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs a Workload API stream: `build` turns a snapshot into the response
/// (or an error that ends the stream); a response equal to the last one sent
/// is suppressed.
fn spawn_stream<T, F>(
    slot: StreamSlot,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    first: T,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    build: F,
) -> BoxStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&Snapshot) -> Result<Option<T>, Status> + Send + 'static,
{
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        // The uid's open-stream slot, given back when the stream ends.
        let _slot = slot;
        metrics.workload_streams.inc();
        let mut last = first.clone();
        if tx.send(Ok(first)).await.is_ok() {
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = cancel.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("agent is shutting down"))).await;
                        break;
                    }
                    changed = rx.changed() => {
                        if changed.is_err() {
                            let _ = tx.send(Err(Status::unavailable("agent is shutting down"))).await;
                            break;
                        }
                        let snap = rx.borrow_and_update().clone();
                        match build(&snap) {
                            Ok(Some(resp)) if resp != last => {
                                last = resp.clone();
                                if tx.send(Ok(resp)).await.is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                        }
                    }
                }
            }
        }
        metrics.workload_streams.dec();
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}

/// The own bundle plus the federated ones the caller is entitled to, keyed
/// `spiffe://<td>`, as concatenated DER or as JWKS.
fn bundle_map(snap: &Snapshot, matched: &[Arc<Entry>], jwt: bool) -> HashMap<String, Vec<u8>> {
    let value = |b: &Bundle| {
        if jwt {
            b.workload_jwks()
        } else {
            b.x509_der_concat()
        }
    };
    let mut map: HashMap<String, Vec<u8>> = federated_for(snap, matched)
        .into_iter()
        .map(|b| (b.trust_domain.id_string(), value(b)))
        .collect();
    // Inserted last: nothing can stand in for the own trust bundle.
    map.insert(snap.bundle.trust_domain.id_string(), value(&snap.bundle));
    map
}

/// What ValidateJWTSVID returns of a validated token's claims: all of them
/// for the own trust domain, only [`FOREIGN_JWT_CLAIMS`] for another.
fn returned_claims(
    claims: &serde_json::Map<String, serde_json::Value>,
    foreign: bool,
) -> serde_json::Map<String, serde_json::Value> {
    claims
        .iter()
        .filter(|(k, _)| !foreign || FOREIGN_JWT_CLAIMS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let slot = self
            .callers
            .limiter()
            .stream(&req)
            .map_err(|s| self.refuse(s))?;
        let selectors = self.identify(&req).await.map_err(|s| self.refuse(s))?;
        let mut rx = self.snapshots.clone();
        let deadline = tokio::time::Instant::now() + FIRST_SVID_WAIT;
        let first = loop {
            let snap = rx.borrow_and_update().clone();
            let matched = matching(&snap, &selectors);
            if matched.is_empty() {
                return Err(self.refuse(Status::permission_denied(NO_IDENTITY)));
            }
            if let Some(resp) = x509_response(&snap, &matched) {
                break resp;
            }
            // Entitled, but the SVID is still being signed: wait for it.
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(
                        self.refuse(Status::unavailable("X509-SVID not yet available; retry"))
                    );
                }
            }
        };
        self.metrics.workload_requests.inc();
        let stream = spawn_stream(
            slot,
            rx,
            first,
            self.metrics.clone(),
            self.cancel.clone(),
            move |snap| {
                let matched = matching(snap, &selectors);
                if matched.is_empty() {
                    return Err(Status::permission_denied(NO_IDENTITY));
                }
                Ok(x509_response(snap, &matched))
            },
        );
        Ok(Response::new(stream))
    }

    type FetchX509BundlesStream = BoxStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let slot = self
            .callers
            .limiter()
            .stream(&req)
            .map_err(|s| self.refuse(s))?;
        let selectors = self.identify(&req).await.map_err(|s| self.refuse(s))?;
        let mut rx = self.snapshots.clone();
        let snap = rx.borrow_and_update().clone();
        let matched = matching(&snap, &selectors);
        if matched.is_empty() {
            return Err(self.refuse(Status::permission_denied(NO_IDENTITY)));
        }
        self.metrics.workload_requests.inc();
        let first = pb::X509BundlesResponse {
            crl: vec![],
            bundles: bundle_map(&snap, &matched, false),
        };
        let stream = spawn_stream(
            slot,
            rx,
            first,
            self.metrics.clone(),
            self.cancel.clone(),
            move |snap| {
                let matched = matching(snap, &selectors);
                if matched.is_empty() {
                    return Err(Status::permission_denied(NO_IDENTITY));
                }
                Ok(Some(pb::X509BundlesResponse {
                    crl: vec![],
                    bundles: bundle_map(snap, &matched, false),
                }))
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        self.callers
            .limiter()
            .call(&req)
            .map_err(|s| self.refuse(s))?;
        if req.get_ref().audience.is_empty() || req.get_ref().audience.iter().all(String::is_empty)
        {
            return Err(self.refuse(Status::invalid_argument("audience must be specified")));
        }
        let wanted: Option<SpiffeId> = match req.get_ref().spiffe_id.as_str() {
            "" => None,
            s => Some(s.parse().map_err(|e| {
                self.refuse(Status::invalid_argument(format!(
                    "invalid requested SPIFFE ID: {e}"
                )))
            })?),
        };
        let selectors = self.identify(&req).await.map_err(|s| self.refuse(s))?;
        // Attested, so the kernel gave the caller's credentials.
        let uid = peer_of(&req)
            .map_err(|_| self.refuse(Status::unavailable("workload attestation failed")))?
            .uid;
        let mut audience: Vec<String> = req
            .get_ref()
            .audience
            .iter()
            .filter(|a| !a.is_empty())
            .cloned()
            .collect();
        audience.sort();
        audience.dedup();
        // Refused here, before the server is asked, so a caller's junk costs
        // neither the agent's allowance at the server nor cache memory.
        sigil_svid::jwt::check_audiences(&audience)
            .map_err(|why| self.refuse(Status::invalid_argument(why)))?;
        let snap = self.snapshots.borrow().clone();
        let mut seen = HashSet::new();
        let matched: Vec<_> = matching(&snap, &selectors)
            .into_iter()
            .filter(|e| wanted.as_ref().is_none_or(|w| *w == e.spiffe_id))
            .filter(|e| seen.insert(e.spiffe_id.clone()))
            .collect();
        if matched.is_empty() {
            return Err(self.refuse(Status::permission_denied(NO_IDENTITY)));
        }
        let mut svids = Vec::new();
        for e in matched {
            let token = self
                .jwt_for(&e, &audience, uid)
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::ResourceExhausted => self.refuse(s),
                    _ => s,
                })?;
            svids.push(pb::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        self.metrics.workload_requests.inc();
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = BoxStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let slot = self
            .callers
            .limiter()
            .stream(&req)
            .map_err(|s| self.refuse(s))?;
        let selectors = self.identify(&req).await.map_err(|s| self.refuse(s))?;
        let mut rx = self.snapshots.clone();
        let snap = rx.borrow_and_update().clone();
        let matched = matching(&snap, &selectors);
        if matched.is_empty() {
            return Err(self.refuse(Status::permission_denied(NO_IDENTITY)));
        }
        self.metrics.workload_requests.inc();
        let first = pb::JwtBundlesResponse {
            bundles: bundle_map(&snap, &matched, true),
        };
        let stream = spawn_stream(
            slot,
            rx,
            first,
            self.metrics.clone(),
            self.cancel.clone(),
            move |snap| {
                let matched = matching(snap, &selectors);
                if matched.is_empty() {
                    return Err(Status::permission_denied(NO_IDENTITY));
                }
                Ok(Some(pb::JwtBundlesResponse {
                    bundles: bundle_map(snap, &matched, true),
                }))
            },
        );
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        self.callers
            .limiter()
            .call(&req)
            .map_err(|s| self.refuse(s))?;
        if req.get_ref().audience.is_empty() {
            return Err(self.refuse(Status::invalid_argument("audience must be specified")));
        }
        if req.get_ref().svid.is_empty() {
            return Err(self.refuse(Status::invalid_argument("svid must be specified")));
        }
        let selectors = self.identify(&req).await.map_err(|s| self.refuse(s))?;
        let snap = self.snapshots.borrow().clone();
        let matched = matching(&snap, &selectors);
        let r = req.get_ref();
        let (spiffe_id, claims) =
            validate_for(&snap, &matched, &r.svid, &r.audience, SystemTime::now())
                .map_err(|e| self.refuse(Status::invalid_argument(e.to_string())))?;
        self.metrics.workload_requests.inc();
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            claims: Some(json_object_to_struct(&claims)),
        }))
    }
}

/// ValidateJWTSVID's check: the token validated against the own bundle and
/// the federated ones the caller is entitled to (a caller without entries
/// gets the own bundle only), with the claims it may see.
fn validate_for(
    snap: &Snapshot,
    matched: &[Arc<Entry>],
    token: &str,
    audience: &str,
    now: SystemTime,
) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), sigil_svid::SvidError> {
    let mut set = BundleSet::default();
    for b in federated_for(snap, matched) {
        set.insert((**b).clone());
    }
    set.insert((*snap.bundle).clone());
    let v = sigil_svid::jwt::validate_jwt(token, audience, &set, now)?;
    let foreign = v.spiffe_id.trust_domain() != snap.bundle.trust_domain;
    Ok((v.spiffe_id, returned_claims(&v.claims, foreign)))
}

impl WorkloadService {
    /// A cached JWT-SVID for this entry (as it is now) and audiences when it
    /// is not past half its life; otherwise a new one from the server (or, while the server is
    /// unreachable, the cached one until it expires).
    /// A call that must reach the server takes a token of `uid`'s share of
    /// the agent's allowance there first.
    async fn jwt_for(&self, e: &Entry, audience: &[String], uid: u32) -> Result<String, Status> {
        let key = JwtKey::new(e, audience);
        let snap = self.snapshots.borrow().clone();
        {
            let mut cache = lock(&self.jwt_cache);
            cache.drop_tainted(&snap.tainted.jwt_kids);
            cache.drop_stale(&snap);
        }
        let client = (**self.client.load()).clone();
        let request = spb::NewJwtsvidRequest {
            entry_id: e.id.to_string(),
            audience: audience.to_vec(),
        };
        let limiter = self.callers.limiter();
        let token = cached_or_fetch(
            &self.jwt_cache,
            key,
            SystemTime::now(),
            uid,
            || async move {
                limiter.server_call(uid).map_err(JwtFetchError::OverShare)?;
                let Some(mut client) = client else {
                    return Err(JwtFetchError::Unreachable("server unreachable".to_owned()));
                };
                client
                    .new_jwtsvid(request)
                    .await
                    .map(|r| r.into_inner().token)
                    .map_err(|s| JwtFetchError::from_status(&s))
            },
        )
        .await;
        {
            let cache = lock(&self.jwt_cache);
            self.metrics.cached_jwt_svids.set(cache.len() as i64);
            self.metrics.jwt_cache_bytes.set(cache.bytes() as i64);
        }
        token
    }
}

/// JSON claims as a protobuf Struct.
pub fn json_object_to_struct(
    m: &serde_json::Map<String, serde_json::Value>,
) -> prost_types::Struct {
    prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(json_object_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn header_must_be_exactly_true() {
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_security_header(ok).is_ok());
        let missing = Request::new(());
        let err = check_security_header(missing).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), "security header missing from request");
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(SECURITY_HEADER, "TRUE".parse().unwrap());
        assert!(check_security_header(wrong).is_err());
    }

    #[test]
    fn claims_convert_to_struct() {
        let v: serde_json::Value =
            serde_json::json!({"sub": "spiffe://td/x", "aud": ["a", "b"], "exp": 5});
        let s = json_object_to_struct(v.as_object().unwrap());
        assert_eq!(s.fields.len(), 3);
        match &s.fields["aud"].kind {
            Some(prost_types::value::Kind::ListValue(l)) => assert_eq!(l.values.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    use std::sync::atomic::{AtomicUsize, Ordering};

    use sigil_svid::jwt::{JwtAuthority, JwtClaims};
    use sigil_svid::keys::PrivateKey;
    use sigil_svid::x509::{SvidRequest, X509Authority};
    use sigil_types::TrustDomain;

    use crate::core::FederatedBundles;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A trust domain's authorities and its bundle (also used by the SDS tests).
    pub(crate) struct Domain {
        pub(crate) ca: X509Authority,
        pub(crate) jwt: JwtAuthority,
        pub(crate) bundle: Bundle,
    }

    pub(crate) fn domain(name: &str) -> Domain {
        let now = SystemTime::now();
        let td = TrustDomain::new(name).unwrap();
        let ca = X509Authority::generate(&td, HOUR, now).unwrap();
        let jwt = JwtAuthority::generate(HOUR, now).unwrap();
        let mut bundle = Bundle::new(td);
        bundle.x509_authorities.push(ca.cert_der().to_vec());
        bundle.jwt_authorities.push(jwt.public_jwk());
        Domain { ca, jwt, bundle }
    }

    /// An entry `spiffe://example.org/<id>` for the selector `unix:uid:<len(id)>`.
    pub(crate) fn entry(id: &str, federates_with: &[&str]) -> Arc<Entry> {
        let mut e = Entry::new(
            id.parse().unwrap(),
            format!("spiffe://example.org/{id}").parse().unwrap(),
            "spiffe://example.org/agent".parse().unwrap(),
            Selectors::parse_all([format!("unix:uid:{}", id.len())]).unwrap(),
        );
        e.federates_with = federates_with
            .iter()
            .map(|t| TrustDomain::new(t).unwrap())
            .collect();
        Arc::new(e)
    }

    pub(crate) fn svid(own: &Domain, e: &Entry) -> Arc<WorkloadSvid> {
        let key = PrivateKey::generate_p256().unwrap();
        let now = SystemTime::now();
        let leaf = own
            .ca
            .sign_svid(
                &SvidRequest::new(&e.spiffe_id, HOUR),
                &key.public_key_spki_der(),
                now,
            )
            .unwrap();
        Arc::new(WorkloadSvid {
            entry_id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            chain: vec![leaf],
            key,
            not_before: now,
            not_after: now + HOUR,
            dns_names: vec![],
            ttl: 0,
            attributes: vec![],
        })
    }

    /// A snapshot with an SVID for every entry.
    pub(crate) fn snapshot(
        own: &Domain,
        entries: &[Arc<Entry>],
        federated: &[&Domain],
    ) -> Snapshot {
        Snapshot {
            entries: entries.iter().cloned().collect(),
            svids: entries
                .iter()
                .map(|e| (e.id.clone(), svid(own, e)))
                .collect(),
            bundle: Arc::new(own.bundle.clone()),
            federated: Arc::new(
                federated
                    .iter()
                    .map(|d| (d.bundle.trust_domain.clone(), Arc::new(d.bundle.clone())))
                    .collect::<FederatedBundles>(),
            ),
            connected: true,
            tainted: Default::default(),
        }
    }

    #[test]
    fn federated_bundles_reach_only_entries_that_federate_with_them() {
        let own = domain("example.org");
        let (other, fourth) = (domain("other.org"), domain("fourth.org"));
        // `fed` federates with other.org (held) and third.org (not held).
        let fed = entry("fed", &["other.org", "third.org"]);
        let plain = entry("plain", &[]);
        let snap = snapshot(&own, &[fed.clone(), plain.clone()], &[&other, &fourth]);

        let r = x509_response(&snap, std::slice::from_ref(&plain)).unwrap();
        assert!(r.federated_bundles.is_empty());
        let r = x509_response(&snap, std::slice::from_ref(&fed)).unwrap();
        assert_eq!(
            r.federated_bundles,
            HashMap::from([(
                "spiffe://other.org".to_owned(),
                other.ca.cert_der().to_vec()
            )])
        );
        assert_eq!(r.svids[0].bundle, own.ca.cert_der());

        let x509 = bundle_map(&snap, &[plain.clone(), fed.clone()], false);
        assert_eq!(x509.len(), 2);
        assert_eq!(x509["spiffe://example.org"], own.ca.cert_der());
        assert_eq!(x509["spiffe://other.org"], other.ca.cert_der());
        let jwt = bundle_map(&snap, std::slice::from_ref(&fed), true);
        let jwks: serde_json::Value = serde_json::from_slice(&jwt["spiffe://other.org"]).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], other.jwt.kid());
        assert_eq!(
            bundle_map(&snap, std::slice::from_ref(&plain), true)
                .keys()
                .collect::<Vec<_>>(),
            ["spiffe://example.org"]
        );
    }

    #[test]
    fn a_federated_bundle_never_stands_in_for_the_own_one() {
        let own = domain("example.org");
        let impostor = domain("example.org");
        let e = entry("fed", &["example.org"]);
        let snap = snapshot(&own, std::slice::from_ref(&e), &[&impostor]);
        assert!(federated_for(&snap, std::slice::from_ref(&e)).is_empty());
        let map = bundle_map(&snap, std::slice::from_ref(&e), false);
        assert_eq!(map["spiffe://example.org"], own.ca.cert_der());
        let token = impostor
            .jwt
            .sign(
                &"spiffe://example.org/x".parse().unwrap(),
                &["api".to_owned()],
                HOUR,
                SystemTime::now(),
            )
            .unwrap();
        assert!(validate_for(&snap, &[e], &token, "api", SystemTime::now()).is_err());
    }

    #[test]
    fn validate_accepts_federated_tokens_for_entitled_callers_and_strips_foreign_claims() {
        let own = domain("example.org");
        let other = domain("other.org");
        let unknown = domain("unknown.org");
        let fed = entry("fed", &["other.org"]);
        let plain = entry("plain", &[]);
        let snap = snapshot(&own, &[fed.clone(), plain.clone()], &[&other]);
        let now = SystemTime::now();
        let mut extra = serde_json::Map::new();
        extra.insert("cluster".to_owned(), "east".into());
        let claims = JwtClaims {
            issuer: Some("https://oidc.other.org".to_owned()),
            extra,
        };
        let aud = ["api".to_owned()];
        let foreign = other
            .jwt
            .sign_with(
                &"spiffe://other.org/db".parse().unwrap(),
                &aud,
                HOUR,
                now,
                &claims,
            )
            .unwrap();

        let (id, got) =
            validate_for(&snap, std::slice::from_ref(&fed), &foreign, "api", now).unwrap();
        assert_eq!(id.as_str(), "spiffe://other.org/db");
        let mut names: Vec<_> = got.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["aud", "exp", "iat", "iss", "sub"]);

        // Not entitled to other.org's bundle, or a domain nobody federates with.
        let err =
            validate_for(&snap, std::slice::from_ref(&plain), &foreign, "api", now).unwrap_err();
        assert!(err.to_string().contains("other.org"), "{err}");
        let stranger = unknown
            .jwt
            .sign(&"spiffe://unknown.org/x".parse().unwrap(), &aud, HOUR, now)
            .unwrap();
        assert!(validate_for(&snap, &[fed.clone(), plain], &stranger, "api", now).is_err());
        // A federated token still needs the right audience.
        assert!(validate_for(&snap, std::slice::from_ref(&fed), &foreign, "other", now).is_err());

        // The own trust domain's tokens keep every claim.
        let local = own
            .jwt
            .sign_with(
                &"spiffe://example.org/fed".parse().unwrap(),
                &aud,
                HOUR,
                now,
                &claims,
            )
            .unwrap();
        let (_, got) = validate_for(&snap, &[], &local, "api", now).unwrap();
        assert_eq!(got["cluster"], "east");
    }

    fn key(id: &str) -> JwtKey {
        let entry = Entry::new(
            id.parse().unwrap(),
            format!("spiffe://example.org/{id}").parse().unwrap(),
            "spiffe://example.org/agent".parse().unwrap(),
            Selectors::parse_all(["unix:uid:1"]).unwrap(),
        );
        JwtKey::new(&entry, &["api".to_owned()])
    }

    #[test]
    fn jwt_cache_keys_tell_apart_entries_sharing_a_spiffe_id() {
        let aud = ["api".to_owned()];
        let a = Entry::new(
            "a".parse().unwrap(),
            "spiffe://example.org/shared".parse().unwrap(),
            "spiffe://example.org/agent".parse().unwrap(),
            Selectors::parse_all(["unix:uid:1"]).unwrap(),
        );
        let base = JwtKey::new(&a, &aud);
        assert_eq!(base, JwtKey::new(&a.clone(), &aud));
        let mut other_entry = a.clone();
        other_entry.id = "b".parse().unwrap();
        let mut with_attributes = a.clone();
        with_attributes.attributes = vec![Attribute::Cluster];
        let mut renamed = a.clone();
        renamed.spiffe_id = "spiffe://example.org/renamed".parse().unwrap();
        let mut longer = a.clone();
        longer.jwt_svid_ttl = 600;
        // Any other write to the entry, such as new selectors.
        let mut rewritten = a.clone();
        rewritten.revision += 1;
        for changed in [other_entry, with_attributes, renamed, longer, rewritten] {
            assert_ne!(base, JwtKey::new(&changed, &aud), "{changed:?}");
        }
        assert_ne!(base, JwtKey::new(&a, &["other".to_owned()]));
    }

    #[test]
    fn cached_jwt_svids_of_a_tainted_key_are_dropped() {
        use sigil_svid::jwt::JwtAuthority;
        let now = SystemTime::now();
        let (old, new) = (
            JwtAuthority::generate(HOUR, now).unwrap(),
            JwtAuthority::generate(HOUR, now).unwrap(),
        );
        let sub = "spiffe://example.org/w".parse().unwrap();
        let aud = ["api".to_owned()];
        let mut c = JwtCache::new(10);
        for (k, ca) in [("old", &old), ("new", &new)] {
            let token = ca.sign(&sub, &aud, HOUR, now).unwrap();
            assert_eq!(jwt_kid(&token).as_deref(), Some(ca.kid()));
            c.insert(key(k), token, now + HOUR, now, 1);
        }
        c.drop_tainted(&std::collections::BTreeSet::new());
        assert_eq!(c.len(), 2);
        c.drop_tainted(&std::collections::BTreeSet::from([old.kid().to_owned()]));
        assert!(c.valid(&key("old"), now).is_none());
        assert!(c.fresh(&key("new"), now).is_some());
    }

    #[test]
    fn cached_jwt_svids_of_deleted_or_changed_entries_are_dropped() {
        let now = SystemTime::now();
        let own = domain("example.org");
        let kept = entry("kept", &[]);
        let changed = entry("changed", &[]);
        let mut c = JwtCache::new(10);
        for e in [&kept, &changed, &entry("deleted", &[])] {
            c.insert(
                JwtKey::new(e, &["api".to_owned()]),
                "t".into(),
                now + HOUR,
                now,
                1,
            );
        }
        let mut rewritten = (*changed).clone();
        rewritten.revision += 1;
        let snap = Arc::new(snapshot(&own, &[kept.clone(), Arc::new(rewritten)], &[]));
        c.drop_stale(&snap);
        assert_eq!(c.len(), 1);
        assert!(
            c.fresh(&JwtKey::new(&kept, &["api".to_owned()]), now)
                .is_some()
        );
        // Checked once per snapshot: a token cached since is kept until the next.
        c.insert(
            JwtKey::new(&changed, &["api".to_owned()]),
            "t".into(),
            now + HOUR,
            now,
            1,
        );
        c.drop_stale(&snap);
        assert_eq!(c.len(), 2);
        let next = Arc::new((*snap).clone());
        c.drop_stale(&next);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn jwt_cache_is_bounded_and_evicts_the_oldest() {
        let now = SystemTime::now();
        let mut c = JwtCache::new(3);
        c.insert(key("a"), "a".into(), now + 3 * HOUR, now, 1);
        c.insert(key("b"), "b".into(), now + HOUR, now, 1);
        c.insert(key("c"), "c".into(), now + 2 * HOUR, now, 1);
        c.insert(key("d"), "d".into(), now + 4 * HOUR, now, 1);
        assert_eq!(c.len(), 3);
        assert!(c.valid(&key("a"), now).is_none(), "oldest evicted");
        for k in ["b", "c", "d"] {
            assert!(c.fresh(&key(k), now).is_some(), "{k}");
        }
        // Replacing a held key evicts nothing, and makes it the newest.
        c.insert(key("b"), "b2".into(), now + HOUR, now, 1);
        assert_eq!(c.len(), 3);
        assert_eq!(c.fresh(&key("b"), now).unwrap(), "b2");
        c.insert(key("e"), "e".into(), now + 4 * HOUR, now, 1);
        assert!(c.valid(&key("c"), now).is_none(), "c was the oldest");
        // Expired tokens go first, without evicting valid ones.
        let later = now + HOUR + Duration::from_secs(1);
        c.insert(key("f"), "f".into(), later + HOUR, later, 1);
        assert_eq!(c.len(), 3, "b expired");
        assert!(c.valid(&key("d"), later).is_some());
        assert!(c.valid(&key("e"), later).is_some());
        // Fresh until half the life, valid until expiry.
        assert!(c.fresh(&key("f"), later + HOUR / 2).is_none());
        assert!(c.valid(&key("f"), later + HOUR / 2).is_some());
        assert!(c.valid(&key("f"), later + HOUR).is_none());
        assert_eq!(JwtCache::new(JWT_CACHE_LIMIT).limit, 1000);
    }

    /// A key whose audience makes its token `n` bytes larger.
    fn big_key(id: &str, aud: usize) -> JwtKey {
        let mut k = key(id);
        k.audience = vec!["x".repeat(aud)];
        k
    }

    #[test]
    fn one_uid_fills_only_its_share_of_the_jwt_cache() {
        let now = SystemTime::now();
        let exp = now + HOUR;
        // 10 KiB in all, 4 KiB per uid; each token costs about 1.3 KiB.
        let mut c = JwtCache::with_budget(100, 100, 10 * 1024, 4 * 1024);
        c.insert(key("victim"), "v".into(), exp, now, 2);
        for i in 0..50 {
            c.insert(big_key(&format!("k{i}"), 1000), "t".into(), exp, now, 1);
            assert!(c.held[&1].bytes <= 4 * 1024, "{i}");
            assert!(c.bytes() <= 10 * 1024, "{i}");
        }
        // uid 1 kept its newest tokens; uid 2's token was never touched.
        assert!(c.fresh(&big_key("k49", 1000), now).is_some());
        assert!(c.fresh(&big_key("k0", 1000), now).is_none());
        assert_eq!(c.fresh(&key("victim"), now).unwrap(), "v");
        // The count share too.
        let mut c = JwtCache::with_budget(100, 3, 1 << 20, 1 << 20);
        c.insert(key("victim"), "v".into(), exp, now, 2);
        for i in 0..10 {
            c.insert(key(&format!("k{i}")), "t".into(), exp, now, 1);
        }
        assert_eq!(c.held[&1].tokens, 3);
        assert!(c.fresh(&key("victim"), now).is_some());
        // A token larger than a uid's whole share is not cached.
        let mut c = JwtCache::with_budget(100, 100, 10 * 1024, 1024);
        c.insert(big_key("huge", 2000), "t".into(), exp, now, 1);
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn a_full_jwt_cache_evicts_from_the_largest_holder() {
        let now = SystemTime::now();
        let exp = now + HOUR;
        // Every key below has a two-letter ID, so all cost the same.
        let cost = JwtCache::cost(&big_key("a0", 1000), "t");
        // Room for 5 tokens, 3 per uid.
        let mut c = JwtCache::with_budget(100, 100, 5 * cost, 3 * cost);
        c.insert(big_key("a0", 1000), "t".into(), exp, now, 1);
        for i in 0..3 {
            c.insert(big_key(&format!("b{i}"), 1000), "t".into(), exp, now, 2);
        }
        c.insert(big_key("c0", 1000), "t".into(), exp, now, 3);
        assert_eq!(c.len(), 5);
        // Full: uid 3's next token takes room from uid 2 (the largest),
        // oldest first; uid 1's older token stays.
        c.insert(big_key("c1", 1000), "t".into(), exp, now, 3);
        assert!(c.fresh(&big_key("b0", 1000), now).is_none());
        assert!(c.fresh(&big_key("a0", 1000), now).is_some());
        assert_eq!(c.bytes(), 5 * cost);
        // Every removal path keeps the counts.
        c.drop_stale(&Arc::new(snapshot(&domain("example.org"), &[], &[])));
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert!(c.held.is_empty());
    }

    #[tokio::test]
    async fn cached_jwt_svids_are_served_while_the_server_is_unreachable() {
        let own = domain("example.org");
        let now = SystemTime::now();
        let ttl = Duration::from_secs(100);
        let token = own
            .jwt
            .sign(&key("w").spiffe_id, &key("w").audience, ttl, now)
            .unwrap();
        let cache = Mutex::new(JwtCache::new(10));
        let calls = AtomicUsize::new(0);
        let fetch = |r: Result<String, JwtFetchError>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { r }
        };

        let got = cached_or_fetch(&cache, key("w"), now, 1, || fetch(Ok(token.clone())))
            .await
            .unwrap();
        assert_eq!(got, token);
        // Before half-life: from the cache, the server is not asked.
        let got = cached_or_fetch(&cache, key("w"), now + ttl / 4, 1, || {
            fetch(Err(JwtFetchError::Unreachable("down".into())))
        })
        .await
        .unwrap();
        assert_eq!(
            (got.as_str(), calls.load(Ordering::SeqCst)),
            (token.as_str(), 1)
        );
        // Due for refresh but the server is unreachable: the cached token,
        // still valid, is served.
        let got = cached_or_fetch(&cache, key("w"), now + ttl * 3 / 4, 1, || {
            fetch(Err(JwtFetchError::Unreachable("down".into())))
        })
        .await
        .unwrap();
        assert_eq!(
            (got.as_str(), calls.load(Ordering::SeqCst)),
            (token.as_str(), 2)
        );
        // Once it expired, the failure is the caller's.
        let err = cached_or_fetch(
            &cache,
            key("w"),
            now + ttl + Duration::from_secs(1),
            1,
            || fetch(Err(JwtFetchError::Unreachable("down".into()))),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("could not fetch JWT-SVID: down"));
        // A server that refuses (say, the entry is gone) is not overridden by
        // the cache, and the cached token is dropped.
        let err = cached_or_fetch(&cache, key("w"), now + ttl / 2, 1, || {
            fetch(Err(JwtFetchError::Refused(
                tonic::Code::PermissionDenied,
                "entry not authorized".into(),
            )))
        })
        .await
        .unwrap_err();
        assert!(err.message().contains("entry not authorized"));
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(lock(&cache).valid(&key("w"), now).is_none());
        // A bad request keeps its code, so clients do not retry it.
        let err = cached_or_fetch(&cache, key("w"), now, 1, || {
            fetch(Err(JwtFetchError::Refused(
                tonic::Code::InvalidArgument,
                "at most 32 audiences".into(),
            )))
        })
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // Anything else the server says is the server's trouble.
        let err = cached_or_fetch(&cache, key("w"), now, 1, || {
            fetch(Err(JwtFetchError::Refused(
                tonic::Code::Internal,
                "x".into(),
            )))
        })
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_uid_over_its_server_share_gets_a_valid_cached_token_or_its_refusal() {
        let own = domain("example.org");
        let now = SystemTime::now();
        let ttl = Duration::from_secs(100);
        let token = own
            .jwt
            .sign(&key("w").spiffe_id, &key("w").audience, ttl, now)
            .unwrap();
        let cache = Mutex::new(JwtCache::new(10));
        let over = || async {
            Err(JwtFetchError::OverShare(Status::resource_exhausted(
                "share used",
            )))
        };
        let err = cached_or_fetch(&cache, key("w"), now, 1, over)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.message(), "share used");
        let t = token.clone();
        cached_or_fetch(&cache, key("w"), now, 1, || async move { Ok(t) })
            .await
            .unwrap();
        // Due for refresh, but the uid may not ask the server: the token,
        // still valid, is served.
        let got = cached_or_fetch(&cache, key("w"), now + ttl * 3 / 4, 1, over)
            .await
            .unwrap();
        assert_eq!(got, token);
    }

    #[test]
    fn transport_failures_count_as_unreachable_and_refusals_do_not() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Unknown,
        ] {
            assert!(matches!(
                JwtFetchError::from_status(&Status::new(code, "x")),
                JwtFetchError::Unreachable(_)
            ));
        }
        for code in [
            tonic::Code::PermissionDenied,
            tonic::Code::NotFound,
            tonic::Code::InvalidArgument,
        ] {
            assert!(matches!(
                JwtFetchError::from_status(&Status::new(code, "x")),
                JwtFetchError::Refused(c, _) if c == code
            ));
        }
    }
}
