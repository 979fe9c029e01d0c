//! Server configuration: the TOML file of `sigil server run`, validated into a
//! typed runtime config. Every key is documented in docs/configuration.md.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sigil_svid::jwt::JwtKeyType;
use sigil_types::TrustDomain;
use sigil_types::duration::serde_human;

/// Default address of the agent API (mutual TLS).
pub const DEFAULT_BIND: &str = "0.0.0.0:8081";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil/server/admin.sock";
/// Default data directory (database and keys).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sigil/server";

/// The token audience a PSAT cluster expects unless it names another
/// (`sigil_k8s::psat::DEFAULT_AUDIENCE`).
pub const DEFAULT_PSAT_AUDIENCE: &str = "sigil-server";
/// The node labels a PSAT cluster turns into location selectors unless it
/// names others (`sigil_k8s::psat::DEFAULT_TRUSTED_NODE_LABEL_KEYS`).
pub const DEFAULT_PSAT_TRUSTED_NODE_LABEL_KEYS: [&str; 2] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

pub use crate::federation::config::FederationConfig;
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
    /// Kubernetes PSAT node attestation: one `[server.k8s_psat.<cluster>]`
    /// table per cluster profile.
    #[serde(default)]
    pub k8s_psat: BTreeMap<String, PsatClusterSection>,
    /// Key type of new JWT authorities: `ec-p256` (ES256, the default) or
    /// `rsa-2048` (RS256, for clouds that accept only RSA).
    #[serde(default)]
    pub jwt_key_type: JwtKeyType,
    /// The `iss` claim of JWT-SVIDs (an `https://` URL); none when absent.
    #[serde(default)]
    pub jwt_issuer: Option<String>,
    /// OIDC discovery for cloud IAMs: `[server.oidc]`.
    #[serde(default)]
    pub oidc: Option<OidcSection>,
    /// Federation: `[server.federation]` (docs/federation.md).
    #[serde(default)]
    pub federation: crate::federation::config::FederationSection,
    /// Bounds on clients: `[server.limits]` (docs/security.md, "Limits").
    #[serde(default)]
    pub limits: crate::limits::LimitsSection,
    /// Where entries, agents and the authority journal live: `[server.store]`.
    #[serde(default)]
    pub store: StoreSection,
}

/// Keys of the `[server.store]` table, as written by users.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite` (the default: `<data_dir>/sigil.db`) or `postgres`.
    #[serde(default)]
    pub driver: StoreDriver,
    /// PostgreSQL: `postgres://user[:password]@host[:port]/database[?sslmode=...]`.
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL: a file holding the URL (say, a mounted secret), instead of `url`.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
}

/// The database behind the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDriver {
    /// SQLite embedded in the server, in the data directory: one server.
    #[default]
    Sqlite,
    /// A PostgreSQL database, which several servers can share.
    Postgres,
}

/// The validated store choice.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// SQLite at `<data_dir>/sigil.db`.
    Sqlite,
    /// PostgreSQL at this URL.
    Postgres {
        /// The connection URL (it may hold a password; never logged).
        url: String,
    },
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite => f.write_str("Sqlite"),
            Self::Postgres { .. } => f.write_str("Postgres { url: <redacted> }"),
        }
    }
}

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

/// Keys of a `[server.k8s_psat.<cluster>]` table, as written by users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PsatClusterSection {
    /// Service accounts whose tokens may attest agents, `namespace:name`.
    pub service_account_allow_list: Vec<String>,
    /// The audience the agents' projected tokens must carry.
    #[serde(default = "default_psat_audience")]
    pub audience: String,
    /// How tokens are verified.
    #[serde(default)]
    pub verification: PsatVerificationMode,
    /// The cluster's JWKS (`kubectl get --raw /openid/v1/jwks`); offline_jwks only.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The cluster's service account issuer (`iss`); offline_jwks only.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Node labels that may become `k8s_psat:region:` / `k8s_psat:zone:`.
    #[serde(default = "default_trusted_node_label_keys")]
    pub trusted_node_label_keys: Vec<String>,
    /// Node labels copied into `k8s_psat:agent_node_label:` selectors.
    #[serde(default)]
    pub allowed_node_label_keys: Vec<String>,
    /// Pod labels copied into `k8s_psat:agent_pod_label:` selectors.
    #[serde(default)]
    pub allowed_pod_label_keys: Vec<String>,
    /// A kubeconfig for the cluster's API server; absent: inferred
    /// (`KUBECONFIG`, `~/.kube/config`, then the in-cluster service account).
    #[serde(default)]
    pub kube_config_file: Option<PathBuf>,
}

