//! Envoy's Secret Discovery Service (SDS v3) on the agent's Unix socket, next
//! to the Workload API, as the SPIRE agent serves it (spec/spiffe.md §6).
//!
//! Callers are attested exactly like Workload API callers (kernel peer
//! credentials, the same [`CallerAttestor`]) and get only their own
//! identities and the bundles they are entitled to. Envoy sends no
//! `workload.spiffe.io` header, so none is required here.
//!
//! Resource names (the three special ones are configurable in
//! `[agent.sds]`):
//!
//! | name | resource |
//! |---|---|
//! | `default` | the caller's default X509-SVID (the first one the Workload API returns) as a `tls_certificate` Secret named `default` |
//! | `spiffe://<td>/<path>` | the caller's X509-SVID with that SPIFFE ID |
//! | `ROOTCA` | a `validation_context` with the own trust domain's bundle |
//! | `spiffe://<td>` | a `validation_context` with that trust domain's bundle: the own one, or a federated one the caller's entries federate with |
//! | `ALL` | one `validation_context` with Envoy's SPIFFE certificate validator holding the own and every entitled federated bundle, sorted by trust domain |
//! | none at all | every SVID of the caller (named by SPIFFE ID) and every bundle it may use (named `spiffe://<td>`) |
//!
//! Validation contexts use the SPIFFE certificate validator
//! (`envoy.tls.cert_validator.spiffe`) unless the Envoy is older than 1.18,
//! `disable_spiffe_cert_validation` is set in `[agent.sds]`, or the Envoy's
//! node metadata sets `disable_spiffe_cert_validation`; then they carry the
//! PEM roots in `trusted_ca`, and `ALL` cannot be served (Internal).
//!
//! A name the caller may not have ends the stream with InvalidArgument
//! `workload is not authorized for the requested identities [...]`, as
//! SPIRE does; a caller with no identity at all gets PermissionDenied
//! `no identity issued`, like on the Workload API.
//!
//! StreamSecrets follows the xDS state-of-the-world protocol: the first
//! request is answered at once (or as soon as a requested SVID has been
//! signed); every response has a new `version_info` and a fresh random
//! `nonce`; a request that acknowledges the last response (its nonce and
//! version) sends nothing; a rejection (NACK: the last nonce with
//! `error_detail` or another version) is logged and counted, and nothing is
//! resent until the content changes; a request with a stale nonce is ignored.
//! A new response is pushed whenever the requested content changes (SVID
//! rotation, bundle or federation change, entries) or the requested names
//! change. FetchSecrets answers once with the same resources and neither
//! version nor nonce. DeltaSecrets is Unimplemented, as in SPIRE.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use prost::Message;
use prost_types::Any;
use sigil_proto::envoy::config::core::v3 as core_pb;
use sigil_proto::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use sigil_proto::envoy::service::discovery::v3 as disc;
use sigil_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use sigil_proto::type_urls;
use sigil_svid::bundle::Bundle;
use sigil_types::text::{LogBudget, clip};
use sigil_types::{Entry, Selectors, SpiffeId, TrustDomain};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::caller::CallerAttestor;
use crate::config::SdsConfig;
use crate::core::Snapshot;
use crate::demand::{Demand, Interest};
use crate::metrics::Metrics;
use crate::persist::WorkloadSvid;
use crate::workload::{NO_IDENTITY, entry_ids, federated_for, matching};

/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// The node metadata key with which an Envoy turns the SPIFFE validator off
/// (`true`) or on (`false`), overriding `[agent.sds]`.
pub const DISABLE_SPIFFE_VALIDATION_KEY: &str = "disable_spiffe_cert_validation";
/// The identifier the agent puts in `control_plane` of its responses.
pub const CONTROL_PLANE_ID: &str = "sigil-agent";
/// Most resource names one request may ask for.
pub const MAX_RESOURCE_NAMES: usize = 64;
/// Longest resource name (the longest SPIFFE ID).
pub const MAX_RESOURCE_NAME_LEN: usize = 2048;
/// Largest request message the service decodes.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Largest response message the service encodes.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How much of a NACK's error message is logged.
const NACK_LOG_LIMIT: usize = 1024;
/// How often one stream (or all FetchSecrets calls) may cause a warning.
const WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// How many refused names an error message lists, each cut to
/// [`REFUSED_NAME_LIMIT`] bytes: gRPC clients refuse large status messages.
const REFUSED_NAMES_SHOWN: usize = 8;
const REFUSED_NAME_LIMIT: usize = 256;
/// How long FetchSecrets waits for a requested SVID that is being signed.
const FETCH_WAIT: Duration = Duration::from_secs(10);

/// The SDS service with its message size limits.
pub type SdsServer = SecretDiscoveryServiceServer<SdsService>;

/// Builds the tonic service, with bounded message sizes.
pub fn service(svc: SdsService) -> SdsServer {
    SecretDiscoveryServiceServer::new(svc)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES)
}

/// Implements [`SecretDiscoveryService`].
pub struct SdsService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    callers: Arc<CallerAttestor>,
    cfg: Arc<SdsConfig>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    /// Warnings caused by FetchSecrets requests, one per interval.
    unary_warnings: std::sync::Mutex<LogBudget>,
    /// Where the entries callers ask for are told to the core.
    demand: Option<Demand>,
}

impl std::fmt::Debug for SdsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdsService")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl SdsService {
    /// A service serving from `snapshots` to the callers `callers` attests.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        callers: Arc<CallerAttestor>,
        cfg: SdsConfig,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            snapshots,
            callers,
            cfg: Arc::new(cfg),
            metrics,
            cancel,
            unary_warnings: std::sync::Mutex::new(LogBudget::new(WARNING_INTERVAL)),
            demand: None,
        }
    }

    /// Tells `demand` (the core's) which entries callers ask for (see
    /// [`crate::workload::WorkloadService::with_demand`]).
    pub fn with_demand(mut self, demand: Demand) -> Self {
        self.demand = Some(demand);
        self
    }

    fn refuse(&self, s: Status) -> Status {
        self.metrics.sds_refusals.inc();
        s
    }
}

