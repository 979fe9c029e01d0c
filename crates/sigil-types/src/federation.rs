//! Federation relationships: which foreign trust domain's bundle the server
//! fetches, from where, and how it authenticates the bundle endpoint
//! (SPIFFE Trust Domain and Bundle §5).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{SpiffeId, TrustDomain};

/// How a bundle endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BundleEndpointProfile {
    /// A Web PKI server certificate for the URL's host, checked per RFC 6125
    /// against the system roots (or configured extra roots).
    HttpsWeb,
    /// An X509-SVID with exactly this SPIFFE ID, verified against the bundle
    /// of the ID's trust domain.
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint must present.
        endpoint_spiffe_id: SpiffeId,
    },
}

impl BundleEndpointProfile {
    /// `https_web` or `https_spiffe`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::HttpsWeb => "https_web",
            Self::HttpsSpiffe { .. } => "https_spiffe",
        }
    }

    /// Builds a profile from its name and, for `https_spiffe`, the endpoint
    /// SPIFFE ID (which `https_web` must not have).
    pub fn from_parts(
        name: &str,
        endpoint_spiffe_id: Option<&str>,
    ) -> Result<Self, FederationError> {
        match (name, endpoint_spiffe_id.filter(|s| !s.is_empty())) {
            ("https_web", None) => Ok(Self::HttpsWeb),
            ("https_web", Some(_)) => Err(FederationError::Invalid(
                "endpoint_spiffe_id applies only to the https_spiffe profile".to_owned(),
            )),
            ("https_spiffe", Some(id)) => Ok(Self::HttpsSpiffe {
                endpoint_spiffe_id: id.parse().map_err(|e| {
                    FederationError::Invalid(format!("endpoint_spiffe_id {id:?}: {e}"))
                })?,
            }),
            ("https_spiffe", None) => Err(FederationError::Invalid(
                "the https_spiffe profile needs endpoint_spiffe_id (the SPIFFE ID the bundle \
                 endpoint presents, e.g. spiffe://example.org/sigil/server)"
                    .to_owned(),
            )),
            (other, _) => Err(FederationError::Invalid(format!(
                "unknown bundle endpoint profile {other:?} (use https_web or https_spiffe)"
            ))),
        }
    }

    /// The endpoint SPIFFE ID of an `https_spiffe` profile.
    pub fn endpoint_spiffe_id(&self) -> Option<&SpiffeId> {
        match self {
            Self::HttpsWeb => None,
            Self::HttpsSpiffe { endpoint_spiffe_id } => Some(endpoint_spiffe_id),
        }
    }
}

impl fmt::Display for BundleEndpointProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A federation relationship with a foreign trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationRelationship {
    /// The foreign trust domain. Never inferred from the URL.
    pub trust_domain: TrustDomain,
    /// The `https://` URL of its bundle endpoint.
    pub bundle_endpoint_url: String,
    /// How the endpoint authenticates itself.
    pub profile: BundleEndpointProfile,
    /// Whether the relationship comes from the server's config file (those
    /// cannot be changed through the admin API).
    #[serde(default)]
    pub from_config: bool,
}

/// A relationship or bundle endpoint setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FederationError {
    /// Why it is invalid.
    #[error("{0}")]
    Invalid(String),
}

impl FederationRelationship {
    /// Checks the relationship for use by a server of `own` trust domain:
    /// a foreign trust domain, an `https` URL without userinfo or fragment.
    pub fn validate(&self, own: &TrustDomain) -> Result<(), FederationError> {
        if &self.trust_domain == own {
            return Err(FederationError::Invalid(format!(
                "{} is this server's own trust domain; federate with other trust domains only",
                own
            )));
        }
        validate_endpoint_url(&self.bundle_endpoint_url)?;
        Ok(())
    }
}

/// Checks a bundle endpoint URL: `https://host[:port][/path]`, no userinfo,
/// no fragment.
pub fn validate_endpoint_url(url: &str) -> Result<(), FederationError> {
    check_https_url(url).map_err(|why| {
        let url = crate::text::clip(url, crate::text::MAX_ECHO_BYTES);
        FederationError::Invalid(format!("bundle endpoint URL {url:?}: {why}"))
    })
}

