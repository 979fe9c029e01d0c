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

/// A map in which each value has a time (an SVID and when to renew it),
/// with the keys ordered by that time. The time is held beside the value in
/// the map's own slot, not in a second map from key to time
/// (docs/benchmarks.md, "Agent memory per cached SVID").
#[derive(Debug)]
pub(crate) struct Timeline<K, V> {
    by_time: BTreeSet<(Nanos, K)>,
    map: HashMap<K, Timed<V>>,
}

/// A value of a [`Timeline`] and its time.
#[derive(Debug)]
pub(crate) struct Timed<V> {
    pub(crate) value: V,
    at: Nanos,
}

impl<K, V> Default for Timeline<K, V> {
    fn default() -> Self {
        Self {
            by_time: BTreeSet::new(),
            map: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Clone, V> Timeline<K, V> {
    /// Holds `value` under `key` at time `t`, in place of what `key` held;
    /// returns that.
    pub(crate) fn insert(&mut self, key: K, value: V, t: SystemTime) -> Option<V> {
        let at = nanos(t);
        let old = self.map.insert(key.clone(), Timed { value, at });
        if let Some(old) = &old {
            self.by_time.remove(&(old.at, key.clone()));
        }
        self.by_time.insert((at, key));
        old.map(|old| old.value)
    }

    /// Moves `key`'s time to `t`, if it is held.
    pub(crate) fn set_time(&mut self, key: &K, t: SystemTime) {
        let at = nanos(t);
        if let Some(held) = self.map.get_mut(key) {
            self.by_time.remove(&(held.at, key.clone()));
            held.at = at;
            self.by_time.insert((at, key.clone()));
        }
    }

    /// Sets every value's time anew, to what `f` says.
    pub(crate) fn reschedule(&mut self, mut f: impl FnMut(&K, &V) -> SystemTime) {
        self.by_time.clear();
        for (k, held) in &mut self.map {
            held.at = nanos(f(k, &held.value));
            self.by_time.insert((held.at, k.clone()));
        }
    }

    /// Forgets `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let old = self.map.remove(key)?;
        self.by_time.remove(&(old.at, key.clone()));
        Some(old.value)
    }

    /// Keeps only what `f` accepts.
    pub(crate) fn retain(&mut self, mut f: impl FnMut(&K, &V) -> bool) {
        let by_time = &mut self.by_time;
        self.map.retain(|k, held| {
            let keep = f(k, &held.value);
            if !keep {
                by_time.remove(&(held.at, k.clone()));
            }
            keep
        });
    }

    /// `key`'s value.
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|h| &h.value)
    }

    /// Whether `key` is held.
    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// `key`'s time, if it is held.
    #[cfg(test)]
    pub(crate) fn time(&self, key: &K) -> Option<SystemTime> {
        self.map.get(key).map(|h| time(h.at))
    }

    /// How many keys are held.
    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(self.by_time.len(), self.map.len());
        self.map.len()
    }

    /// The keys and their values, in no order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.map.iter().map(|(k, h)| (k, &h.value))
    }

    /// The keys, in no order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.map.keys()
    }

    /// The values, in no order.
    #[cfg(test)]
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.map.values().map(|h| &h.value)
    }

    /// The map itself, each value with its time.
    pub(crate) fn map(&self) -> &HashMap<K, Timed<V>> {
        &self.map
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

    /// Drops the order by time, keeping the map (for the memory test,
    /// which counts each apart).
    #[cfg(test)]
    pub(crate) fn forget_order(&mut self) {
        self.by_time = BTreeSet::new();
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
                self.map.remove(&k);
                taken.push(k);
            }
        }
        taken
    }
}

/// Keys ordered by a time that the caller keeps beside each key (an SVID's
/// `notAfter`, say) and names again to take a key out: a [`Timeline`]
/// without its map, which for 10,000 SVIDs is some 50 bytes each
/// (docs/benchmarks.md, "Agent memory per cached SVID").
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
        Retain(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..32, 0u16..1000).prop_map(|(k, t)| Op::Set(k, t)),
            (0u8..32).prop_map(Op::Remove),
            (0u16..1000).prop_map(Op::TakeDue),
            (2u8..5).prop_map(Op::Retain),
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
                    // Half the sets move a held key's time only; the
                    // others hold a value anew.
                    Op::Set(k, t) if t % 2 == 0 && plain.contains_key(&k) => {
                        tl.set_time(&k, at(t));
                        plain.insert(k, at(t));
                    }
                    Op::Set(k, t) => {
                        let old = tl.insert(k, u32::from(t), at(t));
                        prop_assert_eq!(old.is_some(), plain.insert(k, at(t)).is_some());
                    }
                    Op::Remove(k) => {
                        let old = tl.remove(&k);
                        prop_assert_eq!(old.is_some(), plain.remove(&k).is_some());
                    }
                    Op::Retain(m) => {
                        tl.retain(|k, _| k % m != 0);
                        plain.retain(|k, _| k % m != 0);
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
                    prop_assert_eq!(tl.time(k), Some(*v));
                    prop_assert!(tl.contains_key(k) && tl.get(k).is_some());
                }
                let mut keys: Vec<u8> = tl.keys().copied().collect();
                keys.sort();
                prop_assert_eq!(keys, plain.keys().copied().collect::<Vec<_>>());
                // Each key's value is the time it was last held anew at.
                for (k, v) in tl.iter() {
                    prop_assert!(plain.contains_key(k) && u64::from(*v) < 1000);
                }
                let probe = at(500);
                let mut due: Vec<u8> = tl.due(probe).copied().collect();
                due.sort();
                let expected: Vec<u8> =
                    plain.iter().filter(|(_, v)| **v <= probe).map(|(k, _)| *k).collect();
                prop_assert_eq!(due, expected);
            }
            // Every time set anew: each key at its value's time.
            tl.reschedule(|_, v| at(u16::try_from(*v).unwrap()));
            for (k, v) in tl.iter() {
                prop_assert_eq!(tl.time(k), Some(at(u16::try_from(*v).unwrap())));
            }
            prop_assert_eq!(tl.first(), tl.values().map(|v| at(u16::try_from(*v).unwrap())).min());
            prop_assert_eq!(tl.len(), plain.len());
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
                        tl.insert(k, (), at(t));
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
                    Op::Retain(_) => {}
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
                    prop_assert_eq!(tl.time(k), Some(*t));
                }
            }
        }
    }
}
