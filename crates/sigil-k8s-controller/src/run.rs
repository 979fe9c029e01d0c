//! The running controller: one reflector (watch plus cache) per kind, and a
//! loop that, after a change has settled for [`ControllerConfig::debounce`]
//! (or every [`ControllerConfig::resync`] regardless), renders the whole
//! cluster, compares it with the server's owned entries, applies the
//! difference through the admin API and writes each resource's status.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::PathBuf;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, NodeStatus, Pod, PodSpec, PodStatus};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sigil_types::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ControllerError;
use super::admin::{AdminClient, ApplyReport};
use super::crd::{ClusterFederatedTrustDomain, ClusterSPIFFEID, ClusterStaticEntry};
use super::federation;
use super::leader::{self, LeaderConfig};
use super::publish::{self, PublishConfig};
use super::reconcile::{self, DEFAULT_IGNORED_NAMESPACES, Settings, Snapshot};

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The server's admin socket.
    pub admin_socket: PathBuf,
    /// The cluster's name: the server's PSAT cluster profile for this cluster.
    pub cluster_name: String,
    /// The cluster's DNS domain, for `{{ .ClusterDomain }}`.
    pub cluster_domain: String,
    /// Namespaces whose pods never get entries.
    pub ignore_namespaces: BTreeSet<String>,
    /// How long changes must settle before a reconcile.
    pub debounce: Duration,
    /// The longest time between two reconciles (repairs entries changed on
    /// the server behind the controller's back).
    pub resync: Duration,
    /// How soon a failed reconcile is retried.
    pub retry: Duration,
    /// Whether the controller manages federation relationships from
    /// `ClusterFederatedTrustDomain` resources (and deletes relationships no
    /// resource declares, except those from the server's config file).
    pub manage_federation: bool,
    /// Whether and how the trust bundle is published to Kubernetes
    /// (`ClusterTrustBundle`s and ConfigMaps, see [`crate::publish`]).
    pub publish: Option<PublishConfig>,
    /// Leader election, when several controllers run (one per server
    /// replica): only the leader reconciles and publishes.
    pub leader: Option<LeaderConfig>,
}

impl ControllerConfig {
    /// The defaults: `cluster.local`, [`DEFAULT_IGNORED_NAMESPACES`], 500 ms
    /// debounce, 30 s resync, 5 s retry, federation managed, the bundle
    /// published with [`PublishConfig::default`].
    pub fn new(admin_socket: PathBuf, cluster_name: &str) -> Self {
        Self {
            admin_socket,
            cluster_name: cluster_name.to_owned(),
            cluster_domain: "cluster.local".to_owned(),
            ignore_namespaces: DEFAULT_IGNORED_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            debounce: Duration::from_millis(500),
            resync: Duration::from_secs(30),
            retry: Duration::from_secs(5),
            manage_federation: true,
            publish: Some(PublishConfig::default()),
            leader: None,
        }
    }
}

/// The caches of every watched kind.
struct Stores {
    spiffe_ids: Store<ClusterSPIFFEID>,
    static_entries: Store<ClusterStaticEntry>,
    federated: Option<Store<ClusterFederatedTrustDomain>>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            cluster_spiffe_ids: self.spiffe_ids.state(),
            static_entries: self.static_entries.state(),
            pods: self.pods.state(),
            namespaces: self.namespaces.state(),
            nodes: self.nodes.state(),
        }
    }

    async fn wait_until_ready(&self) -> Result<(), ControllerError> {
        let gone = |kind| move |_| ControllerError::WatcherStopped(kind);
        self.spiffe_ids
            .wait_until_ready()
            .await
            .map_err(gone("ClusterSPIFFEID"))?;
        self.static_entries
            .wait_until_ready()
            .await
            .map_err(gone("ClusterStaticEntry"))?;
        if let Some(f) = &self.federated {
            f.wait_until_ready()
                .await
                .map_err(gone("ClusterFederatedTrustDomain"))?;
        }
        self.pods.wait_until_ready().await.map_err(gone("Pod"))?;
        self.namespaces
            .wait_until_ready()
            .await
            .map_err(gone("Namespace"))?;
        self.nodes.wait_until_ready().await.map_err(gone("Node"))?;
        Ok(())
    }
}

/// A reflector for `K` whose events are reduced to "something changed".
fn reflect<K>(
    api: Api<K>,
    kind: &'static str,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, BoxStream<'static, ()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default())
            .modify(trim)
            .default_backoff(),
    )
    .map(move |event| {
        if let Err(e) = event {
            tracing::warn!(kind, error = %e, "watch failed; retrying");
        }
    })
    .boxed();
    (reader, stream)
}

