//! What the agent keeps on disk so that a restart needs neither a new join
//! token nor a reachable server: its SVID and key, the bundle, the federated
//! bundles of other trust domains, and the entries with their workload SVIDs
//! and keys. Every file is 0600 in a 0700 directory and written atomically.
//!
//! The agent's identity is one file, `identity.json` (key and chain
//! together), replaced with one rename: a SIGKILL during a renewal leaves
//! the old pair or the new one, never a new key beside the old chain. Agents
//! from before kept two files, `agent.key` and `agent.json`; they still load,
//! and the next save replaces them with `identity.json`.
//!
//! The entries and workload SVIDs are a base file, `cache.json`, and a
//! journal beside it, `cache.journal`, that each save appends only what
//! changed to (see [`CacheWriter`]): a save costs in proportion to the
//! change, not to the cache. When the journal grows past the base, both are
//! rewritten (compacted), so the bytes written stay within a small multiple
//! of the cache's size however it grew.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// Builds the identity from a chain (leaf first) and its key; refused
    /// when the key is not the leaf's (a torn write, a wrong answer).
    pub fn new(chain: Vec<Vec<u8>>, key: PrivateKey) -> Result<Self, AgentError> {
        let leaf = chain.first().ok_or_else(|| {
            AgentError::Bootstrap("the server returned an empty agent SVID chain".into())
        })?;
        sigil_svid::tls::check_chain_key(&chain, &key)?;
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

/// The length of the DER element (tag, length, contents) at the start of
/// `der`, if its header is whole and in definite form.
fn der_element_len(der: &[u8]) -> Option<usize> {
    let (&first, rest) = der.get(1..).and_then(|r| r.split_first())?;
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return None;
    }
    let len = rest
        .get(..n)?
        .iter()
        .fold(0usize, |l, b| (l << 8) | usize::from(*b));
    (2 + n).checked_add(len)
}

/// Whether `der` is one whole DER element whose header says where it ends.
fn is_one_element(der: &[u8]) -> bool {
    der_element_len(der) == Some(der.len())
}

/// The DER elements of `der` one after another.
fn elements(der: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    let mut rest = der;
    std::iter::from_fn(move || {
        let len = der_element_len(rest)?.min(rest.len());
        let (element, tail) = rest.split_at(len);
        rest = tail;
        Some(element)
    })
}

/// An SVID's certificate chain, leaf first, and its private key (PKCS#8),
/// held as their DER one after another in one block, zeroized when
/// dropped: one allocation per SVID instead of one for the chain and one
/// for the key (docs/benchmarks.md, "Agent memory per cached SVID").
/// Each element's end is found again from its DER header; the last one is
/// the key.
#[derive(Clone)]
pub struct SvidDer(zeroize::Zeroizing<Box<[u8]>>);

impl SvidDer {
    /// The chain of `certs`, leaf first, with `key`; `None` if there is no
    /// certificate or one is not one whole DER element (its end could not
    /// be found again). `key` is a checked key: whether it is the leaf's
    /// is the caller's to check.
    pub fn new<C: AsRef<[u8]>>(certs: &[C], key: &PrivateKey) -> Option<Self> {
        let key = key.pkcs8_der();
        if certs.is_empty()
            || !certs.iter().all(|c| is_one_element(c.as_ref()))
            || !is_one_element(key)
        {
            return None;
        }
        let len = certs.iter().map(|c| c.as_ref().len()).sum::<usize>() + key.len();
        // Sized once, so that no reallocation leaves a copy of the key.
        let mut der = Vec::with_capacity(len);
        for c in certs {
            der.extend_from_slice(c.as_ref());
        }
        der.extend_from_slice(key);
        Some(Self(zeroize::Zeroizing::new(der.into_boxed_slice())))
    }

    /// Where the key starts: after the last certificate.
    fn key_start(&self) -> usize {
        let mut at = 0;
        let mut last = 0;
        for e in elements(&self.0) {
            last = at;
            at += e.len();
        }
        last
    }

    /// The certificate chain.
    pub fn chain(&self) -> DerChain<'_> {
        DerChain(&self.0[..self.key_start()])
    }

    /// The private key's PKCS#8 DER (secret).
    pub fn key_der(&self) -> &[u8] {
        &self.0[self.key_start()..]
    }

    /// The private key as a `PRIVATE KEY` PEM block (secret).
    pub fn key_pem(&self) -> zeroize::Zeroizing<String> {
        sigil_svid::keys::pkcs8_pem(self.key_der())
    }

    /// The chain's and the key's bytes together.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds nothing (only [`SvidDer::empty`] does).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Nothing, which holds no memory (for the memory test).
    #[cfg(test)]
    pub(crate) fn empty() -> Self {
        Self(zeroize::Zeroizing::new(Box::default()))
    }
}

impl std::fmt::Debug for SvidDer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidDer")
            .field("chain", &self.chain())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A certificate chain, leaf first, as its certificates' DER one after
/// another: the form the Workload API sends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DerChain<'a>(&'a [u8]);

impl<'a> DerChain<'a> {
    /// The certificates' DER one after another, leaf first.
    pub fn der(self) -> &'a [u8] {
        self.0
    }

    /// The certificates, leaf first.
    pub fn iter(self) -> impl Iterator<Item = &'a [u8]> {
        elements(self.0)
    }

    /// The leaf certificate.
    pub fn leaf(self) -> &'a [u8] {
        self.iter().next().unwrap_or_default()
    }

    /// The certificates, each in its own `Vec`.
    pub fn to_vecs(self) -> Vec<Vec<u8>> {
        self.iter().map(<[u8]>::to_vec).collect()
    }
}

impl std::fmt::Debug for DerChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerChain")
            .field("certs", &self.iter().count())
            .field("bytes", &self.0.len())
            .finish()
    }
}

/// A certificate time as whole seconds since 1970: 8 bytes where a
/// `SystemTime` takes 16. Exact for every certificate time (X.509 times
/// are whole seconds; RFC 5280 §4.1.2.5), before 1970 too.
fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

fn from_unix_secs(s: i64) -> SystemTime {
    let magnitude = std::time::Duration::from_secs(s.unsigned_abs());
    if s >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

/// Entries by ID, each held once: a set of the entries themselves, looked
/// up by the ID each holds, so that no copy of the ID (16 bytes) sits
/// beside each entry: a slot is 8 bytes instead of 24 (docs/benchmarks.md,
/// "Agent memory per cached SVID").
#[derive(Debug, Clone, Default)]
pub struct EntryMap(std::collections::HashSet<ById>);

/// An entry as a member of an [`EntryMap`]: equal, and hashed, as its ID.
#[derive(Debug, Clone)]
struct ById(Arc<Entry>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As the ID alone hashes, for look-ups by ID (`Borrow`).
        self.0.id.hash(state);
    }
}