/// The requested names as a set; refuses too many or too long names and a
/// resource type other than Secret.
fn requested_names(req: &disc::DiscoveryRequest) -> Result<BTreeSet<String>, Status> {
    if !req.type_url.is_empty() && req.type_url != type_urls::SECRET {
        return Err(Status::invalid_argument(format!(
            "unsupported type_url {:?}: this service serves only {}",
            truncate(&req.type_url, 256),
            type_urls::SECRET
        )));
    }
    if req.resource_names.len() > MAX_RESOURCE_NAMES {
        return Err(Status::invalid_argument(format!(
            "{} resource names requested; at most {MAX_RESOURCE_NAMES} are allowed",
            req.resource_names.len()
        )));
    }
    if let Some(long) = req
        .resource_names
        .iter()
        .find(|n| n.len() > MAX_RESOURCE_NAME_LEN)
    {
        return Err(Status::invalid_argument(format!(
            "a resource name of {} bytes was requested; at most {MAX_RESOURCE_NAME_LEN} are allowed",
            long.len()
        )));
    }
    Ok(req
        .resource_names
        .iter()
        .filter(|n| !n.is_empty())
        .cloned()
        .collect())
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether validation contexts for this Envoy use the SPIFFE certificate
/// validator: yes unless the config or the node metadata disables it, or the
/// Envoy reports a version below 1.18 (an Envoy without a build version gets
/// it too).
fn use_spiffe_validator(
    node: Option<&core_pb::Node>,
    cfg: &SdsConfig,
    warnings: &mut LogBudget,
) -> bool {
    let mut disabled = cfg.disable_spiffe_cert_validation;
    let Some(node) = node else {
        return !disabled;
    };
    if let Some(v) = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION_KEY))
    {
        use prost_types::value::Kind;
        match &v.kind {
            Some(Kind::BoolValue(b)) => disabled = *b,
            Some(Kind::StringValue(s)) => match parse_bool(s) {
                Some(b) => disabled = b,
                None => {
                    if let Some(held_back) = warnings.take() {
                        tracing::warn!(
                            value = %clip(s, 64),
                            held_back,
                            "Envoy node metadata {DISABLE_SPIFFE_VALIDATION_KEY} is not a boolean; ignored"
                        );
                    }
                }
            },
            _ => {
                if let Some(held_back) = warnings.take() {
                    tracing::warn!(
                        held_back,
                        "Envoy node metadata {DISABLE_SPIFFE_VALIDATION_KEY} is not a boolean; ignored"
                    );
                }
            }
        }
    }
    if disabled {
        return false;
    }
    use core_pb::node::UserAgentVersionType;
    match &node.user_agent_version_type {
        Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
            .version
            .as_ref()
            .is_none_or(|v| v.major_number > 1 || (v.major_number == 1 && v.minor_number >= 18)),
        _ => true,
    }
}

/// A boolean written as text, the spellings Go's `strconv.ParseBool` takes
/// (what SPIRE accepts in the same node metadata key).
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn inline(bytes: Vec<u8>) -> Option<core_pb::DataSource> {
    Some(core_pb::DataSource {
        specifier: Some(core_pb::data_source::Specifier::InlineBytes(bytes)),
    })
}

fn pack_secret(secret: &tls_pb::Secret) -> Any {
    Any {
        type_url: type_urls::SECRET.to_owned(),
        value: secret.encode_to_vec(),
    }
}

/// A `tls_certificate` Secret: the chain as PEM, the key as PEM PKCS#8.
fn tls_certificate(name: &str, svid: &WorkloadSvid) -> Any {
    let chain = sigil_svid::pem::certs_to_pem(&svid.chain().to_vecs()).into_bytes();
    let key = svid.der.key_pem().as_bytes().to_vec();
    pack_secret(&tls_pb::Secret {
        name: name.to_owned(),
        r#type: Some(tls_pb::secret::Type::TlsCertificate(
            tls_pb::TlsCertificate {
                certificate_chain: inline(chain),
                private_key: inline(key),
            },
        )),
    })
}

/// A `validation_context` Secret for `bundles`: the SPIFFE validator with one
/// trust domain per bundle, or (legacy) the PEM roots of the single bundle.
fn validation_context(name: &str, bundles: &[&Bundle], spiffe: bool) -> Any {
    let context = if spiffe {
        let config = tls_pb::SpiffeCertValidatorConfig {
            trust_domains: bundles
                .iter()
                .map(|b| tls_pb::spiffe_cert_validator_config::TrustDomain {
                    name: b.trust_domain.name().to_owned(),
                    trust_bundle: inline(b.x509_pem().into_bytes()),
                })
                .collect(),
        };
        tls_pb::CertificateValidationContext {
            trusted_ca: None,
            custom_validator_config: Some(core_pb::TypedExtensionConfig {
                name: SPIFFE_VALIDATOR.to_owned(),
                typed_config: Some(Any {
                    type_url: type_urls::SPIFFE_CERT_VALIDATOR_CONFIG.to_owned(),
                    value: config.encode_to_vec(),
                }),
            }),
        }
    } else {
        let pem: String = bundles.iter().map(|b| b.x509_pem()).collect();
        tls_pb::CertificateValidationContext {
            trusted_ca: inline(pem.into_bytes()),
            custom_validator_config: None,
        }
    };
    pack_secret(&tls_pb::Secret {
        name: name.to_owned(),
        r#type: Some(tls_pb::secret::Type::ValidationContext(context)),
    })
}

/// What a request resolves to against one snapshot.
#[derive(Debug, PartialEq)]
enum Built {
    /// Every requested resource, in a stable order.
    Ready(Vec<Any>),
    /// A requested SVID belongs to the caller but has not been signed yet;
    /// nothing is sent until it is.
    Pending,
}

