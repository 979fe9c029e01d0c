//! The reconciler core, without I/O: from the custom resources, pods,
//! namespaces and nodes to the registration entries that should exist
//! ([`render`]), and from those and the server's entries to what to create,
//! update and delete ([`plan`]).
//!
//! Every entry the controller writes has the ID `k8s-<cluster>-<hash>`, the
//! hash being 32 hex digits of a SHA-256 over the entry's SPIFFE ID, parent ID
//! and selectors (the server's uniqueness key). [`plan`] only ever touches
//! entries with such an ID ([`is_owned`]), so entries made by hand, and those
//! of controllers for other clusters, are left alone; other fields of an entry
//! (TTLs, DNS names, hint, federation) are updated in place.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::ResourceExt;
use sigil_types::{Entry, EntryId, Selector, Selectors, SpiffeId, TrustDomain};

use super::ControllerError;
use super::crd::{
    ClusterSPIFFEID, ClusterSPIFFEIDStatus, ClusterStaticEntry, ClusterStaticEntryStatus,
    LabelSelector, Mode,
};
use super::template::{Field, Template, TemplateError, Values};

/// The most errors one status lists; further ones are counted in a last line.
pub const MAX_STATUS_ERRORS: usize = 10;

/// The namespaces ignored unless configured otherwise.
pub const DEFAULT_IGNORED_NAMESPACES: &[&str] = &["kube-system", "kube-public"];

/// What the rendering depends on besides the cluster's objects.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server's trust domain.
    pub trust_domain: TrustDomain,
    /// The cluster's name: the PSAT cluster profile of the server, used in
    /// agent IDs, in `k8s_psat:cluster:` and in the controller's entry IDs.
    pub cluster_name: String,
    /// The cluster's DNS domain, for `{{ .ClusterDomain }}`.
    pub cluster_domain: String,
    /// Namespaces whose pods never get entries.
    pub ignore_namespaces: BTreeSet<String>,
}

impl Settings {
    /// Settings with the default cluster domain (`cluster.local`) and ignored
    /// namespaces ([`DEFAULT_IGNORED_NAMESPACES`]). The cluster name must be
    /// 1 to 63 letters, digits, `.`, `-` or `_` (a SPIFFE path segment).
    pub fn new(trust_domain: TrustDomain, cluster_name: &str) -> Result<Self, ControllerError> {
        check_cluster_name(cluster_name)?;
        Ok(Self {
            trust_domain,
            cluster_name: cluster_name.to_owned(),
            cluster_domain: "cluster.local".to_owned(),
            ignore_namespaces: DEFAULT_IGNORED_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        })
    }

    /// The prefix of every ID the controller gives: `k8s-<cluster>-`.
    pub fn id_prefix(&self) -> String {
        format!("k8s-{}-", self.cluster_name)
    }

    /// The ID the controller gives `entry`: `k8s-<cluster>-<hash of its key>`.
    pub fn entry_id(&self, entry: &Entry) -> Result<EntryId, ControllerError> {
        self.key_id(&entry.spiffe_id, &entry.parent_id, &entry.selectors)
    }

    /// The ID the controller gives an entry with this SPIFFE ID, parent ID
    /// and selectors.
    pub fn key_id(
        &self,
        spiffe_id: &SpiffeId,
        parent_id: &SpiffeId,
        selectors: &Selectors,
    ) -> Result<EntryId, ControllerError> {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(b"sigil-k8s-entry-v1\0");
        ctx.update(spiffe_id.as_str().as_bytes());
        ctx.update(b"\0");
        ctx.update(parent_id.as_str().as_bytes());
        for s in selectors {
            ctx.update(b"\0");
            ctx.update(s.to_string().as_bytes());
        }
        let digest = ctx.finish();
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let id = format!("{}{hex}", self.id_prefix());
        id.parse()
            .map_err(|e: sigil_types::EntryError| ControllerError::Internal(e.to_string()))
    }

