//! Kubernetes for the agent: pod selectors for callers that run in pods
//! (from their cgroup and the kubelet's pod list), and the projected token
//! of PSAT node attestation.

use std::path::PathBuf;
use std::sync::Arc;

use sigil_k8s::cgroup;
use sigil_k8s::kubelet::{KubeletClient, KubeletSource, RetryPolicy};
use sigil_types::Selectors;

use crate::AgentError;
use crate::config::K8sWorkloadConfig;

/// Adds `k8s:` selectors for processes that run in a pod.
pub struct PodAttestor {
    kubelet: KubeletClient,
    proc_root: PathBuf,
    cgroups: cgroup::KubeletCgroups,
}

impl std::fmt::Debug for PodAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodAttestor")
            .field("proc_root", &self.proc_root)
            .field("cgroups", &self.cgroups.roots())
            .finish_non_exhaustive()
    }
}

impl PodAttestor {
    /// A pod attestor for the configured kubelet.
    pub fn new(cfg: &K8sWorkloadConfig) -> Result<Arc<Self>, AgentError> {
        let source = if cfg.kubelet_url.starts_with("http://") {
            KubeletSource::ReadOnly {
                url: cfg.kubelet_url.clone(),
            }
        } else {
            KubeletSource::Secure {
                url: cfg.kubelet_url.clone(),
                token_path: cfg.token_path.clone(),
                ca_path: cfg.kubelet_ca_path.clone(),
                skip_verify: cfg.skip_kubelet_verification,
            }
        };
        // The downward API hands the node name to the pod as an environment
        // variable; only pods of this node may be matched.
        let node_name = cfg
            .node_name
            .clone()
            .or_else(|| std::env::var("MY_NODE_NAME").ok().filter(|n| !n.is_empty()));
        let retry = RetryPolicy {
            attempts: cfg.max_poll_attempts,
            interval: cfg.poll_retry_interval,
            ..RetryPolicy::default()
        };
        let kubelet = KubeletClient::new(source, node_name, retry)
            .map_err(|e| AgentError::Config(format!("agent.k8s: {e}")))?
            .with_disable_container_selectors(cfg.disable_container_selectors);
        let cgroups = cgroup::KubeletCgroups::new(&cfg.kubelet_cgroup_root)
            .map_err(|e| AgentError::Config(format!("agent.k8s.kubelet_cgroup_root: {e}")))?;
        Ok(Arc::new(Self {
            kubelet,
            proc_root: cfg.proc_root.clone(),
            cgroups,
        }))
    }

    /// The pod selectors of process `pid`; empty when it is not in a pod.
    pub async fn attest(&self, pid: i32) -> Result<Selectors, String> {
        let root = self.proc_root.clone();
        let cgroups = self.cgroups.clone();
        let location = tokio::task::spawn_blocking(move || cgroups.locate_pid(&root, pid))
            .await
            .map_err(|e| format!("cgroup lookup task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let info = match location {
            cgroup::Location::Workload(info) => info,
            // A cgroup dressed up as a pod's outside the kubelet's tree is
            // worth an operator's attention; an ordinary host process is not.
            cgroup::Location::Foreign { ref path, .. } if path.contains("pod") => {
                tracing::warn!(
                    pid,
                    reason = location.refusal(&self.cgroups),
                    "no k8s selectors for a process whose cgroup looks like a pod's"
                );
                return Ok(Selectors::new());
            }
            other => {
                tracing::debug!(
                    pid,
                    reason = other.refusal(&self.cgroups),
                    "no k8s selectors"
                );
                return Ok(Selectors::new());
            }
        };
        match self.kubelet.attest(&info).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Ok(Selectors::new()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// [`attest_psat`] with a new key: the agent SVID it yields, and the
/// server's answer (which carries the bundle).
pub(crate) async fn attest_psat_with_new_key(
    client: &mut sigil_proto::server::v1::agent_api_client::AgentApiClient<
        tonic::transport::Channel,
    >,
    cfg: &crate::config::PsatConfig,
    when_limited: WhenLimited,
) -> Result<
    (
        crate::persist::AgentIdentity,
        sigil_proto::server::v1::AttestResponse,
    ),
    AgentError,
> {
    let key = sigil_svid::keys::PrivateKey::generate_p256()?;
    let csr = sigil_svid::x509::make_csr(&key)?;
    let mut resp = attest_psat(client, cfg, csr, when_limited).await?;
    let identity = crate::persist::AgentIdentity::new(std::mem::take(&mut resp.cert_chain), key)?;
    Ok((identity, resp))
}

/// What [`attest_psat`] does when the server's rate limit refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenLimited {
    /// Return the refusal: the caller is the agent's main task, which must
    /// not stall, and tries again later with its own backoff.
    Fail,
    /// Wait and try again ([`crate::retry::while_exhausted`]): the agent's
    /// start, when a fleet behind one address may attest at once.
    Retry,
}

/// Attests (or re-attests) the node with the projected service-account
/// token, read afresh each time because the kubelet rotates it.
pub async fn attest_psat(
    client: &mut sigil_proto::server::v1::agent_api_client::AgentApiClient<
        tonic::transport::Channel,
    >,
    cfg: &crate::config::PsatConfig,
    csr: Vec<u8>,
    when_limited: WhenLimited,
) -> Result<sigil_proto::server::v1::AttestResponse, AgentError> {
    let token = sigil_k8s::psat::read_token(&cfg.token_path)
        .map_err(|e| AgentError::Config(format!("agent.k8s_psat.token_path: {e}")))?;
    let call = || {
        let mut client = client.clone();
        let req = sigil_proto::server::v1::AttestPsatRequest {
            cluster: cfg.cluster.clone(),
            token: token.clone(),
            csr: csr.clone(),
        };
        async move { client.attest_psat(req).await }
    };
    let resp = match when_limited {
        WhenLimited::Fail => call().await,
        WhenLimited::Retry => crate::retry::while_exhausted("AttestPsat", call).await,
    };
    Ok(resp.map_err(AgentError::from_status)?.into_inner())
}
