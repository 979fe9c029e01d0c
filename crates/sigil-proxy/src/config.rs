//! The proxy's configuration file (TOML, every key in docs/proxy.md):
//! parsed strictly (unknown keys are errors) and validated into [`ProxyConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use sigil_types::SpiffeId;

/// The agent socket used when neither the file nor `SPIFFE_ENDPOINT_SOCKET` names one.
pub const DEFAULT_SOCKET: &str = "unix:///run/sigil/agent/api.sock";

/// How long a TLS handshake may take unless configured.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that carry HTTP framing or routing; the caller header may not be one of them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read proxy config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML of this schema (unknown keys, wrong types).
    #[error("invalid proxy config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("invalid proxy config {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `inbound[0].forward_to`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// What an inbound or outbound listener carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any TCP protocol, passed through byte for byte.
    #[default]
    Tcp,
    /// HTTP/1.1 or HTTP/2: denied callers get `403`, unreachable upstreams
    /// `502`, and (inbound) the caller's SPIFFE ID can be put in a header.
    Http,
}

/// One inbound listener: mutual TLS in, plaintext to the local application.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// Where to accept mutual-TLS connections.
    pub listen: SocketAddr,
    /// The local application (`host:port`).
    pub forward_to: String,
    /// What the connections carry.
    pub protocol: Protocol,
    /// With `protocol = "http"`: the header (lowercase) that carries the
    /// caller's SPIFFE ID to the application; copies sent by the caller are removed.
    pub caller_header: Option<String>,
}

/// One outbound listener: plaintext in from the local application, mutual
/// TLS out to one upstream.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// Where the local application connects (a loopback address).
    pub listen: SocketAddr,
    /// The upstream (`host:port`), usually another proxy's inbound listener.
    pub upstream: String,
    /// The SPIFFE ID the upstream must present; `None`: the policy decides
    /// whether this proxy may call the ID the upstream presents.
    pub upstream_spiffe_id: Option<SpiffeId>,
    /// What the connections carry.
    pub protocol: Protocol,
}

/// A validated proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The Workload API socket (`unix:///path`).
    pub workload_api_socket: String,
    /// Use the SVID with this SPIFFE ID (default: the first one the Workload API offers).
    pub spiffe_id: Option<SpiffeId>,
    /// The authorization policy file; required when an inbound listener or
    /// an outbound listener without `upstream_spiffe_id` exists.
    pub policy_file: Option<PathBuf>,
    /// Serve `/metrics`, `/healthz` and `/readyz` here.
    pub metrics_address: Option<SocketAddr>,
    /// The longest a TLS handshake (and upstream connect) may take.
    pub handshake_timeout: Duration,
    /// Inbound listeners.
    pub inbound: Vec<InboundConfig>,
    /// Outbound listeners.
    pub outbound: Vec<OutboundConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    workload_api_socket: Option<String>,
    spiffe_id: Option<String>,
    policy_file: Option<PathBuf>,
    metrics_address: Option<String>,
    handshake_timeout: Option<String>,
    #[serde(default)]
    inbound: Vec<RawInbound>,
    #[serde(default)]
    outbound: Vec<RawOutbound>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    name: Option<String>,
    listen: String,
    forward_to: String,
    #[serde(default)]
    protocol: Protocol,
    caller_header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    name: Option<String>,
    listen: String,
    upstream: String,
    upstream_spiffe_id: Option<String>,
    #[serde(default)]
    protocol: Protocol,
}

