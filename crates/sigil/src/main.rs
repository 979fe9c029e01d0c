//! `sigil`: the one binary for the server, the agent, local development and
//! administration. It parses flags and calls the library crates; the logic
//! lives there.

mod admin;
mod authority;
mod bundle;
mod csi;
mod dev;
mod federation;
mod health;
#[cfg(feature = "k8s")]
mod k8s;
mod output;
mod proxy;
mod run;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Default admin socket, as in the server's config.
const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil/server/admin.sock";
/// Default Workload API socket, as in the agent's config.
const DEFAULT_AGENT_SOCKET: &str = "unix:///run/sigil/agent/api.sock";

#[derive(Parser, Debug)]
#[command(
    name = "sigil",
    version,
    about = "Workload identity for every process: a SPIFFE server, agent and CLI",
    long_about = "sigil gives every workload a short-lived, automatically rotated SPIFFE identity \
(X509-SVIDs and JWT-SVIDs) over the standard SPIFFE Workload API.\n\n\
Start here: `sigil dev` runs a server and an agent in one process and registers you; \
then, in another shell, `sigil svid fetch`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (RUST_LOG syntax), e.g. info or sigil_agent=debug.
    #[arg(long, global = true, env = "SIGIL_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a server and an agent in one process, with no config, and register the current user.
    Dev(dev::DevArgs),
    /// Run the server.
    Server {
        #[command(subcommand)]
        command: ServerCommand,
    },
    /// Run the agent, or manage agents known to the server.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Manage registration entries.
    Entry {
        #[command(subcommand)]
        command: admin::EntryCommand,
    },
    /// Manage join tokens.
    Token {
        #[command(subcommand)]
        command: admin::TokenCommand,
    },
    /// Show the trust bundle; list, set and delete federated bundles.
    Bundle {
        #[command(subcommand)]
        command: bundle::BundleCommand,
    },
    /// Federate with other trust domains: their bundle endpoints, fetched and kept current.
    Federation {
        #[command(subcommand)]
        command: federation::FederationCommand,
    },
    /// List the signing authorities; force a CA or JWT key rotation (prepare,
    /// activate, taint, revoke) after a key compromise.
    Authority {
        #[command(subcommand)]
        command: authority::AuthorityCommand,
    },
    /// Fetch X509-SVIDs from the Workload API.
    Svid {
        #[command(subcommand)]
        command: workload::SvidCommand,
    },
    /// Fetch or validate JWT-SVIDs through the Workload API.
    Jwt {
        #[command(subcommand)]
        command: workload::JwtCommand,
    },
    /// Check that a server (admin socket) or agent (Workload API socket) answers.
    Healthcheck(admin::HealthcheckArgs),
    /// Run the mutual-TLS proxy in front of an application (docs/proxy.md).
    Proxy {
        #[command(subcommand)]
        command: proxy::ProxyCommand,
    },
    /// Check a call against an authorization policy, or draw its graph (docs/policy.md).
    Policy {
        #[command(subcommand)]
        command: proxy::PolicyCommand,
    },
    /// Serve the CSI node plugin that mounts the Workload API socket into pods (Kubernetes).
    Csi(csi::CsiArgs),
    /// Kubernetes tools: explain what a pod's process is attested as, run the entry and federation controller.
    #[cfg(feature = "k8s")]
    K8s {
        #[command(subcommand)]
        command: k8s::K8sCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ServerCommand {
    /// Run the server with a TOML config file (see docs/configuration.md).
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Run the agent with a TOML config file (see docs/configuration.md).
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// A join token for the first attestation (overrides the config's join_token).
        #[arg(long, env = "SIGIL_JOIN_TOKEN")]
        join_token: Option<String>,
    },
    /// List the agents the server knows.
    List(admin::AdminOpts),
    /// Show one agent.
    Show(admin::AgentIdArgs),
    /// Delete an agent's record: its SVID stops working at once.
    Evict(admin::AgentIdArgs),
    /// Ban an agent: it can no longer renew, sync, sign or attest again.
    Ban(admin::AgentIdArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs redirected to a file stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev(args) => dev::run(args).await,
        Command::Server {
            command: ServerCommand::Run { config },
        } => run::server(&config).await,
        Command::Agent { command } => match command {
            AgentCommand::Run { config, join_token } => run::agent(&config, join_token).await,
            AgentCommand::List(o) => admin::agent_list(o).await,
            AgentCommand::Show(a) => admin::agent_show(a).await,
            AgentCommand::Evict(a) => admin::agent_evict(a).await,
            AgentCommand::Ban(a) => admin::agent_ban(a).await,
        },
        Command::Entry { command } => admin::entry(command).await,
        Command::Token { command } => admin::token(command).await,
        Command::Bundle { command } => bundle::run(command).await,
        Command::Federation { command } => federation::run(command).await,
        Command::Authority { command } => authority::run(command).await,
        Command::Svid { command } => workload::svid(command).await,
        Command::Jwt { command } => workload::jwt(command).await,
        Command::Healthcheck(args) => admin::healthcheck(args).await,
        Command::Proxy { command } => proxy::proxy(command).await,
        Command::Policy { command } => proxy::policy(command),
        Command::Csi(args) => csi::run(args).await,
        #[cfg(feature = "k8s")]
        Command::K8s { command } => k8s::run(command).await,
    }
}

/// Waits for Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
