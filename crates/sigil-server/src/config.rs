//! Server configuration: the TOML file of `sigil server run`, validated into a
//! typed runtime config. Every key is documented in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sigil_types::TrustDomain;
use sigil_types::duration::serde_human;

/// Default address of the agent API (mutual TLS).
pub const DEFAULT_BIND: &str = "0.0.0.0:8081";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil/server/admin.sock";
/// Default data directory (database and keys).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sigil/server";

pub use sigil_types::config::ConfigError;

/// The `[server]` file format, as written by users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// The server's settings.
    pub server: ServerSection,
}

/// Keys of the `[server]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// The trust domain, e.g. `example.org`.
    pub trust_domain: String,
    /// Where agents connect (mutual TLS, gRPC).
    #[serde(default = "default_bind")]
    pub bind_address: String,
    /// The admin API's Unix socket (mode 0600).
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Database and keys.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Lifetime of each X.509 CA and JWT signing authority.
    #[serde(default = "default_ca_ttl", with = "serde_human")]
    pub ca_ttl: Duration,
    /// Default X509-SVID lifetime for entries without their own.
    #[serde(default = "default_x509_ttl", with = "serde_human")]
    pub default_x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime for entries without their own.
    #[serde(default = "default_jwt_ttl", with = "serde_human")]
    pub default_jwt_svid_ttl: Duration,
    /// Lifetime of agent SVIDs (agents renew at half-life).
    #[serde(default = "default_x509_ttl", with = "serde_human")]
    pub agent_svid_ttl: Duration,
    /// Default lifetime of join tokens.
    #[serde(default = "default_join_token_ttl", with = "serde_human")]
    pub join_token_ttl: Duration,
    /// Address of the HTTP listener for /healthz, /readyz and /metrics; none when absent.
    #[serde(default)]
    pub health_address: Option<String>,
    /// `spiffe_refresh_hint` published in the bundle.
    #[serde(default = "default_refresh_hint", with = "serde_human")]
    pub bundle_refresh_hint: Duration,
}

fn default_bind() -> String {
    DEFAULT_BIND.to_owned()
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_ca_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_x509_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_jwt_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_join_token_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_refresh_hint() -> Duration {
    Duration::from_secs(300)
}

/// The validated runtime configuration of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Agent API address.
    pub bind_address: SocketAddr,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Data directory.
    pub data_dir: PathBuf,
    /// CA and JWT authority lifetime.
    pub ca_ttl: Duration,
    /// Default X509-SVID lifetime.
    pub default_x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub default_jwt_svid_ttl: Duration,
    /// Agent SVID lifetime.
    pub agent_svid_ttl: Duration,
    /// Default join token lifetime.
    pub join_token_ttl: Duration,
    /// Health/metrics listener.
    pub health_address: Option<SocketAddr>,
    /// Bundle refresh hint.
    pub bundle_refresh_hint: Duration,
    /// How often the CA manager checks for rotation.
    pub rotation_tick: Duration,
}

impl ServerConfig {
    /// A configuration with every default, for `sigil dev` and tests.
    pub fn with_defaults(trust_domain: TrustDomain, data_dir: PathBuf) -> Self {
        Self {
            trust_domain,
            bind_address: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_socket: data_dir.join("admin.sock"),
            data_dir,
            ca_ttl: default_ca_ttl(),
            default_x509_svid_ttl: default_x509_ttl(),
            default_jwt_svid_ttl: default_jwt_ttl(),
            agent_svid_ttl: default_x509_ttl(),
            join_token_ttl: default_join_token_ttl(),
            health_address: None,
            bundle_refresh_hint: default_refresh_hint(),
            rotation_tick: Duration::from_secs(10),
        }
    }

    /// Reads and validates a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    /// Parses and validates TOML text; `path` only labels errors.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Self, ConfigError> {
        let file: ServerFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from("<inline>")),
            message: e.to_string(),
        })?;
        let s = file.server;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.map(Path::to_owned),
            key,
            message,
        };
        let trust_domain = TrustDomain::new(&s.trust_domain)
            .map_err(|e| invalid("server.trust_domain", e.to_string()))?;
        let bind_address = s
            .bind_address
            .parse()
            .map_err(|e| invalid("server.bind_address", format!("{:?}: {e}", s.bind_address)))?;
        let health_address = s
            .health_address
            .as_deref()
            .map(|a| {
                a.parse()
                    .map_err(|e| invalid("server.health_address", format!("{a:?}: {e}")))
            })
            .transpose()?;
        if s.ca_ttl < Duration::from_secs(60) {
            return Err(invalid("server.ca_ttl", "must be at least 1m".into()));
        }
        for (key, ttl) in [
            ("server.default_x509_svid_ttl", s.default_x509_svid_ttl),
            ("server.default_jwt_svid_ttl", s.default_jwt_svid_ttl),
            ("server.agent_svid_ttl", s.agent_svid_ttl),
            ("server.join_token_ttl", s.join_token_ttl),
        ] {
            if ttl < Duration::from_secs(1) {
                return Err(invalid(key, "must be at least 1s".into()));
            }
        }
        if s.default_x509_svid_ttl > s.ca_ttl / 2 {
            return Err(invalid(
                "server.default_x509_svid_ttl",
                format!(
                    "must not exceed half of ca_ttl ({}), or SVIDs would outlive rotation",
                    sigil_types::duration::format(s.ca_ttl / 2)
                ),
            ));
        }
        Ok(Self {
            trust_domain,
            bind_address,
            admin_socket: s.admin_socket,
            data_dir: s.data_dir,
            ca_ttl: s.ca_ttl,
            default_x509_svid_ttl: s.default_x509_svid_ttl,
            default_jwt_svid_ttl: s.default_jwt_svid_ttl,
            agent_svid_ttl: s.agent_svid_ttl,
            join_token_ttl: s.join_token_ttl,
            health_address,
            bundle_refresh_hint: s.bundle_refresh_hint,
            rotation_tick: Duration::from_secs(10),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = ServerConfig::parse("[server]\ntrust_domain = \"example.org\"\n", None).unwrap();
        assert_eq!(c.trust_domain.name(), "example.org");
        assert_eq!(c.bind_address.port(), 8081);
        assert_eq!(c.ca_ttl, Duration::from_secs(86400));
        assert_eq!(c.default_x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.default_jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = ServerConfig::parse(
            "[server]\ntrust_domain = \"example.org\"\nca_tll = \"1h\"\n",
            Some(Path::new("s.toml")),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ca_tll") && err.contains("s.toml"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("trust_domain = \"Bad Domain\"", "trust_domain"),
            ("trust_domain = \"a.org\"\nca_ttl = \"10\"", "ca_ttl"),
            (
                "trust_domain = \"a.org\"\nbind_address = \"nowhere\"",
                "bind_address",
            ),
            (
                "trust_domain = \"a.org\"\nca_ttl = \"1h\"\ndefault_x509_svid_ttl = \"45m\"",
                "default_x509_svid_ttl",
            ),
        ] {
            let err = ServerConfig::parse(&format!("[server]\n{text}\n"), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
    }
}
