//! The in-memory entry index: every entry by ID and by parent, node aliases,
//! the authorized-set computation of the push sync, and the sync streams'
//! subscriptions.
//!
//! It is built once from a store snapshot and then kept current by applying
//! the store's change feed in revision order, never by full reloads. Each
//! applied change is routed to the sync streams it concerns, and only to
//! them ([`EntryIndex::subscribe`]): a stream's subscription holds the keys
//! its agent's set hangs from (the agent's ID, the node aliases its
//! selectors match), and a change reaches it with the entry that changed, so
//! that the stream brings its agent up to date from that entry instead of
//! from its whole set ([`Subscription::catch_up`]).

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sigil_store::{Change, ChangeKind, EntrySnapshot};
use sigil_types::{Entry, EntryId, Selector, Selectors, SpiffeId};
use tokio::sync::{Notify, watch};

/// How many changed entries a subscription holds for its stream before it
/// gives them up for a whole-set recompute (which is always correct). A
/// stream this far behind costs its agent's set once, not its backlog.
const INBOX: usize = 4096;

/// What a subscription holds for its stream until the stream catches up.
#[derive(Debug, Default)]
struct Pending {
    /// Each changed entry once, with whether any of its changes may move a
    /// subtree (other entries were parented to its SPIFFE ID before or
    /// after the change).
    entries: HashMap<EntryId, bool>,
    /// The stream must recompute its agent's whole set: a node alias its
    /// agent matches (before or after) changed, or `entries` overflowed.
    full: bool,
    /// The agent's record changed or was deleted.
    agent: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && !self.full && !self.agent
    }
}

/// The part of a subscription the index writes to and its stream reads.
#[derive(Debug, Default)]
struct Inbox {
    pending: Mutex<Pending>,
    notify: Notify,
    /// How many changes were routed here (for tests and debugging).
    routed: AtomicU64,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the stream one changed entry.
    fn entry(&self, id: &EntryId, moves_subtree: bool, capacity: usize) {
        {
            let mut p = self.lock();
            if !p.full {
                if let Some(flag) = p.entries.get_mut(id) {
                    *flag |= moves_subtree;
                } else if p.entries.len() < capacity {
                    p.entries.insert(id.clone(), moves_subtree);
                } else {
                    p.entries.clear();
                    p.full = true;
                }
            }
        }
        self.wake();
    }

    /// Tells the stream to recompute its agent's whole set.
    fn full(&self) {
        {
            let mut p = self.lock();
            p.entries.clear();
            p.full = true;
        }
        self.wake();
    }

    /// Tells the stream its agent's record changed.
    fn agent(&self) {
        self.lock().agent = true;
        self.wake();
    }

    fn wake(&self) {
        self.routed.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
    }
}

/// One subscribed sync stream, as the index routes to it.
#[derive(Debug)]
struct Subscriber {
    agent_id: SpiffeId,
    node_selectors: Selectors,
    /// The node aliases (entry IDs) the agent's selectors satisfy.
    aliases: Vec<EntryId>,
    inbox: Arc<Inbox>,
}

/// Every subscription, and the keys a change is routed by: the agent's ID
/// (entries parented to it, and its record) and the node aliases it
/// matches. Kept under the index's lock, so that routing a change and a
/// stream reading the index see the same revision.
#[derive(Debug, Default)]
struct Subscribers {
    next: u64,
    all: HashMap<u64, Subscriber>,
    by_agent: HashMap<SpiffeId, HashSet<u64>>,
    by_alias: HashMap<EntryId, HashSet<u64>>,
    /// Most changed entries one inbox holds ([`INBOX`]; tests use less).
    capacity: usize,
}

/// The IDs of the entries sharing a parent ID or a SPIFFE ID, in ID order.
/// Most SPIFFE IDs are held by one entry, so one ID is held inline: a
/// `BTreeSet` of one takes a 200-byte node (docs/benchmarks.md, "Server
/// memory per entry"). Never empty in the maps.
#[derive(Debug, PartialEq, Eq)]
enum Ids {
    One(EntryId),
    #[allow(
        clippy::box_collection,
        reason = "boxed, the set keeps `Ids` as small as one inline ID (16 bytes, not 32), and so the maps' buckets; two or more IDs are the rare case"
    )]
    Many(Box<BTreeSet<EntryId>>),
}

impl Ids {
    fn insert(&mut self, id: EntryId) {
        match self {
            Ids::One(one) if *one == id => {}
            Ids::One(one) => {
                let set = BTreeSet::from([one.clone(), id]);
                *self = Ids::Many(Box::new(set));
            }
            Ids::Many(set) => {
                set.insert(id);
            }
        }
    }

