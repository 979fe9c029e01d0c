//! Entries: creating, replacing, deleting and expiring them, always
//! through the store and then waiting for the index to catch up.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use sigil_store::StoreError;
use sigil_types::{Entry, EntryId, Selectors, SpiffeId};

use crate::ca::unix;
use crate::error::{EntryRefusal, InternalError, ServerError};
use crate::state::ServerState;

/// What makes two entries duplicates: the same parent ID, SPIFFE ID and
/// selectors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EntryKey {
    parent_id: SpiffeId,
    spiffe_id: SpiffeId,
    selectors: Selectors,
}

impl EntryKey {
    fn of(e: &Entry) -> Self {
        Self {
            parent_id: e.parent_id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            selectors: e.selectors.clone(),
        }
    }
}

/// The most items one batch request may carry.
pub const MAX_BATCH: usize = 500;

/// `N` bytes from the system's random generator (join token IDs and secrets, entry IDs).
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], ServerError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| InternalError::Random)?;
    Ok(b)
}

/// A new entry ID: a version 7 UUID (RFC 9562), lowercase and dashed.
///
/// The first 48 bits are the Unix time in milliseconds and the next 12 a
/// counter within that millisecond, so the IDs one server makes sort in the
/// order it made them: a bulk load appends to the store's ID index instead
/// of dirtying a random page of it per entry (docs/design-notes.md,
/// "Time-ordered entry IDs"). The last 62 bits are random, so IDs from
/// several servers, or from one whose clock stepped back, stay distinct;
/// the store's primary key refuses the rest. The time they reveal is what
/// `created_at` already says.
pub fn new_entry_id() -> Result<EntryId, ServerError> {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random: [u8; 8] = random_bytes()?;
    uuid_v7(next_stamp(now_ms), u64::from_be_bytes(random))
        .map_err(|e| InternalError::NewEntryId(e).into())
}

