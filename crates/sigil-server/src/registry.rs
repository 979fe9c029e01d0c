//! The operations behind the agent and admin APIs: entries, join tokens,
//! join-token attestation, agent SVIDs, signing for agents. PSAT attestation
//! is in [`crate::psat`].
//!
//! Identity attributes (docs/attributes.md) enter SVIDs here, and only
//! here: computed from the calling agent's attested node selectors (its
//! stored record, loaded when the call was authenticated) and the entry's
//! own selectors, never from the CSR or anything else in the request.

use std::time::{Duration, SystemTime};

use base64::Engine;
use sigil_store::JoinToken;
use sigil_svid::jwt::JwtClaims;
use sigil_svid::x509::{SvidRequest, csr_public_key, sha256_hex};
use sigil_types::{AgentRecord, Entry, EntryId, Selectors, SerialStatus, SpiffeId};

use crate::ServerState;
use crate::ca::unix;
use crate::error::{AgentRefusal, AttestationError, EntryRefusal, ServerError, SignError};
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
pub type SignResult = (String, Result<Vec<Vec<u8>>, SignError>);

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

/// An SVID's lifetime: the entry's own TTL in seconds, or the server's
/// default when the entry sets none (0). X.509 and JWT alike.
fn svid_ttl(entry_seconds: u64, default: Duration) -> Duration {
    match entry_seconds {
        0 => default,
        s => Duration::from_secs(s),
    }
}