impl std::borrow::Borrow<EntryId> for ById {
    fn borrow(&self) -> &EntryId {
        &self.0.id
    }
}

impl EntryMap {
    /// An empty map with room for `n` entries.
    pub fn with_capacity(n: usize) -> Self {
        Self(std::collections::HashSet::with_capacity(n))
    }

    /// The entry with ID `id`.
    pub fn get(&self, id: &EntryId) -> Option<&Arc<Entry>> {
        self.0.get(id).map(|e| &e.0)
    }

    /// The entry with ID `id`, and that ID as the entry holds it.
    pub fn get_key_value(&self, id: &EntryId) -> Option<(&EntryId, &Arc<Entry>)> {
        self.0.get(id).map(|e| (&e.0.id, &e.0))
    }

    /// Whether an entry with ID `id` is held.
    pub fn contains_key(&self, id: &EntryId) -> bool {
        self.0.contains(id)
    }

    /// Holds `e` in place of the entry with its ID; returns that one.
    pub fn insert(&mut self, e: Arc<Entry>) -> Option<Arc<Entry>> {
        self.0.replace(ById(e)).map(|old| old.0)
    }

    /// Drops the entry with ID `id`; returns it.
    pub fn remove(&mut self, id: &EntryId) -> Option<Arc<Entry>> {
        self.0.take(id).map(|e| e.0)
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, in no order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<Entry>> + '_ {
        self.0.iter().map(|e| &e.0)
    }

    /// The IDs, in no order.
    pub fn keys(&self) -> impl Iterator<Item = &EntryId> + '_ {
        self.0.iter().map(|e| &e.0.id)
    }

    /// The IDs, in no order, giving the map up.
    pub fn into_keys(self) -> impl Iterator<Item = EntryId> {
        self.0.into_iter().map(|e| e.0.id.clone())
    }
}

/// One cached workload SVID. The entry it was signed for is the key it is
/// held under, not a field: 16 bytes less in every SVID held.
#[derive(Clone)]
pub struct WorkloadSvid {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its DER chain, leaf first, and its private key (generated on this
    /// node; never leaves it), as DER only: the agent hands it out and
    /// never signs with it.
    pub der: SvidDer,
    /// Validity start and end, in seconds since 1970.
    not_before: i64,
    not_after: i64,
    /// The DNS names and attributes it carries; `None` when it carries
    /// neither, as most do (see [`SvidExtras::of`]).
    pub extras: Option<Box<SvidExtras>>,
    /// The entry's X.509 TTL when signed, to notice TTL changes.
    pub ttl: u64,
}

/// What an SVID carries beyond its SPIFFE ID, as its entry asked when it
/// was signed (to notice changes). Held apart from [`WorkloadSvid`], and
/// only when not empty: most entries ask for neither, and two empty `Vec`s
/// in every SVID held cost 40 more bytes than one empty `Option<Box<_>>`
/// (docs/benchmarks.md, "Agent memory per cached SVID").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidExtras {
    /// DNS names.
    pub dns_names: Vec<String>,
    /// Attributes.
    pub attributes: Vec<Attribute>,
}

impl SvidExtras {
    /// The extras of an SVID that carries `dns_names` and `attributes`:
    /// `None` when both are empty.
    pub fn of(dns_names: &[String], attributes: &[Attribute]) -> Option<Box<Self>> {
        (!dns_names.is_empty() || !attributes.is_empty()).then(|| {
            Box::new(Self {
                dns_names: dns_names.to_vec(),
                attributes: attributes.to_vec(),
            })
        })
    }
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

impl WorkloadSvid {
    /// An SVID: its SPIFFE ID, chain and key, validity (`not_before`,
    /// `not_after`, as read from its leaf), and what its entry asked for
    /// when it was signed.
    pub fn new(
        spiffe_id: SpiffeId,
        der: SvidDer,
        (not_before, not_after): (SystemTime, SystemTime),
        extras: Option<Box<SvidExtras>>,
        ttl: u64,
    ) -> Self {
        Self {
            spiffe_id,
            der,
            not_before: unix_secs(not_before),
            not_after: unix_secs(not_after),
            extras,
            ttl,
        }
    }

    /// Whether the SVID still matches what the entry asks for.
    pub fn fits(&self, e: &Entry) -> bool {
        self.spiffe_id == e.spiffe_id
            && *self.dns_names() == *e.dns_names
            && self.ttl == e.x509_svid_ttl
            && *self.attributes() == *e.attributes
    }

    /// Its certificate chain, leaf first.
    pub fn chain(&self) -> DerChain<'_> {
        self.der.chain()
    }

    /// Its private key's PKCS#8 DER (secret).
    pub fn key_der(&self) -> &[u8] {
        self.der.key_der()
    }

    /// Validity start.
    pub fn not_before(&self) -> SystemTime {
        from_unix_secs(self.not_before)
    }

    /// Validity end.
    pub fn not_after(&self) -> SystemTime {
        from_unix_secs(self.not_after)
    }

    /// The DNS names it carries.
    pub fn dns_names(&self) -> &[String] {
        self.extras.as_ref().map_or(&[], |x| &x.dns_names)
    }

    /// The attributes it carries.
    pub fn attributes(&self) -> &[Attribute] {
        self.extras.as_ref().map_or(&[], |x| &x.attributes)
    }
}

/// `identity.json`: the agent's key and chain in one file, so that one
/// rename replaces both.
#[derive(Serialize, Deserialize)]
struct IdentityFile {
    /// PKCS#8 DER, base64 (secret).
    key: String,
    /// DER certificates, leaf first, base64.
    chain: Vec<String>,
}

impl Drop for IdentityFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

/// `agent.json` of the two-file layout: the chain only, beside `agent.key`.
#[derive(Deserialize)]
struct LegacyChainFile {
    chain: Vec<String>,
}

/// The agent identity file.
const IDENTITY: &str = "identity.json";
/// The key of the two-file layout (PEM).
const LEGACY_KEY: &str = "agent.key";
/// The chain of the two-file layout.
const LEGACY_CHAIN: &str = "agent.json";

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

