//! Agent configuration: the TOML file of `sigil agent run`, validated into a
//! typed runtime config. Every key is documented in docs/configuration.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sigil_types::TrustDomain;

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/sigil/agent/api.sock";
/// Default data directory (agent SVID, bundle, SVID cache).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sigil/agent";

pub use sigil_types::config::ConfigError;

/// The file format.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    agent: AgentSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    trust_domain: String,
    server_address: String,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "default_socket")]
    socket_path: PathBuf,
    #[serde(default)]
    join_token: Option<String>,
    #[serde(default)]
    trust_bundle_path: Option<PathBuf>,
    #[serde(default)]
    discover_workload_path: bool,
    #[serde(default)]
    health_address: Option<String>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

/// The validated runtime configuration of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The trust domain the agent belongs to.
    pub trust_domain: TrustDomain,
    /// `host:port` of the server's agent API.
    pub server_address: String,
    /// Agent SVID, bundle and SVID cache.
    pub data_dir: PathBuf,
    /// The Workload API socket.
    pub socket_path: PathBuf,
    /// Join token for the first attestation.
    pub join_token: Option<String>,
    /// Bootstrap bundle (PEM or SPIFFE JSON); not needed when the join token carries a fingerprint.
    pub trust_bundle_path: Option<PathBuf>,
    /// Add unix:path and unix:sha256 selectors.
    pub discover_workload_path: bool,
    /// Health and metrics listener.
    pub health_address: Option<std::net::SocketAddr>,
    /// Smallest reconnect delay.
    pub min_backoff: Duration,
    /// Largest reconnect delay.
    pub max_backoff: Duration,
}

impl AgentConfig {
    /// A configuration with every default, for `sigil dev` and tests.
    pub fn with_defaults(
        trust_domain: TrustDomain,
        server_address: String,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            trust_domain,
            server_address,
            socket_path: data_dir.join("api.sock"),
            data_dir,
            join_token: None,
            trust_bundle_path: None,
            discover_workload_path: false,
            health_address: None,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
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
        let file: AgentFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from("<inline>")),
            message: e.to_string(),
        })?;
        let a = file.agent;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.map(Path::to_owned),
            key,
            message,
        };
        let trust_domain = TrustDomain::new(&a.trust_domain)
            .map_err(|e| invalid("agent.trust_domain", e.to_string()))?;
        let has_port = a
            .server_address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !has_port {
            return Err(invalid(
                "agent.server_address",
                format!(
                    "{:?} must be host:port, e.g. sigil-server.example.org:8081",
                    a.server_address
                ),
            ));
        }
        let health_address = a
            .health_address
            .as_deref()
            .map(|h| {
                h.parse()
                    .map_err(|e| invalid("agent.health_address", format!("{h:?}: {e}")))
            })
            .transpose()?;
        Ok(Self {
            trust_domain,
            server_address: a.server_address,
            data_dir: a.data_dir,
            socket_path: a.socket_path,
            join_token: a.join_token,
            trust_bundle_path: a.trust_bundle_path,
            discover_workload_path: a.discover_workload_path,
            health_address,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file() {
        let c = AgentConfig::parse(
            "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"127.0.0.1:8081\"\n",
            None,
        )
        .unwrap();
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn errors_name_the_key() {
        for (body, key) in [
            (
                "trust_domain = \"example.org\"\nserver_address = \"nohost\"",
                "server_address",
            ),
            (
                "trust_domain = \"EX AMPLE\"\nserver_address = \"a:1\"",
                "trust_domain",
            ),
            (
                "trust_domain = \"e.org\"\nserver_address = \"a:1\"\nsocket = \"/x\"",
                "socket",
            ),
        ] {
            let err = AgentConfig::parse(&format!("[agent]\n{body}\n"), Some(Path::new("a.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("a.toml"), "{err}");
        }
    }
}
