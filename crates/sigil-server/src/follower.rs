//! The change-feed follower: the one task that applies the store's change
//! feed, in revision order, to the agents in memory, the federation state
//! and the entry index.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_store::ChangeKind;
use tokio_util::sync::CancellationToken;

use crate::state::ServerState;

/// How often the change follower reads the feed without being woken.
const FOLLOWER_POLL: Duration = Duration::from_secs(1);

/// Applies the store's change feed to the index, in revision order. Woken by
/// local writes and, on a shared database, by other servers' commits
/// (PostgreSQL `LISTEN`); a slow tick reads the feed anyway, in case a
/// notification was lost. The feed, read in revision order, is the truth;
/// the wake-ups only say when to read it.
pub(crate) async fn follow_changes(state: Arc<ServerState>, cancel: CancellationToken) {
    let mut remote = state.store.subscribe_changes();
    loop {
        catch_up(&state).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = state.follower_wake.notified() => {}
            changed = remote_change(&mut remote) => if !changed {
                remote = None;
            },
            _ = tokio::time::sleep(FOLLOWER_POLL) => {}
        }
    }
}

/// Applies every change after the index's revision, in order; stops (to be
/// called again at the next wake-up) when the feed or an agent cannot be read.
async fn catch_up(state: &ServerState) {
    loop {
        let changes = match state
            .store
            .changes_since(state.index.revision(), 1000)
            .await
        {
            Ok(changes) if changes.is_empty() => {
                state.readiness.follower_caught_up();
                return;
            }
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!(error = %e, "reading the change feed failed; retrying");
                return;
            }
        };
        for c in changes {
            if let Err(e) = apply_agent_change(state, &c.kind).await {
                // Not applied: read again from this change on.
                tracing::warn!(error = %e, "re-reading an agent failed; retrying");
                return;
            }
            // Federation next, so that once the index shows a revision,
            // what it changed is visible everywhere.
            match &c.kind {
                ChangeKind::BundleChanged(td) if *td == state.config.trust_domain => {
                    // The own bundle: a peer server's authorities may have changed.
                    if let Err(e) = state.ca.refresh_peers(SystemTime::now()).await {
                        tracing::warn!(error = %e, "re-reading the peers' authorities failed");
                    }
                }
                ChangeKind::BundleChanged(td) | ChangeKind::BundleDeleted(td) => {
                    state.federation.reload_bundle(td).await;
                }
                ChangeKind::FederationChanged(td) | ChangeKind::FederationDeleted(td) => {
                    state.federation.reconcile(td).await;
                }
                _ => {}
            }
            state.index.apply(c);
        }
    }
}

/// Brings the agents in memory up to a change, before the index publishes
/// it, so that a sync stream told of the change finds the new record. A
/// corrupt record is logged and skipped (retrying cannot help, and it must
/// not stall every later change); other errors are returned.
async fn apply_agent_change(
    state: &ServerState,
    kind: &ChangeKind,
) -> Result<(), sigil_store::StoreError> {
    let result = match kind {
        ChangeKind::AgentChanged(id) => state.agents.reload(state.store.as_ref(), id).await,
        ChangeKind::AgentDeleted(id) => {
            state.agents.remove(id);
            Ok(())
        }
        _ => Ok(()),
    };
    match result {
        Err(sigil_store::StoreError::Corrupt(e)) => {
            tracing::error!(error = %e, "an agent record is corrupt");
            Ok(())
        }
        other => other,
    }
}

/// Waits for the store's wake-up; `false` if it ended (never, if there is none).
async fn remote_change(remote: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match remote {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}
