//! `[server.federation]`: the bundle endpoint this server serves and the
//! relationships it configures statically (docs/configuration.md,
//! docs/federation.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use sigil_types::config::ConfigError;
use sigil_types::{BundleEndpointProfile, FederationRelationship, TrustDomain};

/// The smallest interval between two fetches of a bundle endpoint, whatever
/// refresh hint the endpoint publishes; also the first retry delay after a
/// failed fetch.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Keys of the `[server.federation]` table, as written by users.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    /// `[server.federation.bundle_endpoint]`: serve this trust domain's bundle.
    #[serde(default)]
    pub bundle_endpoint: Option<BundleEndpointSection>,
    /// `[server.federation.federates_with."<trust domain>"]`, one per
    /// foreign trust domain.
    #[serde(default)]
    pub federates_with: BTreeMap<String, FederatesWithSection>,
}

/// Keys of `[server.federation.bundle_endpoint]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpointSection {
    /// `ip:port` to listen on, e.g. `0.0.0.0:8443`.
    pub address: String,
    /// `https_spiffe` (the server's own SVID) or `https_web` (`cert_file` and `key_file`).
    #[serde(default = "default_serve_profile")]
    pub profile: String,
    /// PEM certificate chain of `https_web`, leaf first.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `https_web` (PKCS#8, SEC1 or PKCS#1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Not a key of this table: the hint is `server.bundle_refresh_hint`.
    /// Accepted by the parser only to say so.
    #[serde(default)]
    pub refresh_hint: Option<toml::Value>,
}

fn default_serve_profile() -> String {
    "https_spiffe".to_owned()
}

/// Keys of `[server.federation.federates_with."<trust domain>"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatesWithSection {
    /// `https://` URL of the foreign trust domain's bundle endpoint.
    pub bundle_endpoint_url: String,
    /// `https_spiffe` or `https_web`.
    pub bundle_endpoint_profile: String,
    /// The SPIFFE ID the endpoint presents (`https_spiffe` only).
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    /// A SPIFFE bundle JSON file of the foreign trust domain, stored at start
    /// when the server holds no bundle of it yet.
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
    /// PEM CA certificates trusted for an `https_web` endpoint, besides the
    /// system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// How the bundle endpoint authenticates itself to its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServeProfile {
    /// TLS with the server's own X509-SVID (`spiffe://<td>/sigil/server`),
    /// following its rotation.
    HttpsSpiffe,
    /// TLS with a Web PKI certificate and key, read at start.
    HttpsWeb {
        /// PEM chain, leaf first.
        cert_file: PathBuf,
        /// PEM private key.
        key_file: PathBuf,
    },
}

/// The validated `[server.federation.bundle_endpoint]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpointConfig {
    /// Where to listen (port 0: any free port, see `ServerHandle::bundle_endpoint_addr`).
    pub address: SocketAddr,
    /// How the endpoint authenticates itself.
    pub profile: ServeProfile,
}

/// One validated `[server.federation.federates_with."<td>"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredRelationship {
    /// The relationship (`from_config` is set).
    pub relationship: FederationRelationship,
    /// A bootstrap bundle file, stored at start when none is held yet.
    pub bundle_file: Option<PathBuf>,
    /// Extra PEM roots for an `https_web` endpoint.
    pub ca_file: Option<PathBuf>,
}

/// The validated `[server.federation]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// The bundle endpoint; `None`: not served.
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// Relationships from the config file, by foreign trust domain.
    pub federates_with: BTreeMap<TrustDomain, ConfiguredRelationship>,
    /// The least time between two fetches of one endpoint, and the first
    /// retry delay after a failure. Not a file key: tests shorten it.
    pub min_refresh_interval: Duration,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            bundle_endpoint: None,
            federates_with: BTreeMap::new(),
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
        }
    }
}

