//! The in-memory entry index: every entry by ID and by parent, node aliases,
//! and the authorized-set computation of the push sync.
//!
//! It is built once from a store snapshot and then kept current by applying
//! the store's change feed in revision order, never by full reloads. Each
//! applied change is broadcast so that sync streams can react at once, and
//! remembered in a bounded log so that a sync stream can bring its agent up
//! to date from the entries that changed instead of from its whole set
//! ([`EntryIndex::authorized_since`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};

use sigil_store::{Change, ChangeKind, EntrySnapshot};
use sigil_types::{Entry, EntryId, Selectors, SpiffeId};
use tokio::sync::{broadcast, watch};

/// How many index events a slow subscriber may fall behind before it has to
/// recompute from the index (which it can always do).
const EVENT_BUFFER: usize = 4096;

/// How many entry changes the index remembers for incremental syncs. A
/// stream further behind than this recomputes its agent's whole set, which
/// is always correct; the log costs about 100 bytes per change.
const CHANGE_LOG: usize = 65_536;

/// One change applied to the index.
#[derive(Debug, Clone)]
pub enum IndexEvent {
    /// An entry was created (`old` = None), updated or deleted (`new` = None).
    Entry {
        /// The revision of the change.
        revision: u64,
        /// The entry before the change.
        old: Option<Arc<Entry>>,
        /// The entry after the change.
        new: Option<Arc<Entry>>,
    },
    /// An agent record changed or was deleted (ban, eviction, renewal).
    Agent {
        /// The revision of the change.
        revision: u64,
        /// Which agent.
        id: SpiffeId,
    },
}

/// One entry change as the incremental sync needs it.
#[derive(Debug)]
struct Logged {
    /// The revision of the change.
    revision: u64,
    /// The entry that changed.
    id: EntryId,
    /// The selectors of the entry before and after the change, on each side
    /// where it was a node alias: whether the change can add or remove an
    /// agent's alias root depends only on these.
    alias_selectors: Vec<Selectors>,
    /// Whether, when it changed, other entries were parented to the entry's
    /// SPIFFE ID before or after the change: then its change may move a
    /// whole subtree into or out of an agent's set.
    parents_others: bool,
}

#[derive(Default)]
struct IndexState {
    revision: u64,
    entries: BTreeMap<EntryId, Arc<Entry>>,
    by_parent: HashMap<SpiffeId, BTreeSet<EntryId>>,
    by_spiffe_id: HashMap<SpiffeId, BTreeSet<EntryId>>,
    aliases: BTreeSet<EntryId>,
    /// Entry changes in revision order, newest last.
    log: VecDeque<Logged>,
    /// Every entry change after this revision is in `log`.
    log_floor: u64,
    /// Most changes `log` keeps.
    log_capacity: usize,
}

impl IndexState {
    fn insert(&mut self, e: Arc<Entry>) {
        // Written before the rule existed (an upgrade), or by an older
        // server sharing the database: listed, so it can be updated or
        // deleted, but never part of an agent's set or signed.
        if let Err(reason) = e.check_reserved() {
            tracing::error!(
                entry = %e.id,
                spiffe_id = %e.spiffe_id,
                %reason,
                "stored entry has a reserved SPIFFE ID and is not served; delete it or change its SPIFFE ID"
            );
            self.entries.insert(e.id.clone(), e);
            return;
        }
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.by_spiffe_id
            .entry(e.spiffe_id.clone())
            .or_default()
            .insert(e.id.clone());
        if e.is_node_alias() {
            self.aliases.insert(e.id.clone());
        }
        self.entries.insert(e.id.clone(), e);
    }

    fn remove(&mut self, id: &EntryId) -> Option<Arc<Entry>> {
        let old = self.entries.remove(id)?;
        if let Some(set) = self.by_parent.get_mut(&old.parent_id) {
            set.remove(id);
            if set.is_empty() {
                self.by_parent.remove(&old.parent_id);
            }
        }
        if let Some(set) = self.by_spiffe_id.get_mut(&old.spiffe_id) {
            set.remove(id);
            if set.is_empty() {
                self.by_spiffe_id.remove(&old.spiffe_id);
            }
        }
        self.aliases.remove(id);
        Some(old)
    }

