//! The server's error type and its one mapping to gRPC statuses.
//!
//! Each area has its own refusal enum; [`ServerError`] gathers them, and
//! `From<ServerError> for Status` is the only place that picks a gRPC code.
//! The messages are what operators and agents read: they name what the
//! caller sent, never the server's internals.

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
    /// A bug or broken invariant; details go to the log, not the caller.
    #[error("internal error: {0}")]
    Internal(String),
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
    #[error("{0}")]
    SelectorMatch(String),
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
