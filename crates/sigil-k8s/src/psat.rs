//! Node attestation with projected service account tokens (PSAT).
//!
//! The agent runs as a DaemonSet pod whose pod spec projects a service account
//! token with the sigil server as audience; it reads the token afresh for each
//! attestation ([`read_token`]) because the kubelet rotates it. The server
//! checks the token with a [`PsatVerifier`] per cluster: by a TokenReview or
//! offline against the cluster's JWKS ([`Verification`]), then the service
//! account against the allow list, then the agent's pod and node through the
//! API server. The result is the agent ID path and the node selectors
//! ([`PsatAttestation`]).
//!
//! Selector names follow SPIRE's `k8s_psat` attestor so that registrations
//! carry over; `k8s_psat:region:` and `k8s_psat:zone:` are sigil's location
//! selectors, taken only from node labels that a kubelet cannot forge (see
//! [`kubelet_can_set_label`]). The whole flow, the RBAC it needs and the label
//! rule are described in `docs/kubernetes-psat.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use sigil_svid::jwks::VerifyingKey;
use sigil_types::{Selector, Selectors};

/// The selector type of every node selector this attestor produces.
pub const SELECTOR_TYPE: &str = "k8s_psat";

/// The attestation method's segment in agent IDs
/// (`spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node UID>`).
pub const METHOD: &str = "k8s_psat";

/// The token audience the server expects unless a cluster names another.
pub const DEFAULT_AUDIENCE: &str = "sigil-server";

/// Where the agent finds its projected token unless configured otherwise
/// (projected volume mounted at `/var/run/secrets/tokens`, path `sigil-agent`).
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/sigil-agent";

/// The node labels used for location selectors unless a cluster names others.
pub const DEFAULT_TRUSTED_NODE_LABEL_KEYS: [&str; 2] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

/// The smallest RSA key accepted in a JWKS (the rule lives in
/// [`sigil_svid::jwks`]).
pub use sigil_svid::jwks::MIN_RSA_BITS;

/// The algorithms Kubernetes signs service-account tokens with, the only
/// ones accepted from an offline JWKS.
const OFFLINE_ALGS: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256, Algorithm::ES384];

/// Projected tokens are 1–2 KiB; anything far larger is not one, and the cap
/// keeps a wrong path or a hostile caller from costing memory and parse time.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Clock skew tolerated on `exp` and `nbf`; the API server's own validator
/// allows the same 60 s.
const LEEWAY_SECS: u64 = 60;

/// Upper bound on each API server call, so that a black-holed API server fails
/// (TokenReview mode) or degrades (offline mode) an attestation instead of
/// holding it for the kube client's 30 s connect timeout plus retries.
const API_TIMEOUT: Duration = Duration::from_secs(10);

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";

/// Labels a kubelet may set on its own Node object under the NodeRestriction
/// admission plugin (`k8s.io/kubelet/pkg/apis` `kubeletLabels`), besides the
/// `kubelet.kubernetes.io/` and `node.kubernetes.io/` namespaces.
const KUBELET_SETTABLE_LABELS: [&str; 11] = [
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

/// Why reading a token or attesting an agent failed.
///
/// Every message is safe to return to the agent: it names only what the
/// agent's own token already says (its service account, pod and node) and the
/// cluster profile, never the token, API server addresses or internal errors,
/// which are logged on the server instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PsatError {
    /// The agent could not read its token file.
    #[error("cannot read the service account token {path}: {source}")]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The agent's token file is empty or far larger than a token.
    #[error("service account token file {path} {reason}")]
    BadTokenFile {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A cluster configuration was rejected when building its verifier.
    #[error("PSAT cluster {cluster:?}: {key}: {reason}")]
    Config {
        /// The cluster profile name.
        cluster: String,
        /// The configuration key at fault.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The token is malformed, not a pod-bound service account token, signed
    /// by an unknown key or with a bad signature, from another issuer, or
    /// rejected by the TokenReview.
    #[error("invalid service account token: {reason}")]
    InvalidToken {
        /// Why, in words that reveal nothing the caller does not know.
        reason: &'static str,
    },
    /// The token's `aud` does not include the audience this cluster expects
    /// (or the TokenReview did not confirm it).
    #[error("the token's audience does not include {expected:?}")]
    WrongAudience {
        /// The audience the server expects.
        expected: String,
    },
    /// The token's `exp` has passed.
    #[error("the token expired at {expired_at} (Unix time); read a fresh one")]
    Expired {
        /// The token's `exp` in Unix seconds.
        expired_at: u64,
    },
    /// The token's `nbf` is in the future (or the clocks disagree).
    #[error("the token is not valid yet; check the clocks of node and server")]
    NotYetValid,
    /// The token is a service account token but not bound to a pod (a legacy
    /// Secret token or a node- or secret-bound one).
    #[error("the token is not bound to a pod; use a projected service account token")]
    NotPodBound,
    /// Offline verification without a reachable API server needs the node the
    /// token was issued on, which only Kubernetes 1.30+ tokens carry.
    #[error(
        "the token names no node (kubernetes.io.node needs Kubernetes 1.30+) and the API server \
         cannot be asked"
    )]
    NoNodeBinding,
    /// The token's service account is not in the cluster's allow list.
    #[error("service account {service_account} may not attest agents in cluster {cluster:?}")]
    ServiceAccountNotAllowed {
        /// `namespace:name` of the token's service account.
        service_account: String,
        /// The cluster profile name.
        cluster: String,
    },
    /// The pod the token is bound to does not exist (deleted).
    #[error("pod {namespace}/{name} named by the token does not exist")]
    PodNotFound {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
    /// A pod of that name exists but is not the one the token was issued to:
    /// the original was deleted and the name reused.
    #[error("pod {namespace}/{name} was replaced since the token was issued (UID differs)")]
    PodUidMismatch {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
    /// The pod the token is bound to is not scheduled to any node (a token
    /// requested through the TokenRequest API for a pending pod).
    #[error("pod {namespace}/{name} is not scheduled to a node")]
    PodNotScheduled {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
    /// The pod runs on another node than the one the token names.
    #[error(
        "pod {namespace}/{name} is on node {pod_node:?}, not on {token_node:?} as the token says"
    )]
    PodNotOnNode {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The node named in the token.
        token_node: String,
        /// The node in the pod's spec.
        pod_node: String,
    },
    /// The pod's node does not exist.
    #[error("node {name} does not exist")]
    NodeNotFound {
        /// The node's name.
        name: String,
    },
    /// The node exists but is not the one the token was issued on: it was
    /// deleted and registered again.
    #[error("node {name} was replaced since the token was issued (UID differs)")]
    NodeUidMismatch {
        /// The node's name.
        name: String,
    },
    /// The API server could not be reached, timed out or was overloaded
    /// (5xx, 429); the agent should try again later.
    #[error("the Kubernetes API server of cluster {cluster:?} is unreachable; try again later")]
    ApiUnavailable {
        /// The cluster profile name.
        cluster: String,
    },
    /// The API server answered with an unexpected error, typically 401/403
    /// because the server's RBAC is missing; the detail is in the server log.
    #[error("the Kubernetes API server of cluster {cluster:?} refused the server's request{}", .status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    ApiFailed {
        /// The cluster profile name.
        cluster: String,
        /// The HTTP status, when the API server sent one.
        status: Option<u16>,
    },
    /// A value from the token or the API server cannot be used in a selector
    /// or a SPIFFE ID path (control characters, characters outside the path
    /// alphabet, or too long).
    #[error("the {field} cannot be used in a selector or SPIFFE ID")]
    UnusableValue {
        /// Which value.
        field: &'static str,
    },
}

