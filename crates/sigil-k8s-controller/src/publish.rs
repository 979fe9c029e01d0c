//! The trust bundle, published where Kubernetes looks for it: a
//! `ClusterTrustBundle` linked to sigil's signer name with the server's own
//! X.509 authorities, one `ClusterTrustBundle` (without signer) per federated
//! trust domain, and a ConfigMap with the own bundle in every namespace
//! labelled `sigil.dev/bundle: "true"` (and in the namespaces named on the
//! command line, the agents' own).
//!
//! The admin API has no bundle stream, so the publisher asks the server for
//! its bundle and its federated bundles every [`PublishConfig::poll`] (5 s by
//! default, a Unix-socket round trip) and writes to Kubernetes when that
//! answer, or the set of labelled namespaces (a watch), changed, and every
//! [`PublishConfig::resync`] regardless (repairing objects changed behind
//! its back). It publishes exactly the authorities of the server's answer,
//! in its order without duplicates: the server keeps an authority in its
//! bundle until nothing it signed can still be valid, so a published bundle
//! never lacks one that is still needed. An answer without any X.509
//! authority is refused (it would lock every new agent out), and nothing is
//! changed when the server cannot be asked.
//!
//! Objects are written with create and replace (the replace carrying the
//! resource version read just before, so a concurrent change fails with a
//! conflict and is retried), never with server-side apply: apply would
//! merge sigil's fields into an object of the same name that someone else
//! made. The publisher owns exactly the objects that carry both
//! [`MANAGED_BY_LABEL`]`=`[`MANAGED_BY`] and [`OWNER_LABEL`]`=<own trust
//! domain label>`; an object of a wanted name without them is left alone
//! and reported as a conflict in every pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1beta1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sigil_svid::bundle::Bundle;
use sigil_types::TrustDomain;
use tokio_util::sync::CancellationToken;

use super::ControllerError;

/// The signer name of the own trust domain's `ClusterTrustBundle`.
pub const DEFAULT_SIGNER_NAME: &str = "sigil.dev/spiffe";
/// The name of the bundle ConfigMap.
pub const DEFAULT_CONFIGMAP_NAME: &str = "sigil-bundle";
/// The namespace label that asks for the bundle ConfigMap (value `"true"`).
pub const NAMESPACE_LABEL: &str = "sigil.dev/bundle";
/// The standard label naming the tool that manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] on the publisher's objects.
pub const MANAGED_BY: &str = "sigil-controller";
/// The label saying which trust domain's server published an object (its
/// [`object_label`]).
pub const OWNER_LABEL: &str = "sigil.dev/owner";
/// The label saying whose bundle an object holds (the [`object_label`] of
/// that trust domain).
pub const TRUST_DOMAIN_LABEL: &str = "sigil.dev/trust-domain";
/// The annotation with the full name of the trust domain whose bundle an
/// object holds.
pub const TRUST_DOMAIN_ANNOTATION: &str = "sigil.dev/trust-domain";
/// The label `"true"` on the `ClusterTrustBundle`s of federated trust domains.
pub const FEDERATED_LABEL: &str = "sigil.dev/federated";
/// The name prefix of a federated trust domain's `ClusterTrustBundle`.
pub const FEDERATED_PREFIX: &str = "sigil-federated.";
/// ConfigMap key: the own X.509 authorities, PEM.
pub const KEY_PEM: &str = "bundle.pem";
/// ConfigMap key: the own bundle as SPIFFE bundle JSON (X.509 and JWT authorities).
pub const KEY_SPIFFE: &str = "bundle.spiffe.json";
/// ConfigMap key: the own trust domain's name.
pub const KEY_TRUST_DOMAIN: &str = "trust-domain";

/// Why a publishing setting is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishConfigError {
    /// The signer name is not `<DNS subdomain>/<name>`.
    #[error(
        "invalid signer name {0:?}: use <domain>/<name>, e.g. sigil.dev/spiffe (a DNS subdomain, one '/', then letters, digits, '.', '-' or '_')"
    )]
    SignerName(String),
    /// A ConfigMap or namespace name is not a DNS subdomain (or label).
    #[error(
        "invalid {what} {name:?}: use lowercase letters, digits, '-' and '.' (a Kubernetes object name)"
    )]
    ObjectName {
        /// Which setting.
        what: &'static str,
        /// The value.
        name: String,
    },
}

