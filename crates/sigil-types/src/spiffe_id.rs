//! SPIFFE IDs and trust domains (SPIFFE ID standard, §2 and §3).
//!
//! Parsing is strict: the exact lowercase prefix `spiffe://`, a lowercase
//! trust domain of `a-z 0-9 . - _`, path segments of `a-zA-Z0-9 . - _` without
//! `.`/`..` segments, no trailing slash, no percent-encoding, query, fragment,
//! port or userinfo. IDs are limited to 2048 bytes and trust domains to 255.
//! sigil only ever issues IDs in this canonical form, which every SPIFFE client
//! (Go, Rust, Python) accepts.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The URI scheme of every SPIFFE ID.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// The longest SPIFFE ID, in bytes, that is accepted (SPIFFE ID §2.3).
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name, in bytes (SPIFFE ID §2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a SPIFFE ID or trust domain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The input was the empty string.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The input does not start with the exact prefix `spiffe://`.
    #[error("scheme is missing or invalid: a SPIFFE ID starts with \"spiffe://\"")]
    WrongScheme,
    /// Nothing stands between `spiffe://` and the path.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// The trust domain holds a character outside `a-z 0-9 . - _`.
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores (found {0:?})"
    )]
    BadTrustDomainChar(char),
    /// A path segment holds a character outside `a-z A-Z 0-9 . - _`.
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores (found {0:?})"
    )]
    BadPathChar(char),
    /// The path has an empty segment (`//`) or ends with `/`.
    #[error("path cannot contain empty segments or a trailing slash")]
    EmptySegment,
    /// The path has a `.` or `..` segment.
    #[error("path cannot contain dot segments (\".\" or \"..\")")]
    DotSegment,
    /// A path given on its own does not start with `/`.
    #[error("path must have a leading slash")]
    NoLeadingSlash,
    /// The ID is longer than 2048 bytes.
    #[error("SPIFFE ID is {0} bytes long; the limit is 2048")]
    TooLong(usize),
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is {0} bytes long; the limit is 255")]
    TrustDomainTooLong(usize),
    /// The ID has no path where one is required (workload identities).
    #[error("SPIFFE ID {0} has no path; a workload identity needs one")]
    MissingPath(String),
}

fn check_trust_domain(name: &str) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(name.len()));
    }
    match name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

/// Checks a SPIFFE ID path: empty, or one or more `/segment`.
pub fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::NoLeadingSlash);
    };
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

