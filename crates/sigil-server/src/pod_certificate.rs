//! Kubernetes pod certificates: the X509-SVID of a PodCertificateRequest,
//! signed for the entry controller (`SignPodCertificate` on the admin API).
//!
//! The controller vouches for the pod (it checked the request against the
//! pod and node objects of the API server); the server alone decides the
//! identity, with the same authorization the agents get: the node's PSAT
//! agent must be attested and not banned, and the SVID is for an entry that
//! agent is authorized for ([`crate::index::EntryIndex::authorized`]) whose
//! selectors are all among the pod's. See docs/kubernetes.md, "Pod
//! certificates (no sidecar)", and docs/design-notes.md.

use std::time::{Duration, SystemTime};

use sigil_svid::pod_certificate::{PodKeyProof, check_pod_key};
use sigil_svid::x509::{BACKDATE, SvidRequest, cert_info};
use sigil_types::{AgentRecord, Entry, Selector, Selectors, SpiffeId};

use crate::ca::unix;
use crate::error::{PodCertRefusal, ServerError, SignError};
use crate::signing::svid_attributes;
use crate::state::ServerState;

/// The shortest certificate Kubernetes accepts from a signer.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// The range of `spec.maxExpirationSeconds` kube-apiserver admits.
pub const MAX_EXPIRATION_RANGE: std::ops::RangeInclusive<i64> = 3600..=7_862_400;
/// The most pod selectors a request may carry (a pod with many labels and
/// images has a few dozen).
const MAX_POD_SELECTORS: usize = 1024;
/// The selector type of the pod's selectors: only those are taken.
const K8S: &str = "k8s";

/// A PodCertificateRequest as the controller hands it to the server.
#[derive(Debug, Clone)]
pub struct PodCertificateRequest<'a> {
    /// The key and how the pod proves it holds it.
    pub proof: PodKeyProof<'a>,
    /// `spec.podUID`.
    pub pod_uid: &'a str,
    /// The PSAT agent ID of the pod's node.
    pub agent_id: &'a SpiffeId,
    /// The pod's pod-level `k8s:` selectors.
    pub pod_selectors: &'a Selectors,
    /// `spec.maxExpirationSeconds`.
    pub max_expiration: Duration,
    /// The SPIFFE ID the pod asks for, if any (unverified).
    pub requested: Option<&'a SpiffeId>,
    /// `namespace/name`, for the audit log.
    pub pod: &'a str,
}

/// A signed pod certificate.
#[derive(Debug, Clone)]
pub struct PodCertificate {
    /// The SVID's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The entry it was issued for.
    pub entry_id: String,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's notBefore.
    pub not_before: SystemTime,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
}

/// Parses the pod selectors of a request: each `k8s:` and valid, at most
/// [`MAX_POD_SELECTORS`], and holding `k8s:pod-uid:<pod_uid>` (so that the
/// selectors are those of the pod the certificate is for).
pub fn parse_pod_selectors(values: &[String], pod_uid: &str) -> Result<Selectors, ServerError> {
    if values.len() > MAX_POD_SELECTORS {
        return Err(PodCertRefusal::BadRequest(format!(
            "{} pod selectors; at most {MAX_POD_SELECTORS} are accepted",
            values.len()
        ))
        .into());
    }
    let mut out = Selectors::new();
    for v in values {
        let s: Selector = v.parse().map_err(|e| {
            PodCertRefusal::BadRequest(format!("pod selector {v:?} is invalid: {e}"))
        })?;
        if s.kind() != K8S {
            return Err(PodCertRefusal::BadRequest(format!(
                "pod selector {v:?} is not a k8s: selector"
            ))
            .into());
        }
        out.insert(s);
    }
    let uid_selector = format!("{K8S}:pod-uid:{pod_uid}");
    if !out.iter().any(|s| s.as_str() == uid_selector) {
        return Err(PodCertRefusal::BadRequest(format!(
            "the pod selectors do not hold {uid_selector}"
        ))
        .into());
    }
    Ok(out)
}

/// Checks `spec.maxExpirationSeconds` is in the range Kubernetes admits.
pub fn max_expiration(seconds: i64) -> Result<Duration, ServerError> {
    if !MAX_EXPIRATION_RANGE.contains(&seconds) {
        return Err(PodCertRefusal::BadRequest(format!(
            "maxExpirationSeconds {seconds} is outside 3600..=7862400"
        ))
        .into());
    }
    Ok(Duration::from_secs(seconds.unsigned_abs()))
}

