//! The agent's one stateful task: it owns the agent SVID, the entries and the
//! workload SVIDs, follows the server's push sync, signs and renews, and
//! publishes every change as a new [`Snapshot`] over a `watch` channel that
//! the Workload API streams wait on.
//!
//! While the server is unreachable it keeps serving the last SVIDs until
//! they expire and retries with jittered exponential backoff.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sigil_proto::convert::entry_with_id_from_proto;
use sigil_proto::server::v1 as pb;
use sigil_svid::bundle::Bundle;
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::RotatingCert;
use sigil_types::{Entry, EntryId, Selectors, SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::AgentError;
use crate::config::AgentConfig;
use crate::demand::Demand;
use crate::persist::{
    AgentIdentity, CacheWriter, CachedState, CachedSvid, EntryMap, Persist, SvidDer, SvidExtras,
    Touched, WorkloadSvid,
};
use crate::schedule::{Deadlines, Timed, Timeline};
use crate::selector_index::SelectorIndex;
use crate::server_api::{ServerClient, SyncStream};
use crate::time::Clock;

#[cfg(test)]
mod memory;

/// Most CSRs sent in one signing request.
const CSR_BATCH: usize = 500;

/// CSRs in the first request of a signing round (apart from entries a
/// caller waits for); each later request holds twice as many as the one
/// before, up to [`CSR_BATCH`]. Small first requests put the first SVIDs
/// before the callers within milliseconds of a start with thousands due;
/// growing ones keep the number of requests near that of full batches.
const FIRST_BATCH: usize = 16;

/// Federated bundles by trust domain; never holds the agent's own.
pub type FederatedBundles = BTreeMap<TrustDomain, Arc<Bundle>>;

/// Authorities the server tainted (after a key compromise): still trusted,
/// but what they signed is replaced at once and cached JWT-SVIDs they signed
/// are not served again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tainted {
    /// X.509 CAs, by the lowercase hex SHA-256 of the certificate DER.
    pub x509: BTreeSet<String>,
    /// JWT signing keys, by key ID.
    pub jwt_kids: BTreeSet<String>,
}

/// The entries of a [`Snapshot`]. A persistent map, as is [`Svids`]: a
/// new snapshot shares everything that did not change with the one before,
/// so that publishing one costs in proportion to the change, not to the
/// entries held. The entries are held only in an index by selector, as
/// persistent, through which [`Entries::matching`] finds a caller's
/// entries oldest first (by creation time, then ID): the order in which the
/// Workload API lists a caller's identities, the first being its default.
/// No second map orders every entry by age: only a caller's few are ever
/// listed in that order (docs/benchmarks.md, "Agent memory per cached
/// SVID").
#[derive(Debug, Clone, Default)]
pub struct Entries {
    index: SelectorIndex,
    len: usize,
}

impl Entries {
    /// The entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> + '_ {
        self.index.iter()
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries whose selectors the caller's `selectors` satisfy (every
    /// one of the entry's is among them), oldest first: through the
    /// selector index, in proportion to the entries filed under the
    /// caller's selectors.
    pub fn matching(&self, selectors: &Selectors) -> Vec<Arc<Entry>> {
        self.index.matching(selectors)
    }

    /// The same answer as [`Entries::matching`] by a pass over every entry:
    /// the reference the index is tested and benchmarked against.
    pub fn matching_by_scan(&self, selectors: &Selectors) -> Vec<Arc<Entry>> {
        let mut found: Vec<Arc<Entry>> = self
            .iter()
            .filter(|e| e.selectors.is_subset_of(selectors))
            .cloned()
            .collect();
        found.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        found
    }

    /// Holds `e`, which must not be held already: an entry that changed
    /// is [`Entries::remove`]d first, as it was held.
    pub(crate) fn insert(&mut self, e: Arc<Entry>) {
        let key = (e.created_at, e.id.clone());
        self.index.insert(key, e);
        self.len += 1;
    }

    /// Drops `e`, as held (its creation time, ID and selectors).
    pub(crate) fn remove(&mut self, e: &Entry) {
        let key = (e.created_at, e.id.clone());
        if self.index.remove(&key, &e.selectors) {
            self.len -= 1;
        }
    }

    #[cfg(test)]
    pub(crate) fn index(&self) -> &SelectorIndex {
        &self.index
    }
}

impl FromIterator<Arc<Entry>> for Entries {
    fn from_iter<I: IntoIterator<Item = Arc<Entry>>>(iter: I) -> Self {
        let mut entries = Self::default();
        for e in iter {
            entries.insert(e);
        }
        entries
    }
}

/// Valid SVIDs by entry (a persistent map; see [`Entries`]).
pub type Svids = imbl::HashMap<EntryId, Arc<WorkloadSvid>>;

/// What the Workload API serves from: entries, their SVIDs and the bundles.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Every entry this agent holds.
    pub entries: Entries,
    /// Valid SVIDs by entry, each fitting its entry in `entries` (SPIFFE
    /// ID, DNS names, TTL, attributes) and not expired; an entry whose SVID
    /// does not fit has none here until it is signed again.
    pub svids: Svids,
    /// The trust bundle.
    pub bundle: Arc<Bundle>,
    /// Bundles of foreign trust domains, served to workloads whose entries
    /// federate with them.
    pub federated: Arc<FederatedBundles>,
    /// Whether the agent is connected to the server now.
    pub connected: bool,
    /// The authorities the server tainted.
    pub tainted: Arc<Tainted>,
}

pub(crate) struct Core<S> {
    pub(crate) cfg: AgentConfig,
    pub(crate) persist: Persist,
    /// Saves entries and SVIDs as changes to what it saved before.
    pub(crate) cache: CacheWriter,
    pub(crate) trust: Arc<ArcSwap<Bundle>>,
    pub(crate) federated: Arc<FederatedBundles>,
    pub(crate) identity: AgentIdentity,
    pub(crate) identity_renew_at: SystemTime,
    pub(crate) cert: Arc<RotatingCert>,
    /// The server, behind the trait the core asks it through.
    pub(crate) server: S,
    pub(crate) entries: EntryMap,
    pub(crate) revision: u64,
    /// The SVIDs held, each with when it is to be renewed.
    pub(crate) svids: Timeline<EntryId, Arc<WorkloadSvid>>,
    /// The SVIDs in `svids` that have not expired yet, by when they
    /// expire (each one's `not_after`, read from `svids` to take it out);
    /// taken out as they expire (which changes what is served).
    pub(crate) expires: Deadlines<EntryId>,
    /// Entries that need an SVID whatever the time: new, changed so that
    /// their SVID no longer fits, or refused by the server so far.
    pub(crate) unsigned: BTreeSet<EntryId>,
    /// Entries whose entry or SVID changed since the cache was last saved
    /// (what the next save writes), and those taken in again unchanged.
    pub(crate) touched: Touched,
    /// The entries the next snapshot holds, kept up to date per change.
    pub(crate) served_entries: Entries,
    /// The SVIDs the next snapshot holds: those that fit their entry and
    /// have not expired (are still in `expires`), kept up to date per change.
    pub(crate) served_svids: Svids,
    pub(crate) snapshot: watch::Sender<Arc<Snapshot>>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) dirty: bool,
    /// When signing may be tried again after a failure or a refusal.
    pub(crate) sign_retry_at: Option<tokio::time::Instant>,
    /// The wall clock certificate times are read against (see [`crate::time`]).
    pub(crate) clock: Clock,
    pub(crate) tainted: Arc<Tainted>,
    /// What the Workload API and SDS callers ask for.
    pub(crate) demand: Demand,
    /// Entries a caller asked for that have no SVID served: signed first.
    pub(crate) wanted: BTreeSet<EntryId>,
    /// When each entry was last asked for, as a count of
    /// [`Core::take_demand`] calls that found something asked.
    pub(crate) asked_at: HashMap<EntryId, u64>,
    pub(crate) ask_count: u64,
    /// The entries with an SVID held, least recently asked for first
    /// (never asked: 0): the order in which the bound on SVIDs held
    /// (`x509_svid_cache_max_size`) drops them. Kept, with `asked_at`, only
    /// under a bound: without one nothing reads them.
    pub(crate) by_asked: BTreeSet<(u64, EntryId)>,
    /// Whether SVIDs were held or asked for since [`Core::enforce_bound`]
    /// last looked.
    pub(crate) bound_check: bool,
    /// The parent ID of the last entry taken in (see [`Core::share_parent`]).
    pub(crate) last_parent: Option<SpiffeId>,
    /// Entries and SVIDs saved since the allocator last gave memory back
    /// (see [`crate::trim`]).
    pub(crate) churn: usize,
}

/// An SVID as the core holds it, beside its renewal time: what the cache
/// writer saves.
impl AsRef<WorkloadSvid> for Timed<Arc<WorkloadSvid>> {
    fn as_ref(&self) -> &WorkloadSvid {
        &self.value
    }
}

/// What a [`Core`] starts from: its configuration, its data directory, the
/// agent SVID and the trust it holds, and the handles it shares with the
/// rest of the agent.
pub(crate) struct CoreParts<S> {
    pub(crate) cfg: AgentConfig,
    pub(crate) persist: Persist,
    pub(crate) identity: AgentIdentity,
    /// The trust bundle, read by the TLS verifier at every handshake.
    pub(crate) trust: Arc<ArcSwap<Bundle>>,
    pub(crate) federated: Arc<FederatedBundles>,
    /// The agent SVID as presented in TLS handshakes.
    pub(crate) cert: Arc<RotatingCert>,
    pub(crate) server: S,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

impl<S: ServerClient> Core<S> {
    /// A core holding no entries or SVIDs yet, and the receiving end of the
    /// snapshots it publishes (the first one holds only the bundles).
    pub(crate) fn new(parts: CoreParts<S>) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (snapshot, snapshots) = watch::channel(Arc::new(Snapshot {
            entries: Default::default(),
            svids: Default::default(),
            bundle: parts.trust.load_full(),
            federated: parts.federated.clone(),
            connected: false,
            tainted: Default::default(),
        }));
        let core = Core {
            persist: parts.persist,
            cache: CacheWriter::new(),
            trust: parts.trust,
            federated: parts.federated,
            identity_renew_at: renewal_time(parts.identity.not_before, parts.identity.not_after),
            cert: parts.cert,
            server: parts.server,
            entries: EntryMap::default(),
            revision: 0,
            svids: Timeline::default(),
            expires: Default::default(),
            unsigned: Default::default(),
            touched: Default::default(),
            served_entries: Default::default(),
            served_svids: Default::default(),
            snapshot,
            metrics: parts.metrics,
            dirty: false,
            sign_retry_at: None,
            clock: Clock::system(),
            tainted: Default::default(),
            demand: Demand::default(),
            wanted: Default::default(),
            asked_at: Default::default(),
            ask_count: 0,
            by_asked: Default::default(),
            bound_check: true,
            last_parent: None,
            churn: 0,
            identity: parts.identity,
            cfg: parts.cfg,
        };
        (core, snapshots)
    }

    /// The JWT-SVIDs of this agent, fetched through the core's server
    /// client (the Workload API serves them).
    pub(crate) fn jwt_svids(&self) -> crate::jwt::JwtSvids
    where
        S: Clone,
    {
        crate::jwt::JwtSvids::new(self.server.clone(), self.metrics.clone())
    }

    /// Takes the entries and SVIDs saved before (an SVID only with its
    /// entry) and schedules them, so they are served before the server is
    /// contacted.
    pub(crate) fn restore(&mut self, cached: CachedState) {
        self.revision = cached.revision;
        let mut entries = EntryMap::with_capacity(cached.entries.len());
        for mut e in cached.entries {
            self.share_parent(&mut e);
            entries.insert(Arc::new(e));
        }
        self.entries = entries;
        for CachedSvid {
            entry_id,
            svid: mut s,
        } in cached.svids
        {
            if let Some((id, e)) = self.entries.get_key_value(&entry_id) {
                // The entry's own ID text, shared by every map keyed by it,
                // and its SPIFFE ID's when they are the same.
                if s.spiffe_id == e.spiffe_id {
                    s.spiffe_id = e.spiffe_id.clone();
                }
                // Scheduled by `reschedule_all` below.
                self.svids
                    .insert(id.clone(), Arc::new(s), SystemTime::UNIX_EPOCH);
            }
        }
        self.reschedule_all();
    }
}

