//! `sigil server run` and `sigil agent run`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::health::{self, HealthSource, ReadyFuture};

struct ServerHealth(sigil_server::readiness::ServerHealth);

impl HealthSource for ServerHealth {
    fn ready(&self) -> ReadyFuture<'_> {
        Box::pin(async { self.0.readiness().await.map_err(|e| e.to_string()) })
    }
    fn metrics(&self) -> String {
        self.0.metrics_text()
    }
}

struct AgentHealth(
    tokio::sync::watch::Receiver<Arc<sigil_agent::core::Snapshot>>,
    Arc<sigil_agent::metrics::Metrics>,
);

impl HealthSource for AgentHealth {
    fn ready(&self) -> ReadyFuture<'_> {
        // Ready once it holds a bundle with an X.509 authority: without one
        // it can verify no peer. Whether it reaches a server is left to the
        // `sigil_agent_connected` metric, so a server outage does not take
        // every node's agent out of service.
        let has_bundle = !self.0.borrow().bundle.x509_authorities.is_empty();
        Box::pin(async move {
            if has_bundle {
                Ok(())
            } else {
                Err("no trust bundle yet".to_owned())
            }
        })
    }
    fn metrics(&self) -> String {
        self.1.render()
    }
}

/// Health source of a server, for the health listener.
pub(crate) fn server_health(s: sigil_server::readiness::ServerHealth) -> Arc<dyn HealthSource> {
    Arc::new(ServerHealth(s))
}

/// Health source of an agent, for the health listener.
pub(crate) fn agent_health(a: &sigil_agent::AgentHandle) -> Arc<dyn HealthSource> {
    Arc::new(AgentHealth(a.snapshots.clone(), a.metrics.clone()))
}

pub(crate) async fn server(config: &Path) -> anyhow::Result<()> {
    let cfg = sigil_server::ServerConfig::load(config)?;
    let health_addr = cfg.health_address;
    let handle = sigil_server::start(cfg)
        .await
        .context("starting the server")?;
    if let Some(addr) = health_addr {
        let bound =
            health::serve(addr, server_health(handle.health()), handle.cancel_token()).await?;
        tracing::info!(%bound, "health and metrics listening");
    }
    crate::shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

pub(crate) async fn agent(config: &Path, join_token: Option<String>) -> anyhow::Result<()> {
    let mut cfg = sigil_agent::AgentConfig::load(config)?;
    if join_token.is_some() {
        cfg.join_token = join_token;
    }
    let health_addr = cfg.health_address;
    // Waiting for a server to attest to may last: a stop request meanwhile
    // ends the wait.
    let handle = tokio::select! {
        started = sigil_agent::start_when_attested(cfg) => started.context("starting the agent")?,
        () = crate::shutdown_signal() => return Ok(()),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = health_addr {
        let bound = health::serve(addr, agent_health(&handle), cancel.clone()).await?;
        tracing::info!(%bound, "health and metrics listening");
    }
    crate::shutdown_signal().await;
    cancel.cancel();
    handle.shutdown().await;
    Ok(())
}
