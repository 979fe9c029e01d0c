//! The SPIFFE Workload API on the agent's Unix socket.
//!
//! Callers are identified by kernel peer credentials and attested by the unix
//! attestor; the caller's process is re-checked after attestation so that a
//! reused PID gets nothing. Semantics follow the SPIFFE Workload API
//! standard and what the common clients expect: the security header is
//! required, a caller without identity gets PermissionDenied "no identity
//! issued", streams answer at once and then push a full response on every
//! change, and never end with OK.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sigil_proto::server::v1 as spb;
use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_svid::bundle::BundleSet;
use sigil_types::{Entry, Selectors, SpiffeId};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::attest::UnixAttestor;
use crate::core::{SharedClient, Snapshot};
use crate::metrics::Metrics;
use crate::peer::peer_of;
use crate::persist::WorkloadSvid;

/// The gRPC metadata key every Workload API request must carry with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// The message of PermissionDenied when a caller has no identity.
pub const NO_IDENTITY: &str = "no identity issued";
/// How long a first response may wait for an SVID that is being signed.
const FIRST_SVID_WAIT: Duration = Duration::from_secs(10);

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

/// Builds the tonic service.
pub fn service(svc: WorkloadService) -> WorkloadServer {
    SpiffeWorkloadApiServer::with_interceptor(
        svc,
        check_security_header as fn(Request<()>) -> Result<Request<()>, Status>,
    )
}

type JwtKey = (SpiffeId, Vec<String>);

/// Implements [`SpiffeWorkloadApi`].
pub struct WorkloadService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    attestor: Arc<UnixAttestor>,
    client: SharedClient,
    jwt_cache: Mutex<HashMap<JwtKey, (String, SystemTime, SystemTime)>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    #[cfg(feature = "k8s")]
    pods: Option<Arc<crate::k8s::PodAttestor>>,
}

impl std::fmt::Debug for WorkloadService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadService").finish_non_exhaustive()
    }
}

