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
    server_address: AddressList,
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
    allow_insecure_pid_attestation: bool,
    #[serde(default)]
    health_address: Option<String>,
    #[serde(default)]
    k8s: Option<K8sFile>,
    #[serde(default)]
    k8s_psat: Option<PsatFile>,
    #[serde(default)]
    sds: Option<SdsFile>,
    #[serde(default)]
    limits: crate::limits::LimitsSection,
    #[serde(default = "default_max_sync_update_entries")]
    max_sync_update_entries: usize,
    #[serde(default = "default_max_sync_update_bytes")]
    max_sync_update_bytes: usize,
    #[serde(default)]
    x509_svid_cache_max_size: usize,
}

fn default_max_sync_update_entries() -> usize {
    crate::paging::MAX_UPDATE_ENTRIES
}
fn default_max_sync_update_bytes() -> usize {
    crate::paging::MAX_UPDATE_BYTES
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SdsFile {
    #[serde(default = "default_svid_name")]
    default_svid_name: String,
    #[serde(default = "default_bundle_name")]
    default_bundle_name: String,
    #[serde(default = "default_all_bundles_name")]
    default_all_bundles_name: String,
    #[serde(default)]
    disable_spiffe_cert_validation: bool,
}

fn default_svid_name() -> String {
    SdsConfig::default().default_svid_name
}
fn default_bundle_name() -> String {
    SdsConfig::default().default_bundle_name
}
fn default_all_bundles_name() -> String {
    SdsConfig::default().default_all_bundles_name
}

/// The longest resource name `[agent.sds]` accepts for its special names.
pub const MAX_SDS_NAME_LEN: usize = 128;

/// The Envoy SDS service on the Workload API socket (`[agent.sds]`): the
/// resource names that stand for the caller's default SVID, the own trust
/// bundle and all bundles, and whether validation contexts use Envoy's SPIFFE
/// certificate validator. The defaults are SPIRE's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    /// The name of the caller's default X509-SVID (`default`).
    pub default_svid_name: String,
    /// The name of the own trust domain's bundle (`ROOTCA`).
    pub default_bundle_name: String,
    /// The name of the validation context with every bundle the caller may
    /// use, own and federated (`ALL`).
    pub default_all_bundles_name: String,
    /// Send validation contexts as `trusted_ca` PEM instead of the SPIFFE
    /// certificate validator; an Envoy may override it with the node
    /// metadata key `disable_spiffe_cert_validation`.
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            default_svid_name: "default".to_owned(),
            default_bundle_name: "ROOTCA".to_owned(),
            default_all_bundles_name: "ALL".to_owned(),
            disable_spiffe_cert_validation: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sFile {
    #[serde(default = "default_kubelet_url")]
    kubelet_url: String,
    #[serde(default = "default_kubelet_token")]
    token_path: PathBuf,
    #[serde(default)]
    kubelet_ca_path: Option<PathBuf>,
    #[serde(default)]
    skip_kubelet_verification: bool,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default = "default_proc_root")]
    proc_root: PathBuf,
    #[serde(default = "default_attempts")]
    max_poll_attempts: u32,
    #[serde(
        default = "default_poll_interval",
        with = "sigil_types::duration::serde_human"
    )]
    poll_retry_interval: Duration,
    #[serde(default)]
    disable_container_selectors: bool,
    #[serde(default = "default_kubelet_cgroup_root")]
    kubelet_cgroup_root: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PsatFile {
    cluster: String,
    #[serde(default = "default_psat_token")]
    token_path: PathBuf,
}

