//! The server's error type and its one mapping to gRPC statuses.
//!
//! Each area has its own refusal enum; [`ServerError`] gathers them, and
//! `From<ServerError> for Status` is the only place that picks a gRPC code.
//! The messages are what operators and agents read: they name what the
//! caller sent, never the server's internals.

use std::net::IpAddr;

use sigil_types::ratelimit::{Exceeded, RETRY_AFTER_KEY};
use sigil_types::{EntryId, SpiffeId};
use tonic::Status;

use sigil_store::AuthorityKind;

/// Everything that can go wrong inside the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The store failed or refused a write.
    #[error(transparent)]
    Store(#[from] sigil_store::StoreError),
    /// Minting, parsing or verifying a credential failed.
    #[error(transparent)]
    Svid(#[from] sigil_svid::SvidError),
    /// A file or socket operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The configuration was rejected when the server started (a PSAT
    /// cluster's JWKS or kubeconfig); the error names the key.
    #[error(transparent)]
    Config(#[from] sigil_types::config::ConfigError),
    /// A call on the agent API was not authenticated or its agent is refused.
    #[error(transparent)]
    Agent(#[from] AgentRefusal),
    /// A join token or a Kubernetes PSAT did not attest an agent.
    #[error(transparent)]
    Attestation(#[from] AttestationError),
    /// An entry was refused or not found.
    #[error(transparent)]
    Entry(#[from] EntryRefusal),
    /// A request for an X.509-SVID or a JWT-SVID was refused.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// An operation on a signing authority was refused.
    #[error(transparent)]
    Authority(#[from] AuthorityRefusal),
    /// A pod certificate was refused.
    #[error(transparent)]
    PodCert(#[from] PodCertRefusal),
    /// An admin request was malformed or its caller is not allowed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A federation relationship or federated bundle was refused, or a
    /// refresh failed.
    #[error(transparent)]
    Federation(crate::federation::FederationError),
    /// The server is stopping; the agent reconnects to it or another one.
    #[error("server is shutting down")]
    ShuttingDown,
    /// A caller made more calls than its rate limit admits; the answer
    /// says how long to wait, in its message and as `retry-after-ms`.
    #[error(
        "rate limit exceeded: {scope} (limit {}); retry in {} ms",
        exceeded.rate,
        retry_after_ms(exceeded)
    )]
    RateLimited {
        /// Whose calls were counted.
        scope: RateScope,
        /// The limit and the wait until it admits a call again.
        exceeded: Exceeded,
    },
    /// A server fault; details go to the log, not the caller.
    #[error("internal error: {0}")]
    Internal(#[from] InternalError),
}

/// `path` in the trust domain `td`, for an ID the server builds itself (its
/// own, an agent's): a failure is a server fault, not the caller's.
pub(crate) fn own_id(td: &sigil_types::TrustDomain, path: &str) -> Result<SpiffeId, InternalError> {
    td.id_with_path(path)
        .map_err(|source| InternalError::OwnId {
            path: path.to_owned(),
            source,
        })
}

/// Whose calls a rate limit counts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RateScope {
    /// An authenticated agent's calls, by SPIFFE ID.
    Agent(SpiffeId),
    /// Unauthenticated calls from one source address (an IPv6 one by /64).
    Source(IpAddr),
}

impl std::fmt::Display for RateScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateScope::Agent(id) => write!(f, "calls of agent {id}"),
            RateScope::Source(key) => write!(f, "unauthenticated calls from {key}"),
        }
    }
}

/// The wait a refused caller is told, in whole milliseconds and never 0.
fn retry_after_ms(e: &Exceeded) -> u128 {
    e.retry_after.as_millis().max(1)
}

/// A server fault: what the log says of it. The caller sees only
/// "internal error; see the server log".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InternalError {
    /// The system's random generator failed.
    #[error("the random generator failed")]
    Random,
    /// A SPIFFE ID the server builds in its own trust domain (its own, an
    /// agent's) does not parse.
    #[error("the server's own SPIFFE ID {path:?} is invalid: {source}")]
    OwnId {
        /// The path the server put under its trust domain.
        path: String,
        /// Why it does not parse.
        source: sigil_types::SpiffeIdError,
    },
    /// A selector the server builds itself (a join token's) does not parse.
    #[error("the server's own selector is invalid: {0}")]
    OwnSelector(sigil_types::SelectorError),
    /// The store answered a batch with a different number of results than
    /// it was given entries.
    #[error("the store answered {got} results for a batch of {sent} entries")]
    BatchResults {
        /// Entries in the batch.
        sent: usize,
        /// Results the store gave.
        got: usize,
    },
    /// A freshly generated entry ID does not parse.
    #[error("a generated entry ID is invalid: {0}")]
    NewEntryId(sigil_types::EntryError),
    /// A task the call waited for panicked or was cancelled.
    #[error("{task} task failed: {source}")]
    Task {
        /// What the task did.
        task: &'static str,
        /// How it ended.
        source: tokio::task::JoinError,
    },
    /// The server's signing slots were closed (it is stopping).
    #[error("signing slots closed: {0}")]
    SigningSlots(tokio::sync::AcquireError),
    /// An authority record in the journal has an ID the server cannot use.
    #[error("bad JWT authority id {0}")]
    AuthorityId(String),
    /// An authority of this server is in the journal but its key file
    /// cannot be read.
    #[error("authority {id} is in the journal but its key {} cannot be read: {source}", path.display())]
    AuthorityKey {
        /// The authority.
        id: String,
        /// Where its key should be.
        path: std::path::PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// A rotation left no active authority of some kind.
    #[error("no active authority after rotation")]
    NoActiveAuthority,
    /// The active authority was not among the slots being rotated.
    #[error("the active authority vanished")]
    ActiveAuthorityVanished,
    /// The configuration names the PostgreSQL store, and this build has none.
    #[error("this build of sigil has no PostgreSQL support")]
    NoPostgres,
}

/// Why an agent's call on the agent API is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentRefusal {
    /// The transport gave no connection information.
    #[error("no connection information")]
    NoConnectionInfo,
    /// The call needs an agent SVID and the connection presented none.
    #[error("an agent SVID is required for this call")]
    SvidRequired,
    /// No record of this agent (never attested, or evicted).
    #[error("agent {0} is not attested (it may have been evicted)")]
    NotAttested(SpiffeId),
    /// The agent is banned.
    #[error("agent {0} is banned")]
    Banned(SpiffeId),
    /// The agent's record was deleted while its sync stream was open.
    #[error("agent {0} was evicted")]
    Evicted(SpiffeId),
    /// The presented SVID is a superseded or unknown serial of a known agent.
    #[error("agent {0} presented an SVID that is no longer current")]
    StaleSvid(SpiffeId),
    /// A renewal lost a race with a ban, an eviction or another renewal.
    #[error(
        "agent {0} was banned, evicted or renewed meanwhile, or its SVID is no longer current; not renewed"
    )]
    NotRenewed(SpiffeId),
}

