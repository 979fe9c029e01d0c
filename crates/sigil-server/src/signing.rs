//! Signing for agents: X.509-SVIDs and JWT-SVIDs, each for an entry
//! authorized to the calling agent, with one TTL rule for both.
//!
//! Identity attributes (docs/attributes.md) enter SVIDs here, and only
//! here: computed from the calling agent's attested node selectors (its
//! stored record, loaded when the call was authenticated) and the entry's
//! own selectors, never from the CSR or anything else in the request.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_svid::jwt::JwtClaims;
use sigil_svid::x509::{CheckedCsr, SvidRequest, X509Authority};
use sigil_types::{AgentRecord, Entry, EntryId};

use crate::error::{InternalError, ServerError, SignError};
use crate::registry::MAX_BATCH;
use crate::state::ServerState;

/// One signing outcome: the entry ID and the DER chain, or why not.
pub type SignResult = (String, Result<Vec<Vec<u8>>, SignError>);

/// An SVID's lifetime: the entry's own TTL in seconds, or the server's
/// default when the entry sets none (0). X.509 and JWT alike.
pub(crate) fn svid_ttl(entry_seconds: u64, default: Duration) -> Duration {
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

/// Fewest CSRs a batch gives one signing task: below this, handing work to
/// another thread costs more than it saves.
const MIN_CSRS_PER_TASK: usize = 16;

/// Slots for signing tasks, one per core, server-wide. A batch of CSRs is
/// split into at most one part per core, and the parts of every batch in
/// flight wait for a slot, so signing uses every core without the blocking
/// pool growing with the number of callers.
#[derive(Debug)]
pub(crate) struct SigningSlots {
    slots: Arc<tokio::sync::Semaphore>,
    cores: usize,
}

impl SigningSlots {
    /// One slot per core this process may run on.
    pub(crate) fn per_core() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(cores)),
            cores,
        }
    }
}

/// Refuses a batch larger than one request may carry.
fn check_batch(len: usize) -> Result<(), ServerError> {
    if len > MAX_BATCH {
        return Err(SignError::BatchTooLarge {
            max: MAX_BATCH,
            got: len,
        }
        .into());
    }
    Ok(())
}