/// How the publisher runs.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// The signer name of the own `ClusterTrustBundle`.
    pub signer_name: String,
    /// The ConfigMap's name.
    pub configmap_name: String,
    /// Namespaces that get the ConfigMap without the label (the agents').
    pub namespaces: BTreeSet<String>,
    /// How often the server's bundle is asked for.
    pub poll: Duration,
    /// The longest time between two passes over the Kubernetes objects.
    pub resync: Duration,
    /// The first wait after a failure; it doubles up to [`Self::max_backoff`].
    pub min_backoff: Duration,
    /// The longest wait after failures.
    pub max_backoff: Duration,
}

impl Default for PublishConfig {
    /// [`DEFAULT_SIGNER_NAME`], [`DEFAULT_CONFIGMAP_NAME`], no extra
    /// namespace, poll 5 s, resync 60 s, backoff 1 s to 60 s.
    fn default() -> Self {
        Self {
            signer_name: DEFAULT_SIGNER_NAME.to_owned(),
            configmap_name: DEFAULT_CONFIGMAP_NAME.to_owned(),
            namespaces: BTreeSet::new(),
            poll: Duration::from_secs(5),
            resync: Duration::from_secs(60),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl PublishConfig {
    /// Checks the names: the signer name, the ConfigMap's name and the extra namespaces.
    pub fn validate(&self) -> Result<(), PublishConfigError> {
        check_signer_name(&self.signer_name)?;
        if !is_dns_subdomain(&self.configmap_name) {
            return Err(PublishConfigError::ObjectName {
                what: "ConfigMap name",
                name: self.configmap_name.clone(),
            });
        }
        for ns in &self.namespaces {
            if !is_dns_label(ns) {
                return Err(PublishConfigError::ObjectName {
                    what: "namespace",
                    name: ns.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Checks a signer name: `<DNS subdomain>/<name>`, the name 1 to 63
/// letters, digits, `.`, `-` or `_` (Kubernetes' own rule is looser; this
/// one keeps the `ClusterTrustBundle` name prefix plain).
pub fn check_signer_name(s: &str) -> Result<(), PublishConfigError> {
    let ok = s.split_once('/').is_some_and(|(domain, name)| {
        is_dns_subdomain(domain)
            && domain.contains('.')
            && !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    });
    if ok {
        Ok(())
    } else {
        Err(PublishConfigError::SignerName(s.to_owned()))
    }
}

/// RFC 1123 label: 1 to 63 lowercase letters, digits and `-`, alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A trust domain as it appears in object names and label values: the
/// name itself when it is a DNS subdomain of at most 63 characters (most
/// trust domains), otherwise `td-` and 32 hex digits of its SHA-256 (the
/// annotation [`TRUST_DOMAIN_ANNOTATION`] then carries the name).
pub fn object_label(td: &TrustDomain) -> String {
    let name = td.name();
    if name.len() <= 63 && is_dns_subdomain(name) {
        return name.to_owned();
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, name.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("td-{hex}")
}

/// The name of the own trust domain's `ClusterTrustBundle`: the signer name
/// with `/` replaced by `:`, a `:`, and the trust domain ([`object_label`]),
/// as Kubernetes requires of a bundle linked to a signer.
pub fn own_bundle_name(signer_name: &str, own: &TrustDomain) -> String {
    format!("{}:{}", signer_name.replace('/', ":"), object_label(own))
}

/// The name of a federated trust domain's `ClusterTrustBundle`.
pub fn federated_bundle_name(td: &TrustDomain) -> String {
    format!("{FEDERATED_PREFIX}{}", object_label(td))
}

/// The label selector of the objects the publisher of `own` owns.
pub fn owner_selector(own: &TrustDomain) -> String {
    format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY},{OWNER_LABEL}={}",
        object_label(own)
    )
}

/// Whether the publisher of `own` owns an object with this metadata.
pub fn is_owned(meta: &ObjectMeta, own: &TrustDomain) -> bool {
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    label(MANAGED_BY_LABEL) == Some(MANAGED_BY)
        && label(OWNER_LABEL) == Some(object_label(own).as_str())
}

/// The X.509 authorities of a bundle as concatenated PEM `CERTIFICATE`
/// blocks, in the bundle's order, each certificate once; `None` when there
/// is none.
pub fn trust_bundle_pem(bundle: &Bundle) -> Option<String> {
    let mut seen = BTreeSet::new();
    let unique: Vec<Vec<u8>> = bundle
        .x509_authorities
        .iter()
        .filter(|der| seen.insert(der.as_slice()))
        .cloned()
        .collect();
    (!unique.is_empty()).then(|| sigil_svid::pem::certs_to_pem(&unique))
}

/// What the server holds: its own bundle (with the JSON it sent) and the
/// bundles of federated trust domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerBundles {
    /// The own bundle.
    pub own: Bundle,
    /// The own bundle as the server sent it (SPIFFE bundle JSON).
    pub own_json: String,
    /// Federated trust domains' bundles, by trust domain.
    pub federated: BTreeMap<TrustDomain, Bundle>,
}

impl ServerBundles {
    /// Reads the server's answers. The own bundle must hold an X.509
    /// authority, and every bundle must parse: otherwise nothing is
    /// published (a partial answer must not delete objects).
    pub fn from_answers(
        trust_domain: &str,
        own_json: &str,
        federated: &[(String, String)],
    ) -> Result<Self, ControllerError> {
        let td = TrustDomain::new(trust_domain).map_err(|e| {
            ControllerError::BadAnswer(format!("trust domain {trust_domain:?}: {e}"))
        })?;
        let own = Bundle::from_json(td.clone(), own_json)
            .map_err(|e| ControllerError::BadAnswer(format!("the bundle of {td}: {e}")))?;
        if own.x509_authorities.is_empty() {
            return Err(ControllerError::BadAnswer(format!(
                "the bundle of {td} has no X.509 authority; not publishing it"
            )));
        }
        let mut out = BTreeMap::new();
        for (name, json) in federated {
            let ftd = TrustDomain::new(name).map_err(|e| {
                ControllerError::BadAnswer(format!("federated trust domain {name:?}: {e}"))
            })?;
            if ftd == td {
                continue;
            }
            let b = Bundle::from_json(ftd.clone(), json).map_err(|e| {
                ControllerError::BadAnswer(format!("the federated bundle of {ftd}: {e}"))
            })?;
            out.insert(ftd, b);
        }
        Ok(Self {
            own,
            own_json: own_json.to_owned(),
            federated: out,
        })
    }

    /// The ConfigMap's data: [`KEY_PEM`], [`KEY_SPIFFE`], [`KEY_TRUST_DOMAIN`].
    pub fn configmap_data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                KEY_PEM.to_owned(),
                trust_bundle_pem(&self.own).unwrap_or_default(),
            ),
            (KEY_SPIFFE.to_owned(), self.own_json.clone()),
            (
                KEY_TRUST_DOMAIN.to_owned(),
                self.own.trust_domain.to_string(),
            ),
        ])
    }

    /// The `ClusterTrustBundle`s that should exist, by name: the own one,
    /// linked to `signer_name`, and one per federated trust domain with an
    /// X.509 authority, linked to no signer.
    pub fn cluster_trust_bundles(&self, signer_name: &str) -> BTreeMap<String, ClusterTrustBundle> {
        let own = &self.own.trust_domain;
        let mut out = BTreeMap::new();
        let mut add = |name: String, bundle: &Bundle, signer: Option<&str>| {
            let Some(pem) = trust_bundle_pem(bundle) else {
                return;
            };
            let mut labels = owner_labels(own);
            labels.insert(
                TRUST_DOMAIN_LABEL.to_owned(),
                object_label(&bundle.trust_domain),
            );
            if signer.is_none() {
                labels.insert(FEDERATED_LABEL.to_owned(), "true".to_owned());
            }
            let ctb = ClusterTrustBundle {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        TRUST_DOMAIN_ANNOTATION.to_owned(),
                        bundle.trust_domain.to_string(),
                    )])),
                    ..ObjectMeta::default()
                },
                spec: ClusterTrustBundleSpec {
                    signer_name: signer.map(str::to_owned),
                    trust_bundle: pem,
                },
            };
            out.insert(name, ctb);
        };
        add(
            own_bundle_name(signer_name, own),
            &self.own,
            Some(signer_name),
        );
        for (td, b) in &self.federated {
            add(federated_bundle_name(td), b, None);
        }
        out
    }
}