/// Why a join token or a PSAT did not attest an agent, or a join token was
/// not created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// The token does not have the `<id>.<secret>[.<fingerprint>]` shape.
    #[error("malformed join token: expected <id>.<secret>[.<fingerprint>]")]
    MalformedJoinToken,
    /// A join token's requested TTL is out of range.
    #[error("join token TTL must be between 1s and 30 days")]
    JoinTokenTtl,
    /// No such join token, or it was consumed already.
    #[error("join token is unknown or was already used")]
    UnknownJoinToken,
    /// The join token expired before it was used.
    #[error("join token has expired")]
    ExpiredJoinToken,
    /// The named PSAT cluster profile is not configured (the name is cut to 64 characters).
    #[error("no Kubernetes cluster profile {0:?} is configured on this server")]
    UnknownCluster(String),
    /// The Kubernetes PSAT verifier refused the token or could not ask the API server.
    #[cfg(feature = "k8s")]
    #[error(transparent)]
    Psat(#[from] sigil_k8s::psat::PsatError),
    /// This build has no Kubernetes support.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Why an entry operation is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryRefusal {
    /// An entry ID that does not parse, as the request's only ID.
    #[error(transparent)]
    BadId(sigil_types::EntryError),
    /// An entry's `id` field that does not parse.
    #[error("invalid id: {0}")]
    InvalidId(sigil_types::EntryError),
    /// An update without the entry's ID.
    #[error("an update needs the entry id")]
    MissingId,
    /// The entry's fields do not convert from the wire.
    #[error(transparent)]
    Malformed(sigil_proto::ConvertError),
    /// The entry breaks a rule (trust domain, selectors, TTLs…).
    #[error(transparent)]
    Invalid(sigil_types::EntryError),
    /// No entry with this ID.
    #[error("entry {0} not found")]
    NotFound(EntryId),
    /// Another entry has the same parent ID, SPIFFE ID and selectors.
    #[error("entry {0} already has this parent ID, SPIFFE ID and selectors")]
    Duplicate(EntryId),
}