impl PsatError {
    /// Whether the failure is transient on the server's side (API server
    /// unreachable), so the agent should retry rather than give up: the
    /// server maps this to `Unavailable`, everything else from
    /// [`PsatVerifier::attest`] to `PermissionDenied`.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::ApiUnavailable { .. })
    }
}

/// Agent side: reads the projected service account token at `path`.
///
/// Call it for every attestation: the kubelet replaces the file (atomically)
/// long before the token expires, so a token read once goes stale.
pub fn read_token(path: &Path) -> Result<String, PsatError> {
    let file_error = |source| PsatError::TokenFile {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(file_error)?;
    let mut text = String::new();
    file.take(MAX_TOKEN_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(file_error)?;
    if text.len() > MAX_TOKEN_BYTES {
        return Err(PsatError::BadTokenFile {
            path: path.to_owned(),
            reason: "is larger than 16 KiB; it is not a service account token",
        });
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(PsatError::BadTokenFile {
            path: path.to_owned(),
            reason: "is empty",
        });
    }
    Ok(token.to_owned())
}

/// How the server verifies a cluster's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verification {
    /// Ask the API server (`POST …/tokenreviews`); this also proves the token
    /// was not revoked (its pod, service account and node still exist). Needs
    /// a client; pods and nodes are then always read.
    TokenReview,
    /// Verify the signature locally against the cluster's JWKS (served by the
    /// API server at `/openid/v1/jwks`), so attestation keeps working while
    /// the API server is down. With a client, the pod and node are still read
    /// when the API server answers (see [`PsatVerifier::attest`]).
    OfflineJwks {
        /// The JWKS document (`{"keys":[…]}`), RSA (≥ 2048 bits) and EC
        /// P-256/P-384 keys.
        jwks_json: String,
        /// The exact `iss` of the cluster's tokens (`--service-account-issuer`).
        issuer: String,
    },
}

/// The server's configuration for one cluster profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster profile name, used in selectors and agent IDs; it must be a
    /// valid SPIFFE ID path segment (letters, digits, `.`, `-`, `_`).
    pub name: String,
    /// Service accounts whose tokens may attest agents, as `namespace:name`.
    pub service_account_allow_list: Vec<String>,
    /// The audience the agent's projected token must carry; dedicated to
    /// sigil, never the API server's own audience.
    pub audience: String,
    /// How tokens are verified.
    pub verification: Verification,
    /// Node labels that become location selectors (`k8s_psat:region:`,
    /// `k8s_psat:zone:`); the part after the last `/` says which (`region` or
    /// `zone`). Labels a kubelet can set itself count only when the node's
    /// `spec.providerID` confirms them (see `docs/kubernetes-psat.md`).
    pub trusted_node_label_keys: Vec<String>,
    /// Node labels copied verbatim into `k8s_psat:agent_node_label:<k>:<v>`
    /// (SPIRE's `allowed_node_label_keys`; no trust check, as in SPIRE).
    pub allowed_node_label_keys: Vec<String>,
    /// Pod labels copied into `k8s_psat:agent_pod_label:<k>:<v>` (SPIRE's
    /// `allowed_pod_label_keys`).
    pub allowed_pod_label_keys: Vec<String>,
}

impl ClusterConfig {
    /// A cluster profile with the default audience and trusted label keys, an
    /// empty allow list (which [`PsatVerifier::new`] rejects until filled) and
    /// no label selectors.
    pub fn new(name: impl Into<String>, verification: Verification) -> Self {
        Self {
            name: name.into(),
            service_account_allow_list: Vec::new(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            verification,
            trusted_node_label_keys: DEFAULT_TRUSTED_NODE_LABEL_KEYS
                .iter()
                .map(|k| (*k).to_owned())
                .collect(),
            allowed_node_label_keys: Vec::new(),
            allowed_pod_label_keys: Vec::new(),
        }
    }
}

/// What a successful attestation establishes about the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsatAttestation {
    /// The agent ID path, `/sigil/agent/k8s_psat/<cluster>/<node UID>`.
    pub agent_path: String,
    /// The node selectors (`k8s_psat:…`).
    pub selectors: Selectors,
    /// The token's expiry: the agent must attest again with a fresh token
    /// after this if it loses its SVID.
    pub expires_at: Option<SystemTime>,
    /// Whether the API server confirmed the pod and node (always with
    /// TokenReview; offline only when it answered). When false, the node IP,
    /// label and location selectors are absent.
    pub api_checked: bool,
}

/// Which location selector a trusted label feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LocationKind {
    Region,
    Zone,
}

impl LocationKind {
    fn of_key(key: &str) -> Option<Self> {
        match key.rsplit('/').next() {
            Some("region") => Some(Self::Region),
            Some("zone") => Some(Self::Zone),
            _ => None,
        }
    }

    fn selector_name(self) -> &'static str {
        match self {
            Self::Region => "region",
            Self::Zone => "zone",
        }
    }
}

/// Offline verification material.
struct OfflineKeys {
    issuer: String,
    keys: Vec<VerifyingKey>,
}

/// Verifies agent tokens for one cluster profile.
pub struct PsatVerifier {
    cluster: ClusterConfig,
    client: Option<kube::Client>,
    allow_list: BTreeSet<String>,
    trusted_keys: Vec<(String, LocationKind)>,
    offline: Option<OfflineKeys>,
}

