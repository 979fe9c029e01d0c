//! Times kept in order, so that the agent core finds what is due (an SVID
//! to renew, an SVID that expired) by looking at what is due, not at every
//! entry it holds: with 100,000 entries, a sync message that changes one
//! must not cost a pass over all of them.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, SystemTime};

/// A time as nanoseconds since the Unix epoch: 8 bytes where a
/// `SystemTime` takes 16, in every key of the sets and maps below (tens of
/// thousands for an agent with as many SVIDs). Exact from 1970 to 2554;
/// earlier times count as 1970 and later ones as 2554 (no certificate the
/// agent holds has either).
type Nanos = u64;

fn nanos(t: SystemTime) -> Nanos {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| Nanos::try_from(d.as_nanos()).unwrap_or(Nanos::MAX))
}

fn time(n: Nanos) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(n)
}

/// One time per key, ordered by time.
#[derive(Debug)]
pub(crate) struct Timeline<K> {
    by_time: BTreeSet<(Nanos, K)>,
    at: HashMap<K, Nanos>,
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
        let t = nanos(t);
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
    #[cfg(test)]
    pub(crate) fn get(&self, key: &K) -> Option<SystemTime> {
        self.at.get(key).copied().map(time)
    }

    /// The earliest time held.
    pub(crate) fn first(&self) -> Option<SystemTime> {
        self.by_time.first().map(|(t, _)| time(*t))
    }

    /// The keys whose time is at or before `now`, earliest first.
    pub(crate) fn due(&self, now: SystemTime) -> impl Iterator<Item = &K> {
        let now = nanos(now);
        self.by_time
            .iter()
            .take_while(move |(t, _)| *t <= now)
            .map(|(_, k)| k)
    }

    /// Removes and returns the keys whose time is at or before `now`.
    #[cfg(test)]
    pub(crate) fn take_due(&mut self, now: SystemTime) -> Vec<K> {
        let now = nanos(now);
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

/// Keys ordered by a time that the caller keeps beside each key (an SVID's
/// `notAfter`, say) and names again to take a key out: a [`Timeline`]
/// without its map from key to time, which for 10,000 SVIDs is some 50
/// bytes each (docs/benchmarks.md, "Agent memory per cached SVID").
#[derive(Debug)]
pub(crate) struct Deadlines<K> {
    by_time: BTreeSet<(Nanos, K)>,
}

impl<K> Default for Deadlines<K> {
    fn default() -> Self {
        Self {
            by_time: BTreeSet::new(),
        }
    }
}

impl<K: Ord> Deadlines<K> {
    /// Holds `key` at `t`.
    pub(crate) fn insert(&mut self, t: SystemTime, key: K) {
        self.by_time.insert((nanos(t), key));
    }

    /// Forgets `key` held at `t`; true if it was.
    pub(crate) fn remove(&mut self, t: SystemTime, key: K) -> bool {
        self.by_time.remove(&(nanos(t), key))
    }

    /// Whether `key` is held at `t`.
    pub(crate) fn contains(&self, t: SystemTime, key: K) -> bool {
        self.by_time.contains(&(nanos(t), key))
    }

    /// The earliest time held.
    pub(crate) fn first(&self) -> Option<SystemTime> {
        self.by_time.first().map(|(t, _)| time(*t))
    }

    /// Removes and returns the keys whose time is at or before `now`,
    /// earliest first.
    pub(crate) fn take_due(&mut self, now: SystemTime) -> Vec<K> {
        let now = nanos(now);
        let mut taken = Vec::new();
        while self.by_time.first().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, k)) = self.by_time.pop_first() {
                taken.push(k);
            }
        }
        taken
    }

    /// Forgets every key.
    pub(crate) fn clear(&mut self) {
        self.by_time.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_time.len()
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

    #[test]
    fn times_keep_their_value_and_order_as_nanoseconds() {
        let now = SystemTime::now();
        for t in [now, now + Duration::from_nanos(1), SystemTime::UNIX_EPOCH] {
            assert_eq!(time(nanos(t)), t);
        }
        assert!(nanos(now) < nanos(now + Duration::from_nanos(1)));
        // Out of range: clamped, never wrapped.
        assert_eq!(nanos(SystemTime::UNIX_EPOCH - Duration::from_secs(1)), 0);
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(600 * 365 * 86_400);
        assert_eq!(nanos(far), Nanos::MAX);
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

        /// With the caller keeping each key's time, deadlines answer as a
        /// timeline does.
        #[test]
        fn deadlines_answer_as_a_timeline(ops in proptest::collection::vec(op(), 0..200)) {
            let base = SystemTime::UNIX_EPOCH;
            let at = |t: u16| base + Duration::from_secs(u64::from(t));
            let mut tl = Timeline::default();
            let mut dl = Deadlines::default();
            // The caller's own record of each key's time.
            let mut kept: BTreeMap<u8, SystemTime> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Set(k, t) => {
                        tl.set(k, at(t));
                        if let Some(old) = kept.insert(k, at(t)) {
                            prop_assert!(dl.remove(old, k));
                        }
                        dl.insert(at(t), k);
                    }
                    Op::Remove(k) => {
                        tl.remove(&k);
                        if let Some(old) = kept.remove(&k) {
                            prop_assert!(dl.remove(old, k));
                        }
                    }
                    Op::TakeDue(t) => {
                        let taken = dl.take_due(at(t));
                        for k in &taken {
                            kept.remove(k);
                        }
                        prop_assert_eq!(taken, tl.take_due(at(t)));
                    }
                }
                prop_assert_eq!(dl.len(), tl.len());
                prop_assert_eq!(dl.first(), tl.first());
                for (k, t) in &kept {
                    prop_assert!(dl.contains(*t, *k));
                    prop_assert_eq!(tl.get(k), Some(*t));
                }
            }
        }
    }
}