/// Why an SVID was not signed for an entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// A batch carries more CSRs than one request may.
    #[error("a batch may carry at most {max} CSRs, got {got}")]
    BatchTooLarge {
        /// The cap.
        max: usize,
        /// What the request carried.
        got: usize,
    },
    /// The entry ID does not parse.
    #[error(transparent)]
    BadEntryId(sigil_types::EntryError),
    /// The entry does not exist or is not authorized for the calling agent.
    #[error("entry {0} is not authorized for this agent")]
    NotAuthorized(EntryId),
    /// The CSR does not parse or its signature does not verify.
    #[error("invalid CSR: {0}")]
    InvalidCsr(sigil_svid::SvidError),
    /// The authority could not sign the X.509-SVID.
    #[error("signing failed: {0}")]
    Failed(sigil_svid::SvidError),
    /// The JWT-SVID's audience is missing or has an empty value.
    #[error("{0}")]
    Audience(String),
}

/// Why a pod certificate (`SignPodCertificate`) is refused. Each variant
/// has a machine-readable reason ([`PodCertRefusal::reason`]), sent in the
/// [`REFUSAL_KEY`] metadata of the status, which the entry controller writes
/// as the reason of the request's `Denied` condition.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PodCertRefusal {
    /// The key is malformed or of a type pod certificates do not allow.
    #[error("unsupported key: {0}")]
    UnsupportedKeyType(sigil_svid::SvidError),
    /// The proof of possession (or the stub CSR's signature) does not verify.
    #[error("invalid proof of possession: {0}")]
    InvalidProof(sigil_svid::SvidError),
    /// The node's agent has not attested (or its attestation expired).
    #[error("the node's agent {0} is not attested")]
    NodeNotAttested(SpiffeId),
    /// The node's agent is banned.
    #[error("the node's agent {0} is banned")]
    NodeBanned(SpiffeId),
    /// No entry the node's agent is authorized for matches the pod.
    #[error("no registration entry of the node's agent matches the pod's selectors")]
    NoRegistration,
    /// The pod's entries grant several SPIFFE IDs and the pod named none.
    #[error(
        "the pod's entries grant several SPIFFE IDs ({}); choose one with the sigil.dev/spiffe-id annotation",
        .0.join(", ")
    )]
    Ambiguous(Vec<String>),
    /// The pod asked for a SPIFFE ID its entries do not grant.
    #[error("the pod asked for {requested}, which its entries do not grant (they grant {})", .granted.join(", "))]
    NotGranted {
        /// What the pod asked for.
        requested: SpiffeId,
        /// What its entries grant.
        granted: Vec<String>,
    },
    /// The certificate would live less than the hour Kubernetes requires.
    #[error(
        "the certificate would be valid for {seconds} s, less than the 3600 s Kubernetes requires \
         (entry X.509 TTL {entry_ttl} s, 0 = the server default; or the CA expires sooner)"
    )]
    LifetimeTooShort {
        /// The lifetime it would have.
        seconds: u64,
        /// The entry's X.509-SVID TTL (0 = the server default).
        entry_ttl: u64,
    },
    /// The request itself is malformed (selectors, maxExpirationSeconds, IDs).
    #[error("invalid pod certificate request: {0}")]
    BadRequest(String),
}

