//! The `[server.oidc]` table and `server.jwt_issuer`: what users write, the
//! validated listener settings, and the URL rules clouds impose.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use sigil_types::config::ConfigError;

use super::KEYS_PATH;

/// Keys of the `[server.oidc]` table, as written by users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSection {
    /// Where the discovery endpoints listen, e.g. `0.0.0.0:8443`.
    pub address: String,
    /// The issuer the document names; defaults to `server.jwt_issuer` and
    /// must equal it.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The `jwks_uri` the document names; defaults to `<issuer>/keys`.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// PEM certificate chain to serve HTTPS with; without it (and
    /// `key_file`) the endpoints are plain HTTP, for a TLS-terminating proxy.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// The validated `[server.oidc]` table: where and how the server serves
/// OIDC discovery (`/.well-known/openid-configuration` and the JWKS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// The listener address.
    pub address: SocketAddr,
    /// The issuer: equal to the `iss` of every JWT-SVID.
    pub issuer: String,
    /// The `jwks_uri` published in the discovery document.
    pub jwks_uri: String,
    /// The certificate and key of the HTTPS listener; `None`: plain HTTP.
    pub tls: Option<OidcTls>,
}

/// The certificate files of the OIDC discovery listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcTls {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Validates `[server.oidc]` against the JWT issuer.
pub(crate) fn parse(
    s: OidcSection,
    jwt_issuer: Option<&str>,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<OidcConfig, ConfigError> {
    let address = s
        .address
        .parse()
        .map_err(|e| invalid("server.oidc.address", format!("{:?}: {e}", s.address)))?;
    let issuer = match (s.issuer, jwt_issuer) {
        (Some(i), Some(j)) if i != j => {
            return Err(invalid(
                "server.oidc.issuer",
                format!(
                    "{i:?} differs from server.jwt_issuer {j:?}; the discovery document's \
                     issuer must be exactly the iss of the tokens (leave issuer out to use \
                     jwt_issuer)"
                ),
            ));
        }
        (_, Some(j)) => j.to_owned(),
        (Some(i), None) => {
            return Err(invalid(
                "server.oidc.issuer",
                format!(
                    "is set but server.jwt_issuer is not, so JWT-SVIDs would carry no iss \
                     and no cloud would accept them; set server.jwt_issuer = {i:?} \
                     (issuer here may then be left out)"
                ),
            ));
        }
        (None, None) => {
            return Err(invalid(
                "server.jwt_issuer",
                "is required with [server.oidc]: the https:// URL the discovery document \
                 is published under, e.g. \"https://oidc.example.org\""
                    .into(),
            ));
        }
    };
    let jwks_uri = match s.jwks_uri {
        Some(uri) => {
            validate_https_url(&uri).map_err(|e| invalid("server.oidc.jwks_uri", e.to_string()))?;
            uri
        }
        None => default_jwks_uri(&issuer),
    };
    let tls = match (s.cert_file, s.key_file) {
        (Some(cert_file), Some(key_file)) => Some(OidcTls {
            cert_file,
            key_file,
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                "server.oidc.key_file",
                "is required with cert_file".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "server.oidc.cert_file",
                "is required with key_file".into(),
            ));
        }
    };
    Ok(OidcConfig {
        address,
        issuer,
        jwks_uri,
        tls,
    })
}

/// Checks an `https://host[:port][/path]` URL without user information,
/// query or fragment: what clouds accept as an OIDC issuer or `jwks_uri`
/// (docs/cloud-identity.md).
pub fn validate_https_url(url: &str) -> Result<(), UrlError> {
    sigil_types::federation::check_https_url(url).map_err(|why| UrlError::NotHttps {
        url: sigil_types::text::clip(url, sigil_types::text::MAX_ECHO_BYTES).into_owned(),
        why,
    })?;
    if url.contains('?') {
        return Err(UrlError::Query(url.to_owned()));
    }
    Ok(())
}

/// Why a URL cannot be an OIDC issuer or `jwks_uri`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not an `https://` URL with a host, or it has user information, a
    /// fragment or whitespace (the URL is clipped for the message).
    #[error("{url:?} {why}")]
    NotHttps {
        /// The URL, clipped.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The URL has a query.
    #[error("{0:?} must not have a query")]
    Query(String),
}

/// Checks a JWT issuer (`jwt_issuer`): the exact string tokens carry as
/// `iss` and relying parties compare, an https URL per
/// [`validate_https_url`]. A trailing slash is kept and matters.
pub fn validate_issuer(issuer: &str) -> Result<(), UrlError> {
    validate_https_url(issuer)
}

/// The default `jwks_uri` of an issuer: `<issuer without trailing slash>/keys`.
pub fn default_jwks_uri(issuer: &str) -> String {
    format!("{}{KEYS_PATH}", issuer.trim_end_matches('/'))
}