impl ProxyConfig {
    /// Reads and validates a config file. A relative `policy_file` is taken
    /// relative to the config file's directory; without `workload_api_socket`
    /// the socket comes from `SPIFFE_ENDPOINT_SOCKET`, else [`DEFAULT_SOCKET`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let env = std::env::var("SPIFFE_ENDPOINT_SOCKET")
            .ok()
            .filter(|s| !s.is_empty());
        Self::parse(&text, path, env)
    }

    /// Parses and validates config text; `path` names the file in errors and
    /// anchors a relative `policy_file`; `env_socket` is `SPIFFE_ENDPOINT_SOCKET`.
    pub fn parse(text: &str, path: &Path, env_socket: Option<String>) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let workload_api_socket = raw
            .workload_api_socket
            .or(env_socket)
            .unwrap_or_else(|| DEFAULT_SOCKET.to_owned());
        crate::source::socket_path(&workload_api_socket)
            .map_err(|e| invalid("workload_api_socket".into(), e.to_string()))?;
        let spiffe_id = raw
            .spiffe_id
            .map(|s| {
                SpiffeId::from_str(&s)
                    .map_err(|e| invalid("spiffe_id".into(), format!("{s:?}: {e}")))
            })
            .transpose()?;
        let policy_file = raw.policy_file.map(|p| {
            if p.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p
            }
        });
        let metrics_address = raw
            .metrics_address
            .map(|a| parse_addr(&a).map_err(|m| invalid("metrics_address".into(), m)))
            .transpose()?;
        let handshake_timeout = match raw.handshake_timeout {
            Some(s) => sigil_types::duration::parse(&s)
                .map_err(|e| invalid("handshake_timeout".into(), e.to_string()))?,
            None => DEFAULT_HANDSHAKE_TIMEOUT,
        };
        if handshake_timeout.is_zero() {
            return Err(invalid(
                "handshake_timeout".into(),
                "must be more than zero".into(),
            ));
        }

        let mut names: Vec<String> = Vec::new();
        let mut listens: Vec<SocketAddr> = Vec::new();
        let mut unique = |key: String, name: &str, listen: SocketAddr| {
            if names.iter().any(|n| n == name) {
                return Err(invalid(
                    key.clone(),
                    format!("the name {name:?} is used twice"),
                ));
            }
            if listen.port() != 0 && listens.contains(&listen) {
                return Err(invalid(key, format!("the address {listen} is used twice")));
            }
            names.push(name.to_owned());
            listens.push(listen);
            Ok(())
        };

        let mut inbound = Vec::new();
        for (i, r) in raw.inbound.into_iter().enumerate() {
            let key = |k: &str| format!("inbound[{i}].{k}");
            let listen = parse_addr(&r.listen).map_err(|m| invalid(key("listen"), m))?;
            check_host_port(&r.forward_to).map_err(|m| invalid(key("forward_to"), m))?;
            let caller_header = match (r.caller_header, r.protocol) {
                (None, _) => None,
                (Some(_), Protocol::Tcp) => {
                    return Err(invalid(
                        key("caller_header"),
                        "needs protocol = \"http\" (a TCP stream has no headers)".into(),
                    ));
                }
                (Some(h), Protocol::Http) => {
                    Some(check_header_name(&h).map_err(|m| invalid(key("caller_header"), m))?)
                }
            };
            let name = r.name.unwrap_or_else(|| format!("inbound-{i}"));
            unique(key("name"), &name, listen)?;
            inbound.push(InboundConfig {
                name,
                listen,
                forward_to: r.forward_to,
                protocol: r.protocol,
                caller_header,
            });
        }

        let mut outbound = Vec::new();
        for (i, r) in raw.outbound.into_iter().enumerate() {
            let key = |k: &str| format!("outbound[{i}].{k}");
            let listen = parse_addr(&r.listen).map_err(|m| invalid(key("listen"), m))?;
            if !listen.ip().is_loopback() {
                return Err(invalid(
                    key("listen"),
                    format!(
                        "{listen} is not a loopback address; anyone who can reach an outbound \
                         listener speaks with this proxy's identity, so it must listen on \
                         127.0.0.1 or [::1]"
                    ),
                ));
            }
            check_host_port(&r.upstream).map_err(|m| invalid(key("upstream"), m))?;
            if r.upstream.parse::<SocketAddr>().ok() == Some(listen) {
                return Err(invalid(
                    key("upstream"),
                    format!(
                        "{} is this listener's own address; each connection would open another",
                        r.upstream
                    ),
                ));
            }
            let upstream_spiffe_id = r
                .upstream_spiffe_id
                .map(|s| {
                    SpiffeId::from_str(&s)
                        .map_err(|e| invalid(key("upstream_spiffe_id"), format!("{s:?}: {e}")))
                })
                .transpose()?;
            let name = r.name.unwrap_or_else(|| format!("outbound-{i}"));
            unique(key("name"), &name, listen)?;
            outbound.push(OutboundConfig {
                name,
                listen,
                upstream: r.upstream,
                upstream_spiffe_id,
                protocol: r.protocol,
            });
        }

        if inbound.is_empty() && outbound.is_empty() {
            return Err(invalid(
                "inbound".into(),
                "no [[inbound]] or [[outbound]] listener is configured".into(),
            ));
        }
        let needs_policy =
            !inbound.is_empty() || outbound.iter().any(|o| o.upstream_spiffe_id.is_none());
        if needs_policy && policy_file.is_none() {
            return Err(invalid(
                "policy_file".into(),
                "required: inbound listeners (and outbound ones without upstream_spiffe_id) \
                 are authorized by the policy, and without one every call would be denied"
                    .into(),
            ));
        }
        Ok(Self {
            workload_api_socket,
            spiffe_id,
            policy_file,
            metrics_address,
            handshake_timeout,
            inbound,
            outbound,
        })
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not an IP address with a port, e.g. 127.0.0.1:8443 or [::]:8443")
    })
}

fn check_host_port(s: &str) -> Result<(), String> {
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be host:port, e.g. 127.0.0.1:8080 or backend.internal:8443"
        ))
    }
}

fn check_header_name(h: &str) -> Result<String, String> {
    let lower = h.to_ascii_lowercase();
    hyper::header::HeaderName::from_str(&lower)
        .map_err(|_| format!("{h:?} is not a valid HTTP header name"))?;
    if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with(':') {
        return Err(format!(
            "{h:?} is an HTTP framing header; pick another name, e.g. x-spiffe-id"
        ));
    }
    Ok(lower)
}