/// The metadata key of a pod certificate refusal's reason.
pub const REFUSAL_KEY: &str = "sigil-refusal";

impl PodCertRefusal {
    /// The refusal of a key or its proof, by what [`sigil_svid`] found.
    pub fn from_key_error(e: sigil_svid::SvidError) -> Self {
        use sigil_svid::SvidError as S;
        match e {
            S::ProofOfPossession | S::CsrSignature => Self::InvalidProof(e),
            S::PodKeyRequest(_) => Self::BadRequest(e.to_string()),
            other => Self::UnsupportedKeyType(other),
        }
    }

    /// The machine-readable reason: the `reason` of the `Denied` condition
    /// the controller writes.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnsupportedKeyType(_) => "UnsupportedKeyType",
            Self::InvalidProof(_) => "InvalidProofOfPossession",
            Self::NodeNotAttested(_) => "NodeNotAttested",
            Self::NodeBanned(_) => "NodeBanned",
            Self::NoRegistration => "NoRegistration",
            Self::Ambiguous(_) => "AmbiguousIdentity",
            Self::NotGranted { .. } => "IdentityNotGranted",
            Self::LifetimeTooShort { .. } => "LifetimeTooShort",
            Self::BadRequest(_) => "InvalidRequest",
        }
    }
}

/// Why an operation on an authority (prepare, activate, taint, revoke) is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityRefusal {
    /// A prepared authority exists already.
    #[error("{kind} authority {id} is already prepared; activate it")]
    AlreadyPrepared {
        /// x509 or jwt.
        kind: AuthorityKind,
        /// The prepared authority.
        id: String,
    },
    /// Nothing is prepared to activate.
    #[error("this server has no prepared {0} authority; prepare one first")]
    NonePrepared(AuthorityKind),
    /// The authority belongs to another server instance.
    #[error(
        "authority {id} belongs to the server with instance ID {owner}; act on it through that server"
    )]
    OwnedElsewhere {
        /// The authority.
        id: String,
        /// The owning instance, as shown to the operator.
        owner: String,
    },
    /// No such authority on this server.
    #[error("no {kind} authority {id} on this server (see `sigil authority list`)")]
    Unknown {
        /// x509 or jwt.
        kind: AuthorityKind,
        /// What the request named.
        id: String,
    },
    /// The active authority cannot be tainted.
    #[error(
        "{id} is the active {kind} authority and cannot be tainted; prepare and activate a successor first"
    )]
    TaintActive {
        /// The authority.
        id: String,
        /// x509 or jwt.
        kind: AuthorityKind,
    },
    /// A prepared authority signed nothing and cannot be tainted.
    #[error("{0} is prepared and has signed nothing; only a retired authority can be tainted")]
    TaintPrepared(String),
    /// The authority is tainted already.
    #[error("{0} is already tainted")]
    AlreadyTainted(String),
    /// Only a tainted authority can be revoked.
    #[error(
        "{0} is not tainted; taint it first, and revoke it once the agents have replaced what it signed"
    )]
    NotTainted(String),
}

