//! `sigil k8s selectors`: what a process would be attested as in a pod, with
//! the agent's own code, from a cgroup file and a kubelet pod list.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub(crate) enum K8sCommand {
    /// Print the k8s selectors a process with this cgroup file gets from this pod list, or why none.
    Selectors(SelectorsArgs),
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
    /// The process's mountinfo, consulted only when the cgroup file names no container.
    #[arg(long)]
    mountinfo: Option<PathBuf>,
}

pub(crate) fn run(cmd: K8sCommand) -> anyhow::Result<()> {
    let K8sCommand::Selectors(a) = cmd;
    let cgroup = std::fs::read_to_string(&a.cgroup)
        .with_context(|| format!("reading {}", a.cgroup.display()))?;
    let pods = std::fs::read(&a.pods).with_context(|| format!("reading {}", a.pods.display()))?;
    let mountinfo = a
        .mountinfo
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    match sigil_k8s::kubelet::explain(&cgroup, mountinfo.as_deref(), &pods, a.node_name.as_deref())
    {
        Ok(selectors) => {
            for s in selectors.iter() {
                println!("{s}");
            }
            Ok(())
        }
        Err(reason) => anyhow::bail!("no k8s selectors: {reason}"),
    }
}
