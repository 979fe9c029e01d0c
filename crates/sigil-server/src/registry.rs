//! Entries: creating, replacing, deleting and expiring them, always
//! through the store and then waiting for the index to catch up.

use std::time::SystemTime;

use sigil_types::{Entry, EntryId};

use crate::ca::unix;
use crate::error::{EntryRefusal, InternalError, ServerError};
use crate::state::ServerState;

/// The most items one batch request may carry.
pub const MAX_BATCH: usize = 500;

/// `N` bytes from the system's random generator (join token IDs and secrets, entry IDs).
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], ServerError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| InternalError::Random)?;
    Ok(b)
}

/// A new random entry ID in UUID form.
pub fn new_entry_id() -> Result<EntryId, ServerError> {
    let b: [u8; 16] = random_bytes()?;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
    .parse()
    .map_err(|e| InternalError::NewEntryId(e).into())
}

impl ServerState {
    /// Deletes entries whose `expires_at` is at or before `now` (Unix
    /// seconds); returns how many were deleted.
    pub async fn prune_expired_entries(&self, now: i64) -> usize {
        let mut deleted = 0;
        for id in self.index.expired(now) {
            match self.store.delete_entry(&id).await {
                Ok(_) => {
                    deleted += 1;
                    tracing::info!(entry = %id, "expired entry deleted");
                }
                Err(e) => tracing::warn!(entry = %id, error = %e, "deleting expired entry failed"),
            }
        }
        if deleted > 0
            && let Ok(rev) = self.store.revision().await
        {
            self.settle(rev).await;
        }
        deleted
    }

    /// Validates and stores a new entry; returns it as stored.
    pub async fn create_entry(&self, entry: Entry) -> Result<Entry, ServerError> {
        let stored = self.store_new_entry(entry).await?;
        self.settle(stored.revision).await;
        Ok(stored)
    }

    /// Validates and stores new entries one by one, each in a transaction of
    /// its own as [`create_entry`](Self::create_entry) does, but waits for
    /// the index once, after the last: for loading many entries, where a
    /// wait after each would cost more than the writes. Returns how many were
    /// created; the first refusal stops it, and the entries before it stay
    /// (the index catches up with them on its own).
    pub async fn create_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<usize, ServerError> {
        let mut created = 0;
        let mut last_revision = None;
        for entry in entries {
            last_revision = Some(self.store_new_entry(entry).await?.revision);
            created += 1;
        }
        if let Some(revision) = last_revision {
            self.settle(revision).await;
        }
        Ok(created)
    }

    /// Checks a new entry and writes it, without waiting for the index.
    async fn store_new_entry(&self, mut entry: Entry) -> Result<Entry, ServerError> {
        self.check_entry(&entry)?;
        entry.created_at = unix(SystemTime::now());
        Ok(self.store.create_entry(entry).await?)
    }

    /// The checks an entry passes before it is written: valid in this trust
    /// domain, and no other entry with its parent, SPIFFE ID and selectors.
    fn check_entry(&self, entry: &Entry) -> Result<(), ServerError> {
        entry
            .validate(&self.config.trust_domain)
            .map_err(EntryRefusal::Invalid)?;
        match self.index.duplicate_of(entry) {
            Some(other) => Err(EntryRefusal::Duplicate(other).into()),
            None => Ok(()),
        }
    }

    /// Validates and replaces an existing entry.
    pub async fn update_entry(&self, entry: Entry) -> Result<Entry, ServerError> {
        // Said first: whatever else is wrong with the request, an entry that
        // does not exist cannot be updated (the store checks again).
        if self.index.get(&entry.id).is_none() {
            return Err(EntryRefusal::NotFound(entry.id).into());
        }
        self.check_entry(&entry)?;
        let stored = self.store.update_entry(entry).await?;
        self.settle(stored.revision).await;
        Ok(stored)
    }

    /// Deletes an entry.
    pub async fn delete_entry(&self, id: &EntryId) -> Result<Entry, ServerError> {
        let deleted = self.store.delete_entry(id).await?;
        self.settle(self.store.revision().await?).await;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_uuid_shaped_and_distinct() {
        let a = new_entry_id().unwrap();
        let b = new_entry_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 36);
        assert_eq!(a.as_str().matches('-').count(), 4);
    }

    fn entry(path: &str) -> Entry {
        Entry::new(
            new_entry_id().unwrap(),
            format!("spiffe://example.org{path}").parse().unwrap(),
            "spiffe://example.org/sigil/agent/join_token/a"
                .parse()
                .unwrap(),
            sigil_types::Selectors::parse_all(["unix:uid:0"]).unwrap(),
        )
    }

    #[tokio::test]
    async fn create_entries_checks_each_and_returns_once_all_are_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let server = crate::start(crate::ServerConfig::for_test(dir.path()))
            .await
            .unwrap();

        let batch: Vec<Entry> = (0..50).map(|i| entry(&format!("/w{i}"))).collect();
        assert_eq!(server.create_entries(batch.clone()).await.unwrap(), 50);
        // In the index on return: no wait of the caller's own.
        assert_eq!(server.entry_count(), 50);

        // The checks of a single create: a duplicate under another ID stops
        // the call, and what came before it stays.
        let mut dup = batch[7].clone();
        dup.id = new_entry_id().unwrap();
        let err = server
            .create_entries([entry("/before"), dup, entry("/after")])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ServerError::Entry(EntryRefusal::Duplicate(id)) if *id == batch[7].id),
            "{err:?}"
        );
        let stored = server.state().store().list_entries().await.unwrap().entries;
        assert_eq!(stored.len(), 51);
        assert!(stored.iter().any(|e| e.spiffe_id.path() == "/before"));
        server.shutdown().await;
    }
}