/// Keeps of a pod only what the rendering reads.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        *spec = PodSpec {
            service_account_name: spec.service_account_name.take(),
            node_name: spec.node_name.take(),
            ..PodSpec::default()
        };
    }
    if let Some(status) = pod.status.as_mut() {
        *status = PodStatus {
            phase: status.phase.take(),
            ..PodStatus::default()
        };
    }
}

/// Keeps of a node only its metadata (name, UID, labels).
fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.spec = None;
    node.status = node.status.as_ref().map(|_| NodeStatus::default());
}

fn trim_meta<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// Runs the controller until `shutdown` is cancelled. It connects to the
/// admin socket first (and learns the trust domain from it), then waits for
/// every watcher's first list before the first reconcile, so that a cache
/// that has not filled yet never deletes entries.
#[inline(never)]
pub fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: CancellationToken,
) -> BoxFuture<'static, Result<(), ControllerError>> {
    Box::pin(async move {
        match config.leader.clone() {
            None => run_until_cancelled(client, config, shutdown).await,
            Some(election) => {
                let worker = client.clone();
                leader::while_leading(client, election, shutdown, move |term| {
                    run_until_cancelled(worker.clone(), config.clone(), term)
                })
                .await
            }
        }
    })
}

async fn run_until_cancelled(
    client: Client,
    config: ControllerConfig,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    reconcile::check_cluster_name(&config.cluster_name)?;
    if let Some(p) = &config.publish {
        p.validate()?;
    }
    let mut admin = AdminClient::connect(&config.admin_socket).await?;
    let trust_domain = admin.trust_domain().await?;
    let mut settings = Settings::new(trust_domain, &config.cluster_name)?;
    settings.cluster_domain = config.cluster_domain.clone();
    settings.ignore_namespaces = config.ignore_namespaces.clone();

    let (spiffe_ids, s1) = reflect(
        Api::<ClusterSPIFFEID>::all(client.clone()),
        "ClusterSPIFFEID",
        trim_meta,
    );
    let (static_entries, s2) = reflect(
        Api::<ClusterStaticEntry>::all(client.clone()),
        "ClusterStaticEntry",
        trim_meta,
    );
    let (pods, s3) = reflect(Api::<Pod>::all(client.clone()), "Pod", trim_pod);
    let (namespaces, s4) = reflect(
        Api::<Namespace>::all(client.clone()),
        "Namespace",
        trim_meta,
    );
    let (nodes, s5) = reflect(Api::<Node>::all(client.clone()), "Node", trim_node);
    let _publisher = config.publish.clone().map(|p| {
        AbortOnDrop(tokio::spawn(publish::run_publisher(
            client.clone(),
            config.admin_socket.clone(),
            p,
            shutdown.child_token(),
        )))
    });
    let mut streams = vec![s1, s2, s3, s4, s5];
    let federated = if config.manage_federation {
        let (store, s6) = reflect(
            Api::<ClusterFederatedTrustDomain>::all(client.clone()),
            "ClusterFederatedTrustDomain",
            trim_meta,
        );
        streams.push(s6);
        Some(store)
    } else {
        None
    };
    let stores = Stores {
        spiffe_ids,
        static_entries,
        federated,
        pods,
        namespaces,
        nodes,
    };

    let (changed_tx, mut changed) = watch::channel(0u64);
    let driver = tokio::spawn(async move {
        let mut events = futures::stream::select_all(streams);
        while events.next().await.is_some() {
            changed_tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    });
    let _abort = AbortOnDrop(driver);

    tracing::info!(
        cluster = %settings.cluster_name,
        trust_domain = %settings.trust_domain,
        "entry controller waiting for the Kubernetes caches"
    );
    tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        r = stores.wait_until_ready() => r?,
    }

    let status_api = StatusApi {
        spiffe_ids: Api::all(client.clone()),
        static_entries: Api::all(client.clone()),
        federated: Api::all(client),
    };
    let mut admin = Some(admin);
    loop {
        changed.borrow_and_update();
        let wait = match reconcile_once(&settings, &stores, &mut admin, &config, &status_api).await
        {
            Ok(()) => config.resync,
            Err(e) => {
                tracing::warn!(error = %e, "reconcile failed; retrying");
                config.retry
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = changed.changed() => {
                if r.is_err() {
                    return Err(ControllerError::WatcherStopped("all"));
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(config.debounce) => {}
                }
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct StatusApi {
    spiffe_ids: Api<ClusterSPIFFEID>,
    static_entries: Api<ClusterStaticEntry>,
    federated: Api<ClusterFederatedTrustDomain>,
}

async fn reconcile_once(
    settings: &Settings,
    stores: &Stores,
    admin: &mut Option<AdminClient>,
    config: &ControllerConfig,
    status_api: &StatusApi,
) -> Result<(), ControllerError> {
    let snap = stores.snapshot();
    let mut desired = reconcile::render(settings, &snap);
    let client = match admin {
        Some(c) => c,
        None => admin.insert(AdminClient::connect(&config.admin_socket).await?),
    };
    let result = apply(settings, &mut desired, client).await;
    let result = match (result, &stores.federated) {
        (Ok(report), Some(federated)) => {
            reconcile_federation(settings, federated, client, status_api)
                .await
                .map(|()| report)
        }
        (other, _) => other,
    };
    if result.is_err() {
        // Connect afresh next time.
        *admin = None;
    }
    let report = result?;
    if report != ApplyReport::default() {
        tracing::info!(
            created = report.created,
            updated = report.updated,
            deleted = report.deleted,
            refused = report.failures.len() + report.delete_failures.len(),
            "entries reconciled"
        );
    }
    for (id, error) in &report.delete_failures {
        tracing::warn!(entry = %id, %error, "the server refused to delete an entry");
    }

    for r in &snap.cluster_spiffe_ids {
        let name = r.name_any();
        if let Some(st) = desired.spiffe_id_status.get(&name)
            && r.status.as_ref() != Some(st)
        {
            patch_status(&status_api.spiffe_ids, &name, st).await;
        }
    }
    for r in &snap.static_entries {
        let name = r.name_any();
        if let Some(st) = desired.static_status.get(&name)
            && r.status.as_ref() != Some(st)
        {
            patch_status(&status_api.static_entries, &name, st).await;
        }
    }
    Ok(())
}

/// Makes the server's federation relationships match the
/// `ClusterFederatedTrustDomain` resources and writes their status.
async fn reconcile_federation(
    settings: &Settings,
    resources: &Store<ClusterFederatedTrustDomain>,
    client: &mut AdminClient,
    status_api: &StatusApi,
) -> Result<(), ControllerError> {
    let resources = resources.state();
    let mut desired = federation::render_federation(&settings.trust_domain, &resources);
    let existing = client.list_federation_relationships().await?;
    let plan = federation::plan_federation(&mut desired, &existing);
    if !plan.is_empty() {
        let results = client.apply_federation(&plan).await;
        let refused = results.iter().filter(|(_, e)| e.is_some()).count();
        tracing::info!(
            created = plan.create.len(),
            updated = plan.update.len(),
            deleted = plan.delete.len(),
            refused,
            "federation relationships reconciled"
        );
        for (td, error) in results {
            if let Some(e) = &error {
                tracing::warn!(trust_domain = %td, error = %e, "the server refused a federation change");
            }
            federation::record_result(&mut desired, &td, error);
        }
    }
    federation::finish_status(&mut desired);
    for r in &resources {
        let name = r.name_any();
        if let Some(st) = desired.status.get(&name)
            && r.status.as_ref() != Some(st)
        {
            patch_status(&status_api.federated, &name, st).await;
        }
    }
    Ok(())
}

async fn apply(
    settings: &Settings,
    desired: &mut reconcile::Desired,
    client: &mut AdminClient,
) -> Result<ApplyReport, ControllerError> {
    // The server filters by the ID prefix: only the controller's own entries travel.
    let existing = client
        .list_entries_with_prefix(&settings.id_prefix(), |id| settings.is_owned(id))
        .await?;
    let plan = reconcile::plan(settings, desired, &existing);
    if plan.is_empty() {
        return Ok(ApplyReport::default());
    }
    let report = client.apply(&plan).await?;
    for (id, error) in &report.failures {
        tracing::warn!(entry = %id, %error, "the server refused an entry");
        desired.record_failure(id, error);
    }
    Ok(report)
}

/// Writes a status with a merge patch; a failure is logged (the next
/// reconcile tries again).
async fn patch_status<K, S>(api: &Api<K>, name: &str, status: &S)
where
    K: Resource + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({ "status": status });
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(resource = name, error = %e, "cannot write the status");
    }
}