impl ServerState {
    /// Signs workload CSRs, each for an entry authorized to `agent`, on the
    /// calling thread.
    pub fn sign_x509_svids(
        &self,
        agent: &AgentRecord,
        params: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<SignResult>, ServerError> {
        check_batch(params.len())?;
        let authority = self.ca.active().x509.clone();
        self.sign_part(agent, &authority, SystemTime::now(), params)
    }

    /// [`Self::sign_x509_svids`] off the async runtime, the batch split
    /// across the cores (see [`SigningSlots`]); results in request order.
    pub async fn sign_x509_svids_spread(
        self: &Arc<Self>,
        agent: AgentRecord,
        params: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<SignResult>, ServerError> {
        check_batch(params.len())?;
        let authority = self.ca.active().x509.clone();
        let now = SystemTime::now();
        let agent = Arc::new(agent);
        let parts = self.signing_slots.cores;
        let per_task = params.len().div_ceil(parts).max(MIN_CSRS_PER_TASK);
        let mut params = params.into_iter();
        let mut tasks = Vec::with_capacity(parts);
        loop {
            let part: Vec<_> = params.by_ref().take(per_task).collect();
            if part.is_empty() {
                break;
            }
            let slot = self
                .signing_slots
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| ServerError::Internal(InternalError::SigningSlots(e)))?;
            let (state, agent, authority) = (self.clone(), agent.clone(), authority.clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                let _slot = slot;
                state.sign_part(&agent, &authority, now, part)
            }));
        }
        let mut out = Vec::new();
        for task in tasks {
            let signed = task.await.map_err(|source| {
                ServerError::Internal(InternalError::Task {
                    task: "signing",
                    source,
                })
            })??;
            out.extend(signed);
        }
        Ok(out)
    }

    /// Signs one part of a batch with `authority`, at `now`.
    fn sign_part(
        &self,
        agent: &AgentRecord,
        authority: &X509Authority,
        now: SystemTime,
        params: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<SignResult>, ServerError> {
        // The CA certificate is read once per part, not once per leaf.
        let signer = authority.leaf_signer().map_err(SignError::Failed)?;
        let mut out = Vec::with_capacity(params.len());
        for (entry_id, csr) in params {
            let result = (|| {
                let entry = self.authorized_entry(agent, &entry_id)?;
                // The CSR is parsed once, here: its proof of possession is
                // checked and its key is what the leaf is built from. Only
                // the key is taken: its subject, SANs and extensions are
                // ignored.
                let csr = CheckedCsr::check(&csr).map_err(SignError::InvalidCsr)?;
                let ttl = svid_ttl(entry.x509_svid_ttl, self.config.default_x509_svid_ttl);
                let attributes = svid_attributes(agent, &entry);
                let leaf = signer
                    .sign_csr(
                        &SvidRequest {
                            spiffe_id: &entry.spiffe_id,
                            dns_names: &entry.dns_names,
                            ttl,
                            attributes: &attributes,
                        },
                        &csr,
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
    ) -> Result<Arc<Entry>, SignError> {
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
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use sigil_types::Selectors;

    use super::*;
    use crate::registry::new_entry_id;

    /// An agent record with `id`, `attestation_type` and `selectors`, unused serials.
    fn agent_record(id: &str, attestation_type: &str, selectors: Selectors) -> AgentRecord {
        AgentRecord {
            spiffe_id: id.parse().unwrap(),
            attestation_type: attestation_type.into(),
            selectors,
            serial: String::new(),
            previous_serial: String::new(),
            serial_used: false,
            expires_at: 0,
            banned: false,
            can_reattest: true,
            created_at: 0,
            updated_at: 0,
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
        let mut config = crate::ServerConfig::for_test(dir.path());
        config.jwt_issuer = Some("https://oidc.example.org".into());
        let server = crate::start(config).await.unwrap();
        let state = &server.state();
        let agent = agent_record(
            "spiffe://example.org/sigil/agent/k8s_psat/prod/n1",
            "k8s_psat",
            Selectors::parse_all([
                "k8s_psat:cluster:prod",
                "k8s_psat:region:eu-west-1",
                "k8s_psat:agent_node_name:n1",
            ])
            .unwrap(),
        );
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

    /// A server with its data under `dir`, and the record of a join-token
    /// agent without node selectors.
    async fn server_and_join_token_agent(
        dir: &std::path::Path,
    ) -> (crate::ServerHandle, AgentRecord) {
        let server = crate::start(crate::ServerConfig::for_test(dir))
            .await
            .unwrap();
        let agent = agent_record(
            "spiffe://example.org/sigil/agent/join_token/a",
            "join_token",
            Selectors::default(),
        );
        (server, agent)
    }

    /// A CSR that carries `victim`'s public key but a signature made by
    /// another key over another request: well-formed, and every field a
    /// signer that skipped the proof of possession would need is there.
    fn csr_for_someone_elses_key(victim: &sigil_svid::keys::PrivateKey) -> Vec<u8> {
        use x509_parser::prelude::FromDer;
        let genuine = sigil_svid::x509::make_csr(victim).unwrap();
        let attacker =
            sigil_svid::x509::make_csr(&sigil_svid::keys::PrivateKey::generate_p256().unwrap())
                .unwrap();
        let info_of = |der: &[u8]| {
            let (_, req) =
                x509_parser::certification_request::X509CertificationRequest::from_der(der)
                    .unwrap();
            req.certification_request_info.raw.to_vec()
        };
        let (victim_info, attacker_info) = (info_of(&genuine), info_of(&attacker));
        // The attacker's signature algorithm and signature, after its request info.
        let at = attacker
            .windows(attacker_info.len())
            .position(|w| w == attacker_info.as_slice())
            .unwrap();
        let body = [&victim_info[..], &attacker[at + attacker_info.len()..]].concat();
        let mut csr = vec![0x30];
        match u8::try_from(body.len()).unwrap() {
            n @ 0..=0x7f => csr.push(n),
            n => csr.extend([0x81, n]),
        }
        csr.extend(body);
        csr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_csr_whose_signature_does_not_verify_is_never_signed() {
        let dir = tempfile::tempdir().unwrap();
        let (server, agent) = server_and_join_token_agent(dir.path()).await;
        let state = server.state().clone();
        let entry = state
            .create_entry(Entry::new(
                new_entry_id().unwrap(),
                "spiffe://example.org/w".parse().unwrap(),
                agent.spiffe_id.clone(),
                Selectors::parse_all(["unix:uid:1"]).unwrap(),
            ))
            .await
            .unwrap();
        let victim = sigil_svid::keys::PrivateKey::generate_p256().unwrap();
        let forged = csr_for_someone_elses_key(&victim);
        let genuine = sigil_svid::x509::make_csr(&victim).unwrap();
        let id = entry.id.to_string();
        // Both public signing paths, in one batch beside the genuine CSR.
        let batch = vec![(id.clone(), forged.clone()), (id.clone(), genuine)];
        let on_this_thread = state.sign_x509_svids(&agent, batch.clone()).unwrap();
        let spread = state
            .sign_x509_svids_spread(agent.clone(), batch)
            .await
            .unwrap();
        for signed in [on_this_thread, spread] {
            assert!(
                matches!(
                    signed[0].1,
                    Err(SignError::InvalidCsr(sigil_svid::SvidError::CsrSignature))
                ),
                "{:?}",
                signed[0].1
            );
            // The genuine CSR for the same key is signed, with that key.
            let leaf = &signed[1].1.as_ref().unwrap()[0];
            let cert = x509_parser::parse_x509_certificate(leaf).unwrap().1;
            assert_eq!(cert.public_key().raw, victim.public_key_spki_der());
        }
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spread_batch_keeps_the_request_order_and_every_check() {
        let dir = tempfile::tempdir().unwrap();
        let (server, agent) = server_and_join_token_agent(dir.path()).await;
        let state = server.state().clone();
        let selectors = Selectors::parse_all(["unix:uid:1"]).unwrap();
        let mut entries = Vec::new();
        for i in 0..40 {
            let mut e = Entry::new(
                new_entry_id().unwrap(),
                format!("spiffe://example.org/w{i}").parse().unwrap(),
                agent.spiffe_id.clone(),
                selectors.clone(),
            );
            e.x509_svid_ttl = 60 + i;
            entries.push(state.create_entry(e).await.unwrap());
        }
        let elsewhere = state
            .create_entry(Entry::new(
                new_entry_id().unwrap(),
                "spiffe://example.org/elsewhere".parse().unwrap(),
                "spiffe://example.org/sigil/agent/join_token/b"
                    .parse()
                    .unwrap(),
                selectors,
            ))
            .await
            .unwrap();
        let csr = || {
            sigil_svid::x509::make_csr(&sigil_svid::keys::PrivateKey::generate_p256().unwrap())
                .unwrap()
        };
        let mut params: Vec<(String, Vec<u8>)> =
            entries.iter().map(|e| (e.id.to_string(), csr())).collect();
        params[5].0 = "not an entry id".to_owned();
        params[25].0 = elsewhere.id.to_string();
        params[33].1 = b"not a CSR".to_vec();
        let mut forged = csr();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        params[38].1 = forged;
        let expected: Vec<String> = params.iter().map(|(id, _)| id.clone()).collect();
        let counted_before = state.metrics.x509_svids_signed.get();

        let signed = state
            .sign_x509_svids_spread(agent.clone(), params)
            .await
            .unwrap();
        assert_eq!(
            signed.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
            expected
        );
        for (i, (_, result)) in signed.iter().enumerate() {
            match i {
                5 => assert!(
                    matches!(result, Err(SignError::BadEntryId(_))),
                    "{result:?}"
                ),
                25 => assert!(
                    matches!(result, Err(SignError::NotAuthorized(_))),
                    "{result:?}"
                ),
                33 | 38 => assert!(
                    matches!(result, Err(SignError::InvalidCsr(_))),
                    "{result:?}"
                ),
                _ => {
                    let chain = result.as_ref().unwrap();
                    let info = sigil_svid::x509::cert_info(&chain[0]).unwrap();
                    assert_eq!(info.spiffe_id.as_ref(), Some(&entries[i].spiffe_id));
                    let life = info.not_after.duration_since(info.not_before).unwrap();
                    assert_eq!(
                        life,
                        Duration::from_secs(60 + i as u64) + sigil_svid::x509::BACKDATE
                    );
                }
            }
        }
        // The metric counts the leaves signed, not the CSRs refused.
        assert_eq!(state.metrics.x509_svids_signed.get(), counted_before + 36);
        // Every slot is back.
        assert_eq!(
            state.signing_slots.slots.available_permits(),
            state.signing_slots.cores
        );
        let too_many = vec![(String::new(), Vec::new()); MAX_BATCH + 1];
        assert!(matches!(
            state.sign_x509_svids_spread(agent, too_many).await,
            Err(ServerError::Sign(SignError::BatchTooLarge { .. }))
        ));
        server.shutdown().await;
    }
}