/// The labels every object of the publisher of `own` carries.
fn owner_labels(own: &TrustDomain) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (OWNER_LABEL.to_owned(), object_label(own)),
    ])
}

/// The ConfigMap that should exist in `namespace`.
pub fn desired_configmap(name: &str, namespace: &str, bundles: &ServerBundles) -> ConfigMap {
    let own = &bundles.own.trust_domain;
    let mut labels = owner_labels(own);
    labels.insert(TRUST_DOMAIN_LABEL.to_owned(), object_label(own));
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                TRUST_DOMAIN_ANNOTATION.to_owned(),
                own.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(bundles.configmap_data()),
        ..ConfigMap::default()
    }
}

/// Whether `have` already carries what `want` sets (its labels and
/// annotations may hold more).
fn meta_matches(have: &ObjectMeta, want: &ObjectMeta) -> bool {
    let covers = |h: &Option<BTreeMap<String, String>>, w: &Option<BTreeMap<String, String>>| {
        w.iter()
            .flatten()
            .all(|(k, v)| h.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    covers(&have.labels, &want.labels) && covers(&have.annotations, &want.annotations)
}

/// `want` with the metadata of `have` it must keep to replace it: the
/// resource version (optimistic concurrency) and the labels and
/// annotations others added.
fn replacing<T: kube::Resource>(mut want: T, have: &T) -> T {
    let h = have.meta();
    let w = want.meta_mut();
    w.resource_version.clone_from(&h.resource_version);
    let merge = |h: &Option<BTreeMap<String, String>>, w: &mut Option<BTreeMap<String, String>>| {
        let mut all = h.clone().unwrap_or_default();
        all.extend(w.take().unwrap_or_default());
        *w = Some(all);
    };
    merge(&h.labels, &mut w.labels);
    merge(&h.annotations, &mut w.annotations);
    want
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Objects created (`ClusterTrustBundle/<name>`, `ConfigMap/<ns>/<name>`).
    pub created: Vec<String>,
    /// Objects replaced.
    pub updated: Vec<String>,
    /// Objects deleted.
    pub deleted: Vec<String>,
    /// Objects of a wanted name that sigil does not own: left alone.
    pub conflicts: Vec<String>,
    /// Requests that failed (retried by the next pass, after a backoff).
    pub failures: Vec<String>,
    /// The API server does not serve `certificates.k8s.io/v1beta1`
    /// `clustertrustbundles` (not enabled in this cluster).
    pub cluster_trust_bundles_unavailable: bool,
}

impl PublishReport {
    fn changed(&self) -> bool {
        !(self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty())
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Makes the cluster's bundle ConfigMaps and `ClusterTrustBundle`s match
/// `bundles`, with the ConfigMap in each of `namespaces`. Nothing stops the
/// pass: errors go to the report, and a cluster that does not serve the
/// `ClusterTrustBundle` API (beta, off by default before it goes GA) still
/// gets its ConfigMaps.
pub async fn publish_once(
    client: &Client,
    config: &PublishConfig,
    bundles: &ServerBundles,
    namespaces: &BTreeSet<String>,
) -> PublishReport {
    let mut report = PublishReport::default();
    if let Err(e) = publish_configmaps(client, config, bundles, namespaces, &mut report).await {
        report.failures.push(format!("listing ConfigMaps: {e}"));
    }
    match publish_cluster_trust_bundles(client, config, bundles, &mut report).await {
        Ok(()) => {}
        Err(e) if api_code(&e) == Some(404) => report.cluster_trust_bundles_unavailable = true,
        Err(e) => report
            .failures
            .push(format!("listing ClusterTrustBundles: {e}")),
    }
    report
}

async fn publish_cluster_trust_bundles(
    client: &Client,
    config: &PublishConfig,
    bundles: &ServerBundles,
    report: &mut PublishReport,
) -> Result<(), kube::Error> {
    let own = &bundles.own.trust_domain;
    let ctbs: Api<ClusterTrustBundle> = Api::all(client.clone());
    let lp = ListParams::default().labels(&owner_selector(own));
    let mut existing: BTreeMap<String, ClusterTrustBundle> = ctbs
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|o| is_owned(&o.metadata, own))
        .map(|o| (o.name_any(), o))
        .collect();
    for (name, want) in bundles.cluster_trust_bundles(&config.signer_name) {
        let what = format!("ClusterTrustBundle/{name}");
        match existing.remove(&name) {
            Some(have)
                if have.spec == want.spec && meta_matches(&have.metadata, &want.metadata) => {}
            Some(have) if have.spec.signer_name != want.spec.signer_name => {
                // The signer name cannot change in place: delete, create next pass.
                delete_ctb(&ctbs, &name, &have, &what, report).await;
            }
            Some(have) => {
                let new = replacing(want, &have);
                match ctbs.replace(&name, &PostParams::default(), &new).await {
                    Ok(_) => report.updated.push(what),
                    Err(e) => report.failures.push(format!("replacing {what}: {e}")),
                }
            }
            None => match ctbs.create(&PostParams::default(), &want).await {
                Ok(_) => report.created.push(what),
                Err(e) if api_code(&e) == Some(409) => report.conflicts.push(what),
                Err(e) => report.failures.push(format!("creating {what}: {e}")),
            },
        }
    }
    for (name, have) in existing {
        let what = format!("ClusterTrustBundle/{name}");
        delete_ctb(&ctbs, &name, &have, &what, report).await;
    }
    Ok(())
}

async fn delete_ctb(
    ctbs: &Api<ClusterTrustBundle>,
    name: &str,
    have: &ClusterTrustBundle,
    what: &str,
    report: &mut PublishReport,
) {
    let dp = delete_params(have.metadata.resource_version.clone());
    match ctbs.delete(name, &dp).await {
        Ok(_) => report.deleted.push(what.to_owned()),
        Err(e) if api_code(&e) == Some(404) => {}
        Err(e) => report.failures.push(format!("deleting {what}: {e}")),
    }
}

/// A delete that succeeds only if the object is still the version read.
fn delete_params(resource_version: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            resource_version,
            uid: None,
        }),
        ..DeleteParams::default()
    }
}