/// The `verification` key of a PSAT cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PsatVerificationMode {
    /// Ask the API server (TokenReview) about every token.
    #[default]
    TokenReview,
    /// Verify signatures against `jwks_file`; the API server is optional.
    OfflineJwks,
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
fn default_psat_audience() -> String {
    DEFAULT_PSAT_AUDIENCE.to_owned()
}
fn default_trusted_node_label_keys() -> Vec<String> {
    DEFAULT_PSAT_TRUSTED_NODE_LABEL_KEYS
        .iter()
        .map(|k| (*k).to_owned())
        .collect()
}

/// How the server verifies one PSAT cluster's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PsatVerification {
    /// A TokenReview per token; needs the cluster's API server.
    TokenReview,
    /// Signatures checked against the cluster's JWKS, read from `jwks_file`
    /// at start; the API server is asked about the pod and node when reachable.
    OfflineJwks {
        /// The JWKS document (`{"keys":[…]}`).
        jwks_file: PathBuf,
        /// The exact `iss` of the cluster's tokens.
        issuer: String,
    },
}

/// One validated `[server.k8s_psat.<cluster>]` profile; the server builds a
/// `sigil_k8s::psat::PsatVerifier` from it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsatCluster {
    /// Service accounts whose tokens may attest agents, `namespace:name`.
    pub service_account_allow_list: Vec<String>,
    /// The audience the agents' tokens must carry.
    pub audience: String,
    /// How tokens are verified.
    pub verification: PsatVerification,
    /// Node labels that may become location selectors.
    pub trusted_node_label_keys: Vec<String>,
    /// Node labels copied into `k8s_psat:agent_node_label:` selectors.
    pub allowed_node_label_keys: Vec<String>,
    /// Pod labels copied into `k8s_psat:agent_pod_label:` selectors.
    pub allowed_pod_label_keys: Vec<String>,
    /// The kubeconfig of the cluster's API server; `None`: inferred.
    pub kube_config_file: Option<PathBuf>,
}

impl PsatCluster {
    /// A profile with the default audience and trusted label keys, no label
    /// selectors and an inferred API client.
    pub fn new(service_account_allow_list: Vec<String>, verification: PsatVerification) -> Self {
        Self {
            service_account_allow_list,
            audience: DEFAULT_PSAT_AUDIENCE.to_owned(),
            verification,
            trusted_node_label_keys: default_trusted_node_label_keys(),
            allowed_node_label_keys: Vec::new(),
            allowed_pod_label_keys: Vec::new(),
            kube_config_file: None,
        }
    }
}

/// Whether `name` can be a cluster profile name: it becomes a SPIFFE ID path
/// segment of agent IDs and part of the `k8s_psat:cluster:` selector.
pub(crate) fn check_psat_cluster_name(name: &str) -> Result<(), ClusterNameError> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(ClusterNameError::NotASegment(name.to_owned()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(ClusterNameError::Character {
            name: name.to_owned(),
            c,
        });
    }
    Ok(())
}

/// Why a name cannot be a PSAT cluster profile name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ClusterNameError {
    /// Empty, `.` or `..`.
    #[error("{0:?} cannot be a SPIFFE ID path segment")]
    NotASegment(String),
    /// A character outside letters, digits, `.`, `-`, `_`.
    #[error(
        "{name:?} contains {c:?}; a cluster name is a SPIFFE ID path segment (letters, digits, '.', '-', '_')"
    )]
    Character {
        /// The name.
        name: String,
        /// Its first bad character.
        c: char,
    },
}

