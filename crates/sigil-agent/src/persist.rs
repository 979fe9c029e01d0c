//! What the agent keeps on disk so that a restart needs neither a new join
//! token nor a reachable server: its SVID and key, the bundle, and the
//! entries with their workload SVIDs and keys. Every file is 0600 in a 0700
//! directory and written atomically.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sigil_svid::bundle::Bundle;
use sigil_svid::keys::{PrivateKey, read_private_file, write_private_file};
use sigil_types::{Entry, EntryId, SpiffeId, TrustDomain};

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
}

#[derive(Serialize, Deserialize, Default)]
struct CacheFile {
    revision: u64,
    entries: Vec<Entry>,
    svids: Vec<SvidFile>,
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
            });
        }
        Ok(CachedState {
            revision: file.revision,
            entries: file.entries,
            svids,
        })
    }
}