/// The caller's SVIDs in Workload API order (the first is the default), one
/// per SPIFFE ID, and the SPIFFE IDs of its entries still waiting for one.
fn caller_svids(
    snap: &Snapshot,
    matched: &[Arc<Entry>],
) -> (Vec<Arc<WorkloadSvid>>, BTreeSet<SpiffeId>) {
    let mut seen = BTreeSet::new();
    let mut svids = Vec::new();
    let mut waiting = BTreeSet::new();
    for e in matched {
        match snap.svids.get(&e.id) {
            Some(s) if seen.insert(s.spiffe_id.clone()) => svids.push(s.clone()),
            Some(_) => {}
            None => {
                waiting.insert(e.spiffe_id.clone());
            }
        }
    }
    waiting.retain(|id| !seen.contains(id));
    (svids, waiting)
}

/// Resolves the requested `names` (empty: everything) for a caller whose
/// entries are `matched`.
fn build(
    snap: &Snapshot,
    matched: &[Arc<Entry>],
    names: &BTreeSet<String>,
    cfg: &SdsConfig,
    spiffe: bool,
) -> Result<Built, Status> {
    if matched.is_empty() {
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    let (svids, waiting) = caller_svids(snap, matched);
    // The own bundle first, then the entitled federated ones; a bundle
    // without X.509 authorities (JWT only) cannot validate certificates.
    let mut bundles: BTreeMap<TrustDomain, &Bundle> = federated_for(snap, matched)
        .into_iter()
        .map(|b| (b.trust_domain.clone(), &**b))
        .collect();
    bundles.insert(snap.bundle.trust_domain.clone(), &snap.bundle);
    bundles.retain(|_, b| !b.x509_authorities.is_empty());

    let mut out = Vec::new();
    if names.is_empty() {
        if svids.is_empty() && !waiting.is_empty() {
            return Ok(Built::Pending);
        }
        for s in &svids {
            out.push(tls_certificate(s.spiffe_id.as_str(), s));
        }
        for (td, b) in &bundles {
            out.push(validation_context(&td.id_string(), &[b], spiffe));
        }
        return Ok(Built::Ready(out));
    }

    let mut refused = Vec::new();
    let mut pending = false;
    for name in names {
        if *name == cfg.default_svid_name {
            match svids.first() {
                Some(s) => out.push(tls_certificate(name, s)),
                None if !waiting.is_empty() => pending = true,
                None => refused.push(name.as_str()),
            }
        } else if *name == cfg.default_bundle_name {
            match bundles.get(&snap.bundle.trust_domain) {
                Some(b) => out.push(validation_context(name, &[b], spiffe)),
                None => pending = true,
            }
        } else if *name == cfg.default_all_bundles_name {
            if !spiffe {
                return Err(Status::internal(format!(
                    "{name:?} needs the SPIFFE certificate validator, which is disabled for this Envoy \
                     (Envoy below 1.18, disable_spiffe_cert_validation in [agent.sds] or in the node metadata)"
                )));
            }
            let all: Vec<&Bundle> = bundles.values().copied().collect();
            out.push(validation_context(name, &all, true));
        } else if let Ok(id) = name.parse::<SpiffeId>() {
            if id.path().is_empty() {
                match bundles.get(&id.trust_domain()) {
                    Some(b) => out.push(validation_context(name, &[b], spiffe)),
                    None => refused.push(name.as_str()),
                }
            } else if let Some(s) = svids.iter().find(|s| s.spiffe_id == id) {
                out.push(tls_certificate(name, s));
            } else if waiting.contains(&id) {
                pending = true;
            } else {
                refused.push(name.as_str());
            }
        } else {
            refused.push(name.as_str());
        }
    }
    if !refused.is_empty() {
        let shown: Vec<_> = refused
            .iter()
            .take(REFUSED_NAMES_SHOWN)
            .map(|n| clip(n, REFUSED_NAME_LIMIT))
            .collect();
        let more = match refused.len().saturating_sub(REFUSED_NAMES_SHOWN) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        return Err(Status::invalid_argument(format!(
            "workload is not authorized for the requested identities {shown:?}{more}"
        )));
    }
    if pending {
        return Ok(Built::Pending);
    }
    Ok(Built::Ready(out))
}

/// 8 random bytes as hex.
fn new_nonce() -> Result<String, Status> {
    let mut b = [0u8; 8];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Status::internal("no randomness for a nonce"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The state of one StreamSecrets stream.
struct StreamState {
    selectors: Selectors,
    /// Tells the core which entries this stream's caller matches.
    interest: Option<Interest>,
    cfg: Arc<SdsConfig>,
    metrics: Arc<Metrics>,
    node_id: String,
    /// The last request's names; `None` before the first request.
    names: Option<BTreeSet<String>>,
    type_url: String,
    spiffe: bool,
    /// The number of responses sent, which is also the last `version_info`.
    version: u64,
    last_nonce: Option<String>,
    last_sent: Option<Vec<Any>>,
    /// Warnings caused by what this stream's client sends (NACKs, bad
    /// metadata): one per interval, the rest counted.
    warnings: LogBudget,
}

impl StreamState {
    /// Handles one request from the client.
    fn on_request(
        &mut self,
        req: disc::DiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<Option<disc::DiscoveryResponse>, Status> {
        let names = requested_names(&req)?;
        if let Some(node) = &req.node
            && !node.id.is_empty()
        {
            self.node_id = truncate(&node.id, 256).to_owned();
        }
        if let Some(last_nonce) = &self.last_nonce {
            if req.response_nonce != *last_nonce {
                tracing::debug!(
                    node = %self.node_id,
                    nonce = %truncate(&req.response_nonce, 64),
                    expected = %last_nonce,
                    "SDS request with a stale nonce; ignored"
                );
                return Ok(None);
            }
            let version = self.version.to_string();
            if req.error_detail.is_some() || req.version_info != version {
                self.metrics.sds_nacks.inc();
                let detail = req.error_detail.as_ref();
                if let Some(held_back) = self.warnings.take() {
                    tracing::warn!(
                        node = %clip(&self.node_id, 256),
                        version = %version,
                        accepted = %clip(&req.version_info, 64),
                        code = detail.map_or(0, |d| d.code),
                        error = %detail.map_or("".into(), |d| clip(&d.message, NACK_LOG_LIMIT)),
                        held_back,
                        "Envoy rejected the SDS response; nothing is resent until the secrets change"
                    );
                }
            } else {
                tracing::debug!(node = %self.node_id, version = %version, "SDS response acknowledged");
            }
        }
        let spiffe = use_spiffe_validator(req.node.as_ref(), &self.cfg, &mut self.warnings);
        let first = self.names.is_none();
        let node_changed = req.node.is_some() && spiffe != self.spiffe;
        let names_changed = self.names.as_ref() != Some(&names);
        if req.node.is_some() || first {
            self.spiffe = spiffe;
        }
        if !req.type_url.is_empty() {
            self.type_url = req.type_url.clone();
        }
        self.names = Some(names);
        if first || names_changed || node_changed {
            self.respond(snap)
        } else {
            Ok(None)
        }
    }

    /// The response for the current request against `snap`, if its content
    /// differs from the last one sent.
    fn respond(&mut self, snap: &Snapshot) -> Result<Option<disc::DiscoveryResponse>, Status> {
        let Some(names) = &self.names else {
            return Ok(None);
        };
        let matched = matching(snap, &self.selectors);
        if let Some(i) = &self.interest {
            i.set(entry_ids(&matched));
        }
        let resources = match build(snap, &matched, names, &self.cfg, self.spiffe)? {
            Built::Ready(r) => r,
            Built::Pending => return Ok(None),
        };
        if self.last_sent.as_ref() == Some(&resources) {
            return Ok(None);
        }
        let nonce = new_nonce()?;
        self.version += 1;
        self.last_nonce = Some(nonce.clone());
        self.last_sent = Some(resources.clone());
        Ok(Some(disc::DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            canary: false,
            type_url: self.type_url.clone(),
            nonce,
            control_plane: Some(core_pb::ControlPlane {
                identifier: CONTROL_PLANE_ID.to_owned(),
            }),
        }))
    }
}

/// Sends `resp`; `false` when the client has gone.
async fn send(
    tx: &mpsc::Sender<Result<disc::DiscoveryResponse, Status>>,
    resp: disc::DiscoveryResponse,
    state: &StreamState,
) -> bool {
    tracing::debug!(
        node = %state.node_id,
        version = %resp.version_info,
        nonce = %resp.nonce,
        resources = resp.resources.len(),
        "sending SDS response"
    );
    state.metrics.sds_responses.inc();
    tx.send(Ok(resp)).await.is_ok()
}

/// Runs one StreamSecrets stream until the client leaves, the caller loses
/// its identity or asks for something it may not have, or the agent stops.
async fn run_stream(
    mut inbound: Streaming<disc::DiscoveryRequest>,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    tx: mpsc::Sender<Result<disc::DiscoveryResponse, Status>>,
    mut state: StreamState,
    cancel: CancellationToken,
) {
    loop {
        let outcome = tokio::select! {
            _ = tx.closed() => break,
            _ = cancel.cancelled() => Err(Status::unavailable("agent is shutting down")),
            msg = inbound.next() => match msg {
                Some(Ok(req)) => {
                    let snap = rx.borrow_and_update().clone();
                    state.on_request(req, &snap)
                }
                // The client closed its side or the connection failed.
                Some(Err(_)) | None => break,
            },
            changed = rx.changed() => match changed {
                Ok(()) => {
                    let snap = rx.borrow_and_update().clone();
                    state.respond(&snap)
                }
                Err(_) => Err(Status::unavailable("agent is shutting down")),
            },
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(resp)) => {
                if !send(&tx, resp, &state).await {
                    break;
                }
            }
            Err(status) => {
                if status.code() != tonic::Code::Unavailable {
                    state.metrics.sds_refusals.inc();
                }
                tracing::info!(
                    node = %state.node_id,
                    code = ?status.code(),
                    error = %status.message(),
                    "SDS stream ended"
                );
                let _ = tx.send(Err(status)).await;
                break;
            }
        }
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = BoxStream<disc::DeltaDiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<disc::DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(self.refuse(Status::unimplemented(
            "DeltaSecrets is not implemented; use StreamSecrets (state of the world)",
        )))
    }

    type StreamSecretsStream = BoxStream<disc::DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        req: Request<Streaming<disc::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let slot = self
            .callers
            .limiter()
            .stream(&req)
            .map_err(|s| self.refuse(s))?;
        let selectors = self
            .callers
            .identify(&req)
            .await
            .map_err(|s| self.refuse(s))?;
        if matching(&self.snapshots.borrow(), &selectors).is_empty() {
            return Err(self.refuse(Status::permission_denied(NO_IDENTITY)));
        }
        let state = StreamState {
            selectors,
            interest: self.demand.as_ref().map(Demand::interest),
            cfg: self.cfg.clone(),
            metrics: self.metrics.clone(),
            node_id: String::new(),
            names: None,
            type_url: type_urls::SECRET.to_owned(),
            spiffe: true,
            version: 0,
            last_nonce: None,
            last_sent: None,
            warnings: LogBudget::new(WARNING_INTERVAL),
        };
        let (tx, out) = mpsc::channel(4);
        let rx = self.snapshots.clone();
        let cancel = self.cancel.clone();
        let metrics = self.metrics.clone();
        let inbound = req.into_inner();
        tokio::spawn(async move {
            // The uid's open-stream slot, given back when the stream ends.
            let _slot = slot;
            metrics.sds_streams.inc();
            run_stream(inbound, rx, tx, state, cancel).await;
            metrics.sds_streams.dec();
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn fetch_secrets(
        &self,
        req: Request<disc::DiscoveryRequest>,
    ) -> Result<Response<disc::DiscoveryResponse>, Status> {
        self.callers
            .limiter()
            .call(&req)
            .map_err(|s| self.refuse(s))?;
        let names = requested_names(req.get_ref()).map_err(|s| self.refuse(s))?;
        let selectors = self
            .callers
            .identify(&req)
            .await
            .map_err(|s| self.refuse(s))?;
        let spiffe = {
            let mut warnings = self
                .unary_warnings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            use_spiffe_validator(req.get_ref().node.as_ref(), &self.cfg, &mut warnings)
        };
        let mut rx = self.snapshots.clone();
        let deadline = tokio::time::Instant::now() + FETCH_WAIT;
        let mut asked = false;
        let resources = loop {
            let snap = rx.borrow_and_update().clone();
            let matched = matching(&snap, &selectors);
            if let Some(d) = self.demand.as_ref().filter(|_| !asked) {
                d.ask(matched.iter().map(|e| &e.id));
                asked = true;
            }
            match build(&snap, &matched, &names, &self.cfg, spiffe).map_err(|s| self.refuse(s))? {
                Built::Ready(r) => break r,
                Built::Pending => match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => {
                        return Err(
                            self.refuse(Status::unavailable("X509-SVID not yet available; retry"))
                        );
                    }
                },
            }
        };
        self.metrics.sds_responses.inc();
        let type_url = match req.get_ref().type_url.as_str() {
            "" => type_urls::SECRET.to_owned(),
            t => t.to_owned(),
        };
        Ok(Response::new(disc::DiscoveryResponse {
            version_info: String::new(),
            resources,
            canary: false,
            type_url,
            nonce: String::new(),
            control_plane: Some(core_pb::ControlPlane {
                identifier: CONTROL_PLANE_ID.to_owned(),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::tests::{Domain, domain, entry, snapshot, svid};

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A budget for tests that do not look at warnings.
    fn quiet() -> LogBudget {
        LogBudget::new(WARNING_INTERVAL)
    }

    fn decode(any: &Any) -> tls_pb::Secret {
        assert_eq!(any.type_url, type_urls::SECRET);
        tls_pb::Secret::decode(any.value.as_slice()).unwrap()
    }

    fn ready(b: Result<Built, Status>) -> Vec<tls_pb::Secret> {
        match b.unwrap() {
            Built::Ready(r) => r.iter().map(decode).collect(),
            Built::Pending => panic!("pending"),
        }
    }

    fn inline_bytes(d: &Option<core_pb::DataSource>) -> &[u8] {
        match d.as_ref().and_then(|d| d.specifier.as_ref()) {
            Some(core_pb::data_source::Specifier::InlineBytes(b)) => b,
            other => panic!("not inline bytes: {other:?}"),
        }
    }

    /// The (trust domain, PEM) pairs of a SPIFFE-validator validation context.
    fn spiffe_domains(s: &tls_pb::Secret) -> Vec<(String, Vec<u8>)> {
        let Some(tls_pb::secret::Type::ValidationContext(v)) = &s.r#type else {
            panic!("not a validation context: {s:?}");
        };
        assert!(v.trusted_ca.is_none());
        let ext = v.custom_validator_config.as_ref().unwrap();
        assert_eq!(ext.name, SPIFFE_VALIDATOR);
        let any = ext.typed_config.as_ref().unwrap();
        assert_eq!(any.type_url, type_urls::SPIFFE_CERT_VALIDATOR_CONFIG);
        tls_pb::SpiffeCertValidatorConfig::decode(any.value.as_slice())
            .unwrap()
            .trust_domains
            .iter()
            .map(|t| (t.name.clone(), inline_bytes(&t.trust_bundle).to_vec()))
            .collect()
    }

    fn pem(d: &Domain) -> Vec<u8> {
        d.bundle.x509_pem().into_bytes()
    }

    fn cert_of(s: &tls_pb::Secret) -> (Vec<Vec<u8>>, PrivateKeyPem) {
        let Some(tls_pb::secret::Type::TlsCertificate(c)) = &s.r#type else {
            panic!("not a certificate: {s:?}");
        };
        let chain = std::str::from_utf8(inline_bytes(&c.certificate_chain)).unwrap();
        let key = std::str::from_utf8(inline_bytes(&c.private_key)).unwrap();
        (
            sigil_svid::pem::pem_to_certs(chain).unwrap(),
            key.to_owned(),
        )
    }
    type PrivateKeyPem = String;

    #[test]
    fn names_resolve_to_the_callers_svids_and_bundles() {
        let own = domain("example.org");
        let other = domain("other.org");
        let web = entry("web", &["other.org"]);
        let api = entry("api", &[]);
        let db = entry("db", &[]);
        let snap = snapshot(&own, &[web.clone(), api.clone(), db.clone()], &[&other]);
        let cfg = SdsConfig::default();
        let matched = vec![web.clone(), api.clone()];

        let got = ready(build(
            &snap,
            &matched,
            &names(&["default", "ROOTCA", "ALL", "spiffe://example.org/api"]),
            &cfg,
            true,
        ));
        let by_name: BTreeMap<_, _> = got.iter().map(|s| (s.name.as_str(), s)).collect();
        assert_eq!(
            by_name.keys().copied().collect::<Vec<_>>(),
            ["ALL", "ROOTCA", "default", "spiffe://example.org/api"]
        );
        // `default` is the first SVID, with its own key.
        let (chain, key) = cert_of(by_name["default"]);
        let web_svid = &snap.svids[&web.id];
        assert_eq!(chain, web_svid.chain().to_vecs());
        assert_eq!(key.as_str(), web_svid.der.key_pem().as_str());
        let (chain, _) = cert_of(by_name["spiffe://example.org/api"]);
        assert_eq!(chain, snap.svids[&api.id].chain().to_vecs());
        assert_eq!(
            spiffe_domains(by_name["ROOTCA"]),
            [("example.org".to_owned(), pem(&own))]
        );
        // ALL: own and entitled federated, sorted, bare names.
        assert_eq!(
            spiffe_domains(by_name["ALL"]),
            [
                ("example.org".to_owned(), pem(&own)),
                ("other.org".to_owned(), pem(&other))
            ]
        );
        // A trust domain by its ID.
        let got = ready(build(
            &snap,
            &matched,
            &names(&["spiffe://other.org", "spiffe://example.org"]),
            &cfg,
            true,
        ));
        assert_eq!(got[0].name, "spiffe://example.org");
        assert_eq!(
            spiffe_domains(&got[1]),
            [("other.org".to_owned(), pem(&other))]
        );

        // Another caller's SVID, a bundle it is not entitled to, junk: refused by name.
        let err = build(
            &snap,
            std::slice::from_ref(&api),
            &names(&[
                "default",
                "spiffe://example.org/db",
                "spiffe://other.org",
                "nope",
            ]),
            &cfg,
            true,
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            r#"workload is not authorized for the requested identities ["nope", "spiffe://example.org/db", "spiffe://other.org"]"#
        );
        // Many long refused names: the message stays small enough for any
        // gRPC client (they refuse status messages of some KiB).
        let long: Vec<String> = (0..64)
            .map(|i| format!("{i:02}{}", "n".repeat(2000)))
            .collect();
        let long: BTreeSet<String> = long.into_iter().collect();
        let err = build(&snap, std::slice::from_ref(&api), &long, &cfg, true).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().len() < 4096, "{}", err.message().len());
        assert!(err.message().ends_with(" and 56 more"), "{}", err.message());
        // No identity at all.
        let err = build(&snap, &[], &names(&["ROOTCA"]), &cfg, true).unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (tonic::Code::PermissionDenied, NO_IDENTITY)
        );
    }

    #[test]
    fn no_names_means_every_svid_and_bundle() {
        let own = domain("example.org");
        let other = domain("other.org");
        let web = entry("web", &["other.org"]);
        let api = entry("api", &[]);
        let snap = snapshot(&own, &[web.clone(), api.clone()], &[&other]);
        let got = ready(build(
            &snap,
            &[web, api],
            &BTreeSet::new(),
            &SdsConfig::default(),
            true,
        ));
        let got: Vec<_> = got.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            got,
            [
                "spiffe://example.org/web",
                "spiffe://example.org/api",
                "spiffe://example.org",
                "spiffe://other.org"
            ]
        );
    }

    #[test]
    fn legacy_validation_contexts_carry_trusted_ca_and_cannot_serve_all() {
        let own = domain("example.org");
        let web = entry("web", &[]);
        let snap = snapshot(&own, std::slice::from_ref(&web), &[]);
        let cfg = SdsConfig::default();
        let got = ready(build(
            &snap,
            std::slice::from_ref(&web),
            &names(&["ROOTCA"]),
            &cfg,
            false,
        ));
        let Some(tls_pb::secret::Type::ValidationContext(v)) = &got[0].r#type else {
            panic!()
        };
        assert!(v.custom_validator_config.is_none());
        assert_eq!(inline_bytes(&v.trusted_ca), pem(&own).as_slice());
        let err = build(&snap, &[web], &names(&["ALL"]), &cfg, false).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    #[test]
    fn configured_names_replace_spires() {
        let own = domain("example.org");
        let web = entry("web", &[]);
        let snap = snapshot(&own, std::slice::from_ref(&web), &[]);
        let cfg = SdsConfig {
            default_svid_name: "mine".into(),
            default_bundle_name: "roots".into(),
            default_all_bundles_name: "everything".into(),
            disable_spiffe_cert_validation: false,
        };
        let got = ready(build(
            &snap,
            std::slice::from_ref(&web),
            &names(&["mine", "roots", "everything"]),
            &cfg,
            true,
        ));
        assert_eq!(got.len(), 3);
        let err = build(&snap, &[web], &names(&["default"]), &cfg, true).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn an_svid_being_signed_is_waited_for() {
        let own = domain("example.org");
        let web = entry("web", &[]);
        let mut snap = snapshot(&own, std::slice::from_ref(&web), &[]);
        snap.svids.clear();
        let cfg = SdsConfig::default();
        for n in [&["default"][..], &["spiffe://example.org/web"], &[]] {
            assert_eq!(
                build(&snap, std::slice::from_ref(&web), &names(n), &cfg, true).unwrap(),
                Built::Pending,
                "{n:?}"
            );
        }
        // The bundle alone does not wait.
        assert!(matches!(
            build(&snap, &[web], &names(&["ROOTCA"]), &cfg, true).unwrap(),
            Built::Ready(_)
        ));
    }

    fn node(
        version: Option<(u32, u32)>,
        metadata: Option<prost_types::value::Kind>,
    ) -> core_pb::Node {
        core_pb::Node {
            id: "envoy-1".into(),
            metadata: metadata.map(|k| prost_types::Struct {
                fields: [(
                    DISABLE_SPIFFE_VALIDATION_KEY.to_owned(),
                    prost_types::Value { kind: Some(k) },
                )]
                .into(),
            }),
            user_agent_version_type: version.map(|(major, minor)| {
                core_pb::node::UserAgentVersionType::UserAgentBuildVersion(core_pb::BuildVersion {
                    version: Some(sigil_proto::envoy::r#type::v3::SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    metadata: None,
                })
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_spiffe_validator_follows_envoy_version_config_and_metadata() {
        use prost_types::value::Kind;
        let on = SdsConfig::default();
        let off = SdsConfig {
            disable_spiffe_cert_validation: true,
            ..SdsConfig::default()
        };
        assert!(use_spiffe_validator(None, &on, &mut quiet()));
        assert!(!use_spiffe_validator(None, &off, &mut quiet()));
        assert!(use_spiffe_validator(
            Some(&node(None, None)),
            &on,
            &mut quiet()
        ));
        assert!(use_spiffe_validator(
            Some(&node(Some((1, 18)), None)),
            &on,
            &mut quiet()
        ));
        assert!(use_spiffe_validator(
            Some(&node(Some((2, 0)), None)),
            &on,
            &mut quiet()
        ));
        assert!(!use_spiffe_validator(
            Some(&node(Some((1, 17)), None)),
            &on,
            &mut quiet()
        ));
        let t = Some(Kind::BoolValue(true));
        assert!(!use_spiffe_validator(
            Some(&node(None, t)),
            &on,
            &mut quiet()
        ));
        let f = Some(Kind::StringValue("false".into()));
        assert!(use_spiffe_validator(
            Some(&node(None, f)),
            &off,
            &mut quiet()
        ));
        let junk = Some(Kind::StringValue("maybe".into()));
        assert!(!use_spiffe_validator(
            Some(&node(None, junk)),
            &off,
            &mut quiet()
        ));
    }

    #[test]
    fn requests_are_bounded_and_typed() {
        let mut req = disc::DiscoveryRequest {
            resource_names: vec!["default".into(), String::new(), "default".into()],
            type_url: type_urls::SECRET.into(),
            ..Default::default()
        };
        assert_eq!(requested_names(&req).unwrap(), names(&["default"]));
        req.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        let err = requested_names(&req).unwrap_err();
        assert!(err.message().contains("unsupported type_url"), "{err}");
        req.type_url.clear();
        req.resource_names = (0..=MAX_RESOURCE_NAMES).map(|i| i.to_string()).collect();
        assert!(
            requested_names(&req)
                .unwrap_err()
                .message()
                .contains("at most 64")
        );
        req.resource_names = vec!["x".repeat(MAX_RESOURCE_NAME_LEN + 1)];
        assert!(
            requested_names(&req)
                .unwrap_err()
                .message()
                .contains("at most 2048")
        );
    }

    fn request(n: &[&str], version: &str, nonce: &str) -> disc::DiscoveryRequest {
        disc::DiscoveryRequest {
            version_info: version.into(),
            resource_names: n.iter().map(|s| (*s).to_owned()).collect(),
            type_url: type_urls::SECRET.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn acks_nacks_stale_nonces_and_changes() {
        let own = domain("example.org");
        let web = entry("web", &[]);
        let snap = snapshot(&own, std::slice::from_ref(&web), &[]);
        let metrics = Arc::new(Metrics::default());
        let mut st = StreamState {
            interest: None,
            selectors: web.selectors.clone(),
            cfg: Arc::new(SdsConfig::default()),
            metrics: metrics.clone(),
            node_id: String::new(),
            names: None,
            type_url: type_urls::SECRET.to_owned(),
            spiffe: true,
            version: 0,
            last_nonce: None,
            last_sent: None,
            warnings: LogBudget::new(WARNING_INTERVAL),
        };
        // First request: answered at once.
        let r1 = st
            .on_request(request(&["default"], "", ""), &snap)
            .unwrap()
            .unwrap();
        assert_eq!((r1.version_info.as_str(), r1.resources.len()), ("1", 1));
        assert_eq!(r1.nonce.len(), 16);
        assert_eq!(r1.type_url, type_urls::SECRET);
        // ACK: nothing.
        let ack = request(&["default"], "1", &r1.nonce);
        assert!(st.on_request(ack.clone(), &snap).unwrap().is_none());
        assert!(
            st.respond(&snap).unwrap().is_none(),
            "same content, no push"
        );
        // A stale nonce is ignored, even with other names.
        let stale = request(&["default", "ROOTCA"], "1", "0000");
        assert!(st.on_request(stale, &snap).unwrap().is_none());
        assert_eq!(st.names, Some(names(&["default"])));
        // NACK: counted, nothing resent.
        let mut nack = request(&["default"], "", &r1.nonce);
        nack.error_detail = Some(sigil_proto::google::rpc::Status {
            code: 3,
            message: "bad cert".into(),
            details: vec![],
        });
        assert!(st.on_request(nack, &snap).unwrap().is_none());
        assert_eq!(metrics.sds_nacks.get(), 1);
        // A NACK by version alone (same nonce, older version) counts too.
        assert!(
            st.on_request(request(&["default"], "0", &r1.nonce), &snap)
                .unwrap()
                .is_none()
        );
        assert_eq!(metrics.sds_nacks.get(), 2);
        // A NACK flood with long messages: every NACK is counted, but only
        // the first warning of the interval is logged (one line, clipped).
        for _ in 0..1000 {
            let mut nack = request(&["default"], "", &r1.nonce);
            nack.error_detail = Some(sigil_proto::google::rpc::Status {
                code: 3,
                message: "x".repeat(1000),
                details: vec![],
            });
            assert!(st.on_request(nack, &snap).unwrap().is_none());
        }
        assert_eq!(metrics.sds_nacks.get(), 1002);
        assert_eq!(st.warnings.held_back(), 1001);
        // New names: a new response with a new version and nonce.
        let r2 = st
            .on_request(request(&["default", "ROOTCA"], "1", &r1.nonce), &snap)
            .unwrap()
            .unwrap();
        assert_eq!((r2.version_info.as_str(), r2.resources.len()), ("2", 2));
        assert_ne!(r2.nonce, r1.nonce);
        // Rotation: a new SVID pushes a new version.
        let mut rotated = snapshot(&own, std::slice::from_ref(&web), &[]);
        rotated.svids.insert(web.id.clone(), svid(&own, &web));
        let r3 = st.respond(&rotated).unwrap().unwrap();
        assert_eq!(r3.version_info, "3");
        assert_ne!(r3.nonce, r2.nonce);
        assert_ne!(r3.resources, r2.resources);
        // The old nonce is stale now.
        assert!(
            st.on_request(request(&["ROOTCA"], "2", &r2.nonce), &rotated)
                .unwrap()
                .is_none()
        );
        // Losing the identity ends the stream.
        let err = st.respond(&snapshot(&own, &[], &[])).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    /// Hostile Envoy requests (issue #13): arbitrary type URLs, resource
    /// names and node metadata never panic, every refusal is
    /// `InvalidArgument` with a bounded message, and what is served is only
    /// what was asked for and the caller is entitled to.
    mod hostile {
        use super::*;
        use proptest::prelude::*;
        use prost_types::value::Kind;

        /// Cases per property: bounded so that CI stays fast.
        const CASES: u32 = 256;

        /// Longest refusal message: hostile names are clipped, not echoed.
        const MAX_MESSAGE: usize = 1024;

        /// Names near what the agent serves, and hostile ones.
        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("default".to_owned()),
                Just("ROOTCA".to_owned()),
                Just("ALL".to_owned()),
                Just("spiffe://example.org/web".to_owned()),
                Just("spiffe://example.org".to_owned()),
                Just("spiffe://example.org/api".to_owned()),
                Just("spiffe://other.org".to_owned()),
                Just(String::new()),
                "spiffe://[a-z./]{0,30}",
                any::<String>(),
                "x{2040,2060}",
            ]
        }

        fn kind() -> impl Strategy<Value = Option<Kind>> {
            prop_oneof![
                Just(None),
                any::<bool>().prop_map(|b| Some(Kind::BoolValue(b))),
                prop_oneof![
                    Just("true".to_owned()),
                    Just("F".to_owned()),
                    Just("yes".to_owned()),
                    any::<String>()
                ]
                .prop_map(|s| Some(Kind::StringValue(s))),
                any::<f64>().prop_map(|n| Some(Kind::NumberValue(n))),
                Just(Some(Kind::NullValue(0))),
                Just(Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![]
                }))),
            ]
        }

        fn arbitrary_node() -> impl Strategy<Value = Option<core_pb::Node>> {
            proptest::option::of((
                proptest::option::of((any::<u32>(), any::<u32>())),
                kind(),
                proptest::collection::btree_map(any::<String>(), kind(), 0..3),
            ))
            .prop_map(|n| {
                n.map(|(version, disable, others)| {
                    let mut node = node(version, disable);
                    let fields = node.metadata.get_or_insert_with(Default::default);
                    for (k, v) in others {
                        if k != DISABLE_SPIFFE_VALIDATION_KEY {
                            fields.fields.insert(k, prost_types::Value { kind: v });
                        }
                    }
                    node
                })
            })
        }

        fn request() -> impl Strategy<Value = disc::DiscoveryRequest> {
            (
                prop_oneof![
                    Just(String::new()),
                    Just(type_urls::SECRET.to_owned()),
                    any::<String>(),
                    "y{300,400}",
                ],
                proptest::collection::vec(name(), 0..8),
                0usize..100,
            )
                .prop_map(|(type_url, mut names, pad)| {
                    // Sometimes more names than allowed.
                    if pad > 90 {
                        names.extend((0..MAX_RESOURCE_NAMES).map(|i| format!("n{i}")));
                    }
                    disc::DiscoveryRequest {
                        type_url,
                        resource_names: names,
                        ..Default::default()
                    }
                })
        }

        fn refusal_is_invalid_argument(s: &Status) {
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
            assert!(!s.message().is_empty());
            assert!(
                s.message().len() <= MAX_MESSAGE,
                "{} bytes",
                s.message().len()
            );
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            #[test]
            fn requested_names_are_bounded_or_refused(req in request()) {
                match requested_names(&req) {
                    Ok(set) => {
                        prop_assert!(req.type_url.is_empty() || req.type_url == type_urls::SECRET);
                        prop_assert!(set.len() <= MAX_RESOURCE_NAMES);
                        prop_assert!(set.iter().all(|n| !n.is_empty() && n.len() <= MAX_RESOURCE_NAME_LEN));
                        let asked: BTreeSet<String> =
                            req.resource_names.iter().filter(|n| !n.is_empty()).cloned().collect();
                        prop_assert_eq!(set, asked);
                    }
                    Err(s) => refusal_is_invalid_argument(&s),
                }
            }

            #[test]
            fn node_metadata_only_ever_switches_the_validator(
                node in arbitrary_node(),
                disabled_in_config in any::<bool>(),
            ) {
                let cfg = SdsConfig {
                    disable_spiffe_cert_validation: disabled_in_config,
                    ..SdsConfig::default()
                };
                let spiffe = use_spiffe_validator(node.as_ref(), &cfg, &mut quiet());
                let set = node
                    .as_ref()
                    .and_then(|n| n.metadata.as_ref())
                    .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION_KEY))
                    .and_then(|v| match &v.kind {
                        Some(Kind::BoolValue(b)) => Some(*b),
                        Some(Kind::StringValue(s)) => parse_bool(s),
                        _ => None,
                    });
                // A non-boolean value is ignored: the configuration decides.
                if set.unwrap_or(disabled_in_config) {
                    prop_assert!(!spiffe);
                }
                let old_envoy = matches!(
                    node.as_ref().and_then(|n| n.user_agent_version_type.as_ref()),
                    Some(core_pb::node::UserAgentVersionType::UserAgentBuildVersion(b))
                        if b.version.as_ref().is_some_and(|v| (v.major_number, v.minor_number) < (1, 18))
                );
                if old_envoy {
                    prop_assert!(!spiffe);
                }
                if set == Some(false) && !old_envoy {
                    prop_assert!(spiffe);
                }
            }
        }

        /// One snapshot for every case: minting its CA per case is slow.
        #[test]
        fn served_secrets_are_requested_and_the_callers_own() {
            let own = domain("example.org");
            let web = entry("web", &[]);
            let snap = snapshot(&own, std::slice::from_ref(&web), &[]);
            let cfg = SdsConfig::default();
            let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
                failure_persistence: None,
                ..ProptestConfig::with_cases(CASES)
            });
            let outcome = runner.run(&(request(), arbitrary_node()), |(req, node)| {
                let names = match requested_names(&req) {
                    Ok(n) => n,
                    Err(s) => {
                        refusal_is_invalid_argument(&s);
                        return Ok(());
                    }
                };
                let spiffe = use_spiffe_validator(node.as_ref(), &cfg, &mut quiet());
                match build(&snap, std::slice::from_ref(&web), &names, &cfg, spiffe) {
                    Ok(Built::Ready(secrets)) => {
                        for any in &secrets {
                            let s = decode(any);
                            prop_assert!(
                                names.is_empty() || names.contains(&s.name),
                                "{} not asked for",
                                s.name
                            );
                            if let Some(tls_pb::secret::Type::TlsCertificate(_)) = s.r#type {
                                prop_assert!(
                                    s.name == cfg.default_svid_name
                                        || s.name == "spiffe://example.org/web",
                                    "certificate {} is not the caller's",
                                    s.name
                                );
                            }
                        }
                    }
                    Ok(Built::Pending) => {}
                    // Only the all-bundles context needs the SPIFFE validator.
                    Err(s) if s.code() == tonic::Code::Internal => {
                        prop_assert!(!spiffe && names.contains(&cfg.default_all_bundles_name));
                    }
                    Err(s) => refusal_is_invalid_argument(&s),
                }
                Ok(())
            });
            assert!(outcome.is_ok(), "{outcome:?}");
        }
    }
}
