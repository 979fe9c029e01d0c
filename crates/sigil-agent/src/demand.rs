//! What the Workload API and SDS callers ask for, told to the core: which
//! entries an open stream matches (their SVIDs are held and renewed
//! whatever the bound on SVIDs held) and which entries were asked for since
//! the core last looked (those without an SVID are signed first, and the
//! bound keeps the most recently asked).
//!
//! The handlers write, the core reads; the SVIDs themselves stay the core's
//! alone. Both sets hold only entry IDs the handlers matched against a
//! snapshot, so they are bounded by the entries the agent holds, whatever
//! the number of streams: a caller opening many streams with the same
//! selectors adds counts, not IDs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sigil_types::EntryId;
use tokio::sync::Notify;

/// The shared record of what callers ask for; cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Demand {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    /// Wakes the core when something was asked for.
    asked: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// How many open streams match each entry.
    open: HashMap<EntryId, u32>,
    /// Entries asked for since the core last took them.
    asked: HashSet<EntryId>,
}

impl Demand {
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that a caller asked for `ids` now (a one-shot request, or a
    /// stream's first answer) and wakes the core.
    pub fn ask<'a>(&self, ids: impl IntoIterator<Item = &'a EntryId>) {
        let mut s = self.state();
        let before = s.asked.len();
        s.asked.extend(ids.into_iter().cloned());
        let grew = s.asked.len() > before;
        drop(s);
        if grew {
            self.inner.asked.notify_one();
        }
    }

    /// A stream's interest, matching no entry until [`Interest::set`].
    pub fn interest(&self) -> Interest {
        Interest {
            demand: self.clone(),
            ids: Mutex::new(Vec::new()),
        }
    }

    /// Whether an open stream matches `id`.
    #[cfg(test)]
    pub(crate) fn is_open(&self, id: &EntryId) -> bool {
        self.state().open.contains_key(id)
    }

    /// The entries open streams match.
    pub(crate) fn open(&self) -> Vec<EntryId> {
        self.state().open.keys().cloned().collect()
    }

    /// Takes the entries asked for since the last call.
    pub(crate) fn take_asked(&self) -> HashSet<EntryId> {
        std::mem::take(&mut self.state().asked)
    }

    /// Resolves once something was asked for after the last
    /// [`Demand::take_asked`] (or at once if it was before this call).
    pub(crate) async fn asked(&self) {
        self.inner.asked.notified().await
    }
}

/// What one open stream matches; given back when the stream ends (dropped),
/// which counts as the entries' last request.
#[derive(Debug)]
pub struct Interest {
    demand: Demand,
    ids: Mutex<Vec<EntryId>>,
}

impl Interest {
    /// The stream matches `ids` from now on (in place of what it matched
    /// before); the ones it did not match before count as asked for.
    pub fn set(&self, ids: Vec<EntryId>) {
        let mut mine = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if *mine == ids {
            return;
        }
        let before: HashSet<&EntryId> = mine.iter().collect();
        let added: Vec<&EntryId> = ids.iter().filter(|id| !before.contains(id)).collect();
        let mut s = self.demand.state();
        for id in &ids {
            *s.open.entry(id.clone()).or_default() += 1;
        }
        release(&mut s, &mine);
        drop(s);
        self.demand.ask(added);
        drop(before);
        *mine = ids;
    }
}

/// Takes one count off each of `ids` in `open`.
fn release(s: &mut State, ids: &[EntryId]) {
    for id in ids {
        if let Some(n) = s.open.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                s.open.remove(id);
            }
        }
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mine = std::mem::take(self.ids.get_mut().unwrap_or_else(PoisonError::into_inner));
        let mut s = self.demand.state();
        release(&mut s, &mine);
        drop(s);
        self.demand.ask(&mine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: &[&str]) -> Vec<EntryId> {
        n.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn streams_count_per_entry_and_asks_are_taken_once() {
        let d = Demand::default();
        let a = d.interest();
        let b = d.interest();
        a.set(ids(&["e1", "e2"]));
        b.set(ids(&["e2"]));
        let mut asked: Vec<_> = d.take_asked().into_iter().collect();
        asked.sort();
        assert_eq!(asked, ids(&["e1", "e2"]));
        assert!(d.take_asked().is_empty());
        // Matching the same again asks for nothing new.
        a.set(ids(&["e1", "e2"]));
        assert!(d.take_asked().is_empty());
        a.set(ids(&["e2", "e3"]));
        assert_eq!(d.take_asked().into_iter().collect::<Vec<_>>(), ids(&["e3"]));
        assert!(!d.is_open(&"e1".parse().unwrap()));
        drop(b);
        assert!(d.is_open(&"e2".parse().unwrap()));
        // The end of a stream is its entries' last request.
        let mut asked: Vec<_> = d.take_asked().into_iter().collect();
        asked.sort();
        assert_eq!(asked, ids(&["e2"]));
        drop(a);
        assert!(d.open().is_empty());
        assert_eq!(d.take_asked().len(), 2);
    }

    /// Many streams matching the same entries add counts, not IDs: what the
    /// record holds is bounded by the entries, not by the streams.
    #[test]
    fn many_streams_hold_one_id_per_entry() {
        let d = Demand::default();
        let streams: Vec<Interest> = (0..1000)
            .map(|_| {
                let i = d.interest();
                i.set(ids(&["e1", "e2"]));
                i
            })
            .collect();
        assert_eq!(d.open().len(), 2);
        assert_eq!(d.take_asked().len(), 2);
        assert_eq!(d.state().open[&"e1".parse::<EntryId>().unwrap()], 1000);
        drop(streams);
        assert!(d.open().is_empty());
        assert_eq!(d.take_asked().len(), 2);
    }
}