impl SvidFile {
    fn of(entry_id: &EntryId, s: &WorkloadSvid) -> Self {
        Self {
            entry_id: entry_id.clone(),
            chain: s.chain().iter().map(b64).collect(),
            key: b64(s.key_der()),
            dns_names: s.dns_names().to_vec(),
            ttl: s.ttl,
            attributes: s.attributes().to_vec(),
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct CacheFile {
    revision: u64,
    entries: Vec<Entry>,
    svids: Vec<SvidFile>,
    /// The journal that continues this base: only a journal whose header
    /// names the same number is replayed on it. Absent (0) in caches
    /// written before the journal, which then load as they are.
    #[serde(default)]
    journal: u64,
}

/// The cache base file.
const CACHE: &str = "cache.json";
/// The journal of changes after the base.
const JOURNAL: &str = "cache.journal";
/// A journal never triggers compaction below this size, so that a small
/// cache is not rewritten on nearly every save.
const JOURNAL_MIN: u64 = 64 * 1024;
/// Bytes before each journal record's payload: its length (u32, little
/// endian) and the first 8 bytes of the payload's SHA-256.
const RECORD_HEADER: usize = 12;

/// The first record of a journal: which base it continues.
#[derive(Serialize, Deserialize)]
struct JournalHeader {
    journal: u64,
}

/// One save's worth of changes.
#[derive(Serialize, Deserialize, Default)]
struct JournalRecord {
    /// The cache's revision after this record.
    revision: u64,
    /// Entries added or changed.
    #[serde(default)]
    entries: Vec<Entry>,
    /// Entries removed.
    #[serde(default)]
    deleted: Vec<EntryId>,
    /// SVIDs added or replaced (keys included: the journal is as secret
    /// as the base).
    #[serde(default)]
    svids: Vec<SvidFile>,
    /// SVIDs removed.
    #[serde(default)]
    svids_deleted: Vec<EntryId>,
}

impl JournalRecord {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.deleted.is_empty()
            && self.svids.is_empty()
            && self.svids_deleted.is_empty()
    }
}

/// The checksum of a journal record's payload.
fn record_digest(payload: &[u8]) -> [u8; 8] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&d.as_ref()[..8]);
    out
}

/// Frames a journal record: length, checksum, payload.
fn frame(payload: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, AgentError> {
    let len = u32::try_from(payload.len())
        .map_err(|_| AgentError::Corrupt("a cache journal record over 4 GiB".into()))?;
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(RECORD_HEADER + payload.len()));
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_digest(payload));
    out.extend_from_slice(payload);
    Ok(out)
}

/// The payloads of the whole records at the start of `data`: a record cut
/// short or whose checksum does not match (a save interrupted by a crash)
/// ends the journal there, with everything after it.
fn records(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= RECORD_HEADER {
        let (head, body) = rest.split_at(RECORD_HEADER);
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[..4]);
        let Ok(len) = usize::try_from(u32::from_le_bytes(len)) else {
            break;
        };
        if body.len() < len {
            break;
        }
        let (payload, next) = body.split_at(len);
        if record_digest(payload) != head[4..RECORD_HEADER] {
            break;
        }
        out.push(payload);
        rest = next;
    }
    out
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
    pub svids: Vec<CachedSvid>,
}

