//! Reassembly of paged sync updates. The server sends one update (a
//! snapshot, or changes) as pages, every page but the last flagged
//! `continued` (the protocol is in crates/sigil-proto/proto/server.proto).
//! The agent applies an update only once its last page arrived, so that
//! workloads never see half of one, and bounds what it buffers meanwhile,
//! so that a server (or whoever holds its key) cannot make it grow without
//! end.
//!
//! A snapshot whose stream breaks after some pages is not lost: its
//! entries so far are kept (staged, never applied) with its revision, and
//! the next stream asks for what changed since that revision, naming the
//! staged entries as held (the ordinary resume request; any server
//! answers it). That answer completes the staged entries into the whole
//! set, which is then applied as a snapshot: entries deleted in between
//! arrive as deletions, entries changed in between as upserts, the rest of
//! the set as upserts too (docs/design-notes.md, "Resuming a broken
//! snapshot").

use std::collections::BTreeMap;

use prost::Message;
use sigil_proto::server::v1 as pb;
use sigil_types::EntryId;

/// Default of [`UpdateBounds::max_entries`].
pub const MAX_UPDATE_ENTRIES: usize = 1_000_000;
/// Default of [`UpdateBounds::max_bytes`] (512 MiB).
pub const MAX_UPDATE_BYTES: usize = 512 * 1024 * 1024;
/// The most encoded bytes of the entry IDs a sync request names as held:
/// a little below the 4 MiB a server decodes by default
/// (`server.limits.max_request_bytes`). A larger request would be refused
/// on every attempt; past this, the agent asks for a snapshot instead
/// (about 110,000 IDs of 36 characters fit).
pub const MAX_KNOWN_IDS_BYTES: usize = 4 * 1024 * 1024 - 4096;

/// Whether a sync request naming `ids` as held fits
/// [`MAX_KNOWN_IDS_BYTES`].
pub(crate) fn known_ids_fit<'a>(ids: impl IntoIterator<Item = &'a str>) -> bool {
    let mut len = 0usize;
    for id in ids {
        // Field 2's key (one byte), the length, the bytes.
        let n = 1 + prost::encoding::encoded_len_varint(id.len() as u64) + id.len();
        len = len.saturating_add(n);
        if len > MAX_KNOWN_IDS_BYTES {
            return false;
        }
    }
    true
}

/// What one sync update may hold across all its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateBounds {
    /// Most upserted entries plus deleted IDs (1,000,000).
    pub max_entries: usize,
    /// Most encoded bytes, summed over the pages (512 MiB).
    pub max_bytes: usize,
}

impl Default for UpdateBounds {
    fn default() -> Self {
        Self {
            max_entries: MAX_UPDATE_ENTRIES,
            max_bytes: MAX_UPDATE_BYTES,
        }
    }
}

/// Why an update from the server was refused; nothing of it is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PagingError {
    /// The pages so far hold more entries and deleted IDs than allowed.
    #[error(
        "a sync update from the server holds more than {max} entries (max_sync_update_entries); nothing of it was applied"
    )]
    TooManyEntries {
        /// The bound.
        max: usize,
    },
    /// The pages so far are larger than allowed.
    #[error(
        "a sync update from the server is larger than {max} bytes (max_sync_update_bytes); nothing of it was applied"
    )]
    TooLarge {
        /// The bound.
        max: usize,
    },
}

/// The pages of the update being received on one sync stream, and what a
/// broken snapshot left to resume from.
#[derive(Debug)]
pub(crate) struct Assembler {
    bounds: UpdateBounds,
    pending: Option<pb::SyncMessage>,
    entries: usize,
    bytes: usize,
    /// The entries of a snapshot whose stream broke, never applied.
    staged: Option<Staged>,
    /// Whether the current stream was opened to resume from `staged`.
    resuming: bool,
}

/// The entries received of a snapshot whose stream broke: each is the
/// snapshot's (current at `revision`) or newer.
#[derive(Debug)]
struct Staged {
    revision: u64,
    entries: BTreeMap<String, pb::Entry>,
    bytes: usize,
}