/// The rules every `https` URL sigil publishes or fetches must follow: the
/// `https://` scheme, a host, no user information, no fragment, no
/// whitespace or control characters. Returns why not, to be prefixed with
/// what the URL is for.
pub fn check_https_url(url: &str) -> Result<(), &'static str> {
    if url.len() > MAX_URL_LEN {
        return Err("is longer than 2048 bytes");
    }
    let rest = url
        .strip_prefix("https://")
        .ok_or("must start with https://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err("has no host");
    }
    if authority.contains('@') {
        return Err("must not carry user information");
    }
    if url.contains('#') {
        return Err("must not have a fragment");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters");
    }
    check_host_and_port(authority)
}

/// The longest URL accepted: URLs are stored, shown and logged.
pub const MAX_URL_LEN: usize = 2048;

/// `host[:port]`: a DNS name, an IPv4 address or a bracketed IPv6 address,
/// and a port from 1 to 65535 when one is given.
fn check_host_and_port(authority: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or("has an unclosed '[' in its host")?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address");
        }
        match after {
            "" => return Ok(()),
            _ => (
                None,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or("has junk after its IPv6 address")?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(authority), None),
        }
    };
    if let Some(port) = port
        && !(port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p)))
    {
        return Err("has a port outside 1-65535");
    }
    if let Some(host) = host {
        let ipv4 = host.parse::<std::net::Ipv4Addr>().is_ok();
        if !ipv4 && (host.starts_with('*') || !crate::entry::is_valid_dns_name(host)) {
            return Err("has an invalid host name (labels of letters, digits and '-')");
        }
    }
    Ok(())
}

impl FromStr for BundleEndpointProfile {
    type Err = FederationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_parts(s, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_with_their_rules() {
        assert_eq!(
            BundleEndpointProfile::from_parts("https_web", None).unwrap(),
            BundleEndpointProfile::HttpsWeb
        );
        let p = BundleEndpointProfile::from_parts(
            "https_spiffe",
            Some("spiffe://other.org/sigil/server"),
        )
        .unwrap();
        assert_eq!(
            p.endpoint_spiffe_id().unwrap().as_str(),
            "spiffe://other.org/sigil/server"
        );
        for (name, id) in [
            ("https_spiffe", None),
            ("https_web", Some("spiffe://a/b")),
            ("http", None),
            ("https_spiffe", Some("not an id")),
        ] {
            assert!(
                BundleEndpointProfile::from_parts(name, id).is_err(),
                "{name} {id:?}"
            );
        }
    }

    #[test]
    fn urls_and_trust_domains_are_checked() {
        let own = TrustDomain::new("example.org").unwrap();
        let mut r = FederationRelationship {
            trust_domain: TrustDomain::new("other.org").unwrap(),
            bundle_endpoint_url: "https://other.org:8443/".to_owned(),
            profile: BundleEndpointProfile::HttpsWeb,
            from_config: false,
        };
        r.validate(&own).unwrap();
        for bad in [
            "http://other.org/",
            "https://user:pw@other.org/",
            "https:///x",
            "https://other.org/#frag",
            "https://other .org/",
            "https://other.org:0/",
            "https://other.org:99999/",
            "https://other.org:/",
            "https://other.org:+80/",
            "https://a..b/",
            "https://-a.org/",
            "https://*.other.org/",
            "https://[::1/",
            "https://[zz::1]/",
            "https://[::1]x/",
            &format!("https://other.org/{}", "p".repeat(MAX_URL_LEN)),
        ] {
            r.bundle_endpoint_url = bad.to_owned();
            assert!(r.validate(&own).is_err(), "{bad}");
        }
        for good in [
            "https://other.org/",
            "https://other.org:8443/bundle?x=1",
            "https://127.0.0.1:8443",
            "https://[::1]:8443/",
            "https://[::1]",
        ] {
            r.bundle_endpoint_url = good.to_owned();
            r.validate(&own).unwrap();
        }
        r.trust_domain = own.clone();
        assert!(r.validate(&own).is_err());
    }
}
