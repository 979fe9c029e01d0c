//! Registration entries: which SPIFFE ID a workload (or node alias) gets,
//! under which parent, when its selectors match.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::selector::Selectors;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// The longest hint accepted, in bytes (Workload API §5.4 recommends 1024).
pub const MAX_HINT_LEN: usize = 1024;
/// The most DNS names one entry may carry.
pub const MAX_DNS_NAMES: usize = 64;
/// The most selectors one entry may carry.
pub const MAX_SELECTORS: usize = 64;
/// The most trust domains one entry may federate with. With every other
/// field capped too, one entry stays below about 200 KiB on the wire.
pub const MAX_FEDERATES_WITH: usize = 64;
/// The latest `expires_at` accepted: 9999-12-31T23:59:59Z, the last second
/// that RFC 3339 text and X.509 GeneralizedTime can write.
pub const MAX_EXPIRES_AT: i64 = 253_402_300_799;

/// Why an entry or entry ID was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The entry ID is empty, too long or has characters outside `A-Za-z0-9._-`.
    #[error("entry ID {0:?} must be 1 to 255 characters of letters, digits, '.', '_' or '-'")]
    BadId(String),
    /// The entry has no selectors; it would match every workload.
    #[error("an entry needs at least one selector")]
    NoSelectors,
    /// The entry has more than [`MAX_SELECTORS`] selectors.
    #[error("an entry may have at most {MAX_SELECTORS} selectors, got {0}")]
    TooManySelectors(usize),
    /// The SPIFFE ID has no path.
    #[error("spiffe_id {0} has no path; workload IDs look like spiffe://<td>/<path>")]
    RootSpiffeId(String),
    /// The SPIFFE ID or parent ID is in another trust domain.
    #[error("{field} {id} is not in the trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// `spiffe_id` or `parent_id`.
        field: &'static str,
        /// The offending ID.
        id: String,
        /// The server's trust domain.
        trust_domain: String,
    },
    /// The SPIFFE ID lies in the `/sigil` space of the trust domain, reserved
    /// for sigil's own identities (see [`Entry::check_reserved`]).
    #[error(
        "spiffe_id {0} is reserved: the /sigil path space belongs to sigil's own identities (the server and the agents); choose another path"
    )]
    ReservedSpiffeId(String),
    /// A node alias would take the ID of the server or of an agent.
    #[error(
        "node alias spiffe_id {0} is reserved: it names the sigil server or an agent; choose another path"
    )]
    ReservedAliasId(String),
    /// The parent ID has no path.
    #[error("parent_id {0} has no path")]
    RootParentId(String),
    /// The entry names itself as parent.
    #[error("spiffe_id and parent_id are both {0}; an entry cannot be its own parent")]
    SelfParent(String),
    /// A DNS name is not a valid host name.
    #[error(
        "invalid DNS name {0:?}: labels of letters, digits and '-', at most 63 bytes each, 253 in all; '*.' only as a prefix"
    )]
    BadDnsName(String),
    /// Too many DNS names.
    #[error("an entry may have at most {MAX_DNS_NAMES} DNS names, got {0}")]
    TooManyDnsNames(usize),
    /// The hint is longer than [`MAX_HINT_LEN`].
    #[error("hint is {0} bytes long; the limit is {MAX_HINT_LEN}")]
    HintTooLong(usize),
    /// The hint holds a control character (newline, NUL, ESC, …), which
    /// could forge lines or send escape sequences wherever it is printed.
    #[error("hint {0:?} contains a control character")]
    HintControlChar(String),
    /// More than [`MAX_FEDERATES_WITH`] trust domains.
    #[error("an entry may federate with at most {MAX_FEDERATES_WITH} trust domains, got {0}")]
    TooManyFederatesWith(usize),
    /// A trust domain appears twice in `federates_with`.
    #[error("federates_with names {0} twice")]
    DuplicateFederatesWith(String),
    /// `expires_at` is negative or past [`MAX_EXPIRES_AT`].
    #[error(
        "expires_at {0} is out of range: give Unix seconds up to {MAX_EXPIRES_AT} (9999-12-31T23:59:59Z), or 0 for none"
    )]
    BadExpiry(i64),
    /// An entry federates with its own trust domain.
    #[error("federates_with names the server's own trust domain {0}")]
    FederatesWithSelf(String),
    /// A TTL is negative or beyond the limit.
    #[error("{field} must be between 0 (server default) and {max} seconds, got {got}")]
    BadTtl {
        /// `x509_svid_ttl` or `jwt_svid_ttl`.
        field: &'static str,
        /// The limit.
        max: u64,
        /// What was given.
        got: u64,
    },
    /// The entry asks for a feature the server does not implement yet
    /// (`admin`, `downstream`); storing it would claim a power nothing
    /// grants.
    #[error("{0} is not supported yet")]
    NotSupported(&'static str),
}