impl fmt::Debug for PsatVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PsatVerifier")
            .field("cluster", &self.cluster.name)
            .field(
                "verification",
                &match &self.offline {
                    None => "token_review".to_owned(),
                    Some(o) => format!("offline_jwks ({} keys)", o.keys.len()),
                },
            )
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// What the token (TokenReview answer or verified claims) says about the agent.
#[derive(Debug)]
struct TokenIdentity {
    namespace: String,
    service_account: String,
    pod_name: String,
    pod_uid: String,
    node_name: Option<String>,
    node_uid: Option<String>,
    expires_at: Option<u64>,
}

/// What the API server says about the agent's pod and node.
#[derive(Debug)]
struct ApiFacts {
    node_name: String,
    node_uid: String,
    host_ip: Option<String>,
    pod_labels: BTreeMap<String, String>,
    node_labels: BTreeMap<String, String>,
    provider_id: Option<String>,
}

impl PsatVerifier {
    /// Checks the cluster configuration (and parses its JWKS) and builds the
    /// verifier. `client` may be `None` only with [`Verification::OfflineJwks`],
    /// which then never calls the API server.
    pub fn new(cluster: ClusterConfig, client: Option<kube::Client>) -> Result<Self, PsatError> {
        let bad = |key: &'static str, reason: String| PsatError::Config {
            cluster: cluster.name.clone(),
            key,
            reason,
        };
        check_cluster_name(&cluster.name).map_err(|r| bad("name", r))?;