async fn publish_configmaps(
    client: &Client,
    config: &PublishConfig,
    bundles: &ServerBundles,
    namespaces: &BTreeSet<String>,
    report: &mut PublishReport,
) -> Result<(), kube::Error> {
    let own = &bundles.own.trust_domain;
    let every_namespace: Api<ConfigMap> = Api::all(client.clone());
    let lp = ListParams::default().labels(&owner_selector(own));
    let mut existing: BTreeMap<(String, String), ConfigMap> = every_namespace
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|o| is_owned(&o.metadata, own))
        .map(|o| ((o.namespace().unwrap_or_default(), o.name_any()), o))
        .collect();
    let name = &config.configmap_name;
    for ns in namespaces {
        let what = format!("ConfigMap/{ns}/{name}");
        let want = desired_configmap(name, ns, bundles);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        match existing.remove(&(ns.clone(), name.clone())) {
            Some(have)
                if have.data == want.data && meta_matches(&have.metadata, &want.metadata) => {}
            Some(have) => {
                let mut new = replacing(want, &have);
                new.binary_data = None;
                match cms.replace(name, &PostParams::default(), &new).await {
                    Ok(_) => report.updated.push(what),
                    Err(e) => report.failures.push(format!("replacing {what}: {e}")),
                }
            }
            None => match cms.create(&PostParams::default(), &want).await {
                Ok(_) => report.created.push(what),
                Err(e) if api_code(&e) == Some(409) => report.conflicts.push(what),
                // The namespace went (or is going) since it was seen.
                Err(e) if matches!(api_code(&e), Some(403 | 404)) => {
                    tracing::debug!(object = %what, error = %e, "namespace gone; not published");
                }
                Err(e) => report.failures.push(format!("creating {what}: {e}")),
            },
        }
    }
    // Owned ConfigMaps in namespaces that lost the label, and under a name
    // no longer configured.
    for ((ns, cm_name), have) in existing {
        let what = format!("ConfigMap/{ns}/{cm_name}");
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let dp = delete_params(have.metadata.resource_version.clone());
        match cms.delete(&cm_name, &dp).await {
            Ok(_) => report.deleted.push(what),
            Err(e) if api_code(&e) == Some(404) => {}
            Err(e) => report.failures.push(format!("deleting {what}: {e}")),
        }
    }
    Ok(())
}