/// A registration entry's unique ID.
///
/// The text is shared: a clone (a key of the server's index, of a sync
/// stream's record of what its agent holds) costs a reference count.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntryId(Arc<str>);

impl EntryId {
    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EntryId {
    type Err = EntryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Self(Arc::from(s)))
        } else {
            Err(EntryError::BadId(s.to_owned()))
        }
    }
}

impl TryFrom<String> for EntryId {
    type Error = EntryError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<EntryId> for String {
    fn from(id: EntryId) -> Self {
        id.0.to_string()
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.0)
    }
}

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Unique ID, assigned by the server unless given.
    pub id: EntryId,
    /// The identity issued to matching workloads.
    pub spiffe_id: SpiffeId,
    /// The agent, node alias or other entry under which this entry applies.
    pub parent_id: SpiffeId,
    /// What a workload (or, for node aliases, an agent) must show to match.
    pub selectors: Selectors,
    /// X509-SVID lifetime in seconds; 0 means the server default.
    pub x509_svid_ttl: u64,
    /// JWT-SVID lifetime in seconds; 0 means the server default.
    pub jwt_svid_ttl: u64,
    /// DNS SANs added to the X509-SVID (the first is also the subject CN).
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles workloads of this entry receive.
    pub federates_with: Vec<TrustDomain>,
    /// Attested attributes carried in this entry's SVIDs (JWT claims and an
    /// X.509 extension); see [`crate::attribute`].
    #[serde(default)]
    pub attributes: Vec<crate::Attribute>,
    /// Whether the identity may use the admin API.
    pub admin: bool,
    /// Whether the identity may act as a downstream CA.
    pub downstream: bool,
    /// A label for workloads that hold several SVIDs.
    pub hint: String,
    /// Unix time after which the entry is deleted; `None` keeps it.
    pub expires_at: Option<i64>,
    /// The store revision of the entry's last write.
    pub revision: u64,
    /// Unix time of creation.
    pub created_at: i64,
}

/// The longest TTL an entry may ask for (one year), to catch unit mistakes.
pub const MAX_TTL_SECS: u64 = 366 * 24 * 3600;

impl Entry {
    /// An entry with the given identity, parent and selectors and every other
    /// field at its default (server TTLs, no DNS names, no expiry).
    pub fn new(
        id: EntryId,
        spiffe_id: SpiffeId,
        parent_id: SpiffeId,
        selectors: Selectors,
    ) -> Self {
        Self {
            id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: vec![],
            federates_with: vec![],
            attributes: vec![],
            admin: false,
            downstream: false,
            hint: String::new(),
            expires_at: None,
            revision: 0,
            created_at: 0,
        }
    }