    /// Whether any entry is parented to `id`.
    fn parents_something(&self, id: &SpiffeId) -> bool {
        self.by_parent.get(id).is_some_and(|s| !s.is_empty())
    }

    /// Remembers a change of entry `id` from `old` to `new`; `old_parents`
    /// says whether something was parented to the old SPIFFE ID before it.
    fn log_change(
        &mut self,
        revision: u64,
        id: EntryId,
        old: Option<&Entry>,
        old_parents: bool,
        new: Option<&Entry>,
    ) {
        let parents_others =
            old_parents || new.is_some_and(|e| self.parents_something(&e.spiffe_id));
        let alias_selectors = [old, new]
            .into_iter()
            .flatten()
            .filter(|e| e.is_node_alias())
            .map(|e| e.selectors.clone())
            .collect();
        self.log.push_back(Logged {
            revision,
            id,
            alias_selectors,
            parents_others,
        });
        while self.log.len() > self.log_capacity {
            if let Some(dropped) = self.log.pop_front() {
                self.log_floor = dropped.revision;
            }
        }
    }

    /// See [`EntryIndex::authorized`].
    fn authorized(&self, agent_id: &SpiffeId, node_selectors: &Selectors) -> Authorized {
        let mut out = Authorized {
            revision: self.revision,
            ..Authorized::default()
        };
        let mut queue: VecDeque<SpiffeId> = VecDeque::new();
        out.roots.insert(agent_id.clone());
        queue.push_back(agent_id.clone());
        for alias_id in &self.aliases {
            if let Some(alias) = self.entries.get(alias_id)
                && alias.selectors.is_subset_of(node_selectors)
                && out.roots.insert(alias.spiffe_id.clone())
            {
                queue.push_back(alias.spiffe_id.clone());
            }
        }
        while let Some(parent) = queue.pop_front() {
            let Some(children) = self.by_parent.get(&parent) else {
                continue;
            };
            for child_id in children {
                let Some(child) = self.entries.get(child_id) else {
                    continue;
                };
                if child.is_node_alias() {
                    continue;
                }
                out.entries.insert(child.id.clone(), child.clone());
                if out.roots.insert(child.spiffe_id.clone()) {
                    queue.push_back(child.spiffe_id.clone());
                }
            }
        }
        out
    }

    /// See [`EntryIndex::authorized_entry`].
    fn authorized_entry(
        &self,
        id: &EntryId,
        agent_id: &SpiffeId,
        node_selectors: &Selectors,
    ) -> Option<Arc<Entry>> {
        let entry = self.entries.get(id)?;
        if entry.is_node_alias() || entry.check_reserved().is_err() {
            return None;
        }
        // The common cases answer without allocating: the incremental sync
        // asks this of every changed entry, for every connected agent.
        if &entry.parent_id == agent_id {
            return Some(entry.clone());
        }
        if !self.by_spiffe_id.contains_key(&entry.parent_id) {
            return None;
        }
        // Breadth-first over the parents: an ID is a root of the agent's tree
        // if it is the agent, a matching node alias's ID, or the SPIFFE ID of
        // an entry (not an alias) whose own parent is such a root.
        let mut seen: HashSet<&SpiffeId> = HashSet::new();
        let mut queue: VecDeque<&SpiffeId> = VecDeque::from([&entry.parent_id]);
        while let Some(parent) = queue.pop_front() {
            if !seen.insert(parent) {
                continue;
            }
            if parent == agent_id {
                return Some(entry.clone());
            }
            let Some(holders) = self.by_spiffe_id.get(parent) else {
                continue;
            };
            for holder_id in holders {
                let Some(holder) = self.entries.get(holder_id) else {
                    continue;
                };
                if holder.is_node_alias() {
                    if holder.selectors.is_subset_of(node_selectors) {
                        return Some(entry.clone());
                    }
                } else {
                    queue.push_back(&holder.parent_id);
                }
            }
        }
        None
    }
}