/// A workload SVID loaded from the cache, with the entry it was signed for.
#[derive(Debug)]
pub struct CachedSvid {
    /// The entry.
    pub entry_id: EntryId,
    /// The SVID.
    pub svid: WorkloadSvid,
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

/// Reads `identity.json`.
fn parse_identity(json: &[u8]) -> Result<AgentIdentity, AgentError> {
    let file: IdentityFile = serde_json::from_slice(json)?;
    let key = PrivateKey::from_pkcs8_der(&zeroize::Zeroizing::new(unb64(&file.key, IDENTITY)?))?;
    let chain = file
        .chain
        .iter()
        .map(|c| unb64(c, IDENTITY))
        .collect::<Result<Vec<_>, _>>()?;
    AgentIdentity::new(chain, key)
}

/// Reads the two-file layout: `agent.key` (PEM) and `agent.json` (chain).
fn parse_legacy_identity(key: &[u8], json: &[u8]) -> Result<AgentIdentity, AgentError> {
    let pem =
        std::str::from_utf8(key).map_err(|e| AgentError::Corrupt(format!("{LEGACY_KEY}: {e}")))?;
    let key = PrivateKey::from_pem(pem)?;
    let file: LegacyChainFile = serde_json::from_slice(json)?;
    let chain = file
        .chain
        .iter()
        .map(|c| unb64(c, LEGACY_CHAIN))
        .collect::<Result<Vec<_>, _>>()?;
    AgentIdentity::new(chain, key)
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

    /// Saves the agent's SVID and key as one file with one rename (fsynced
    /// file and directory), then removes the two-file layout if present.
    pub fn save_identity(&self, id: &AgentIdentity) -> Result<(), AgentError> {
        let file = IdentityFile {
            key: b64(id.key.pkcs8_der()),
            chain: id.chain.iter().map(|c| b64(c)).collect(),
        };
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&file)?);
        write_private_file(&self.path(IDENTITY), &json)?;
        // Only now: until identity.json is durable, the old files are the
        // identity a restart must find.
        let mut removed = false;
        for name in [LEGACY_KEY, LEGACY_CHAIN] {
            match std::fs::remove_file(self.path(name)) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        if removed {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Loads the agent's SVID and key, if saved: `identity.json`, else the
    /// two-file layout of older agents. A saved identity that is incomplete
    /// or whose key is not its certificate's (a torn two-file write) is
    /// never returned: it is skipped with a warning, and `None` makes the
    /// agent attest again (with a join token or its PSAT). An unreadable
    /// file (I/O error, wrong mode) is an error.
    pub fn load_identity(&self) -> Result<Option<AgentIdentity>, AgentError> {
        if let Some(json) = self.read_opt(IDENTITY)? {
            match parse_identity(&json) {
                Ok(id) => return Ok(Some(id)),
                Err(e) => tracing::warn!(
                    file = %self.path(IDENTITY).display(),
                    error = %e,
                    "ignoring an unusable saved agent identity"
                ),
            }
        }
        match (self.read_opt(LEGACY_KEY)?, self.read_opt(LEGACY_CHAIN)?) {
            (Some(key), Some(chain)) => match parse_legacy_identity(&key, &chain) {
                Ok(id) => Ok(Some(id)),
                Err(e) => {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        error = %e,
                        "ignoring an unusable saved agent identity (agent.key and agent.json do not form one)"
                    );
                    Ok(None)
                }
            },
            (None, None) => Ok(None),
            (key, _) => {
                let missing = if key.is_none() {
                    LEGACY_KEY
                } else {
                    LEGACY_CHAIN
                };
                tracing::warn!(
                    dir = %self.dir.display(),
                    missing,
                    "ignoring a saved agent identity with a file missing"
                );
                Ok(None)
            }
        }
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

    /// Loads the entries and the still-valid workload SVIDs: the base file,
    /// then the journal's whole records in order. A journal that does not
    /// continue this base (a compaction interrupted between its two renames)
    /// is ignored: the base already holds what it says.
    pub fn load_cache(&self, now: SystemTime) -> Result<CachedState, AgentError> {
        let Some(json) = self.read_opt(CACHE)? else {
            return Ok(CachedState::default());
        };
        let base: CacheFile = serde_json::from_slice(&json)?;
        drop(json);
        let mut revision = base.revision;
        let mut entries: BTreeMap<EntryId, Entry> = base
            .entries
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        let mut svid_files: BTreeMap<EntryId, SvidFile> = base
            .svids
            .into_iter()
            .map(|s| (s.entry_id.clone(), s))
            .collect();
        if base.journal != 0
            && let Some(journal) = self.read_opt(JOURNAL)?
        {
            let mut recs = records(&journal).into_iter();
            let continues = recs
                .next()
                .and_then(|h| serde_json::from_slice::<JournalHeader>(h).ok())
                .is_some_and(|h| h.journal == base.journal);
            if continues {
                for payload in recs {
                    // Checksummed, so this is damage rather than a torn
                    // write; the state so far is still a consistent one.
                    let Ok(rec) = serde_json::from_slice::<JournalRecord>(payload) else {
                        tracing::warn!(
                            file = %self.path(JOURNAL).display(),
                            "ignoring the rest of an unreadable cache journal"
                        );
                        break;
                    };
                    revision = rec.revision;
                    for id in rec.deleted {
                        entries.remove(&id);
                    }
                    for e in rec.entries {
                        entries.insert(e.id.clone(), e);
                    }
                    for id in rec.svids_deleted {
                        svid_files.remove(&id);
                    }
                    for s in rec.svids {
                        svid_files.insert(s.entry_id.clone(), s);
                    }
                }
            }
        }
        let mut svids = Vec::new();
        for s in svid_files.into_values() {
            let chain = s
                .chain
                .iter()
                .map(|c| unb64(c, CACHE))
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKey::from_pkcs8_der(&zeroize::Zeroizing::new(unb64(&s.key, CACHE)?))?;
            let Some(leaf) = chain.first() else { continue };
            // Key and chain share one record of one file, so they agree
            // unless the file was damaged; a pair that does not is signed
            // again rather than served.
            if let Err(e) = sigil_svid::tls::check_chain_key(&chain, &key) {
                tracing::warn!(entry = %s.entry_id, error = %e, "ignoring a cached SVID");
                continue;
            }
            let info = sigil_svid::x509::cert_info(leaf)?;
            let Some(spiffe_id) = info.spiffe_id else {
                continue;
            };
            if info.not_after <= now {
                continue;
            }
            let Some(der) = SvidDer::new(&chain, &key) else {
                tracing::warn!(entry = %s.entry_id, "ignoring a cached SVID whose chain is not plain DER");
                continue;
            };
            svids.push(CachedSvid {
                svid: WorkloadSvid::new(
                    spiffe_id,
                    // Checked against the chain above; kept as DER only.
                    der,
                    (info.not_before, info.not_after),
                    SvidExtras::of(&s.dns_names, &s.attributes),
                    s.ttl,
                ),
                entry_id: s.entry_id,
            });
        }
        Ok(CachedState {
            revision,
            entries: entries.into_values().collect(),
            svids,
        })
    }
}

/// What a [`CacheWriter::save_touched`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Nothing changed since the last save; nothing was written.
    Nothing,
    /// One record appended to the journal.
    Appended,
    /// The base and a new, empty journal written (first save, or the
    /// journal had outgrown the base, or an earlier write failed).
    Compacted,
}

/// What changed since the cache was last saved, by entry: its entry, its
/// SVID, or nothing (an entry the server sent again as it was, which counts
/// towards the churn a save reports to [`crate::trim`] but is not written).
/// The agent names every change here as it makes it, so that a save writes
/// the change without a copy of what was saved before to compare with
/// (docs/benchmarks.md, "Agent memory per cached SVID").
#[derive(Debug, Default, Clone)]
pub struct Touched(BTreeMap<EntryId, u8>);

const ENTRY_CHANGED: u8 = 1;
const SVID_CHANGED: u8 = 2;

impl Touched {
    fn mark(&mut self, id: &EntryId, what: u8) {
        match self.0.get_mut(id) {
            Some(w) => *w |= what,
            None => {
                self.0.insert(id.clone(), what);
            }
        }
    }

    /// `id`'s entry was added, changed or removed.
    pub fn entry(&mut self, id: &EntryId) {
        self.mark(id, ENTRY_CHANGED);
    }

    /// `id`'s SVID was added, replaced or removed.
    pub fn svid(&mut self, id: &EntryId) {
        self.mark(id, SVID_CHANGED);
    }

    /// `id`'s entry was taken in again as it was: nothing to write.
    pub fn seen(&mut self, id: &EntryId) {
        self.mark(id, 0);
    }

    /// How many entries are named.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes `id` out, as if it had not changed.
    #[cfg(test)]
    pub(crate) fn unmark(&mut self, id: &EntryId) {
        self.0.remove(id);
    }
}

/// Saves the agent's entries and workload SVIDs as a base file and a
/// journal of changes. What a save appends is what the caller names as
/// changed ([`Touched`]), read from the caller's maps; the writer keeps no
/// copy of what it saved.
#[derive(Default)]
pub struct CacheWriter {
    revision: u64,
    /// Open for appending once a compaction has made base and journal agree.
    journal: Option<std::fs::File>,
    journal_bytes: u64,
    base_bytes: u64,
}

impl std::fmt::Debug for CacheWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheWriter")
            .field("revision", &self.revision)
            .field("journal_bytes", &self.journal_bytes)
            .field("base_bytes", &self.base_bytes)
            .finish_non_exhaustive()
    }
}