/// Validates `[server.federation]` for a server of trust domain `own`.
/// Files are read when the server starts.
pub(crate) fn parse(
    s: FederationSection,
    own: &TrustDomain,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<FederationConfig, ConfigError> {
    let bundle_endpoint = s
        .bundle_endpoint
        .map(|e| bundle_endpoint(e, invalid))
        .transpose()?;
    let mut federates_with = BTreeMap::new();
    for (name, section) in s.federates_with {
        let r = relationship(&name, section, own, invalid)?;
        federates_with.insert(r.relationship.trust_domain.clone(), r);
    }
    Ok(FederationConfig {
        bundle_endpoint,
        federates_with,
        min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
    })
}

fn bundle_endpoint(
    e: BundleEndpointSection,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<BundleEndpointConfig, ConfigError> {
    if e.refresh_hint.is_some() {
        return Err(invalid(
            "server.federation.bundle_endpoint.refresh_hint",
            "is not a key of this table; the published hint is server.bundle_refresh_hint".into(),
        ));
    }
    let address = e.address.parse().map_err(|err| {
        invalid(
            "server.federation.bundle_endpoint.address",
            format!("{:?}: {err}", e.address),
        )
    })?;
    let profile = match e.profile.as_str() {
        "https_spiffe" => {
            for (key, set) in [
                (
                    "server.federation.bundle_endpoint.cert_file",
                    e.cert_file.is_some(),
                ),
                (
                    "server.federation.bundle_endpoint.key_file",
                    e.key_file.is_some(),
                ),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "is only used with profile = \"https_web\" (https_spiffe serves the \
                         server's own SVID)"
                            .into(),
                    ));
                }
            }
            ServeProfile::HttpsSpiffe
        }
        "https_web" => {
            let need = |key: &'static str, v: Option<PathBuf>| {
                v.ok_or_else(|| invalid(key, "is required with profile = \"https_web\"".into()))
            };
            ServeProfile::HttpsWeb {
                cert_file: need("server.federation.bundle_endpoint.cert_file", e.cert_file)?,
                key_file: need("server.federation.bundle_endpoint.key_file", e.key_file)?,
            }
        }
        other => {
            return Err(invalid(
                "server.federation.bundle_endpoint.profile",
                format!("{other:?} is not a profile (use \"https_spiffe\" or \"https_web\")"),
            ));
        }
    };
    Ok(BundleEndpointConfig { address, profile })
}

