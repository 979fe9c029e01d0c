//! `sigil csi`: the CSI node plugin that mounts the agent's Workload API
//! socket directory into pods (crates/sigil-csi, docs/kubernetes.md).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

/// Flags of `sigil csi`.
#[derive(Args, Debug)]
#[command(
    long_about = "Serve the CSI node plugin: pods mount the agent's Workload API socket \
directory as an ephemeral inline CSI volume (read-only) instead of a hostPath volume, \
so that they pass Pod Security \"restricted\". Runs beside the agent in its DaemonSet, \
privileged, with the kubelet's pods directory mounted with Bidirectional propagation \
and a node-driver-registrar sidecar (deploy/kubernetes/22-csi-driver.yaml, docs/kubernetes.md)."
)]
pub(crate) struct CsiArgs {
    /// The Unix socket to serve CSI on (where the node-driver-registrar looks).
    #[arg(long, env = "SIGIL_CSI_SOCKET", default_value = sigil_csi::DEFAULT_CSI_SOCKET)]
    csi_socket: PathBuf,
    /// This node's ID for NodeGetInfo: the Kubernetes node name.
    #[arg(long, env = "SIGIL_CSI_NODE_ID")]
    node_id: String,
    /// The driver name, as in the CSIDriver object (csi.spiffe.io serves
    /// manifests written for SPIRE's driver).
    #[arg(long, env = "SIGIL_CSI_DRIVER_NAME", default_value = sigil_csi::DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// The directory that holds the agent's Workload API socket, mounted read-only into pods.
    #[arg(long, env = "SIGIL_CSI_SOCKET_DIR", default_value = sigil_csi::DEFAULT_SOCKET_DIR)]
    workload_api_socket_dir: PathBuf,
    /// The kubelet's pods directory: the only place volumes are mounted.
    #[arg(long, env = "SIGIL_CSI_KUBELET_PODS_DIR", default_value = sigil_csi::DEFAULT_KUBELET_PODS_DIR)]
    kubelet_pods_dir: PathBuf,
}

/// Runs the driver until Ctrl-C or SIGTERM.
pub(crate) async fn run(args: CsiArgs) -> anyhow::Result<()> {
    let config = sigil_csi::CsiConfig {
        csi_socket: args.csi_socket,
        driver_name: args.driver_name,
        node_id: args.node_id,
        workload_api_socket_dir: args.workload_api_socket_dir,
        kubelet_pods_dir: args.kubelet_pods_dir,
    };
    let handle = sigil_csi::start(config).context("starting the CSI driver")?;
    crate::shutdown_signal().await;
    tracing::info!("CSI driver stopping");
    handle.shutdown().await;
    Ok(())
}