/// Half of the lifetime, plus or minus up to 10% of it: when to renew. The
/// lifetime counts from issuance: `notBefore` is backdated for clock skew,
/// which would otherwise pull renewal of short-lived SVIDs into the past.
pub(crate) fn renewal_time(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let not_before = (not_before + sigil_svid::x509::BACKDATE).min(not_after);
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let mut r = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut r);
    // jitter in [-0.1, 0.1] of the lifetime
    let frac = (u16::from_le_bytes(r) as f64 / u16::MAX as f64) * 0.2 - 0.1;
    let offset = life.as_secs_f64() * (0.5 + frac);
    not_before + Duration::from_secs_f64(offset.max(0.0))
}

/// When to renew an SVID this agent has just received: at [`renewal_time`],
/// but never sooner, by this host's clock, than the same share of its
/// lifetime from now. On a host whose clock runs ahead of the server's by
/// more than half a lifetime, every new SVID would otherwise be due the
/// moment it arrives, and the agent would ask for the next one in a loop
/// (every entry, every 10 ms) against the server.
pub(crate) fn renewal_after_receipt(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
) -> SystemTime {
    let at = renewal_time(not_before, not_after);
    let issued = (not_before + sigil_svid::x509::BACKDATE).min(not_after);
    let share = at.duration_since(issued).unwrap_or_default();
    at.max(now + share)
}

impl<S: ServerClient> Core<S> {
    /// Sends the Workload API a new snapshot. Entries and SVIDs are
    /// persistent maps kept up to date per change, so this costs the same
    /// whatever the agent holds.
    pub(crate) fn publish(&mut self) {
        let connected = self.server.is_connected();
        let snap = Snapshot {
            entries: self.served_entries.clone(),
            svids: self.served_svids.clone(),
            bundle: self.trust.load_full(),
            federated: self.federated.clone(),
            connected,
            tainted: self.tainted.clone(),
        };
        self.metrics.cached_svids.set(snap.svids.len() as i64);
        self.metrics.connected.set(i64::from(connected));
        self.metrics
            .federated_bundles
            .set(snap.federated.len() as i64);
        self.snapshot.send_replace(Arc::new(snap));
    }

    fn persist_cache(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        self.churn += touched.len();
        let r = self.cache.save_touched(
            &self.persist,
            self.revision,
            &self.entries,
            self.svids.map(),
            &touched,
        );
        if let Err(e) = r {
            tracing::error!(error = %e, "saving the SVID cache failed");
        }
    }

    /// Opens a sync stream: resuming a broken snapshot `pages` staged, else
    /// from the last revision applied, else (nothing applied, or more
    /// entries held than a request can name) asking for a snapshot. True
    /// with the stream when it resumes the staged snapshot.
    async fn open_stream(
        &mut self,
        pages: &mut crate::paging::Assembler,
    ) -> Result<(SyncStream, bool), AgentError> {
        if let Some(req) = pages.resume_request() {
            return Ok((self.server.open_sync(req).await?, true));
        }
        let resume = self.revision > 0
            && crate::paging::known_ids_fit(self.entries.keys().map(EntryId::as_str));
        let req = pb::SyncRequest {
            revision: if resume { self.revision } else { 0 },
            known_entry_ids: if resume {
                self.entries.keys().map(|k| k.to_string()).collect()
            } else {
                vec![]
            },
        };
        Ok((self.server.open_sync(req).await?, false))
    }

    /// Applies one whole update from the server. Its cost is in proportion
    /// to what the update carries; only a snapshot (sent when the agent
    /// connects without a usable revision) looks at every entry held.
    fn apply(&mut self, m: pb::SyncMessage) {
        let held_before: Option<EntryMap> = m.snapshot.then(|| {
            self.served_entries = Entries::default();
            std::mem::take(&mut self.entries)
        });
        for e in &m.upserted {
            let Ok(id) = e.id.parse::<EntryId>() else {
                tracing::warn!(id = %e.id, "ignoring an entry without a valid ID");
                continue;
            };
            match entry_with_id_from_proto(e, id) {
                Ok(mut entry) => {
                    self.share_parent(&mut entry);
                    let before = held_before.as_ref().and_then(|h| h.get(&entry.id)).cloned();
                    self.upsert(Arc::new(entry), before.as_deref())
                }
                Err(err) => tracing::warn!(error = %err, "ignoring an entry the server sent"),
            }
        }
        for id in held_before.into_iter().flat_map(EntryMap::into_keys) {
            if !self.entries.contains_key(&id) {
                // Not in the snapshot's entries, which start empty.
                self.touched.entry(&id);
                self.forget(&id, None);
            }
        }
        for id in &m.deleted_ids {
            if let Ok(id) = id.parse::<EntryId>() {
                let old = self.entries.remove(&id);
                self.forget(&id, old.as_deref());
            }
        }
        if !m.bundle_json.is_empty() {
            match Bundle::from_json(self.cfg.trust_domain.clone(), &m.bundle_json) {
                Ok(b) => {
                    if *self.trust.load_full() != b {
                        if let Err(e) = self.persist.save_bundle(&b) {
                            tracing::error!(error = %e, "saving the bundle failed");
                        }
                        self.trust.store(Arc::new(b));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed bundle from the server"),
            }
        }
        if m.federated_bundles_changed {
            self.apply_federated(&m.federated_bundles);
        }
        if m.tainted_changed {
            self.apply_tainted(&m.tainted_x509_authorities, &m.tainted_jwt_kids);
        }
        self.revision = m.revision;
        self.dirty = true;
        tracing::debug!(
            entries = self.entries.len(),
            revision = self.revision,
            "sync applied"
        );
    }

    /// Makes `e`'s parent ID the text of the last entry's parent when they
    /// are the same ID: the entries of an agent are nearly all under the
    /// agent itself or a few node aliases, and each would otherwise hold
    /// its own copy.
    fn share_parent(&mut self, e: &mut Entry) {
        match &self.last_parent {
            Some(p) if *p == e.parent_id => e.parent_id = p.clone(),
            _ => self.last_parent = Some(e.parent_id.clone()),
        }
    }

    /// Holds `entry` (new or changed); it needs a new SVID when the one it
    /// has no longer fits it. `before` is the entry as held before a
    /// snapshot emptied `entries`, to tell the cache whether it changed.
    fn upsert(&mut self, entry: Arc<Entry>, before: Option<&Entry>) {
        let id = entry.id.clone();
        let held = self.entries.get(&id).map(|e| &**e).or(before);
        if held.is_none_or(|old| *old != *entry) {
            self.touched.entry(&id);
        } else {
            self.touched.seen(&id);
        }
        match self.svids.get(&id) {
            Some(s) if s.fits(&entry) => {
                // Changed back to what its SVID was signed for, or in
                // what the SVID does not hold (selectors, say).
                self.unsigned.remove(&id);
                if self.expires.contains(s.not_after(), id.clone()) {
                    self.served_svids.insert(id.clone(), s.clone());
                }
            }
            // Only an SVID that fits its entry as the entry is now is
            // served: after an entry's SPIFFE ID, DNS names, TTL or
            // attributes change, the old SVID would otherwise reach every
            // caller matching the entry's (possibly new) selectors until the
            // new one is signed, and longer if signing fails.
            _ => {
                self.unsigned.insert(id.clone());
                self.served_svids.remove(&id);
            }
        }
        if let Some(old) = self.entries.insert(entry.clone()) {
            self.served_entries.remove(&old);
        }
        self.served_entries.insert(entry);
    }

    /// Drops the SVID and every schedule of an entry no longer held
    /// (already removed from `entries`; `old` is what it was, if the
    /// caller still has it).
    fn forget(&mut self, id: &EntryId, old: Option<&Entry>) {
        if let Some(old) = old {
            self.served_entries.remove(old);
            self.touched.entry(id);
        }
        self.served_svids.remove(id);
        if let Some(old) = self.svids.remove(id) {
            self.expires.remove(old.not_after(), id.clone());
            self.touched.svid(id);
        }
        self.unsigned.remove(id);
        self.wanted.remove(id);
        let asked = self.asked_at.remove(id).unwrap_or(0);
        self.by_asked.remove(&(asked, id.clone()));
    }

    /// The entry's key in [`Core::by_asked`].
    fn asked_key(&self, id: &EntryId) -> (u64, EntryId) {
        (self.asked_at.get(id).copied().unwrap_or(0), id.clone())
    }

    /// Takes what callers asked for since the last call: the entries
    /// become the most recently asked, and those without an SVID served
    /// are signed first.
    pub(crate) fn take_demand(&mut self) {
        let asked = self.demand.take_asked();
        if asked.is_empty() {
            return;
        }
        self.bound_check = true;
        self.ask_count += 1;
        let bounded = self.has_bound();
        for id in asked {
            if !self.entries.contains_key(&id) {
                continue;
            }
            if bounded {
                if self.svids.contains_key(&id) {
                    self.by_asked.remove(&self.asked_key(&id));
                    self.by_asked.insert((self.ask_count, id.clone()));
                }
                self.asked_at.insert(id.clone(), self.ask_count);
            }
            if !self.served_svids.contains_key(&id) {
                self.wanted.insert(id);
            }
        }
    }

    /// Whether a bound on SVIDs held is set (`x509_svid_cache_max_size`):
    /// only then is the order in which callers asked for them kept.
    fn has_bound(&self) -> bool {
        self.cfg.x509_svid_cache_max_size > 0
    }

    /// Whether SVIDs are bounded now: a bound is set and the entries
    /// outnumber it. Otherwise every entry's SVID is held.
    fn bounded(&self) -> bool {
        let bound = self.cfg.x509_svid_cache_max_size;
        bound > 0 && self.entries.len() > bound
    }

    /// Drops the least recently asked SVIDs that no open stream matches
    /// until at most `x509_svid_cache_max_size` such (idle) SVIDs are held;
    /// their entries are signed again when a caller asks. Dropped SVIDs
    /// leave the cache file too.
    fn enforce_bound(&mut self) {
        let bound = self.cfg.x509_svid_cache_max_size;
        if bound == 0 || self.svids.len() <= bound || !std::mem::take(&mut self.bound_check) {
            return;
        }
        let open: std::collections::HashSet<EntryId> = self
            .demand
            .open()
            .into_iter()
            .filter(|id| self.svids.contains_key(id))
            .collect();
        let idle = self.svids.len() - open.len();
        if idle <= bound {
            return;
        }
        let evict: Vec<(u64, EntryId)> = self
            .by_asked
            .iter()
            .filter(|(_, id)| !open.contains(id))
            .take(idle - bound)
            .cloned()
            .collect();
        self.metrics.svids_evicted.inc_by(evict.len() as u64);
        for key in evict {
            let id = &key.1;
            self.by_asked.remove(&key);
            if let Some(old) = self.svids.remove(id) {
                self.expires.remove(old.not_after(), id.clone());
            }
            self.served_svids.remove(id);
            self.unsigned.insert(id.clone());
            self.touched.svid(id);
        }
        self.dirty = true;
    }

    /// Holds `svid` as the SVID of entry `id`, due for renewal at `renew`,
    /// and serves it if it fits the entry.
    fn hold_svid(&mut self, id: EntryId, svid: WorkloadSvid, renew: SystemTime) {
        let svid = Arc::new(svid);
        if let Some(old) = self.svids.get(&id) {
            self.expires.remove(old.not_after(), id.clone());
        }
        self.expires.insert(svid.not_after(), id.clone());
        self.touched.svid(&id);
        if self.has_bound() {
            self.by_asked.insert(self.asked_key(&id));
        }
        self.bound_check = true;
        match self.entries.get(&id) {
            Some(e) if svid.fits(e) => {
                self.unsigned.remove(&id);
                self.wanted.remove(&id);
                self.served_svids.insert(id.clone(), svid.clone());
            }
            // Signed for the entry as it was before a change.
            Some(_) => {
                self.unsigned.insert(id.clone());
                self.served_svids.remove(&id);
            }
            None => {
                self.served_svids.remove(&id);
            }
        }
        self.svids.insert(id, svid, renew);
    }

    /// Stops serving the SVIDs that expired by `now`; true if any did.
    fn expire(&mut self, now: SystemTime) -> bool {
        let expired = self.expires.take_due(now);
        for id in &expired {
            self.served_svids.remove(id);
        }
        !expired.is_empty()
    }

    /// Rebuilds every schedule from the entries and SVIDs held (at start,
    /// from the saved cache).
    pub(crate) fn reschedule_all(&mut self) {
        let now = self.clock.wall();
        self.svids.retain(|id, _| self.entries.contains_key(id));
        self.svids
            .reschedule(|_, s| renewal_time(s.not_before(), s.not_after()));
        self.expires.clear();
        self.unsigned.clear();
        self.served_svids = Svids::default();
        self.served_entries = self.entries.values().cloned().collect();
        self.by_asked = if self.has_bound() {
            self.svids.keys().map(|id| self.asked_key(id)).collect()
        } else {
            BTreeSet::new()
        };
        for (id, s) in self.svids.iter() {
            if s.not_after() > now {
                self.expires.insert(s.not_after(), id.clone());
            }
        }
        for e in self.entries.values() {
            let id = &e.id;
            match self.svids.get(id) {
                Some(s) if s.fits(e) => {
                    if s.not_after() > now {
                        self.served_svids.insert(id.clone(), s.clone());
                    }
                }
                _ => {
                    self.unsigned.insert(id.clone());
                }
            }
        }
    }

    /// Takes the server's complete set of tainted authorities; when it
    /// changed, everything signed by a tainted CA is renewed at once.
    fn apply_tainted(&mut self, x509: &[String], jwt_kids: &[String]) {
        let next = Tainted {
            x509: x509.iter().cloned().collect(),
            jwt_kids: jwt_kids.iter().cloned().collect(),
        };
        if next == *self.tainted {
            return;
        }
        if !next.x509.is_empty() || !next.jwt_kids.is_empty() {
            tracing::warn!(
                x509 = ?next.x509,
                jwt_kids = ?next.jwt_kids,
                "the server tainted signing authorities; replacing what they signed"
            );
        }
        self.tainted = Arc::new(next);
        self.renew_tainted(self.clock.wall());
        self.dirty = true;
    }

    /// Makes the workload SVIDs and the agent SVID that a tainted CA signed
    /// due for renewal now. The chains are leaf-only, so a leaf counts as
    /// signed by a tainted CA when it verifies against that CA alone.
    fn renew_tainted(&mut self, now: SystemTime) {
        let roots: Vec<Vec<u8>> = self
            .trust
            .load()
            .x509_authorities
            .iter()
            .filter(|c| self.tainted.x509.contains(&sigil_svid::x509::sha256_hex(c)))
            .cloned()
            .collect();
        if roots.is_empty() {
            return;
        }
        let tainted = |chain: &[Vec<u8>]| sigil_svid::x509::verify_svid(chain, &roots, now).is_ok();
        let due: Vec<EntryId> = self
            .svids
            .iter()
            .filter(|(_, svid)| tainted(&svid.chain().to_vecs()))
            .map(|(id, _)| id.clone())
            .collect();
        let mut renew = due.len();
        for id in &due {
            self.svids.set_time(id, now);
        }
        if tainted(&self.identity.chain) {
            self.identity_renew_at = now;
            renew += 1;
        }
        if renew > 0 {
            self.sign_retry_at = None;
            tracing::warn!(
                svids = renew,
                "renewing SVIDs signed by a tainted authority"
            );
        }
    }

    /// Replaces the federated bundles with the server's complete set (see
    /// [`merge_federated`]), saving and publishing them when they changed.
    fn apply_federated(&mut self, sent: &HashMap<String, String>) {
        let next = merge_federated(&self.cfg.trust_domain, &self.federated, sent);
        if next == *self.federated {
            return;
        }
        tracing::info!(
            trust_domains = ?next.keys().map(ToString::to_string).collect::<Vec<_>>(),
            "federated bundles changed"
        );
        if let Err(e) = self
            .persist
            .save_federated(next.values().map(|b| b.as_ref()))
        {
            tracing::error!(error = %e, "saving the federated bundles failed");
        }
        self.federated = Arc::new(next);
        self.dirty = true;
    }

    /// Renews the agent SVID when due; returns whether the connection must be
    /// rebuilt to present the new one.
    async fn maintain_identity(&mut self, now: SystemTime) -> bool {
        if now < self.identity_renew_at {
            return false;
        }
        if !self.server.is_connected() {
            return false;
        }
        let result = async {
            let key = PrivateKey::generate_p256()?;
            let csr = sigil_svid::x509::make_csr(&key)?;
            let chain = self.server.renew_agent(csr).await?;
            AgentIdentity::new(chain, key)
        }
        .await;
        match result {
            Ok(identity) => self.install_identity(identity),
            Err(e) => {
                tracing::warn!(error = %e, "agent SVID renewal failed; will retry");
                self.identity_renew_at = now + self.cfg.min_backoff.max(Duration::from_secs(1));
                false
            }
        }
    }

    /// Presents `identity` from now on and saves it; false if it cannot be
    /// used (its key does not match its certificate).
    fn install_identity(&mut self, identity: AgentIdentity) -> bool {
        // Saved before it is presented: once the server has seen the new
        // SVID it retires the old one, so a kill after a handshake with the
        // new SVID but before the save would leave a retired SVID on disk.
        if let Err(e) = self.persist.save_identity(&identity) {
            tracing::error!(error = %e, "saving the renewed agent SVID failed");
        }
        if let Err(e) = self.cert.update(identity.chain.clone(), &identity.key) {
            tracing::error!(error = %e, "installing the renewed agent SVID failed");
            return false;
        }
        self.identity_renew_at =
            renewal_after_receipt(self.clock.wall(), identity.not_before, identity.not_after);
        tracing::info!(agent = %identity.id, "agent SVID renewed");
        self.identity = identity;
        true
    }

    /// Attests again with the projected service-account token, over a
    /// connection without a client certificate (the current SVID is
    /// refused or expired); true if the agent holds a new SVID. False at
    /// once for agents without `[agent.k8s_psat]`.
    async fn reattest_psat(&mut self) -> bool {
        match self.server.reattest().await {
            Ok(Some(identity)) => {
                tracing::info!(agent = %identity.id, "attested again with the service-account token");
                self.install_identity(identity)
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "attesting again with the service-account token failed");
                false
            }
        }
    }

    /// The entries that need an SVID at `now`, those a caller asked for
    /// first: those that have none, whose SVID no longer fits the entry,
    /// or whose SVID is due for renewal. Only what is due is looked at, not
    /// every entry held. While SVIDs are bounded (see [`Core::bounded`]),
    /// an entry without an SVID is due only when a caller asked for it or
    /// while fewer SVIDs than the bound are held.
    fn due(&self, now: SystemTime) -> Vec<EntryId> {
        let unsigned: Box<dyn Iterator<Item = &EntryId> + '_> = if self.bounded() {
            let room = self
                .cfg
                .x509_svid_cache_max_size
                .saturating_sub(self.svids.len());
            Box::new(self.unsigned.iter().take(room))
        } else {
            Box::new(self.unsigned.iter())
        };
        let wanted = self
            .wanted
            .iter()
            .filter(|id| !self.served_svids.contains_key(*id));
        let mut seen = std::collections::HashSet::new();
        wanted
            .chain(self.svids.due(now))
            .chain(unsigned)
            .filter(|id| self.entries.contains_key(id) && seen.insert(*id))
            .cloned()
            .collect()
    }