fn relationship(
    name: &str,
    s: FederatesWithSection,
    own: &TrustDomain,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<ConfiguredRelationship, ConfigError> {
    let msg = |m: String| format!("{m} (in [server.federation.federates_with.\"{name}\"])");
    let trust_domain = TrustDomain::new(name).map_err(|e| {
        invalid(
            "server.federation.federates_with",
            msg(format!("{name:?} is not a trust domain name: {e}")),
        )
    })?;
    let profile = BundleEndpointProfile::from_parts(
        &s.bundle_endpoint_profile,
        s.endpoint_spiffe_id.as_deref(),
    )
    .map_err(|e| {
        let key = if s.endpoint_spiffe_id.is_some() || e.to_string().contains("endpoint_spiffe_id")
        {
            "server.federation.federates_with.endpoint_spiffe_id"
        } else {
            "server.federation.federates_with.bundle_endpoint_profile"
        };
        invalid(key, msg(e.to_string()))
    })?;
    if s.ca_file.is_some() && profile != BundleEndpointProfile::HttpsWeb {
        return Err(invalid(
            "server.federation.federates_with.ca_file",
            msg("is only used with bundle_endpoint_profile = \"https_web\"".into()),
        ));
    }
    let relationship = FederationRelationship {
        trust_domain,
        bundle_endpoint_url: s.bundle_endpoint_url,
        profile,
        from_config: true,
    };
    relationship.validate(own).map_err(|e| {
        let key = if relationship.trust_domain == *own {
            "server.federation.federates_with"
        } else {
            "server.federation.federates_with.bundle_endpoint_url"
        };
        invalid(key, msg(e.to_string()))
    })?;
    Ok(ConfiguredRelationship {
        relationship,
        bundle_file: s.bundle_file,
        ca_file: s.ca_file,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ServerConfig;

    const HEAD: &str = "[server]\ntrust_domain = \"example.org\"\n";

    fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::parse(&format!("{HEAD}{text}"), Some(Path::new("s.toml")))
    }

    #[test]
    fn no_table_means_no_federation() {
        let c = parse("").unwrap();
        assert_eq!(c.federation, FederationConfig::default());
    }

    #[test]
    fn every_key_is_taken() {
        let c = parse(
            "[server.federation.bundle_endpoint]\n\
             address = \"0.0.0.0:8443\"\n\
             [server.federation.federates_with.\"partner.org\"]\n\
             bundle_endpoint_url = \"https://partner.org:8443\"\n\
             bundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://partner.org/spire/server\"\n\
             bundle_file = \"/etc/sigil/partner.json\"\n\
             [server.federation.federates_with.\"web.example\"]\n\
             bundle_endpoint_url = \"https://bundle.web.example/\"\n\
             bundle_endpoint_profile = \"https_web\"\n\
             ca_file = \"/etc/sigil/web-ca.pem\"\n",
        )
        .unwrap();
        let f = &c.federation;
        assert_eq!(
            f.bundle_endpoint,
            Some(BundleEndpointConfig {
                address: "0.0.0.0:8443".parse().unwrap(),
                profile: ServeProfile::HttpsSpiffe,
            })
        );
        let partner = &f.federates_with[&TrustDomain::new("partner.org").unwrap()];
        assert!(partner.relationship.from_config);
        assert_eq!(
            partner
                .relationship
                .profile
                .endpoint_spiffe_id()
                .unwrap()
                .as_str(),
            "spiffe://partner.org/spire/server"
        );
        assert_eq!(
            partner.bundle_file.as_deref(),
            Some(Path::new("/etc/sigil/partner.json"))
        );
        let web = &f.federates_with[&TrustDomain::new("web.example").unwrap()];
        assert_eq!(web.relationship.profile, BundleEndpointProfile::HttpsWeb);
        assert_eq!(
            web.ca_file.as_deref(),
            Some(Path::new("/etc/sigil/web-ca.pem"))
        );

        let c = parse(
            "[server.federation.bundle_endpoint]\n\
             address = \"127.0.0.1:0\"\n\
             profile = \"https_web\"\n\
             cert_file = \"/c.pem\"\n\
             key_file = \"/k.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            c.federation.bundle_endpoint.unwrap().profile,
            ServeProfile::HttpsWeb {
                cert_file: "/c.pem".into(),
                key_file: "/k.pem".into()
            }
        );
    }

    #[test]
    fn errors_name_the_key() {
        let ep = "[server.federation.bundle_endpoint]\n";
        let fw = "[server.federation.federates_with.\"partner.org\"]\n";
        let web = "bundle_endpoint_profile = \"https_web\"\n";
        let url = "bundle_endpoint_url = \"https://partner.org\"\n";
        for (text, key) in [
            (format!("{ep}address = \"nowhere\""), "address"),
            (
                format!("{ep}address = \"0.0.0.0:8443\"\nprofile = \"https\""),
                "profile",
            ),
            (
                format!("{ep}address = \"0.0.0.0:8443\"\nprofile = \"https_web\""),
                "cert_file",
            ),
            (
                format!(
                    "{ep}address = \"0.0.0.0:8443\"\nprofile = \"https_web\"\ncert_file = \"/c\""
                ),
                "key_file",
            ),
            (
                format!("{ep}address = \"0.0.0.0:8443\"\ncert_file = \"/c\""),
                "cert_file",
            ),
            (
                format!("{ep}address = \"0.0.0.0:8443\"\nrefresh_hint = \"5m\""),
                "bundle_refresh_hint",
            ),
            (
                format!("{fw}{web}bundle_endpoint_url = \"http://partner.org\""),
                "bundle_endpoint_url",
            ),
            (
                format!("{fw}{url}bundle_endpoint_profile = \"https_spiffe\""),
                "endpoint_spiffe_id",
            ),
            (
                format!(
                    "{fw}{url}bundle_endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"nope\""
                ),
                "endpoint_spiffe_id",
            ),
            (
                format!("{fw}{url}{web}endpoint_spiffe_id = \"spiffe://partner.org/x\""),
                "endpoint_spiffe_id",
            ),
            (
                format!("{fw}{url}bundle_endpoint_profile = \"web\""),
                "bundle_endpoint_profile",
            ),
            (
                format!(
                    "{fw}{url}bundle_endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://partner.org/x\"\nca_file = \"/ca\""
                ),
                "ca_file",
            ),
            (format!("{fw}{url}{web}bundle_url = \"x\""), "bundle_url"),
            (
                format!("[server.federation.federates_with.\"example.org\"]\n{url}{web}"),
                "federates_with",
            ),
            (
                format!("[server.federation.federates_with.\"Bad TD\"]\n{url}{web}"),
                "Bad TD",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("s.toml"),
                "{err} should name {key}"
            );
        }
    }
}
