//! The operations behind the agent and admin APIs: entries, join tokens,
//! join-token attestation, agent SVIDs, signing for agents. PSAT attestation
//! is in [`crate::psat`].

use std::time::{Duration, SystemTime};

use base64::Engine;
use sigil_store::JoinToken;
use sigil_svid::x509::{SvidRequest, csr_public_key, sha256_hex};
use sigil_types::{AgentRecord, Entry, EntryId, Selectors, SpiffeId};

use crate::ServerState;
use crate::ca::unix;
use crate::error::ServerError;
use crate::tls::AgentPeer;

/// The most items one batch request may carry.
pub const MAX_BATCH: usize = 500;

fn random_bytes<const N: usize>() -> Result<[u8; N], ServerError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| ServerError::Internal("no randomness".into()))?;
    Ok(b)
}

/// A new random entry ID in UUID form.
pub fn new_entry_id() -> Result<EntryId, ServerError> {
    let b: [u8; 16] = random_bytes()?;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
    .parse()
    .map_err(|e: sigil_types::EntryError| ServerError::Internal(e.to_string()))
}

/// One signing outcome: the entry ID and the DER chain, or why not.
pub type SignResult = (String, Result<Vec<Vec<u8>>, String>);

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
        return Err(ServerError::InvalidArgument(
            "malformed join token: expected <id>.<secret>[.<fingerprint>]".into(),
        ));
    };
    let id_ok = id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit());
    if !id_ok || secret.is_empty() {
        return Err(ServerError::InvalidArgument(
            "malformed join token: expected <id>.<secret>[.<fingerprint>]".into(),
        ));
    }
    Ok(TokenParts { id, secret })
}

fn token_hash(parts: &TokenParts<'_>) -> String {
    sha256_hex(format!("{}.{}", parts.id, parts.secret).as_bytes())
}

impl ServerState {
    fn agent_id_for_token(&self, token_id: &str) -> Result<SpiffeId, ServerError> {
        self.config
            .trust_domain
            .id_with_path(&format!(
                "{}/join_token/{token_id}",
                sigil_types::AGENT_PATH_PREFIX
            ))
            .map_err(|e| ServerError::Internal(e.to_string()))
    }