        if cluster.service_account_allow_list.is_empty() {
            return Err(bad(
                "service_account_allow_list",
                "must name at least one service account (namespace:name)".to_owned(),
            ));
        }
        let mut allow_list = BTreeSet::new();
        for entry in &cluster.service_account_allow_list {
            match entry.split_once(':') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => {
                    allow_list.insert(entry.clone());
                }
                _ => {
                    return Err(bad(
                        "service_account_allow_list",
                        format!("{entry:?} is not of the form namespace:name"),
                    ));
                }
            }
        }

        if cluster.audience.is_empty() || cluster.audience.chars().any(char::is_control) {
            return Err(bad("audience", "must be a non-empty string".to_owned()));
        }

        let mut trusted_keys = Vec::new();
        for key in &cluster.trusted_node_label_keys {
            let Some(kind) = LocationKind::of_key(key) else {
                return Err(bad(
                    "trusted_node_label_keys",
                    format!(
                        "{key:?} names neither a region nor a zone (the part after the last '/' \
                         must be \"region\" or \"zone\")"
                    ),
                ));
            };
            if kubelet_can_set_label(key) {
                // Allowed, but worth saying once: such a label only counts when
                // the node's providerID confirms it.
                tracing::info!(
                    cluster = %cluster.name,
                    label = %key,
                    "a kubelet can set this node label itself; it becomes a location selector \
                     only when spec.providerID confirms its value"
                );
            }
            trusted_keys.push((key.clone(), kind));
        }
        for (field, keys) in [
            ("allowed_node_label_keys", &cluster.allowed_node_label_keys),
            ("allowed_pod_label_keys", &cluster.allowed_pod_label_keys),
        ] {
            if keys.iter().any(|k| k.is_empty()) {
                return Err(bad(field, "holds an empty label key".to_owned()));
            }
        }

        let offline = match &cluster.verification {
            Verification::TokenReview => {
                if client.is_none() {
                    return Err(bad(
                        "verification",
                        "token_review needs a Kubernetes API client".to_owned(),
                    ));
                }
                None
            }
            Verification::OfflineJwks { jwks_json, issuer } => {
                if issuer.is_empty() {
                    return Err(bad("issuer", "must not be empty".to_owned()));
                }
                let keys = sigil_svid::jwks::parse_jwks(jwks_json, OFFLINE_ALGS)
                    .map_err(|e| bad("jwks", e.to_string()))?;
                Some(OfflineKeys {
                    issuer: issuer.clone(),
                    keys,
                })
            }
        };

        Ok(Self {
            cluster,
            client,
            allow_list,
            trusted_keys,
            offline,
        })
    }

    /// The cluster configuration this verifier was built from.
    pub fn cluster(&self) -> &ClusterConfig {
        &self.cluster
    }

    /// Verifies an agent's token and derives its agent ID path and selectors.
    ///
    /// TokenReview mode: cheap local checks of `exp` and `aud` (they can only
    /// reject), the TokenReview, the allow list, then `GET` pod (its UID must
    /// be the token's) and node (its name and UID must be the token's when the
    /// token carries them). Any API failure fails the attestation.
    ///
    /// Offline mode: signature against the JWKS, `iss`, `aud`, `exp`/`nbf`,
    /// the `kubernetes.io` claims, the allow list. Then, with a client, the
    /// same pod and node reads; an authoritative answer counts (a deleted pod
    /// fails the attestation even offline), but an unreachable API server only
    /// degrades the result to the selectors the token proves (no node IP,
    /// labels or location), which needs the token's node claims.
    pub async fn attest(&self, token: &str) -> Result<PsatAttestation, PsatError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(PsatError::InvalidToken {
                reason: "it is empty",
            });
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(PsatError::InvalidToken {
                reason: "it is larger than 16 KiB",
            });
        }
        match (&self.offline, &self.client) {
            (None, Some(client)) => {
                let claims = peek_claims(token)?;
                check_times(&claims, unix_now())?;
                if !claims.audiences().any(|a| a == self.cluster.audience) {
                    return Err(self.wrong_audience());
                }
                let identity = self.token_review(client, token, &claims).await?;
                self.check_allowed(&identity)?;
                let facts = self.read_pod_and_node(client, &identity).await?;
                self.conclude(&identity, Some(&facts))
            }
            (Some(offline), client) => {
                let identity = self.verify_offline(offline, token)?;
                self.check_allowed(&identity)?;
                let facts = match client {
                    None => None,
                    Some(client) => match self.read_pod_and_node(client, &identity).await {
                        Ok(facts) => Some(facts),
                        Err(PsatError::ApiUnavailable { .. }) => {
                            tracing::warn!(
                                cluster = %self.cluster.name,
                                pod = %format_args!("{}/{}", identity.namespace, identity.pod_name),
                                "API server unreachable: attesting from the verified token alone \
                                 (no node IP, label or location selectors)"
                            );
                            None
                        }
                        Err(e) => return Err(e),
                    },
                };
                self.conclude(&identity, facts.as_ref())
            }
            // `new` refuses TokenReview without a client.
            (None, None) => Err(PsatError::Config {
                cluster: self.cluster.name.clone(),
                key: "verification",
                reason: "token_review needs a Kubernetes API client".to_owned(),
            }),
        }
    }

    fn wrong_audience(&self) -> PsatError {
        PsatError::WrongAudience {
            expected: self.cluster.audience.clone(),
        }
    }

    fn check_allowed(&self, id: &TokenIdentity) -> Result<(), PsatError> {
        let sa = format!("{}:{}", id.namespace, id.service_account);
        if self.allow_list.contains(&sa) {
            Ok(())
        } else {
            Err(PsatError::ServiceAccountNotAllowed {
                service_account: sa,
                cluster: self.cluster.name.clone(),
            })
        }
    }

    async fn token_review(
        &self,
        client: &kube::Client,
        token: &str,
        claims: &Claims,
    ) -> Result<TokenIdentity, PsatError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.cluster.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(client.clone());
        let answer = self
            .call(
                "create tokenreview",
                api.create(&PostParams::default(), &review),
            )
            .await?;
        let status = answer.status.unwrap_or_default();
        if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
            // The API server's words may describe its configuration; keep them in the log.
            tracing::info!(cluster = %self.cluster.name, %error, "TokenReview rejected an agent token");
            return Err(PsatError::InvalidToken {
                reason: "the Kubernetes API server rejected it",
            });
        }
        if status.authenticated != Some(true) {
            return Err(PsatError::InvalidToken {
                reason: "the Kubernetes API server did not authenticate it",
            });
        }
        // An authenticator that ignores spec.audiences answers without them;
        // accepting that would accept tokens meant for anyone (SPIRE does the same check).
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.cluster.audience)
        {
            return Err(self.wrong_audience());
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) =
            parse_service_account(&username).ok_or(PsatError::InvalidToken {
                reason: "it is not a service account token",
            })?;
        let extra = user.extra.unwrap_or_default();
        let (Some(pod_name), Some(pod_uid)) = (
            single_extra(&extra, EXTRA_POD_NAME)?,
            single_extra(&extra, EXTRA_POD_UID)?,
        ) else {
            return Err(PsatError::NotPodBound);
        };
        let review_node_name = single_extra(&extra, EXTRA_NODE_NAME)?;
        let review_node_uid = single_extra(&extra, EXTRA_NODE_UID)?;

        // The API server verified the signature, so the claims peeked at
        // before are the token's own and must agree with its answer; a
        // disagreement means an authenticator other than the service account
        // one answered, which must not attest agents.
        let claimed = claims.kubernetes.as_ref();
        let claimed_pod = claimed.and_then(|k| k.pod.as_ref());
        let claimed_node = claimed.and_then(|k| k.node.as_ref());
        let disagrees = claims.sub.as_deref() != Some(username.as_str())
            || claimed_pod.is_some_and(|p| p.uid != pod_uid || p.name != pod_name)
            || claimed_node.is_some_and(|n| {
                review_node_uid.as_ref().is_some_and(|u| *u != n.uid)
                    || review_node_name.as_ref().is_some_and(|m| *m != n.name)
            });
        if disagrees {
            return Err(PsatError::InvalidToken {
                reason: "its claims disagree with the TokenReview",
            });
        }
        let (node_name, node_uid) = match (review_node_name, review_node_uid) {
            (Some(name), Some(uid)) => (Some(name), Some(uid)),
            _ => match claimed_node.filter(|n| !n.name.is_empty() && !n.uid.is_empty()) {
                Some(n) => (Some(n.name.clone()), Some(n.uid.clone())),
                None => (None, None),
            },
        };
        Ok(TokenIdentity {
            namespace,
            service_account,
            pod_name,
            pod_uid,
            node_name,
            node_uid,
            expires_at: claims.exp,
        })
    }

    fn verify_offline(
        &self,
        offline: &OfflineKeys,
        token: &str,
    ) -> Result<TokenIdentity, PsatError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| PsatError::InvalidToken {
            reason: "it is not a well-formed JWT",
        })?;
        if !OFFLINE_ALGS.contains(&header.alg) {
            return Err(PsatError::InvalidToken {
                reason: "it is not signed with RS256, ES256 or ES384",
            });
        }
        let candidates: Vec<&VerifyingKey> = offline
            .keys
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .collect();
        if candidates.is_empty() {
            return Err(PsatError::InvalidToken {
                reason: "it is signed by a key that is not in the cluster's JWKS",
            });
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.cluster.audience]);
        validation.set_issuer(&[&offline.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);

        for candidate in candidates {
            match jsonwebtoken::decode::<Claims>(token, &candidate.key, &validation) {
                Ok(data) => return identity_from_claims(data.claims),
                // Another key of the same algorithm (and kid) may have signed it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
                Err(e) => return Err(self.map_jwt_error(e.kind(), token)),
            }
        }
        Err(PsatError::InvalidToken {
            reason: "its signature does not verify with the cluster's JWKS",
        })
    }

    fn map_jwt_error(&self, kind: &ErrorKind, token: &str) -> PsatError {
        match kind {
            // jsonwebtoken checks claims only after the signature, so the
            // token is genuine here and its exp is worth reporting.
            ErrorKind::ExpiredSignature => PsatError::Expired {
                expired_at: peek_claims(token).ok().and_then(|c| c.exp).unwrap_or(0),
            },
            ErrorKind::ImmatureSignature => PsatError::NotYetValid,
            ErrorKind::InvalidAudience => self.wrong_audience(),
            ErrorKind::InvalidIssuer => PsatError::InvalidToken {
                reason: "it was issued by another issuer than this cluster's",
            },
            ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                PsatError::InvalidToken {
                    reason: "it lacks exp, iss, aud or sub: not a projected service account token",
                }
            }
            ErrorKind::Json(_) | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                PsatError::InvalidToken {
                    reason: "its claims are not those of a service account token",
                }
            }
            _ => PsatError::InvalidToken {
                reason: "its signature does not verify with the cluster's JWKS",
            },
        }
    }

    async fn read_pod_and_node(
        &self,
        client: &kube::Client,
        id: &TokenIdentity,
    ) -> Result<ApiFacts, PsatError> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &id.namespace);
        let pod = self
            .call("get pod", pods.get_opt(&id.pod_name))
            .await?
            .ok_or_else(|| PsatError::PodNotFound {
                namespace: id.namespace.clone(),
                name: id.pod_name.clone(),
            })?;
        // A pod deleted and recreated under the same name (StatefulSet,
        // static pod) must not lend its node to the old pod's token.
        if pod.metadata.uid.as_deref() != Some(id.pod_uid.as_str()) {
            return Err(PsatError::PodUidMismatch {
                namespace: id.namespace.clone(),
                name: id.pod_name.clone(),
            });
        }
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if node_name.is_empty() {
            return Err(PsatError::PodNotScheduled {
                namespace: id.namespace.clone(),
                name: id.pod_name.clone(),
            });
        }
        if let Some(token_node) = id.node_name.as_ref().filter(|n| **n != node_name) {
            return Err(PsatError::PodNotOnNode {
                namespace: id.namespace.clone(),
                name: id.pod_name.clone(),
                token_node: token_node.clone(),
                pod_node: node_name,
            });
        }
        let nodes: Api<Node> = Api::all(client.clone());
        let node = self
            .call("get node", nodes.get_opt(&node_name))
            .await?
            .ok_or_else(|| PsatError::NodeNotFound {
                name: node_name.clone(),
            })?;
        let node_uid = node
            .metadata
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or(PsatError::UnusableValue { field: "node UID" })?;
        if id.node_uid.as_ref().is_some_and(|u| *u != node_uid) {
            return Err(PsatError::NodeUidMismatch { name: node_name });
        }
        Ok(ApiFacts {
            node_name,
            node_uid,
            host_ip: pod
                .status
                .and_then(|s| s.host_ip)
                .filter(|ip| !ip.is_empty()),
            pod_labels: pod.metadata.labels.unwrap_or_default(),
            node_labels: node.metadata.labels.unwrap_or_default(),
            provider_id: node
                .spec
                .and_then(|s| s.provider_id)
                .filter(|p| !p.is_empty()),
        })
    }

    /// Runs one API call with a deadline and sorts its failure into
    /// "unavailable" (retry later; offline mode degrades) or "failed".
    async fn call<T>(
        &self,
        what: &'static str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, PsatError> {
        let cluster = &self.cluster.name;
        match tokio::time::timeout(API_TIMEOUT, request).await {
            Ok(Ok(value)) => Ok(value),
            Err(_) => {
                tracing::warn!(%cluster, what, timeout = ?API_TIMEOUT, "Kubernetes API call timed out");
                Err(PsatError::ApiUnavailable {
                    cluster: cluster.clone(),
                })
            }
            Ok(Err(error)) => {
                tracing::warn!(%cluster, what, %error, "Kubernetes API call failed");
                match &error {
                    kube::Error::Api(status) if status.code == 429 || status.code >= 500 => {
                        Err(PsatError::ApiUnavailable {
                            cluster: cluster.clone(),
                        })
                    }
                    kube::Error::Api(status) => Err(PsatError::ApiFailed {
                        cluster: cluster.clone(),
                        status: Some(status.code),
                    }),
                    kube::Error::HyperError(_) | kube::Error::Service(_) => {
                        Err(PsatError::ApiUnavailable {
                            cluster: cluster.clone(),
                        })
                    }
                    _ => Err(PsatError::ApiFailed {
                        cluster: cluster.clone(),
                        status: None,
                    }),
                }
            }
        }
    }

    /// Builds the agent ID path and the selectors.
    fn conclude(
        &self,
        id: &TokenIdentity,
        facts: Option<&ApiFacts>,
    ) -> Result<PsatAttestation, PsatError> {
        let (node_name, node_uid) = match facts {
            Some(f) => (f.node_name.as_str(), f.node_uid.as_str()),
            None => match (&id.node_name, &id.node_uid) {
                (Some(name), Some(uid)) => (name.as_str(), uid.as_str()),
                _ => return Err(PsatError::NoNodeBinding),
            },
        };

        let mut selectors = Selectors::new();
        let mut add = |field: &'static str, value: String| -> Result<(), PsatError> {
            let selector = Selector::new(SELECTOR_TYPE, &value)
                .map_err(|_| PsatError::UnusableValue { field })?;
            selectors.insert(selector);
            Ok(())
        };
        add("cluster name", format!("cluster:{}", self.cluster.name))?;
        add("namespace", format!("agent_ns:{}", id.namespace))?;
        add(
            "service account",
            format!("agent_sa:{}", id.service_account),
        )?;
        add("pod name", format!("agent_pod_name:{}", id.pod_name))?;
        add("pod UID", format!("agent_pod_uid:{}", id.pod_uid))?;
        add("node name", format!("agent_node_name:{node_name}"))?;
        add("node UID", format!("agent_node_uid:{node_uid}"))?;
        if let Some(f) = facts {
            if let Some(ip) = &f.host_ip {
                add("node IP", format!("agent_node_ip:{ip}"))?;
            }
            for key in &self.cluster.allowed_node_label_keys {
                if let Some(value) = f.node_labels.get(key) {
                    add("node label", format!("agent_node_label:{key}:{value}"))?;
                }
            }
            for key in &self.cluster.allowed_pod_label_keys {
                if let Some(value) = f.pod_labels.get(key) {
                    add("pod label", format!("agent_pod_label:{key}:{value}"))?;
                }
            }
            for (kind, value) in self.locations(node_name, f) {
                add(
                    "location label",
                    format!("{}:{value}", kind.selector_name()),
                )?;
            }
        }

        let agent_path = format!(
            "{}/{METHOD}/{}/{node_uid}",
            sigil_types::AGENT_PATH_PREFIX,
            self.cluster.name
        );
        sigil_types::spiffe_id::validate_path(&agent_path)
            .map_err(|_| PsatError::UnusableValue { field: "node UID" })?;

        Ok(PsatAttestation {
            agent_path,
            selectors,
            expires_at: id
                .expires_at
                .map(|exp| UNIX_EPOCH + Duration::from_secs(exp)),
            api_checked: facts.is_some(),
        })
    }

    /// The region and zone the node's trusted labels establish.
    fn locations(&self, node_name: &str, facts: &ApiFacts) -> Vec<(LocationKind, String)> {
        let provider_zone = facts.provider_id.as_deref().and_then(provider_zone);
        let mut found: BTreeMap<LocationKind, BTreeSet<&str>> = BTreeMap::new();
        for (key, kind) in &self.trusted_keys {
            let Some(value) = facts.node_labels.get(key).map(String::as_str) else {
                continue;
            };
            if value.is_empty() {
                continue;
            }
            let confirmed = !kubelet_can_set_label(key)
                || provider_zone.is_some_and(|zone| match kind {
                    LocationKind::Zone => zone == value,
                    LocationKind::Region => zone_is_in_region(zone, value),
                });
            if confirmed {
                found.entry(*kind).or_default().insert(value);
            } else {
                tracing::warn!(
                    cluster = %self.cluster.name,
                    node = %node_name,
                    label = %key,
                    %value,
                    provider_id = facts.provider_id.as_deref().unwrap_or(""),
                    "node label is settable by the kubelet and not confirmed by spec.providerID; \
                     not used as a location"
                );
            }
        }
        let mut out = Vec::new();
        for (kind, values) in found {
            if values.len() == 1 {
                out.extend(values.into_iter().map(|v| (kind, v.to_owned())));
            } else {
                // Two trusted sources disagree; naming either would be a guess.
                tracing::warn!(
                    cluster = %self.cluster.name,
                    node = %node_name,
                    location = kind.selector_name(),
                    values = ?values,
                    "trusted node labels disagree; no location selector of this kind"
                );
            }
        }
        out
    }
}