/// Validates one `[server.k8s_psat.<name>]` table into a [`PsatCluster`].
/// What needs files or the API server (the JWKS, the kubeconfig, the label
/// key rules) is checked when the server starts.
fn psat_cluster(
    name: &str,
    s: PsatClusterSection,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<PsatCluster, ConfigError> {
    check_psat_cluster_name(name).map_err(|e| invalid("server.k8s_psat", e.to_string()))?;
    let msg = |m: &str| format!("{m} (in [server.k8s_psat.{name}])");
    if cfg!(not(feature = "k8s")) {
        return Err(invalid(
            "server.k8s_psat",
            msg("this server was built without Kubernetes support (cargo feature \"k8s\")"),
        ));
    }
    if s.service_account_allow_list.is_empty() {
        return Err(invalid(
            "server.k8s_psat.service_account_allow_list",
            msg("must name at least one service account (\"namespace:name\")"),
        ));
    }
    for entry in &s.service_account_allow_list {
        let ok = matches!(entry.split_once(':'),
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':'));
        if !ok {
            return Err(invalid(
                "server.k8s_psat.service_account_allow_list",
                msg(&format!("{entry:?} is not of the form \"namespace:name\"")),
            ));
        }
    }
    if s.audience.is_empty() || s.audience.chars().any(char::is_control) {
        return Err(invalid(
            "server.k8s_psat.audience",
            msg("must be a non-empty string"),
        ));
    }
    let verification = match s.verification {
        PsatVerificationMode::TokenReview => {
            for (key, set) in [
                ("server.k8s_psat.jwks_file", s.jwks_file.is_some()),
                ("server.k8s_psat.issuer", s.issuer.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        msg("is only used with verification = \"offline_jwks\""),
                    ));
                }
            }
            PsatVerification::TokenReview
        }
        PsatVerificationMode::OfflineJwks => {
            let jwks_file = s.jwks_file.ok_or_else(|| {
                invalid(
                    "server.k8s_psat.jwks_file",
                    msg("is required with verification = \"offline_jwks\""),
                )
            })?;
            let issuer = s.issuer.filter(|i| !i.is_empty()).ok_or_else(|| {
                invalid(
                    "server.k8s_psat.issuer",
                    msg("is required with verification = \"offline_jwks\" (the tokens' iss)"),
                )
            })?;
            PsatVerification::OfflineJwks { jwks_file, issuer }
        }
    };
    Ok(PsatCluster {
        service_account_allow_list: s.service_account_allow_list,
        audience: s.audience,
        verification,
        trusted_node_label_keys: s.trusted_node_label_keys,
        allowed_node_label_keys: s.allowed_node_label_keys,
        allowed_pod_label_keys: s.allowed_pod_label_keys,
        kube_config_file: s.kube_config_file,
    })
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
fn oidc_config(
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
            crate::oidc::validate_https_url(&uri)
                .map_err(|e| invalid("server.oidc.jwks_uri", e.to_string()))?;
            uri
        }
        None => crate::oidc::default_jwks_uri(&issuer),
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
    /// Kubernetes PSAT cluster profiles by name (`[server.k8s_psat.<name>]`);
    /// empty: `AttestPsat` refuses every cluster.
    pub k8s_psat: BTreeMap<String, PsatCluster>,
    /// Key type of JWT authorities created from now on; existing ones keep
    /// signing until the next rotation (see docs/cloud-identity.md).
    pub jwt_key_type: JwtKeyType,
    /// The `iss` of JWT-SVIDs; `None`: tokens carry no `iss`.
    pub jwt_issuer: Option<String>,
    /// OIDC discovery; `None`: not served.
    pub oidc: Option<OidcConfig>,
    /// The bundle endpoint and the configured federation relationships.
    pub federation: FederationConfig,
    /// Message sizes, rate limits, connection caps and timeouts.
    pub limits: crate::limits::ServerLimits,
    /// The database.
    pub store: StoreConfig,
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
            k8s_psat: BTreeMap::new(),
            jwt_key_type: JwtKeyType::default(),
            jwt_issuer: None,
            oidc: None,
            federation: FederationConfig::default(),
            limits: crate::limits::ServerLimits::default(),
            store: StoreConfig::Sqlite,
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
        let mut k8s_psat = BTreeMap::new();
        for (name, section) in s.k8s_psat {
            let cluster = psat_cluster(&name, section, &invalid)?;
            k8s_psat.insert(name, cluster);
        }
        let federation = crate::federation::config::parse(s.federation, &trust_domain, &invalid)?;
        let limits = crate::limits::parse(s.limits, &invalid)?;
        if let Some(issuer) = &s.jwt_issuer {
            crate::oidc::validate_issuer(issuer)
                .map_err(|e| invalid("server.jwt_issuer", e.to_string()))?;
        }
        let oidc = s
            .oidc
            .map(|o| oidc_config(o, s.jwt_issuer.as_deref(), &invalid))
            .transpose()?;
        let store = store_config(s.store, &invalid)?;
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
            k8s_psat,
            jwt_key_type: s.jwt_key_type,
            jwt_issuer: s.jwt_issuer,
            oidc,
            federation,
            limits,
            store,
        })
    }
}

