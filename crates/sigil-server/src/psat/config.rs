//! The `[server.k8s_psat.<cluster>]` tables: what users write, and the
//! validated profiles the server builds its PSAT verifiers from.

use std::path::PathBuf;

use serde::Deserialize;
use sigil_types::config::ConfigError;

/// The token audience a PSAT cluster expects unless it names another
/// (`sigil_k8s::psat::DEFAULT_AUDIENCE`).
pub const DEFAULT_PSAT_AUDIENCE: &str = "sigil-server";
/// The node labels a PSAT cluster turns into location selectors unless it
/// names others (`sigil_k8s::psat::DEFAULT_TRUSTED_NODE_LABEL_KEYS`).
pub const DEFAULT_PSAT_TRUSTED_NODE_LABEL_KEYS: [&str; 2] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

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
pub(crate) fn parse(
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