impl WorkloadService {
    /// A service serving from `snapshots`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        attestor: Arc<UnixAttestor>,
        client: SharedClient,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            snapshots,
            attestor,
            client,
            jwt_cache: Mutex::new(HashMap::new()),
            metrics,
            cancel,
            #[cfg(feature = "k8s")]
            pods: None,
        }
    }

    /// Adds pod selectors from the kubelet to every caller's unix selectors.
    #[cfg(feature = "k8s")]
    pub fn with_pod_attestor(mut self, pods: Arc<crate::k8s::PodAttestor>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// The caller's selectors, from its kernel credentials; refuses a caller
    /// whose process changed while it was being attested.
    async fn identify<T>(&self, req: &Request<T>) -> Result<Selectors, Status> {
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

    fn refuse(&self, s: Status) -> Status {
        self.metrics.workload_refusals.inc();
        s
    }
}

/// The entries whose selectors the caller satisfies, default identity first.
fn matching(snap: &Snapshot, selectors: &Selectors) -> Vec<Arc<Entry>> {
    snap.entries
        .iter()
        .filter(|e| e.selectors.is_subset_of(selectors))
        .cloned()
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
        federated_bundles: HashMap::new(),
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

fn bundle_map(snap: &Snapshot, jwt: bool) -> HashMap<String, Vec<u8>> {
    let b = &snap.bundle;
    let value = if jwt {
        b.workload_jwks()
    } else {
        b.x509_der_concat()
    };
    HashMap::from([(b.trust_domain.id_string(), value)])
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
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
        let selectors = self.identify(&req).await.map_err(|s| self.refuse(s))?;
        let mut rx = self.snapshots.clone();
        let snap = rx.borrow_and_update().clone();
        if matching(&snap, &selectors).is_empty() {
            return Err(self.refuse(Status::permission_denied(NO_IDENTITY)));
        }
        self.metrics.workload_requests.inc();
        let first = pb::X509BundlesResponse {
            crl: vec![],
            bundles: bundle_map(&snap, false),
        };
        let stream = spawn_stream(
            rx,
            first,
            self.metrics.clone(),
            self.cancel.clone(),
            move |snap| {
                if matching(snap, &selectors).is_empty() {
                    return Err(Status::permission_denied(NO_IDENTITY));
                }
                Ok(Some(pb::X509BundlesResponse {
                    crl: vec![],
                    bundles: bundle_map(snap, false),
                }))
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
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
        let mut audience: Vec<String> = req
            .get_ref()
            .audience
            .iter()
            .filter(|a| !a.is_empty())
            .cloned()
            .collect();
        audience.sort();
        audience.dedup();
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
            let token = self.jwt_for(&e, &audience).await?;
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
        let selectors = self.identify(&req).await.map_err(|s| self.refuse(s))?;
        let mut rx = self.snapshots.clone();
        let snap = rx.borrow_and_update().clone();
        if matching(&snap, &selectors).is_empty() {
            return Err(self.refuse(Status::permission_denied(NO_IDENTITY)));
        }
        self.metrics.workload_requests.inc();
        let first = pb::JwtBundlesResponse {
            bundles: bundle_map(&snap, true),
        };
        let stream = spawn_stream(
            rx,
            first,
            self.metrics.clone(),
            self.cancel.clone(),
            move |snap| {
                if matching(snap, &selectors).is_empty() {
                    return Err(Status::permission_denied(NO_IDENTITY));
                }
                Ok(Some(pb::JwtBundlesResponse {
                    bundles: bundle_map(snap, true),
                }))
            },
        );
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        if req.get_ref().audience.is_empty() {
            return Err(self.refuse(Status::invalid_argument("audience must be specified")));
        }
        if req.get_ref().svid.is_empty() {
            return Err(self.refuse(Status::invalid_argument("svid must be specified")));
        }
        self.identify(&req).await.map_err(|s| self.refuse(s))?;
        let snap = self.snapshots.borrow().clone();
        let mut set = BundleSet::default();
        set.insert((*snap.bundle).clone());
        let r = req.get_ref();
        let v = sigil_svid::jwt::validate_jwt(&r.svid, &r.audience, &set, SystemTime::now())
            .map_err(|e| self.refuse(Status::invalid_argument(e.to_string())))?;
        self.metrics.workload_requests.inc();
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(json_object_to_struct(&v.claims)),
        }))
    }
}

impl WorkloadService {
    /// A cached JWT-SVID for (SPIFFE ID, audiences) when it is not past half
    /// its life; otherwise a new one from the server.
    async fn jwt_for(&self, e: &Entry, audience: &[String]) -> Result<String, Status> {
        let key = (e.spiffe_id.clone(), audience.to_vec());
        let now = SystemTime::now();
        if let Ok(cache) = self.jwt_cache.lock()
            && let Some((token, _, refresh_at)) = cache.get(&key)
            && now < *refresh_at
        {
            return Ok(token.clone());
        }
        let Some(mut client) = (**self.client.load()).clone() else {
            return Err(Status::unavailable(
                "could not fetch JWT-SVID: server unreachable",
            ));
        };
        let token = client
            .new_jwtsvid(spb::NewJwtsvidRequest {
                entry_id: e.id.to_string(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(|s| Status::unavailable(format!("could not fetch JWT-SVID: {}", s.message())))?
            .into_inner()
            .token;
        if let Ok(info) = sigil_svid::jwt::parse_jwt_unverified(&token)
            && let Ok(mut cache) = self.jwt_cache.lock()
        {
            let life = info.expiry.duration_since(now).unwrap_or_default();
            cache.retain(|_, (_, exp, _)| *exp > now);
            // Bounded: one token per identity and audience set; evict all when huge.
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(key, (token.clone(), info.expiry, now + life / 2));
        }
        Ok(token)
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
mod tests {
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
}