    /// Checks everything about the entry that does not need the store.
    pub fn validate(&self, trust_domain: &TrustDomain) -> Result<(), EntryError> {
        // Nothing reads these flags yet: an entry that carries them would
        // promise an admin or downstream identity the server never honours.
        if self.admin {
            return Err(EntryError::NotSupported("admin"));
        }
        if self.downstream {
            return Err(EntryError::NotSupported("downstream"));
        }
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        if self.selectors.len() > MAX_SELECTORS {
            return Err(EntryError::TooManySelectors(self.selectors.len()));
        }
        if self.spiffe_id.is_root() {
            return Err(EntryError::RootSpiffeId(self.spiffe_id.to_string()));
        }
        if !self.spiffe_id.is_member_of(trust_domain) {
            return Err(EntryError::ForeignTrustDomain {
                field: "spiffe_id",
                id: self.spiffe_id.to_string(),
                trust_domain: trust_domain.to_string(),
            });
        }
        self.check_reserved()?;
        if !self.parent_id.is_member_of(trust_domain) {
            return Err(EntryError::ForeignTrustDomain {
                field: "parent_id",
                id: self.parent_id.to_string(),
                trust_domain: trust_domain.to_string(),
            });
        }
        if self.parent_id.is_root() {
            return Err(EntryError::RootParentId(self.parent_id.to_string()));
        }
        if self.parent_id == self.spiffe_id {
            return Err(EntryError::SelfParent(self.spiffe_id.to_string()));
        }
        if self.dns_names.len() > MAX_DNS_NAMES {
            return Err(EntryError::TooManyDnsNames(self.dns_names.len()));
        }
        if let Some(bad) = self.dns_names.iter().find(|d| !is_valid_dns_name(d)) {
            return Err(EntryError::BadDnsName(bad.clone()));
        }
        if self.hint.len() > MAX_HINT_LEN {
            return Err(EntryError::HintTooLong(self.hint.len()));
        }
        if self.hint.chars().any(char::is_control) {
            return Err(EntryError::HintControlChar(self.hint.clone()));
        }
        if self.federates_with.len() > MAX_FEDERATES_WITH {
            return Err(EntryError::TooManyFederatesWith(self.federates_with.len()));
        }
        if self.federates_with.iter().any(|td| td == trust_domain) {
            return Err(EntryError::FederatesWithSelf(trust_domain.to_string()));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.federates_with.iter().find(|td| !seen.insert(*td)) {
            return Err(EntryError::DuplicateFederatesWith(dup.to_string()));
        }
        if let Some(at) = self.expires_at
            && !(0..=MAX_EXPIRES_AT).contains(&at)
        {
            return Err(EntryError::BadExpiry(at));
        }
        for (field, got) in [
            ("x509_svid_ttl", self.x509_svid_ttl),
            ("jwt_svid_ttl", self.jwt_svid_ttl),
        ] {
            if got > MAX_TTL_SECS {
                return Err(EntryError::BadTtl {
                    field,
                    max: MAX_TTL_SECS,
                    got,
                });
            }
        }
        Ok(())
    }

    /// Refuses a SPIFFE ID in the `/sigil` space, which belongs to sigil's
    /// own identities: a workload holding `spiffe://<td>/sigil/server` could
    /// pose as the server to a new agent, one holding an agent ID as that
    /// agent. Workload entries may not use the space at all (first segment
    /// `sigil` in any letter case); node aliases, whose IDs are never issued
    /// as SVIDs, may use it (the Kubernetes controller names them
    /// `/sigil/k8s/<cluster>/nodes/...`) but not for the server's or an
    /// agent's ID. Parent IDs are not concerned: entries hang from agents.
    /// Entry IDs outside the own trust domain are refused elsewhere, so this
    /// is about the own trust domain only.
    pub fn check_reserved(&self) -> Result<(), EntryError> {
        if self.is_node_alias() {
            if self.spiffe_id.names_sigil_component() {
                return Err(EntryError::ReservedAliasId(self.spiffe_id.to_string()));
            }
        } else if self.spiffe_id.is_in_sigil_space() {
            return Err(EntryError::ReservedSpiffeId(self.spiffe_id.to_string()));
        }
        Ok(())
    }

    /// Whether this entry is a node alias (parented to the server).
    pub fn is_node_alias(&self) -> bool {
        self.parent_id.path() == crate::SERVER_PATH
    }
}

/// Whether `name` is a valid DNS SAN: letters, digits and `-` in labels of at
/// most 63 bytes, 253 bytes in all, with an optional leading `*.` wildcard.
pub fn is_valid_dns_name(name: &str) -> bool {
    let body = name.strip_prefix("*.").unwrap_or(name);
    if body.is_empty() || name.len() > 253 {
        return false;
    }
    body.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn entry() -> Entry {
        Entry {
            id: "e1".parse().unwrap(),
            spiffe_id: "spiffe://example.org/web".parse().unwrap(),
            parent_id: "spiffe://example.org/sigil/agent/join_token/abc"
                .parse()
                .unwrap(),
            selectors: Selectors::parse_all(["unix:uid:1000"]).unwrap(),
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: vec!["web.example.org".into()],
            federates_with: vec![],
            attributes: vec![],
            admin: false,
            downstream: false,
            hint: String::new(),
            expires_at: None,
            revision: 0,
            created_at: 0,
        }
    }

    #[test]
    fn valid_entry_passes() {
        entry().validate(&td()).unwrap();
    }

    #[test]
    fn each_rule_rejects() {
        type Mutation = Box<dyn Fn(&mut Entry)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|e| e.selectors = Selectors::new()),
                "at least one selector",
            ),
            (
                Box::new(|e| e.spiffe_id = "spiffe://example.org".parse().unwrap()),
                "has no path",
            ),
            (
                Box::new(|e| e.spiffe_id = "spiffe://other.org/web".parse().unwrap()),
                "not in the trust domain",
            ),
            (
                Box::new(|e| e.parent_id = "spiffe://other.org/x".parse().unwrap()),
                "parent_id",
            ),
            (
                Box::new(|e| e.parent_id = e.spiffe_id.clone()),
                "own parent",
            ),
            (
                Box::new(|e| e.dns_names = vec!["bad_name".into()]),
                "invalid DNS name",
            ),
            (Box::new(|e| e.hint = "h".repeat(MAX_HINT_LEN + 1)), "hint"),
            (
                Box::new(|e| e.hint = "a\nSPIFFE ID        : spiffe://x/y".into()),
                "control character",
            ),
            (
                Box::new(|e| e.hint = "\u{1b}[2J".into()),
                "control character",
            ),
            (Box::new(|e| e.hint = "nul\0".into()), "control character"),
            (
                Box::new(|e| {
                    e.federates_with = (0..=MAX_FEDERATES_WITH)
                        .map(|i| TrustDomain::new(&format!("td{i}.org")).unwrap())
                        .collect()
                }),
                "at most 64 trust domains",
            ),
            (
                Box::new(|e| {
                    let td = TrustDomain::new("other.org").unwrap();
                    e.federates_with = vec![td.clone(), td];
                }),
                "twice",
            ),
            (
                Box::new(|e| e.expires_at = Some(MAX_EXPIRES_AT + 1)),
                "out of range",
            ),
            (Box::new(|e| e.expires_at = Some(i64::MAX)), "out of range"),
            (Box::new(|e| e.expires_at = Some(-1)), "out of range"),
            (
                Box::new(|e| e.federates_with = vec![TrustDomain::new("example.org").unwrap()]),
                "own trust domain",
            ),
            (
                Box::new(|e| e.x509_svid_ttl = MAX_TTL_SECS + 1),
                "x509_svid_ttl",
            ),
            (Box::new(|e| e.admin = true), "admin is not supported yet"),
            (
                Box::new(|e| e.downstream = true),
                "downstream is not supported yet",
            ),
            (
                Box::new(|e| e.spiffe_id = "spiffe://example.org/sigil/server".parse().unwrap()),
                "reserved",
            ),
        ];
        for (mutate, want) in cases {
            let mut e = entry();
            mutate(&mut e);
            let err = e.validate(&td()).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn dns_names() {
        for ok in ["a", "web.example.org", "*.example.org", "a-b.c9"] {
            assert!(is_valid_dns_name(ok), "{ok}");
        }
        for bad in [
            "",
            "*.",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a b",
            "*.*.a",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_dns_name(bad), "{bad}");
        }
    }

    #[test]
    fn entry_ids() {
        assert!("0f9c-aa.b_c".parse::<EntryId>().is_ok());
        for bad in ["", "a b", "a/b", &"a".repeat(256)] {
            assert!(bad.parse::<EntryId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_sigil_space_is_reserved() {
        for (spiffe_id, parent, ok) in [
            // Workload entries: nothing under /sigil, in any case.
            ("/sigil/server", "/sigil/agent/join_token/abc", false),
            ("/sigil", "/sigil/agent/join_token/abc", false),
            ("/Sigil/server", "/sigil/agent/join_token/abc", false),
            (
                "/SIGIL/agent/join_token/abc2",
                "/sigil/agent/join_token/abc",
                false,
            ),
            ("/sigil/k8s/c/nodes", "/sigil/agent/join_token/abc", false),
            ("/sigil/web", "/web", false),
            ("/sigilx/web", "/sigil/agent/join_token/abc", true),
            ("/web/sigil/server", "/sigil/agent/join_token/abc", true),
            // Node aliases: the controller's /sigil/k8s/..., not the server or agents.
            ("/sigil/k8s/c/nodes", "/sigil/server", true),
            ("/nodes/prod", "/sigil/server", true),
            ("/sigil/agent/join_token/abc", "/sigil/server", false),
            ("/sigil/Agent/x", "/sigil/server", false),
            ("/sigil", "/sigil/server", false),
            ("/SIGIL/SERVER/x", "/sigil/server", false),
        ] {
            let mut e = entry();
            e.spiffe_id = format!("spiffe://example.org{spiffe_id}").parse().unwrap();
            e.parent_id = format!("spiffe://example.org{parent}").parse().unwrap();
            let got = e.validate(&td());
            assert_eq!(got.is_ok(), ok, "{spiffe_id} under {parent}: {got:?}");
            assert_eq!(e.check_reserved().is_ok(), ok, "{spiffe_id} under {parent}");
            if let Err(err) = got {
                assert!(err.to_string().contains("reserved"), "{err}");
            }
        }
    }

    #[test]
    fn node_alias() {
        let mut e = entry();
        assert!(!e.is_node_alias());
        e.parent_id = "spiffe://example.org/sigil/server".parse().unwrap();
        assert!(e.is_node_alias());
    }
}