/// The namespaces that want the ConfigMap: labelled [`NAMESPACE_LABEL`]
/// `"true"` exactly, and not being deleted.
pub fn labelled_namespaces(namespaces: &[std::sync::Arc<Namespace>]) -> BTreeSet<String> {
    namespaces
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(NAMESPACE_LABEL))
                .is_some_and(|v| v == "true")
        })
        .map(|n| n.name_any())
        .collect()
}

/// Aborts the namespace watch when the publisher ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks the server for its bundle and its federated bundles.
async fn fetch(admin: &mut sigil_client::AdminClient) -> Result<ServerBundles, ControllerError> {
    let own = admin.bundle().await?;
    let federated: Vec<(String, String)> = admin
        .list_federated_bundles()
        .await?
        .into_iter()
        .map(|b| (b.trust_domain, b.bundle_json))
        .collect();
    ServerBundles::from_answers(&own.trust_domain, &own.bundle_json, &federated)
}

/// Runs the publisher until `shutdown` is cancelled. It never returns an
/// error: failures (admin socket, API server) are logged and retried with
/// a backoff.
pub async fn run_publisher(
    client: Client,
    admin_socket: PathBuf,
    config: PublishConfig,
    shutdown: CancellationToken,
) {
    let namespace_api: Api<Namespace> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let events = reflector::reflector(
        writer,
        watcher(namespace_api, watcher::Config::default())
            .modify(|n: &mut Namespace| {
                n.metadata.managed_fields = None;
                n.spec = None;
                n.status = None;
            })
            .default_backoff(),
    );
    let (changed_tx, mut changed) = tokio::sync::watch::channel(0u64);
    let driver = tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(e) = events.next().await {
            if let Err(e) = e {
                tracing::warn!(kind = "Namespace", error = %e, "watch failed; retrying");
            }
            changed_tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    });
    let _abort = AbortOnDrop(driver);
    tokio::select! {
        () = shutdown.cancelled() => return,
        r = store.wait_until_ready() => if r.is_err() { return },
    }
    publish_loop(
        &client,
        &admin_socket,
        &config,
        &store,
        &mut changed,
        &shutdown,
    )
    .await;
}

