//! Entries by selector, so that finding a caller's entries costs in
//! proportion to what its selectors can reach, not to every entry held.
//!
//! Each entry is filed under exactly one of its selectors (an entry matches
//! a caller only if the caller has all of them, so any one will do): the
//! one whose bucket held the fewest entries when the entry was added. A
//! caller's candidates are then the buckets of its own selectors, each
//! checked by the subset test. Entries without selectors (the server
//! refuses them, but the agent does not trust that) match every caller and
//! are kept apart.
//!
//! The maps are persistent (`imbl`), as are the snapshot's other maps: a
//! snapshot shares the index with the one before, and a change costs
//! O(selectors of the entry × log n).

use std::sync::Arc;

use sigil_types::{Entry, EntryId, Selector, Selectors};

/// Where an entry sits in age order: creation time, then ID.
pub(crate) type AgeKey = (i64, EntryId);

/// The entries filed under one selector. Most selectors (a pod's UID, a
/// path) are some one entry's own, and a persistent map's smallest node
/// holds many slots: one entry is kept as it is.
#[derive(Debug, Clone)]
enum Bucket {
    One(Arc<Entry>),
    Many(imbl::OrdMap<AgeKey, Arc<Entry>>),
}

impl Bucket {
    fn len(&self) -> usize {
        match self {
            Bucket::One(_) => 1,
            Bucket::Many(m) => m.len(),
        }
    }

    fn insert(&mut self, key: AgeKey, e: Arc<Entry>) {
        match self {
            Bucket::One(first) => {
                let mut m = imbl::OrdMap::new();
                m.insert((first.created_at, first.id.clone()), first.clone());
                m.insert(key, e);
                *self = Bucket::Many(m);
            }
            Bucket::Many(m) => {
                m.insert(key, e);
            }
        }
    }

    /// Takes out the entry filed under `key`; `Some(true)` if the bucket is
    /// now empty, `None` if it did not hold it.
    fn remove(&mut self, key: &AgeKey) -> Option<bool> {
        match self {
            Bucket::One(e) => (e.created_at == key.0 && e.id == key.1).then_some(true),
            Bucket::Many(m) => {
                m.remove(key)?;
                if m.len() == 1
                    && let Some(last) = m.values().next().cloned()
                {
                    *self = Bucket::One(last);
                }
                Some(self.len() == 0)
            }
        }
    }

    fn for_each<'a>(&'a self, mut f: impl FnMut(&'a Arc<Entry>)) {
        match self {
            Bucket::One(e) => f(e),
            Bucket::Many(m) => m.values().for_each(f),
        }
    }
}

/// Entries filed by one selector each (see the module documentation).
#[derive(Debug, Clone, Default)]
pub(crate) struct SelectorIndex {
    by_selector: imbl::HashMap<Selector, Bucket>,
    /// Entries with no selector at all.
    unselected: imbl::OrdMap<AgeKey, Arc<Entry>>,
}

impl SelectorIndex {
    /// Files `e` under `key`; `e` must not be filed already.
    pub(crate) fn insert(&mut self, key: AgeKey, e: Arc<Entry>) {
        // The selector whose bucket is smallest now (the first in canonical
        // order on a tie): entries sharing a common selector (a namespace,
        // a uid) spread over their rarer ones.
        let under = e
            .selectors
            .iter()
            .min_by_key(|s| self.by_selector.get(*s).map_or(0, Bucket::len))
            .cloned();
        match under {
            Some(s) => match self.by_selector.get_mut(&s) {
                Some(bucket) => bucket.insert(key, e),
                None => {
                    self.by_selector.insert(s, Bucket::One(e));
                }
            },
            None => {
                self.unselected.insert(key, e);
            }
        }
    }

    /// Takes out the entry filed under `key`, whose selectors are
    /// `selectors` (those it was filed with); true if it was filed.
    pub(crate) fn remove(&mut self, key: &AgeKey, selectors: &Selectors) -> bool {
        if selectors.is_empty() {
            return self.unselected.remove(key).is_some();
        }
        for s in selectors {
            let Some(bucket) = self.by_selector.get_mut(s) else {
                continue;
            };
            match bucket.remove(key) {
                None => continue,
                Some(true) => {
                    self.by_selector.remove(s);
                }
                Some(false) => {}
            }
            return true;
        }
        false
    }

