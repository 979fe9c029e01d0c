//! The custom resources of the entry controller (group [`GROUP`], version
//! `v1alpha1`, both cluster-scoped) and their CRD manifests.
//!
//! The manifests under `deploy/crds/` are generated from these types by
//! [`crd_manifests`]; the test `controller::crds_are_current` in
//! `tests/it/` fails when they are stale and rewrites them with
//! `SIGIL_BLESS=1`.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ControllerError;

/// The API group of sigil's custom resources.
pub const GROUP: &str = "identity.sigil";
/// The API version of sigil's custom resources.
pub const VERSION: &str = "v1alpha1";

/// How a `ClusterSPIFFEID` turns pods into registration entries.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    /// One entry per pod: parented to the agent of the pod's node and
    /// selecting the pod by UID (`k8s:pod-uid:<uid>`), as spire-controller-manager does.
    #[default]
    PerPod,
    /// One entry per namespace and service account (and per region or zone
    /// when the templates use those node labels), parented to a node alias of
    /// the cluster's agents and selecting `k8s:ns:<ns>` and `k8s:sa:<sa>`.
    /// The templates may only use the fields that are the same for every pod
    /// of such a group.
    PerServiceAccount,
}

/// One requirement of a label selector.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// The values for `In` and `NotIn` (at least one); empty for the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A Kubernetes label selector: all of `matchLabels` and all of
/// `matchExpressions` must hold; an empty selector matches everything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements on labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// Registration entries rendered from templates for every selected pod.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "identity.sigil",
    version = "v1alpha1",
    kind = "ClusterSPIFFEID",
    plural = "clusterspiffeids",
    shortname = "csid",
    status = "ClusterSPIFFEIDStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Registration entries for the pods it selects, rendered from templates.",
    // The JSON form: clippy's duplicated_attributes flags repeated `type_ = …`.
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}"#,
    printcolumn = r#"{"name": "Entries", "type": "integer", "jsonPath": ".status.stats.entriesRendered"}"#,
    printcolumn = r#"{"name": "Failures", "type": "integer", "jsonPath": ".status.stats.renderFailures"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSPIFFEIDSpec {
    /// The SPIFFE ID template, e.g.
    /// `spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}`.
    #[serde(rename = "spiffeIDTemplate")]
    pub spiffe_id_template: String,
    /// Which pods (by their labels); absent selects every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Which namespaces (by their labels); absent selects every namespace
    /// the controller does not ignore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Extra selector templates (`type:value`), all of which the workload must also show.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_selector_templates: Vec<String>,
    /// DNS name templates; the first name becomes the X509-SVID's subject CN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_name_templates: Vec<String>,
    /// Trust domains whose bundles the workloads receive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federates_with: Vec<String>,
    /// Attested attributes to carry in the SVIDs (`cluster`, `region`,
    /// `zone`, `node_name`, `namespace`, `service_account`; see docs/attributes.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<String>,
    /// X509-SVID lifetime such as `1h` (absent: the server's default).
    #[serde(
        default,
        rename = "x509SVIDTTL",
        skip_serializing_if = "Option::is_none"
    )]
    pub x509_svid_ttl: Option<String>,
    /// JWT-SVID lifetime such as `5m` (absent: the server's default).
    #[serde(
        default,
        rename = "jwtSVIDTTL",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwt_svid_ttl: Option<String>,
    /// A label that tells several SVIDs of one workload apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// `PerPod` (default) or `PerServiceAccount`.
    #[serde(default)]
    pub mode: Mode,
}

/// Counts of the last reconcile of a `ClusterSPIFFEID`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSPIFFEIDStats {
    /// Namespaces selected (not ignored and matching `namespaceSelector`).
    pub namespaces_selected: i64,
    /// Running, scheduled pods selected in those namespaces.
    pub pods_selected: i64,
    /// Distinct entries rendered (in `PerServiceAccount` mode, fewer than pods).
    pub entries_rendered: i64,
    /// Pods (or pod groups) whose entry could not be rendered or is invalid.
    pub render_failures: i64,
    /// Rendered entries dropped because another resource rendered the same
    /// entry key with different settings.
    pub entries_masked: i64,
    /// Entries the server refused to create or update.
    pub entry_failures: i64,
}