impl Staged {
    fn add(&mut self, e: pb::Entry) {
        // Only IDs the server can take back in a resume request.
        if e.id.parse::<EntryId>().is_err() {
            return;
        }
        self.bytes += e.encoded_len();
        if let Some(old) = self.entries.insert(e.id.clone(), e) {
            self.bytes -= old.encoded_len();
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.entries.remove(id) {
            self.bytes -= old.encoded_len();
        }
    }
}

impl Assembler {
    pub(crate) fn new(bounds: UpdateBounds) -> Self {
        Self {
            bounds,
            pending: None,
            entries: 0,
            bytes: 0,
            staged: None,
            resuming: false,
        }
    }

    /// The stream ended or broke: a partly received update is not applied.
    /// If it is a snapshot (or the completion of a staged one), what
    /// arrived of it is staged for the next stream to resume from.
    pub(crate) fn clear(&mut self) {
        let pending = self.pending.take();
        let resuming = std::mem::take(&mut self.resuming);
        self.entries = 0;
        self.bytes = 0;
        let Some(p) = pending else {
            return;
        };
        if resuming && let Some(staged) = &mut self.staged {
            // Entries in the resume answer are current at its revision,
            // newer than the staged one: held at the staged revision they
            // are at worst sent again. Deletions received are applied.
            for e in p.upserted {
                staged.add(e);
            }
            for id in &p.deleted_ids {
                staged.remove(id);
            }
        } else if p.snapshot && p.revision > 0 {
            let mut staged = Staged {
                revision: p.revision,
                entries: BTreeMap::new(),
                bytes: 0,
            };
            for e in p.upserted {
                staged.add(e);
            }
            self.staged = Some(staged);
        }
        if self.staged.as_ref().is_some_and(|s| s.entries.is_empty()) {
            self.staged = None;
        }
    }

    /// Drops everything, a staged snapshot included.
    fn reset(&mut self) {
        self.clear();
        self.staged = None;
    }

    /// The request that resumes a staged snapshot (its revision, its
    /// entries named as held), if there is one and it fits
    /// [`MAX_KNOWN_IDS_BYTES`]; else `None`, and a staged snapshot too
    /// large to name is dropped.
    pub(crate) fn resume_request(&mut self) -> Option<pb::SyncRequest> {
        let staged = self.staged.as_ref()?;
        if !known_ids_fit(staged.entries.keys().map(String::as_str)) {
            self.staged = None;
            return None;
        }
        Some(pb::SyncRequest {
            revision: staged.revision,
            known_entry_ids: staged.entries.keys().cloned().collect(),
        })
    }

    /// A stream was opened, with the request [`Self::resume_request`] gave
    /// when `resumed`; a staged snapshot not resumed is dropped.
    pub(crate) fn opened(&mut self, resumed: bool) {
        self.clear();
        self.resuming = resumed && self.staged.is_some();
        if !self.resuming {
            self.staged = None;
        }
    }

    /// How many entries and bytes a staged snapshot being resumed holds.
    fn staged_size(&self) -> (usize, usize) {
        match &self.staged {
            Some(s) if self.resuming => (s.entries.len(), s.bytes),
            _ => (0, 0),
        }
    }

    /// Whether part of an update is buffered.
    pub(crate) fn is_partial(&self) -> bool {
        self.pending.is_some()
    }