    /// Creates a single-use join token valid for `ttl` (the configured default when `None`).
    pub async fn generate_join_token(
        &self,
        ttl: Option<Duration>,
    ) -> Result<NewJoinToken, ServerError> {
        let ttl = ttl.unwrap_or(self.config.join_token_ttl);
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(ServerError::InvalidArgument(
                "join token TTL must be between 1s and 30 days".into(),
            ));
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
                return Err(ServerError::PermissionDenied(
                    "join token is unknown or was already used".into(),
                ));
            }
            Err(sigil_store::StoreError::TokenExpired) => {
                return Err(ServerError::PermissionDenied(
                    "join token has expired".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        let agent_id = self.agent_id_for_token(parts.id)?;
        if let Some(existing) = self.store.get_agent(&agent_id).await?
            && existing.banned
        {
            return Err(ServerError::PermissionDenied(format!(
                "agent {agent_id} is banned"
            )));
        }
        let leaf = self.sign_agent_svid(&agent_id, &spki, now)?;
        let info = sigil_svid::x509::cert_info(&leaf)?;
        let now_s = unix(now);
        let record = AgentRecord {
            spiffe_id: agent_id.clone(),
            attestation_type: "join_token".into(),
            selectors: Selectors::parse_all([format!("join_token:{}", parts.id)])
                .map_err(|e| ServerError::Internal(e.to_string()))?,
            serial: info.serial_hex,
            previous_serial: String::new(),
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
            &SvidRequest {
                spiffe_id: id,
                dns_names: &[],
                ttl: self.config.agent_svid_ttl,
            },
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
            return Err(ServerError::Unauthenticated(
                "no connection information".into(),
            ));
        };
        let Some(id) = &peer.spiffe_id else {
            return Err(ServerError::Unauthenticated(
                "an agent SVID is required for this call".into(),
            ));
        };
        let Some(record) = self.store.get_agent(id).await? else {
            return Err(ServerError::PermissionDenied(format!(
                "agent {id} is not attested (it may have been evicted)"
            )));
        };
        if record.banned {
            return Err(ServerError::PermissionDenied(format!(
                "agent {id} is banned"
            )));
        }
        let serial = peer.serial.as_deref().unwrap_or_default();
        if serial == record.serial {
            return Ok(record);
        }
        if !record.previous_serial.is_empty() && serial == record.previous_serial {
            return Ok(record);
        }
        Err(ServerError::PermissionDenied(format!(
            "agent {id} presented an SVID that is no longer current"
        )))
    }

    /// Renews the calling agent's SVID.
    pub async fn renew_agent(
        &self,
        agent: &AgentRecord,
        csr: &[u8],
    ) -> Result<Vec<Vec<u8>>, ServerError> {
        let spki = csr_public_key(csr)?;
        let now = SystemTime::now();
        let leaf = self.sign_agent_svid(&agent.spiffe_id, &spki, now)?;
        let info = sigil_svid::x509::cert_info(&leaf)?;
        let mut record = agent.clone();
        record.previous_serial = std::mem::replace(&mut record.serial, info.serial_hex);
        record.expires_at = unix(info.not_after);
        record.updated_at = unix(now);
        self.store.upsert_agent(record).await?;
        self.metrics.agent_renewals.inc();
        Ok(vec![leaf])
    }

    /// Signs workload CSRs, each for an entry authorized to `agent`.
    pub fn sign_x509_svids(
        &self,
        agent: &AgentRecord,
        params: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<SignResult>, ServerError> {
        if params.len() > MAX_BATCH {
            return Err(ServerError::InvalidArgument(format!(
                "a batch may carry at most {MAX_BATCH} CSRs, got {}",
                params.len()
            )));
        }
        let authority = self.ca.active().x509.clone();
        let now = SystemTime::now();
        let mut out = Vec::with_capacity(params.len());
        for (entry_id, csr) in params {
            let result = (|| {
                let id: EntryId = entry_id
                    .parse()
                    .map_err(|e: sigil_types::EntryError| e.to_string())?;
                let entry = self
                    .index
                    .authorized_entry(&id, &agent.spiffe_id, &agent.selectors)
                    .ok_or_else(|| format!("entry {id} is not authorized for this agent"))?;
                let spki = csr_public_key(&csr).map_err(|e| format!("invalid CSR: {e}"))?;
                let ttl = self.x509_ttl(&entry);
                let leaf = authority
                    .sign_svid(
                        &SvidRequest {
                            spiffe_id: &entry.spiffe_id,
                            dns_names: &entry.dns_names,
                            ttl,
                        },
                        &spki,
                        now,
                    )
                    .map_err(|e| format!("signing failed: {e}"))?;
                Ok::<_, String>(vec![leaf])
            })();
            if result.is_ok() {
                self.metrics.x509_svids_signed.inc();
            }
            out.push((entry_id, result));
        }
        Ok(out)
    }

    fn x509_ttl(&self, entry: &Entry) -> Duration {
        match entry.x509_svid_ttl {
            0 => self.config.default_x509_svid_ttl,
            s => Duration::from_secs(s),
        }
    }

    /// Mints a JWT-SVID for an entry authorized to `agent`.
    pub fn mint_jwt_svid(
        &self,
        agent: &AgentRecord,
        entry_id: &str,
        audience: &[String],
    ) -> Result<String, ServerError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(ServerError::InvalidArgument(
                "audience must be specified and must not contain empty strings".into(),
            ));
        }
        if audience.len() > 32 {
            return Err(ServerError::InvalidArgument("at most 32 audiences".into()));
        }
        let id: EntryId = entry_id
            .parse()
            .map_err(|e: sigil_types::EntryError| ServerError::InvalidArgument(e.to_string()))?;
        let entry = self
            .index
            .authorized_entry(&id, &agent.spiffe_id, &agent.selectors)
            .ok_or_else(|| {
                ServerError::PermissionDenied(format!(
                    "entry {id} is not authorized for this agent"
                ))
            })?;
        let ttl = match entry.jwt_svid_ttl {
            0 => self.config.default_jwt_svid_ttl,
            s => Duration::from_secs(s),
        };
        let token =
            self.ca
                .active()
                .jwt
                .sign(&entry.spiffe_id, audience, ttl, SystemTime::now())?;
        self.metrics.jwt_svids_minted.inc();
        Ok(token)
    }

    /// Validates and stores a new entry; returns it as stored.
    pub async fn create_entry(&self, mut entry: Entry) -> Result<Entry, ServerError> {
        entry
            .validate(&self.config.trust_domain)
            .map_err(|e| ServerError::InvalidArgument(e.to_string()))?;
        if let Some(other) = self.index.duplicate_of(&entry) {
            return Err(ServerError::Store(sigil_store::StoreError::AlreadyExists(
                format!("entry {other} already has this parent ID, SPIFFE ID and selectors"),
            )));
        }
        entry.created_at = unix(SystemTime::now());
        let stored = self.store.create_entry(entry).await?;
        self.settle(stored.revision).await;
        Ok(stored)
    }

    /// Validates and replaces an existing entry.
    pub async fn update_entry(&self, entry: Entry) -> Result<Entry, ServerError> {
        entry
            .validate(&self.config.trust_domain)
            .map_err(|e| ServerError::InvalidArgument(e.to_string()))?;
        if let Some(other) = self.index.duplicate_of(&entry) {
            return Err(ServerError::Store(sigil_store::StoreError::AlreadyExists(
                format!("entry {other} already has this parent ID, SPIFFE ID and selectors"),
            )));
        }
        let stored = self.store.update_entry(entry).await?;
        self.settle(stored.revision).await;
        Ok(stored)
    }

    /// Deletes an entry.
    pub async fn delete_entry(&self, id: &EntryId) -> Result<Entry, ServerError> {
        let deleted = self.store.delete_entry(id).await?;
        self.settle(self.store.revision().await?).await;
        Ok(deleted)
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

    #[test]
    fn entry_ids_are_uuid_shaped_and_distinct() {
        let a = new_entry_id().unwrap();
        let b = new_entry_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 36);
        assert_eq!(a.as_str().matches('-').count(), 4);
    }
}
