//! The `k8s:` selectors of a pod, computed one way for everyone: the agent
//! (for a process in the pod, from the kubelet's pod list, [`crate::kubelet`])
//! and the entry controller (for a pod certificate, from the API server's
//! pod object). Always built, whatever the crate's features.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use sigil_types::{Selector, Selectors};

/// The selector type of every selector computed here.
pub const SELECTOR_TYPE: &str = "k8s";

/// The pod-level `k8s:` selectors of `pod` (no `container-*` selectors):
/// what the agent attests any process of the pod with before its container
/// is known, and what a pod certificate is issued against.
pub fn pod_selectors(pod: &Pod) -> Selectors {
    selectors_of(pod, None)
}

pub(crate) fn pod_uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

pub(crate) fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

pub(crate) fn statuses(pod: &Pod) -> (&[ContainerStatus], &[ContainerStatus]) {
    let status = pod.status.as_ref();
    (
        status
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default(),
        status
            .and_then(|s| s.init_container_statuses.as_deref())
            .unwrap_or_default(),
    )
}

pub(crate) fn selectors_of(pod: &Pod, container: Option<&ContainerStatus>) -> Selectors {
    let mut values: Vec<String> = Vec::new();
    let mut push = |name: &str, value: &str| {
        if !value.is_empty() {
            values.push(format!("{name}:{value}"));
        }
    };
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    push(
        "sa",
        spec.and_then(|s| s.service_account_name.as_deref())
            .unwrap_or_default(),
    );
    push("ns", meta.namespace.as_deref().unwrap_or_default());
    push("node-name", node_name(pod).unwrap_or_default());
    push("pod-uid", pod_uid(pod));
    push("pod-name", meta.name.as_deref().unwrap_or_default());
    let (containers, inits) = statuses(pod);
    push("pod-image-count", &containers.len().to_string());
    push("pod-init-image-count", &inits.len().to_string());
    // Both the tag and the digest form (spiffe/spire#2026); the set dedups.
    for s in containers {
        push("pod-image", &s.image);
        push("pod-image", &s.image_id);
    }
    for s in inits {
        push("pod-init-image", &s.image);
        push("pod-init-image", &s.image_id);
    }
    for owner in meta.owner_references.iter().flatten() {
        push("pod-owner", &format!("{}:{}", owner.kind, owner.name));
        push("pod-owner-uid", &format!("{}:{}", owner.kind, owner.uid));
    }
    if let Some(s) = container {
        push("container-name", &s.name);
        push("container-image", &s.image);
        push("container-image", &s.image_id);
    }
    for (k, v) in meta.labels.iter().flatten() {
        values.push(format!("pod-label:{k}:{v}"));
    }

    let mut out = Selectors::new();
    for value in values.into_iter().collect::<BTreeSet<_>>() {
        match Selector::new(SELECTOR_TYPE, &value) {
            Ok(s) => out.insert(s),
            // Over-long or control characters: leaving a selector out can
            // only make fewer registrations match.
            Err(e) => {
                tracing::warn!(error = %e, "skipping a k8s selector the selector rules reject")
            }
        }
    }
    out
}
