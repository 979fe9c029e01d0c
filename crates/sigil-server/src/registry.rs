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
    pub async fn create_entry(&self, mut entry: Entry) -> Result<Entry, ServerError> {
        entry
            .validate(&self.config.trust_domain)
            .map_err(EntryRefusal::Invalid)?;
        if let Some(other) = self.index.duplicate_of(&entry) {
            return Err(EntryRefusal::Duplicate(other).into());
        }
        entry.created_at = unix(SystemTime::now());
        let stored = self.store.create_entry(entry).await?;
        self.settle(stored.revision).await;
        Ok(stored)
    }

    /// Validates and replaces an existing entry.
    pub async fn update_entry(&self, entry: Entry) -> Result<Entry, ServerError> {
        // Said first: whatever else is wrong with the request, an entry that
        // does not exist cannot be updated (the store checks again).
        if self.index.get(&entry.id).is_none() {
            return Err(EntryRefusal::NotFound(entry.id).into());
        }
        entry
            .validate(&self.config.trust_domain)
            .map_err(EntryRefusal::Invalid)?;
        if let Some(other) = self.index.duplicate_of(&entry) {
            return Err(EntryRefusal::Duplicate(other).into());
        }
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
}
