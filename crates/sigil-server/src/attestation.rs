//! Agents: join tokens and join-token attestation, agent SVIDs, the
//! authentication of every agent call, renewal, eviction and bans. PSAT
//! attestation is in [`crate::psat`].

use std::time::{Duration, SystemTime};

use base64::Engine;
use sigil_store::JoinToken;
use sigil_svid::x509::{SvidRequest, csr_public_key, sha256_hex};
use sigil_types::{AgentRecord, Selectors, SerialStatus, SpiffeId};

use crate::ca::unix;
use crate::error::{AgentRefusal, AttestationError, InternalError, ServerError};
use crate::registry::random_bytes;
use crate::state::ServerState;
use crate::tls::AgentPeer;

/// A freshly generated join token.
#[derive(Debug, Clone)]
pub struct NewJoinToken {
    /// `<id>.<secret>.<bundle fingerprint>`: what the operator hands to the agent.
    pub token: String,
    /// Unix expiry.
    pub expires_at: i64,
    /// The SPIFFE ID the agent will get.
    pub agent_id: SpiffeId,
}

/// The parts of a join token.
struct TokenParts<'a> {
    id: &'a str,
    secret: &'a str,
}

fn split_token(token: &str) -> Result<TokenParts<'_>, ServerError> {
    let mut parts = token.split('.');
    let (Some(id), Some(secret)) = (parts.next(), parts.next()) else {
        return Err(AttestationError::MalformedJoinToken.into());
    };
    let id_ok = id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit());
    if !id_ok || secret.is_empty() {
        return Err(AttestationError::MalformedJoinToken.into());
    }
    Ok(TokenParts { id, secret })
}

fn token_hash(parts: &TokenParts<'_>) -> String {
    sha256_hex(format!("{}.{}", parts.id, parts.secret).as_bytes())
}

impl ServerState {
    fn agent_id_for_token(&self, token_id: &str) -> Result<SpiffeId, ServerError> {
        let path = format!("{}/join_token/{token_id}", sigil_types::AGENT_PATH_PREFIX);
        Ok(crate::error::own_id(&self.config.trust_domain, &path)?)
    }