fn store_config(
    s: StoreSection,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<StoreConfig, ConfigError> {
    match s.driver {
        StoreDriver::Sqlite => {
            if s.url.is_some() || s.url_file.is_some() {
                return Err(invalid(
                    "server.store.url",
                    "url and url_file apply to driver = \"postgres\" only".into(),
                ));
            }
            Ok(StoreConfig::Sqlite)
        }
        StoreDriver::Postgres => {
            if !cfg!(feature = "postgres") {
                return Err(invalid(
                    "server.store.driver",
                    "this build of sigil has no PostgreSQL support (cargo feature `postgres`)"
                        .into(),
                ));
            }
            let url = match (s.url, s.url_file) {
                (Some(url), None) => url,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .map_err(|e| {
                        invalid(
                            "server.store.url_file",
                            format!("cannot read {}: {e}", file.display()),
                        )
                    })?
                    .trim()
                    .to_owned(),
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "server.store.url",
                        "set url or url_file, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        "server.store.url",
                        "driver = \"postgres\" needs url (or url_file), e.g. \
                         postgres://sigil@db.example:5432/sigil"
                            .into(),
                    ));
                }
            };
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                // Never echo the value: it may hold a password.
                return Err(invalid(
                    "server.store.url",
                    "must be a postgres:// or postgresql:// URL".into(),
                ));
            }
            Ok(StoreConfig::Postgres { url })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_defaults_to_sqlite_and_postgres_needs_a_url() {
        let base = "[server]\ntrust_domain = \"example.org\"\n";
        assert_eq!(
            ServerConfig::parse(base, None).unwrap().store,
            StoreConfig::Sqlite
        );
        let err = |extra: &str| {
            ServerConfig::parse(&format!("{base}[server.store]\n{extra}"), None)
                .unwrap_err()
                .to_string()
        };
        assert!(err("driver = \"mysql\"\n").contains("driver"));
        assert!(err("url = \"postgres://x/y\"\n").contains("postgres\" only"));
        if cfg!(feature = "postgres") {
            assert!(err("driver = \"postgres\"\n").contains("needs url"));
            let bad = err("driver = \"postgres\"\nurl = \"mysql://u:secret@h/d\"\n");
            assert!(bad.contains("postgres:// or postgresql://"), "{bad}");
            assert!(!bad.contains("secret"), "the URL is never echoed: {bad}");
            let both = err("driver = \"postgres\"\nurl = \"postgres://h/d\"\nurl_file = \"/f\"\n");
            assert!(both.contains("not both"));
            let missing = err("driver = \"postgres\"\nurl_file = \"/nonexistent/sigil-url\"\n");
            assert!(missing.contains("cannot read /nonexistent/sigil-url"));

            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("url");
            std::fs::write(&file, "postgres://sigil:pw@db:5432/sigil\n").unwrap();
            let c = ServerConfig::parse(
                &format!(
                    "{base}[server.store]\ndriver = \"postgres\"\nurl_file = {:?}\n",
                    file.display().to_string()
                ),
                None,
            )
            .unwrap();
            assert_eq!(
                c.store,
                StoreConfig::Postgres {
                    url: "postgres://sigil:pw@db:5432/sigil".into()
                }
            );
            assert!(!format!("{c:?}").contains("pw@"), "Debug redacts the URL");
        } else {
            assert!(
                err("driver = \"postgres\"\nurl = \"postgres://h/d\"\n")
                    .contains("no PostgreSQL support")
            );
        }
    }

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

    const PSAT_HEAD: &str = "[server]\ntrust_domain = \"example.org\"\n";

    #[cfg(feature = "k8s")]
    #[test]
    fn psat_cluster_gets_defaults() {
        let c = ServerConfig::parse(
            &format!(
                "{PSAT_HEAD}[server.k8s_psat.eks-dev]\n\
                 service_account_allow_list = [\"kube-system:sigil-agent\"]\n"
            ),
            None,
        )
        .unwrap();
        let cluster = &c.k8s_psat["eks-dev"];
        let mut want = PsatCluster::new(
            vec!["kube-system:sigil-agent".into()],
            PsatVerification::TokenReview,
        );
        assert_eq!(*cluster, want);
        assert_eq!(cluster.audience, sigil_k8s::psat::DEFAULT_AUDIENCE);
        assert_eq!(
            cluster.trusted_node_label_keys,
            sigil_k8s::psat::DEFAULT_TRUSTED_NODE_LABEL_KEYS
        );
        want.audience = "x".into();
        assert_ne!(*cluster, want);
    }

    #[cfg(feature = "k8s")]
    #[test]
    fn psat_cluster_takes_every_key() {
        let c = ServerConfig::parse(
            &format!(
                "{PSAT_HEAD}\
                 [server.k8s_psat.eks-dev]\n\
                 service_account_allow_list = [\"kube-system:sigil-agent\", \"sigil:agent\"]\n\
                 audience = \"sigil-prod\"\n\
                 verification = \"offline_jwks\"\n\
                 jwks_file = \"/etc/sigil/eks-dev.jwks\"\n\
                 issuer = \"https://oidc.example\"\n\
                 trusted_node_label_keys = [\"node-restriction.kubernetes.io/zone\"]\n\
                 allowed_node_label_keys = [\"topology.k8s.aws/zone-id\"]\n\
                 allowed_pod_label_keys = [\"k8s-app\"]\n\
                 kube_config_file = \"/etc/sigil/eks-dev.kubeconfig\"\n\
                 [server.k8s_psat.gke]\n\
                 service_account_allow_list = [\"sigil:agent\"]\n"
            ),
            None,
        )
        .unwrap();
        assert_eq!(c.k8s_psat.len(), 2);
        assert_eq!(
            c.k8s_psat["eks-dev"],
            PsatCluster {
                service_account_allow_list: vec![
                    "kube-system:sigil-agent".into(),
                    "sigil:agent".into()
                ],
                audience: "sigil-prod".into(),
                verification: PsatVerification::OfflineJwks {
                    jwks_file: "/etc/sigil/eks-dev.jwks".into(),
                    issuer: "https://oidc.example".into(),
                },
                trusted_node_label_keys: vec!["node-restriction.kubernetes.io/zone".into()],
                allowed_node_label_keys: vec!["topology.k8s.aws/zone-id".into()],
                allowed_pod_label_keys: vec!["k8s-app".into()],
                kube_config_file: Some("/etc/sigil/eks-dev.kubeconfig".into()),
            }
        );
        assert_eq!(
            c.k8s_psat["gke"].verification,
            PsatVerification::TokenReview
        );
    }

    #[cfg(feature = "k8s")]
    #[test]
    fn psat_errors_name_the_key() {
        let allow = "service_account_allow_list = [\"ns:sa\"]";
        for (table, key) in [
            ("audience = \"x\"", "service_account_allow_list"),
            (
                "service_account_allow_list = []",
                "service_account_allow_list",
            ),
            (
                "service_account_allow_list = [\"sigil-agent\"]",
                "service_account_allow_list",
            ),
            (&format!("{allow}\naudiences = [\"x\"]"), "audiences"),
            (&format!("{allow}\naudience = \"\""), "audience"),
            (
                &format!("{allow}\nverification = \"tokenreview\""),
                "verification",
            ),
            (
                &format!("{allow}\nverification = \"offline_jwks\"\nissuer = \"https://i\""),
                "jwks_file",
            ),
            (
                &format!("{allow}\nverification = \"offline_jwks\"\njwks_file = \"/j\""),
                "issuer",
            ),
            (&format!("{allow}\njwks_file = \"/j\""), "jwks_file"),
            (&format!("{allow}\nissuer = \"https://i\""), "issuer"),
        ] {
            let text = format!("{PSAT_HEAD}[server.k8s_psat.eks-dev]\n{table}\n");
            let err = ServerConfig::parse(&text, Some(Path::new("s.toml")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key) && err.contains("s.toml"),
                "{err} should name {key}"
            );
        }
        let err = ServerConfig::parse(
            &format!("{PSAT_HEAD}[server.k8s_psat.\"eks dev\"]\n{allow}\n"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("server.k8s_psat") && err.contains("eks dev"),
            "{err}"
        );
    }

    #[cfg(not(feature = "k8s"))]
    #[test]
    fn psat_clusters_need_the_k8s_feature() {
        let err = ServerConfig::parse(
            &format!(
                "{PSAT_HEAD}[server.k8s_psat.eks-dev]\n\
                 service_account_allow_list = [\"kube-system:sigil-agent\"]\n"
            ),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("server.k8s_psat") && err.contains("without Kubernetes support"),
            "{err}"
        );
        // Without tables the k8s-less server parses as before.
        assert!(
            ServerConfig::parse(PSAT_HEAD, None)
                .unwrap()
                .k8s_psat
                .is_empty()
        );
    }

    #[test]
    fn jwt_settings_default_to_ec_without_issuer_or_discovery() {
        let c = ServerConfig::parse(PSAT_HEAD, None).unwrap();
        assert_eq!(c.jwt_key_type, JwtKeyType::Es256);
        assert_eq!(c.jwt_issuer, None);
        assert_eq!(c.oidc, None);
    }

    #[test]
    fn oidc_table_takes_every_key_and_defaults_jwks_uri() {
        let c = ServerConfig::parse(
            &format!(
                "{PSAT_HEAD}jwt_key_type = \"rsa-2048\"\n\
                 jwt_issuer = \"https://oidc.example.org/td/\"\n\
                 [server.oidc]\n\
                 address = \"127.0.0.1:8443\"\n\
                 cert_file = \"/etc/sigil/oidc.crt\"\n\
                 key_file = \"/etc/sigil/oidc.key\"\n"
            ),
            None,
        )
        .unwrap();
        assert_eq!(c.jwt_key_type, JwtKeyType::Rs256);
        assert_eq!(
            c.jwt_issuer.as_deref(),
            Some("https://oidc.example.org/td/")
        );
        assert_eq!(
            c.oidc,
            Some(OidcConfig {
                address: "127.0.0.1:8443".parse().unwrap(),
                issuer: "https://oidc.example.org/td/".into(),
                jwks_uri: "https://oidc.example.org/td/keys".into(),
                tls: Some(OidcTls {
                    cert_file: "/etc/sigil/oidc.crt".into(),
                    key_file: "/etc/sigil/oidc.key".into(),
                }),
            })
        );
        // The same issuer spelled out, a jwks_uri elsewhere, plain HTTP.
        let c = ServerConfig::parse(
            &format!(
                "{PSAT_HEAD}jwt_issuer = \"https://oidc.example.org\"\n\
                 [server.oidc]\n\
                 address = \"0.0.0.0:8080\"\n\
                 issuer = \"https://oidc.example.org\"\n\
                 jwks_uri = \"https://keys.example.org/sigil/jwks.json\"\n"
            ),
            None,
        )
        .unwrap();
        let oidc = c.oidc.unwrap();
        assert_eq!(oidc.jwks_uri, "https://keys.example.org/sigil/jwks.json");
        assert_eq!(oidc.tls, None);
    }

    #[test]
    fn jwt_and_oidc_errors_name_the_key() {
        let oidc = "[server.oidc]\naddress = \"127.0.0.1:8443\"\n";
        let iss = "jwt_issuer = \"https://oidc.example.org\"\n";
        for (text, key) in [
            ("jwt_key_type = \"rsa-4096\"\n".to_owned(), "jwt_key_type"),
            (
                "jwt_issuer = \"http://oidc.example.org\"\n".to_owned(),
                "jwt_issuer",
            ),
            (
                "jwt_issuer = \"https://oidc.example.org/?a=b\"\n".to_owned(),
                "jwt_issuer",
            ),
            (
                "jwt_issuer = \"https://oidc.example.org/#x\"\n".to_owned(),
                "jwt_issuer",
            ),
            ("jwt_issuer = \"https://\"\n".to_owned(), "jwt_issuer"),
            (
                "jwt_issuer = \"https://u:p@oidc.example.org\"\n".to_owned(),
                "jwt_issuer",
            ),
            (oidc.to_owned(), "server.jwt_issuer"),
            (
                format!("{oidc}issuer = \"https://oidc.example.org\"\n"),
                "server.oidc.issuer",
            ),
            (
                format!("{iss}{oidc}issuer = \"https://oidc.example.org/\"\n"),
                "server.oidc.issuer",
            ),
            (
                format!("{iss}[server.oidc]\naddress = \"nowhere\"\n"),
                "server.oidc.address",
            ),
            (
                format!("{iss}{oidc}jwks_uri = \"http://oidc.example.org/keys\"\n"),
                "server.oidc.jwks_uri",
            ),
            (
                format!("{iss}{oidc}cert_file = \"/c.pem\"\n"),
                "server.oidc.key_file",
            ),
            (
                format!("{iss}{oidc}key_file = \"/k.pem\"\n"),
                "server.oidc.cert_file",
            ),
            (format!("{iss}{oidc}path_prefix = \"/x\"\n"), "path_prefix"),
        ] {
            let err = ServerConfig::parse(&format!("{PSAT_HEAD}{text}"), Some(Path::new("s.toml")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key) && err.contains("s.toml"),
                "{err} should name {key}"
            );
        }
    }
}