/// The identity attributes an SVID of `entry` carries when issued through
/// `agent`, as (name, value) sorted by name: the entry's `attributes`
/// resolved against the agent's attested node selectors and the entry's
/// selectors. Empty when the entry names none.
pub fn svid_attributes(agent: &AgentRecord, entry: &Entry) -> Vec<(String, String)> {
    if entry.attributes.is_empty() {
        return Vec::new();
    }
    sigil_types::attribute::resolve(&entry.attributes, &agent.selectors, &entry.selectors)
        .into_iter()
        .map(|(a, v)| (a.as_str().to_owned(), v))
        .collect()
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
                .map_err(|e| ServerError::Internal(e.to_string()))?,
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

    /// Signs workload CSRs, each for an entry authorized to `agent`.
    pub fn sign_x509_svids(
        &self,
        agent: &AgentRecord,
        params: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<SignResult>, ServerError> {
        if params.len() > MAX_BATCH {
            return Err(SignError::BatchTooLarge {
                max: MAX_BATCH,
                got: params.len(),
            }
            .into());
        }
        let authority = self.ca.active().x509.clone();
        let now = SystemTime::now();
        let mut out = Vec::with_capacity(params.len());
        for (entry_id, csr) in params {
            let result = (|| {
                let entry = self.authorized_entry(agent, &entry_id)?;
                // Only the public key is taken from the CSR: its subject,
                // SANs and extensions are ignored.
                let spki = csr_public_key(&csr).map_err(SignError::InvalidCsr)?;
                let ttl = svid_ttl(entry.x509_svid_ttl, self.config.default_x509_svid_ttl);
                let attributes = svid_attributes(agent, &entry);
                let leaf = authority
                    .sign_svid(
                        &SvidRequest {
                            spiffe_id: &entry.spiffe_id,
                            dns_names: &entry.dns_names,
                            ttl,
                            attributes: &attributes,
                        },
                        &spki,
                        now,
                    )
                    .map_err(SignError::Failed)?;
                Ok(vec![leaf])
            })();
            if result.is_ok() {
                self.metrics.x509_svids_signed.inc();
            }
            out.push((entry_id, result));
        }
        Ok(out)
    }

    /// The entry `entry_id` names, if it is authorized for `agent`.
    fn authorized_entry(
        &self,
        agent: &AgentRecord,
        entry_id: &str,
    ) -> Result<std::sync::Arc<Entry>, SignError> {
        let id: EntryId = entry_id.parse().map_err(SignError::BadEntryId)?;
        self.index
            .authorized_entry(&id, &agent.spiffe_id, &agent.selectors)
            .ok_or(SignError::NotAuthorized(id))
    }

    /// Mints a JWT-SVID for an entry authorized to `agent`: `iss` is the
    /// configured `jwt_issuer` (if any), and the entry's attributes become
    /// top-level claims named like them.
    pub fn mint_jwt_svid(
        &self,
        agent: &AgentRecord,
        entry_id: &str,
        audience: &[String],
    ) -> Result<String, ServerError> {
        sigil_svid::jwt::check_audiences(audience).map_err(SignError::Audience)?;
        let entry = self.authorized_entry(agent, entry_id)?;
        let ttl = svid_ttl(entry.jwt_svid_ttl, self.config.default_jwt_svid_ttl);
        let claims = JwtClaims {
            issuer: self.config.jwt_issuer.clone(),
            extra: svid_attributes(agent, &entry)
                .into_iter()
                .map(|(name, value)| (name, value.into()))
                .collect(),
        };
        let token = self.ca.active().jwt.sign_with(
            &entry.spiffe_id,
            audience,
            ttl,
            SystemTime::now(),
            &claims,
        )?;
        self.metrics.jwt_svids_minted.inc();
        Ok(token)
    }

    /// Validates and stores a new entry; returns it as stored.
    pub async fn create_entry(&self, mut entry: Entry) -> Result<Entry, ServerError> {
        entry
            .validate(&self.config.trust_domain)
            .map_err(EntryRefusal::Invalid)?;
        if let Some(other) = self.index.duplicate_of(&entry) {
            return Err(EntryRefusal::Duplicate(other).into());
        }
        entry.created_at = unix(SystemTime::now());
        let stored = self.store.create_entry(entry).await?;
        self.settle(stored.revision).await;
        Ok(stored)
    }

    /// Validates and replaces an existing entry.
    pub async fn update_entry(&self, entry: Entry) -> Result<Entry, ServerError> {
        // Said first: whatever else is wrong with the request, an entry that
        // does not exist cannot be updated (the store checks again).
        if self.index.get(&entry.id).is_none() {
            return Err(EntryRefusal::NotFound(entry.id).into());
        }
        entry
            .validate(&self.config.trust_domain)
            .map_err(EntryRefusal::Invalid)?;
        if let Some(other) = self.index.duplicate_of(&entry) {
            return Err(EntryRefusal::Duplicate(other).into());
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

    /// DER of SEQUENCE OF SEQUENCE { UTF8String, UTF8String } (short items only).
    fn attributes_der(pairs: &[(&str, &str)]) -> Vec<u8> {
        let tlv = |tag: u8, body: &[u8]| {
            let mut v = vec![tag, u8::try_from(body.len()).unwrap()];
            v.extend_from_slice(body);
            v
        };
        let items: Vec<u8> = pairs
            .iter()
            .flat_map(|(n, v)| {
                tlv(
                    0x30,
                    &[tlv(0x0c, n.as_bytes()), tlv(0x0c, v.as_bytes())].concat(),
                )
            })
            .collect();
        tlv(0x30, &items)
    }

    /// A CSR that asks for another identity, DNS name and attribute values.
    fn smuggling_csr() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["evil.example.org".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/admin".try_into().unwrap(),
        ));
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                sigil_svid::x509::ATTRIBUTES_OID,
                attributes_der(&[("cluster", "evil"), ("region", "evil"), ("zone", "evil")]),
            ));
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn claims_of(token: &str) -> serde_json::Map<String, serde_json::Value> {
        let payload = token.split('.').nth(1).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        serde_json::from_slice(&json).unwrap()
    }

    #[tokio::test]
    async fn attributes_come_from_the_agent_record_and_entry_never_the_request() {
        use sigil_types::Attribute;
        let dir = tempfile::tempdir().unwrap();
        let td = sigil_types::TrustDomain::new("example.org").unwrap();
        let mut config = crate::ServerConfig::with_defaults(td, dir.path().join("server"));
        config.bind_address = "127.0.0.1:0".parse().unwrap();
        config.admin_socket = dir.path().join("admin.sock");
        config.jwt_issuer = Some("https://oidc.example.org".into());
        let server = crate::start(config).await.unwrap();
        let state = &server.state;
        let agent = AgentRecord {
            spiffe_id: "spiffe://example.org/sigil/agent/k8s_psat/prod/n1"
                .parse()
                .unwrap(),
            attestation_type: "k8s_psat".into(),
            selectors: Selectors::parse_all([
                "k8s_psat:cluster:prod",
                "k8s_psat:region:eu-west-1",
                "k8s_psat:agent_node_name:n1",
            ])
            .unwrap(),
            serial: String::new(),
            previous_serial: String::new(),
            serial_used: false,
            expires_at: 0,
            banned: false,
            can_reattest: true,
            created_at: 0,
            updated_at: 0,
        };
        let selectors = Selectors::parse_all(["k8s:ns:payments", "k8s:sa:api"]).unwrap();
        let mut with = Entry::new(
            new_entry_id().unwrap(),
            "spiffe://example.org/payments/api".parse().unwrap(),
            agent.spiffe_id.clone(),
            selectors.clone(),
        );
        with.attributes = vec![
            Attribute::Cluster,
            Attribute::Region,
            Attribute::Zone,
            Attribute::Namespace,
            Attribute::ServiceAccount,
        ];
        let with = state.create_entry(with).await.unwrap();
        let without = state
            .create_entry(Entry::new(
                new_entry_id().unwrap(),
                "spiffe://example.org/payments/plain".parse().unwrap(),
                agent.spiffe_id.clone(),
                selectors,
            ))
            .await
            .unwrap();

        let signed = state
            .sign_x509_svids(
                &agent,
                vec![
                    (with.id.to_string(), smuggling_csr()),
                    (without.id.to_string(), smuggling_csr()),
                ],
            )
            .unwrap();
        let leaf = |i: usize| signed[i].1.as_ref().unwrap()[0].clone();
        let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        // Zone has no attested source and is left out; the CSR's values are ignored.
        assert_eq!(
            sigil_svid::x509::svid_attributes(&leaf(0)).unwrap(),
            vec![
                pair("cluster", "prod"),
                pair("namespace", "payments"),
                pair("region", "eu-west-1"),
                pair("service_account", "api"),
            ]
        );
        let info = sigil_svid::x509::cert_info(&leaf(0)).unwrap();
        assert_eq!(info.spiffe_id, Some(with.spiffe_id.clone()));
        let leaf0 = leaf(0);
        let cert = x509_parser::parse_x509_certificate(&leaf0).unwrap().1;
        let sans = format!("{:?}", cert.subject_alternative_name().unwrap());
        assert!(!sans.contains("evil") && !sans.contains("admin"), "{sans}");
        // An entry without attributes: no extension at all, whatever the CSR says.
        assert!(
            sigil_svid::x509::svid_attributes(&leaf(1))
                .unwrap()
                .is_empty()
        );
        let leaf1 = leaf(1);
        let cert = x509_parser::parse_x509_certificate(&leaf1).unwrap().1;
        assert!(
            !cert
                .extensions()
                .iter()
                .any(|e| e.oid.to_id_string() == sigil_svid::x509::ATTRIBUTES_OID_STR)
        );

        let aud = vec!["sts.amazonaws.com".to_owned()];
        let claims = claims_of(&state.mint_jwt_svid(&agent, with.id.as_str(), &aud).unwrap());
        assert_eq!(claims["iss"], "https://oidc.example.org");
        assert_eq!(claims["sub"], "spiffe://example.org/payments/api");
        assert_eq!(claims["cluster"], "prod");
        assert_eq!(claims["region"], "eu-west-1");
        assert_eq!(claims["namespace"], "payments");
        assert_eq!(claims["service_account"], "api");
        assert!(!claims.contains_key("zone"));
        let claims = claims_of(
            &state
                .mint_jwt_svid(&agent, without.id.as_str(), &aud)
                .unwrap(),
        );
        let mut names: Vec<&str> = claims.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["aud", "exp", "iat", "iss", "sub"]);

        // The same entry through an agent attested elsewhere carries that agent's facts.
        let mut elsewhere = agent.clone();
        elsewhere.selectors = Selectors::parse_all(["k8s_psat:cluster:dev"]).unwrap();
        let claims = claims_of(
            &state
                .mint_jwt_svid(&elsewhere, with.id.as_str(), &aud)
                .unwrap(),
        );
        assert_eq!(claims["cluster"], "dev");
        assert!(!claims.contains_key("region"));
        server.shutdown().await;
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