    /// The entries to sign for now (see [`Core::due`]), unless signing
    /// waits for its retry deadline: the choice, apart from the doing.
    fn to_sign(&self, now: SystemTime, at: tokio::time::Instant) -> Vec<EntryId> {
        if self.sign_retry_at.is_some_and(|t| at < t) {
            return Vec::new();
        }
        self.due(now)
    }

    /// Starts a signing round for the entries due (see [`Core::due`]),
    /// unless one is in flight. The requests run in their own task, one at
    /// a time, so that the core keeps reading the sync stream while the
    /// server signs; each answer comes back to [`Core::on_signed`], which
    /// sends the next request: entries a caller asked for meanwhile first,
    /// then the rest of the round, in requests growing from
    /// [`FIRST_BATCH`] to [`CSR_BATCH`] CSRs.
    fn start_signing(&mut self, now: SystemTime, at: tokio::time::Instant) -> Option<Signing>
    where
        S: Clone,
    {
        if !self.server.is_connected() {
            return None;
        }
        let due = self.to_sign(now, at);
        if due.is_empty() {
            return None;
        }
        let mut flight = Signing {
            batch: None,
            queue: due.into(),
            tried: Default::default(),
            requests: 0,
            at,
            refused: false,
            failed: false,
        };
        self.send_batch(&mut flight).then_some(flight)
    }