impl CacheWriter {
    /// A writer that has saved nothing yet: its first save compacts, which
    /// also discards a torn journal tail left by a crash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Saves the agent's state at `revision`: appends one fsynced journal
    /// record with the entries and SVIDs `touched` names as changed since
    /// the last save (as they are in `entries` and `svids` now; one no
    /// longer there as removed), or compacts when the journal has grown
    /// past the base (or this is the first save, or an earlier one failed).
    /// `touched` must name every change since the last save: a save then
    /// costs in proportion to the change, not to the cache. (A compaction
    /// still writes everything.)
    pub fn save_touched<V: AsRef<WorkloadSvid>>(
        &mut self,
        persist: &Persist,
        revision: u64,
        entries: &EntryMap,
        svids: &HashMap<EntryId, V>,
        touched: &Touched,
    ) -> Result<Saved, AgentError> {
        if self.journal.is_none() {
            return self.compact(persist, revision, entries, svids);
        }
        let mut rec = JournalRecord {
            revision,
            ..JournalRecord::default()
        };
        for (id, what) in &touched.0 {
            if what & ENTRY_CHANGED != 0 {
                match entries.get(id) {
                    Some(e) => rec.entries.push((**e).clone()),
                    None => rec.deleted.push(id.clone()),
                }
            }
            if what & SVID_CHANGED != 0 {
                match svids.get(id) {
                    Some(s) => rec.svids.push(SvidFile::of(id, s.as_ref())),
                    None => rec.svids_deleted.push(id.clone()),
                }
            }
        }
        if rec.is_empty() && revision == self.revision {
            return Ok(Saved::Nothing);
        }
        let framed = frame(&zeroize::Zeroizing::new(serde_json::to_vec(&rec)?))?;
        if self.journal_bytes + framed.len() as u64 > self.base_bytes.max(JOURNAL_MIN) {
            return self.compact(persist, revision, entries, svids);
        }
        let appended = self.journal.as_mut().map(|f| {
            f.write_all(&framed)?;
            f.sync_data()
        });
        if let Some(Err(e)) = appended {
            // The file may end in part of this record; the next save
            // rewrites base and journal rather than append after it.
            self.journal = None;
            return Err(e.into());
        }
        self.journal_bytes += framed.len() as u64;
        self.revision = revision;
        Ok(Saved::Appended)
    }