/// Whether a kubelet may set this label on its own Node object under the
/// NodeRestriction admission plugin, and so whether a compromised node can
/// claim any value for it.
///
/// Kubelets may set every label outside the `kubernetes.io` and `k8s.io`
/// namespaces, those under `kubelet.kubernetes.io/` and `node.kubernetes.io/`,
/// and a fixed list that includes `topology.kubernetes.io/region` and
/// `topology.kubernetes.io/zone`. They may not set `node-restriction.kubernetes.io/`
/// labels or other `kubernetes.io`/`k8s.io` ones; only the control plane and
/// administrators can, so those are trustworthy facts about a node.
pub fn kubelet_can_set_label(key: &str) -> bool {
    let namespace = key.split_once('/').map_or("", |(ns, _)| ns);
    let within = |domain: &str| {
        namespace == domain
            || namespace
                .strip_suffix(domain)
                .is_some_and(|rest| rest.ends_with('.'))
    };
    if within("node-restriction.kubernetes.io") {
        return false;
    }
    if !(within("kubernetes.io") || within("k8s.io")) {
        return true;
    }
    KUBELET_SETTABLE_LABELS.contains(&key)
        || within("kubelet.kubernetes.io")
        || within("node.kubernetes.io")
}

/// The availability zone a node's `spec.providerID` names, for the providers
/// whose IDs carry one: AWS `aws:///<zone>/<instance>` and GCE
/// `gce://<project>/<zone>/<instance>`. The API server refuses to change a set
/// providerID, so unlike the topology labels a running kubelet cannot rewrite it.
fn provider_zone(provider_id: &str) -> Option<&str> {
    if let Some(rest) = provider_id.strip_prefix("aws://") {
        let parts: Vec<&str> = rest.split('/').collect();
        return match parts.as_slice() {
            ["", zone, instance] if !zone.is_empty() && !instance.is_empty() => Some(zone),
            _ => None,
        };
    }
    if let Some(rest) = provider_id.strip_prefix("gce://") {
        let parts: Vec<&str> = rest.split('/').collect();
        return match parts.as_slice() {
            [project, zone, instance]
                if !project.is_empty() && !zone.is_empty() && !instance.is_empty() =>
            {
                Some(zone)
            }
            _ => None,
        };
    }
    None
}