/// What the controller made of a `ClusterSPIFFEID`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSPIFFEIDStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Counts.
    #[serde(default)]
    pub stats: ClusterSPIFFEIDStats,
    /// Template, validation and server errors (the first few). Always
    /// written, so that a merge patch clears old errors.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// One registration entry, given literally.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "identity.sigil",
    version = "v1alpha1",
    kind = "ClusterStaticEntry",
    plural = "clusterstaticentries",
    shortname = "cse",
    status = "ClusterStaticEntryStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "One registration entry, given literally.",
    printcolumn(name = "SPIFFE ID", type_ = "string", json_path = ".spec.spiffeID"),
    printcolumn(name = "Set", type_ = "boolean", json_path = ".status.set")
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStaticEntrySpec {
    /// The SPIFFE ID the entry issues.
    #[serde(rename = "spiffeID")]
    pub spiffe_id: String,
    /// The agent, node alias or entry the entry is under.
    #[serde(rename = "parentID")]
    pub parent_id: String,
    /// Selectors (`type:value`), all of which the workload must show.
    pub selectors: Vec<String>,
    /// X509-SVID lifetime such as `1h` (absent: the server's default).
    #[serde(
        default,
        rename = "x509SVIDTTL",
        skip_serializing_if = "Option::is_none"
    )]
    pub x509_svid_ttl: Option<String>,
    /// JWT-SVID lifetime such as `5m` (absent: the server's default).
    #[serde(
        default,
        rename = "jwtSVIDTTL",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwt_svid_ttl: Option<String>,
    /// DNS names; the first becomes the X509-SVID's subject CN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles the workload receives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federates_with: Vec<String>,
    /// Attested attributes to carry in the SVIDs (`cluster`, `region`,
    /// `zone`, `node_name`, `namespace`, `service_account`; see docs/attributes.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<String>,
    /// A label that tells several SVIDs of one workload apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// What the controller made of a `ClusterStaticEntry`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStaticEntryStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether the entry rendered and validated.
    #[serde(default)]
    pub rendered: bool,
    /// Whether another resource rendered the same entry key with different settings first.
    #[serde(default)]
    pub masked: bool,
    /// Whether the entry is on the server as rendered.
    #[serde(default)]
    pub set: bool,
    /// Validation and server errors. Always written, so that a merge patch
    /// clears old errors.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// How a federated trust domain's bundle endpoint authenticates itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleEndpointProfileSpec {
    /// `https_web` (a Web PKI certificate for the URL's host) or
    /// `https_spiffe` (an X509-SVID with `endpointSPIFFEID`).
    #[serde(rename = "type")]
    pub profile_type: String,
    /// The SPIFFE ID the endpoint presents; required for `https_spiffe`.
    #[serde(
        default,
        rename = "endpointSPIFFEID",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_spiffe_id: Option<String>,
}

/// A federation relationship with another trust domain.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "identity.sigil",
    version = "v1alpha1",
    kind = "ClusterFederatedTrustDomain",
    plural = "clusterfederatedtrustdomains",
    shortname = "cftd",
    status = "ClusterFederatedTrustDomainStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A federation relationship: the server fetches this trust domain's bundle from its bundle endpoint.",
    printcolumn = r#"{"name": "Trust Domain", "type": "string", "jsonPath": ".spec.trustDomain"}"#,
    printcolumn = r#"{"name": "Endpoint URL", "type": "string", "jsonPath": ".spec.bundleEndpointURL"}"#,
    printcolumn = r#"{"name": "Set", "type": "boolean", "jsonPath": ".status.set"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterFederatedTrustDomainSpec {
    /// The foreign trust domain, e.g. `partner.example`.
    pub trust_domain: String,
    /// The `https://` URL of its SPIFFE bundle endpoint.
    #[serde(rename = "bundleEndpointURL")]
    pub bundle_endpoint_url: String,
    /// How the endpoint authenticates itself.
    pub bundle_endpoint_profile: BundleEndpointProfileSpec,
    /// The trust domain's bundle (SPIFFE bundle JSON) to start from; needed
    /// for `https_spiffe` when the endpoint's SPIFFE ID is in that trust
    /// domain. Used when the relationship is created; fetched bundles
    /// replace it afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain_bundle: Option<String>,
}

/// What the controller made of a `ClusterFederatedTrustDomain`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterFederatedTrustDomainStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether the relationship is on the server as declared.
    #[serde(default)]
    pub set: bool,
    /// Validation and server errors. Always written, so that a merge patch
    /// clears old errors.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// The CRDs of every kind, as the API server takes them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        ClusterSPIFFEID::crd(),
        ClusterStaticEntry::crd(),
        ClusterFederatedTrustDomain::crd(),
    ]
}

/// Each CRD as a YAML document, keyed by the file name it has under
/// `deploy/crds/` (`<group>_<plural>.yaml`).
pub fn crd_manifests() -> Result<BTreeMap<String, String>, ControllerError> {
    let mut out = BTreeMap::new();
    for crd in crds() {
        let file = format!("{GROUP}_{}.yaml", crd.spec.names.plural);
        let yaml =
            serde_saphyr::to_string(&crd).map_err(|e| ControllerError::Yaml(e.to_string()))?;
        out.insert(
            file,
            format!("# Generated from sigil_k8s_controller::crd; do not edit.\n{yaml}"),
        );
    }
    Ok(out)
}

/// All CRDs as one multi-document YAML stream, for `kubectl apply -f -`.
pub fn crds_yaml() -> Result<String, ControllerError> {
    let mut out = String::new();
    for doc in crd_manifests()?.values() {
        out.push_str("---\n");
        out.push_str(doc);
        if !doc.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}
