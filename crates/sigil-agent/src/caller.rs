//! Who is calling the agent's socket: the caller's selectors from its
//! kernel peer credentials. Shared by the Workload API and the Envoy SDS
//! service, so both attest callers the same way.

use std::sync::Arc;

use sigil_types::Selectors;
use tonic::{Request, Status};

use crate::attest::UnixAttestor;
use crate::peer::peer_of;

/// Identifies the callers of the agent's socket from their kernel peer
/// credentials: the unix attestor (and, with the `k8s` feature and
/// `[agent.k8s]`, pod selectors from the kubelet). Shared by the Workload API
/// and the Envoy SDS service, so both attest callers the same way.
pub struct CallerAttestor {
    attestor: Arc<UnixAttestor>,
    limiter: Arc<crate::limits::CallerLimiter>,
    #[cfg(feature = "k8s")]
    pods: Option<Arc<crate::k8s::PodAttestor>>,
}

impl std::fmt::Debug for CallerAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerAttestor").finish_non_exhaustive()
    }
}

impl CallerAttestor {
    /// Attests callers with the unix attestor only.
    pub fn new(attestor: Arc<UnixAttestor>) -> Self {
        Self {
            attestor,
            limiter: Arc::default(),
            #[cfg(feature = "k8s")]
            pods: None,
        }
    }

    /// Uses `limiter`'s per-uid rate limits instead of the default ones.
    pub fn with_limiter(mut self, limiter: Arc<crate::limits::CallerLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// The per-uid rate limits of the socket's callers.
    pub fn limiter(&self) -> &crate::limits::CallerLimiter {
        &self.limiter
    }

    /// Adds pod selectors from the kubelet to every caller's unix selectors.
    #[cfg(feature = "k8s")]
    pub fn with_pod_attestor(mut self, pods: Arc<crate::k8s::PodAttestor>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// The caller's selectors, from its kernel credentials; refuses a caller
    /// whose process changed while it was being attested. Every failure is
    /// `Unavailable` "workload attestation failed" (the cause is logged).
    pub async fn identify<T>(&self, req: &Request<T>) -> Result<Selectors, Status> {
        let peer = peer_of(req).map_err(|e| {
            tracing::warn!(error = %e, "cannot identify caller");
            Status::unavailable("workload attestation failed")
        })?;
        #[allow(unused_mut, reason = "extended only with the k8s feature")]
        let mut selectors = self.attestor.read_unchecked(&peer).await.map_err(|e| {
            tracing::warn!(pid = peer.pid, error = %e, "workload attestation failed");
            Status::unavailable("workload attestation failed")
        })?;
        #[cfg(feature = "k8s")]
        if let Some(pods) = &self.pods {
            let pod = pods.attest(peer.pid).await.map_err(|e| {
                tracing::warn!(pid = peer.pid, error = %e, "pod attestation failed");
                Status::unavailable("workload attestation failed")
            })?;
            for s in pod.iter() {
                selectors.insert(s.clone());
            }
        }
        // The one check that everything read above, by PID, described the
        // process that connected: it must come after the last attestor.
        peer.check_same_process().map_err(|e| {
            tracing::warn!(pid = peer.pid, error = %e, "caller changed during attestation");
            Status::unavailable("workload attestation failed")
        })?;
        Ok(selectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::UnixAttestorConfig;
    use crate::peer::{PeerConnectInfo, PeerInfo};

    fn request(peer: PeerInfo) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(PeerConnectInfo { peer: Ok(peer) });
        req
    }

    /// The attestor's reads are checked once, at the end of `identify`:
    /// a PID that changed hands since connect, or a caller that exited, is
    /// refused, also when its names are cached and it is attested in place.
    #[tokio::test]
    async fn identify_refuses_a_reused_pid_and_an_exited_caller() {
        let callers =
            CallerAttestor::new(Arc::new(UnixAttestor::new(UnixAttestorConfig::default())));
        let uid = nix::unistd::geteuid().as_raw();
        let sel = callers
            .identify(&request(PeerInfo::this_process()))
            .await
            .unwrap();
        assert!(sel.contains(&format!("unix:uid:{uid}").parse().unwrap()));

        let err = callers
            .identify(&request(PeerInfo::this_process().with_other_start_time()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let fd = crate::peer::pidfd_open(pid).unwrap();
        let peer = PeerInfo::with_own_ids(pid, Some(fd));
        child.kill().unwrap();
        child.wait().unwrap();
        let err = callers.identify(&request(peer)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }

    /// With a pidfd, the final check is only the pidfd's `poll`; a caller
    /// whose effective ids are not the ones `SO_PEERCRED` recorded is still
    /// refused, by the attestor's read of `/proc/<pid>/status`, also when
    /// its names are cached (the fast path that reads nothing else).
    #[tokio::test]
    async fn identify_refuses_changed_ids_of_a_caller_pinned_by_its_pidfd() {
        let callers =
            CallerAttestor::new(Arc::new(UnixAttestor::new(UnixAttestorConfig::default())));
        let pid = i32::try_from(std::process::id()).unwrap();
        let own = PeerInfo::with_own_ids(pid, Some(crate::peer::pidfd_open(pid).unwrap()));
        assert!(own.has_pidfd());
        // Twice: the second call finds the names cached.
        for _ in 0..2 {
            callers.identify(&request(own.clone())).await.unwrap();
        }
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        for (u, g) in [(uid.wrapping_add(1), gid), (uid, gid.wrapping_add(1))] {
            let fd = crate::peer::pidfd_open(pid).unwrap();
            let other = PeerInfo::capture(pid, u, g, Some(fd)).unwrap();
            let err = callers.identify(&request(other)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        }
    }
}
