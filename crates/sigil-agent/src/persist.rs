//! What the agent keeps on disk so that a restart needs neither a new join
//! token nor a reachable server: its SVID and key, the bundle, the federated
//! bundles of other trust domains, and the entries with their workload SVIDs
//! and keys. Every file is 0600 in a 0700 directory and written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sigil_svid::bundle::Bundle;
use sigil_svid::keys::{PrivateKey, read_private_file, write_private_file};
use sigil_types::{Attribute, Entry, EntryId, SpiffeId, TrustDomain};

use crate::AgentError;

/// The agent's own identity.
#[derive(Clone)]
pub struct AgentIdentity {
    /// The agent's SPIFFE ID.
    pub id: SpiffeId,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The SVID's key.
    pub key: PrivateKey,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl AgentIdentity {
    /// Builds the identity from a freshly issued chain.
    pub fn new(chain: Vec<Vec<u8>>, key: PrivateKey) -> Result<Self, AgentError> {
        let leaf = chain.first().ok_or_else(|| {
            AgentError::Bootstrap("the server returned an empty agent SVID chain".into())
        })?;
        let info = sigil_svid::x509::cert_info(leaf)?;
        let id = info
            .spiffe_id
            .ok_or_else(|| AgentError::Bootstrap("agent SVID has no SPIFFE ID".into()))?;
        Ok(Self {
            id,
            chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }
}

/// One cached workload SVID.
#[derive(Clone)]
pub struct WorkloadSvid {
    /// The entry it was signed for.
    pub entry_id: EntryId,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// Its private key (generated on this node; never leaves it).
    pub key: PrivateKey,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
    /// DNS names it carries.
    pub dns_names: Vec<String>,
    /// The entry's X.509 TTL when signed, to notice TTL changes.
    pub ttl: u64,
    /// The attributes the entry asked for when signed, to notice changes.
    pub attributes: Vec<Attribute>,
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("entry_id", &self.entry_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadSvid {
    /// Whether the SVID still matches what the entry asks for.
    pub fn fits(&self, e: &Entry) -> bool {
        self.spiffe_id == e.spiffe_id
            && self.dns_names == e.dns_names
            && self.ttl == e.x509_svid_ttl
            && self.attributes == e.attributes
    }
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    chain: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct SvidFile {
    entry_id: EntryId,
    chain: Vec<String>,
    key: String,
    dns_names: Vec<String>,
    ttl: u64,
    // Absent in caches written before attributes existed.
    #[serde(default)]
    attributes: Vec<Attribute>,
}

#[derive(Serialize, Deserialize, Default)]
struct CacheFile {
    revision: u64,
    entries: Vec<Entry>,
    svids: Vec<SvidFile>,
}

/// The federated bundles file: the SPIFFE bundle map form
/// (`{"trust_domains": {"<td>": <bundle>}}`).
#[derive(Serialize, Deserialize, Default)]
struct FederatedFile {
    trust_domains: BTreeMap<String, serde_json::Value>,
}

/// The cache as loaded from disk.
#[derive(Debug, Default)]
pub struct CachedState {
    /// Revision the entries are current with.
    pub revision: u64,
    /// The entries.
    pub entries: Vec<Entry>,
    /// The SVIDs that are still valid.
    pub svids: Vec<WorkloadSvid>,
}

/// The agent's data directory.
#[derive(Debug, Clone)]
pub struct Persist {
    dir: PathBuf,
}

fn b64(d: &[u8]) -> String {
    STANDARD.encode(d)
}

fn unb64(s: &str, what: &str) -> Result<Vec<u8>, AgentError> {
    STANDARD
        .decode(s)
        .map_err(|e| AgentError::Corrupt(format!("{what}: {e}")))
}

impl Persist {
    /// Uses (and creates, 0700) the directory.
    pub fn open(dir: &Path) -> Result<Self, AgentError> {
        sigil_svid::keys::ensure_private_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_opt(&self, name: &str) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, AgentError> {
        match read_private_file(&self.path(name)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Saves the agent's SVID and key.
    pub fn save_identity(&self, id: &AgentIdentity) -> Result<(), AgentError> {
        write_private_file(&self.path("agent.key"), id.key.to_pem().as_bytes())?;
        let file = IdentityFile {
            chain: id.chain.iter().map(|c| b64(c)).collect(),
        };
        write_private_file(&self.path("agent.json"), &serde_json::to_vec(&file)?)?;
        Ok(())
    }

    /// Loads the agent's SVID and key, if saved.
    pub fn load_identity(&self) -> Result<Option<AgentIdentity>, AgentError> {
        let (Some(key), Some(json)) = (self.read_opt("agent.key")?, self.read_opt("agent.json")?)
        else {
            return Ok(None);
        };
        let key = PrivateKey::from_pem(&String::from_utf8_lossy(&key))?;
        let file: IdentityFile = serde_json::from_slice(&json)?;
        let chain = file
            .chain
            .iter()
            .map(|c| unb64(c, "agent.json"))
            .collect::<Result<Vec<_>, _>>()?;
        AgentIdentity::new(chain, key).map(Some)
    }

    /// Saves the trust bundle.
    pub fn save_bundle(&self, bundle: &Bundle) -> Result<(), AgentError> {
        write_private_file(&self.path("bundle.json"), bundle.to_json().as_bytes())?;
        Ok(())
    }

    /// Loads the trust bundle, if saved.
    pub fn load_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>, AgentError> {
        let Some(json) = self.read_opt("bundle.json")? else {
            return Ok(None);
        };
        Ok(Some(Bundle::from_json(
            td.clone(),
            &String::from_utf8_lossy(&json),
        )?))
    }

    /// Saves the federated bundles (foreign trust domains' bundles), replacing
    /// the saved set.
    pub fn save_federated<'a>(
        &self,
        bundles: impl Iterator<Item = &'a Bundle>,
    ) -> Result<(), AgentError> {
        let file = FederatedFile {
            trust_domains: bundles
                .map(|b| {
                    let doc = serde_json::to_value(b.to_document())?;
                    Ok((b.trust_domain.to_string(), doc))
                })
                .collect::<Result<_, serde_json::Error>>()?,
        };
        write_private_file(
            &self.path("federated_bundles.json"),
            &serde_json::to_vec(&file)?,
        )?;
        Ok(())
    }

    /// Loads the saved federated bundles; none if never saved. A saved bundle
    /// that no longer parses (or names `own`) is left out with a warning
    /// rather than failing the start: the server sends the set again on
    /// connect.
    pub fn load_federated(&self, own: &TrustDomain) -> Result<Vec<Bundle>, AgentError> {
        let Some(json) = self.read_opt("federated_bundles.json")? else {
            return Ok(Vec::new());
        };
        let file: FederatedFile = serde_json::from_slice(&json)?;
        let mut out = Vec::new();
        for (name, doc) in file.trust_domains {
            let parsed = TrustDomain::new(&name)
                .map_err(|e| e.to_string())
                .and_then(|td| {
                    if &td == own {
                        return Err("it is the agent's own trust domain".to_owned());
                    }
                    Bundle::from_json(td, &doc.to_string()).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(b) => out.push(b),
                Err(e) => tracing::warn!(
                    trust_domain = %name,
                    error = %e,
                    "ignoring a saved federated bundle"
                ),
            }
        }
        Ok(out)
    }

    /// Saves entries and workload SVIDs.
    pub fn save_cache<'a>(
        &self,
        revision: u64,
        entries: impl Iterator<Item = &'a Entry>,
        svids: impl Iterator<Item = &'a WorkloadSvid>,
    ) -> Result<(), AgentError> {
        let file = CacheFile {
            revision,
            entries: entries.cloned().collect(),
            svids: svids
                .map(|s| SvidFile {
                    entry_id: s.entry_id.clone(),
                    chain: s.chain.iter().map(|c| b64(c)).collect(),
                    key: b64(s.key.pkcs8_der()),
                    dns_names: s.dns_names.clone(),
                    ttl: s.ttl,
                    attributes: s.attributes.clone(),
                })
                .collect(),
        };
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&file)?);
        write_private_file(&self.path("cache.json"), &json)?;
        Ok(())
    }

    /// Loads entries and the still-valid workload SVIDs.
    pub fn load_cache(&self, now: SystemTime) -> Result<CachedState, AgentError> {
        let Some(json) = self.read_opt("cache.json")? else {
            return Ok(CachedState::default());
        };
        let file: CacheFile = serde_json::from_slice(&json)?;
        let mut svids = Vec::new();
        for s in file.svids {
            let chain = s
                .chain
                .iter()
                .map(|c| unb64(c, "cache.json"))
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKey::from_pkcs8_der(&unb64(&s.key, "cache.json")?)?;
            let Some(leaf) = chain.first() else { continue };
            let info = sigil_svid::x509::cert_info(leaf)?;
            let Some(spiffe_id) = info.spiffe_id else {
                continue;
            };
            if info.not_after <= now {
                continue;
            }
            svids.push(WorkloadSvid {
                entry_id: s.entry_id,
                spiffe_id,
                chain,
                key,
                not_before: info.not_before,
                not_after: info.not_after,
                dns_names: s.dns_names,
                ttl: s.ttl,
                attributes: s.attributes,
            });
        }
        Ok(CachedState {
            revision: file.revision,
            entries: file.entries,
            svids,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use sigil_svid::jwt::JwtAuthority;
    use sigil_svid::x509::{SvidRequest, X509Authority};
    use sigil_types::Selectors;

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn bundle_of(name: &str) -> Bundle {
        let now = SystemTime::now();
        let mut b = Bundle::new(td(name));
        b.x509_authorities.push(
            X509Authority::generate(&td(name), DAY, now)
                .unwrap()
                .cert_der()
                .to_vec(),
        );
        b.jwt_authorities
            .push(JwtAuthority::generate(DAY, now).unwrap().public_jwk());
        b.sequence = 3;
        b.refresh_hint = Some(300);
        b
    }

    #[test]
    fn federated_bundles_survive_a_restart_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let own = td("example.org");
        let p = Persist::open(dir.path()).unwrap();
        assert!(
            p.load_federated(&own).unwrap().is_empty(),
            "nothing saved yet"
        );
        let (a, b) = (bundle_of("a.org"), bundle_of("b.org"));
        p.save_federated([&a, &b].into_iter()).unwrap();
        let mode = std::fs::metadata(dir.path().join("federated_bundles.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = Persist::open(dir.path()).unwrap();
        assert_eq!(again.load_federated(&own).unwrap(), vec![a.clone(), b]);
        // Saving a smaller set replaces the saved one.
        again.save_federated([&a].into_iter()).unwrap();
        assert_eq!(again.load_federated(&own).unwrap(), vec![a]);
    }

    #[test]
    fn a_bad_saved_federated_bundle_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let own = td("example.org");
        let p = Persist::open(dir.path()).unwrap();
        let good = bundle_of("good.org");
        let mut doc = serde_json::json!({"trust_domains": {
            "bad.org": {"keys": [{"kty": "EC", "use": "jwt-svid"}]},
            "example.org": serde_json::to_value(bundle_of("example.org").to_document()).unwrap(),
        }});
        doc["trust_domains"]["good.org"] = serde_json::to_value(good.to_document()).unwrap();
        write_private_file(
            &dir.path().join("federated_bundles.json"),
            doc.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(p.load_federated(&own).unwrap(), vec![good]);
    }

    #[test]
    fn caches_written_before_federation_and_attributes_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::open(dir.path()).unwrap();
        let now = SystemTime::now();
        let ca = X509Authority::generate(&td("example.org"), DAY, now).unwrap();
        let spiffe_id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let key = PrivateKey::generate_p256().unwrap();
        let leaf = ca
            .sign_svid(
                &SvidRequest::new(&spiffe_id, Duration::from_secs(3600)),
                &key.public_key_spki_der(),
                now,
            )
            .unwrap();
        let entry = Entry::new(
            "e1".parse().unwrap(),
            spiffe_id.clone(),
            "spiffe://example.org/agent".parse().unwrap(),
            Selectors::parse_all(["unix:uid:1000"]).unwrap(),
        );
        let mut entry_json = serde_json::to_value(&entry).unwrap();
        entry_json.as_object_mut().unwrap().remove("attributes");
        // The layout of cache.json before federated bundles and attributes.
        let old = serde_json::json!({
            "revision": 9,
            "entries": [entry_json],
            "svids": [{
                "entry_id": "e1",
                "chain": [b64(&leaf)],
                "key": b64(key.pkcs8_der()),
                "dns_names": [],
                "ttl": 0,
            }],
        });
        write_private_file(&dir.path().join("cache.json"), old.to_string().as_bytes()).unwrap();
        let cached = p.load_cache(now).unwrap();
        assert_eq!(cached.revision, 9);
        assert_eq!(cached.entries, vec![entry.clone()]);
        assert_eq!(cached.svids.len(), 1);
        assert!(cached.svids[0].fits(&entry));
        assert!(p.load_federated(&td("example.org")).unwrap().is_empty());

        // An entry that now asks for attributes needs a new SVID.
        let mut with_attrs = entry;
        with_attrs.attributes = vec![Attribute::Region];
        assert!(!cached.svids[0].fits(&with_attrs));
    }
}
