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

pub use crate::federation::config::FederationConfig;
pub use crate::oidc::config::{OidcConfig, OidcSection, OidcTls};
pub use crate::psat::config::{
    DEFAULT_PSAT_AUDIENCE, DEFAULT_PSAT_TRUSTED_NODE_LABEL_KEYS, PsatCluster, PsatClusterSection,
    PsatVerification, PsatVerificationMode,
};
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

    /// For tests: [`with_defaults`](Self::with_defaults) for example.org,
    /// its data under `dir/server`, the agent API on a free loopback port
    /// and the admin socket at `dir/admin.sock`.
    #[cfg(test)]
    pub(crate) fn for_test(dir: &Path) -> Self {
        let td = TrustDomain::new("example.org").expect("a valid trust domain");
        let mut config = Self::with_defaults(td, dir.join("server"));
        config.bind_address = SocketAddr::from(([127, 0, 0, 1], 0));
        config.admin_socket = dir.join("admin.sock");
        config
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
            let cluster = crate::psat::config::parse(&name, section, &invalid)?;
            k8s_psat.insert(name, cluster);
        }
        let federation = crate::federation::config::parse(s.federation, &trust_domain, &invalid)?;
        let limits = crate::limits::parse(s.limits, &invalid)?;
        if let Some(issuer) = &s.jwt_issuer {
            crate::oidc::config::validate_issuer(issuer)
                .map_err(|e| invalid("server.jwt_issuer", e.to_string()))?;
        }
        let oidc = s
            .oidc
            .map(|o| crate::oidc::config::parse(o, s.jwt_issuer.as_deref(), &invalid))
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
