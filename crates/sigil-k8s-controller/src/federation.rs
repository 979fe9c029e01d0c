//! `ClusterFederatedTrustDomain` resources to the server's federation
//! relationships.
//!
//! Like spire-controller-manager, the controller owns every relationship
//! that does not come from the server's config file: one declared by a
//! resource is created or updated to match it, and one no resource declares
//! is deleted (its bundle stays on the server, as with `sigil federation
//! delete`). Relationships from the config file are never touched; a
//! resource naming one of them gets an error in its status. Run the
//! controller with `--manage-federation=false` to leave relationships alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::ResourceExt;
use sigil_proto::server::v1 as pb;
use sigil_types::{BundleEndpointProfile, FederationRelationship, TrustDomain};

use super::crd::{ClusterFederatedTrustDomain, ClusterFederatedTrustDomainStatus};

/// The relationship one resource declares, with its bootstrap bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredRelationship {
    /// The resource's name.
    pub resource: String,
    /// The relationship.
    pub relationship: FederationRelationship,
    /// The bundle to store when the relationship is created.
    pub bootstrap_bundle: Option<String>,
}

/// What the resources declare, and each resource's status so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FederationDesired {
    /// By trust domain; when two resources name one trust domain, the first
    /// by name wins and the other gets an error.
    pub relationships: BTreeMap<TrustDomain, DeclaredRelationship>,
    /// By resource name.
    pub status: BTreeMap<String, ClusterFederatedTrustDomainStatus>,
}

/// Turns resources into relationships, validating each; `own` is the
/// server's trust domain.
pub fn render_federation(
    own: &TrustDomain,
    resources: &[Arc<ClusterFederatedTrustDomain>],
) -> FederationDesired {
    let mut out = FederationDesired::default();
    let mut sorted: Vec<_> = resources.iter().collect();
    sorted.sort_by_key(|r| r.name_any());
    for r in sorted {
        let name = r.name_any();
        let mut status = ClusterFederatedTrustDomainStatus {
            observed_generation: r.metadata.generation,
            ..Default::default()
        };
        match declared(own, r) {
            Ok(d) => {
                if let Some(first) = out.relationships.get(&d.relationship.trust_domain) {
                    status.errors.push(format!(
                        "trust domain {} is already declared by ClusterFederatedTrustDomain {}",
                        d.relationship.trust_domain, first.resource
                    ));
                } else {
                    out.relationships
                        .insert(d.relationship.trust_domain.clone(), d);
                }
            }
            Err(e) => status.errors.push(e),
        }
        out.status.insert(name, status);
    }
    out
}

fn declared(
    own: &TrustDomain,
    r: &ClusterFederatedTrustDomain,
) -> Result<DeclaredRelationship, String> {
    let spec = &r.spec;
    let trust_domain = TrustDomain::new(&spec.trust_domain)
        .map_err(|e| format!("trustDomain {:?}: {e}", spec.trust_domain))?;
    let profile = BundleEndpointProfile::from_parts(
        &spec.bundle_endpoint_profile.profile_type,
        spec.bundle_endpoint_profile.endpoint_spiffe_id.as_deref(),
    )
    .map_err(|e| format!("bundleEndpointProfile: {e}"))?;
    let relationship = FederationRelationship {
        trust_domain,
        bundle_endpoint_url: spec.bundle_endpoint_url.clone(),
        profile,
        from_config: false,
    };
    relationship.validate(own).map_err(|e| e.to_string())?;
    let bootstrap_bundle = match spec.trust_domain_bundle.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(json) => {
            sigil_svid::bundle::Bundle::from_json(relationship.trust_domain.clone(), json)
                .map_err(|e| format!("trustDomainBundle: {e}"))?;
            Some(json.to_owned())
        }
    };
    Ok(DeclaredRelationship {
        resource: r.name_any(),
        relationship,
        bootstrap_bundle,
    })
}

/// Changes that make the server's relationships match the resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FederationPlan {
    /// Relationships to create (with their bootstrap bundle).
    pub create: Vec<pb::FederationRelationship>,
    /// Relationships to update (without bundle: fetched bundles are newer).
    pub update: Vec<pb::FederationRelationship>,
    /// Trust domains whose relationship to delete.
    pub delete: Vec<TrustDomain>,
}

impl FederationPlan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// The wire form of a declared relationship.
pub fn to_proto(d: &DeclaredRelationship, with_bundle: bool) -> pb::FederationRelationship {
    let r = &d.relationship;
    pb::FederationRelationship {
        trust_domain: r.trust_domain.to_string(),
        bundle_endpoint_url: r.bundle_endpoint_url.clone(),
        bundle_endpoint_profile: r.profile.name().to_owned(),
        endpoint_spiffe_id: r
            .profile
            .endpoint_spiffe_id()
            .map(ToString::to_string)
            .unwrap_or_default(),
        trust_domain_bundle_json: if with_bundle {
            d.bootstrap_bundle.clone().unwrap_or_default()
        } else {
            String::new()
        },
        ..Default::default()
    }
}

/// Compares what is declared with what the server holds. Config-file
/// relationships are never planned; a resource naming one gets an error in
/// `desired.status`.
pub fn plan_federation(
    desired: &mut FederationDesired,
    existing: &[pb::FederationRelationship],
) -> FederationPlan {
    let mut plan = FederationPlan::default();
    let mut seen = BTreeMap::new();
    for e in existing {
        let Ok(td) = TrustDomain::new(&e.trust_domain) else {
            continue;
        };
        seen.insert(td.clone(), e);
        match desired.relationships.get(&td) {
            Some(d) if e.from_config => {
                if let Some(st) = desired.status.get_mut(&d.resource) {
                    st.errors.push(format!(
                        "the relationship with {td} comes from the server's config file; \
                         remove it there or delete this resource"
                    ));
                }
            }
            Some(d) => {
                let want = to_proto(d, false);
                if want.bundle_endpoint_url != e.bundle_endpoint_url
                    || want.bundle_endpoint_profile != e.bundle_endpoint_profile
                    || want.endpoint_spiffe_id != e.endpoint_spiffe_id
                {
                    plan.update.push(want);
                }
            }
            None if e.from_config => {}
            None => plan.delete.push(td),
        }
    }
    for (td, d) in &desired.relationships {
        if !seen.contains_key(td) {
            plan.create.push(to_proto(d, true));
        }
    }
    plan
}

/// Records the outcome for the resource that declared `trust_domain`.
pub fn record_result(desired: &mut FederationDesired, trust_domain: &str, error: Option<String>) {
    let Some(d) = TrustDomain::new(trust_domain)
        .ok()
        .and_then(|td| desired.relationships.get(&td))
    else {
        return;
    };
    if let (Some(st), Some(e)) = (desired.status.get_mut(&d.resource), error) {
        st.errors.push(e);
    }
}

/// Marks every resource whose relationship is on the server as declared and
/// that has no error as `set`.
pub fn finish_status(desired: &mut FederationDesired) {
    let set: Vec<String> = desired
        .relationships
        .values()
        .map(|d| d.resource.clone())
        .collect();
    for name in set {
        if let Some(st) = desired.status.get_mut(&name) {
            st.set = st.errors.is_empty();
        }
    }
}