    /// Whether the controller owns the entry with this ID.
    pub fn is_owned(&self, id: &EntryId) -> bool {
        id.as_str()
            .strip_prefix(&self.id_prefix())
            .is_some_and(|h| {
                h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
    }

    /// The parent of a `PerPod` entry: the PSAT agent ID of the pod's node.
    fn agent_id(&self, node_uid: &str) -> Result<SpiffeId, sigil_types::SpiffeIdError> {
        self.trust_domain.id_with_path(&format!(
            "{}/k8s_psat/{}/{node_uid}",
            sigil_types::AGENT_PATH_PREFIX,
            self.cluster_name
        ))
    }
}

/// Checks a cluster name: 1 to 63 letters, digits, `.`, `-` or `_`, and
/// neither `.` nor `..` (a SPIFFE path segment, as in the agent IDs).
pub fn check_cluster_name(name: &str) -> Result<(), ControllerError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ControllerError::InvalidClusterName(name.to_owned()))
    }
}

/// Everything the controller watches, as its caches hold it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The `ClusterSPIFFEID` resources.
    pub cluster_spiffe_ids: Vec<Arc<ClusterSPIFFEID>>,
    /// The `ClusterStaticEntry` resources.
    pub static_entries: Vec<Arc<ClusterStaticEntry>>,
    /// All pods.
    pub pods: Vec<Arc<Pod>>,
    /// All namespaces.
    pub namespaces: Vec<Arc<Namespace>>,
    /// All nodes.
    pub nodes: Vec<Arc<Node>>,
}

/// The resource an entry was rendered for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// A `ClusterStaticEntry`, by name.
    StaticEntry(String),
    /// A `ClusterSPIFFEID`, by name.
    SpiffeId(String),
    /// A node alias for `PerServiceAccount` entries.
    NodeAlias,
}

/// An entry that should exist, and the resources that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredEntry {
    /// The entry, with its controller ID.
    pub entry: Entry,
    /// Who rendered it (several resources may render the same entry).
    pub owners: BTreeSet<Owner>,
}

/// The outcome of [`render`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// The entries that should exist, by ID.
    pub entries: BTreeMap<EntryId, DesiredEntry>,
    /// The status of each `ClusterSPIFFEID`, by name.
    pub spiffe_id_status: BTreeMap<String, ClusterSPIFFEIDStatus>,
    /// The status of each `ClusterStaticEntry`, by name.
    pub static_status: BTreeMap<String, ClusterStaticEntryStatus>,
}

impl Desired {
    /// Records that the server refused entry `id` (creating or updating it):
    /// counted and reported in the status of each resource that rendered it.
    pub fn record_failure(&mut self, id: &EntryId, error: &str) {
        let Some(d) = self.entries.get(id) else {
            return;
        };
        let message = format!("entry {id} ({}): {error}", d.entry.spiffe_id);
        for owner in &d.owners {
            match owner {
                Owner::SpiffeId(name) => {
                    if let Some(s) = self.spiffe_id_status.get_mut(name) {
                        s.stats.entry_failures += 1;
                        push_error(&mut s.errors, message.clone());
                    }
                }
                Owner::StaticEntry(name) => {
                    if let Some(s) = self.static_status.get_mut(name) {
                        s.set = false;
                        push_error(&mut s.errors, message.clone());
                    }
                }
                Owner::NodeAlias => {}
            }
        }
    }
}

/// What to change on the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries to create (node aliases first).
    pub create: Vec<Entry>,
    /// Owned entries whose content differs from the rendered one.
    pub update: Vec<Entry>,
    /// Owned entries nothing renders any more.
    pub delete: Vec<EntryId>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// Pushes `message` unless the list is full; the last slot then counts the rest.