impl ServerState {
    /// Signs the X509-SVID of a pod certificate request; see the module
    /// documentation for the rules. Each refusal is a [`PodCertRefusal`].
    pub async fn sign_pod_certificate(
        &self,
        req: &PodCertificateRequest<'_>,
    ) -> Result<PodCertificate, ServerError> {
        let key = check_pod_key(req.proof, req.pod_uid).map_err(PodCertRefusal::from_key_error)?;
        let agent = self.attested_agent(req.agent_id).await?;
        let entry = self.pod_entry(&agent, req)?;

        let authority = self.ca.active().x509.clone();
        let now = SystemTime::now();
        let ttl = crate::signing::svid_ttl(entry.x509_svid_ttl, self.config.default_x509_svid_ttl)
            // notBefore is backdated: the whole lifetime must fit maxExpirationSeconds.
            .min(req.max_expiration.saturating_sub(BACKDATE));
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        let not_after = now
            .checked_add(ttl)
            .unwrap_or(now)
            .min(authority.info().not_after);
        let lifetime = not_after.duration_since(not_before).unwrap_or_default();
        if lifetime < MIN_LIFETIME {
            return Err(PodCertRefusal::LifetimeTooShort {
                seconds: lifetime.as_secs(),
                entry_ttl: entry.x509_svid_ttl,
            }
            .into());
        }
        let attributes = svid_attributes(&agent, &entry);
        let signer = authority.leaf_signer().map_err(SignError::Failed)?;
        let leaf = signer
            .sign_key(
                &SvidRequest {
                    spiffe_id: &entry.spiffe_id,
                    dns_names: &entry.dns_names,
                    ttl,
                    attributes: &attributes,
                },
                key,
                now,
            )
            .map_err(SignError::Failed)?;
        let info = cert_info(&leaf)?;
        self.metrics.x509_svids_signed.inc();
        tracing::info!(
            pod = req.pod,
            pod_uid = req.pod_uid,
            agent = %agent.spiffe_id,
            spiffe_id = %entry.spiffe_id,
            entry = %entry.id,
            serial = %info.serial_hex,
            not_after = unix(info.not_after),
            "signed a pod certificate"
        );
        Ok(PodCertificate {
            spiffe_id: entry.spiffe_id.clone(),
            entry_id: entry.id.to_string(),
            chain: vec![leaf],
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// The record of an attested agent that is neither banned nor expired.
    async fn attested_agent(&self, id: &SpiffeId) -> Result<AgentRecord, ServerError> {
        let record = match self.agents.get(id) {
            Some(r) => Some(r),
            None => self.store.get_agent(id).await?,
        };
        let Some(record) = record else {
            return Err(PodCertRefusal::NodeNotAttested(id.clone()).into());
        };
        if record.banned {
            return Err(PodCertRefusal::NodeBanned(id.clone()).into());
        }
        if record.expires_at <= unix(SystemTime::now()) {
            return Err(PodCertRefusal::NodeNotAttested(id.clone()).into());
        }
        Ok(record)
    }

    /// The one entry the pod's certificate is for: among those `agent` is
    /// authorized for, those whose selectors are all among the pod's; one
    /// SPIFFE ID, or the requested one among several.
    fn pod_entry(
        &self,
        agent: &AgentRecord,
        req: &PodCertificateRequest<'_>,
    ) -> Result<std::sync::Arc<Entry>, ServerError> {
        let authorized = self.index.authorized(&agent.spiffe_id, &agent.selectors);
        let mut matching: Vec<_> = authorized
            .entries
            .into_values()
            .filter(|e| !e.selectors.is_empty() && e.selectors.is_subset_of(req.pod_selectors))
            .collect();
        // Several entries of one ID: the same answer every time.
        matching.sort_by(|a, b| a.id.cmp(&b.id));
        let mut ids: Vec<&SpiffeId> = matching.iter().map(|e| &e.spiffe_id).collect();
        ids.sort();
        ids.dedup();
        let chosen = match (ids.as_slice(), req.requested) {
            ([], _) => return Err(PodCertRefusal::NoRegistration.into()),
            (granted, Some(want)) => {
                if !granted.contains(&want) {
                    return Err(PodCertRefusal::NotGranted {
                        requested: want.clone(),
                        granted: granted.iter().map(ToString::to_string).collect(),
                    }
                    .into());
                }
                want
            }
            ([one], None) => *one,
            (several, None) => {
                return Err(PodCertRefusal::Ambiguous(
                    several.iter().map(ToString::to_string).collect(),
                )
                .into());
            }
        };
        let chosen = chosen.clone();
        matching
            .into_iter()
            .find(|e| e.spiffe_id == chosen)
            .ok_or_else(|| PodCertRefusal::NoRegistration.into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const UID: &str = "6c1a2b3c-0000-4000-8000-000000000001";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn pod_selectors_must_be_the_pods_k8s_selectors() {
        let ok = strings(&["k8s:ns:shop", &format!("k8s:pod-uid:{UID}")]);
        assert_eq!(parse_pod_selectors(&ok, UID).unwrap().len(), 2);
        // Another type of selector: a pod cannot claim unix: or a node's selectors.
        let unix = strings(&["unix:uid:0", &format!("k8s:pod-uid:{UID}")]);
        // Another pod's selectors.
        let other = strings(&["k8s:ns:shop", "k8s:pod-uid:someone-else"]);
        let malformed = strings(&["k8s", &format!("k8s:pod-uid:{UID}")]);
        let many: Vec<String> = (0..=MAX_POD_SELECTORS)
            .map(|i| format!("k8s:pod-label:l{i}:v"))
            .collect();
        for bad in [unix, other, malformed, many, vec![]] {
            let e = parse_pod_selectors(&bad, UID).unwrap_err();
            assert!(
                matches!(e, ServerError::PodCert(PodCertRefusal::BadRequest(_))),
                "{e}"
            );
        }
    }

    #[test]
    fn max_expiration_is_kubernetes_range() {
        assert_eq!(max_expiration(3600).unwrap(), Duration::from_secs(3600));
        assert_eq!(max_expiration(7_862_400).unwrap().as_secs(), 7_862_400);
        for bad in [0, -1, 3599, 7_862_401, i64::MIN] {
            assert!(max_expiration(bad).is_err(), "{bad}");
        }
    }
}
