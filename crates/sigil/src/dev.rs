//! `sigil dev`: a server and an agent in one process, no config file, the
//! invoking user registered, and the `export` lines for a second shell.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use sigil_types::{Entry, Selectors, TrustDomain};

use crate::health;

#[derive(Args, Debug)]
pub(crate) struct DevArgs {
    /// Where the database, keys and sockets live (default: /tmp/sigil-dev-<uid>). It is made
    /// mode 0711; the keys, database and admin socket sit in 0700 subdirectories, the
    /// Workload API socket in `public/` (0755) so that every local user can reach it.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The trust domain.
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// Lifetime of X509-SVIDs (short values show rotation; they renew at half-life).
    #[arg(long, default_value = "1h")]
    x509_svid_ttl: String,
    /// Lifetime of the CA (rotation prepares at 1/2, activates at 5/6).
    #[arg(long, default_value = "24h")]
    ca_ttl: String,
    /// Serve /healthz, /readyz and /metrics on this address.
    #[arg(long)]
    health_address: Option<SocketAddr>,
}

/// Not under `$XDG_RUNTIME_DIR`: that directory is 0700 by its
/// specification, and other users must reach the Workload API socket.
fn default_data_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/sigil-dev-{}", nix::unistd::getuid()))
}

/// Where `sigil dev` keeps what, under the data directory.
struct Layout {
    /// Server database and keys (0700).
    server: PathBuf,
    /// Agent SVID, keys and cache (0700).
    agent: PathBuf,
    /// The admin socket, in a 0700 directory of its own.
    admin_socket: PathBuf,
    /// The Workload API socket, in a 0755 directory.
    agent_socket: PathBuf,
}

/// Prepares the data directory: the root 0711 (others may pass through to
/// `public/`, not list), the private directories 0700 and `public/` 0755.
/// Refuses a root that is not a real directory of this user, since under
/// /tmp another user could have created it first.
fn prepare_layout(dir: &Path) -> anyhow::Result<Layout> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir)?;
    let me = nix::unistd::getuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        anyhow::bail!(
            "{} is not a directory owned by uid {me}; choose another --data-dir",
            dir.display()
        );
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    let admin_dir = dir.join("admin");
    for private in [dir.join("server"), dir.join("agent"), admin_dir.clone()] {
        sigil_svid::keys::ensure_private_dir(&private)
            .with_context(|| format!("creating {}", private.display()))?;
    }
    let public = dir.join("public");
    std::fs::create_dir_all(&public)?;
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o755))?;
    // A directory others cannot search on the way keeps them from the socket.
    if let Some(closed) = dir
        .ancestors()
        .skip(1)
        .find(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 == 0))
    {
        tracing::warn!(
            directory = %closed.display(),
            "other users cannot search this directory, so they cannot reach the Workload API socket; choose a --data-dir outside it"
        );
    }
    Ok(Layout {
        server: dir.join("server"),
        agent: dir.join("agent"),
        admin_socket: admin_dir.join("admin.sock"),
        agent_socket: public.join("agent.sock"),
    })
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<()> {
    let td =
        TrustDomain::new(&args.trust_domain).map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
    let x509_ttl = sigil_types::duration::parse(&args.x509_svid_ttl)
        .map_err(|e| anyhow::anyhow!("--x509-svid-ttl: {e}"))?;
    let ca_ttl =
        sigil_types::duration::parse(&args.ca_ttl).map_err(|e| anyhow::anyhow!("--ca-ttl: {e}"))?;
    if x509_ttl > ca_ttl / 2 {
        anyhow::bail!("--x509-svid-ttl must not exceed half of --ca-ttl");
    }
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    let layout = prepare_layout(&dir)?;

    let mut scfg = sigil_server::ServerConfig::with_defaults(td.clone(), layout.server);
    scfg.bind_address = SocketAddr::from(([127, 0, 0, 1], 0));
    scfg.admin_socket = layout.admin_socket;
    scfg.default_x509_svid_ttl = x509_ttl;
    scfg.agent_svid_ttl = x509_ttl;
    scfg.ca_ttl = ca_ttl;
    scfg.rotation_tick = Duration::from_secs(1)
        .max(ca_ttl / 600)
        .min(Duration::from_secs(10));
    let server = sigil_server::start(scfg)
        .await
        .context("starting the server")?;

    let token = server.generate_join_token(None).await?;
    let mut acfg = sigil_agent::AgentConfig::with_defaults(
        td.clone(),
        server.agent_api_addr().to_string(),
        layout.agent,
    );
    acfg.socket_path = layout.agent_socket;
    acfg.join_token = Some(token.token);
    let agent = sigil_agent::start(acfg)
        .await
        .context("starting the agent")?;

    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .filter(|n| sigil_types::spiffe_id::validate_path(&format!("/{n}")).is_ok())
        .unwrap_or_else(|| format!("uid-{uid}"));
    let spiffe_id = td.id_with_path(&format!("/user/{name}"))?;
    let entry = Entry::new(
        sigil_server::registry::new_entry_id()?,
        spiffe_id.clone(),
        agent.agent_id.clone(),
        Selectors::parse_all([format!("unix:uid:{uid}")])?,
    );
    if let Err(e) = server.create_entry(entry).await {
        // On a restart the same registration is already there.
        let status = tonic::Status::from(e);
        if status.code() != tonic::Code::AlreadyExists {
            anyhow::bail!("registering the current user: {}", status.message());
        }
    }

    // Print the instructions only once the identity can be fetched.
    let mut snaps = agent.snapshots.clone();
    let ready = snaps.wait_for(|s| s.svids.values().any(|v| v.spiffe_id == spiffe_id));
    if tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .is_err()
    {
        tracing::warn!("the agent does not hold the SVID yet; `sigil svid fetch` may need a retry");
    }

    let cancel = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.health_address {
        let bound = health::serve(
            addr,
            crate::run::server_health(server.health()),
            cancel.clone(),
        )
        .await?;
        tracing::info!(%bound, "health and metrics listening");
    }

    println!(
        "sigil dev is running: trust domain {td}, data in {}",
        dir.display()
    );
    println!("  server (agent API) : {}", server.agent_api_addr());
    println!("  agent              : {}", agent.agent_id);
    println!("  your identity      : {spiffe_id} (for processes with selector unix:uid:{uid})");
    println!();
    println!("In another shell:");
    println!(
        "  export SPIFFE_ENDPOINT_SOCKET=unix://{}",
        agent.socket_path.display()
    );
    println!(
        "  export SIGIL_ADMIN_SOCKET={}",
        server.admin_socket().display()
    );
    println!("  sigil svid fetch");
    println!();
    println!("Press Ctrl-C to stop.");

    crate::shutdown_signal().await;
    cancel.cancel();
    agent.shutdown().await;
    server.shutdown().await;
    Ok(())
}