fn push_error(errors: &mut Vec<String>, message: String) {
    if errors.len() < MAX_STATUS_ERRORS {
        errors.push(message);
        return;
    }
    let more = errors
        .get(MAX_STATUS_ERRORS)
        .and_then(|l| l.strip_prefix("… and "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let line = format!("… and {} more", more + 1);
    if errors.len() > MAX_STATUS_ERRORS {
        errors[MAX_STATUS_ERRORS] = line;
    } else {
        errors.push(line);
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// ------------------------------------------------------------ label selectors --

fn check_selector(sel: &LabelSelector) -> Result<(), String> {
    for r in &sel.match_expressions {
        match r.operator.as_str() {
            "In" | "NotIn" if r.values.is_empty() => {
                return Err(format!(
                    "label selector requirement on {:?}: {} needs values",
                    r.key, r.operator
                ));
            }
            "Exists" | "DoesNotExist" if !r.values.is_empty() => {
                return Err(format!(
                    "label selector requirement on {:?}: {} takes no values",
                    r.key, r.operator
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(format!(
                    "label selector operator {other:?} is not In, NotIn, Exists or DoesNotExist"
                ));
            }
        }
    }
    Ok(())
}

/// Whether `labels` satisfy the selector; `None` matches everything.
/// The selector must have passed [`check_selector`].
fn selector_matches(sel: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else {
        return true;
    };
    sel.match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().all(|r| {
            let have = labels.get(&r.key);
            match r.operator.as_str() {
                "In" => have.is_some_and(|v| r.values.contains(v)),
                "NotIn" => have.is_none_or(|v| !r.values.contains(v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
}

// ------------------------------------------------------------------ template data --

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

fn labels<K: ResourceExt>(o: &K) -> &BTreeMap<String, String> {
    o.meta().labels.as_ref().unwrap_or(&NO_LABELS)
}

/// A pod that may get an entry: scheduled to a known node and not finished.
struct PodFacts<'a> {
    pod: &'a Pod,
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
    service_account: &'a str,
    node: &'a Node,
    node_name: &'a str,
    node_uid: &'a str,
}

impl<'a> PodFacts<'a> {
    fn of(pod: &'a Pod, nodes: &HashMap<&str, &'a Node>) -> Option<Self> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref()?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let node_name = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
        let node = *nodes.get(node_name)?;
        let node_uid = node.metadata.uid.as_deref().filter(|u| !u.is_empty())?;
        Some(Self {
            pod,
            namespace: meta.namespace.as_deref()?,
            name: meta.name.as_deref()?,
            uid: meta.uid.as_deref().filter(|u| !u.is_empty())?,
            service_account: spec
                .service_account_name
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or("default"),
            node,
            node_name,
            node_uid,
        })
    }

    fn display(&self) -> String {
        format!("pod {}/{}", self.namespace, self.name)
    }
}

struct Context<'a> {
    settings: &'a Settings,
    pod: &'a PodFacts<'a>,
}

impl Values for Context<'_> {
    fn value(&self, field: &Field) -> Result<String, TemplateError> {
        let p = self.pod;
        let v = match field {
            Field::TrustDomain => self.settings.trust_domain.name(),
            Field::ClusterName => &self.settings.cluster_name,
            Field::ClusterDomain => &self.settings.cluster_domain,
            Field::PodName => p.name,
            Field::PodNamespace => p.namespace,
            Field::PodUid => p.uid,
            Field::ServiceAccountName => p.service_account,
            Field::NodeName | Field::NodeMetaName => p.node_name,
            Field::NodeUid => p.node_uid,
            Field::PodLabel(k) => {
                labels(p.pod)
                    .get(k)
                    .ok_or_else(|| TemplateError::MissingLabel {
                        object: "pod",
                        key: k.clone(),
                    })?
            }
            Field::NodeLabel(k) => {
                labels(p.node)
                    .get(k)
                    .ok_or_else(|| TemplateError::MissingLabel {
                        object: "node",
                        key: k.clone(),
                    })?
            }
        };
        if v.is_empty() {
            return Err(TemplateError::EmptyField(field.name()));
        }
        Ok(v.to_owned())
    }
}

// ------------------------------------------------------------------ rendering --

/// A `ClusterSPIFFEID` with its templates parsed and its settings checked.
struct Compiled {
    spiffe_id: Template,
    selectors: Vec<Template>,
    dns_names: Vec<Template>,
    federates_with: Vec<TrustDomain>,
    attributes: Vec<sigil_types::Attribute>,
    x509_svid_ttl: u64,
    jwt_svid_ttl: u64,
    hint: String,
    /// `PerServiceAccount` only: the node label giving the region, and the zone.
    region_key: Option<String>,
    zone_key: Option<String>,
}

fn ttl_secs(field: &str, v: Option<&str>) -> Result<u64, String> {
    match v {
        None => Ok(0),
        Some(s) => sigil_types::duration::parse(s)
            .map(|d| d.as_secs())
            .map_err(|e| format!("{field}: {e}")),
    }
}

fn federates_with(v: &[String]) -> Result<Vec<TrustDomain>, String> {
    let mut out = v
        .iter()
        .map(|s| TrustDomain::new(s).map_err(|e| format!("federatesWith {s:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

fn attributes(v: &[String]) -> Result<Vec<sigil_types::Attribute>, String> {
    let mut out = v
        .iter()
        .map(|s| s.parse().map_err(|e| format!("attributes: {e}")))
        .collect::<Result<Vec<sigil_types::Attribute>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// What kind of location a node label key gives, by the part after its last
/// `/` (as the server's `trusted_node_label_keys`).
fn location_kind(key: &str) -> Option<&'static str> {
    match key.rsplit('/').next() {
        Some("region") => Some("region"),
        Some("zone") => Some("zone"),
        _ => None,
    }
}

fn compile(spec: &super::crd::ClusterSPIFFEIDSpec) -> Result<Compiled, String> {
    let parse = |s: &str| Template::parse(s).map_err(|e| e.to_string());
    for sel in [&spec.pod_selector, &spec.namespace_selector]
        .into_iter()
        .flatten()
    {
        check_selector(sel)?;
    }
    let mut c = Compiled {
        spiffe_id: parse(&spec.spiffe_id_template)?,
        selectors: spec
            .workload_selector_templates
            .iter()
            .map(|s| parse(s))
            .collect::<Result<_, _>>()?,
        dns_names: spec
            .dns_name_templates
            .iter()
            .map(|s| parse(s))
            .collect::<Result<_, _>>()?,
        federates_with: federates_with(&spec.federates_with)?,
        attributes: attributes(&spec.attributes)?,
        x509_svid_ttl: ttl_secs("x509SVIDTTL", spec.x509_svid_ttl.as_deref())?,
        jwt_svid_ttl: ttl_secs("jwtSVIDTTL", spec.jwt_svid_ttl.as_deref())?,
        hint: spec.hint.clone().unwrap_or_default(),
        region_key: None,
        zone_key: None,
    };
    if spec.mode == Mode::PerServiceAccount {
        let fields: Vec<Field> = std::iter::once(&c.spiffe_id)
            .chain(&c.selectors)
            .chain(&c.dns_names)
            .flat_map(|t| t.fields().cloned())
            .collect();
        for f in fields {
            match &f {
                Field::TrustDomain
                | Field::ClusterName
                | Field::ClusterDomain
                | Field::PodNamespace
                | Field::ServiceAccountName => {}
                Field::NodeLabel(k) if location_kind(k).is_some() => {
                    let slot = if location_kind(k) == Some("region") {
                        &mut c.region_key
                    } else {
                        &mut c.zone_key
                    };
                    match slot {
                        Some(have) if have != k => {
                            return Err(format!(
                                "mode PerServiceAccount: the templates use two labels of the same kind, {have:?} and {k:?}"
                            ));
                        }
                        _ => *slot = Some(k.clone()),
                    }
                }
                other => {
                    return Err(format!(
                        "mode PerServiceAccount: {{{{ {} }}}} differs between the pods of a service account; \
                         only .TrustDomain, .ClusterName, .ClusterDomain, .PodMeta.Namespace, \
                         .PodSpec.ServiceAccountName and node region/zone labels may be used",
                        other.name()
                    ));
                }
            }
        }
    }
    Ok(c)
}

/// Renders one workload entry; the ID is filled in by the caller.
fn render_entry(
    settings: &Settings,
    c: &Compiled,
    pod: &PodFacts<'_>,
    parent_id: SpiffeId,
    mut selectors: Selectors,
) -> Result<Entry, String> {
    let ctx = Context { settings, pod };
    let spiffe_id_text = c.spiffe_id.render(&ctx).map_err(|e| e.to_string())?;
    let spiffe_id: SpiffeId = spiffe_id_text
        .parse()
        .map_err(|e| format!("SPIFFE ID {spiffe_id_text:?}: {e}"))?;
    for t in &c.selectors {
        let text = t.render(&ctx).map_err(|e| e.to_string())?;
        let s: Selector = text.parse().map_err(|e| format!("selector: {e}"))?;
        selectors.insert(s);
    }
    let mut dns_names: Vec<String> = Vec::new();
    for t in &c.dns_names {
        let name = t.render(&ctx).map_err(|e| e.to_string())?;
        if !dns_names.contains(&name) {
            dns_names.push(name);
        }
    }
    let id = settings
        .key_id(&spiffe_id, &parent_id, &selectors)
        .map_err(|e| e.to_string())?;
    let mut entry = Entry::new(id, spiffe_id, parent_id, selectors);
    entry.x509_svid_ttl = c.x509_svid_ttl;
    entry.jwt_svid_ttl = c.jwt_svid_ttl;
    entry.dns_names = dns_names;
    entry.federates_with = c.federates_with.clone();
    entry.attributes = c.attributes.clone();
    entry.hint = c.hint.clone();
    entry
        .validate(&settings.trust_domain)
        .map_err(|e| e.to_string())?;
    Ok(entry)
}

fn selector(kind: &str, value: &str) -> Result<Selector, String> {
    Selector::new(kind, value).map_err(|e| format!("selector: {e}"))
}

/// Adds `entry` for `owner`, unless another owner rendered the same key with
/// other settings first (then `false`: the entry is masked).
fn add(out: &mut BTreeMap<EntryId, DesiredEntry>, entry: Entry, owner: Owner) -> bool {
    match out.get_mut(&entry.id) {
        None => {
            out.insert(
                entry.id.clone(),
                DesiredEntry {
                    entry,
                    owners: BTreeSet::from([owner]),
                },
            );
            true
        }
        Some(d) if d.entry == entry => {
            d.owners.insert(owner);
            true
        }
        Some(_) => false,
    }
}

/// Turns the cluster's objects into the entries that should exist and the
/// status of each resource. Static entries are rendered first, then
/// `ClusterSPIFFEID`s by name; when two of them render the same key
/// (SPIFFE ID, parent, selectors) with different settings, the first wins and
/// the others count it as masked.
pub fn render(settings: &Settings, snap: &Snapshot) -> Desired {
    let mut desired = Desired::default();

    let mut statics: Vec<&ClusterStaticEntry> = snap.static_entries.iter().map(|a| &**a).collect();
    statics.sort_by_key(|r| r.name_any());
    for r in statics {
        let name = r.name_any();
        let mut status = ClusterStaticEntryStatus {
            observed_generation: r.metadata.generation,
            ..Default::default()
        };
        match static_entry(settings, r)
            .map(|e| add(&mut desired.entries, e, Owner::StaticEntry(name.clone())))
        {
            Ok(added) => {
                status.rendered = true;
                status.masked = !added;
                status.set = added;
                if !added {
                    push_error(
                        &mut status.errors,
                        "another resource renders the same SPIFFE ID, parent ID and selectors with other settings".into(),
                    );
                }
            }
            Err(e) => push_error(&mut status.errors, e),
        }
        desired.static_status.insert(name, status);
    }

    let nodes: HashMap<&str, &Node> = snap
        .nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, &**n)))
        .collect();
    let namespaces: HashMap<&str, &Namespace> = snap
        .namespaces
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, &**n)))
        .collect();
    let mut pods: Vec<PodFacts<'_>> = snap
        .pods
        .iter()
        .filter_map(|p| PodFacts::of(p, &nodes))
        .filter(|p| !settings.ignore_namespaces.contains(p.namespace))
        .collect();
    pods.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));

    let mut resources: Vec<&ClusterSPIFFEID> =
        snap.cluster_spiffe_ids.iter().map(|a| &**a).collect();
    resources.sort_by_key(|r| r.name_any());
    for r in resources {
        let name = r.name_any();
        let status = render_spiffe_id(settings, r, &name, &namespaces, &pods, &mut desired.entries);
        desired.spiffe_id_status.insert(name, status);
    }
    desired
}

fn static_entry(settings: &Settings, r: &ClusterStaticEntry) -> Result<Entry, String> {
    let s = &r.spec;
    let spiffe_id: SpiffeId = s
        .spiffe_id
        .parse()
        .map_err(|e| format!("spiffeID {:?}: {e}", s.spiffe_id))?;
    let parent_id: SpiffeId = s
        .parent_id
        .parse()
        .map_err(|e| format!("parentID {:?}: {e}", s.parent_id))?;
    let selectors = Selectors::parse_all(&s.selectors).map_err(|e| format!("selectors: {e}"))?;
    let id = settings
        .key_id(&spiffe_id, &parent_id, &selectors)
        .map_err(|e| e.to_string())?;
    let mut entry = Entry::new(id, spiffe_id, parent_id, selectors);
    entry.x509_svid_ttl = ttl_secs("x509SVIDTTL", s.x509_svid_ttl.as_deref())?;
    entry.jwt_svid_ttl = ttl_secs("jwtSVIDTTL", s.jwt_svid_ttl.as_deref())?;
    entry.dns_names = s.dns_names.clone();
    entry.federates_with = federates_with(&s.federates_with)?;
    entry.attributes = attributes(&s.attributes)?;
    entry.hint = s.hint.clone().unwrap_or_default();
    entry
        .validate(&settings.trust_domain)
        .map_err(|e| e.to_string())?;
    Ok(entry)
}

/// The key of a `PerServiceAccount` group: namespace, service account,
/// region and zone (when the templates use them).
type GroupKey<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>);

fn render_spiffe_id(
    settings: &Settings,
    r: &ClusterSPIFFEID,
    name: &str,
    namespaces: &HashMap<&str, &Namespace>,
    pods: &[PodFacts<'_>],
    out: &mut BTreeMap<EntryId, DesiredEntry>,
) -> ClusterSPIFFEIDStatus {
    let mut status = ClusterSPIFFEIDStatus {
        observed_generation: r.metadata.generation,
        ..Default::default()
    };
    let compiled = match compile(&r.spec) {
        Ok(c) => c,
        Err(e) => {
            push_error(&mut status.errors, e);
            return status;
        }
    };
    let ns_selected: BTreeSet<&str> = namespaces
        .iter()
        .filter(|(n, _)| !settings.ignore_namespaces.contains(**n))
        .filter(|(_, ns)| selector_matches(r.spec.namespace_selector.as_ref(), labels(**ns)))
        .map(|(n, _)| *n)
        .collect();
    status.stats.namespaces_selected = count(ns_selected.len());
    let selected = pods.iter().filter(|p| {
        ns_selected.contains(p.namespace)
            && selector_matches(r.spec.pod_selector.as_ref(), labels(p.pod))
    });
    let owner = Owner::SpiffeId(name.to_owned());
    let mut rendered: BTreeSet<EntryId> = BTreeSet::new();
    let mut keep = |status: &mut ClusterSPIFFEIDStatus,
                    out: &mut BTreeMap<EntryId, DesiredEntry>,
                    entry: Entry| {
        let id = entry.id.clone();
        if add(out, entry, owner.clone()) {
            rendered.insert(id);
            true
        } else {
            status.stats.entries_masked += 1;
            false
        }
    };
    match r.spec.mode {
        Mode::PerPod => {
            for p in selected {
                status.stats.pods_selected += 1;
                let result = settings
                    .agent_id(p.node_uid)
                    .map_err(|e| format!("agent ID of node {}: {e}", p.node_name))
                    .and_then(|parent| {
                        let sel = selector("k8s", &format!("pod-uid:{}", p.uid))?;
                        render_entry(settings, &compiled, p, parent, Selectors::from_iter([sel]))
                    });
                match result {
                    Ok(entry) => {
                        keep(&mut status, out, entry);
                    }
                    Err(e) => {
                        status.stats.render_failures += 1;
                        push_error(&mut status.errors, format!("{}: {e}", p.display()));
                    }
                }
            }
        }
        Mode::PerServiceAccount => {
            let mut groups: BTreeMap<GroupKey<'_>, &PodFacts<'_>> = BTreeMap::new();
            for p in selected {
                status.stats.pods_selected += 1;
                let location = |key: &Option<String>| -> Result<Option<&str>, String> {
                    let Some(k) = key else { return Ok(None) };
                    match labels(p.node).get(k).filter(|v| !v.is_empty()) {
                        Some(v) => Ok(Some(v.as_str())),
                        None => Err(format!(
                            "{}: node {} has no label {k:?}",
                            p.display(),
                            p.node_name
                        )),
                    }
                };
                match (location(&compiled.region_key), location(&compiled.zone_key)) {
                    (Ok(region), Ok(zone)) => {
                        groups
                            .entry((p.namespace, p.service_account, region, zone))
                            .or_insert(p);
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        status.stats.render_failures += 1;
                        push_error(&mut status.errors, e);
                    }
                }
            }
            for ((ns, sa, region, zone), p) in groups {
                let result = node_alias(settings, region, zone).and_then(|alias| {
                    let parent = alias.spiffe_id.clone();
                    let sels = Selectors::from_iter([
                        selector("k8s", &format!("ns:{ns}"))?,
                        selector("k8s", &format!("sa:{sa}"))?,
                    ]);
                    let entry = render_entry(settings, &compiled, p, parent, sels)?;
                    Ok((alias, entry))
                });
                match result {
                    Ok((alias, entry)) => {
                        if keep(&mut status, out, entry) {
                            // Aliases are identical whoever renders them, so never masked.
                            add(out, alias, Owner::NodeAlias);
                        }
                    }
                    Err(e) => {
                        status.stats.render_failures += 1;
                        push_error(
                            &mut status.errors,
                            format!("service account {ns}/{sa}: {e}"),
                        );
                    }
                }
            }
        }
    }
    status.stats.entries_rendered = count(rendered.len());
    status
}

/// The node alias that `PerServiceAccount` entries are parented to: every
/// agent of the cluster (`k8s_psat:cluster:<cluster>`), narrowed to a region
/// and zone when given (the server's trusted `k8s_psat:region:` and
/// `k8s_psat:zone:` selectors).
fn node_alias(
    settings: &Settings,
    region: Option<&str>,
    zone: Option<&str>,
) -> Result<Entry, String> {
    let mut path = format!("/sigil/k8s/{}/nodes", settings.cluster_name);
    let mut selectors = Selectors::from_iter([selector(
        "k8s_psat",
        &format!("cluster:{}", settings.cluster_name),
    )?]);
    if let Some(r) = region {
        path.push_str(&format!("/region/{r}"));
        selectors.insert(selector("k8s_psat", &format!("region:{r}"))?);
    }
    if let Some(z) = zone {
        path.push_str(&format!("/zone/{z}"));
        selectors.insert(selector("k8s_psat", &format!("zone:{z}"))?);
    }
    let td = &settings.trust_domain;
    let spiffe_id = td
        .id_with_path(&path)
        .map_err(|e| format!("node alias ID {path:?}: {e}"))?;
    let server = td
        .id_with_path(sigil_types::SERVER_PATH)
        .map_err(|e| e.to_string())?;
    let id = settings
        .key_id(&spiffe_id, &server, &selectors)
        .map_err(|e| e.to_string())?;
    let entry = Entry::new(id, spiffe_id, server, selectors);
    entry.validate(td).map_err(|e| e.to_string())?;
    Ok(entry)
}

// ------------------------------------------------------------------- planning --

/// Whether two entries agree on everything the controller sets.
fn same_content(a: &Entry, b: &Entry) -> bool {
    let fed = |e: &Entry| {
        let mut v = e.federates_with.clone();
        v.sort();
        v.dedup();
        v
    };
    a.spiffe_id == b.spiffe_id
        && a.parent_id == b.parent_id
        && a.selectors == b.selectors
        && a.x509_svid_ttl == b.x509_svid_ttl
        && a.jwt_svid_ttl == b.jwt_svid_ttl
        && a.dns_names == b.dns_names
        && fed(a) == fed(b)
        && a.attributes == b.attributes
        && a.admin == b.admin
        && a.downstream == b.downstream
        && a.hint == b.hint
        && a.expires_at == b.expires_at
}

/// What to change so that the server's owned entries are exactly the
/// desired ones. `existing` may hold every entry of the server; only owned
/// ones are considered.
pub fn plan(settings: &Settings, desired: &Desired, existing: &[Entry]) -> Plan {
    let owned: BTreeMap<&EntryId, &Entry> = existing
        .iter()
        .filter(|e| settings.is_owned(&e.id))
        .map(|e| (&e.id, e))
        .collect();
    let mut p = Plan::default();
    for (id, d) in &desired.entries {
        match owned.get(id) {
            None => p.create.push(d.entry.clone()),
            Some(have) if !same_content(have, &d.entry) => p.update.push(d.entry.clone()),
            Some(_) => {}
        }
    }
    // Node aliases first, so that a workload entry is never visible before its parent alias.
    p.create.sort_by_key(|e| !e.is_node_alias());
    p.delete = owned
        .keys()
        .filter(|id| !desired.entries.contains_key(**id))
        .map(|id| (*id).clone())
        .collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_list_is_bounded() {
        let mut errors = Vec::new();
        for i in 0..25 {
            push_error(&mut errors, format!("e{i}"));
        }
        assert_eq!(errors.len(), MAX_STATUS_ERRORS + 1);
        assert_eq!(errors[MAX_STATUS_ERRORS], "… and 15 more");
    }

    #[test]
    fn cluster_names() {
        let td = TrustDomain::new("example.org").unwrap();
        for ok in ["eks-dev", "a", "prod_1.eu"] {
            Settings::new(td.clone(), ok).unwrap();
        }
        for bad in ["", "a/b", "a b", ".", "..", &"x".repeat(64)] {
            assert!(Settings::new(td.clone(), bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ownership_needs_the_exact_shape() {
        let td = TrustDomain::new("example.org").unwrap();
        let a = Settings::new(td.clone(), "a").unwrap();
        let ab = Settings::new(td, "a-b").unwrap();
        let spiffe_id: SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let parent: SpiffeId = "spiffe://example.org/sigil/server".parse().unwrap();
        let selectors = Selectors::parse_all(["k8s:ns:x"]).unwrap();
        let id_ab = ab.key_id(&spiffe_id, &parent, &selectors).unwrap();
        assert!(ab.is_owned(&id_ab));
        assert!(
            !a.is_owned(&id_ab),
            "cluster a must not own cluster a-b's entries"
        );
        let id_a = a.key_id(&spiffe_id, &parent, &selectors).unwrap();
        assert_ne!(id_a, id_ab);
        assert!(a.is_owned(&id_a));
        assert_eq!(id_a.as_str().len(), "k8s-a-".len() + 32);
        for other in [
            "k8s-a-x",
            "k8s-a-0123456789abcdef0123456789ABCDEF",
            "k8s-a-0123",
            "web",
        ] {
            assert!(!a.is_owned(&other.parse().unwrap()), "{other}");
        }
    }

    #[test]
    fn label_selectors() {
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let sel =
            |json: serde_json::Value| -> LabelSelector { serde_json::from_value(json).unwrap() };
        assert!(selector_matches(None, &labels));
        assert!(selector_matches(Some(&sel(serde_json::json!({}))), &labels));
        assert!(selector_matches(
            Some(&sel(serde_json::json!({"matchLabels": {"app": "web"}}))),
            &labels
        ));
        assert!(!selector_matches(
            Some(&sel(serde_json::json!({"matchLabels": {"app": "db"}}))),
            &labels
        ));
        for (op, values, want) in [
            ("In", vec!["web", "db"], true),
            ("In", vec!["db"], false),
            ("NotIn", vec!["db"], true),
            ("NotIn", vec!["web"], false),
            ("Exists", vec![], true),
            ("DoesNotExist", vec![], false),
        ] {
            let s = sel(
                serde_json::json!({"matchExpressions": [{"key": "app", "operator": op, "values": values}]}),
            );
            check_selector(&s).unwrap();
            assert_eq!(selector_matches(Some(&s), &labels), want, "{op} {values:?}");
        }
        let missing = sel(
            serde_json::json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]}),
        );
        assert!(selector_matches(Some(&missing), &labels));
        for bad in [
            serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In"}]}),
            serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}),
            serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}),
        ] {
            assert!(check_selector(&sel(bad)).is_err());
        }
    }
}