/// The last 60-bit stamp (48 bits of milliseconds, 12 of counter) handed
/// out by this process.
static LAST_STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The next stamp after every one handed out before: the current
/// millisecond with its counter at 0, or, when that is not later than the
/// last stamp (several IDs in one millisecond, or the clock stepped back),
/// the last stamp plus one. A counter that runs past 4,095 carries into
/// the millisecond field, which then runs a little ahead of the clock.
fn next_stamp(now_ms: u64) -> u64 {
    use std::sync::atomic::Ordering;
    let now = (now_ms & ((1 << 48) - 1)) << 12;
    let mut last = LAST_STAMP.load(Ordering::Relaxed);
    loop {
        let next = (if now > last { now } else { last + 1 }) & ((1 << 60) - 1);
        match LAST_STAMP.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// The UUID text of a 60-bit stamp and 62 random bits: version 7, variant
/// 0b10 (RFC 9562).
fn uuid_v7(stamp: u64, random: u64) -> Result<EntryId, sigil_types::EntryError> {
    let hi = ((stamp >> 12) << 16) | (0x7 << 12) | (stamp & 0xfff);
    let lo = (0b10 << 62) | (random >> 2);
    let b = ((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes();
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(b"0123456789abcdef"[usize::from(x >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(x & 0xf)]));
    }
    EntryId::try_from(s)
}

impl ServerState {
    /// Deletes entries whose `expires_at` is at or before `now` (Unix
    /// seconds); returns how many were deleted.
    pub async fn prune_expired_entries(&self, now: i64) -> usize {
        let mut deleted = 0;
        // A transaction per batch of the size an admin call may send.
        for ids in self.index.expired(now).chunks(MAX_BATCH) {
            match self.store.delete_entries(ids).await {
                Ok(results) => {
                    for (id, result) in ids.iter().zip(results) {
                        match result {
                            Ok(_) => {
                                deleted += 1;
                                tracing::info!(entry = %id, "expired entry deleted");
                            }
                            // Deleted by someone else meanwhile.
                            Err(e) => {
                                tracing::debug!(entry = %id, error = %e, "expired entry not deleted")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(entries = ids.len(), error = %e, "deleting expired entries failed")
                }
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

    /// Checks a new entry and writes it in a transaction of its own,
    /// without waiting for the index.
    pub(crate) async fn store_new_entry(&self, entry: Entry) -> Result<Entry, ServerError> {
        let entry = self.check_new_entry(entry, unix(SystemTime::now()))?;
        Ok(self.store.create_entry(entry).await?)
    }

    /// Validates and stores new entries in one store transaction, with the
    /// outcome [`create_entry`](Self::create_entry) has for each in turn:
    /// one result per entry, in order, an entry given as an error keeping
    /// it. An entry refused does not stop the others; one with the parent
    /// ID, SPIFFE ID and selectors of an entry created earlier in the batch
    /// is refused as a duplicate of that one. `Err` when the store failed:
    /// then none of the batch was created.
    pub async fn create_entries(
        &self,
        entries: Vec<Result<Entry, ServerError>>,
    ) -> Result<Vec<Result<Entry, ServerError>>, ServerError> {
        let created_at = unix(SystemTime::now());
        let (batch, refused) = split_batch(
            entries
                .into_iter()
                .map(|entry| entry.and_then(|e| self.check_new_entry(e, created_at)))
                .collect(),
        );
        if batch.is_empty() {
            return Ok(refused.into_iter().flatten().map(Err).collect());
        }
        let keys: Vec<(EntryKey, EntryId)> = batch
            .iter()
            .map(|e| (EntryKey::of(e), e.id.clone()))
            .collect();
        let stored = one_per_item(keys.len(), self.store.create_entries(batch).await?)?;
        // The index did not hold the entries created earlier in the batch
        // when it was asked; the store refused their duplicates, which are
        // said as the index would have said them.
        let mut created: HashMap<EntryKey, EntryId> = HashMap::new();
        let mut last = 0;
        let mut stored = stored
            .into_iter()
            .zip(keys)
            .map(|(result, (key, id))| match result {
                Ok(e) => {
                    last = last.max(e.revision);
                    created.insert(key, e.id.clone());
                    Ok(e)
                }
                Err(err) => match created.get(&key) {
                    Some(other) if *other != id => {
                        Err(EntryRefusal::Duplicate(other.clone()).into())
                    }
                    _ => Err(err.into()),
                },
            });
        let results = merge_batch(refused, &mut stored);
        drop(stored);
        if last > 0 {
            self.settle(last).await;
        }
        Ok(results)
    }

    /// The checks of a new entry before the store's: valid, and no entry in
    /// the index with its parent ID, SPIFFE ID and selectors. Returns it
    /// with `created_at` set.
    fn check_new_entry(&self, mut entry: Entry, created_at: i64) -> Result<Entry, ServerError> {
        self.check_entry(&entry)?;
        entry.created_at = created_at;
        Ok(entry)
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

    /// Validates and replaces existing entries in one store transaction,
    /// with the outcome [`update_entry`](Self::update_entry) has for each
    /// in turn: one result per entry, in order, an entry given as an error
    /// keeping it. An entry refused does not stop the others. `Err` when
    /// the store failed: then none of the batch was written.
    pub async fn update_entries(
        &self,
        entries: Vec<Result<Entry, ServerError>>,
    ) -> Result<Vec<Result<Entry, ServerError>>, ServerError> {
        // An entry of the batch may give up its parent ID, SPIFFE ID and
        // selectors to another one updated after it: whether a duplicate of
        // one of them is refused is the store's to say, in the transaction,
        // in the batch's order. A duplicate of any other entry is refused
        // here, as a single update would be.
        let in_batch: HashSet<EntryId> = entries.iter().flatten().map(|e| e.id.clone()).collect();
        // Per entry sent to the store, the entry of the batch the index
        // says it duplicates (whose update may have moved it away).
        let mut deferred = Vec::new();
        let checked = entries
            .into_iter()
            .map(|entry| {
                let entry = entry?;
                if self.index.get(&entry.id).is_none() {
                    return Err(EntryRefusal::NotFound(entry.id).into());
                }
                entry
                    .validate(&self.config.trust_domain)
                    .map_err(EntryRefusal::Invalid)?;
                match self.index.duplicate_of(&entry) {
                    Some(other) if !in_batch.contains(&other) => {
                        Err(EntryRefusal::Duplicate(other).into())
                    }
                    other => {
                        deferred.push((EntryKey::of(&entry), other));
                        Ok(entry)
                    }
                }
            })
            .collect();
        let (batch, refused) = split_batch(checked);
        if batch.is_empty() {
            return Ok(refused.into_iter().flatten().map(Err).collect());
        }
        let stored = one_per_item(batch.len(), self.store.update_entries(batch).await?)?;
        let last = stored
            .iter()
            .flatten()
            .map(|e| e.revision)
            .max()
            .unwrap_or(0);
        // A duplicate the store refused is said as the index would have
        // said it when the entry's turn came: the entry of the batch that
        // took that key before it, or the one that held it and kept it.
        let mut holder: HashMap<EntryKey, EntryId> = HashMap::new();
        let mut held: HashMap<EntryId, EntryKey> = HashMap::new();
        let stored = stored
            .into_iter()
            .zip(deferred)
            .map(|(result, (key, other))| match result {
                Ok(e) => {
                    if let Some(old) = held.remove(&e.id) {
                        holder.remove(&old);
                    }
                    holder.insert(key.clone(), e.id.clone());
                    held.insert(e.id.clone(), key);
                    Ok(e)
                }
                Err(StoreError::AlreadyExists(m)) => match (holder.get(&key), other) {
                    (Some(h), _) => Err(EntryRefusal::Duplicate(h.clone()).into()),
                    (None, Some(o)) if !held.contains_key(&o) => {
                        Err(EntryRefusal::Duplicate(o).into())
                    }
                    _ => Err(StoreError::AlreadyExists(m).into()),
                },
                Err(err) => Err(err.into()),
            });
        let results = merge_batch(refused, stored);
        if last > 0 {
            self.settle(last).await;
        }
        Ok(results)
    }

    /// Deletes an entry.
    pub async fn delete_entry(&self, id: &EntryId) -> Result<Entry, ServerError> {
        let deleted = self.store.delete_entry(id).await?;
        self.settle(self.store.revision().await?).await;
        Ok(deleted)
    }

    /// Deletes entries in one store transaction, with the outcome
    /// [`delete_entry`](Self::delete_entry) has for each in turn: one
    /// result per ID, in order, an ID given as an error keeping it. `Err`
    /// when the store failed: then none was deleted.
    pub async fn delete_entries(
        &self,
        ids: Vec<Result<EntryId, ServerError>>,
    ) -> Result<Vec<Result<Entry, ServerError>>, ServerError> {
        let (batch, refused) = split_batch(ids);
        if batch.is_empty() {
            return Ok(refused.into_iter().flatten().map(Err).collect());
        }
        let deleted = one_per_item(batch.len(), self.store.delete_entries(&batch).await?)?;
        let any = deleted.iter().any(Result::is_ok);
        let results = merge_batch(refused, deleted.into_iter().map(|r| r.map_err(Into::into)));
        if any {
            self.settle(self.store.revision().await?).await;
        }
        Ok(results)
    }
}

/// The items of a batch that go to the store, and per item its refusal or
/// `None` where it went.
fn split_batch<T>(items: Vec<Result<T, ServerError>>) -> (Vec<T>, Vec<Option<ServerError>>) {
    let mut batch = Vec::with_capacity(items.len());
    let refused = items
        .into_iter()
        .map(|item| match item {
            Ok(t) => {
                batch.push(t);
                None
            }
            Err(e) => Some(e),
        })
        .collect();
    (batch, refused)
}

/// The store's results of a batch of `sent` items, refused unless there
/// is one per item.
fn one_per_item<T>(sent: usize, results: Vec<T>) -> Result<Vec<T>, ServerError> {
    if results.len() != sent {
        return Err(InternalError::BatchResults {
            sent,
            got: results.len(),
        }
        .into());
    }
    Ok(results)
}

/// The results of a batch in the caller's order: each refusal in its
/// place, the store's outcomes, in order, in the others.
fn merge_batch<T>(
    refused: Vec<Option<ServerError>>,
    mut stored: impl Iterator<Item = Result<T, ServerError>>,
) -> Vec<Result<T, ServerError>> {
    refused
        .into_iter()
        .map(|refusal| match refusal {
            Some(err) => Err(err),
            None => stored
                .next()
                .unwrap_or_else(|| Err(InternalError::BatchResults { sent: 0, got: 0 }.into())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_version_7_uuids_and_distinct() {
        let a = new_entry_id().unwrap();
        let b = new_entry_id().unwrap();
        assert_ne!(a, b);
        for id in [&a, &b] {
            let s = id.as_str();
            assert_eq!(s.len(), 36);
            let dashes: Vec<usize> = s.match_indices('-').map(|(i, _)| i).collect();
            assert_eq!(dashes, [8, 13, 18, 23], "{s}");
            assert!(
                s.chars()
                    .all(|c| c == '-' || matches!(c, '0'..='9' | 'a'..='f')),
                "{s}"
            );
            assert_eq!(&s[14..15], "7", "version 7: {s}");
            assert!(
                matches!(&s[19..20], "8" | "9" | "a" | "b"),
                "variant 0b10: {s}"
            );
        }
    }

    #[test]
    fn entry_ids_carry_the_time_in_milliseconds() {
        let before = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let id = new_entry_id().unwrap();
        let hex: String = id.as_str().chars().filter(|c| *c != '-').collect();
        let ms = u64::from_str_radix(&hex[..12], 16).unwrap();
        // Earlier IDs of this test binary may have pushed the stamp a few
        // counters past the clock; never by a second.
        assert!(ms >= before && ms < before + 1000, "{ms} vs {before}");
    }

    /// IDs made one after the other sort in the order they were made, also
    /// many within one millisecond and when the clock steps back: what
    /// keeps a bulk load appending to the store's ID index.
    #[test]
    fn entry_ids_made_in_sequence_sort_in_sequence() {
        let ids: Vec<EntryId> = (0..5000).map(|_| new_entry_id().unwrap()).collect();
        for w in ids.windows(2) {
            assert!(w[0].as_str() < w[1].as_str(), "{} then {}", w[0], w[1]);
        }
        // The clock stepped back an hour: still after everything before.
        let last = ids.last().unwrap().as_str().to_owned();
        let back = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            - 3_600_000;
        let after = uuid_v7(next_stamp(back), 0).unwrap();
        assert!(after.as_str() > last.as_str(), "{after} after {last}");
    }

    #[test]
    fn the_uuid_layout_follows_rfc_9562() {
        // Stamp: millisecond 0x0123_4567_89ab, counter 0xcde; random bits
        // all ones, of which the low 62 are kept.
        let id = uuid_v7((0x0123_4567_89ab << 12) | 0xcde, u64::MAX).unwrap();
        assert_eq!(id.as_str(), "01234567-89ab-7cde-bfff-ffffffffffff");
        let id = uuid_v7(0, 0).unwrap();
        assert_eq!(id.as_str(), "00000000-0000-7000-8000-000000000000");
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

    /// A call waiting for the index when the server stops (the follower
    /// stops with it) ends, so the graceful shutdown that waits for the
    /// calls in flight ends too: an agent's first call with a renewed SVID
    /// waits for the index, and one that arrived during a SIGTERM held the
    /// server until it was killed. The timeouts only turn a hang into a
    /// failure.
    #[tokio::test]
    async fn a_call_waiting_for_the_index_ends_when_the_server_stops() {
        let dir = tempfile::tempdir().unwrap();
        let server = crate::start(crate::ServerConfig::for_test(dir.path()))
            .await
            .unwrap();
        let state = server.state().clone();
        let waiting = tokio::spawn(async move { state.settle(u64::MAX).await });
        let hang = std::time::Duration::from_secs(60);
        tokio::time::timeout(hang, server.shutdown())
            .await
            .expect("the server stops");
        tokio::time::timeout(hang, waiting)
            .await
            .expect("the call waiting for the index ends")
            .unwrap();
    }

    #[tokio::test]
    async fn preload_entries_checks_each_and_returns_once_all_are_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let server = crate::start(crate::ServerConfig::for_test(dir.path()))
            .await
            .unwrap();

        let batch: Vec<Entry> = (0..50).map(|i| entry(&format!("/w{i}"))).collect();
        assert_eq!(server.preload_entries(batch.clone()).await.unwrap(), 50);
        // In the index on return: no wait of the caller's own.
        assert_eq!(server.entry_count(), 50);

        // The checks of a single create: a duplicate under another ID stops
        // the call, and what came before it stays.
        let mut dup = batch[7].clone();
        dup.id = new_entry_id().unwrap();
        let err = server
            .preload_entries([entry("/before"), dup, entry("/after")])
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