    /// Creates a single-use join token valid for `ttl` (the configured default when `None`).
    pub async fn generate_join_token(
        &self,
        ttl: Option<Duration>,
    ) -> Result<NewJoinToken, ServerError> {
        let ttl = ttl.unwrap_or(self.config.join_token_ttl);
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(AttestationError::JoinTokenTtl.into());
        }
        let id: [u8; 8] = random_bytes()?;
        let id: String = id.iter().map(|x| format!("{x:02x}")).collect();
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<24>()?);
        let fingerprint = sha256_hex(self.ca.active().x509.cert_der());
        let now = unix(SystemTime::now());
        let expires_at = now + ttl.as_secs() as i64;
        let parts = TokenParts {
            id: &id,
            secret: &secret,
        };
        self.store
            .create_join_token(JoinToken {
                token_hash: token_hash(&parts),
                expires_at,
                created_at: now,
            })
            .await?;
        Ok(NewJoinToken {
            agent_id: self.agent_id_for_token(&id)?,
            token: format!("{id}.{secret}.{fingerprint}"),
            expires_at,
        })
    }

    /// Attests an agent with a join token: consumes the token (single use),
    /// signs the agent's CSR and records the agent.
    pub async fn attest_join_token(
        &self,
        token: &str,
        csr: &[u8],
    ) -> Result<(SpiffeId, Vec<Vec<u8>>), ServerError> {
        let result = self.attest_join_token_inner(token, csr).await;
        match &result {
            Ok((id, _)) => {
                self.metrics.attestations.inc();
                tracing::info!(agent = %id, "agent attested with a join token");
            }
            Err(e) => {
                self.metrics.attestation_failures.inc();
                tracing::warn!(error = %e, "join token attestation refused");
            }
        }
        result
    }

    async fn attest_join_token_inner(
        &self,
        token: &str,
        csr: &[u8],
    ) -> Result<(SpiffeId, Vec<Vec<u8>>), ServerError> {
        // Check the CSR before spending the token, so a bad request does not burn it.
        let spki = csr_public_key(csr)?;
        let parts = split_token(token)?;
        let now = SystemTime::now();
        match self
            .store
            .consume_join_token(&token_hash(&parts), unix(now))
            .await
        {
            Ok(_) => {}
            Err(sigil_store::StoreError::NotFound(_)) => {
                return Err(AttestationError::UnknownJoinToken.into());
            }
            Err(sigil_store::StoreError::TokenExpired) => {
                return Err(AttestationError::ExpiredJoinToken.into());
            }
            Err(e) => return Err(e.into()),
        }
        let agent_id = self.agent_id_for_token(parts.id)?;
        if let Some(existing) = self.store.get_agent(&agent_id).await?
            && existing.banned
        {
            return Err(AgentRefusal::Banned(agent_id).into());
        }
        let leaf = self.sign_agent_svid(&agent_id, &spki, now)?;
        let info = sigil_svid::x509::cert_info(&leaf)?;
        let now_s = unix(now);
        let record = AgentRecord {
            spiffe_id: agent_id.clone(),
            attestation_type: "join_token".into(),
            selectors: Selectors::parse_all([format!("join_token:{}", parts.id)])
                .map_err(InternalError::OwnSelector)?,
            serial: info.serial_hex,
            previous_serial: String::new(),
            serial_used: false,
            expires_at: unix(info.not_after),
            banned: false,
            can_reattest: false,
            created_at: now_s,
            updated_at: now_s,
        };
        self.store.upsert_agent(record).await?;
        self.settle(self.store.revision().await?).await;
        Ok((agent_id, vec![leaf]))
    }

    pub(crate) fn sign_agent_svid(
        &self,
        id: &SpiffeId,
        spki: &[u8],
        now: SystemTime,
    ) -> Result<Vec<u8>, ServerError> {
        Ok(self.ca.active().x509.sign_svid(
            &SvidRequest::new(id, self.config.agent_svid_ttl),
            spki,
            now,
        )?)
    }

    /// Checks that a connection belongs to a current, unbanned agent.
    pub async fn authenticate_agent(
        &self,
        peer: Option<&AgentPeer>,
    ) -> Result<AgentRecord, ServerError> {
        let Some(peer) = peer else {
            return Err(AgentRefusal::NoConnectionInfo.into());
        };
        let Some(id) = &peer.spiffe_id else {
            return Err(AgentRefusal::SvidRequired.into());
        };
        // From memory; the store only for an agent attested through another
        // server a moment ago, whose change this server has not applied yet.
        let record = match self.agents.get(id) {
            Some(r) => Some(r),
            None => self.store.get_agent(id).await?,
        };
        let Some(record) = record else {
            return Err(AgentRefusal::NotAttested(id.clone()).into());
        };
        if record.banned {
            return Err(AgentRefusal::Banned(id.clone()).into());
        }
        let serial = peer.serial.as_deref().unwrap_or_default();
        if record.serial_status(serial) == SerialStatus::Current {
            return Ok(self.current_serial_used(record, serial).await);
        }
        // Anything but the current serial is decided on the stored record:
        // memory may lag behind another server that renewed the agent or
        // saw its new serial used a moment ago.
        let Some(stored) = self.store.get_agent(id).await? else {
            return Err(AgentRefusal::NotAttested(id.clone()).into());
        };
        if stored.banned {
            return Err(AgentRefusal::Banned(id.clone()).into());
        }
        match stored.serial_status(serial) {
            SerialStatus::Current => Ok(self.current_serial_used(stored, serial).await),
            SerialStatus::Previous => Ok(stored),
            SerialStatus::Superseded | SerialStatus::Unknown => {
                Err(self.stale_serial(&stored, serial))
            }
        }
    }

    /// A call presented the agent's current serial: the first such call
    /// after a renewal retires the previous serial.
    async fn current_serial_used(&self, record: AgentRecord, serial: &str) -> AgentRecord {
        if record.serial_used || record.previous_serial.is_empty() {
            return record;
        }
        self.first_use_of_serial(record, serial).await
    }

    /// Records that the agent's new serial was used, so that every server
    /// refuses the previous one from now on. A store failure does not fail
    /// the call (agents are authenticated from memory while the database is
    /// away); the next call tries again.
    async fn first_use_of_serial(&self, record: AgentRecord, serial: &str) -> AgentRecord {
        match self
            .store
            .mark_agent_serial_used(&record.spiffe_id, serial)
            .await
        {
            Ok(Some(marked)) => {
                if let Ok(revision) = self.store.revision().await {
                    self.settle(revision).await;
                }
                tracing::debug!(agent = %record.spiffe_id, serial, "agent uses its renewed SVID; the previous one is retired");
                marked
            }
            // Marked by another call or server meanwhile, or renewed again.
            Ok(None) => record,
            Err(e) => {
                tracing::warn!(agent = %record.spiffe_id, error = %e, "could not record the first use of a renewed agent SVID");
                record
            }
        }
    }

    /// The refusal of an SVID of a known agent that is no longer accepted,
    /// logged: only a copy of an old SVID (or an agent restored from an old
    /// backup) can present one.
    pub(crate) fn stale_serial(&self, record: &AgentRecord, serial: &str) -> ServerError {
        let id = &record.spiffe_id;
        if record.serial_status(serial) == SerialStatus::Superseded {
            tracing::warn!(
                agent = %id,
                presented_serial = serial,
                current_serial = %record.serial,
                "possible agent SVID theft: the previous SVID was presented after the agent used its renewed one; refused"
            );
        } else {
            tracing::warn!(
                agent = %id,
                presented_serial = serial,
                current_serial = %record.serial,
                previous_serial = %record.previous_serial,
                "possible agent SVID theft: an agent SVID that is no longer current was presented; refused"
            );
        }
        AgentRefusal::StaleSvid(id.clone()).into()
    }

    /// Renews the calling agent's SVID; `presented_serial` is the serial of
    /// the SVID the call was authenticated with, which stays accepted (as
    /// the previous one) until the new SVID is first used.
    pub async fn renew_agent(
        &self,
        agent: &AgentRecord,
        presented_serial: &str,
        csr: &[u8],
    ) -> Result<Vec<Vec<u8>>, ServerError> {
        let spki = csr_public_key(csr)?;
        let now = SystemTime::now();
        let leaf = self.sign_agent_svid(&agent.spiffe_id, &spki, now)?;
        let info = sigil_svid::x509::cert_info(&leaf)?;
        // Conditional, so that a ban or an eviction made meanwhile, by this
        // server or another one sharing the database, is not overwritten.
        let renewed = self
            .store
            .renew_agent_serial(
                &agent.spiffe_id,
                presented_serial,
                &info.serial_hex,
                unix(info.not_after),
                unix(now),
            )
            .await?;
        if renewed.is_none() {
            return Err(AgentRefusal::NotRenewed(agent.spiffe_id.clone()).into());
        }
        // The agent presents the new serial next: it must be in memory first.
        self.settle(self.store.revision().await?).await;
        self.metrics.agent_renewals.inc();
        Ok(vec![leaf])
    }

    /// Deletes an agent's record: its SVID stops working at once. A join-token
    /// agent needs a new token to come back (join tokens are single use); a
    /// PSAT agent comes back by attesting again, unless it is banned instead.
    pub async fn evict_agent(&self, id: &SpiffeId) -> Result<AgentRecord, ServerError> {
        let record = self.store.delete_agent(id).await?;
        self.settle(self.store.revision().await?).await;
        tracing::info!(agent = %id, "agent evicted");
        Ok(record)
    }

    /// Bans an agent: it can no longer renew, sync, sign or attest again.
    pub async fn ban_agent(&self, id: &SpiffeId) -> Result<AgentRecord, ServerError> {
        // Not while a re-attestation of this agent reads and rewrites its record.
        let write_guard = self.agent_writes.lock().await;
        let record = self.store.set_agent_banned(id, true).await?;
        drop(write_guard);
        self.settle(self.store.revision().await?).await;
        tracing::info!(agent = %id, "agent banned");
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_format_is_checked() {
        assert!(split_token("0123456789abcdef.secret.fp").is_ok());
        assert!(split_token("0123456789abcdef.secret").is_ok());
        for bad in [
            "",
            "nodots",
            "short.secret",
            "0123456789abcdef.",
            "0123456789abcdeg.s",
        ] {
            assert!(split_token(bad).is_err(), "{bad}");
        }
    }
}
