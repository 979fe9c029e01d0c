//! Reassembly of paged sync updates. The server sends one update (a
//! snapshot, or changes) as pages, every page but the last flagged
//! `continued` (the protocol is in crates/sigil-proto/proto/server.proto).
//! The agent applies an update only once its last page arrived, so that
//! workloads never see half of one, and bounds what it buffers meanwhile,
//! so that a server (or whoever holds its key) cannot make it grow without
//! end.

use prost::Message;
use sigil_proto::server::v1 as pb;

/// Default of [`UpdateBounds::max_entries`].
pub const MAX_UPDATE_ENTRIES: usize = 1_000_000;
/// Default of [`UpdateBounds::max_bytes`] (512 MiB).
pub const MAX_UPDATE_BYTES: usize = 512 * 1024 * 1024;

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

/// The pages of the update being received on one sync stream.
#[derive(Debug)]
pub(crate) struct Assembler {
    bounds: UpdateBounds,
    pending: Option<pb::SyncMessage>,
    entries: usize,
    bytes: usize,
}

impl Assembler {
    pub(crate) fn new(bounds: UpdateBounds) -> Self {
        Self {
            bounds,
            pending: None,
            entries: 0,
            bytes: 0,
        }
    }

    /// Drops a partly received update (its stream ended or broke).
    pub(crate) fn clear(&mut self) {
        self.pending = None;
        self.entries = 0;
        self.bytes = 0;
    }

    /// Whether part of an update is buffered.
    pub(crate) fn is_partial(&self) -> bool {
        self.pending.is_some()
    }

    /// Takes one page: the whole update once its last page arrived, `None`
    /// while more are to come. Over a bound, the partial update is dropped
    /// and an error returned; the caller ends the stream.
    pub(crate) fn push(
        &mut self,
        page: pb::SyncMessage,
    ) -> Result<Option<pb::SyncMessage>, PagingError> {
        self.entries = self
            .entries
            .saturating_add(page.upserted.len())
            .saturating_add(page.deleted_ids.len());
        self.bytes = self.bytes.saturating_add(page.encoded_len());
        if self.entries > self.bounds.max_entries {
            self.clear();
            return Err(PagingError::TooManyEntries {
                max: self.bounds.max_entries,
            });
        }
        if self.bytes > self.bounds.max_bytes {
            self.clear();
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
        let update = self.pending.take().map(|mut u| {
            u.continued = false;
            u
        });
        self.clear();
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
}
