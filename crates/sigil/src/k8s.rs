//! `sigil k8s selectors`: what a process would be attested as in a pod, with
//! the agent's own code, from a cgroup file and a kubelet pod list.
//! `sigil k8s controller`: the entry controller (`ClusterSPIFFEID` and
//! `ClusterStaticEntry` resources to registration entries,
//! `ClusterFederatedTrustDomain` resources to federation relationships).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub(crate) enum K8sCommand {
    /// Print the k8s selectors a process with this cgroup file gets from this pod list, or why none.
    Selectors(SelectorsArgs),
    /// Run the entry controller: registration entries from the ClusterSPIFFEID and ClusterStaticEntry resources of a cluster, kept in sync with its pods, and federation relationships from ClusterFederatedTrustDomain resources.
    Controller(ControllerArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ControllerArgs {
    /// The server's admin socket (the controller runs next to the server).
    #[arg(long, env = "SIGIL_ADMIN_SOCKET", default_value = crate::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
    /// This cluster's name: the server's PSAT cluster profile ([server.k8s_psat.<name>]), used in agent IDs and entry IDs.
    #[arg(long, required_unless_present = "print_crds")]
    cluster_name: Option<String>,
    /// The cluster's kubeconfig (default: KUBECONFIG, ~/.kube/config, then the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The cluster's DNS domain, for {{ .ClusterDomain }} in templates.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// A namespace whose pods get no entries (repeatable; replaces the default).
    #[arg(long = "ignore-namespace", default_values_t = ["kube-system".to_owned(), "kube-public".to_owned()])]
    ignore_namespaces: Vec<String>,
    /// Manage federation relationships from ClusterFederatedTrustDomain resources. The controller then owns every relationship not from the server's config file and deletes those no resource declares; set to false to manage them with `sigil federation` instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    manage_federation: bool,
    /// Publish the server's trust bundle: a ClusterTrustBundle for the own trust domain (linked to --bundle-signer-name), one per federated trust domain, and the ConfigMap --bundle-configmap in every namespace labelled sigil.dev/bundle=true and in each --bundle-namespace. Kept current (the server is asked every 5 s).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    publish_bundle: bool,
    /// The signer name the own trust domain's ClusterTrustBundle is linked to (its name is this with '/' replaced by ':', then ':' and the trust domain).
    #[arg(long, default_value = sigil_k8s_controller::publish::DEFAULT_SIGNER_NAME)]
    bundle_signer_name: String,
    /// The name of the bundle ConfigMap (keys bundle.pem, bundle.spiffe.json, trust-domain).
    #[arg(long, default_value = sigil_k8s_controller::publish::DEFAULT_CONFIGMAP_NAME)]
    bundle_configmap: String,
    /// A namespace that gets the bundle ConfigMap without the label, e.g. the agents' (repeatable).
    #[arg(long = "bundle-namespace")]
    bundle_namespaces: Vec<String>,
    /// Run leader election on a Lease (sigil-controller-<cluster name>), so that of several controllers (one per server replica) only one acts: 15 s lease, renewed every 2 s, given up after 10 s without a renewal.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    leader_elect: bool,
    /// The Lease's namespace (the controller's own).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// This controller's name in the Lease (a random suffix is added), e.g. its pod's name.
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// Print the CustomResourceDefinitions as YAML (for `kubectl apply -f -`) and exit.
    #[arg(long)]
    print_crds: bool,
}

#[derive(Args, Debug)]
pub(crate) struct SelectorsArgs {
    /// The process's cgroup file (a copy of /proc/<pid>/cgroup).
    #[arg(long)]
    cgroup: PathBuf,
    /// The kubelet's pod list (the JSON of `GET /pods` on the kubelet, or `kubectl get pods -o json`).
    #[arg(long)]
    pods: PathBuf,
    /// Only pods on this node count, as on the agent.
    #[arg(long)]
    node_name: Option<String>,
    /// The kubelet's cgroupRoot, as in the agent's [agent.k8s] kubelet_cgroup_root: only cgroups under its kubepods cgroup identify a pod (no mountinfo is read: a process can forge its own).
    #[arg(long, default_value = sigil_k8s::cgroup::DEFAULT_KUBELET_CGROUP_ROOT)]
    kubelet_cgroup_root: String,
}

pub(crate) async fn run(cmd: K8sCommand) -> anyhow::Result<()> {
    match cmd {
        K8sCommand::Selectors(a) => selectors(a),
        K8sCommand::Controller(a) => controller(a).await,
    }
}

async fn controller(a: ControllerArgs) -> anyhow::Result<()> {
    use sigil_k8s_controller::{ControllerConfig, crds_yaml, kube_client};
    if a.print_crds {
        print!("{}", crds_yaml()?);
        return Ok(());
    }
    let Some(cluster_name) = a.cluster_name else {
        anyhow::bail!("--cluster-name is required");
    };
    sigil_k8s_controller::reconcile::check_cluster_name(&cluster_name)?;
    let mut config = ControllerConfig::new(a.admin_socket, &cluster_name);
    config.cluster_domain = a.cluster_domain;
    config.ignore_namespaces = a.ignore_namespaces.into_iter().collect();
    config.manage_federation = a.manage_federation;
    config.publish = if a.publish_bundle {
        let publish = sigil_k8s_controller::publish::PublishConfig {
            signer_name: a.bundle_signer_name,
            configmap_name: a.bundle_configmap,
            namespaces: a.bundle_namespaces.into_iter().collect(),
            ..Default::default()
        };
        publish.validate()?;
        Some(publish)
    } else {
        None
    };
    if a.leader_elect {
        let (Some(namespace), Some(identity)) =
            (a.leader_election_namespace, a.leader_election_identity)
        else {
            anyhow::bail!(
                "--leader-elect needs --leader-election-namespace (or POD_NAMESPACE) and --leader-election-identity (or POD_NAME)"
            );
        };
        let election = sigil_k8s_controller::leader::LeaderConfig::new(
            &namespace,
            &cluster_name,
            &sigil_k8s_controller::leader::identity(&identity),
        );
        election.validate()?;
        config.leader = Some(election);
    }
    let client = kube_client(a.kubeconfig.as_deref()).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        stop.cancel();
    });
    sigil_k8s_controller::run(client, config, shutdown).await?;
    Ok(())
}

fn selectors(a: SelectorsArgs) -> anyhow::Result<()> {
    let cgroup = std::fs::read_to_string(&a.cgroup)
        .with_context(|| format!("reading {}", a.cgroup.display()))?;
    let pods = std::fs::read(&a.pods).with_context(|| format!("reading {}", a.pods.display()))?;
    let cgroups = sigil_k8s::cgroup::KubeletCgroups::new(&a.kubelet_cgroup_root)
        .context("--kubelet-cgroup-root")?;
    // The agent's own locator decides; the pod-list lookup then gets the
    // location it found, in the form the default root reads back.
    let location = cgroups
        .locate(&cgroup)
        .map_err(|e| anyhow::anyhow!("no k8s selectors: {e}"))?;
    if let Some(reason) = location.refusal(&cgroups) {
        anyhow::bail!("no k8s selectors: {reason}");
    }
    let located = location.into_info().to_cgroup_file();
    match sigil_k8s::kubelet::explain(&located, None, &pods, a.node_name.as_deref()) {
        Ok(selectors) => {
            for s in selectors.iter() {
                println!("{s}");
            }
            Ok(())
        }
        Err(reason) => anyhow::bail!("no k8s selectors: {reason}"),
    }
}