    /// Writes the whole state as a new base naming a new journal, then
    /// that journal, empty. A crash between the two renames leaves the new
    /// base with the old journal, which names the old base and is ignored.
    fn compact<V: AsRef<WorkloadSvid>>(
        &mut self,
        persist: &Persist,
        revision: u64,
        entries: &EntryMap,
        svids: &HashMap<EntryId, V>,
    ) -> Result<Saved, AgentError> {
        self.journal = None;
        let mut id = [0u8; 8];
        aws_lc_rs::rand::fill(&mut id)
            .map_err(|_| AgentError::Corrupt("random number generator failed".into()))?;
        // Never 0: that is "no journal" in a base.
        let journal = u64::from_le_bytes(id).max(1);
        let file = CacheFile {
            revision,
            entries: entries.values().map(|e| (**e).clone()).collect(),
            svids: svids
                .iter()
                .map(|(id, s)| SvidFile::of(id, s.as_ref()))
                .collect(),
            journal,
        };
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&file)?);
        write_private_file(&persist.path(CACHE), &json)?;
        let header = frame(&serde_json::to_vec(&JournalHeader { journal })?)?;
        write_private_file(&persist.path(JOURNAL), &header)?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .mode(0o600)
            .open(persist.path(JOURNAL))?;
        self.base_bytes = json.len() as u64;
        self.journal_bytes = header.len() as u64;
        self.journal = Some(f);
        self.revision = revision;
        Ok(Saved::Compacted)
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

    /// A new key and a one-hour leaf for it, signed by `ca` for `id`.
    fn signed(ca: &X509Authority, id: &SpiffeId, now: SystemTime) -> (PrivateKey, Vec<u8>) {
        let key = PrivateKey::generate_p256().unwrap();
        let leaf = ca
            .sign_svid(
                &SvidRequest::new(id, Duration::from_secs(3600)),
                &key.public_key_spki_der(),
                now,
            )
            .unwrap();
        (key, leaf)
    }

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
    fn a_chain_and_key_in_one_block_give_back_each_certificate_and_the_key() {
        let now = SystemTime::now();
        let root = X509Authority::generate(&td("example.org"), DAY, now).unwrap();
        let id: SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let (key, leaf) = signed(&root, &id, now);
        let certs = vec![leaf.clone(), root.cert_der().to_vec()];
        let der = SvidDer::new(&certs, &key).unwrap();
        let chain = der.chain();
        assert_eq!(chain.to_vecs(), certs);
        assert_eq!(chain.leaf(), leaf.as_slice());
        assert_eq!(chain.der(), certs.concat().as_slice());
        assert_eq!(der.key_der(), key.pkcs8_der());
        assert_eq!(der.key_pem().as_str(), key.to_pem().as_str());
        assert_eq!(der.len(), certs.concat().len() + key.pkcs8_der().len());
        let one = SvidDer::new(&certs[..1], &key).unwrap();
        assert_eq!(one.chain().to_vecs(), &certs[..1]);
        assert_eq!(one.key_der(), key.pkcs8_der());
        // The key's bytes are not in the chain's Debug.
        assert!(!format!("{der:?}").contains(&format!("{:?}", &key.pkcs8_der()[..8])));
        // A certificate whose DER header does not say where it ends (or
        // says it ends elsewhere) would not come back as it was: refused.
        let mut longer = leaf.clone();
        longer.push(0);
        for bad in [
            vec![],
            leaf[..leaf.len() - 1].to_vec(),
            longer,
            vec![0x30],
            vec![0x30, 0x80, 0, 0],
        ] {
            assert!(
                SvidDer::new(&[leaf.clone(), bad.clone()], &key).is_none(),
                "{bad:?}"
            );
        }
        assert!(SvidDer::new::<Vec<u8>>(&[], &key).is_none());
        // Short and long length forms.
        let short = vec![0x04, 0x02, 1, 2];
        let long = [vec![0x04, 0x81, 0x80], vec![7; 0x80]].concat();
        let c = SvidDer::new(&[short.clone(), long.clone()], &key).unwrap();
        assert_eq!(c.chain().to_vecs(), vec![short, long]);
        assert_eq!(c.key_der(), key.pkcs8_der());
    }

    #[test]
    fn certificate_times_are_held_exactly() {
        let e = SystemTime::UNIX_EPOCH;
        for t in [
            e,
            e + Duration::from_secs(1_700_000_000),
            e - Duration::from_secs(86_400),
            // GeneralizedTime's last second, 9999-12-31T23:59:59Z.
            e + Duration::from_secs(253_402_300_799),
        ] {
            assert_eq!(from_unix_secs(unix_secs(t)), t);
        }
        // What a certificate's validity reads as.
        let now = SystemTime::now();
        let ca = X509Authority::generate(&td("example.org"), DAY, now).unwrap();
        let id: SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let (key, leaf) = signed(&ca, &id, now);
        let info = sigil_svid::x509::cert_info(&leaf).unwrap();
        let s = WorkloadSvid::new(
            id,
            SvidDer::new(&[leaf], &key).unwrap(),
            (info.not_before, info.not_after),
            None,
            0,
        );
        assert_eq!(
            (s.not_before(), s.not_after()),
            (info.not_before, info.not_after)
        );
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
        let (key, leaf) = signed(&ca, &spiffe_id, now);
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
        assert!(cached.svids[0].svid.fits(&entry));
        assert!(p.load_federated(&td("example.org")).unwrap().is_empty());

        // An entry that now asks for attributes needs a new SVID.
        let mut with_attrs = entry;
        with_attrs.attributes = vec![Attribute::Region];
        assert!(!cached.svids[0].svid.fits(&with_attrs));
    }

    /// An agent identity signed by `ca`.
    fn agent_identity(ca: &X509Authority) -> AgentIdentity {
        let id: SpiffeId = "spiffe://example.org/agent/node-1".parse().unwrap();
        let (key, leaf) = signed(ca, &id, SystemTime::now());
        AgentIdentity::new(vec![leaf], key).unwrap()
    }

    fn same(a: &AgentIdentity, b: &AgentIdentity) -> bool {
        a.chain == b.chain && a.key.pkcs8_der() == b.key.pkcs8_der()
    }

    /// Writes the two-file layout of older agents for `key` and `chain`.
    fn write_legacy(dir: &Path, key: &PrivateKey, chain: &[Vec<u8>]) {
        write_private_file(&dir.join(LEGACY_KEY), key.to_pem().as_bytes()).unwrap();
        let json = serde_json::json!({ "chain": chain.iter().map(|c| b64(c)).collect::<Vec<_>>() });
        write_private_file(&dir.join(LEGACY_CHAIN), json.to_string().as_bytes()).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_agent_identity_is_one_private_file_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let p = Persist::open(dir.path()).unwrap();
        assert!(p.load_identity().unwrap().is_none(), "nothing saved yet");
        let first = agent_identity(&ca);
        p.save_identity(&first).unwrap();
        assert_eq!(names(dir.path()), vec![IDENTITY.to_owned()]);
        let mode = std::fs::metadata(dir.path().join(IDENTITY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(same(&p.load_identity().unwrap().unwrap(), &first));
        let renewed = agent_identity(&ca);
        p.save_identity(&renewed).unwrap();
        assert_eq!(names(dir.path()), vec![IDENTITY.to_owned()]);
        assert!(same(&p.load_identity().unwrap().unwrap(), &renewed));
    }

    #[test]
    fn an_agent_saved_as_two_files_loads_and_is_upgraded_on_its_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let old = agent_identity(&ca);
        write_legacy(dir.path(), &old.key, &old.chain);
        let p = Persist::open(dir.path()).unwrap();
        assert!(same(&p.load_identity().unwrap().unwrap(), &old));

        let renewed = agent_identity(&ca);
        p.save_identity(&renewed).unwrap();
        assert_eq!(
            names(dir.path()),
            vec![IDENTITY.to_owned()],
            "the two files are gone once identity.json holds the identity"
        );
        assert!(same(&p.load_identity().unwrap().unwrap(), &renewed));
    }

    #[test]
    fn torn_saved_identities_never_load_as_a_mismatched_pair() {
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let (old, new) = (agent_identity(&ca), agent_identity(&ca));
        let load = |setup: &dyn Fn(&Path)| {
            let dir = tempfile::tempdir().unwrap();
            setup(dir.path());
            Persist::open(dir.path()).unwrap().load_identity().unwrap()
        };
        let identity_file = |dir: &Path, key: &PrivateKey, chain: &[Vec<u8>]| {
            let file = IdentityFile {
                key: b64(key.pkcs8_der()),
                chain: chain.iter().map(|c| b64(c)).collect(),
            };
            write_private_file(&dir.join(IDENTITY), &serde_json::to_vec(&file).unwrap()).unwrap();
        };

        // The old two-file renewal killed between its renames: the new key
        // beside the old chain. Neither pair can be rebuilt; nothing loads.
        assert!(load(&|d| write_legacy(d, &new.key, &old.chain)).is_none());
        // One of the two files missing.
        assert!(
            load(&|d| {
                write_legacy(d, &old.key, &old.chain);
                std::fs::remove_file(d.join(LEGACY_CHAIN)).unwrap();
            })
            .is_none()
        );
        assert!(
            load(&|d| {
                write_legacy(d, &old.key, &old.chain);
                std::fs::remove_file(d.join(LEGACY_KEY)).unwrap();
            })
            .is_none()
        );
        // A truncated identity.json (only possible through damage: it is
        // written to a temporary file and renamed) falls back to the older
        // layout when that is whole...
        let truncated = |d: &Path| {
            identity_file(d, &new.key, &new.chain);
            let text = std::fs::read(d.join(IDENTITY)).unwrap();
            write_private_file(&d.join(IDENTITY), &text[..text.len() / 2]).unwrap();
        };
        let got = load(&|d| {
            write_legacy(d, &old.key, &old.chain);
            truncated(d);
        })
        .unwrap();
        assert!(same(&got, &old));
        // ... and loads nothing otherwise.
        assert!(load(&truncated).is_none());
        // A key and chain that do not belong together in identity.json.
        assert!(load(&|d| identity_file(d, &new.key, &old.chain)).is_none());
        // Killed after identity.json was renamed in, before the old files
        // were removed: identity.json is the identity.
        let got = load(&|d| {
            write_legacy(d, &old.key, &old.chain);
            identity_file(d, &new.key, &new.chain);
        })
        .unwrap();
        assert!(same(&got, &new));
        // Killed before the rename: a leftover temporary file is ignored.
        let got = load(&|d| {
            identity_file(d, &old.key, &old.chain);
            write_private_file(&d.join(".identity.json.0011223344556677.tmp"), b"{\"ke").unwrap();
        })
        .unwrap();
        assert!(same(&got, &old));
    }

    #[test]
    fn a_cached_svid_whose_key_is_not_its_certificates_is_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::open(dir.path()).unwrap();
        let now = SystemTime::now();
        let ca = X509Authority::generate(&td("example.org"), DAY, now).unwrap();
        let spiffe_id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let (key, leaf) = signed(&ca, &spiffe_id, now);
        let other = PrivateKey::generate_p256().unwrap();
        let record = |k: &PrivateKey, id: &str| {
            serde_json::json!({
                "entry_id": id,
                "chain": [b64(&leaf)],
                "key": b64(k.pkcs8_der()),
                "dns_names": [],
                "ttl": 0,
            })
        };
        let doc = serde_json::json!({
            "revision": 1,
            "entries": [],
            "svids": [record(&key, "good"), record(&other, "torn")],
        });
        write_private_file(&dir.path().join("cache.json"), doc.to_string().as_bytes()).unwrap();
        let cached = p.load_cache(now).unwrap();
        let ids: Vec<String> = cached
            .svids
            .iter()
            .map(|s| s.entry_id.to_string())
            .collect();
        assert_eq!(ids, vec!["good".to_owned()]);
    }

    /// What loading must give back: revision, entries, and each SVID's
    /// entry with its certificate and key.
    type Summary = (u64, Vec<Entry>, Vec<(EntryId, Vec<u8>, Vec<u8>)>);

    /// The agent's maps as `Core` holds them, for the cache writer.
    #[derive(Default, Clone)]
    struct State {
        revision: u64,
        entries: EntryMap,
        svids: HashMap<EntryId, Arc<WorkloadSvid>>,
        /// What changed since the last save, as `Core` tracks it.
        touched: Touched,
    }

    impl State {
        fn put(&mut self, ca: &X509Authority, id: &str, revision: u64) {
            let spiffe_id: SpiffeId = format!("spiffe://example.org/w/{id}").parse().unwrap();
            let mut e = Entry::new(
                id.parse().unwrap(),
                spiffe_id.clone(),
                "spiffe://example.org/agent".parse().unwrap(),
                Selectors::parse_all(["unix:uid:1000"]).unwrap(),
            );
            e.revision = revision;
            let now = SystemTime::now();
            let (key, leaf) = signed(ca, &spiffe_id, now);
            let info = sigil_svid::x509::cert_info(&leaf).unwrap();
            self.svids.insert(
                e.id.clone(),
                Arc::new(WorkloadSvid::new(
                    spiffe_id,
                    SvidDer::new(&[leaf], &key).unwrap(),
                    (info.not_before, info.not_after),
                    None,
                    0,
                )),
            );
            self.touched.entry(&e.id);
            self.touched.svid(&e.id);
            self.entries.insert(Arc::new(e));
            self.revision = revision;
        }

        /// Replaces `id`'s SVID alone, as a renewal does.
        fn renew(&mut self, ca: &X509Authority, id: &str, revision: u64) {
            let id: EntryId = id.parse().unwrap();
            let old = self.svids[&id].clone();
            let (key, leaf) = signed(ca, &old.spiffe_id, SystemTime::now());
            let info = sigil_svid::x509::cert_info(&leaf).unwrap();
            let new = WorkloadSvid::new(
                old.spiffe_id.clone(),
                SvidDer::new(&[leaf], &key).unwrap(),
                (info.not_before, info.not_after),
                old.extras.clone(),
                old.ttl,
            );
            self.svids.insert(id.clone(), Arc::new(new));
            self.touched.svid(&id);
            self.revision = revision;
        }

        fn remove(&mut self, id: &str, revision: u64) {
            let id: EntryId = id.parse().unwrap();
            self.entries.remove(&id);
            self.svids.remove(&id);
            self.touched.entry(&id);
            self.touched.svid(&id);
            self.revision = revision;
        }

        /// Saves what the state marked as touched, as the agent does.
        fn save(&mut self, w: &mut CacheWriter, p: &Persist) -> Saved {
            let touched = std::mem::take(&mut self.touched);
            w.save_touched(p, self.revision, &self.entries, &self.svids, &touched)
                .unwrap()
        }

        fn summary(&self) -> Summary {
            let mut entries: Vec<Entry> = self.entries.values().map(|e| (**e).clone()).collect();
            entries.sort_by(|a, b| a.id.cmp(&b.id));
            let mut svids: Vec<_> = self
                .svids
                .iter()
                .map(|(id, s)| (id.clone(), s.chain().leaf().to_vec(), s.key_der().to_vec()))
                .collect();
            svids.sort();
            (self.revision, entries, svids)
        }
    }

    fn loaded(p: &Persist) -> Summary {
        let c = p.load_cache(SystemTime::now()).unwrap();
        let mut entries = c.entries;
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        let mut svids: Vec<_> = c
            .svids
            .iter()
            .map(|s| {
                (
                    s.entry_id.clone(),
                    s.svid.chain().leaf().to_vec(),
                    s.svid.key_der().to_vec(),
                )
            })
            .collect();
        svids.sort();
        (c.revision, entries, svids)
    }

    #[test]
    fn saves_append_only_the_change_and_load_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::open(dir.path()).unwrap();
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let mut w = CacheWriter::new();
        let mut st = State::default();
        for i in 0..40 {
            st.put(&ca, &format!("e{i}"), 10);
        }
        assert_eq!(st.save(&mut w, &p), Saved::Compacted);
        let base = std::fs::read(dir.path().join(CACHE)).unwrap();
        let journal_len = || std::fs::metadata(dir.path().join(JOURNAL)).unwrap().len();
        let start = journal_len();
        // Nothing changed: nothing written.
        assert_eq!(st.save(&mut w, &p), Saved::Nothing);
        // Entries taken in again as they were: nothing written either.
        st.touched.seen(&"e1".parse().unwrap());
        st.touched.seen(&"e2".parse().unwrap());
        assert_eq!(st.save(&mut w, &p), Saved::Nothing);
        assert_eq!(journal_len(), start);
        // One entry added and one removed: one small record, the base as it was.
        st.put(&ca, "new", 11);
        st.remove("e3", 11);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        let grown = journal_len() - start;
        assert!(
            grown * 10 < base.len() as u64,
            "a two-entry change appended {grown} bytes; the base of 40 is {}",
            base.len()
        );
        assert_eq!(std::fs::read(dir.path().join(CACHE)).unwrap(), base);
        // Only the revision moved: a record too, so that a restart resumes
        // from it.
        st.revision = 12;
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        assert_eq!(loaded(&p), st.summary());
        for name in [CACHE, JOURNAL] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        // A restarted agent's writer compacts on its first save (a torn
        // tail is gone after it) and continues from there.
        let mut w = CacheWriter::new();
        assert_eq!(st.save(&mut w, &p), Saved::Compacted);
        st.put(&ca, "e5", 13);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        assert_eq!(loaded(&p), st.summary());
        // An SVID replaced alone: its record holds the SVID, not the
        // entry, and loads back.
        let before = journal_len();
        st.renew(&ca, "e6", 14);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        assert_eq!(loaded(&p), st.summary());
        let svid_only = journal_len() - before;
        st.put(&ca, "e6", 15);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        let both = journal_len() - before - svid_only;
        assert!(
            svid_only < both,
            "{svid_only} bytes for the SVID alone, {both} with its entry"
        );
        st.remove("e7", 16);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        assert_eq!(loaded(&p), st.summary());
    }

    #[test]
    fn a_save_looks_only_at_the_entries_named_as_touched() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::open(dir.path()).unwrap();
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let mut w = CacheWriter::new();
        let mut st = State::default();
        for i in 0..20 {
            st.put(&ca, &format!("e{i}"), 1);
        }
        assert_eq!(st.save(&mut w, &p), Saved::Compacted);
        // Two changes, only one of them named: the record holds that one,
        // which is how the agent's saves cost in proportion to the change.
        st.put(&ca, "named", 2);
        st.put(&ca, "unnamed", 2);
        st.touched.unmark(&"unnamed".parse::<EntryId>().unwrap());
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        let (_, entries, _) = loaded(&p);
        let ids: Vec<String> = entries.iter().map(|e| e.id.to_string()).collect();
        assert!(ids.contains(&"named".to_owned()), "{ids:?}");
        assert!(!ids.contains(&"unnamed".to_owned()), "{ids:?}");
        // A deletion named as touched is recorded as one.
        st.remove("e4", 3);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        let (_, entries, svids) = loaded(&p);
        assert!(entries.iter().all(|e| e.id.as_str() != "e4"));
        assert!(svids.iter().all(|(id, _, _)| id.as_str() != "e4"));
    }

    #[test]
    fn the_journal_is_compacted_once_it_outgrows_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::open(dir.path()).unwrap();
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let mut w = CacheWriter::new();
        let mut st = State::default();
        assert_eq!(st.save(&mut w, &p), Saved::Compacted);
        let mut saves = Vec::new();
        for i in 0..150u64 {
            st.put(&ca, &format!("e{i}"), i + 1);
            saves.push(st.save(&mut w, &p));
            if i % 10 == 9 {
                assert_eq!(loaded(&p), st.summary(), "after save {i}");
            }
        }
        assert!(saves.contains(&Saved::Compacted), "{saves:?}");
        let base = std::fs::metadata(dir.path().join(CACHE)).unwrap().len();
        let journal = std::fs::metadata(dir.path().join(JOURNAL)).unwrap().len();
        assert!(journal <= base.max(JOURNAL_MIN), "{journal} > {base}");
    }

    #[test]
    fn a_torn_last_journal_record_loads_the_state_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::open(dir.path()).unwrap();
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let mut w = CacheWriter::new();
        let mut st = State::default();
        st.put(&ca, "a", 1);
        st.put(&ca, "b", 1);
        assert_eq!(st.save(&mut w, &p), Saved::Compacted);
        st.put(&ca, "c", 2);
        st.remove("a", 2);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        let before = st.summary();
        let journal_path = dir.path().join(JOURNAL);
        let last_start = std::fs::metadata(&journal_path).unwrap().len() as usize;
        // The last record: an SVID replaced, an entry removed, one added.
        st.put(&ca, "b", 3);
        st.remove("c", 3);
        st.put(&ca, "d", 3);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        let after = st.summary();
        assert_ne!(before, after);
        let whole = std::fs::read(&journal_path).unwrap();
        assert!(whole.len() > last_start + RECORD_HEADER);
        for cut in last_start..whole.len() {
            write_private_file(&journal_path, &whole[..cut]).unwrap();
            assert_eq!(
                loaded(&p),
                before,
                "journal cut at {cut} of {}",
                whole.len()
            );
        }
        // Damage inside the record (not only a short file) is caught too.
        for at in [last_start, last_start + 5, whole.len() - 1] {
            let mut bad = whole.clone();
            bad[at] ^= 0x40;
            write_private_file(&journal_path, &bad).unwrap();
            assert_eq!(loaded(&p), before, "byte {at} flipped");
        }
        write_private_file(&journal_path, &whole).unwrap();
        assert_eq!(loaded(&p), after);
    }

    #[test]
    fn a_journal_left_from_an_interrupted_compaction_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::open(dir.path()).unwrap();
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let mut w = CacheWriter::new();
        let mut st = State::default();
        st.put(&ca, "a", 1);
        st.save(&mut w, &p);
        st.put(&ca, "b", 2);
        assert_eq!(st.save(&mut w, &p), Saved::Appended);
        let old_journal = std::fs::read(dir.path().join(JOURNAL)).unwrap();
        // A new base is written (its first save compacts), then the agent
        // dies before the new journal replaces the old one.
        st.remove("b", 3);
        st.remove("a", 3);
        st.put(&ca, "c", 3);
        assert_eq!(st.save(&mut CacheWriter::new(), &p), Saved::Compacted);
        write_private_file(&dir.path().join(JOURNAL), &old_journal).unwrap();
        // The old journal would add back "b" and "a"; it is not replayed.
        assert_eq!(loaded(&p), st.summary());
    }

    #[test]
    fn a_journal_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::open(dir.path()).unwrap();
        let ca = X509Authority::generate(&td("example.org"), DAY, SystemTime::now()).unwrap();
        let mut w = CacheWriter::new();
        let mut st = State::default();
        st.put(&ca, "a", 1);
        st.save(&mut w, &p);
        std::fs::set_permissions(
            dir.path().join(JOURNAL),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(p.load_cache(SystemTime::now()).is_err());
    }
}