/// Whether `zone` lies in `region` by the AWS and GCE naming rules:
/// `us-east-1` + `a`, `us-west-2` + `-lax-1a` (local zone), `us-central1` + `-a`.
fn zone_is_in_region(zone: &str, region: &str) -> bool {
    if region.is_empty() {
        return false;
    }
    match zone.strip_prefix(region) {
        Some(rest) => {
            rest.starts_with('-')
                || (rest.len() == 1 && rest.bytes().all(|b| b.is_ascii_lowercase()))
        }
        None => false,
    }
}

fn check_cluster_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} cannot be a SPIFFE ID path segment"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(format!(
            "{name:?} contains {c:?}; a cluster name is a SPIFFE ID path segment \
             (letters, digits, '.', '-', '_')"
        ));
    }
    Ok(())
}

/// The claims of a projected service account token that sigil reads.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<OneOrMany>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaims>,
}

impl Claims {
    fn audiences(&self) -> impl Iterator<Item = &str> {
        let all: &[String] = match &self.aud {
            None => &[],
            Some(OneOrMany::One(a)) => std::slice::from_ref(a),
            Some(OneOrMany::Many(v)) => v,
        };
        all.iter().map(String::as_str)
    }
}

/// `aud` may be a string or an array (RFC 7519 §4.1.3).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    serviceaccount: Option<NameUid>,
    #[serde(default)]
    pod: Option<NameUid>,
    #[serde(default)]
    node: Option<NameUid>,
}

#[derive(Debug, Deserialize)]
struct NameUid {
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: String,
}

/// Reads a JWT's claims without verifying it: only for checks that can
/// reject a token, never accept one.
fn peek_claims(token: &str) -> Result<Claims, PsatError> {
    let not_jwt = PsatError::InvalidToken {
        reason: "it is not a well-formed JWT",
    };
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| PsatError::InvalidToken {
            reason: "it is not a well-formed JWT",
        })?;
    serde_json::from_slice(&bytes).map_err(|_| PsatError::InvalidToken {
        reason: "its claims are not those of a service account token",
    })
}

fn check_times(claims: &Claims, now: u64) -> Result<(), PsatError> {
    if let Some(exp) = claims.exp
        && now > exp.saturating_add(LEEWAY_SECS)
    {
        return Err(PsatError::Expired { expired_at: exp });
    }
    if let Some(nbf) = claims.nbf
        && nbf > now.saturating_add(LEEWAY_SECS)
    {
        return Err(PsatError::NotYetValid);
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Splits `system:serviceaccount:<namespace>:<name>`.
fn parse_service_account(username: &str) -> Option<(String, String)> {
    let mut parts = username.split(':');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("system"), Some("serviceaccount"), Some(ns), Some(sa), None)
            if !ns.is_empty() && !sa.is_empty() =>
        {
            Some((ns.to_owned(), sa.to_owned()))
        }
        _ => None,
    }
}