async fn publish_loop(
    client: &Client,
    admin_socket: &std::path::Path,
    config: &PublishConfig,
    store: &Store<Namespace>,
    changed: &mut tokio::sync::watch::Receiver<u64>,
    shutdown: &CancellationToken,
) {
    let mut admin: Option<sigil_client::AdminClient> = None;
    // What the last successful pass published, and when.
    let mut published: Option<(ServerBundles, BTreeSet<String>, tokio::time::Instant)> = None;
    let mut backoff = config.min_backoff;
    loop {
        changed.borrow_and_update();
        let ok = pass(
            client,
            admin_socket,
            config,
            store,
            &mut admin,
            &mut published,
        )
        .await;
        let wait = if ok {
            backoff = config.min_backoff;
            config.poll
        } else {
            let w = backoff;
            backoff = (backoff * 2).min(config.max_backoff);
            w
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = changed.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One round: ask the server, publish when something changed or the resync
/// is due. Whether it went well.
async fn pass(
    client: &Client,
    admin_socket: &std::path::Path,
    config: &PublishConfig,
    store: &Store<Namespace>,
    admin: &mut Option<sigil_client::AdminClient>,
    published: &mut Option<(ServerBundles, BTreeSet<String>, tokio::time::Instant)>,
) -> bool {
    let conn = match admin {
        Some(c) => c,
        None => match sigil_client::AdminClient::connect(admin_socket).await {
            Ok(c) => admin.insert(c),
            Err(e) => {
                tracing::warn!(socket = %admin_socket.display(), error = %e, "bundle publisher cannot reach the admin socket; retrying");
                return false;
            }
        },
    };
    let bundles = match fetch(conn).await {
        Ok(b) => b,
        Err(e) => {
            *admin = None;
            tracing::warn!(error = %e, "bundle publisher cannot read the server's bundle; retrying");
            return false;
        }
    };
    let mut namespaces = labelled_namespaces(&store.state());
    namespaces.extend(config.namespaces.iter().cloned());
    let due = published.as_ref().is_none_or(|(b, n, at)| {
        b != &bundles || n != &namespaces || at.elapsed() >= config.resync
    });
    if !due {
        return true;
    }
    let report = publish_once(client, config, &bundles, &namespaces).await;
    for c in &report.conflicts {
        tracing::warn!(object = %c, "an object of this name exists and is not sigil's (no labels {MANAGED_BY_LABEL}={MANAGED_BY}, {OWNER_LABEL}=…); left alone, bundle not published there");
    }
    for f in &report.failures {
        tracing::warn!(error = %f, "bundle publishing failed; retrying");
    }
    if report.cluster_trust_bundles_unavailable && published.is_none() {
        tracing::info!(
            "the API server does not serve ClusterTrustBundles (certificates.k8s.io/v1beta1); publishing ConfigMaps only"
        );
    }
    if report.changed() {
        tracing::info!(
            created = ?report.created,
            updated = ?report.updated,
            deleted = ?report.deleted,
            "trust bundle published"
        );
    }
    if report.failures.is_empty() {
        *published = Some((bundles, namespaces, tokio::time::Instant::now()));
        true
    } else {
        *published = None;
        false
    }
}