/// Why an admin request is refused before it reaches the registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The caller's uid is neither root nor the server's.
    #[error("uid {uid} may not use the admin API (only root and uid {me})")]
    CallerNotAllowed {
        /// The caller's uid.
        uid: u32,
        /// The server's uid.
        me: u32,
    },
    /// The socket gave no peer credentials.
    #[error("caller credentials unavailable")]
    NoCallerCredentials,
    /// A SPIFFE ID field does not parse.
    #[error("invalid {field} {value:?}: {source}")]
    SpiffeId {
        /// The request field.
        field: &'static str,
        /// What it held.
        value: String,
        /// Why it does not parse.
        source: sigil_types::SpiffeIdError,
    },
    /// A batch without items.
    #[error("the batch is empty")]
    EmptyBatch,
    /// A batch with more items than one request may carry.
    #[error("a batch may carry at most {max} items, got {got}")]
    BatchTooLarge {
        /// The cap.
        max: usize,
        /// What the request carried.
        got: usize,
    },
    /// A selector filter does not parse.
    #[error(transparent)]
    Selectors(sigil_types::SelectorError),
    /// The selector match mode is unknown.
    #[error(transparent)]
    SelectorMatch(crate::index::UnknownSelectorMatch),
    /// The page token is not one this server handed out.
    #[error("invalid page_token: pass back the next_page_token of the previous page")]
    PageToken,
    /// A negative join token TTL.
    #[error("ttl must not be negative")]
    NegativeTtl,
    /// No agent with this SPIFFE ID.
    #[error("agent {0} not found")]
    AgentNotFound(SpiffeId),
    /// The authority kind is missing.
    #[error("kind is required: x509 or jwt")]
    MissingKind,
    /// The authority kind is neither x509 nor jwt.
    #[error("invalid kind {0:?}: x509 or jwt")]
    InvalidKind(String),
    /// The authority ID is missing.
    #[error("id is required (see `sigil authority list`)")]
    MissingAuthorityId,
    /// The trust domain is missing.
    #[error("trust_domain is required")]
    MissingTrustDomain,
    /// The trust domain does not parse.
    #[error("invalid trust_domain {value:?}: {source}")]
    TrustDomain {
        /// What the request held.
        value: String,
        /// Why it does not parse.
        source: sigil_types::SpiffeIdError,
    },
    /// The bundle endpoint profile is malformed.
    #[error(transparent)]
    Profile(sigil_types::federation::FederationError),
    /// The bundle endpoint URL is missing.
    #[error("bundle_endpoint_url is required")]
    MissingBundleEndpointUrl,
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        e.to_status()
    }
}

impl ServerError {
    /// The status a caller receives for this error: the one place that
    /// picks gRPC codes. Server faults are logged and shown as a bare
    /// "internal error".
    pub fn to_status(&self) -> Status {
        use crate::federation::FederationError as F;
        let message = self.to_string();
        match self {
            ServerError::Agent(AgentRefusal::NoConnectionInfo | AgentRefusal::SvidRequired) => {
                Status::unauthenticated(message)
            }
            ServerError::Agent(_) => Status::permission_denied(message),
            ServerError::Attestation(
                AttestationError::MalformedJoinToken | AttestationError::JoinTokenTtl,
            ) => Status::invalid_argument(message),
            ServerError::Attestation(AttestationError::Unsupported(_)) => {
                Status::unimplemented(message)
            }
            #[cfg(feature = "k8s")]
            ServerError::Attestation(AttestationError::Psat(p)) => {
                // Transient API server trouble: the agent retries. A
                // verifier misconfigured is the server's fault, not the
                // caller's. The verifier's messages name only what the
                // token says.
                if p.is_unavailable() {
                    Status::unavailable(message)
                } else if matches!(p, sigil_k8s::psat::PsatError::Config { .. }) {
                    internal(&message)
                } else {
                    Status::permission_denied(message)
                }
            }
            ServerError::Attestation(_) => Status::permission_denied(message),
            ServerError::Entry(EntryRefusal::NotFound(_)) => Status::not_found(message),
            ServerError::Entry(EntryRefusal::Duplicate(_)) => Status::already_exists(message),
            ServerError::Entry(_) => Status::invalid_argument(message),
            ServerError::Sign(SignError::NotAuthorized(_)) => Status::permission_denied(message),
            ServerError::Sign(_) => Status::invalid_argument(message),
            ServerError::PodCert(r) => {
                let mut status = match r {
                    PodCertRefusal::UnsupportedKeyType(_)
                    | PodCertRefusal::InvalidProof(_)
                    | PodCertRefusal::BadRequest(_) => Status::invalid_argument(message),
                    PodCertRefusal::NodeNotAttested(_) | PodCertRefusal::NodeBanned(_) => {
                        Status::permission_denied(message)
                    }
                    PodCertRefusal::NoRegistration => Status::not_found(message),
                    PodCertRefusal::Ambiguous(_) => Status::failed_precondition(message),
                    PodCertRefusal::NotGranted { .. } => Status::permission_denied(message),
                    PodCertRefusal::LifetimeTooShort { .. } => Status::out_of_range(message),
                };
                if let Ok(v) = r.reason().parse() {
                    status.metadata_mut().insert(REFUSAL_KEY, v);
                }
                status
            }
            ServerError::Authority(AuthorityRefusal::Unknown { .. }) => Status::not_found(message),
            ServerError::Authority(_) => Status::invalid_argument(message),
            ServerError::Request(
                RequestError::CallerNotAllowed { .. } | RequestError::NoCallerCredentials,
            ) => Status::permission_denied(message),
            ServerError::Request(RequestError::AgentNotFound(_)) => Status::not_found(message),
            ServerError::Request(_) => Status::invalid_argument(message),
            ServerError::Store(e) | ServerError::Federation(F::Store(e)) => store_status(e),
            ServerError::Federation(e) if e.needs_operator() => {
                Status::failed_precondition(message)
            }
            ServerError::Federation(F::NoRelationship(_) | F::NoBundle(_)) => {
                Status::not_found(message)
            }
            ServerError::Federation(F::ExistsInConfig(_) | F::Exists(_)) => {
                Status::already_exists(message)
            }
            ServerError::Federation(F::Refresh { .. }) => Status::unavailable(message),
            ServerError::Federation(_) => Status::invalid_argument(message),
            ServerError::Svid(_) => Status::invalid_argument(message),
            ServerError::ShuttingDown => Status::unavailable(message),
            ServerError::RateLimited { exceeded, .. } => {
                let mut status = Status::resource_exhausted(message);
                if let Ok(v) = retry_after_ms(exceeded).to_string().parse() {
                    status.metadata_mut().insert(RETRY_AFTER_KEY, v);
                }
                status
            }
            ServerError::Io(_) | ServerError::Config(_) | ServerError::Internal(_) => {
                internal(&message)
            }
        }
    }
}

