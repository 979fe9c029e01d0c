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
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_types::{Entry, EntryId, Selectors, SpiffeId};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

pub use crate::caller::CallerAttestor;
use crate::core::Snapshot;
use crate::demand::Demand;
pub use crate::jwt::{JWT_CACHE_LIMIT, JWT_CACHE_LIMIT_PER_UID, JwtSvids};
pub use crate::jwt_validation::{JWT_VALIDATION_CACHE_LIMIT, JwtValidationCache};
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

/// Implements [`SpiffeWorkloadApi`].
pub struct WorkloadService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    callers: Arc<CallerAttestor>,
    jwt: Arc<JwtSvids>,
    /// ValidateJWTSVID's cache of tokens that passed.
    validated: JwtValidationCache,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    /// Where the entries callers ask for are told to the core.
    demand: Option<Demand>,
}

impl std::fmt::Debug for WorkloadService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadService").finish_non_exhaustive()
    }
}

impl WorkloadService {
    /// A service serving from `snapshots` to the callers `callers` attests,
    /// JWT-SVIDs from `jwt`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        callers: Arc<CallerAttestor>,
        jwt: Arc<JwtSvids>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            snapshots,
            callers,
            jwt,
            validated: JwtValidationCache::default(),
            metrics,
            cancel,
            demand: None,
        }
    }

    /// Tells `demand` (the core's) which entries callers ask for: their
    /// SVIDs are then signed first, signed on demand, and held whatever the
    /// bound on SVIDs held while a stream matches them.
    pub fn with_demand(mut self, demand: Demand) -> Self {
        self.demand = Some(demand);
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

/// The entries whose selectors the caller satisfies, default identity first
/// (through the snapshot's selector index).
pub(crate) fn matching(snap: &Snapshot, selectors: &Selectors) -> Vec<Arc<Entry>> {
    snap.entries.matching(selectors)
}

/// The IDs of `matched`, as told to the core's [`Demand`].
pub(crate) fn entry_ids(matched: &[Arc<Entry>]) -> Vec<EntryId> {
    matched.iter().map(|e| e.id.clone()).collect()
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
        x509_svid: s.chain().der().to_vec(),
        x509_svid_key: s.key_der().to_vec(),
        bundle: bundle.to_vec(),
        hint: hint.to_owned(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs a Workload API stream: `first` is its first response, then `build`
/// turns each new snapshot into the response (or an error that ends the
/// stream); a response equal to the last one sent is suppressed.
///
/// `first` is the stream's first item as it is returned, not sent through
/// the task: hyper then finds the response's message ready with its headers
/// and writes both at once, and the first answer waits for no task switch
/// (docs/benchmarks.md, "Workload API burst: the first answer without a
/// task hop").
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
    let first_sent = first.clone();
    // Counted before the first answer can reach the caller.
    metrics.workload_streams.inc();
    tokio::spawn(async move {
        // The uid's open-stream slot, given back when the stream ends.
        let _slot = slot;
        let mut last = first;
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
        metrics.workload_streams.dec();
    });
    Box::pin(tokio_stream::StreamExt::chain(
        tokio_stream::once(Ok(first_sent)),
        tokio_stream::wrappers::ReceiverStream::new(out),
    ))
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
        let interest = self.demand.as_ref().map(Demand::interest);
        let first = loop {
            let snap = rx.borrow_and_update().clone();
            let matched = matching(&snap, &selectors);
            if matched.is_empty() {
                return Err(self.refuse(Status::permission_denied(NO_IDENTITY)));
            }
            if let Some(i) = &interest {
                i.set(entry_ids(&matched));
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
                // Held by the stream: its entries' SVIDs are held while it
                // is open.
                if let Some(i) = &interest {
                    i.set(entry_ids(&matched));
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
            // The cache is checked against the snapshot as it is now.
            let now = self.snapshots.borrow().clone();
            let token = self
                .jwt
                .get(&now, &e, &audience, uid, self.callers.limiter())
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
        let (spiffe_id, claims) = self
            .validated
            .validate(&snap, &matched, &r.svid, &r.audience, SystemTime::now())
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
/// gets the own bundle only), with the claims it may see and its expiry.
/// [`JwtValidationCache`] stands in front of it.
pub(crate) fn validate_for(
    snap: &Snapshot,
    matched: &[Arc<Entry>],
    token: &str,
    audience: &str,
    now: SystemTime,
) -> Result<
    (
        SpiffeId,
        serde_json::Map<String, serde_json::Value>,
        SystemTime,
    ),
    sigil_svid::SvidError,
> {
    let mut set = BundleSet::default();
    for b in federated_for(snap, matched) {
        set.insert((**b).clone());
    }
    set.insert((*snap.bundle).clone());
    let v = sigil_svid::jwt::validate_jwt(token, audience, &set, now)?;
    let foreign = v.spiffe_id.trust_domain() != snap.bundle.trust_domain;
    Ok((v.spiffe_id, returned_claims(&v.claims, foreign), v.expiry))
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
        let info = sigil_svid::x509::cert_info(&leaf).unwrap();
        Arc::new(WorkloadSvid::new(
            e.spiffe_id.clone(),
            crate::persist::SvidDer::new(&[leaf], &key).unwrap(),
            (info.not_before, info.not_after),
            None,
            0,
        ))
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

        let (id, got, _) =
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
        let (_, got, _) = validate_for(&snap, &[], &local, "api", now).unwrap();
        assert_eq!(got["cluster"], "east");
    }
}
