//! The server's background loops: renewing its own SVID and rotating the
//! authorities, and pruning what expired (entries, join tokens, the old
//! change feed).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_svid::keys::PrivateKey;
use sigil_svid::x509::SvidRequest;
use sigil_types::SpiffeId;
use tokio_util::sync::CancellationToken;

use crate::ca::{self, CaManager};
use crate::error::ServerError;
use crate::state::ServerState;

/// Mints a server SVID (`spiffe://<td>/sigil/server`) with the active authority.
pub(crate) fn mint_server_svid(
    ca: &CaManager,
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Result<(Vec<Vec<u8>>, PrivateKey), ServerError> {
    let key = PrivateKey::generate_p256()?;
    let leaf =
        ca.active()
            .x509
            .sign_svid(&SvidRequest::new(id, ttl), &key.public_key_spki_der(), now)?;
    Ok((vec![leaf], key))
}

impl ServerState {
    /// Mints a fresh server SVID with the active authority.
    pub(crate) fn renew_server_cert(&self, now: SystemTime) -> Result<(), ServerError> {
        let (chain, key) = mint_server_svid(
            &self.ca,
            &self.server_id,
            self.config.default_x509_svid_ttl,
            now,
        )?;
        self.server_cert.update(chain, &key)?;
        if let Ok(mut at) = self.server_cert_renew_at.lock() {
            *at = now + self.config.default_x509_svid_ttl / 2;
        }
        Ok(())
    }
}

/// Renews the server's SVID at half-life and rotates the authorities, every
/// `rotation_tick`.
pub(crate) async fn rotate_loop(state: Arc<ServerState>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(state.config.rotation_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = SystemTime::now();
        // The server's own SVID first: renewing it needs no database, so an
        // outage (during which a rotation pass fails, or waits for a
        // connection) never lets it expire and lock agents out.
        let due = state
            .server_cert_renew_at
            .lock()
            .map(|at| now >= *at)
            .unwrap_or(true);
        if due && let Err(e) = state.renew_server_cert(now) {
            tracing::error!(error = %e, "renewing the server SVID failed; will retry");
        }
        match state.ca.rotate(now).await {
            Ok(true) => {
                state.metrics.ca_activations.inc();
                // Signed by the authority that signs from now on.
                if let Err(e) = state.renew_server_cert(SystemTime::now()) {
                    tracing::error!(error = %e, "renewing the server SVID failed; will retry");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "CA rotation failed; will retry"),
        }
    }
}

/// Every 30 s: deletes expired entries and join tokens, and trims the change feed.
pub(crate) async fn prune_loop(state: Arc<ServerState>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = ca::unix(SystemTime::now());
        state.prune_expired_entries(now).await;
        if let Err(e) = state.store.prune_join_tokens(now).await {
            tracing::warn!(error = %e, "pruning join tokens failed");
        }
        // Keep a generous tail of the feed for followers; entries themselves
        // are always in the entries table.
        let keep_from = state.index.revision().saturating_sub(100_000);
        if keep_from > 0
            && let Err(e) = state.store.prune_changes(keep_from).await
        {
            tracing::warn!(error = %e, "pruning the change feed failed");
        }
    }
}