    /// Sends the next request of the round `flight`: the entries callers
    /// asked for that it has not tried yet (up to [`CSR_BATCH`]), then its
    /// queue up to the request's size (which the callers' entries count
    /// towards); false when nothing is left.
    fn send_batch(&mut self, flight: &mut Signing) -> bool
    where
        S: Clone,
    {
        let size = FIRST_BATCH
            .saturating_mul(1 << flight.requests.min(16))
            .min(CSR_BATCH);
        let mut batch: Vec<Arc<Entry>> = Vec::new();
        for id in &self.wanted {
            if batch.len() == CSR_BATCH {
                break;
            }
            if self.served_svids.contains_key(id) {
                continue;
            }
            if let Some(e) = self.entries.get(id)
                && flight.tried.insert(id.clone())
            {
                batch.push(e.clone());
            }
        }
        while batch.len() < size.max(1) {
            let Some(id) = flight.queue.pop_front() else {
                break;
            };
            if let Some(e) = self.entries.get(&id)
                && flight.tried.insert(id)
            {
                batch.push(e.clone());
            }
        }
        if batch.is_empty() {
            return false;
        }
        flight.requests += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = self.server.clone();
        let task = tokio::spawn(async move {
            let mut keys = HashMap::new();
            let mut params = Vec::with_capacity(batch.len());
            for e in batch {
                match PrivateKey::generate_p256()
                    .and_then(|k| sigil_svid::x509::make_csr(&k).map(|c| (k, c)))
                {
                    Ok((key, csr)) => {
                        params.push(pb::X509svidParams {
                            entry_id: e.id.to_string(),
                            csr,
                        });
                        keys.insert(e.id.clone(), (key, e));
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "generating a workload key failed");
                    }
                }
            }
            let result = server
                .sign_x509svids(pb::BatchNewX509svidRequest { params })
                .await;
            let _ = tx.send(Signed { keys, result });
        });
        flight.batch = Some((rx, AbortOnDrop(task)));
        true
    }

    /// Takes the answer to the request in flight (`None`: its task ended
    /// without one) and sends the round's next request; once the round is
    /// over, entries the server refused or could not sign are tried again
    /// after the retry delay.
    fn on_signed(&mut self, answer: Option<Signed>, signing: &mut Option<Signing>)
    where
        S: Clone,
    {
        let Some(flight) = signing.as_mut() else {
            return;
        };
        flight.batch = None;
        let retry_at = flight.at + self.cfg.min_backoff.max(Duration::from_secs(1));
        // The next request goes out before this answer is taken in, so
        // that its keys are made and the server signs while the core
        // checks and holds these SVIDs.
        let answered = matches!(&answer, Some(Signed { result: Ok(_), .. }));
        let sent = answered && self.send_batch(flight);
        match answer {
            Some(signed) => self.take_signed(signed, flight),
            None => flight.failed = true,
        }
        if flight.failed {
            // The rest of the round is not sent.
            self.sign_retry_at = Some(retry_at);
            *signing = None;
        } else if !sent {
            // Entries the server refused (say, an entry it had not yet
            // applied) are tried again soon rather than at the next
            // unrelated event.
            self.sign_retry_at = flight.refused.then_some(retry_at);
            *signing = None;
        }
    }

    /// Holds the SVIDs of one answer.
    fn take_signed(&mut self, Signed { mut keys, result }: Signed, flight: &mut Signing) {
        let resp = match result {
            Ok(r) => r,
            Err(status) => {
                tracing::warn!(error = %crate::status_chain(&status), "signing request failed; will retry");
                flight.failed = true;
                return;
            }
        };
        let now = self.clock.wall();
        for r in resp.results {
            let Ok(id) = r.entry_id.parse::<EntryId>() else {
                continue;
            };
            let Some((key, entry)) = keys.remove(&id) else {
                continue;
            };
            if !r.error.is_empty() {
                tracing::warn!(entry = %id, error = %r.error, "server refused to sign");
                flight.refused = true;
                continue;
            }
            // Deleted while it was being signed.
            if !self.entries.contains_key(&id) {
                continue;
            }
            let info = match r.cert_chain.first().map(|c| sigil_svid::x509::cert_info(c)) {
                Some(Ok(i)) => i,
                _ => {
                    tracing::warn!(entry = %id, "server returned an unusable certificate");
                    continue;
                }
            };
            // One block with the key, without the spare capacity decoding
            // left.
            let Some(der) = SvidDer::new(&r.cert_chain, &key) else {
                tracing::warn!(entry = %id, "server returned a chain that is not plain DER");
                continue;
            };
            let svid = WorkloadSvid::new(
                entry.spiffe_id.clone(),
                der,
                (info.not_before, info.not_after),
                SvidExtras::of(&entry.dns_names, &entry.attributes),
                entry.x509_svid_ttl,
            );
            let renew = renewal_after_receipt(now, info.not_before, info.not_after);
            // The entry's own ID text, shared by every map keyed by it.
            self.hold_svid(entry.id.clone(), svid, renew);
            self.metrics.svids_signed.inc();
            self.dirty = true;
        }
    }

    /// When the core has work next, without a message from the server: the
    /// earliest certificate time (a renewal, an expiry) as a tokio deadline,
    /// or the signing retry, but not sooner than 10 ms from now. While a
    /// signing is in flight, renewals wait for it (its end wakes the core).
    fn next_wake(&self, signing: bool) -> tokio::time::Instant {
        let mut t = self.identity_renew_at;
        if let Some(r) = self.svids.first().filter(|_| !signing) {
            t = t.min(r);
        }
        // Expiry of a served SVID changes what is served.
        if let Some(r) = self.expires.first() {
            t = t.min(r);
        }
        let mut wake = self.clock.deadline(t);
        if let Some(r) = self.sign_retry_at.filter(|_| !signing) {
            wake = wake.min(r);
        }
        wake.max(tokio::time::Instant::now() + Duration::from_millis(10))
    }

    pub(crate) async fn run(mut self, cancel: CancellationToken)
    where
        S: Clone,
    {
        let mut backoff = Backoff::new(self.cfg.min_backoff, self.cfg.max_backoff);
        let mut stream: Option<SyncStream> = None;
        // The pages of the update arriving on `stream`, applied only whole.
        let mut pages = crate::paging::Assembler::new(self.cfg.sync_update_bounds);
        let mut retry_at = tokio::time::Instant::now();
        // At most one signing in flight; dropped (and its task aborted)
        // when the core stops.
        let mut signing: Option<Signing> = None;
        // Whether the cache file lags what was published, and when it was
        // last saved.
        let mut unsaved = false;
        let mut saved_at = tokio::time::Instant::now();
        let demand = self.demand.clone();
        // The cached state was published by `start` before the socket opened.
        loop {
            let now = tokio::time::Instant::now();
            if stream.is_none() && now >= retry_at {
                match self.open_stream(&mut pages).await {
                    Ok((s, resumed)) => {
                        tracing::info!(servers = %self.cfg.server_address, resumed_snapshot = resumed, "connected to a server");
                        stream = Some(s);
                        pages.opened(resumed);
                        // The backoff is reset only once a whole update has
                        // been applied: a stream that opens and then fails at
                        // once (an answer the agent cannot take), or after a
                        // first page, must not be retried at the shortest
                        // delay forever.
                        self.dirty = true;
                    }
                    Err(e) => {
                        let d = self.retry_wait(&mut backoff);
                        if self.identity.not_after <= self.clock.wall() {
                            // The server's alert says only "CertificateExpired".
                            tracing::warn!(
                                error = %e,
                                retry_in = ?d,
                                agent_svid_expired = %humantime::format_rfc3339_seconds(self.identity.not_after),
                                "server unreachable; serving cached SVIDs; this agent's own SVID has expired, and servers refuse it until the agent attests again"
                            );
                        } else {
                            tracing::warn!(error = %e, retry_in = ?d, "server unreachable; serving cached SVIDs");
                        }
                        retry_at = now + d;
                        if self.server.is_connected() {
                            self.server.disconnect();
                            self.dirty = true;
                        }
                        // Refused (evicted, say) or with an expired SVID, a
                        // PSAT agent attests again with its token, as at
                        // its first start; a join-token agent cannot.
                        let refused = matches!(e, AgentError::Refused(_));
                        if (refused || self.identity.not_after <= self.clock.wall())
                            && self.reattest_psat().await
                        {
                            retry_at = tokio::time::Instant::now();
                        }
                    }
                }
            }
            let (now, at) = (self.clock.wall(), tokio::time::Instant::now());
            if self.maintain_identity(now).await {
                stream = None;
                pages.clear();
                self.server.disconnect();
                retry_at = at;
                continue;
            }
            self.take_demand();
            self.enforce_bound();
            if signing.is_none() {
                signing = self.start_signing(now, at);
            }
            // An SVID that expired is no longer served, even when nothing
            // else changed (as while the server is unreachable).
            if self.expire(now) {
                self.dirty = true;
            }
            if self.dirty {
                self.dirty = false;
                self.publish();
                unsaved = true;
            }
            // Saved once the signing in flight is answered, so that entries
            // arriving with their SVIDs due are written once, with them, not
            // once before and once after; at least every
            // `SAVE_WHILE_SIGNING` while signings follow one another.
            if unsaved && (signing.is_none() || at >= saved_at + SAVE_WHILE_SIGNING) {
                unsaved = false;
                saved_at = at;
                self.persist_cache();
                // The buffers of a large change (the sync messages, the
                // signing answers, the saved file) are free now.
                if crate::trim::due(&mut self.churn, signing.is_none()) {
                    crate::trim::give_back_free_memory();
                }
            }
            let mut wake = self.next_wake(signing.is_some());
            if stream.is_none() {
                wake = wake.min(retry_at);
            }
            if unsaved {
                wake = wake.min(saved_at + SAVE_WHILE_SIGNING);
            }
            let mut msg = tokio::select! {
                _ = cancel.cancelled() => {
                    if unsaved {
                        self.persist_cache();
                    }
                    return;
                }
                msg = next_message(&mut stream) => msg,
                answer = next_signed(&mut signing) => {
                    self.on_signed(answer, &mut signing);
                    continue;
                }
                _ = demand.asked() => continue,
                _ = tokio::time::sleep_until(wake) => continue,
            };
            // Every message already received is handled before the work
            // that looks at what the agent holds (signing, publishing,
            // saving): a registration of many entries reaches the agent as
            // many small messages, and that work must not run once per
            // message. Bounded, so that timers are not starved.
            let until = tokio::time::Instant::now() + DRAIN_TIME;
            for _ in 0..DRAIN_MESSAGES {
                self.on_message(msg, &mut stream, &mut pages, &mut backoff, &mut retry_at);
                if tokio::time::Instant::now() >= until {
                    break;
                }
                match ready_message(&mut stream) {
                    Some(next) => msg = next,
                    None => break,
                }
            }
        }
    }

    /// How long to wait before the next connection attempt: the backoff's
    /// next wait, but never more than half of the time left until the
    /// first expiry of what the agent holds (its own SVID, or an SVID it
    /// serves), and at least the minimum backoff. A join-token agent whose
    /// SVID expires before it reaches a server can never come back by
    /// itself, and a workload whose SVID expires loses its identity: a
    /// server that returns while they are still valid must be tried before
    /// they expire, not after a full backoff that outlasts them.
    fn retry_wait(&self, backoff: &mut Backoff) -> Duration {
        let now = self.clock.wall();
        let left = [Some(self.identity.not_after), self.expires.first()]
            .into_iter()
            .flatten()
            .filter_map(|t| t.duration_since(now).ok())
            .filter(|left| !left.is_zero())
            .min();
        match left {
            Some(left) => backoff.next_at_most((left / 2).max(self.cfg.min_backoff)),
            None => backoff.next(),
        }
    }

    /// Handles one message (or the end) of the sync stream.
    fn on_message(
        &mut self,
        msg: Option<Result<pb::SyncMessage, tonic::Status>>,
        stream: &mut Option<SyncStream>,
        pages: &mut crate::paging::Assembler,
        backoff: &mut Backoff,
        retry_at: &mut tokio::time::Instant,
    ) {
        match msg {
            Some(Ok(page)) => match pages.push(page) {
                Ok(Some(update)) => {
                    self.apply(update);
                    backoff.reset();
                }
                // More pages of this update are to come.
                Ok(None) => {}
                Err(e) => {
                    let d = self.retry_wait(backoff);
                    tracing::error!(error = %e, retry_in = ?d, "refusing the server's sync update; reconnecting");
                    *stream = None;
                    *retry_at = tokio::time::Instant::now() + d;
                    self.server.disconnect();
                    self.dirty = true;
                }
            },
            Some(Err(status)) => {
                if pages.is_partial() {
                    tracing::warn!(
                        "the sync stream broke inside an update; nothing of it was applied (a snapshot's pages are kept to resume from)"
                    );
                }
                pages.clear();
                let d = self.retry_wait(backoff);
                if status.code() == tonic::Code::PermissionDenied {
                    tracing::error!(error = %crate::status_chain(&status), "the server cut this agent off");
                } else {
                    tracing::warn!(error = %crate::status_chain(&status), retry_in = ?d, "sync stream broke");
                }
                *stream = None;
                *retry_at = tokio::time::Instant::now() + d;
                self.server.disconnect();
                self.dirty = true;
            }
            None => {
                if pages.is_partial() {
                    tracing::warn!(
                        "the sync stream ended inside an update; nothing of it was applied (a snapshot's pages are kept to resume from)"
                    );
                }
                pages.clear();
                *stream = None;
                *retry_at = tokio::time::Instant::now() + self.retry_wait(backoff);
                self.server.disconnect();
                self.dirty = true;
            }
        }
    }
}

/// One batch's answer from a signing in flight: the keys of the CSRs sent,
/// with their entries as they were, and what the server said.
pub(crate) struct Signed {
    keys: HashMap<EntryId, (PrivateKey, Arc<Entry>)>,
    result: Result<pb::BatchNewX509svidResponse, tonic::Status>,
}

/// A signing round in flight: the request being answered, and what is
/// left to send.
pub(crate) struct Signing {
    /// The answer to the request in flight, and its task.
    batch: Option<(tokio::sync::oneshot::Receiver<Signed>, AbortOnDrop)>,
    /// The entries due when the round started, not yet sent.
    queue: std::collections::VecDeque<EntryId>,
    /// The entries sent in this round: each is tried once per round.
    tried: std::collections::HashSet<EntryId>,
    /// The requests sent so far.
    requests: u32,
    /// When it started: retries count from here.
    at: tokio::time::Instant,
    /// Whether the server refused an entry so far.
    refused: bool,
    /// Whether a request failed (and the rest were not sent).
    failed: bool,
}

/// Aborts the task when dropped, so a signing does not outlive the core.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The answer to the signing request in flight (`None`: its task ended
/// without one); never ready without one.
async fn next_signed(signing: &mut Option<Signing>) -> Option<Signed> {
    match signing.as_mut().and_then(|s| s.batch.as_mut()) {
        Some((answer, _)) => answer.await.ok(),
        None => std::future::pending().await,
    }
}

/// Most sync messages handled in a row before the core does its other work.
const DRAIN_MESSAGES: usize = 4096;
/// Longest the core handles sync messages in a row.
const DRAIN_TIME: Duration = Duration::from_millis(200);
/// The longest the cache file lags what is served while signings follow
/// one another (a registration of many entries): what a crash in that
/// window loses, the agent syncs and signs again.
const SAVE_WHILE_SIGNING: Duration = Duration::from_secs(2);

