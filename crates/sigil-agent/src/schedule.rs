//! Times kept in order, so that the agent core finds what is due (an SVID
//! to renew, an SVID that expired) by looking at what is due, not at every
//! entry it holds: with 100,000 entries, a sync message that changes one
//! must not cost a pass over all of them.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::SystemTime;

/// One time per key, ordered by time.
#[derive(Debug)]
pub(crate) struct Timeline<K> {
    by_time: BTreeSet<(SystemTime, K)>,
    at: HashMap<K, SystemTime>,
}

impl<K> Default for Timeline<K> {
    fn default() -> Self {
        Self {
            by_time: BTreeSet::new(),
            at: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Clone> Timeline<K> {
    /// Sets `key`'s time, replacing the one it had.
    pub(crate) fn set(&mut self, key: K, t: SystemTime) {
        if let Some(old) = self.at.insert(key.clone(), t) {
            self.by_time.remove(&(old, key.clone()));
        }
        self.by_time.insert((t, key));
    }

    /// Forgets `key`.
    pub(crate) fn remove(&mut self, key: &K) {
        if let Some(old) = self.at.remove(key) {
            self.by_time.remove(&(old, key.clone()));
        }
    }

    /// `key`'s time, if it has one.
    pub(crate) fn get(&self, key: &K) -> Option<SystemTime> {
        self.at.get(key).copied()
    }

    /// The earliest time held.
    pub(crate) fn first(&self) -> Option<SystemTime> {
        self.by_time.first().map(|(t, _)| *t)
    }

    /// The keys whose time is at or before `now`, earliest first.
    pub(crate) fn due(&self, now: SystemTime) -> impl Iterator<Item = &K> {
        self.by_time
            .iter()
            .take_while(move |(t, _)| *t <= now)
            .map(|(_, k)| k)
    }

    /// Removes and returns the keys whose time is at or before `now`.
    pub(crate) fn take_due(&mut self, now: SystemTime) -> Vec<K> {
        let mut taken = Vec::new();
        while let Some((t, _)) = self.by_time.first() {
            if *t > now {
                break;
            }
            if let Some((_, k)) = self.by_time.pop_first() {
                self.at.remove(&k);
                taken.push(k);
            }
        }
        taken
    }

    /// Forgets every key.
    pub(crate) fn clear(&mut self) {
        self.by_time.clear();
        self.at.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(self.by_time.len(), self.at.len());
        self.at.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, u16),
        Remove(u8),
        TakeDue(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..32, 0u16..1000).prop_map(|(k, t)| Op::Set(k, t)),
            (0u8..32).prop_map(Op::Remove),
            (0u16..1000).prop_map(Op::TakeDue),
        ]
    }

    proptest! {
        /// Whatever the order of changes, the timeline answers as a plain
        /// map scanned whole would.
        #[test]
        fn answers_as_a_full_scan_would(ops in proptest::collection::vec(op(), 0..200)) {
            let base = SystemTime::UNIX_EPOCH;
            let at = |t: u16| base + Duration::from_secs(u64::from(t));
            let mut tl = Timeline::default();
            let mut plain: BTreeMap<u8, SystemTime> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Set(k, t) => {
                        tl.set(k, at(t));
                        plain.insert(k, at(t));
                    }
                    Op::Remove(k) => {
                        tl.remove(&k);
                        plain.remove(&k);
                    }
                    Op::TakeDue(t) => {
                        let mut taken = tl.take_due(at(t));
                        taken.sort();
                        let expected: Vec<u8> =
                            plain.iter().filter(|(_, v)| **v <= at(t)).map(|(k, _)| *k).collect();
                        plain.retain(|_, v| *v > at(t));
                        prop_assert_eq!(taken, expected);
                    }
                }
                prop_assert_eq!(tl.len(), plain.len());
                prop_assert_eq!(tl.first(), plain.values().min().copied());
                for (k, v) in &plain {
                    prop_assert_eq!(tl.get(k), Some(*v));
                }
                let probe = at(500);
                let mut due: Vec<u8> = tl.due(probe).copied().collect();
                due.sort();
                let expected: Vec<u8> =
                    plain.iter().filter(|(_, v)| **v <= probe).map(|(k, _)| *k).collect();
                prop_assert_eq!(due, expected);
            }
        }
    }
}
