//! `sigil proxy run` and `sigil policy check|graph`: the mutual-TLS proxy
//! and its authorization policy (docs/proxy.md, docs/policy.md).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use sigil_proxy::policy::{Policy, Request, parse_attribute};
use sigil_types::SpiffeId;

#[derive(Subcommand, Debug)]
pub(crate) enum ProxyCommand {
    /// Run the proxy with a TOML config file (see docs/proxy.md). It waits
    /// for its X509-SVID from the Workload API, then listens.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Graph output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum GraphFormat {
    /// Graphviz DOT (`dot -Tsvg`).
    Dot,
    /// A Mermaid flowchart (renders in Markdown on most forges).
    Mermaid,
}

#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Decide one call and explain which rule decides. Exit status: 0
    /// allowed, 1 denied, 2 bad input (unreadable policy, malformed ID).
    Check {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The caller's SPIFFE ID.
        #[arg(long)]
        from: String,
        /// The callee's SPIFFE ID.
        #[arg(long)]
        to: String,
        /// An identity attribute of the caller, name=value (repeatable), e.g. region=us-east-1.
        #[arg(long = "attr")]
        attrs: Vec<String>,
    },
    /// Render the allowed communication graph (deny rules as dashed red edges).
    Graph {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
}

pub(crate) async fn proxy(cmd: ProxyCommand) -> anyhow::Result<()> {
    let ProxyCommand::Run { config } = cmd;
    let cfg = sigil_proxy::ProxyConfig::load(&config)?;
    tracing::info!(
        config = %config.display(),
        socket = %cfg.workload_api_socket,
        "waiting for an X509-SVID from the Workload API"
    );
    let handle = tokio::select! {
        r = sigil_proxy::start(cfg) => r.context("starting the proxy")?,
        _ = crate::shutdown_signal() => return Ok(()),
    };
    for a in &handle.inbound {
        eprintln!("inbound listening on {a}");
    }
    for a in &handle.outbound {
        eprintln!("outbound listening on {a}");
    }
    if let Some(a) = handle.metrics_address {
        eprintln!("metrics on http://{a}/metrics");
    }
    handle.run_until(crate::shutdown_signal()).await;
    Ok(())
}

/// Runs a policy command; `check` exits the process with its status.
pub(crate) fn policy(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check {
            policy,
            from,
            to,
            attrs,
        } => {
            let code = match check(&policy, &from, &to, &attrs) {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    2
                }
            };
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
        PolicyCommand::Graph { policy, format } => {
            // A bad file exits 2, as `policy check` does for the same file.
            let p = match Policy::load(&policy) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {:#}", anyhow::Error::from(e));
                    std::process::exit(2);
                }
            };
            print!(
                "{}",
                match format {
                    GraphFormat::Dot => p.to_dot(),
                    GraphFormat::Mermaid => p.to_mermaid(),
                }
            );
            Ok(())
        }
    }
}

/// Prints the decision and its reasons; `Ok(allowed)`.
fn check(policy: &std::path::Path, from: &str, to: &str, attrs: &[String]) -> anyhow::Result<bool> {
    let p = Policy::load(policy)?;
    let caller: SpiffeId = from
        .parse()
        .map_err(|e| anyhow::anyhow!("--from {from:?}: {e}"))?;
    let callee: SpiffeId = to
        .parse()
        .map_err(|e| anyhow::anyhow!("--to {to:?}: {e}"))?;
    let attributes = attrs
        .iter()
        .map(|a| parse_attribute(a).map_err(|e| anyhow::anyhow!("--attr: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut names = std::collections::HashSet::new();
    if let Some((dup, _)) = attributes.iter().find(|(k, _)| !names.insert(k)) {
        anyhow::bail!("--attr {dup} is given twice; a caller has one value per attribute");
    }
    let e = p.explain(&Request {
        caller: &caller,
        callee: &callee,
        attributes: &attributes,
    });
    println!("{}", e.decision);
    println!("  caller : {caller}");
    println!("  callee : {callee}");
    if !attributes.is_empty() {
        let list: Vec<String> = attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  attributes : {}", list.join(", "));
    }
    if let Some(rule) = e.decision.rule {
        println!("  from   : {}", rule.from.describe());
        println!("  to     : {}", rule.to.describe());
        if !rule.when.is_empty() {
            println!("  when   : {}", rule.describe_when());
        }
    }
    for r in &e.overruled {
        println!(
            "  note: {} would allow it, but deny rules win",
            r.location()
        );
    }
    for (r, why) in &e.unmet_conditions {
        println!("  note: {} matches the IDs, but {why}", r.location());
    }
    Ok(e.decision.allowed)
}