/// The status of a store error: a missing or existing row is the caller's
/// to know, an expired join token is a refused attestation, anything else
/// is a server fault.
fn store_status(e: &sigil_store::StoreError) -> Status {
    use sigil_store::StoreError as S;
    match e {
        S::NotFound(_) => Status::not_found(e.to_string()),
        S::AlreadyExists(_) => Status::already_exists(e.to_string()),
        S::TokenExpired => {
            Status::permission_denied(AttestationError::ExpiredJoinToken.to_string())
        }
        _ => internal(&e.to_string()),
    }
}

/// What a caller sees of a server fault: the details go to the log only.
fn internal(detail: &str) -> Status {
    tracing::error!(error = %detail, "internal error");
    Status::internal("internal error; see the server log")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::time::Duration;

    use sigil_types::ratelimit::Rate;
    use tonic::Code;

    use super::*;

    fn exceeded(retry_after: Duration) -> Exceeded {
        Exceeded {
            rate: Rate::new(2, 5),
            retry_after,
        }
    }

    #[test]
    fn a_rate_limit_says_whose_calls_and_how_long_to_wait() {
        let agent: SpiffeId = "spiffe://example.org/sigil/agent/join_token/x"
            .parse()
            .unwrap();
        let status = ServerError::RateLimited {
            scope: RateScope::Agent(agent),
            exceeded: exceeded(Duration::from_millis(1500)),
        }
        .to_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "rate limit exceeded: calls of agent spiffe://example.org/sigil/agent/join_token/x \
             (limit 2/s, burst 5); retry in 1500 ms"
        );
        assert_eq!(status.metadata().get(RETRY_AFTER_KEY).unwrap(), "1500");

        // Never "retry in 0 ms": an agent told 0 would call again at once.
        let status = ServerError::RateLimited {
            scope: RateScope::Source("192.0.2.7".parse().unwrap()),
            exceeded: exceeded(Duration::from_micros(10)),
        }
        .to_status();
        assert_eq!(
            status.message(),
            "rate limit exceeded: unauthenticated calls from 192.0.2.7 \
             (limit 2/s, burst 5); retry in 1 ms"
        );
        assert_eq!(status.metadata().get(RETRY_AFTER_KEY).unwrap(), "1");
    }

    #[test]
    fn server_faults_show_no_detail() {
        let faults = [
            InternalError::Random,
            InternalError::NoActiveAuthority,
            InternalError::AuthorityKey {
                id: "x509-1".into(),
                path: "/secret/keys/x509-1.key".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
        ];
        for fault in faults {
            let e = ServerError::from(fault);
            // The detail is in the error (for the log and for `sigil server
            // run` failing at start) ...
            assert!(e.to_string().starts_with("internal error: "), "{e}");
            // ... and not in what a caller receives.
            let status = e.to_status();
            assert_eq!(status.code(), Code::Internal);
            assert_eq!(status.message(), "internal error; see the server log");
        }
    }

    #[test]
    fn an_unknown_selector_match_is_named_to_the_caller() {
        let e = "most"
            .parse::<crate::index::SelectorMatch>()
            .map_err(RequestError::SelectorMatch)
            .map_err(ServerError::from)
            .unwrap_err();
        let status = e.to_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "selector match \"most\" must be one of exact, subset, superset, any"
        );
    }

    #[test]
    fn each_pod_certificate_refusal_has_its_reason_and_code() {
        let agent: SpiffeId = "spiffe://example.org/sigil/agent/k8s_psat/c/n"
            .parse()
            .unwrap();
        let refusals = [
            (
                PodCertRefusal::UnsupportedKeyType(sigil_svid::SvidError::PodKeyType("x".into())),
                Code::InvalidArgument,
            ),
            (
                PodCertRefusal::InvalidProof(sigil_svid::SvidError::ProofOfPossession),
                Code::InvalidArgument,
            ),
            (
                PodCertRefusal::NodeNotAttested(agent.clone()),
                Code::PermissionDenied,
            ),
            (
                PodCertRefusal::NodeBanned(agent.clone()),
                Code::PermissionDenied,
            ),
            (PodCertRefusal::NoRegistration, Code::NotFound),
            (
                PodCertRefusal::Ambiguous(vec!["spiffe://example.org/a".into()]),
                Code::FailedPrecondition,
            ),
            (
                PodCertRefusal::NotGranted {
                    requested: agent,
                    granted: vec![],
                },
                Code::PermissionDenied,
            ),
            (
                PodCertRefusal::LifetimeTooShort {
                    seconds: 1810,
                    entry_ttl: 1800,
                },
                Code::OutOfRange,
            ),
            (
                PodCertRefusal::BadRequest("x".into()),
                Code::InvalidArgument,
            ),
        ];
        let mut reasons = std::collections::BTreeSet::new();
        for (refusal, code) in refusals {
            let reason = refusal.reason();
            let status = ServerError::from(refusal).to_status();
            assert_eq!(status.code(), code, "{reason}");
            assert_eq!(status.metadata().get(REFUSAL_KEY).unwrap(), reason);
            assert!(reasons.insert(reason), "{reason} twice");
        }
        // Key errors from sigil-svid land on the right refusal.
        use sigil_svid::SvidError as S;
        assert_eq!(
            PodCertRefusal::from_key_error(S::CsrSignature).reason(),
            "InvalidProofOfPossession"
        );
        assert_eq!(
            PodCertRefusal::from_key_error(S::PublicKey("x".into())).reason(),
            "UnsupportedKeyType"
        );
        assert_eq!(
            PodCertRefusal::from_key_error(S::Csr("x".into())).reason(),
            "UnsupportedKeyType"
        );
        assert_eq!(
            PodCertRefusal::from_key_error(S::PodKeyRequest("x")).reason(),
            "InvalidRequest"
        );
        // Other refusals carry no reason.
        let other = ServerError::from(SignError::Audience("x".into())).to_status();
        assert!(other.metadata().get(REFUSAL_KEY).is_none());
    }
}