/// A SPIFFE trust domain name such as `example.org` (SPIFFE ID §2.1).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain given either bare (`example.org`) or as a SPIFFE
    /// ID (`spiffe://example.org[/path]`), as every SPIFFE library accepts.
    pub fn new(input: &str) -> Result<Self, SpiffeIdError> {
        if input.contains(":/") {
            return Ok(SpiffeId::from_str(input)?.trust_domain().clone());
        }
        check_trust_domain(input)?;
        Ok(Self(input.to_owned()))
    }

    /// The bare name, without scheme.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>`, used as key in bundle maps.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// Builds the ID `spiffe://<td><path>`; `path` must be empty or start with `/`.
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::from_str(&format!("{SCHEME_PREFIX}{}{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID, `spiffe://<trust-domain>[<path>]` (SPIFFE ID §2).
///
/// The text is shared: a clone costs a reference count, so the server's
/// index keeps one copy of a parent ID that many entries name
/// (docs/benchmarks.md, "Server memory per entry").
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: Arc<str>,
    td_end: usize,
}

impl SpiffeId {
    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.full[SCHEME_PREFIX.len()..self.td_end].to_owned())
    }

    /// The trust domain name as a string slice.
    pub fn trust_domain_name(&self) -> &str {
        &self.full[SCHEME_PREFIX.len()..self.td_end]
    }

    /// The path, empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.full[self.td_end..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// Whether the ID has no path (the ID of a trust domain or a CA).
    pub fn is_root(&self) -> bool {
        self.td_end == self.full.len()
    }

    /// Returns the ID if it has a path, as workload and agent IDs must.
    pub fn require_path(self) -> Result<Self, SpiffeIdError> {
        if self.is_root() {
            Err(SpiffeIdError::MissingPath(self.full.to_string()))
        } else {
            Ok(self)
        }
    }

    /// Whether this ID lives in the given trust domain.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name()
    }

    /// The path segments, empty for a trust domain's own ID.
    fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// Whether the path lies in sigil's own space: its first segment is
    /// `sigil` in any letter case (`/sigil`, `/sigil/...`, `/Sigil/...`).
    /// Paths are case-sensitive in SPIFFE, but a look-alike such as
    /// `/SIGIL/server` is refused too: it would only serve to mislead a
    /// person or a case-insensitive comparison.
    pub fn is_in_sigil_space(&self) -> bool {
        self.segments()
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("sigil"))
    }

    /// Whether the ID names (in any letter case) the sigil server or an
    /// agent: `/sigil`, `/sigil/server[/...]` or `/sigil/agent[/...]`.
    pub fn names_sigil_component(&self) -> bool {
        let mut segs = self.segments();
        if !segs.next().is_some_and(|s| s.eq_ignore_ascii_case("sigil")) {
            return false;
        }
        segs.next()
            .is_none_or(|s| s.eq_ignore_ascii_case("server") || s.eq_ignore_ascii_case("agent"))
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(input.len()));
        }
        let Some(rest) = input.strip_prefix(SCHEME_PREFIX) else {
            return Err(SpiffeIdError::WrongScheme);
        };
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        check_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            full: Arc::from(input),
            td_end: SCHEME_PREFIX.len() + td_len,
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        s.parse()
    }

    /// Vectors 1–10 of spec/spiffe.md §1.2: all valid.
    #[test]
    fn valid_vectors() {
        for s in [
            "spiffe://trustdomain",
            "spiffe://trustdomain/path",
            "spiffe://trustdomain/path/element",
            "spiffe://trustdomain/.path",
            "spiffe://trustdomain/..path",
            "spiffe://trustdomain/...",
            "spiffe://trustdomain./path",
            "spiffe://trustdomain-/path",
            "spiffe://trustdomain_/path",
            "spiffe://trustdomain9/path",
            "spiffe://trustdomain/pathA",
            "spiffe://trustdomain/path_",
            "spiffe://trustdomain/path-",
            "spiffe://trustdomain/path.",
            "spiffe://trustdomain/path9",
            "spiffe://1.2.3.4/workload",
        ] {
            let parsed = id(s).unwrap_or_else(|e| panic!("{s} should parse: {e}"));
            assert_eq!(parsed.to_string(), s, "round trip of {s}");
        }
    }

    /// Vectors 11–45 of spec/spiffe.md §1.2: all invalid, each for its reason.
    #[test]
    fn invalid_vectors() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("s", WrongScheme),
            ("spiffe:/", WrongScheme),
            ("Spiffe://", WrongScheme),
            ("spiffe:/trustdomain/path", WrongScheme),
            ("BAD", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://trustdomain/", EmptySegment),
            ("spiffe://trustdomain/path/", EmptySegment),
            ("spiffe://trustdomain//", EmptySegment),
            ("spiffe://trustdomain//path", EmptySegment),
            ("spiffe://trustdomain/.", DotSegment),
            ("spiffe://trustdomain/./path", DotSegment),
            ("spiffe://trustdomain/path/./other", DotSegment),
            ("spiffe://trustdomain/..", DotSegment),
            ("spiffe://trustdomain/path/..", DotSegment),
            ("spiffe://trustdomain/../path", DotSegment),
            ("spiffe://trustdomain/path/../other", DotSegment),
            ("spiffe://%F0%9F%A4%AF/path", BadTrustDomainChar('%')),
            ("spiffe://%62%61%64/path", BadTrustDomainChar('%')),
            ("spiffe://trustdomain/%F0%9F%A4%AF", BadPathChar('%')),
            ("spiffe://trustdomain/%62%61%64", BadPathChar('%')),
            ("spiffe://trust$domain", BadTrustDomainChar('$')),
            ("spiffe://trustdomain/path$", BadPathChar('$')),
            ("spiffe://trustdomainA/path", BadTrustDomainChar('A')),
            ("spiffe://trustdomain:8080/path", BadTrustDomainChar(':')),
            ("spiffe://user@trustdomain/path", BadTrustDomainChar('@')),
            ("spiffe://[::1]/path", BadTrustDomainChar('[')),
            ("spiffe://trustdomain/path?x=1", BadPathChar('?')),
            ("spiffe://trustdomain/path#frag", BadPathChar('#')),
            ("spiffe://trustdomain/pa th", BadPathChar(' ')),
            ("spiffe://trustdomain/path:x", BadPathChar(':')),
            ("spiffe://trustdomain/pé", BadPathChar('é')),
        ];
        for (input, want) in cases {
            assert_eq!(id(input).as_ref().err(), Some(want), "input {input:?}");
        }
    }

    /// Vectors 37–45: every byte outside the charsets, appended to the trust
    /// domain and to the path.
    #[test]
    fn byte_loop() {
        for b in 0u8..=255 {
            let c = b as char;
            let td_ok = matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_');
            let td = format!("spiffe://trustdomain{c}/path");
            // '/' ends the trust domain, so it is a path matter there.
            if c != '/' {
                assert_eq!(id(&td).is_ok(), td_ok, "td byte {b:#04x}");
            }
            let path_ok = matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_');
            let path = format!("spiffe://trustdomain/path{c}");
            assert_eq!(id(&path).is_ok(), path_ok, "path byte {b:#04x}");
        }
    }

    /// Vectors 46–47, 50–51.
    #[test]
    fn trust_domains_paths_and_lengths() {
        assert_eq!(
            TrustDomain::new("trustdomain").unwrap().name(),
            "trustdomain"
        );
        assert_eq!(
            TrustDomain::new("spiffe://trustdomain/path")
                .unwrap()
                .name(),
            "trustdomain"
        );
        assert_eq!(TrustDomain::new(""), Err(SpiffeIdError::MissingTrustDomain));
        assert_eq!(validate_path("foo"), Err(SpiffeIdError::NoLeadingSlash));
        assert_eq!(validate_path("/"), Err(SpiffeIdError::EmptySegment));
        assert_eq!(validate_path(""), Ok(()));
        assert_eq!(validate_path("/$"), Err(SpiffeIdError::BadPathChar('$')));

        let long_path = format!("spiffe://td/{}", "a".repeat(2048 - 12));
        assert_eq!(long_path.len(), 2048);
        assert!(id(&long_path).is_ok());
        let too_long = format!("{long_path}b");
        assert_eq!(id(&too_long), Err(SpiffeIdError::TooLong(2049)));
        let long_td = "a".repeat(256);
        assert_eq!(
            TrustDomain::new(&long_td),
            Err(SpiffeIdError::TrustDomainTooLong(256))
        );
        assert!(TrustDomain::new(&"a".repeat(255)).is_ok());
    }

    /// Vectors 48–49: segments joined into a path.
    #[test]
    fn segments() {
        let td = TrustDomain::new("example.org").unwrap();
        for (seg, want) in [
            ("", SpiffeIdError::EmptySegment),
            (".", SpiffeIdError::DotSegment),
            ("..", SpiffeIdError::DotSegment),
            ("/", SpiffeIdError::EmptySegment),
            ("$", SpiffeIdError::BadPathChar('$')),
        ] {
            assert_eq!(
                td.id_with_path(&format!("/{seg}")),
                Err(want),
                "segment {seg:?}"
            );
        }
        assert_eq!(
            td.id_with_path("//foo"),
            Err(SpiffeIdError::EmptySegment),
            "segment \"/foo\""
        );
    }

    #[test]
    fn accessors() {
        let s = id("spiffe://example.org/ns/web").unwrap();
        assert_eq!(s.trust_domain().name(), "example.org");
        assert_eq!(s.path(), "/ns/web");
        assert!(!s.is_root());
        assert!(id("spiffe://example.org").unwrap().is_root());
        assert!(id("spiffe://example.org").unwrap().require_path().is_err());
        assert_eq!(
            TrustDomain::new("example.org").unwrap().id_string(),
            "spiffe://example.org"
        );
    }

    #[test]
    fn sigil_space_and_components() {
        for (s, space, component) in [
            ("spiffe://td/sigil", true, true),
            ("spiffe://td/sigil/server", true, true),
            ("spiffe://td/Sigil/Server", true, true),
            ("spiffe://td/SIGIL/agent/join_token/x", true, true),
            ("spiffe://td/sigil/server/extra", true, true),
            ("spiffe://td/sigil/k8s/c/nodes", true, false),
            ("spiffe://td/sigil/servers", true, false),
            ("spiffe://td/sigilx/server", false, false),
            ("spiffe://td/sigil-server", false, false),
            ("spiffe://td/web/sigil/server", false, false),
            ("spiffe://td", false, false),
        ] {
            let parsed = id(s).unwrap();
            assert_eq!(parsed.is_in_sigil_space(), space, "{s}");
            assert_eq!(parsed.names_sigil_component(), component, "{s}");
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn valid_ids_round_trip(
                td in "[a-z0-9._-]{1,40}",
                segs in proptest::collection::vec("[a-zA-Z0-9._-]{1,12}", 0..6),
            ) {
                prop_assume!(segs.iter().all(|s| s != "." && s != ".."));
                let s = format!("spiffe://{td}{}", segs.iter().map(|s| format!("/{s}")).collect::<String>());
                let parsed: SpiffeId = s.parse().unwrap();
                prop_assert_eq!(parsed.to_string(), s);
                prop_assert_eq!(parsed.trust_domain_name(), td.as_str());
            }

            #[test]
            fn never_panics(s in ".{0,80}") {
                let _ = s.parse::<SpiffeId>();
                let _ = TrustDomain::new(&s);
            }
        }
    }
}
