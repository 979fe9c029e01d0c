//! Open-connection counts per key with a cap per key, shared by the agent's
//! Workload API (keyed by calling uid) and the server's agent API (keyed by
//! source address): a connection takes a [`Slot`] of its key when accepted
//! and gives it back when dropped, so a key that holds `max` slots gets no
//! more until one of its connections closes.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// Open slots per key, each key capped at the same `max`.
#[derive(Debug)]
pub struct KeyedSlots<K: Eq + Hash> {
    max: usize,
    open: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> KeyedSlots<K> {
    /// Counts with a cap of `max` per key (at least 1).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// One more slot of `key`, unless it holds `max` already.
    pub fn try_acquire(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        let mut open = self.lock();
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            key,
        })
    }

    /// How many slots `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// The counts; a panic elsewhere while holding the lock leaves them
    /// consistent (each update is one step), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, HashMap<K, usize>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One key's slot, given back when dropped.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash + Clone> {
    owner: Arc<KeyedSlots<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.owner.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            // Keys without open slots are forgotten, so memory follows the
            // open connections, not every key ever seen.
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn each_key_is_capped_and_slots_come_back_on_drop() {
        let slots = KeyedSlots::new(2);
        let a1 = slots.try_acquire("a").unwrap();
        let _a2 = slots.try_acquire("a").unwrap();
        assert!(slots.try_acquire("a").is_none());
        // Another key has its own cap.
        let _b = slots.try_acquire("b").unwrap();
        assert_eq!(slots.held(&"a"), 2);
        drop(a1);
        assert_eq!(slots.held(&"a"), 1);
        assert!(slots.try_acquire("a").is_some());
    }

    #[test]
    fn a_key_without_slots_is_forgotten() {
        let slots = KeyedSlots::new(1);
        drop(slots.try_acquire(7u32).unwrap());
        assert_eq!(slots.held(&7), 0);
        assert!(slots.lock().is_empty());
    }
}