    /// Removes `id`; returns whether none is left.
    fn remove(&mut self, id: &EntryId) -> bool {
        match self {
            Ids::One(one) => one == id,
            // Two or more before (one is held inline), so one or more after.
            Ids::Many(set) => {
                set.remove(id);
                if set.len() == 1
                    && let Some(last) = set.pop_first()
                {
                    *self = Ids::One(last);
                }
                false
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Ids::One(_) => 1,
            Ids::Many(set) => set.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &EntryId> {
        let (one, many) = match self {
            Ids::One(id) => (Some(id), None),
            Ids::Many(set) => (None, Some(set.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// Adds `id` under `key`, sharing `key`'s text with the map's copy, or,
/// for a new key, with `other`'s (parent IDs are often SPIFFE IDs of other
/// entries, and the other way round).
fn add_id(
    map: &mut HashMap<SpiffeId, Ids>,
    other: &HashMap<SpiffeId, Ids>,
    key: &mut SpiffeId,
    id: EntryId,
) {
    match map.entry(key.clone()) {
        Slot::Occupied(mut o) => {
            *key = o.key().clone();
            o.get_mut().insert(id);
        }
        Slot::Vacant(v) => match other.get_key_value(key) {
            Some((shared, _)) => {
                *key = shared.clone();
                map.insert(shared.clone(), Ids::One(id));
            }
            None => {
                v.insert(Ids::One(id));
            }
        },
    }
}

/// Removes `id` from under `key`, and `key` when nothing is left under it.
fn remove_id(map: &mut HashMap<SpiffeId, Ids>, key: &SpiffeId, id: &EntryId) {
    if let Some(ids) = map.get_mut(key)
        && ids.remove(id)
    {
        map.remove(key);
    }
}

#[derive(Default)]
struct IndexState {
    revision: u64,
    entries: BTreeMap<EntryId, Arc<Entry>>,
    by_parent: HashMap<SpiffeId, Ids>,
    by_spiffe_id: HashMap<SpiffeId, Ids>,
    /// One copy of each selector the entries carry, shared by all of them,
    /// with how many entries carry it (removed at zero).
    selectors: HashMap<Selector, u32>,
    aliases: BTreeSet<EntryId>,
    subs: Subscribers,
}

impl IndexState {
    /// Adds an entry (whose ID is not in the index), its parent ID, SPIFFE
    /// ID and selectors sharing the copies the index holds.
    fn insert(&mut self, mut e: Entry) -> Arc<Entry> {
        let table = &mut self.selectors;
        e.selectors.share(|s| match table.entry(s.clone()) {
            Slot::Occupied(mut o) => {
                *o.get_mut() += 1;
                o.key().clone()
            }
            Slot::Vacant(v) => {
                v.insert(1);
                s.clone()
            }
        });
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
            let e = Arc::new(e);
            self.entries.insert(e.id.clone(), e.clone());
            return e;
        }
        add_id(
            &mut self.by_parent,
            &self.by_spiffe_id,
            &mut e.parent_id,
            e.id.clone(),
        );
        add_id(
            &mut self.by_spiffe_id,
            &self.by_parent,
            &mut e.spiffe_id,
            e.id.clone(),
        );
        if e.is_node_alias() {
            self.aliases.insert(e.id.clone());
        }
        let e = Arc::new(e);
        self.entries.insert(e.id.clone(), e.clone());
        e
    }

    fn remove(&mut self, id: &EntryId) -> Option<Arc<Entry>> {
        let old = self.entries.remove(id)?;
        for s in &old.selectors {
            if let Some(n) = self.selectors.get_mut(s) {
                *n -= 1;
                if *n == 0 {
                    self.selectors.remove(s);
                }
            }
        }
        remove_id(&mut self.by_parent, &old.parent_id, id);
        remove_id(&mut self.by_spiffe_id, &old.spiffe_id, id);
        self.aliases.remove(id);
        Some(old)
    }

    /// Whether any entry is parented to `id`.
    fn parents_something(&self, id: &SpiffeId) -> bool {
        self.by_parent.contains_key(id)
    }

    /// Routes the change of one entry from `old` to `new` (already applied)
    /// to the subscriptions it may concern; `old_parents` says whether
    /// something was parented to the old SPIFFE ID before the change.
    ///
    /// An entry is in an agent's set when the chain of entries above it
    /// (through the holders of each parent ID) reaches the agent's ID or a
    /// node alias its selectors match. So a change concerns the agents its
    /// old and new parent chains reach, and, for a node alias, the agents
    /// that matched it before or match it now; a stream told of nothing else
    /// has nothing else to do (design-notes.md, "Sync streams subscribe").
    fn route_entry(
        &mut self,
        id: &EntryId,
        old: Option<&Entry>,
        old_parents: bool,
        new: Option<&Entry>,
    ) {
        if self.subs.all.is_empty() {
            return;
        }
        let moves_subtree =
            old_parents || new.is_some_and(|e| self.parents_something(&e.spiffe_id));
        let mut full: HashSet<u64> = HashSet::new();
        if old.is_some_and(Entry::is_node_alias) {
            full.extend(self.subs.unmatch_alias(id));
        }
        if let Some(alias) = new.filter(|e| e.is_node_alias())
            && self.aliases.contains(id)
        {
            full.extend(self.subs.match_alias(id, &alias.selectors));
        }
        let mut reached: HashSet<u64> = HashSet::new();
        for side in [old, new].into_iter().flatten() {
            if !side.is_node_alias() {
                self.reach(&side.parent_id, &mut reached);
            }
        }
        for sub in &full {
            if let Some(s) = self.subs.all.get(sub) {
                s.inbox.full();
            }
        }
        for sub in reached.difference(&full) {
            if let Some(s) = self.subs.all.get(sub) {
                s.inbox.entry(id, moves_subtree, self.subs.capacity);
            }
        }
    }

    /// Walks up from `parent`, the parent ID of an entry, breadth-first
    /// through the entries holding each ID it reaches, and shows `visit`
    /// what the entry's set membership hangs from: every ID of the chain
    /// ([`Above::Id`], `parent` first, each once), and every node alias
    /// holding one of them ([`Above::Alias`]). An entry (not an alias) whose
    /// SPIFFE ID is reached brings its own parent ID into the chain. The
    /// entry belongs to an agent's set when the chain holds the agent's ID or
    /// an alias the agent's selectors match. `visit` breaks the walk off.
    ///
    /// The common cases allocate nothing: a break at `parent`, and a
    /// `parent` no entry holds (an entry parented to an agent); incremental
    /// sync and routing walk from every changed entry.
    fn walk_up<'a, B>(
        &'a self,
        parent: &'a SpiffeId,
        mut visit: impl FnMut(Above<'a>) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        visit(Above::Id(parent))?;
        if !self.by_spiffe_id.contains_key(parent) {
            return ControlFlow::Continue(());
        }
        let mut seen: HashSet<&SpiffeId> = HashSet::from([parent]);
        let mut queue: VecDeque<&SpiffeId> = VecDeque::from([parent]);
        while let Some(id) = queue.pop_front() {
            let Some(holders) = self.by_spiffe_id.get(id) else {
                continue;
            };
            for holder in holders.iter().filter_map(|h| self.entries.get(h)) {
                if holder.is_node_alias() {
                    visit(Above::Alias(holder))?;
                } else if seen.insert(&holder.parent_id) {
                    visit(Above::Id(&holder.parent_id))?;
                    queue.push_back(&holder.parent_id);
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// Adds to `out` the subscriptions whose agent an entry parented to
    /// `parent` may belong to: the agents the chain above `parent` reaches,
    /// and the members of the node aliases it reaches (the walk of
    /// [`IndexState::authorized_entry`], for every agent at once).
    fn reach(&self, parent: &SpiffeId, out: &mut HashSet<u64>) {
        let subs = &self.subs;
        // Never broken off: every agent the chain reaches is wanted.
        let ControlFlow::Continue(()) = self.walk_up(parent, |above| {
            let members = match above {
                Above::Id(id) => subs.by_agent.get(id),
                Above::Alias(alias) => subs.by_alias.get(&alias.id),
            };
            out.extend(members.into_iter().flatten());
            ControlFlow::<Infallible>::Continue(())
        });
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
            // Room for every child at once: growing would hash every key
            // again (about a fifth of this walk for an agent of 100,000
            // entries; docs/benchmarks.md, "First sync of 100,000 entries").
            out.entries.reserve(children.len());
            out.roots.reserve(children.len());
            for child_id in children.iter() {
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
        // The agent's own ID or a node alias it matches in the chain above.
        let found = self.walk_up(&entry.parent_id, |above| match above {
            Above::Id(chain_id) if chain_id == agent_id => ControlFlow::Break(()),
            Above::Alias(alias) if alias.selectors.is_subset_of(node_selectors) => {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        });
        found.is_break().then(|| entry.clone())
    }
}

/// What [`IndexState::walk_up`] meets above an entry.
#[derive(Debug, Clone, Copy)]
enum Above<'a> {
    /// An ID of the chain: the entry's parent ID, or the parent ID of an
    /// entry holding an ID of the chain.
    Id(&'a SpiffeId),
    /// A node alias whose SPIFFE ID is an ID of the chain.
    Alias(&'a Entry),
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
/// [`Subscription::catch_up`]).
#[derive(Debug)]
pub enum SetChange {
    /// The whole set: the stream fell too far behind, a node alias the agent
    /// matches changed, or a change may have moved a subtree into or out of
    /// the set.
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
    /// IDs that start with this (a controller's own entries). The listing
    /// then reads only that range of the ID-ordered entries.
    pub id_prefix: Option<EntryId>,
}

impl EntryFilter {
    fn matches(&self, e: &Entry) -> bool {
        if self
            .id_prefix
            .as_ref()
            .is_some_and(|p| !e.id.as_str().starts_with(p.as_str()))
        {
            return false;
        }
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

impl Subscribers {
    /// Registers a stream of `agent_id`, matching it against `aliases`.
    fn add<'a>(
        &mut self,
        agent_id: SpiffeId,
        node_selectors: Selectors,
        aliases: impl Iterator<Item = &'a Entry>,
    ) -> (u64, Arc<Inbox>) {
        let sub = self.next;
        self.next += 1;
        let inbox = Arc::new(Inbox::default());
        self.by_agent
            .entry(agent_id.clone())
            .or_default()
            .insert(sub);
        self.all.insert(
            sub,
            Subscriber {
                agent_id,
                node_selectors,
                aliases: Vec::new(),
                inbox: inbox.clone(),
            },
        );
        self.match_all(sub, aliases);
        (sub, inbox)
    }

    /// Unregisters a stream.
    fn remove(&mut self, sub: u64) {
        let Some(s) = self.all.remove(&sub) else {
            return;
        };
        self.forget_aliases(sub, &s.aliases);
        if let Some(set) = self.by_agent.get_mut(&s.agent_id) {
            set.remove(&sub);
            if set.is_empty() {
                self.by_agent.remove(&s.agent_id);
            }
        }
    }

    /// Gives a stream's agent new node selectors, matching them against `aliases`.
    fn reselect<'a>(
        &mut self,
        sub: u64,
        node_selectors: Selectors,
        aliases: impl Iterator<Item = &'a Entry>,
    ) {
        let Some(s) = self.all.get_mut(&sub) else {
            return;
        };
        s.node_selectors = node_selectors;
        let old = std::mem::take(&mut s.aliases);
        self.forget_aliases(sub, &old);
        self.match_all(sub, aliases);
    }

    fn forget_aliases(&mut self, sub: u64, aliases: &[EntryId]) {
        for alias in aliases {
            if let Some(set) = self.by_alias.get_mut(alias) {
                set.remove(&sub);
                if set.is_empty() {
                    self.by_alias.remove(alias);
                }
            }
        }
    }

    fn match_all<'a>(&mut self, sub: u64, aliases: impl Iterator<Item = &'a Entry>) {
        let Some(s) = self.all.get_mut(&sub) else {
            return;
        };
        for alias in aliases {
            if alias.selectors.is_subset_of(&s.node_selectors) {
                s.aliases.push(alias.id.clone());
                self.by_alias
                    .entry(alias.id.clone())
                    .or_default()
                    .insert(sub);
            }
        }
    }

    /// Drops node alias `id`; returns the streams that matched it.
    fn unmatch_alias(&mut self, id: &EntryId) -> HashSet<u64> {
        let members = self.by_alias.remove(id).unwrap_or_default();
        for sub in &members {
            if let Some(s) = self.all.get_mut(sub) {
                s.aliases.retain(|a| a != id);
            }
        }
        members
    }

    /// Matches node alias `id` against every stream (an alias change is rare
    /// and concerns every agent whose selectors satisfy it); returns the
    /// streams that match it.
    fn match_alias(&mut self, id: &EntryId, selectors: &Selectors) -> Vec<u64> {
        let mut members = Vec::new();
        for (sub, s) in &mut self.all {
            if selectors.is_subset_of(&s.node_selectors) {
                s.aliases.push(id.clone());
                members.push(*sub);
            }
        }
        if !members.is_empty() {
            self.by_alias
                .entry(id.clone())
                .or_default()
                .extend(members.iter().copied());
        }
        members
    }
}

/// The index; shared by the APIs and fed by the change follower.
pub struct EntryIndex {
    state: RwLock<IndexState>,
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
        Self::with_inbox_capacity(snapshot, INBOX)
    }

    /// Builds the index holding at most `capacity` changed entries per
    /// subscription before its stream recomputes the whole set (tests use
    /// small ones to reach that fallback).
    pub fn with_inbox_capacity(snapshot: EntrySnapshot, capacity: usize) -> Self {
        let mut state = IndexState {
            revision: snapshot.revision,
            subs: Subscribers {
                capacity,
                ..Subscribers::default()
            },
            ..IndexState::default()
        };
        for e in snapshot.entries {
            state.insert(e);
        }
        let (revision, _) = watch::channel(snapshot.revision);
        Self {
            state: RwLock::new(state),
            revision,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, IndexState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, IndexState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The revision of the last applied change.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Applies one change and routes it to the subscriptions it concerns;
    /// changes at or below the current revision are ignored, so replaying
    /// the feed is harmless.
    pub fn apply(&self, change: Change) {
        {
            let mut state = self.write();
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
                    let new = state.insert(e);
                    state.route_entry(&new.id, old.as_deref(), old_parents, Some(&new));
                }
                ChangeKind::EntryDeleted(e) => {
                    let held = state.entries.get(&e.id).cloned();
                    let old_parents = held
                        .as_ref()
                        .is_some_and(|o| state.parents_something(&o.spiffe_id))
                        || state.parents_something(&e.spiffe_id);
                    let old = state.remove(&e.id).unwrap_or_else(|| Arc::new(e));
                    state.route_entry(&old.id.clone(), Some(&old), old_parents, None);
                }
                ChangeKind::AgentChanged(id) | ChangeKind::AgentDeleted(id) => {
                    if let Some(subs) = state.subs.by_agent.get(&id) {
                        for sub in subs {
                            if let Some(s) = state.subs.all.get(sub) {
                                s.inbox.agent();
                            }
                        }
                    }
                }
                // Bundles and federation relationships are not entries; the
                // change follower hands them to federation. The revision
                // still advances, or the follower would read them forever.
                _ => {}
            }
        }
        self.revision.send_replace(change.revision);
    }

    /// Waits until the index has applied `revision` (read-your-writes for the admin API).
    pub async fn wait_for(&self, revision: u64) {
        let mut rx = self.revision.subscribe();
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    /// Subscribes a sync stream of agent `agent_id` with `node_selectors`
    /// to the changes that concern it. Subscribe before reading the set
    /// ([`Subscription::authorized`]), so that no change falls between.
    pub fn subscribe(&self, agent_id: SpiffeId, node_selectors: Selectors) -> Subscription<'_> {
        let mut state = self.write();
        let IndexState {
            entries,
            aliases,
            subs,
            ..
        } = &mut *state;
        let (id, inbox) = subs.add(
            agent_id.clone(),
            node_selectors.clone(),
            aliases
                .iter()
                .filter_map(|a| entries.get(a).map(|e| e.as_ref())),
        );
        Subscription {
            index: self,
            id,
            inbox,
            agent_id,
            node_selectors,
        }
    }

    /// How many sync streams are subscribed.
    pub fn subscriptions(&self) -> usize {
        self.read().subs.all.len()
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

    /// A page of entries in ID order after `after`, filtered; returns the
    /// page and the ID to continue after, if more remain.
    pub fn list(
        &self,
        filter: &EntryFilter,
        after: Option<&EntryId>,
        limit: usize,
    ) -> (Vec<Arc<Entry>>, Option<EntryId>) {
        let state = self.read();
        // With an ID prefix, start at the prefix (IDs sharing it are
        // contiguous in ID order) unless the page token is past it.
        let start = match (after, &filter.id_prefix) {
            (Some(id), Some(p)) if p > id => std::ops::Bound::Included(p.clone()),
            (Some(id), _) => std::ops::Bound::Excluded(id.clone()),
            (None, Some(p)) => std::ops::Bound::Included(p.clone()),
            (None, None) => std::ops::Bound::Unbounded,
        };
        let range = state.entries.range((start, std::ops::Bound::Unbounded));
        let mut page = Vec::new();
        for (id, e) in range {
            if let Some(p) = &filter.id_prefix
                && !id.as_str().starts_with(p.as_str())
            {
                break;
            }
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

/// What woke a sync stream ([`Subscription::changed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// The agent's record changed or was deleted: re-read it.
    pub agent: bool,
}

/// A sync stream's subscription to the changes that concern its agent
/// ([`EntryIndex::subscribe`]); unsubscribes when dropped.
///
/// Changes are held, not queued as events: each changed entry once, and
/// past a bound a mark to recompute the whole set, so a stream that falls
/// behind loses nothing and costs the index no more than a fixed amount.
pub struct Subscription<'a> {
    index: &'a EntryIndex,
    id: u64,
    inbox: Arc<Inbox>,
    agent_id: SpiffeId,
    node_selectors: Selectors,
}

impl std::fmt::Debug for Subscription<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("agent_id", &self.agent_id)
            .field("routed", &self.routed())
            .finish_non_exhaustive()
    }
}

impl Subscription<'_> {
    /// The agent's whole authorized set now. Every change it reflects is
    /// dropped from what the subscription holds, except a record change.
    pub fn authorized(&self) -> Authorized {
        let state = self.index.read();
        {
            let mut p = self.inbox.lock();
            p.entries.clear();
            p.full = false;
        }
        state.authorized(&self.agent_id, &self.node_selectors)
    }

    /// Waits until a change concerning the agent arrives (at once if one
    /// is held). Cancel-safe: what arrived stays held until taken.
    pub async fn changed(&self) -> Wake {
        loop {
            {
                let mut p = self.inbox.lock();
                if !p.is_empty() {
                    return Wake {
                        agent: std::mem::take(&mut p.agent),
                    };
                }
            }
            self.inbox.notify.notified().await;
        }
    }

    /// How the agent's set changed since the last catch-up (or
    /// [`Subscription::authorized`]), at which the agent was authorized for
    /// exactly the entries `held` says yes to; the whole set if `full`.
    ///
    /// The cost is in proportion to the entries routed here since, except
    /// when the answer is [`SetChange::Full`]: a node alias the agent matches
    /// (before or after) changed, more entries changed than the
    /// subscription holds, or an entry that other entries are parented to
    /// changed while the agent held it or holds it now. Any other routed
    /// change can alter only its own entry's status, and a change not routed
    /// here none (see design-notes.md).
    pub fn catch_up(&self, held: impl Fn(&EntryId) -> bool, full: bool) -> SetChange {
        let state = self.index.read();
        let (entries, overflowed) = {
            let mut p = self.inbox.lock();
            (std::mem::take(&mut p.entries), std::mem::take(&mut p.full))
        };
        if full || overflowed {
            return SetChange::Full(state.authorized(&self.agent_id, &self.node_selectors));
        }
        let mut changed = Vec::with_capacity(entries.len());
        for (id, moves_subtree) in entries {
            let now = state.authorized_entry(&id, &self.agent_id, &self.node_selectors);
            if moves_subtree && (now.is_some() || held(&id)) {
                return SetChange::Full(state.authorized(&self.agent_id, &self.node_selectors));
            }
            changed.push((id, now));
        }
        SetChange::Entries {
            revision: state.revision,
            changed,
        }
    }

    /// Routes by the agent's new node selectors from now on. The caller
    /// recomputes the whole set next: aliases that changed before this call
    /// were routed by the old ones.
    pub fn set_selectors(&mut self, node_selectors: Selectors) {
        if node_selectors == self.node_selectors {
            return;
        }
        let mut state = self.index.write();
        let IndexState {
            entries,
            aliases,
            subs,
            ..
        } = &mut *state;
        subs.reselect(
            self.id,
            node_selectors.clone(),
            aliases
                .iter()
                .filter_map(|a| entries.get(a).map(|e| e.as_ref())),
        );
        self.node_selectors = node_selectors;
    }

    /// How many changes were routed to this subscription so far.
    pub fn routed(&self) -> u64 {
        self.inbox.routed.load(Ordering::Relaxed)
    }

    /// Whether a routed change waits to be taken.
    pub fn is_pending(&self) -> bool {
        !self.inbox.lock().is_empty()
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.index.write().subs.remove(self.id);
    }
}

#[cfg(test)]
mod memory;

#[cfg(test)]
mod prop;

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
    const OTHER: &str = "spiffe://td/sigil/agent/join_token/b2";
    const THIRD: &str = "spiffe://td/sigil/agent/join_token/c3";

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
        let sub = idx.subscribe(AGENT.parse().unwrap(), Selectors::new());
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
        // Waiters on the revision are released; nothing was routed.
        idx.wait_for(11).await;
        assert_eq!(sub.routed(), 0);
        assert!(!sub.is_pending());
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

    /// The entry IDs a catch-up says changed, sorted; `None` for a whole set.
    fn caught_up(sub: &Subscription<'_>) -> Option<Vec<(String, bool)>> {
        match sub.catch_up(|_| false, false) {
            SetChange::Full(_) => None,
            SetChange::Entries { changed, .. } => {
                let mut v: Vec<_> = changed
                    .into_iter()
                    .map(|(id, now)| (id.to_string(), now.is_some()))
                    .collect();
                v.sort();
                Some(v)
            }
        }
    }

    fn upsert(idx: &EntryIndex, e: Entry) {
        let revision = idx.revision() + 1;
        idx.apply(Change {
            revision,
            kind: ChangeKind::EntryUpserted(e),
        });
    }

    #[test]
    fn changes_apply_in_order_and_reach_their_agent() {
        let idx = index();
        let sub = idx.subscribe(AGENT.parse().unwrap(), Selectors::new());
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
        assert_eq!(sub.routed(), 1);
        assert_eq!(caught_up(&sub), Some(vec![("new".into(), true)]));
        assert!(!sub.is_pending());
        idx.apply(Change {
            revision: 9,
            kind: ChangeKind::EntryDeleted(e),
        });
        assert!(idx.get(&"new".parse().unwrap()).is_none());
        assert_eq!(caught_up(&sub), Some(vec![("new".into(), false)]));
        // Dropped, it is no longer routed to.
        assert_eq!(idx.subscriptions(), 1);
        drop(sub);
        assert_eq!(idx.subscriptions(), 0);
    }

    #[test]
    fn a_write_for_one_agent_does_not_wake_another() {
        let idx = index();
        let a = idx.subscribe(AGENT.parse().unwrap(), Selectors::new());
        let b = idx.subscribe(OTHER.parse().unwrap(), Selectors::new());
        // Directly under a1, and nested under a1's entry `direct`.
        upsert(&idx, entry("w1", "spiffe://td/w1", AGENT, &["unix:uid:9"]));
        upsert(
            &idx,
            entry("w2", "spiffe://td/w2", "spiffe://td/web", &["unix:uid:9"]),
        );
        // Under nobody's agent, and under the us alias (no one matches it).
        upsert(
            &idx,
            entry("w3", "spiffe://td/w3", "spiffe://td/none", &["unix:uid:9"]),
        );
        upsert(
            &idx,
            entry(
                "w4",
                "spiffe://td/w4",
                "spiffe://td/nodes/us",
                &["unix:uid:9"],
            ),
        );
        assert_eq!(b.routed(), 0);
        assert!(!b.is_pending());
        assert_eq!(a.routed(), 2);
        assert_eq!(
            caught_up(&a),
            Some(vec![("w1".into(), true), ("w2".into(), true)])
        );
        // The other agent's own write and record reach it, not a1.
        upsert(&idx, entry("w5", "spiffe://td/w5", OTHER, &["unix:uid:9"]));
        idx.apply(Change {
            revision: idx.revision() + 1,
            kind: ChangeKind::AgentChanged(OTHER.parse().unwrap()),
        });
        assert_eq!(a.routed(), 2);
        assert!(!a.is_pending());
        assert_eq!(b.routed(), 2);
    }

    #[tokio::test]
    async fn an_alias_change_reaches_its_members_before_and_after() {
        let idx = index();
        let eu = Selectors::parse_all(["node:region:eu"]).unwrap();
        let us = Selectors::parse_all(["node:region:us"]).unwrap();
        let in_eu = idx.subscribe(AGENT.parse().unwrap(), eu.clone());
        let mut in_us = idx.subscribe(OTHER.parse().unwrap(), us.clone());
        let none = idx.subscribe(THIRD.parse().unwrap(), Selectors::new());
        // A write under the eu alias reaches its member only.
        upsert(
            &idx,
            entry(
                "w",
                "spiffe://td/w",
                "spiffe://td/nodes/eu",
                &["unix:uid:9"],
            ),
        );
        assert_eq!(caught_up(&in_eu), Some(vec![("w".into(), true)]));
        assert!(!in_us.is_pending() && !none.is_pending());
        // The eu alias moves to us: members before and after recompute.
        upsert(
            &idx,
            entry("alias", "spiffe://td/nodes/eu", SERVER, &["node:region:us"]),
        );
        assert_eq!(caught_up(&in_eu), None);
        assert_eq!(caught_up(&in_us), None);
        assert!(!none.is_pending());
        // Now only the us agent gets writes under it.
        upsert(
            &idx,
            entry(
                "w",
                "spiffe://td/w",
                "spiffe://td/nodes/eu",
                &["unix:uid:8"],
            ),
        );
        assert!(!in_eu.is_pending());
        assert_eq!(caught_up(&in_us), Some(vec![("w".into(), true)]));
        // An agent whose selectors change is routed by the new ones: it
        // matches neither us alias now.
        in_us.set_selectors(eu.clone());
        upsert(
            &idx,
            entry(
                "w",
                "spiffe://td/w",
                "spiffe://td/nodes/eu",
                &["unix:uid:7"],
            ),
        );
        upsert(
            &idx,
            entry(
                "w6",
                "spiffe://td/w6",
                "spiffe://td/nodes/us",
                &["unix:uid:7"],
            ),
        );
        assert!(!in_us.is_pending() && !in_eu.is_pending());
        // A new alias reaches the agents it matches; deleting it, the same.
        upsert(
            &idx,
            entry(
                "alias-2",
                "spiffe://td/nodes/2",
                SERVER,
                &["node:region:eu"],
            ),
        );
        assert_eq!(caught_up(&in_us), None);
        assert!(in_eu.is_pending() && !none.is_pending());
        assert_eq!(caught_up(&in_eu), None);
        let alias2 = idx.get(&"alias-2".parse().unwrap()).unwrap();
        idx.apply(Change {
            revision: idx.revision() + 1,
            kind: ChangeKind::EntryDeleted((*alias2).clone()),
        });
        assert_eq!(in_us.changed().await, Wake { agent: false });
        assert_eq!(caught_up(&in_us), None);
        assert_eq!(caught_up(&in_eu), None);
        assert_eq!(none.routed(), 0);
    }

    #[test]
    fn a_reparented_entry_reaches_its_old_and_new_agent() {
        let idx = index();
        let a = idx.subscribe(AGENT.parse().unwrap(), Selectors::new());
        let b = idx.subscribe(OTHER.parse().unwrap(), Selectors::new());
        let c = idx.subscribe(THIRD.parse().unwrap(), Selectors::new());
        // `direct` (which `nested` hangs from) moves from a1 to b2.
        upsert(
            &idx,
            entry("direct", "spiffe://td/web", OTHER, &["unix:uid:1"]),
        );
        // It parents `nested`, and a1 held it: a1 recomputes its set.
        assert!(matches!(a.catch_up(|_| true, false), SetChange::Full(_)));
        // b2 did not hold it, but holds it now: b2 recomputes too.
        assert_eq!(caught_up(&b), None);
        assert!(!c.is_pending());
        // A leaf moving between agents: each is told of the one entry.
        upsert(
            &idx,
            entry("leaf", "spiffe://td/leaf", AGENT, &["unix:uid:1"]),
        );
        assert_eq!(caught_up(&a), Some(vec![("leaf".into(), true)]));
        upsert(
            &idx,
            entry("leaf", "spiffe://td/leaf", OTHER, &["unix:uid:1"]),
        );
        assert_eq!(caught_up(&a), Some(vec![("leaf".into(), false)]));
        assert_eq!(caught_up(&b), Some(vec![("leaf".into(), true)]));
        assert!(!c.is_pending());
    }

    #[test]
    fn a_subscription_that_falls_behind_recomputes_its_set() {
        let idx = EntryIndex::with_inbox_capacity(
            EntrySnapshot {
                entries: vec![],
                revision: 1,
            },
            3,
        );
        let agent: SpiffeId = AGENT.parse().unwrap();
        let sub = idx.subscribe(agent.clone(), Selectors::new());
        for i in 0..10 {
            upsert(
                &idx,
                entry(
                    &format!("e{i}"),
                    &format!("spiffe://td/e{i}"),
                    AGENT,
                    &["unix:uid:1"],
                ),
            );
        }
        // More changes than the subscription holds: none is lost, the
        // stream gets the whole set.
        match sub.catch_up(|_| false, false) {
            SetChange::Full(a) => {
                assert_eq!(a.entries.len(), 10);
                assert_eq!(a.revision, idx.revision());
            }
            other => panic!("expected the whole set, got {other:?}"),
        }
        // Caught up, it goes on incrementally.
        upsert(&idx, entry("e0", "spiffe://td/e0", AGENT, &["unix:uid:2"]));
        assert_eq!(caught_up(&sub), Some(vec![("e0".into(), true)]));
    }

    #[tokio::test]
    async fn a_record_change_wakes_its_agent_only() {
        let idx = index();
        let a = idx.subscribe(AGENT.parse().unwrap(), Selectors::new());
        let b = idx.subscribe(OTHER.parse().unwrap(), Selectors::new());
        idx.apply(Change {
            revision: 8,
            kind: ChangeKind::AgentDeleted(AGENT.parse().unwrap()),
        });
        assert_eq!(a.changed().await, Wake { agent: true });
        // Taken once; the catch-up finds no entry changed.
        assert!(!a.is_pending());
        assert_eq!(caught_up(&a), Some(vec![]));
        assert!(!b.is_pending());
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