/// The one value of a TokenReview `extra` key; several values are not a
/// service account token's shape.
fn single_extra(
    extra: &BTreeMap<String, Vec<String>>,
    key: &str,
) -> Result<Option<String>, PsatError> {
    match extra.get(key).map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([value]) if !value.is_empty() => Ok(Some(value.clone())),
        Some(_) => Err(PsatError::InvalidToken {
            reason: "the TokenReview names its pod or node ambiguously",
        }),
    }
}

/// Identity from verified claims (offline mode).
fn identity_from_claims(claims: Claims) -> Result<TokenIdentity, PsatError> {
    let sub = claims.sub.as_deref().unwrap_or_default();
    let (namespace, service_account) =
        parse_service_account(sub).ok_or(PsatError::InvalidToken {
            reason: "its subject is not a service account",
        })?;
    let k8s = claims.kubernetes.ok_or(PsatError::InvalidToken {
        reason: "it has no kubernetes.io claims: not a projected service account token",
    })?;
    let sa_name = k8s.serviceaccount.as_ref().map(|s| s.name.as_str());
    if k8s.namespace != namespace || sa_name != Some(service_account.as_str()) {
        return Err(PsatError::InvalidToken {
            reason: "its kubernetes.io claims disagree with its subject",
        });
    }
    let pod = k8s
        .pod
        .filter(|p| !p.name.is_empty() && !p.uid.is_empty())
        .ok_or(PsatError::NotPodBound)?;
    let node = k8s.node.filter(|n| !n.name.is_empty() && !n.uid.is_empty());
    Ok(TokenIdentity {
        namespace,
        service_account,
        pod_name: pod.name,
        pod_uid: pod.uid,
        node_name: node.as_ref().map(|n| n.name.clone()),
        node_uid: node.map(|n| n.uid),
        expires_at: claims.exp,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn kubelet_settable_labels_follow_node_restriction() {
        for key in [
            "topology.kubernetes.io/zone",
            "topology.kubernetes.io/region",
            "failure-domain.beta.kubernetes.io/zone",
            "kubernetes.io/hostname",
            "node.kubernetes.io/instance-type",
            "node.kubernetes.io/anything",
            "kubelet.kubernetes.io/anything",
            "foo.node.kubernetes.io/x",
            "topology.k8s.aws/zone-id",
            "eks.amazonaws.com/nodegroup",
            "Environment",
            "example.com/zone",
        ] {
            assert!(kubelet_can_set_label(key), "{key}");
        }
        for key in [
            "node-restriction.kubernetes.io/zone",
            "example.node-restriction.kubernetes.io/zone",
            "k8s.io/cloud-provider-aws",
            "kubernetes.io/role",
            "node-role.kubernetes.io/control-plane",
            "topology.k8s.io/zone",
        ] {
            assert!(!kubelet_can_set_label(key), "{key}");
        }
        // A domain that merely ends in the same letters is not the namespace.
        assert!(kubelet_can_set_label("evilkubernetes.io/zone"));
    }

    #[test]
    fn provider_zone_reads_aws_and_gce_ids_only() {
        assert_eq!(
            provider_zone("aws:///us-east-1a/i-08736224042c4ee75"),
            Some("us-east-1a")
        );
        assert_eq!(
            provider_zone("gce://my-project/us-central1-a/gke-node-1"),
            Some("us-central1-a")
        );
        for id in [
            "aws:///i-08736224042c4ee75",
            "aws://host/us-east-1a/i-1",
            "gce://p/z",
            "azure:///subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachines/v",
            "kind://docker/kind/kind-control-plane",
            "",
        ] {
            assert_eq!(provider_zone(id), None, "{id}");
        }
    }

    #[test]
    fn zones_belong_to_their_regions_only() {
        assert!(zone_is_in_region("us-east-1a", "us-east-1"));
        assert!(zone_is_in_region("us-west-2-lax-1a", "us-west-2"));
        assert!(zone_is_in_region("us-central1-a", "us-central1"));
        assert!(!zone_is_in_region("us-east-1a", "us-east-"));
        assert!(!zone_is_in_region("us-east-1a", "eu-west-1"));
        assert!(!zone_is_in_region("us-east-1a", "us-east-1a"));
        assert!(!zone_is_in_region("us-east-1a", ""));
    }

    #[test]
    fn service_account_usernames_have_four_parts() {
        assert_eq!(
            parse_service_account("system:serviceaccount:kube-system:aws-node"),
            Some(("kube-system".to_owned(), "aws-node".to_owned()))
        );
        for bad in [
            "system:serviceaccount:kube-system",
            "system:serviceaccount::aws-node",
            "system:serviceaccount:ns:sa:extra",
            "system:node:ip-10-0-10-170",
            "janedoe@example.com",
        ] {
            assert_eq!(parse_service_account(bad), None, "{bad}");
        }
    }

    #[test]
    fn peeked_times_reject_expired_and_future_tokens() {
        let claims = |exp, nbf| Claims {
            sub: None,
            aud: None,
            exp: Some(exp),
            nbf: Some(nbf),
            kubernetes: None,
        };
        assert!(check_times(&claims(1000, 900), 1000 + LEEWAY_SECS).is_ok());
        assert!(matches!(
            check_times(&claims(1000, 900), 1001 + LEEWAY_SECS),
            Err(PsatError::Expired { expired_at: 1000 })
        ));
        assert!(matches!(
            check_times(&claims(5000, 2000), 1000),
            Err(PsatError::NotYetValid)
        ));
    }

    #[test]
    fn cluster_names_are_path_segments() {
        assert!(check_cluster_name("eks-dev_1.prod").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "ä"] {
            assert!(check_cluster_name(bad).is_err(), "{bad:?}");
        }
    }

    /// Hostile PSAT tokens and claims (issue #13): the parsers that read a
    /// token before or without its signature never panic, every refusal
    /// says why, and what they accept has the shape sigil relies on.
    mod hostile {
        use super::*;
        use proptest::prelude::*;

        /// Cases per property: bounded so that CI stays fast.
        const CASES: u32 = 256;

        fn b64(json: &serde_json::Value) -> String {
            URL_SAFE_NO_PAD.encode(json.to_string())
        }

        /// A token whose payload is `claims` (header and signature are
        /// never read by the unverified parsers).
        fn token(claims: &serde_json::Value) -> String {
            format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", b64(claims))
        }

        /// Short names that are sometimes empty or carry the separators
        /// the parsers split on.
        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                "[a-z0-9-]{1,12}",
                "[a-z:.]{0,6}",
                any::<String>().prop_map(|s| s.chars().take(12).collect()),
            ]
        }

        fn name_uid() -> impl Strategy<Value = Option<serde_json::Value>> {
            proptest::option::of(
                (name(), name()).prop_map(|(n, u)| serde_json::json!({"name": n, "uid": u})),
            )
        }

        fn claims() -> impl Strategy<Value = serde_json::Value> {
            (
                name(),
                name(),
                // None: no claim; Some(None): the subject's name; else another.
                proptest::option::of(proptest::option::of(name())),
                name_uid(),
                name_uid(),
                proptest::option::of(any::<u64>()),
                any::<bool>(),
            )
                .prop_map(|(ns, sa, k8s_sa, pod, node, exp, prefix)| {
                    let sub = if prefix {
                        format!("system:serviceaccount:{ns}:{sa}")
                    } else {
                        format!("{ns}:{sa}")
                    };
                    let mut k8s = serde_json::json!({ "namespace": ns });
                    if let Some(s) = k8s_sa {
                        let s = s.unwrap_or_else(|| sa.clone());
                        k8s["serviceaccount"] = serde_json::json!({"name": s, "uid": "u"});
                    }
                    if let Some(p) = pod {
                        k8s["pod"] = p;
                    }
                    if let Some(n) = node {
                        k8s["node"] = n;
                    }
                    let mut c =
                        serde_json::json!({"sub": sub, "aud": ["sigil"], "kubernetes.io": k8s});
                    if let Some(e) = exp {
                        c["exp"] = e.into();
                    }
                    c
                })
        }

        /// What an accepted identity must satisfy: its subject names exactly
        /// its namespace and service account, and it is bound to a pod.
        fn check_identity(claims: &serde_json::Value, id: &TokenIdentity) {
            assert!(!id.namespace.is_empty() && !id.service_account.is_empty());
            assert!(!id.namespace.contains(':') && !id.service_account.contains(':'));
            assert_eq!(
                claims["sub"].as_str(),
                Some(
                    format!(
                        "system:serviceaccount:{}:{}",
                        id.namespace, id.service_account
                    )
                    .as_str()
                )
            );
            assert_eq!(
                claims["kubernetes.io"]["namespace"].as_str(),
                Some(id.namespace.as_str())
            );
            assert!(!id.pod_name.is_empty() && !id.pod_uid.is_empty());
            assert_eq!(id.node_name.is_some(), id.node_uid.is_some());
        }

        fn refusal_says_why(e: &PsatError) {
            assert!(!e.to_string().is_empty(), "{e:?}");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            #[test]
            fn arbitrary_text_is_refused_or_read_as_three_parts(text in any::<String>()) {
                match peek_claims(&text) {
                    Ok(c) => {
                        // Only three dot-separated parts can parse at all.
                        prop_assert_eq!(text.split('.').count(), 3);
                        if let Ok(id) = identity_from_claims(c) {
                            prop_assert!(!id.pod_uid.is_empty());
                        }
                    }
                    Err(e) => refusal_says_why(&e),
                }
            }

            #[test]
            fn arbitrary_payload_bytes_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
                let token = format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(&payload));
                if let Err(e) = peek_claims(&token) {
                    refusal_says_why(&e);
                }
            }

            #[test]
            fn claims_give_a_consistent_identity_or_a_reason(c in claims(), now in any::<u64>()) {
                let parsed = peek_claims(&token(&c));
                prop_assert!(parsed.is_ok(), "well-formed claims refused: {c}");
                let Ok(parsed) = parsed else { return Ok(()) };
                if let Err(e) = check_times(&parsed, now) {
                    refusal_says_why(&e);
                }
                match identity_from_claims(parsed) {
                    Ok(id) => check_identity(&c, &id),
                    Err(e) => refusal_says_why(&e),
                }
            }

            #[test]
            fn edited_claims_give_a_consistent_identity_or_a_reason(
                pos in any::<usize>(),
                value in any::<u8>(),
                op in 0u8..3,
            ) {
                let valid = serde_json::json!({
                    "sub": "system:serviceaccount:kube-system:sigil-agent",
                    "aud": "sigil",
                    "exp": 2_000_000_000u64,
                    "kubernetes.io": {
                        "namespace": "kube-system",
                        "serviceaccount": {"name": "sigil-agent", "uid": "s"},
                        "pod": {"name": "sigil-agent-x", "uid": "p"},
                        "node": {"name": "node-1", "uid": "n"}
                    }
                });
                let mut json = valid.to_string().into_bytes();
                let at = pos % json.len();
                match op {
                    0 => json[at] ^= value.max(1),
                    1 => json.insert(at, value),
                    _ => { json.remove(at); }
                }
                let token = format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(&json));
                match peek_claims(&token).and_then(identity_from_claims) {
                    Ok(id) => {
                        // A tolerated edit (whitespace, a key rename that
                        // serde ignores, a changed value) still yields a
                        // self-consistent identity.
                        let edited: serde_json::Value = serde_json::from_slice(&json).unwrap();
                        check_identity(&edited, &id);
                    }
                    Err(e) => refusal_says_why(&e),
                }
            }

            #[test]
            fn service_account_usernames_split_into_two_non_empty_names(user in "[a-z:]{0,40}") {
                if let Some((ns, sa)) = parse_service_account(&user) {
                    prop_assert_eq!(format!("system:serviceaccount:{ns}:{sa}"), user);
                    prop_assert!(!ns.is_empty() && !sa.is_empty());
                    prop_assert!(!ns.contains(':') && !sa.contains(':'));
                }
            }

            #[test]
            fn arbitrary_jwks_documents_never_panic(text in any::<String>(), kty in "(RSA|EC|oct|OKP|)", crv in "(P-256|P-384|P-521|)", n in "[A-Za-z0-9_=-]{0,64}") {
                for doc in [
                    text.clone(),
                    format!(r#"{{"keys":[{{"kty":"{kty}","crv":"{crv}","n":"{n}","e":"AQAB","x":"{n}","y":"{n}"}}]}}"#),
                ] {
                    match sigil_svid::jwks::parse_jwks(&doc, OFFLINE_ALGS) {
                        Ok(keys) => prop_assert!(!keys.is_empty()),
                        Err(e) => prop_assert!(!e.to_string().is_empty()),
                    }
                }
            }
        }
    }
}