fn default_kubelet_url() -> String {
    "https://127.0.0.1:10250".to_owned()
}
fn default_kubelet_token() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}
fn default_kubelet_cgroup_root() -> String {
    "/".to_owned()
}
fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}
fn default_attempts() -> u32 {
    60
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_psat_token() -> PathBuf {
    PathBuf::from("/var/run/secrets/tokens/sigil-agent")
}

/// Kubernetes workload attestation: pod selectors from the kubelet.
#[derive(Debug, Clone)]
pub struct K8sWorkloadConfig {
    /// `https://…:10250` (secure port, with `token_path`) or `http://…:10255` (read-only port).
    pub kubelet_url: String,
    /// Service-account token sent to the secure port (re-read on every request).
    pub token_path: PathBuf,
    /// CA of the kubelet's serving certificate; the cluster CA when absent.
    pub kubelet_ca_path: Option<PathBuf>,
    /// Accept any kubelet certificate (only for clusters whose kubelet certificates are self-signed).
    pub skip_kubelet_verification: bool,
    /// Only pods of this node count; defaults to `$MY_NODE_NAME` (downward API).
    pub node_name: Option<String>,
    /// Where the host's `/proc` is mounted in the agent's container.
    pub proc_root: PathBuf,
    /// How many pod lists to examine for a container not yet listed.
    pub max_poll_attempts: u32,
    /// Pause between those attempts.
    pub poll_retry_interval: Duration,
    /// Leave out the `container-name` and `container-image` selectors.
    pub disable_container_selectors: bool,
    /// The kubelet's `cgroupRoot` (`/` by default): only cgroups under its
    /// `kubepods` cgroup identify a pod.
    pub kubelet_cgroup_root: String,
}

/// PSAT node attestation: the agent proves its node with a projected service-account token.
#[derive(Debug, Clone)]
pub struct PsatConfig {
    /// The cluster name, as configured on the server.
    pub cluster: String,
    /// The projected token (re-read at every attestation; the kubelet rotates it).
    pub token_path: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

/// `server_address` as written: one `host:port` or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum AddressList {
    One(String),
    Many(Vec<String>),
}

/// The servers an agent may talk to, in order of preference: any of them
/// serves it (they share one database), so the agent moves on to the next
/// when one cannot be reached, without attesting again. A name with several
/// DNS records counts as each of its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddresses(Vec<String>);

impl ServerAddresses {
    /// A single `host:port`.
    pub fn one(address: impl Into<String>) -> Self {
        Self(vec![address.into()])
    }

    /// Several `host:port`s; `None` if the list is empty.
    pub fn new(addresses: Vec<String>) -> Option<Self> {
        (!addresses.is_empty()).then_some(Self(addresses))
    }

    /// The addresses, in order of preference.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for ServerAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// The validated runtime configuration of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The trust domain the agent belongs to.
    pub trust_domain: TrustDomain,
    /// `host:port` of the servers' agent API (several, for failover).
    pub server_address: ServerAddresses,
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
    /// Start even when the kernel lacks `SO_PEERPIDFD` (before Linux 6.5),
    /// where a caller's PID recycled between connect and accept is not
    /// caught. Unsafe; see `peer::decide_pid_attestation`.
    pub allow_insecure_pid_attestation: bool,
    /// Health and metrics listener.
    pub health_address: Option<std::net::SocketAddr>,
    /// Smallest reconnect delay.
    pub min_backoff: Duration,
    /// Largest reconnect delay.
    pub max_backoff: Duration,
    /// Pod attestation through the kubelet, when set.
    pub k8s: Option<K8sWorkloadConfig>,
    /// PSAT node attestation instead of a join token, when set.
    pub k8s_psat: Option<PsatConfig>,
    /// The Envoy SDS service.
    pub sds: SdsConfig,
    /// Bounds on callers of the socket: `[agent.limits]`.
    pub limits: crate::limits::AgentLimits,
    /// What one sync update from the server may hold across its pages
    /// (`max_sync_update_entries`, `max_sync_update_bytes`).
    pub sync_update_bounds: crate::paging::UpdateBounds,
    /// The most X509-SVIDs held for entries no open stream matches
    /// (`x509_svid_cache_max_size`); 0: no bound, every entry's SVID is
    /// held. See docs/configuration.md.
    pub x509_svid_cache_max_size: usize,
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
            server_address: ServerAddresses::one(server_address),
            socket_path: data_dir.join("api.sock"),
            data_dir,
            join_token: None,
            trust_bundle_path: None,
            discover_workload_path: false,
            allow_insecure_pid_attestation: false,
            health_address: None,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            k8s: None,
            k8s_psat: None,
            sds: SdsConfig::default(),
            limits: crate::limits::AgentLimits::default(),
            sync_update_bounds: crate::paging::UpdateBounds::default(),
            x509_svid_cache_max_size: 0,
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
        let addresses = match a.server_address {
            AddressList::One(one) => vec![one],
            AddressList::Many(many) => many,
        };
        for address in &addresses {
            let has_port = address
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !has_port {
                return Err(invalid(
                    "agent.server_address",
                    format!("{address:?} must be host:port, e.g. sigil-server.example.org:8081"),
                ));
            }
        }
        let server_address = ServerAddresses::new(addresses).ok_or_else(|| {
            invalid(
                "agent.server_address",
                "the list is empty; name at least one server as host:port".into(),
            )
        })?;
        let health_address = a
            .health_address
            .as_deref()
            .map(|h| {
                h.parse()
                    .map_err(|e| invalid("agent.health_address", format!("{h:?}: {e}")))
            })
            .transpose()?;
        let k8s = a
            .k8s
            .map(|k| {
                if !(k.kubelet_url.starts_with("https://") || k.kubelet_url.starts_with("http://")) {
                    return Err(invalid(
                        "agent.k8s.kubelet_url",
                        format!("{:?} must start with https:// (secure port) or http:// (read-only port)", k.kubelet_url),
                    ));
                }
                if k.max_poll_attempts == 0 {
                    return Err(invalid("agent.k8s.max_poll_attempts", "must be at least 1".into()));
                }
                #[cfg(feature = "k8s")]
                if let Err(e) = sigil_k8s::cgroup::KubeletCgroups::new(&k.kubelet_cgroup_root) {
                    return Err(invalid("agent.k8s.kubelet_cgroup_root", e.to_string()));
                }
                Ok(K8sWorkloadConfig {
                    kubelet_url: k.kubelet_url,
                    token_path: k.token_path,
                    kubelet_ca_path: k.kubelet_ca_path,
                    skip_kubelet_verification: k.skip_kubelet_verification,
                    node_name: k.node_name.filter(|n| !n.is_empty()),
                    proc_root: k.proc_root,
                    max_poll_attempts: k.max_poll_attempts,
                    poll_retry_interval: k.poll_retry_interval,
                    disable_container_selectors: k.disable_container_selectors,
                    kubelet_cgroup_root: k.kubelet_cgroup_root,
                })
            })
            .transpose()?;
        let k8s_psat = a
            .k8s_psat
            .map(|p| {
                if p.cluster.is_empty() {
                    return Err(invalid(
                        "agent.k8s_psat.cluster",
                        "must not be empty".into(),
                    ));
                }
                Ok(PsatConfig {
                    cluster: p.cluster,
                    token_path: p.token_path,
                })
            })
            .transpose()?;
        if cfg!(not(feature = "k8s")) && (k8s.is_some() || k8s_psat.is_some()) {
            return Err(invalid(
                "agent.k8s",
                "this agent was built without Kubernetes support (feature k8s)".into(),
            ));
        }
        if k8s_psat.is_some() && a.join_token.is_some() {
            return Err(invalid(
                "agent.join_token",
                "set either join_token or [agent.k8s_psat], not both".into(),
            ));
        }
        let sds = match a.sds {
            None => SdsConfig::default(),
            Some(f) => {
                let names = [
                    ("agent.sds.default_svid_name", &f.default_svid_name),
                    ("agent.sds.default_bundle_name", &f.default_bundle_name),
                    (
                        "agent.sds.default_all_bundles_name",
                        &f.default_all_bundles_name,
                    ),
                ];
                for (i, (key, name)) in names.iter().enumerate() {
                    if name.is_empty() || name.len() > MAX_SDS_NAME_LEN {
                        return Err(invalid(
                            key,
                            format!("must be 1 to {MAX_SDS_NAME_LEN} bytes"),
                        ));
                    }
                    if name.starts_with("spiffe://") {
                        return Err(invalid(
                            key,
                            format!(
                                "{name:?} must not start with spiffe:// (those names are SPIFFE IDs and trust domains)"
                            ),
                        ));
                    }
                    if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                        return Err(invalid(
                            key,
                            format!("{name:?} is already the name of {other}"),
                        ));
                    }
                }
                SdsConfig {
                    default_svid_name: f.default_svid_name,
                    default_bundle_name: f.default_bundle_name,
                    default_all_bundles_name: f.default_all_bundles_name,
                    disable_spiffe_cert_validation: f.disable_spiffe_cert_validation,
                }
            }
        };
        let limits = crate::limits::parse(a.limits, &invalid)?;
        sigil_types::config::require_positive(
            &[
                (
                    "agent.max_sync_update_entries",
                    a.max_sync_update_entries as u128,
                ),
                (
                    "agent.max_sync_update_bytes",
                    a.max_sync_update_bytes as u128,
                ),
            ],
            &invalid,
        )?;
        let sync_update_bounds = crate::paging::UpdateBounds {
            max_entries: a.max_sync_update_entries,
            max_bytes: a.max_sync_update_bytes,
        };
        Ok(Self {
            sync_update_bounds,
            x509_svid_cache_max_size: a.x509_svid_cache_max_size,
            sds,
            limits,
            k8s,
            k8s_psat,
            trust_domain,
            server_address,
            data_dir: a.data_dir,
            socket_path: a.socket_path,
            join_token: a.join_token,
            trust_bundle_path: a.trust_bundle_path,
            discover_workload_path: a.discover_workload_path,
            allow_insecure_pid_attestation: a.allow_insecure_pid_attestation,
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
    fn server_address_takes_one_or_several() {
        let head = "[agent]\ntrust_domain = \"example.org\"\n";
        let one =
            AgentConfig::parse(&format!("{head}server_address = \"a:8081\"\n"), None).unwrap();
        assert_eq!(one.server_address.as_slice(), ["a:8081"]);
        let many = AgentConfig::parse(
            &format!("{head}server_address = [\"a:8081\", \"10.0.0.2:8081\"]\n"),
            None,
        )
        .unwrap();
        assert_eq!(many.server_address.as_slice(), ["a:8081", "10.0.0.2:8081"]);
        assert_eq!(many.server_address.to_string(), "a:8081, 10.0.0.2:8081");
        let empty = AgentConfig::parse(&format!("{head}server_address = []\n"), None)
            .unwrap_err()
            .to_string();
        assert!(empty.contains("at least one server"), "{empty}");
        let bad = AgentConfig::parse(
            &format!("{head}server_address = [\"a:8081\", \"b\"]\n"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("\"b\" must be host:port"), "{bad}");
    }

    #[test]
    fn x509_svid_cache_max_size_defaults_to_no_bound() {
        let head = "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"s:8081\"\n";
        assert_eq!(
            AgentConfig::parse(head, None)
                .unwrap()
                .x509_svid_cache_max_size,
            0
        );
        let c =
            AgentConfig::parse(&format!("{head}x509_svid_cache_max_size = 5000\n"), None).unwrap();
        assert_eq!(c.x509_svid_cache_max_size, 5000);
        let bad = AgentConfig::parse(&format!("{head}x509_svid_cache_max_size = -1\n"), None)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("x509_svid_cache_max_size"), "{bad}");
    }

    #[test]
    fn sync_update_bounds_default_parse_and_refuse_zero() {
        let head = "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"s:8081\"\n";
        let d = AgentConfig::parse(head, None).unwrap();
        assert_eq!(d.sync_update_bounds, crate::paging::UpdateBounds::default());
        let c = AgentConfig::parse(
            &format!("{head}max_sync_update_entries = 10\nmax_sync_update_bytes = 2048\n"),
            None,
        )
        .unwrap();
        assert_eq!(
            c.sync_update_bounds,
            crate::paging::UpdateBounds {
                max_entries: 10,
                max_bytes: 2048
            }
        );
        let zero = AgentConfig::parse(&format!("{head}max_sync_update_bytes = 0\n"), None)
            .unwrap_err()
            .to_string();
        assert!(zero.contains("agent.max_sync_update_bytes"), "{zero}");
    }

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
    #[cfg(not(feature = "k8s"))]
    fn kubernetes_sections_need_the_feature() {
        let err = AgentConfig::parse(
            "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"s:8081\"\n[agent.k8s_psat]\ncluster = \"prod\"\n",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("without Kubernetes support"), "{err}");
    }

    #[test]
    #[cfg(feature = "k8s")]
    fn kubernetes_sections() {
        let c = AgentConfig::parse(
            "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"s:8081\"\n[agent.k8s]\nnode_name = \"n1\"\npoll_retry_interval = \"250ms\"\n[agent.k8s_psat]\ncluster = \"prod\"\n",
            None,
        )
        .unwrap();
        let k = c.k8s.unwrap();
        assert_eq!(k.kubelet_url, "https://127.0.0.1:10250");
        assert_eq!(k.poll_retry_interval, Duration::from_millis(250));
        assert_eq!(k.node_name.as_deref(), Some("n1"));
        assert_eq!(
            c.k8s_psat.unwrap().token_path,
            PathBuf::from("/var/run/secrets/tokens/sigil-agent")
        );
        let err = AgentConfig::parse(
            "[agent]\ntrust_domain = \"e.org\"\nserver_address = \"s:1\"\n[agent.k8s]\nkubelet_url = \"127.0.0.1:10250\"\n",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("kubelet_url"), "{err}");
        assert_eq!(k.kubelet_cgroup_root, "/");
    }

    #[test]
    #[cfg(feature = "k8s")]
    fn kubelet_cgroup_root_is_checked_and_named_in_errors() {
        let base = "[agent]\ntrust_domain = \"e.org\"\nserver_address = \"s:1\"\n[agent.k8s]\n";
        let c = AgentConfig::parse(&format!("{base}kubelet_cgroup_root = \"/kubelet\"\n"), None)
            .unwrap();
        assert_eq!(c.k8s.unwrap().kubelet_cgroup_root, "/kubelet");
        for bad in ["kubelet", "/kubelet.slice", "/a/../b"] {
            let err = AgentConfig::parse(&format!("{base}kubelet_cgroup_root = {bad:?}\n"), None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("agent.k8s.kubelet_cgroup_root"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn sds_names_default_to_spires_and_must_be_distinct() {
        let base = "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"127.0.0.1:8081\"\n";
        let c = AgentConfig::parse(base, None).unwrap();
        assert_eq!(c.sds, SdsConfig::default());
        assert_eq!(
            (
                c.sds.default_svid_name.as_str(),
                c.sds.default_bundle_name.as_str(),
                c.sds.default_all_bundles_name.as_str()
            ),
            ("default", "ROOTCA", "ALL")
        );
        let c = AgentConfig::parse(
            &format!("{base}[agent.sds]\ndefault_bundle_name = \"bundle\"\ndisable_spiffe_cert_validation = true\n"),
            None,
        )
        .unwrap();
        assert_eq!(c.sds.default_bundle_name, "bundle");
        assert_eq!(c.sds.default_svid_name, "default");
        assert!(c.sds.disable_spiffe_cert_validation);
        for (body, key, words) in [
            (
                "default_all_bundles_name = \"default\"",
                "default_all_bundles_name",
                "already",
            ),
            ("default_svid_name = \"\"", "default_svid_name", "1 to 128"),
            (
                "default_bundle_name = \"spiffe://example.org\"",
                "default_bundle_name",
                "spiffe://",
            ),
            ("unknown = 1", "unknown", "unknown"),
        ] {
            let err = AgentConfig::parse(&format!("{base}[agent.sds]\n{body}\n"), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(words), "{err}");
        }
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