    /// Takes one page: the whole update once its last page arrived, `None`
    /// while more are to come. Over a bound, the partial update is dropped
    /// and an error returned; the caller ends the stream.
    ///
    /// On a stream that resumes a staged snapshot, the first update (the
    /// changes since the staged revision) is returned merged with the
    /// staged entries, as a snapshot; a snapshot sent instead replaces
    /// them. The staged entries count towards the bounds.
    pub(crate) fn push(
        &mut self,
        page: pb::SyncMessage,
    ) -> Result<Option<pb::SyncMessage>, PagingError> {
        if self.resuming && self.pending.is_none() && page.snapshot {
            self.resuming = false;
            self.staged = None;
        }
        self.entries = self
            .entries
            .saturating_add(page.upserted.len())
            .saturating_add(page.deleted_ids.len());
        self.bytes = self.bytes.saturating_add(page.encoded_len());
        let (staged_entries, staged_bytes) = self.staged_size();
        if self.entries.saturating_add(staged_entries) > self.bounds.max_entries {
            self.reset();
            return Err(PagingError::TooManyEntries {
                max: self.bounds.max_entries,
            });
        }
        if self.bytes.saturating_add(staged_bytes) > self.bounds.max_bytes {
            self.reset();
            return Err(PagingError::TooLarge {
                max: self.bounds.max_bytes,
            });
        }
        let continued = page.continued;
        match &mut self.pending {
            // The first page's snapshot flag, bundles and tainted
            // authorities stand for the whole update; later pages only add
            // entries and deletions, and the last one's revision counts.
            Some(update) => {
                update.upserted.extend(page.upserted);
                update.deleted_ids.extend(page.deleted_ids);
                update.revision = page.revision;
            }
            None => self.pending = Some(page),
        }
        if continued {
            return Ok(None);
        }
        let mut update = self.pending.take();
        let staged = self.staged.take().filter(|_| self.resuming);
        self.resuming = false;
        self.clear();
        if let Some(u) = &mut update {
            u.continued = false;
            if let Some(mut staged) = staged {
                // The whole set: the staged entries, with the changes
                // since their revision.
                for e in std::mem::take(&mut u.upserted) {
                    staged.add(e);
                }
                for id in std::mem::take(&mut u.deleted_ids) {
                    staged.remove(&id);
                }
                u.upserted = staged.entries.into_values().collect();
                u.snapshot = true;
            }
        }
        Ok(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> pb::Entry {
        pb::Entry {
            id: id.into(),
            ..Default::default()
        }
    }

    fn page(revision: u64, ids: &[&str], continued: bool) -> pb::SyncMessage {
        pb::SyncMessage {
            revision,
            upserted: ids.iter().map(|i| entry(i)).collect(),
            continued,
            ..Default::default()
        }
    }

    #[test]
    fn pages_become_one_update_with_the_first_header_and_the_last_revision() {
        let mut a = Assembler::new(UpdateBounds::default());
        let mut first = page(5, &["a", "b"], true);
        first.snapshot = true;
        first.bundle_json = "bundle".into();
        first.federated_bundles_changed = true;
        assert_eq!(a.push(first).unwrap(), None);
        assert!(a.is_partial());
        let mut middle = page(5, &["c"], true);
        middle.deleted_ids = vec!["x".into()];
        // Header fields of later pages are not the update's.
        middle.snapshot = false;
        middle.bundle_json = "other".into();
        assert_eq!(a.push(middle).unwrap(), None);
        let update = a.push(page(6, &["d"], false)).unwrap().unwrap();
        assert!(!a.is_partial());
        assert!(update.snapshot && !update.continued && update.federated_bundles_changed);
        assert_eq!(update.bundle_json, "bundle");
        assert_eq!(update.revision, 6);
        let ids: Vec<_> = update.upserted.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(update.deleted_ids, ["x"]);
        // An unpaged message (one page) passes as it is.
        let single = page(7, &["e"], false);
        assert_eq!(a.push(single.clone()).unwrap(), Some(single));
    }

    #[test]
    fn a_cleared_partial_update_leaves_nothing_behind() {
        let mut a = Assembler::new(UpdateBounds::default());
        assert_eq!(a.push(page(1, &["a"], true)).unwrap(), None);
        a.clear();
        let u = a.push(page(2, &["b"], false)).unwrap().unwrap();
        assert_eq!(u.upserted, vec![entry("b")]);
    }

    #[test]
    fn updates_over_a_bound_are_refused_and_forgotten() {
        let mut a = Assembler::new(UpdateBounds {
            max_entries: 3,
            max_bytes: usize::MAX,
        });
        assert_eq!(a.push(page(1, &["a", "b"], true)).unwrap(), None);
        assert_eq!(
            a.push(page(1, &["c", "d"], true)),
            Err(PagingError::TooManyEntries { max: 3 })
        );
        assert!(!a.is_partial());
        // Counting starts again with the next update.
        assert!(a.push(page(2, &["e", "f", "g"], false)).unwrap().is_some());

        let one = page(1, &["a"], true).encoded_len();
        let mut a = Assembler::new(UpdateBounds {
            max_entries: usize::MAX,
            max_bytes: 2 * one,
        });
        assert_eq!(a.push(page(1, &["a"], true)).unwrap(), None);
        assert_eq!(a.push(page(1, &["b"], true)).unwrap(), None);
        assert_eq!(
            a.push(page(1, &["c"], true)),
            Err(PagingError::TooLarge { max: 2 * one })
        );
        assert!(!a.is_partial());
    }
    fn ids(m: &pb::SyncMessage) -> Vec<&str> {
        m.upserted.iter().map(|e| e.id.as_str()).collect()
    }

    fn snapshot_page(revision: u64, ids: &[&str], continued: bool) -> pb::SyncMessage {
        pb::SyncMessage {
            snapshot: true,
            bundle_json: "old bundle".into(),
            ..page(revision, ids, continued)
        }
    }

    fn versioned(id: &str, revision: u64) -> pb::Entry {
        pb::Entry {
            id: id.into(),
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn a_broken_snapshot_is_resumed_from_its_pages_and_applied_whole() {
        let mut a = Assembler::new(UpdateBounds::default());
        a.opened(false);
        assert_eq!(a.resume_request(), None);
        assert_eq!(a.push(snapshot_page(9, &["a", "b"], true)).unwrap(), None);
        assert_eq!(a.push(snapshot_page(9, &["c"], true)).unwrap(), None);
        // The stream breaks before the last page: nothing is returned…
        a.clear();
        assert!(!a.is_partial());
        // …but the next stream resumes from revision 9, naming a, b and c.
        let req = a.resume_request().unwrap();
        assert_eq!(req.revision, 9);
        assert_eq!(req.known_entry_ids, ["a", "b", "c"]);
        a.opened(true);
        // The server's answer: b deleted since, c changed, d and e are the
        // rest of the set (or new); in two pages.
        let mut first = pb::SyncMessage {
            revision: 12,
            upserted: vec![versioned("c", 11), versioned("d", 3)],
            bundle_json: "new bundle".into(),
            continued: true,
            ..Default::default()
        };
        first.tainted_changed = true;
        assert_eq!(a.push(first).unwrap(), None);
        let last = pb::SyncMessage {
            revision: 12,
            upserted: vec![versioned("e", 12)],
            deleted_ids: vec!["b".into()],
            ..Default::default()
        };
        let u = a.push(last).unwrap().unwrap();
        // The whole set, applied as a snapshot: b does not linger.
        assert!(u.snapshot && !u.continued && u.tainted_changed);
        assert_eq!(ids(&u), ["a", "c", "d", "e"]);
        assert_eq!(u.upserted[1], versioned("c", 11));
        assert!(u.deleted_ids.is_empty());
        assert_eq!((u.revision, u.bundle_json.as_str()), (12, "new bundle"));
        // Done: nothing is staged any more, and updates pass as they are.
        assert_eq!(a.resume_request(), None);
        let next = page(13, &["f"], false);
        assert_eq!(a.push(next.clone()).unwrap(), Some(next));
    }

    #[test]
    fn a_broken_resume_keeps_what_it_received() {
        let mut a = Assembler::new(UpdateBounds::default());
        a.opened(false);
        assert_eq!(a.push(snapshot_page(5, &["a", "b"], true)).unwrap(), None);
        a.clear();
        assert!(a.resume_request().is_some());
        a.opened(true);
        let mut answer = page(7, &["b", "c"], true);
        answer.deleted_ids = vec!["a".into()];
        assert_eq!(a.push(answer).unwrap(), None);
        a.clear();
        // Still at the staged revision (c may be older than 7 or newer than
        // 5; held at 5 it is at worst sent again), a deleted.
        let req = a.resume_request().unwrap();
        assert_eq!(
            (req.revision, req.known_entry_ids),
            (5, vec!["b".into(), "c".into()])
        );
        a.opened(true);
        let u = a.push(page(8, &["d"], false)).unwrap().unwrap();
        assert!(u.snapshot);
        assert_eq!(ids(&u), ["b", "c", "d"]);
        assert_eq!(u.revision, 8);
    }

    #[test]
    fn what_cannot_be_resumed_is_not_staged() {
        let mut a = Assembler::new(UpdateBounds::default());
        // Changes (not a snapshot) broken off: resumed from the last
        // revision applied, as before.
        a.opened(false);
        assert_eq!(a.push(page(3, &["a"], true)).unwrap(), None);
        a.clear();
        assert_eq!(a.resume_request(), None);
        // A snapshot at revision 0, or one whose first page held no entry
        // (or only entries with IDs a request cannot name).
        assert_eq!(a.push(snapshot_page(0, &["a"], true)).unwrap(), None);
        a.clear();
        assert_eq!(a.resume_request(), None);
        assert_eq!(a.push(snapshot_page(4, &["bad id"], true)).unwrap(), None);
        a.clear();
        assert_eq!(a.resume_request(), None);
    }

    #[test]
    fn a_staged_snapshot_is_dropped_unless_resumed() {
        let mut a = Assembler::new(UpdateBounds::default());
        assert_eq!(a.push(snapshot_page(5, &["a", "b"], true)).unwrap(), None);
        a.clear();
        // Opened without it (a fresh snapshot asked for instead): the
        // staged entries are gone, and are not merged into what comes.
        a.opened(false);
        assert_eq!(a.resume_request(), None);
        let u = a.push(snapshot_page(6, &["c"], false)).unwrap().unwrap();
        assert_eq!(ids(&u), ["c"]);

        // A server that answers the resume with a snapshot replaces them.
        assert_eq!(a.push(snapshot_page(7, &["a", "b"], true)).unwrap(), None);
        a.clear();
        assert!(a.resume_request().is_some());
        a.opened(true);
        assert_eq!(a.push(snapshot_page(9, &["x"], true)).unwrap(), None);
        let u = a.push(page(9, &["y"], false)).unwrap().unwrap();
        assert!(u.snapshot);
        assert_eq!(ids(&u), ["x", "y"]);
        assert_eq!(a.resume_request(), None);
    }

    #[test]
    fn staged_entries_count_towards_the_bounds() {
        let mut a = Assembler::new(UpdateBounds {
            max_entries: 3,
            max_bytes: usize::MAX,
        });
        assert_eq!(a.push(snapshot_page(5, &["a", "b"], true)).unwrap(), None);
        a.clear();
        assert!(a.resume_request().is_some());
        a.opened(true);
        assert_eq!(
            a.push(page(6, &["c", "d"], false)),
            Err(PagingError::TooManyEntries { max: 3 })
        );
        // Refused whole: the staged entries are gone too.
        assert_eq!(a.resume_request(), None);
    }

    #[test]
    fn a_request_naming_more_ids_than_a_server_takes_is_not_made() {
        // UUID-shaped IDs, as the server assigns: about 110,000 fit.
        let id = |i: usize| format!("{i:08x}-0000-4000-8000-000000000000");
        let fit: Vec<String> = (0..100_000).map(id).collect();
        assert!(known_ids_fit(fit.iter().map(String::as_str)));
        let too_many: Vec<String> = (0..120_000).map(id).collect();
        assert!(!known_ids_fit(too_many.iter().map(String::as_str)));
        let request = pb::SyncRequest {
            revision: 1,
            known_entry_ids: too_many.clone(),
        };
        assert!(request.encoded_len() > 4 * 1024 * 1024);

        // A staged snapshot that large is dropped, not resumed.
        let mut a = Assembler::new(UpdateBounds::default());
        let mut big = snapshot_page(5, &[], true);
        big.upserted = too_many.into_iter().map(|i| entry(&i)).collect();
        assert_eq!(a.push(big).unwrap(), None);
        a.clear();
        assert_eq!(a.resume_request(), None);
        a.opened(false);
        assert_eq!(a.resume_request(), None);
    }
}