    /// Every entry filed, each once, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> + '_ {
        self.by_selector
            .values()
            .flat_map(|b| {
                let (one, many) = match b {
                    Bucket::One(e) => (Some(e), None),
                    Bucket::Many(m) => (None, Some(m.values())),
                };
                one.into_iter().chain(many.into_iter().flatten())
            })
            .chain(self.unselected.values())
    }

    /// The entries whose selectors are all among `caller`'s, in age order.
    pub(crate) fn matching(&self, caller: &Selectors) -> Vec<Arc<Entry>> {
        let mut found: Vec<&Arc<Entry>> = self.unselected.values().collect();
        for s in caller {
            if let Some(bucket) = self.by_selector.get(s) {
                bucket.for_each(|e| {
                    if e.selectors.is_subset_of(caller) {
                        found.push(e);
                    }
                });
            }
        }
        // Each entry is in one bucket only, so there are no duplicates.
        found.sort_unstable_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        found.into_iter().cloned().collect()
    }

    /// How many buckets hold entries (for tests).
    #[cfg(test)]
    fn buckets(&self) -> usize {
        self.by_selector.len() + usize::from(!self.unselected.is_empty())
    }

    /// How many entries are filed (for tests).
    #[cfg(test)]
    fn filed(&self) -> usize {
        self.by_selector.values().map(Bucket::len).sum::<usize>() + self.unselected.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use proptest::prelude::*;
    use sigil_types::SpiffeId;

    use crate::core::Entries;

    use super::*;

    fn entry(id: u32, created_at: i64, selectors: &[u8]) -> Arc<Entry> {
        let sel = Selectors::parse_all(selectors.iter().map(|s| format!("t:{s}"))).unwrap();
        let mut e = Entry::new(
            format!("e{id}").parse().unwrap(),
            format!("spiffe://example.org/w{id}")
                .parse::<SpiffeId>()
                .unwrap(),
            "spiffe://example.org/agent".parse::<SpiffeId>().unwrap(),
            sel,
        );
        e.created_at = created_at;
        Arc::new(e)
    }

    fn ids(v: &[Arc<Entry>]) -> Vec<String> {
        v.iter().map(|e| e.id.to_string()).collect()
    }

    #[test]
    fn common_selectors_spread_entries_over_rarer_ones() {
        let mut entries = Entries::default();
        for i in 0..10u8 {
            // Every entry shares selector 0; each has one of its own.
            entries.insert(entry(u32::from(i), 0, &[0, 100 + i]));
        }
        // The first goes under 0 (first on a tie), the others under their own.
        assert_eq!(entries.index().buckets(), 10);
        let caller = Selectors::parse_all(["t:0", "t:103"]).unwrap();
        assert_eq!(ids(&entries.matching(&caller)), ["e3"]);
    }

    #[test]
    fn entries_without_selectors_match_every_caller() {
        let mut entries = Entries::default();
        entries.insert(entry(1, 5, &[]));
        entries.insert(entry(2, 1, &[7]));
        assert_eq!(ids(&entries.matching(&Selectors::new())), ["e1"]);
        let caller = Selectors::parse_all(["t:7"]).unwrap();
        assert_eq!(ids(&entries.matching(&caller)), ["e2", "e1"]);
        entries.remove(&entry(1, 5, &[]));
        assert!(entries.matching(&Selectors::new()).is_empty());
        assert_eq!(entries.index().buckets(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Adds or replaces entry `id` (its creation time may change).
        Upsert(u32, i64, Vec<u8>),
        /// Removes entry `id` if held.
        Remove(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..40, 0i64..5, proptest::collection::vec(0u8..8, 0..4))
                .prop_map(|(id, t, s)| Op::Upsert(id, t, s)),
            1 => (0u32..40).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// After any sequence of changes, the index answers every caller
        /// exactly as a pass over all entries does, in the same order; and
        /// it holds nothing for entries gone.
        #[test]
        fn index_answers_as_the_scan(
            ops in proptest::collection::vec(op(), 0..120),
            callers in proptest::collection::vec(proptest::collection::vec(0u8..9, 0..6), 1..12),
        ) {
            let mut entries = Entries::default();
            let mut held: std::collections::HashMap<u32, Arc<Entry>> = Default::default();
            let mut snapshots = Vec::new();
            for op in ops {
                match op {
                    Op::Upsert(id, t, s) => {
                        let e = entry(id, t, &s);
                        // As the core does: the old one out, the new one in.
                        if let Some(old) = held.insert(id, e.clone()) {
                            entries.remove(&old);
                        }
                        entries.insert(e);
                    }
                    Op::Remove(id) => {
                        if let Some(old) = held.remove(&id) {
                            entries.remove(&old);
                        }
                    }
                }
                // Earlier snapshots must not see later changes.
                snapshots.push((entries.clone(), entries.matching_by_scan(&Selectors::new())));
            }
            prop_assert_eq!(entries.len(), held.len());
            let mut all: Vec<String> = entries.iter().map(|e| e.id.to_string()).collect();
            all.sort();
            let mut expected: Vec<String> = held.values().map(|e| e.id.to_string()).collect();
            expected.sort();
            prop_assert_eq!(all, expected);
            for c in &callers {
                let caller = Selectors::parse_all(c.iter().map(|s| format!("t:{s}"))).unwrap();
                prop_assert_eq!(
                    ids(&entries.matching(&caller)),
                    ids(&entries.matching_by_scan(&caller))
                );
            }
            let everything = Selectors::parse_all((0..8).map(|s| format!("t:{s}"))).unwrap();
            prop_assert_eq!(entries.matching(&everything).len(), held.len());
            for (snap, unselected) in &snapshots {
                prop_assert_eq!(ids(&snap.matching(&Selectors::new())), ids(unselected));
                prop_assert_eq!(
                    ids(&snap.matching(&everything)),
                    ids(&snap.matching_by_scan(&everything))
                );
            }
            prop_assert_eq!(entries.index().filed(), held.len());
        }
    }
}