/// The entries an agent is authorized for, and the IDs their tree hangs from.
#[derive(Debug, Default, Clone)]
pub struct Authorized {
    /// The index revision the set was computed at.
    pub revision: u64,
    /// The entries, by ID.
    pub entries: HashMap<EntryId, Arc<Entry>>,
    /// Every ID that parents something in the set: the agent ID, the matched
    /// node aliases' IDs and the SPIFFE IDs of the entries themselves.
    pub roots: HashSet<SpiffeId>,
}

impl Authorized {
    /// Whether a change to this entry (old or new state) can alter the set.
    pub fn concerns(&self, entry: &Entry) -> bool {
        entry.is_node_alias()
            || self.entries.contains_key(&entry.id)
            || self.roots.contains(&entry.parent_id)
    }
}

/// How an agent's authorized set changed since a revision (see
/// [`EntryIndex::authorized_since`]).
#[derive(Debug)]
pub enum SetChange {
    /// The whole set: the change log no longer reaches back far enough, or a
    /// change may have moved a subtree into or out of the set.
    Full(Authorized),
    /// Only these entries may have changed status; every other entry is in
    /// the set now exactly when it was at the earlier revision.
    Entries {
        /// The index revision the answer is current with.
        revision: u64,
        /// Each changed entry: `Some` with its current state when the agent is
        /// authorized for it now, `None` when not (or deleted). Each ID once.
        changed: Vec<(EntryId, Option<Arc<Entry>>)>,
    },
}

/// How `ListEntries` matches selectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorMatch {
    /// The entry's selectors equal the given ones.
    Exact,
    /// The entry's selectors are a subset of the given ones (the workload view).
    Subset,
    /// The entry holds all the given selectors (and maybe more).
    Superset,
    /// The entry holds at least one of the given selectors.
    Any,
}

/// A selector match mode other than `exact`, `subset`, `superset` or `any`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector match {0:?} must be one of exact, subset, superset, any")]
pub struct UnknownSelectorMatch(pub String);

impl std::str::FromStr for SelectorMatch {
    type Err = UnknownSelectorMatch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exact" => Ok(Self::Exact),
            "subset" => Ok(Self::Subset),
            "" | "superset" => Ok(Self::Superset),
            "any" => Ok(Self::Any),
            other => Err(UnknownSelectorMatch(other.to_owned())),
        }
    }
}

/// Filters of an entry listing; `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Exact SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Exact parent ID.
    pub parent_id: Option<SpiffeId>,
    /// Selectors and how to match them.
    pub selectors: Option<(Selectors, SelectorMatch)>,
}

impl EntryFilter {
    fn matches(&self, e: &Entry) -> bool {
        if self.spiffe_id.as_ref().is_some_and(|id| *id != e.spiffe_id) {
            return false;
        }
        if self.parent_id.as_ref().is_some_and(|id| *id != e.parent_id) {
            return false;
        }
        match &self.selectors {
            None => true,
            Some((s, SelectorMatch::Exact)) => *s == e.selectors,
            Some((s, SelectorMatch::Subset)) => e.selectors.is_subset_of(s),
            Some((s, SelectorMatch::Superset)) => s.is_subset_of(&e.selectors),
            Some((s, SelectorMatch::Any)) => s.iter().any(|x| e.selectors.contains(x)),
        }
    }
}

/// The index; shared by the APIs and fed by the change follower.
pub struct EntryIndex {
    state: RwLock<IndexState>,
    events: broadcast::Sender<Arc<IndexEvent>>,
    revision: watch::Sender<u64>,
}