/// The next message of the sync stream if it has already arrived (`None`
/// when it has not): polled once, without waiting. A stream keeps its state
/// between polls, so polling without a waker loses nothing.
fn ready_message(
    stream: &mut Option<SyncStream>,
) -> Option<Option<Result<pb::SyncMessage, tonic::Status>>> {
    use std::task::{Context, Poll, Waker};
    let s = stream.as_mut()?;
    match s
        .as_mut()
        .poll_next(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

/// The federated bundles after the server sent its complete set `sent`
/// (trust domain name -> SPIFFE bundle JSON): trust domains not listed are
/// dropped; a bundle that does not parse keeps the one `held` for its trust
/// domain (if any); a bundle named like the agent's `own` trust domain is
/// refused, so that federation can never replace the own trust bundle.
pub(crate) fn merge_federated(
    own: &TrustDomain,
    held: &FederatedBundles,
    sent: &HashMap<String, String>,
) -> FederatedBundles {
    let mut next = FederatedBundles::new();
    for (name, json) in sent {
        let td = match TrustDomain::new(name) {
            Ok(td) => td,
            Err(e) => {
                tracing::warn!(trust_domain = %name, error = %e, "ignoring a federated bundle with an invalid trust domain name");
                continue;
            }
        };
        if &td == own {
            tracing::warn!(trust_domain = %td, "ignoring a federated bundle named like this agent's own trust domain");
            continue;
        }
        match Bundle::from_json(td.clone(), json) {
            Ok(b) => {
                let b = match held.get(&td) {
                    Some(h) if **h == b => h.clone(),
                    _ => Arc::new(b),
                };
                next.insert(td, b);
            }
            Err(e) => {
                let previous = held.get(&td).cloned();
                tracing::warn!(
                    trust_domain = %td,
                    error = %e,
                    kept_previous = previous.is_some(),
                    "ignoring a malformed federated bundle from the server"
                );
                if let Some(p) = previous {
                    next.insert(td, p);
                }
            }
        }
    }
    next
}

async fn next_message(
    stream: &mut Option<SyncStream>,
) -> Option<Result<pb::SyncMessage, tonic::Status>> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff with full jitter.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
    pub(crate) fn next(&mut self) -> Duration {
        let mut r = [0u8; 2];
        let _ = aws_lc_rs::rand::fill(&mut r);
        let frac = 0.5 + (u16::from_le_bytes(r) as f64 / u16::MAX as f64) * 0.5;
        let d = self.current.mul_f64(frac);
        self.current = (self.current * 2).min(self.max);
        d
    }
    /// The next wait, but at most `cap`. A capped wait is where the
    /// backoff goes on from: once the cap is gone, the wait grows from the
    /// one last taken, not from a backoff that kept doubling meanwhile
    /// (which would have jumped to the maximum at once).
    pub(crate) fn next_at_most(&mut self, cap: Duration) -> Duration {
        let d = self.next();
        if d <= cap {
            return d;
        }
        self.current = (cap * 2).clamp(self.min, self.max);
        cap
    }
}

#[cfg(test)]
mod tests {
    use sigil_types::SpiffeId;

    use super::*;

    /// Waits cut short while SVIDs neared their expiry do not leave the
    /// backoff at its maximum: once they expired (a PSAT agent whose SVID
    /// expired while the server was down, say), the next attempt comes
    /// about twice the last wait later, not up to 30 s later.
    #[test]
    fn a_capped_wait_is_where_the_backoff_goes_on_from() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let mut b = Backoff::new(min, max);
        for _ in 0..12 {
            assert!(b.next_at_most(min) <= min);
        }
        let next = b.next();
        assert!(next <= 2 * min, "waited {next:?} after waits of {min:?}");
        // Uncapped, it grows as before.
        let mut waits = Vec::new();
        for _ in 0..12 {
            waits.push(b.next());
        }
        assert!(waits.iter().all(|w| *w <= max));
        assert!(*waits.last().unwrap() >= max / 2, "{waits:?}");
    }

    #[test]
    fn renewal_is_near_half_life() {
        let issued = SystemTime::now();
        let start = issued - sigil_svid::x509::BACKDATE;
        let end = issued + Duration::from_secs(3600);
        for _ in 0..100 {
            let at = renewal_time(start, end)
                .duration_since(issued)
                .unwrap()
                .as_secs();
            assert!((1440..=2160).contains(&at), "{at}");
        }
        // A 4 s SVID renews about 2 s after issuance, not at once.
        for _ in 0..100 {
            let short = renewal_time(start, issued + Duration::from_secs(4));
            let after = short.duration_since(issued).unwrap().as_millis();
            assert!((1590..=2410).contains(&after), "{after}");
        }
    }

    #[test]
    fn a_clock_ahead_of_the_servers_does_not_renew_in_a_loop() {
        let issued = SystemTime::now();
        let start = issued - sigil_svid::x509::BACKDATE;
        let end = issued + Duration::from_secs(60);
        // This host's clock runs 10 minutes ahead: by it, the new SVID is
        // long past its renewal time (and its expiry).
        let now = issued + Duration::from_secs(600);
        for _ in 0..100 {
            let wait = renewal_after_receipt(now, start, end)
                .duration_since(now)
                .unwrap()
                .as_secs_f64();
            assert!((24.0..=36.0).contains(&wait), "{wait}");
        }
        // With the clocks agreeing it is the renewal time itself.
        for _ in 0..100 {
            let at = renewal_after_receipt(issued, start, end)
                .duration_since(issued)
                .unwrap()
                .as_secs_f64();
            assert!((24.0..=36.0).contains(&at), "{at}");
        }
    }

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = b.next();
            assert!(last <= Duration::from_secs(2));
        }
        assert!(last >= Duration::from_secs(1));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    #[test]
    fn backoff_is_jittered_between_half_and_all_of_each_step() {
        let firsts: BTreeSet<u128> = (0..50)
            .map(|_| {
                Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
                    .next()
                    .as_micros()
            })
            .collect();
        assert!(
            firsts.iter().all(|d| (50_000..=100_000).contains(d)),
            "{firsts:?}"
        );
        assert!(firsts.len() > 10, "no jitter: {firsts:?}");
    }

    pub(super) mod incremental {
        //! The core's schedules and cache saves, kept up to date per change,
        //! against the definitions they replace (a pass over every entry).

        use std::collections::BTreeMap;
        use std::path::Path;

        use proptest::prelude::*;
        use sigil_svid::x509::{SvidRequest, X509Authority};
        use sigil_types::Selectors;

        use super::*;

        fn entry(k: u8, variant: u8) -> Entry {
            Entry::new(
                format!("e{k}").parse().unwrap(),
                format!("spiffe://example.org/w/{k}/{variant}")
                    .parse()
                    .unwrap(),
                "spiffe://example.org/agent".parse().unwrap(),
                Selectors::parse_all(["unix:uid:1000"]).unwrap(),
            )
        }

        pub(in crate::core) fn core_in(
            dir: &Path,
            ca: &X509Authority,
        ) -> Core<crate::server_api::GrpcServer> {
            let td = TrustDomain::new("example.org").unwrap();
            let cfg = AgentConfig::with_defaults(td.clone(), "127.0.0.1:1".into(), dir.into());
            let key = PrivateKey::generate_p256().unwrap();
            let agent: SpiffeId = "spiffe://example.org/agent".parse().unwrap();
            let leaf = ca
                .sign_svid(
                    &SvidRequest::new(&agent, Duration::from_secs(3600)),
                    &key.public_key_spki_der(),
                    SystemTime::now(),
                )
                .unwrap();
            let identity = AgentIdentity::new(vec![leaf], key).unwrap();
            let cert = Arc::new(RotatingCert::new(identity.chain.clone(), &identity.key).unwrap());
            let trust = Arc::new(ArcSwap::from_pointee(Bundle::new(td)));
            Core::new(CoreParts {
                server: crate::server_api::GrpcServer::new(&cfg, trust.clone(), cert.clone())
                    .unwrap(),
                cfg,
                persist: Persist::open(dir).unwrap(),
                identity,
                trust,
                federated: Default::default(),
                cert,
                metrics: Default::default(),
            })
            .0
        }

        #[derive(Debug, Clone)]
        enum Op {
            /// Entry `k` created or changed to variant `v` (its SPIFFE ID).
            Upsert(u8, u8),
            Delete(u8),
            /// The server's full set.
            Snapshot(Vec<(u8, u8)>),
            /// An SVID for entry `k` as it is now, renewed after `r` s,
            /// living `life` s.
            Sign(u8, u16, u16),
            Tick(u16),
            Save,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0u8..6, 0u8..2).prop_map(|(k, v)| Op::Upsert(k, v)),
                2 => (0u8..6).prop_map(Op::Delete),
                1 => proptest::collection::vec((0u8..6, 0u8..2), 0..6).prop_map(Op::Snapshot),
                4 => (0u8..6, 0u16..300, 60u16..600).prop_map(|(k, r, l)| Op::Sign(k, r, l)),
                3 => (0u16..120).prop_map(Op::Tick),
                1 => Just(Op::Save),
            ]
        }

        fn message(revision: u64, snapshot: bool, up: &[Entry], del: &[String]) -> pb::SyncMessage {
            pb::SyncMessage {
                revision,
                snapshot,
                upserted: up.iter().map(pb::Entry::from).collect(),
                deleted_ids: del.to_vec(),
                ..Default::default()
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the server sends and whatever is signed, in any
            /// order: the due set, the next expiry and the saved cache are
            /// what a pass over everything held would give.
            #[test]
            fn schedules_and_saves_match_a_full_pass(ops in proptest::collection::vec(op(), 1..60)) {
                let dir = tempfile::tempdir().unwrap();
                let td = TrustDomain::new("example.org").unwrap();
                let start = SystemTime::now();
                let ca = X509Authority::generate(&td, Duration::from_secs(86_400), start).unwrap();
                let mut core = core_in(dir.path(), &ca);
                let mut now = start;
                // The renewal time of each SVID, as the old code kept it.
                let mut renew: BTreeMap<EntryId, SystemTime> = BTreeMap::new();
                let mut revision = 0;
                for op in ops {
                    revision += 1;
                    match op {
                        Op::Upsert(k, v) => core.apply(message(revision, false, &[entry(k, v)], &[])),
                        Op::Delete(k) => core.apply(message(revision, false, &[], &[format!("e{k}")])),
                        Op::Snapshot(set) => {
                            let es: Vec<Entry> = set.iter().map(|(k, v)| entry(*k, *v)).collect();
                            core.apply(message(revision, true, &es, &[]));
                        }
                        Op::Sign(k, r, life) => {
                            let Some(e) = core.entries.get(&format!("e{k}").parse().unwrap()).cloned() else {
                                continue;
                            };
                            let key = PrivateKey::generate_p256().unwrap();
                            let leaf = ca
                                .sign_svid(
                                    &SvidRequest::new(&e.spiffe_id, Duration::from_secs(life.into())),
                                    &key.public_key_spki_der(),
                                    now,
                                )
                                .unwrap();
                            let info = sigil_svid::x509::cert_info(&leaf).unwrap();
                            let at = now + Duration::from_secs(r.into());
                            core.hold_svid(
                                e.id.clone(),
                                WorkloadSvid::new(
                                    e.spiffe_id.clone(),
                                    SvidDer::new(&[leaf], &key).unwrap(),
                                    (info.not_before, info.not_after),
                                    SvidExtras::of(&e.dns_names, &e.attributes),
                                    e.x509_svid_ttl,
                                ),
                                at,
                            );
                            renew.insert(e.id.clone(), at);
                        }
                        Op::Tick(secs) => {
                            now += Duration::from_secs(secs.into());
                            core.expire(now);
                        }
                        Op::Save => {
                            core.persist_cache();
                            let loaded = core.persist.load_cache(SystemTime::now()).unwrap();
                            let mut held: Vec<&Entry> = core.entries.values().map(|e| &**e).collect();
                            held.sort_by(|a, b| a.id.cmp(&b.id));
                            let loaded_entries: Vec<&Entry> = loaded.entries.iter().collect();
                            prop_assert_eq!(loaded_entries, held);
                            let mut svids: Vec<(EntryId, Vec<u8>)> = core
                                .svids
                                .iter()
                                .filter(|(_, s)| s.not_after() > SystemTime::now())
                                .map(|(id, s)| (id.clone(), s.chain().leaf().to_vec()))
                                .collect();
                            svids.sort();
                            let mut loaded_svids: Vec<(EntryId, Vec<u8>)> = loaded
                                .svids
                                .iter()
                                .map(|s| (s.entry_id.clone(), s.svid.chain().leaf().to_vec()))
                                .collect();
                            loaded_svids.sort();
                            prop_assert_eq!(loaded_svids, svids);
                        }
                    }
                    // The old code dropped the schedules of entries gone.
                    renew.retain(|id, _| core.entries.contains_key(id));
                    let mut due: Vec<EntryId> = core.due(now);
                    due.sort();
                    let mut full: Vec<EntryId> = core
                        .entries
                        .values()
                        .filter(|e| match core.svids.get(&e.id) {
                            None => true,
                            Some(s) => !s.fits(e) || renew.get(&e.id).is_none_or(|t| now >= *t),
                        })
                        .map(|e| e.id.clone())
                        .collect();
                    full.sort();
                    prop_assert_eq!(due, full);
                    prop_assert!(core.svids.keys().all(|id| core.entries.contains_key(id)));
                    let next_expiry = core.svids.values().map(|s| s.not_after()).filter(|t| *t > now).min();
                    prop_assert_eq!(core.expires.first(), next_expiry);
                    prop_assert_eq!(core.svids.first(), renew.values().min().copied());
                    for (id, t) in &renew {
                        prop_assert_eq!(core.svids.time(id), Some(*t));
                    }
                    // What is served: every entry; and each SVID that
                    // fits its entry and has not expired.
                    let by_age = |a: &&Arc<Entry>, b: &&Arc<Entry>| (a.created_at, &a.id).cmp(&(b.created_at, &b.id));
                    let mut ordered: Vec<&Arc<Entry>> = core.entries.values().collect();
                    ordered.sort_by(by_age);
                    let mut served: Vec<&Arc<Entry>> = core.served_entries.iter().collect();
                    served.sort_by(by_age);
                    prop_assert_eq!(core.served_entries.len(), served.len());
                    prop_assert_eq!(served, ordered);
                    let mut served: Vec<&EntryId> = core.served_svids.keys().collect();
                    served.sort();
                    let mut full: Vec<&EntryId> = core
                        .svids
                        .iter()
                        .filter(|(id, s)| {
                            s.not_after() > now && core.entries.get(id).is_some_and(|e| s.fits(e))
                        })
                        .map(|(id, _)| id)
                        .collect();
                    full.sort();
                    prop_assert_eq!(served, full);
                }
            }
        }
    }

    mod paused {
        //! The core's loop against a fake server, on paused tokio time:
        //! renewal, rotation, expiry and backoff without real sleeps. The
        //! fake signs with a real CA at the core's wall time, which moves
        //! with tokio's clock ([`Clock::following_tokio`]).

        use std::sync::Mutex;
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

        use sigil_svid::x509::{SvidRequest, X509Authority};
        use sigil_types::{Selectors, SpiffeId};
        use tokio::sync::mpsc;
        use tokio::time::Instant;

        use super::*;

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Call {
            OpenSync,
            Sign,
            RenewAgent,
        }

        type Pages = mpsc::UnboundedSender<Result<pb::SyncMessage, tonic::Status>>;

        struct State {
            clock: Clock,
            ca: X509Authority,
            svid_ttl: Duration,
            agent_ttl: Duration,
            entries: Mutex<Vec<Entry>>,
            reachable: AtomicBool,
            /// Signing calls still to fail.
            failing_signs: AtomicUsize,
            connected: AtomicBool,
            stream: Mutex<Option<Pages>>,
            /// Signing answers only while this is true.
            gate: watch::Sender<bool>,
            revision: AtomicU64,
            calls: Mutex<Vec<(Call, Instant)>>,
            /// The entry IDs of each signing request, in order.
            requests: Mutex<Vec<Vec<String>>>,
        }

        #[derive(Clone)]
        struct Fake(Arc<State>);

        impl Fake {
            fn new(svid_ttl: Duration, agent_ttl: Duration, entries: Vec<Entry>) -> Self {
                let clock = Clock::following_tokio(SystemTime::now());
                let td = TrustDomain::new("example.org").unwrap();
                let ca = X509Authority::generate(&td, Duration::from_secs(86_400), clock.wall())
                    .unwrap();
                Self(Arc::new(State {
                    clock,
                    ca,
                    svid_ttl,
                    agent_ttl,
                    entries: Mutex::new(entries),
                    reachable: AtomicBool::new(true),
                    failing_signs: AtomicUsize::new(0),
                    connected: AtomicBool::new(false),
                    stream: Mutex::new(None),
                    gate: watch::Sender::new(true),
                    revision: AtomicU64::new(0),
                    calls: Mutex::new(Vec::new()),
                    requests: Mutex::new(Vec::new()),
                }))
            }

            /// A server holding entries w1 to w`n` (see [`many`]), signing
            /// SVIDs that live `ttl`, and agent SVIDs that live a day.
            fn serving_many(n: u32, ttl: Duration) -> Self {
                Self::new(ttl, Duration::from_secs(86_400), many(n))
            }

            /// A server holding one entry, signing SVIDs that live `ttl`,
            /// and agent SVIDs that live a day.
            fn serving_one(ttl: Duration) -> Self {
                Self::new(ttl, Duration::from_secs(86_400), vec![workload(1)])
            }

            fn log(&self, call: Call) {
                self.0.calls.lock().unwrap().push((call, Instant::now()));
            }

            /// When each call of this kind was made.
            fn times(&self, call: Call) -> Vec<Instant> {
                let calls = self.0.calls.lock().unwrap();
                calls
                    .iter()
                    .filter(|(c, _)| *c == call)
                    .map(|(_, t)| *t)
                    .collect()
            }

            fn sign(&self, id: &SpiffeId, ttl: Duration, csr: &[u8]) -> Vec<u8> {
                let spki = sigil_svid::x509::csr_public_key(csr).unwrap();
                self.0
                    .ca
                    .sign_svid(&SvidRequest::new(id, ttl), &spki, self.0.clock.wall())
                    .unwrap()
            }

            fn agent_identity(&self) -> AgentIdentity {
                let key = PrivateKey::generate_p256().unwrap();
                let csr = sigil_svid::x509::make_csr(&key).unwrap();
                let leaf = self.sign(&agent_id(), self.0.agent_ttl, &csr);
                AgentIdentity::new(vec![leaf], key).unwrap()
            }

            /// Sends a page on the open stream (or breaks it, with an error).
            fn push(&self, page: Result<pb::SyncMessage, tonic::Status>) {
                let stream = self.0.stream.lock().unwrap();
                stream.as_ref().unwrap().send(page).unwrap();
            }

            /// Registers `e` and sends it on the open stream.
            fn register(&self, e: Entry) {
                self.0.entries.lock().unwrap().push(e.clone());
                let revision = self.0.revision.fetch_add(1, Ordering::SeqCst) + 1;
                self.push(Ok(pb::SyncMessage {
                    revision,
                    upserted: vec![pb::Entry::from(&e)],
                    ..Default::default()
                }));
            }

            /// Breaks the stream and refuses connections from now on.
            fn go_away(&self) {
                self.0.reachable.store(false, Ordering::SeqCst);
                self.push(Err(tonic::Status::unavailable("gone")));
            }
        }

        impl ServerClient for Fake {
            async fn open_sync(&self, _req: pb::SyncRequest) -> Result<SyncStream, AgentError> {
                self.log(Call::OpenSync);
                if !self.0.reachable.load(Ordering::SeqCst) {
                    return Err(AgentError::Unavailable("unreachable".into()));
                }
                let (tx, rx) = mpsc::unbounded_channel();
                let entries = self.0.entries.lock().unwrap().clone();
                let revision = self.0.revision.fetch_add(1, Ordering::SeqCst) + 1;
                tx.send(Ok(pb::SyncMessage {
                    revision,
                    snapshot: true,
                    upserted: entries.iter().map(pb::Entry::from).collect(),
                    ..Default::default()
                }))
                .unwrap();
                *self.0.stream.lock().unwrap() = Some(tx);
                self.0.connected.store(true, Ordering::SeqCst);
                Ok(Box::pin(
                    tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                ))
            }

            fn disconnect(&self) {
                self.0.connected.store(false, Ordering::SeqCst);
            }

            fn is_connected(&self) -> bool {
                self.0.connected.load(Ordering::SeqCst)
            }

            async fn sign_x509svids(
                &self,
                req: pb::BatchNewX509svidRequest,
            ) -> Result<pb::BatchNewX509svidResponse, tonic::Status> {
                self.log(Call::Sign);
                self.0
                    .requests
                    .lock()
                    .unwrap()
                    .push(req.params.iter().map(|p| p.entry_id.clone()).collect());
                let mut gate = self.0.gate.subscribe();
                let _ = gate.wait_for(|open| *open).await;
                let failing = &self.0.failing_signs;
                if failing
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(tonic::Status::unavailable("busy"));
                }
                // The SPIFFE IDs asked for, looked up under the lock.
                let entries: HashMap<String, SpiffeId> = {
                    let held = self.0.entries.lock().unwrap();
                    let asked: std::collections::HashSet<&str> =
                        req.params.iter().map(|p| p.entry_id.as_str()).collect();
                    held.iter()
                        .filter(|e| asked.contains(e.id.as_str()))
                        .map(|e| (e.id.to_string(), e.spiffe_id.clone()))
                        .collect()
                };
                let results = req
                    .params
                    .iter()
                    .map(|p| match entries.get(&p.entry_id) {
                        Some(spiffe_id) => pb::X509svidResult {
                            entry_id: p.entry_id.clone(),
                            cert_chain: vec![self.sign(spiffe_id, self.0.svid_ttl, &p.csr)],
                            error: String::new(),
                        },
                        None => pb::X509svidResult {
                            entry_id: p.entry_id.clone(),
                            cert_chain: vec![],
                            error: "unknown entry".into(),
                        },
                    })
                    .collect();
                Ok(pb::BatchNewX509svidResponse { results })
            }

            async fn renew_agent(&self, csr: Vec<u8>) -> Result<Vec<Vec<u8>>, AgentError> {
                self.log(Call::RenewAgent);
                Ok(vec![self.sign(&agent_id(), self.0.agent_ttl, &csr)])
            }

            async fn new_jwtsvid(
                &self,
                _req: pb::NewJwtsvidRequest,
            ) -> Result<String, tonic::Status> {
                Err(tonic::Status::unimplemented("no JWT-SVIDs here"))
            }

            async fn reattest(&self) -> Result<Option<AgentIdentity>, AgentError> {
                Ok(None)
            }
        }

        fn agent_id() -> SpiffeId {
            "spiffe://example.org/agent".parse().unwrap()
        }

        fn workload(k: u8) -> Entry {
            Entry::new(
                format!("w{k}").parse().unwrap(),
                format!("spiffe://example.org/w/{k}").parse().unwrap(),
                agent_id(),
                Selectors::parse_all(["unix:uid:1000"]).unwrap(),
            )
        }

        struct Running {
            snapshots: watch::Receiver<Arc<Snapshot>>,
            demand: Demand,
            cert: Arc<RotatingCert>,
            persist: Persist,
            cancel: CancellationToken,
            task: tokio::task::JoinHandle<()>,
            _dir: tempfile::TempDir,
        }

        impl Running {
            async fn stop(self) {
                self.cancel.cancel();
                self.task.await.unwrap();
            }

            /// The leaf of the SVID served for entry `k`, if one is.
            fn served(&self, k: u8) -> Option<Vec<u8>> {
                let id: EntryId = format!("w{k}").parse().unwrap();
                let snap = self.snapshots.borrow();
                snap.svids.get(&id).map(|s| s.chain().leaf().to_vec())
            }
        }

        fn start(fake: &Fake) -> Running {
            start_bounded(fake, 0)
        }

        /// Starts an agent holding at most `bound` idle SVIDs (0: no bound).
        fn start_bounded(fake: &Fake, bound: usize) -> Running {
            let dir = tempfile::tempdir().unwrap();
            let td = TrustDomain::new("example.org").unwrap();
            let mut cfg =
                AgentConfig::with_defaults(td.clone(), "127.0.0.1:1".into(), dir.path().into());
            cfg.x509_svid_cache_max_size = bound;
            let identity = fake.agent_identity();
            let cert = Arc::new(RotatingCert::new(identity.chain.clone(), &identity.key).unwrap());
            let mut bundle = Bundle::new(td);
            bundle.x509_authorities.push(fake.0.ca.cert_der().to_vec());
            let persist = Persist::open(dir.path()).unwrap();
            let (mut core, snapshots) = Core::new(CoreParts {
                cfg,
                persist: persist.clone(),
                identity,
                trust: Arc::new(ArcSwap::from_pointee(bundle)),
                federated: Default::default(),
                cert: cert.clone(),
                server: fake.clone(),
                metrics: Default::default(),
            });
            core.clock = fake.0.clock;
            core.restore(CachedState::default());
            core.publish();
            let demand = core.demand.clone();
            let cancel = CancellationToken::new();
            let task = tokio::spawn(core.run(cancel.clone()));
            Running {
                snapshots,
                demand,
                cert,
                persist,
                cancel,
                task,
                _dir: dir,
            }
        }

        /// Lets time pass in steps of 100 ms until `done` holds; panics
        /// after `limit`.
        async fn until(limit: Duration, mut done: impl FnMut() -> bool) {
            let end = Instant::now() + limit;
            while !done() {
                assert!(Instant::now() < end, "not done within {limit:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        fn secs(d: Duration) -> f64 {
            d.as_secs_f64()
        }

        /// Entries w1 to wn, all for the same caller.
        fn many(n: u32) -> Vec<Entry> {
            (1..=n)
                .map(|k| {
                    Entry::new(
                        id(k),
                        format!("spiffe://example.org/w/{k}").parse().unwrap(),
                        agent_id(),
                        Selectors::parse_all(["unix:uid:1000"]).unwrap(),
                    )
                })
                .collect()
        }

        fn id(k: u32) -> EntryId {
            format!("w{k}").parse().unwrap()
        }

        fn ids(ks: &[u32]) -> Vec<EntryId> {
            let mut v: Vec<EntryId> = ks.iter().map(|k| id(*k)).collect();
            v.sort();
            v
        }

        impl Running {
            /// The entries with an SVID served, sorted.
            fn served_ids(&self) -> Vec<EntryId> {
                let mut v: Vec<EntryId> = self.snapshots.borrow().svids.keys().cloned().collect();
                v.sort();
                v
            }

            /// Records, until `done` holds for one, the number of SVIDs of
            /// every published snapshot that serves any, and whether `done`
            /// held for it.
            fn record(
                &self,
                done: impl Fn(&Snapshot) -> bool + Send + 'static,
            ) -> tokio::task::JoinHandle<Vec<(usize, bool)>> {
                let mut rx = self.snapshots.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while rx.changed().await.is_ok() {
                        let snap = rx.borrow_and_update().clone();
                        let end = done(&snap);
                        if !snap.svids.is_empty() {
                            seen.push((snap.svids.len(), end));
                        }
                        if end {
                            break;
                        }
                    }
                    seen
                })
            }
        }

        fn request_sizes(fake: &Fake) -> Vec<usize> {
            fake.0
                .requests
                .lock()
                .unwrap()
                .iter()
                .map(Vec::len)
                .collect()
        }

        /// With 10,000 SVIDs due at a fresh start, the first request holds
        /// 16 CSRs and each later one twice as many as the one before, up
        /// to 500; the SVIDs of each answer are published before the next
        /// answer, so the first 16 are served before the rest are signed.
        #[tokio::test(start_paused = true)]
        async fn a_fresh_start_signs_in_growing_requests_and_publishes_each_answer() {
            const N: usize = 10_000;
            let fake = Fake::serving_many(N as u32, Duration::from_secs(3600));
            let agent = start(&fake);
            let seen = agent.record(|s| s.svids.len() == N);
            let seen = tokio::time::timeout(Duration::from_secs(60), seen)
                .await
                .unwrap()
                .unwrap();
            let sizes = request_sizes(&fake);
            assert_eq!(sizes[..6], [16, 32, 64, 128, 256, 500]);
            assert!(
                sizes[6..sizes.len() - 1].iter().all(|n| *n == 500),
                "{sizes:?}"
            );
            assert_eq!(sizes.iter().sum::<usize>(), N);
            // Each publication falls on the end of an answer.
            let ends: Vec<usize> = sizes
                .iter()
                .scan(0, |sum, n| {
                    *sum += n;
                    Some(*sum)
                })
                .collect();
            assert_eq!(seen[0].0, 16, "{seen:?}");
            assert!(seen.iter().all(|(n, _)| ends.contains(n)), "{seen:?}");
            assert_eq!(seen.len(), sizes.len(), "one publication per answer");
            agent.stop().await;
        }

        /// A caller waiting for entries without an SVID has them signed in
        /// the next request, ahead of the thousands due before, and served
        /// with that request's answer.
        #[tokio::test(start_paused = true)]
        async fn entries_a_caller_waits_for_jump_the_queue() {
            const N: usize = 10_000;
            let fake = Fake::serving_many(N as u32, Duration::from_secs(3600));
            fake.0.gate.send_replace(false);
            let agent = start(&fake);
            until(Duration::from_secs(5), || fake.times(Call::Sign).len() == 1).await;
            // Sorted last and near the middle of the 10,000.
            let wanted = [id(9999), id(5000)];
            let stream = agent.demand.interest();
            stream.set(wanted.to_vec());
            let seen = agent.record(move |s| wanted.iter().all(|w| s.svids.contains_key(w)));
            // The core takes the request before the answer comes.
            tokio::time::sleep(Duration::from_millis(100)).await;
            fake.0.gate.send_replace(true);
            let seen = tokio::time::timeout(Duration::from_secs(60), seen)
                .await
                .unwrap()
                .unwrap();
            let second = fake.0.requests.lock().unwrap()[1].clone();
            assert_eq!(second[..2], ["w5000", "w9999"]);
            // The caller's two count among the second request's 32.
            assert_eq!(second.len(), 32);
            // Served with the second answer: the first publication that
            // holds them holds only the first two requests' SVIDs.
            assert_eq!(seen.last(), Some(&(16 + 32, true)), "{seen:?}");
            drop(stream);
            until(Duration::from_secs(60), || agent.served_ids().len() == N).await;
            agent.stop().await;
        }

        /// With `x509_svid_cache_max_size = 3` and 6 entries, the agent
        /// holds 3 SVIDs while nobody asks (saved too); an entry a caller
        /// asks for is signed on demand; when the SVIDs no stream matches
        /// outnumber the bound, the least recently asked for is dropped
        /// (from memory and from the cache file); only held SVIDs are
        /// renewed; and one caller matching more entries than the bound has
        /// all of them while its stream is open.
        #[tokio::test(start_paused = true)]
        async fn the_bound_keeps_the_most_recently_asked_svids_and_signs_others_on_demand() {
            let fake = Fake::serving_many(6, Duration::from_secs(100));
            let agent = start_bounded(&fake, 3);
            until(Duration::from_secs(5), || {
                agent.served_ids() == ids(&[1, 2, 3])
            })
            .await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(agent.served_ids(), ids(&[1, 2, 3]));
            assert_eq!(saved(&agent).1, ["w1", "w2", "w3"]);
            // Asked for in this order: w2, then w1; w3 never.
            agent.demand.ask(&[id(2)]);
            tokio::time::sleep(Duration::from_millis(100)).await;
            agent.demand.ask(&[id(1)]);
            tokio::time::sleep(Duration::from_millis(100)).await;
            // A stream for w5, which has no SVID: signed on demand, and
            // held beyond the bound while the stream is open.
            let stream = agent.demand.interest();
            stream.set(vec![id(5)]);
            until(Duration::from_secs(5), || {
                agent.served_ids() == ids(&[1, 2, 3, 5])
            })
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(agent.served_ids(), ids(&[1, 2, 3, 5]));
            // Its end makes w5 the most recently asked: w3 goes.
            drop(stream);
            until(Duration::from_secs(5), || {
                agent.served_ids() == ids(&[1, 2, 5])
            })
            .await;
            // A one-shot request for w4: w2 (asked before w1) goes.
            agent.demand.ask(&[id(4)]);
            until(Duration::from_secs(5), || {
                agent.served_ids() == ids(&[1, 4, 5])
            })
            .await;
            until(Duration::from_secs(5), || {
                saved(&agent).1 == ["w1", "w4", "w5"]
            })
            .await;
            // Three lifetimes later, only the held SVIDs were renewed.
            let before = fake.0.requests.lock().unwrap().len();
            tokio::time::sleep(Duration::from_secs(300)).await;
            let renewed: BTreeSet<String> = fake.0.requests.lock().unwrap()[before..]
                .iter()
                .flatten()
                .cloned()
                .collect();
            assert_eq!(
                renewed,
                BTreeSet::from(["w1".into(), "w4".into(), "w5".into()])
            );
            assert_eq!(agent.served_ids(), ids(&[1, 4, 5]));
            // One caller matching all six has all six while it is open.
            let stream = agent.demand.interest();
            stream.set(ids(&[1, 2, 3, 4, 5, 6]));
            until(Duration::from_secs(5), || agent.served_ids().len() == 6).await;
            drop(stream);
            until(Duration::from_secs(5), || agent.served_ids().len() == 3).await;
            agent.stop().await;
        }

        /// A bound the entries do not exceed changes nothing: every entry's
        /// SVID is signed at once and kept.
        #[tokio::test(start_paused = true)]
        async fn a_bound_above_the_entries_holds_every_svid() {
            let fake = Fake::serving_many(6, Duration::from_secs(100));
            let agent = start_bounded(&fake, 6);
            until(Duration::from_secs(5), || agent.served_ids().len() == 6).await;
            tokio::time::sleep(Duration::from_secs(200)).await;
            assert_eq!(agent.served_ids().len(), 6);
            assert_eq!(saved(&agent).1.len(), 6);
            agent.stop().await;
        }

        /// Each SVID is renewed between 40% and 60% of its lifetime after it
        /// was signed (half, with 10% jitter), and the one it replaces is
        /// served until then: a workload always has an SVID.
        #[tokio::test(start_paused = true)]
        async fn svids_renew_near_half_life_and_rotate_without_a_gap() {
            let fake = Fake::serving_one(Duration::from_secs(100));
            let agent = start(&fake);
            until(Duration::from_secs(5), || agent.served(1).is_some()).await;
            let mut leaf = agent.served(1).unwrap();
            let mut signed_at = Instant::now();
            for _ in 0..3 {
                until(Duration::from_secs(100), || {
                    let now = agent.served(1);
                    assert!(now.is_some(), "an SVID is served throughout");
                    now.as_ref() != Some(&leaf)
                })
                .await;
                let after = secs(Instant::now() - signed_at);
                // Certificate times have whole seconds: a second either way.
                assert!((38.8..=61.3).contains(&after), "renewed after {after} s");
                leaf = agent.served(1).unwrap();
                signed_at = Instant::now();
            }
            // One signing per renewal, not a loop.
            assert_eq!(fake.times(Call::Sign).len(), 4);
            agent.stop().await;
        }

        /// What the cache file holds: entry IDs, and those with an SVID.
        fn saved(agent: &Running) -> (Vec<String>, Vec<String>) {
            let cached = agent.persist.load_cache(SystemTime::now()).unwrap();
            let mut entries: Vec<String> =
                cached.entries.iter().map(|e| e.id.to_string()).collect();
            let mut svids: Vec<String> = cached
                .svids
                .iter()
                .map(|s| s.entry_id.to_string())
                .collect();
            entries.sort();
            svids.sort();
            (entries, svids)
        }

        /// An entry that arrives with its SVID due is saved with its SVID,
        /// once the signing in flight is answered, not before it too; a
        /// signing that takes long delays the save by at most
        /// `SAVE_WHILE_SIGNING`, and a stop saves what was published.
        #[tokio::test(start_paused = true)]
        async fn entries_are_saved_with_their_svids_and_the_cache_lags_at_most_two_seconds() {
            let fake = Fake::serving_one(Duration::from_secs(3600));
            let mut agent = start(&fake);
            let one = (vec!["w1".to_owned()], vec!["w1".to_owned()]);
            until(Duration::from_secs(5), || saved(&agent) == one).await;

            // Signing held: the new entry is served at once (as an entry),
            // but not saved before its SVID for the first two seconds.
            fake.0.gate.send_replace(false);
            fake.register(workload(2));
            until(Duration::from_secs(1), || {
                agent.snapshots.borrow().entries.len() == 2
            })
            .await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(saved(&agent), one, "saved before its signing was answered");
            // Past the bound it is saved without its SVID.
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let w12 = vec!["w1".to_owned(), "w2".to_owned()];
            assert_eq!(saved(&agent), (w12.clone(), one.1.clone()));
            // Answered: saved with it.
            fake.0.gate.send_replace(true);
            until(Duration::from_secs(5), || {
                saved(&agent) == (w12.clone(), w12.clone())
            })
            .await;

            // A stop while a signing is in flight saves what was published.
            fake.0.gate.send_replace(false);
            fake.register(workload(3));
            until(Duration::from_secs(1), || {
                agent.snapshots.borrow().entries.len() == 3
            })
            .await;
            agent.cancel.cancel();
            (&mut agent.task).await.unwrap();
            let w123 = vec!["w1".to_owned(), "w2".to_owned(), "w3".to_owned()];
            assert_eq!(saved(&agent), (w123, w12));
        }

        /// A failed signing request is tried again after the retry delay
        /// (the minimum backoff, at least 1 s), not at once and not only at
        /// the next unrelated event.
        #[tokio::test(start_paused = true)]
        async fn a_failed_signing_is_retried_after_a_second() {
            let fake = Fake::serving_one(Duration::from_secs(600));
            fake.0.failing_signs.store(2, Ordering::SeqCst);
            let agent = start(&fake);
            until(Duration::from_secs(10), || agent.served(1).is_some()).await;
            let signs = fake.times(Call::Sign);
            assert_eq!(signs.len(), 3);
            for pair in signs.windows(2) {
                let gap = secs(pair[1] - pair[0]);
                assert!((1.0..=1.05).contains(&gap), "retried after {gap} s");
            }
            agent.stop().await;
        }

        /// While no server answers, connection attempts back off
        /// exponentially with jitter (each wait between half and all of a
        /// ceiling that doubles from the minimum to the maximum backoff),
        /// and once a whole update was applied the backoff starts over.
        #[tokio::test(start_paused = true)]
        async fn reconnects_back_off_to_the_cap_and_start_over_after_an_update() {
            let fake = Fake::serving_one(Duration::from_secs(600));
            fake.0.reachable.store(false, Ordering::SeqCst);
            let agent = start(&fake);
            until(Duration::from_secs(600), || {
                fake.times(Call::OpenSync).len() >= 12
            })
            .await;
            let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
            let opens = fake.times(Call::OpenSync);
            for (k, pair) in opens.windows(2).enumerate() {
                let ceiling = secs((min * 2u32.pow(k as u32)).min(max));
                let gap = secs(pair[1] - pair[0]);
                assert!(
                    gap >= ceiling / 2.0 - 0.002 && gap <= ceiling + 0.002,
                    "wait {k}: {gap} s, ceiling {ceiling} s"
                );
            }
            assert!(!agent.snapshots.borrow().connected);
            fake.0.reachable.store(true, Ordering::SeqCst);
            until(max + Duration::from_secs(1), || agent.served(1).is_some()).await;
            assert!(agent.snapshots.borrow().connected);
            // The update was applied: the next break is retried at the
            // shortest delay again.
            let before = fake.times(Call::OpenSync).len();
            let broke = Instant::now();
            fake.push(Err(tonic::Status::unavailable("restart")));
            until(Duration::from_secs(5), || {
                fake.times(Call::OpenSync).len() > before
            })
            .await;
            let gap = secs(fake.times(Call::OpenSync)[before] - broke);
            assert!(gap <= secs(min) + 0.1, "retried after {gap} s");
            agent.stop().await;
        }

        /// While no server answers, the waits between connection attempts
        /// never outlast half of what is left of the agent's own SVID, so a
        /// server that is back a few seconds before that SVID expires is
        /// reached, and the SVID renewed, in time. With the backoff alone
        /// (up to 30 s) the agent would try again only after its SVID had
        /// expired, and a join-token agent never recovers from that.
        #[tokio::test(start_paused = true)]
        async fn reconnects_come_sooner_as_the_agent_svid_nears_its_expiry() {
            let agent_ttl = Duration::from_secs(100);
            let fake = Fake::new(Duration::from_secs(600), agent_ttl, vec![workload(1)]);
            fake.0.reachable.store(false, Ordering::SeqCst);
            let agent = start(&fake);
            let expiry = Instant::now() + agent_ttl;
            let min = Duration::from_millis(500);
            // Back 4 s before the agent SVID expires.
            until(agent_ttl, || {
                Instant::now() + Duration::from_secs(4) >= expiry
            })
            .await;
            fake.0.reachable.store(true, Ordering::SeqCst);
            until(Duration::from_secs(60), || {
                !fake.times(Call::RenewAgent).is_empty()
            })
            .await;
            let renewed = fake.times(Call::RenewAgent)[0];
            assert!(
                renewed < expiry,
                "the agent SVID was renewed {} s after it expired",
                secs(renewed - expiry)
            );
            let opens = fake.times(Call::OpenSync);
            for pair in opens.windows(2).filter(|p| p[0] < expiry) {
                let cap = ((expiry - pair[0]) / 2).max(min);
                let gap = pair[1] - pair[0];
                assert!(
                    gap <= cap + Duration::from_millis(2),
                    "waited {} s with {} s of the agent SVID left",
                    secs(gap),
                    secs(expiry - pair[0])
                );
            }
            agent.stop().await;
        }

        /// The same for an SVID the agent serves: a server that is back a
        /// few seconds before a workload's SVID expires is reached, and
        /// the SVID renewed, before the workload loses its identity.
        #[tokio::test(start_paused = true)]
        async fn reconnects_come_sooner_as_a_served_svid_nears_its_expiry() {
            let ttl = Duration::from_secs(100);
            let fake = Fake::serving_one(ttl);
            let agent = start(&fake);
            until(Duration::from_secs(5), || agent.served(1).is_some()).await;
            let expiry = Instant::now() + ttl;
            fake.go_away();
            let min = Duration::from_millis(500);
            // Back 4 s before the workload's SVID expires.
            until(ttl, || Instant::now() + Duration::from_secs(4) >= expiry).await;
            let back = Instant::now();
            fake.0.reachable.store(true, Ordering::SeqCst);
            until(Duration::from_secs(60), || {
                fake.times(Call::Sign).iter().any(|t| *t >= back)
            })
            .await;
            let signed = *fake.times(Call::Sign).last().unwrap();
            assert!(
                signed < expiry,
                "the workload's SVID was renewed {} s after it expired",
                secs(signed - expiry)
            );
            let opens = fake.times(Call::OpenSync);
            let mut gaps = 0;
            for pair in opens.windows(2).filter(|p| p[0] < expiry) {
                let cap = ((expiry - pair[0]) / 2).max(min);
                let gap = pair[1] - pair[0];
                gaps += 1;
                assert!(
                    gap <= cap + Duration::from_millis(2),
                    "waited {} s with {} s of the workload's SVID left",
                    secs(gap),
                    secs(expiry - pair[0])
                );
            }
            assert!(gaps >= 5, "only {gaps} reconnection attempts were seen");
            agent.stop().await;
        }

        /// With the server gone, the agent serves its SVID until it
        /// expires and not a moment longer, and asks nobody to sign.
        #[tokio::test(start_paused = true)]
        async fn an_svid_is_served_while_the_server_is_gone_until_it_expires() {
            let fake = Fake::serving_one(Duration::from_secs(100));
            let agent = start(&fake);
            until(Duration::from_secs(5), || agent.served(1).is_some()).await;
            let signed_at = Instant::now();
            let signs = fake.times(Call::Sign).len();
            fake.go_away();
            until(Duration::from_secs(5), || {
                !agent.snapshots.borrow().connected
            })
            .await;
            until(Duration::from_secs(200), || agent.served(1).is_none()).await;
            let served_for = secs(Instant::now() - signed_at);
            assert!(
                (98.8..=100.3).contains(&served_for),
                "served for {served_for} s"
            );
            assert_eq!(fake.times(Call::Sign).len(), signs);
            agent.stop().await;
        }

        /// The sync stream is read while the server signs: an entry
        /// registered during a slow signing is held (and listed) at once,
        /// and signed right after.
        #[tokio::test(start_paused = true)]
        async fn the_sync_stream_is_read_while_svids_are_signed() {
            let fake = Fake::serving_one(Duration::from_secs(600));
            fake.0.gate.send_replace(false);
            let agent = start(&fake);
            until(Duration::from_secs(5), || fake.times(Call::Sign).len() == 1).await;
            fake.register(workload(2));
            let w2: EntryId = "w2".parse().unwrap();
            until(Duration::from_secs(5), || {
                agent.snapshots.borrow().entries.iter().any(|e| e.id == w2)
            })
            .await;
            assert!(agent.served(1).is_none());
            assert_eq!(fake.times(Call::Sign).len(), 1);
            fake.0.gate.send_replace(true);
            until(Duration::from_secs(5), || {
                agent.served(1).is_some() && agent.served(2).is_some()
            })
            .await;
            agent.stop().await;
        }

        /// The agent renews its own SVID near half-life, presents and saves
        /// each new one, reconnects with it, and keeps syncing and getting
        /// SVIDs signed after its first SVID expired.
        #[tokio::test(start_paused = true)]
        async fn the_agent_renews_its_own_svid_and_keeps_working() {
            let fake = Fake::new(
                Duration::from_secs(600),
                Duration::from_secs(100),
                vec![workload(1)],
            );
            let agent = start(&fake);
            let first = agent.cert.leaf();
            until(Duration::from_secs(5), || agent.served(1).is_some()).await;
            until(Duration::from_secs(200), || {
                fake.times(Call::RenewAgent).len() >= 2
            })
            .await;
            let renewals = fake.times(Call::RenewAgent);
            let started = fake.times(Call::OpenSync)[0];
            let first_wait = secs(renewals[0] - started);
            assert!(
                (38.8..=61.3).contains(&first_wait),
                "renewed after {first_wait} s"
            );
            // Each renewal is followed by a new connection presenting it.
            until(Duration::from_secs(5), || {
                fake.times(Call::OpenSync).len() >= 3
            })
            .await;
            let opens = fake.times(Call::OpenSync);
            assert!(opens[1] >= renewals[0] && opens[2] >= renewals[1]);
            let presented = agent.cert.leaf();
            assert_ne!(presented, first);
            let saved = agent.persist.load_identity().unwrap().unwrap();
            assert_eq!(saved.chain[0], presented);
            // Past the first SVID's expiry, a new entry is still signed.
            until(Duration::from_secs(200), || {
                Instant::now() >= started + Duration::from_secs(101)
            })
            .await;
            fake.register(workload(2));
            until(Duration::from_secs(5), || agent.served(2).is_some()).await;
            agent.stop().await;
        }
    }

    fn bundle_of(name: &str) -> Bundle {
        let now = SystemTime::now();
        let td = TrustDomain::new(name).unwrap();
        let mut b = Bundle::new(td.clone());
        b.x509_authorities.push(
            sigil_svid::x509::X509Authority::generate(&td, Duration::from_secs(3600), now)
                .unwrap()
                .cert_der()
                .to_vec(),
        );
        b
    }

    #[test]
    fn federated_bundles_are_replaced_as_a_set_and_bad_ones_keep_the_old() {
        let own = TrustDomain::new("example.org").unwrap();
        let (a, b) = (bundle_of("a.org"), bundle_of("b.org"));
        let sent = HashMap::from([
            ("a.org".to_owned(), a.to_json()),
            ("b.org".to_owned(), b.to_json()),
        ]);
        let held = merge_federated(&own, &FederatedBundles::new(), &sent);
        assert_eq!(held.len(), 2);
        assert_eq!(*held[&a.trust_domain], a);

        // a.org now malformed: the held one stays; b.org gone: dropped;
        // c.org new; one named like the own trust domain: refused.
        let c = bundle_of("c.org");
        let sent = HashMap::from([
            ("a.org".to_owned(), r#"{"keys": 5}"#.to_owned()),
            ("c.org".to_owned(), c.to_json()),
            ("example.org".to_owned(), bundle_of("example.org").to_json()),
            ("not a td!".to_owned(), c.to_json()),
        ]);
        let next = merge_federated(&own, &held, &sent);
        assert_eq!(
            next.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["a.org", "c.org"]
        );
        assert!(Arc::ptr_eq(&next[&a.trust_domain], &held[&a.trust_domain]));
        assert_eq!(*next[&c.trust_domain], c);
        // A malformed bundle for a trust domain not held yet is just left out.
        let next = merge_federated(
            &own,
            &FederatedBundles::new(),
            &HashMap::from([("d.org".to_owned(), "{".to_owned())]),
        );
        assert!(next.is_empty());
    }
}