impl std::fmt::Debug for EntryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryIndex")
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl EntryIndex {
    /// Builds the index from a consistent snapshot.
    pub fn new(snapshot: EntrySnapshot) -> Self {
        Self::with_log_capacity(snapshot, CHANGE_LOG)
    }

    /// Builds the index remembering at most `capacity` entry changes for
    /// incremental syncs (tests use small logs to reach the fallback).
    pub fn with_log_capacity(snapshot: EntrySnapshot, capacity: usize) -> Self {
        let mut state = IndexState {
            revision: snapshot.revision,
            log_floor: snapshot.revision,
            log_capacity: capacity,
            ..IndexState::default()
        };
        for e in snapshot.entries {
            state.insert(Arc::new(e));
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (revision, _) = watch::channel(snapshot.revision);
        Self {
            state: RwLock::new(state),
            events,
            revision,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, IndexState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The revision of the last applied change.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Applies one change; changes at or below the current revision are
    /// ignored, so replaying the feed is harmless.
    pub fn apply(&self, change: Change) {
        let event = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            if change.revision <= state.revision {
                return;
            }
            state.revision = change.revision;
            match change.kind {
                ChangeKind::EntryUpserted(e) => {
                    let old_parents = state
                        .entries
                        .get(&e.id)
                        .is_some_and(|o| state.parents_something(&o.spiffe_id));
                    let old = state.remove(&e.id);
                    let new = Arc::new(e);
                    state.insert(new.clone());
                    state.log_change(
                        change.revision,
                        new.id.clone(),
                        old.as_deref(),
                        old_parents,
                        Some(&new),
                    );
                    Some(IndexEvent::Entry {
                        revision: change.revision,
                        old,
                        new: Some(new),
                    })
                }
                ChangeKind::EntryDeleted(e) => {
                    let held = state.entries.get(&e.id).cloned();
                    let old_parents = held
                        .as_ref()
                        .is_some_and(|o| state.parents_something(&o.spiffe_id))
                        || state.parents_something(&e.spiffe_id);
                    let old = state.remove(&e.id).or_else(|| Some(Arc::new(e)));
                    if let Some(o) = &old {
                        state.log_change(change.revision, o.id.clone(), Some(o), old_parents, None);
                    }
                    Some(IndexEvent::Entry {
                        revision: change.revision,
                        old,
                        new: None,
                    })
                }
                ChangeKind::AgentChanged(id) | ChangeKind::AgentDeleted(id) => {
                    Some(IndexEvent::Agent {
                        revision: change.revision,
                        id,
                    })
                }
                // Bundles and federation relationships are not entries; the
                // change follower hands them to federation. The revision
                // still advances, or the follower would read them forever.
                _ => None,
            }
        };
        self.revision.send_replace(change.revision);
        // No subscriber is fine: nobody is syncing.
        if let Some(event) = event {
            let _ = self.events.send(Arc::new(event));
        }
    }

    /// Waits until the index has applied `revision` (read-your-writes for the admin API).
    pub async fn wait_for(&self, revision: u64) {
        let mut rx = self.revision.subscribe();
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    /// Subscribes to applied changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<IndexEvent>> {
        self.events.subscribe()
    }

    /// One entry by ID.
    pub fn get(&self, id: &EntryId) -> Option<Arc<Entry>> {
        self.read().entries.get(id).cloned()
    }

    /// How many entries the index holds.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries authorized for an agent: those parented to its ID or to a
    /// node alias its node selectors satisfy, and, recursively, those
    /// parented to the SPIFFE ID of an entry already in the set.
    pub fn authorized(&self, agent_id: &SpiffeId, node_selectors: &Selectors) -> Authorized {
        self.read().authorized(agent_id, node_selectors)
    }

    /// The entry `id` if it is authorized for the agent, found by walking up
    /// its parent chain instead of computing the agent's whole set: the cost
    /// is the depth of the tree times the entries sharing a SPIFFE ID, not
    /// the size of the agent's set. Same answer as [`EntryIndex::authorized`].
    pub fn authorized_entry(
        &self,
        id: &EntryId,
        agent_id: &SpiffeId,
        node_selectors: &Selectors,
    ) -> Option<Arc<Entry>> {
        self.read().authorized_entry(id, agent_id, node_selectors)
    }

    /// How the agent's set changed after revision `since`, at which the
    /// agent was authorized for exactly the entries `held` says yes to. The
    /// cost is in proportion to the entries changed since then, except when
    /// the answer is [`SetChange::Full`]: the log no longer reaches back to
    /// `since`, a node alias whose selectors the agent satisfies (before or
    /// after) changed, or an entry that other entries are parented to changed
    /// while the agent held it or holds it now. Any other change can alter
    /// only its own entry's status, because an entry's status depends only
    /// on the chain of entries and aliases above it (see design-notes.md).
    pub fn authorized_since(
        &self,
        since: u64,
        agent_id: &SpiffeId,
        node_selectors: &Selectors,
        held: impl Fn(&EntryId) -> bool,
    ) -> SetChange {
        let state = self.read();
        if since < state.log_floor || since > state.revision {
            return SetChange::Full(state.authorized(agent_id, node_selectors));
        }
        let first = state.log.partition_point(|l| l.revision <= since);
        // Each changed ID once, with whether any of its changes could move
        // a subtree.
        let mut order: Vec<&EntryId> = Vec::new();
        let mut moves_subtree: HashMap<&EntryId, bool> = HashMap::new();
        for logged in state.log.range(first..) {
            if logged
                .alias_selectors
                .iter()
                .any(|s| s.is_subset_of(node_selectors))
            {
                return SetChange::Full(state.authorized(agent_id, node_selectors));
            }
            let flag = moves_subtree.entry(&logged.id).or_insert_with(|| {
                order.push(&logged.id);
                false
            });
            *flag |= logged.parents_others;
        }
        let mut changed = Vec::with_capacity(order.len());
        for id in order {
            let now = state.authorized_entry(id, agent_id, node_selectors);
            if moves_subtree.get(id).copied().unwrap_or(true) && (now.is_some() || held(id)) {
                return SetChange::Full(state.authorized(agent_id, node_selectors));
            }
            changed.push((id.clone(), now));
        }
        SetChange::Entries {
            revision: state.revision,
            changed,
        }
    }

    /// A page of entries in ID order after `after`, filtered; returns the
    /// page and the ID to continue after, if more remain.
    pub fn list(
        &self,
        filter: &EntryFilter,
        after: Option<&EntryId>,
        limit: usize,
    ) -> (Vec<Arc<Entry>>, Option<EntryId>) {
        let state = self.read();
        let range = match after {
            Some(id) => state.entries.range((
                std::ops::Bound::Excluded(id.clone()),
                std::ops::Bound::Unbounded,
            )),
            None => state.entries.range(..),
        };
        let mut page = Vec::new();
        for (_, e) in range {
            if !filter.matches(e) {
                continue;
            }
            if page.len() == limit {
                let next = page.last().map(|e: &Arc<Entry>| e.id.clone());
                return (page, next);
            }
            page.push(e.clone());
        }
        (page, None)
    }

    /// An entry with the same parent, SPIFFE ID and selectors as `e`,
    /// other than `e` itself. It looks only at the smaller of the entries
    /// sharing `e`'s parent and those sharing its SPIFFE ID: every create
    /// asks, and one parent (an agent) can hold 100,000 entries.
    pub fn duplicate_of(&self, e: &Entry) -> Option<EntryId> {
        let state = self.read();
        let same_parent = state.by_parent.get(&e.parent_id)?;
        let same_id = state.by_spiffe_id.get(&e.spiffe_id)?;
        let fewer = if same_id.len() < same_parent.len() {
            same_id
        } else {
            same_parent
        };
        fewer.iter().find_map(|id| {
            let other = state.entries.get(id)?;
            (other.id != e.id
                && other.parent_id == e.parent_id
                && other.spiffe_id == e.spiffe_id
                && other.selectors == e.selectors)
                .then(|| other.id.clone())
        })
    }

    /// Entries whose `expires_at` is at or before `now` (Unix seconds).
    pub fn expired(&self, now: i64) -> Vec<EntryId> {
        self.read()
            .entries
            .values()
            .filter(|e| e.expires_at.is_some_and(|t| t <= now))
            .map(|e| e.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, spiffe: &str, parent: &str, sel: &[&str]) -> Entry {
        Entry::new(
            id.parse().unwrap(),
            spiffe.parse().unwrap(),
            parent.parse().unwrap(),
            Selectors::parse_all(sel).unwrap(),
        )
    }

    const AGENT: &str = "spiffe://td/sigil/agent/join_token/a1";
    const SERVER: &str = "spiffe://td/sigil/server";

    fn index() -> EntryIndex {
        EntryIndex::new(EntrySnapshot {
            entries: vec![
                entry("direct", "spiffe://td/web", AGENT, &["unix:uid:1"]),
                entry(
                    "nested",
                    "spiffe://td/web/child",
                    "spiffe://td/web",
                    &["unix:uid:2"],
                ),
                entry("alias", "spiffe://td/nodes/eu", SERVER, &["node:region:eu"]),
                entry(
                    "via-alias",
                    "spiffe://td/db",
                    "spiffe://td/nodes/eu",
                    &["unix:uid:3"],
                ),
                entry(
                    "other-agent",
                    "spiffe://td/x",
                    "spiffe://td/sigil/agent/join_token/b2",
                    &["unix:uid:4"],
                ),
                entry(
                    "alias-us",
                    "spiffe://td/nodes/us",
                    SERVER,
                    &["node:region:us"],
                ),
                entry(
                    "via-us",
                    "spiffe://td/us-only",
                    "spiffe://td/nodes/us",
                    &["unix:uid:5"],
                ),
            ],
            revision: 7,
        })
    }

    #[tokio::test]
    async fn bundle_and_federation_changes_advance_the_revision_only() {
        let idx = index();
        let mut events = idx.subscribe();
        let td = sigil_types::TrustDomain::new("other.org").unwrap();
        for (revision, kind) in [
            (8, ChangeKind::BundleChanged(td.clone())),
            (9, ChangeKind::FederationChanged(td.clone())),
            (10, ChangeKind::FederationDeleted(td.clone())),
            (11, ChangeKind::BundleDeleted(td)),
        ] {
            idx.apply(Change { revision, kind });
            assert_eq!(idx.revision(), revision);
        }
        // Waiters on the revision are released; no entry event was sent.
        idx.wait_for(11).await;
        assert!(events.try_recv().is_err());
        assert_eq!(idx.len(), 7);
    }

    fn ids(a: &Authorized) -> Vec<String> {
        let mut v: Vec<String> = a.entries.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn authorized_walks_agent_aliases_and_descendants() {
        let idx = index();
        let node = Selectors::parse_all(["node:region:eu", "node:zone:a"]).unwrap();
        let a = idx.authorized(&AGENT.parse().unwrap(), &node);
        assert_eq!(ids(&a), vec!["direct", "nested", "via-alias"]);
        let none = Selectors::new();
        let b = idx.authorized(&AGENT.parse().unwrap(), &none);
        assert_eq!(ids(&b), vec!["direct", "nested"]);
    }

    #[test]
    fn authorized_entry_agrees_with_the_full_set() {
        let idx = index();
        let agent: SpiffeId = AGENT.parse().unwrap();
        for node in [
            Selectors::new(),
            Selectors::parse_all(["node:region:eu"]).unwrap(),
            Selectors::parse_all(["node:region:us", "node:region:eu"]).unwrap(),
        ] {
            let full = idx.authorized(&agent, &node);
            for id in [
                "direct",
                "nested",
                "alias",
                "via-alias",
                "other-agent",
                "alias-us",
                "via-us",
                "missing",
            ] {
                let id: EntryId = id.parse().unwrap();
                assert_eq!(
                    idx.authorized_entry(&id, &agent, &node).is_some(),
                    full.entries.contains_key(&id),
                    "{id} with {node:?}"
                );
            }
        }
        // A cycle (an entry parented to its own descendant) terminates.
        idx.apply(Change {
            revision: 8,
            kind: ChangeKind::EntryUpserted(entry(
                "loop-a",
                "spiffe://td/a",
                "spiffe://td/b",
                &["x:1"],
            )),
        });
        idx.apply(Change {
            revision: 9,
            kind: ChangeKind::EntryUpserted(entry(
                "loop-b",
                "spiffe://td/b",
                "spiffe://td/a",
                &["x:2"],
            )),
        });
        assert!(
            idx.authorized_entry(&"loop-a".parse().unwrap(), &agent, &Selectors::new())
                .is_none()
        );
    }

    #[test]
    fn changes_apply_in_order_and_are_broadcast() {
        let idx = index();
        let mut rx = idx.subscribe();
        let e = entry("new", "spiffe://td/new", AGENT, &["unix:uid:9"]);
        idx.apply(Change {
            revision: 8,
            kind: ChangeKind::EntryUpserted(e.clone()),
        });
        // Replays are ignored.
        idx.apply(Change {
            revision: 8,
            kind: ChangeKind::EntryDeleted(e.clone()),
        });
        assert_eq!(idx.revision(), 8);
        assert!(idx.get(&"new".parse().unwrap()).is_some());
        match &*rx.try_recv().unwrap() {
            IndexEvent::Entry { revision, old, new } => {
                assert_eq!(*revision, 8);
                assert!(old.is_none());
                assert_eq!(new.as_ref().unwrap().id.as_str(), "new");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(rx.try_recv().is_err());
        idx.apply(Change {
            revision: 9,
            kind: ChangeKind::EntryDeleted(e),
        });
        assert!(idx.get(&"new".parse().unwrap()).is_none());
    }

    /// Entries with a reserved SPIFFE ID that reach the store anyway (an
    /// upgrade, an older server on the same database) are listed but never
    /// authorized, nor is anything parented to them.
    #[test]
    fn stored_reserved_entries_are_not_served() {
        let idx = index();
        let agent: SpiffeId = AGENT.parse().unwrap();
        idx.apply(Change {
            revision: 8,
            kind: ChangeKind::EntryUpserted(entry(
                "posing",
                "spiffe://td/sigil/server",
                AGENT,
                &["unix:uid:1"],
            )),
        });
        idx.apply(Change {
            revision: 9,
            kind: ChangeKind::EntryUpserted(entry(
                "reserved-web",
                "spiffe://td/sigil/web",
                AGENT,
                &["unix:uid:1"],
            )),
        });
        idx.apply(Change {
            revision: 10,
            kind: ChangeKind::EntryUpserted(entry(
                "under-reserved",
                "spiffe://td/ok",
                "spiffe://td/sigil/web",
                &["unix:uid:1"],
            )),
        });
        idx.apply(Change {
            revision: 11,
            kind: ChangeKind::EntryUpserted(entry(
                "agent-alias",
                "spiffe://td/Sigil/Agent/join_token/b2",
                SERVER,
                &["node:region:eu"],
            )),
        });
        let node = Selectors::parse_all(["node:region:eu"]).unwrap();
        let auth = idx.authorized(&agent, &node);
        for id in ["posing", "reserved-web", "under-reserved", "agent-alias"] {
            let id: EntryId = id.parse().unwrap();
            assert!(idx.get(&id).is_some(), "{id} is listed");
            assert!(!auth.entries.contains_key(&id), "{id}");
            assert!(idx.authorized_entry(&id, &agent, &node).is_none(), "{id}");
        }
        // The alias posing as agent b2 does not hand b2's entries to a1.
        assert!(
            !auth
                .entries
                .contains_key(&"other-agent".parse::<EntryId>().unwrap())
        );
        // Fixing the ID serves it.
        idx.apply(Change {
            revision: 12,
            kind: ChangeKind::EntryUpserted(entry(
                "posing",
                "spiffe://td/web2",
                AGENT,
                &["unix:uid:1"],
            )),
        });
        let id: EntryId = "posing".parse().unwrap();
        assert!(idx.authorized_entry(&id, &agent, &node).is_some());
    }

    #[test]
    fn concerns_only_related_changes() {
        let idx = index();
        let a = idx.authorized(&AGENT.parse().unwrap(), &Selectors::new());
        assert!(a.concerns(&entry("z", "spiffe://td/z", AGENT, &["a:b"])));
        assert!(a.concerns(&entry(
            "z",
            "spiffe://td/z",
            "spiffe://td/web/child",
            &["a:b"]
        )));
        assert!(!a.concerns(&entry(
            "z",
            "spiffe://td/z",
            "spiffe://td/sigil/agent/x",
            &["a:b"]
        )));
        assert!(a.concerns(&entry("z", "spiffe://td/z", SERVER, &["a:b"])));
    }

    #[test]
    fn list_pages_and_filters() {
        let idx = index();
        let (p1, next) = idx.list(&EntryFilter::default(), None, 3);
        assert_eq!(p1.len(), 3);
        let (p2, next2) = idx.list(&EntryFilter::default(), next.as_ref(), 3);
        assert_eq!(p2.len(), 3);
        let (p3, next3) = idx.list(&EntryFilter::default(), next2.as_ref(), 3);
        assert_eq!(p3.len(), 1);
        assert!(next3.is_none());
        let f = EntryFilter {
            parent_id: Some(SERVER.parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(idx.list(&f, None, 100).0.len(), 2);
        let f = EntryFilter {
            selectors: Some((
                Selectors::parse_all(["unix:uid:1", "unix:uid:2"]).unwrap(),
                SelectorMatch::Subset,
            )),
            ..Default::default()
        };
        assert_eq!(idx.list(&f, None, 100).0.len(), 2);
        let f = EntryFilter {
            selectors: Some((
                Selectors::parse_all(["unix:uid:1"]).unwrap(),
                SelectorMatch::Exact,
            )),
            ..Default::default()
        };
        assert_eq!(idx.list(&f, None, 100).0[0].id.as_str(), "direct");
    }

    #[test]
    fn duplicates_are_found_whichever_side_is_smaller() {
        // One parent with many children of distinct SPIFFE IDs, and one
        // SPIFFE ID under many parents.
        let mut entries: Vec<Entry> = (0..60)
            .map(|i| {
                entry(
                    &format!("c{i}"),
                    &format!("spiffe://td/w{i}"),
                    AGENT,
                    &["unix:uid:1"],
                )
            })
            .collect();
        entries.extend((0..50).map(|i| {
            entry(
                &format!("p{i}"),
                "spiffe://td/shared",
                &format!("spiffe://td/parent{i}"),
                &["unix:uid:1"],
            )
        }));
        let idx = EntryIndex::new(EntrySnapshot {
            entries,
            revision: 1,
        });
        let dup = entry("new", "spiffe://td/w7", AGENT, &["unix:uid:1"]);
        assert_eq!(idx.duplicate_of(&dup).unwrap().as_str(), "c7");
        let dup = entry(
            "new",
            "spiffe://td/shared",
            "spiffe://td/parent9",
            &["unix:uid:1"],
        );
        assert_eq!(idx.duplicate_of(&dup).unwrap().as_str(), "p9");
        // The same SPIFFE ID and selectors under another parent is not one.
        let other = entry("new", "spiffe://td/shared", AGENT, &["unix:uid:1"]);
        assert!(idx.duplicate_of(&other).is_none());
        let other = entry(
            "new",
            "spiffe://td/w7",
            "spiffe://td/parent9",
            &["unix:uid:1"],
        );
        assert!(idx.duplicate_of(&other).is_none());
    }

    #[test]
    fn duplicates_are_found() {
        let idx = index();
        let mut dup = entry("another", "spiffe://td/web", AGENT, &["unix:uid:1"]);
        assert_eq!(idx.duplicate_of(&dup).unwrap().as_str(), "direct");
        dup.selectors = Selectors::parse_all(["unix:uid:99"]).unwrap();
        assert!(idx.duplicate_of(&dup).is_none());
    }
}
