//! The [`Store`], written once for every [`Backend`]: all the SQL (with
//! `$N` placeholders, which SQLite reads as numbered parameters too, except
//! in the generated multi-row inserts of a batch, whose placeholders are the
//! backend's: [`Backend::placeholder`]), and the one shape of a write the
//! change feed records.
//!
//! # Revisions commit in order
//!
//! Such a write is a [`Write`]: its transaction's first statement is
//! `UPDATE meta SET revision = revision + 1 .. RETURNING revision`, and it
//! ends by inserting the change row with that revision and committing. From
//! that update until the transaction ends, no other writer can be handed a
//! revision: the updated row stays locked (PostgreSQL, across servers), and
//! the backend's [`Backend::begin_write`] serializes the writers it cannot
//! (SQLite: one writer connection holding the write lock from `BEGIN`). So
//! the writer holding revision N commits before N + 1 is handed out, and a
//! write that fails (or finds nothing to change) rolls back its revision with
//! everything else, which the next write then gets. Revisions become visible
//! in commit order without gaps, and a follower reading
//! [`Store::changes_since`] never skips one.
//!
//! A batch ([`Store::create_entries`]) is one such write with many
//! revisions: its first statement reserves one per entry it may create, the
//! entries created take them in order, and before committing it lowers the
//! counter to the last one taken, so the revisions of refused entries are
//! not skipped. It records one change per entry created.
//!
//! Writes the feed does not record (join tokens, authorities, pruning) run
//! outside such a transaction.

use std::collections::HashSet;

use sigil_types::{AgentRecord, Entry, EntryId, FederationRelationship, SpiffeId, TrustDomain};
use sqlx::{AssertSqlSafe, Database, Encode, Executor, IntoArguments, Transaction, Type};
use tokio::sync::watch;

use crate::backend::Backend;
use crate::codec;
use crate::rows::{
    Columns, agent_from_row, authority_from_row, bundle_from_row, change_from_row, duplicate_error,
    entry_from_row, federation_from_row, join_token_from_row, meta_revision, unique_violation,
    unix_now,
};
use crate::{AuthorityRecord, Change, EntrySnapshot, JoinToken, Store, StoreError};

// Column lists as macros so they can be spliced into `concat!` and the
// queries stay `&'static str`, which sqlx accepts as safe SQL.
macro_rules! entry_cols {
    () => {
        "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, \
         federates_with, admin, downstream, hint, expires_at, revision, created_at, attributes"
    };
}
macro_rules! agent_cols {
    () => {
        "spiffe_id, attestation_type, selectors, serial, previous_serial, expires_at, banned, \
         can_reattest, created_at, updated_at, serial_used"
    };
}
macro_rules! federation_cols {
    () => {
        "trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, from_config"
    };
}
macro_rules! authority_cols {
    () => {
        "id, kind, state, public, not_before, not_after, created_at, owner, tainted"
    };
}

const ENTRY_BY_ID: &str = concat!("SELECT ", entry_cols!(), " FROM entries WHERE id = $1");

/// One write recorded in the change feed, holding its revision; see the
/// module docs. Dropped without [`commit`](Self::commit), it rolls back, its
/// revision included.
struct Write<B: Backend> {
    tx: Transaction<'static, B::Db>,
    revision: u64,
}

impl<B, DB> Write<B>
where
    B: Backend<Db = DB>,
    DB: Database,
    DB::Arguments: IntoArguments<DB>,
    DB::Row: Columns,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a str>: Encode<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: Encode<'a, DB>,
    for<'a> bool: Encode<'a, DB> + Type<DB>,
{
    /// Begins the transaction and allocates the next revision as its first
    /// statement.
    async fn begin(backend: &B) -> Result<Self, StoreError> {
        Self::begin_reserving(backend, 1).await
    }

    /// Begins the transaction and allocates the next `n` revisions as its
    /// first statement; `revision` is the highest. A batch
    /// reserves one per entry it may create and gives back, before it
    /// commits, what it did not use ([`release_unused`](Self::release_unused)).
    async fn begin_reserving(backend: &B, n: u64) -> Result<Self, StoreError> {
        let mut tx = backend.begin_write().await?;
        let row =
            sqlx::query("UPDATE meta SET revision = revision + $1 WHERE id = 1 RETURNING revision")
                .bind(codec::to_i64("revisions reserved", n)?)
                .fetch_one(&mut *tx)
                .await?;
        let revision = meta_revision(&row)?;
        Ok(Self { tx, revision })
    }

    /// Gives entry `id`, inserted by this write, the revision `revision`.
    async fn move_revision(&mut self, id: &EntryId, revision: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE entries SET revision = $1 WHERE id = $2")
            .bind(codec::to_i64("revision", revision)?)
            .bind(id.as_str())
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// Lowers the counter to `last`, the highest revision the write used, so
    /// the revisions it reserved but did not use are the next writer's and
    /// none is skipped. The counter's row is still this transaction's, so no
    /// other writer has seen the reserved ones.
    async fn release_unused(&mut self, last: u64) -> Result<(), StoreError> {
        if last < self.revision {
            sqlx::query("UPDATE meta SET revision = $1 WHERE id = 1")
                .bind(codec::to_i64("revision", last)?)
                .execute(self.conn())
                .await?;
            self.revision = last;
        }
        Ok(())
    }

    /// The transaction's connection, for the write itself.
    fn conn(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }

    /// Records the change under this write's revision, announces it and
    /// commits.
    async fn commit(
        mut self,
        kind: &str,
        subject: &str,
        payload: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO changes (revision, kind, subject, payload) VALUES ($1, $2, $3, $4)",
        )
        .bind(codec::to_i64("revision", self.revision)?)
        .bind(kind)
        .bind(subject)
        .bind(payload)
        .execute(&mut *self.tx)
        .await?;
        self.finish().await
    }

    /// Announces the write's (highest) revision and commits.
    async fn finish(mut self) -> Result<(), StoreError> {
        B::announce(&mut self.tx, self.revision).await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Replaces stored entry `entry.id` with `entry` under `revision`,
    /// keeping the stored `created_at` (set into `entry`). The inner error is
    /// the refusal [`Store::update_entry`] documents (not found, a
    /// duplicate), with nothing written; the outer one a database failure.
    async fn replace_entry(
        &mut self,
        entry: &mut Entry,
        cols: &EntryColumns,
        revision: u64,
    ) -> Result<Result<(), StoreError>, StoreError> {
        let Some(stored) = self.fetch_entry(entry.id.as_str()).await? else {
            return Ok(Err(StoreError::NotFound(format!("entry {}", entry.id))));
        };
        entry.created_at = stored.created_at;
        entry.revision = revision;
        if let Some(other) = self
            .find_duplicate(entry, &cols.selectors, i64::MAX)
            .await?
        {
            return Ok(Err(duplicate_error(entry, &other)));
        }
        // created_at is the stored one, written back unchanged.
        match self
            .write_entry(
                "UPDATE entries SET spiffe_id = $2, parent_id = $3, selectors = $4, \
                 x509_svid_ttl = $5, jwt_svid_ttl = $6, dns_names = $7, federates_with = $8, \
                 admin = $9, downstream = $10, hint = $11, expires_at = $12, revision = $13, \
                 created_at = $14, attributes = $15 WHERE id = $1",
                entry,
                cols,
            )
            .await
        {
            Ok(()) => Ok(Ok(())),
            Err(refused @ StoreError::AlreadyExists(_)) => Ok(Err(refused)),
            Err(e) => Err(e),
        }
    }

    /// Deletes stored entry `id`; the entry as it was, or `None` when there
    /// is none.
    async fn remove_entry(&mut self, id: &EntryId) -> Result<Option<Entry>, StoreError> {
        sqlx::query(concat!(
            "DELETE FROM entries WHERE id = $1 RETURNING ",
            entry_cols!()
        ))
        .bind(id.as_str())
        .fetch_optional(self.conn())
        .await?
        .as_ref()
        .map(entry_from_row)
        .transpose()
    }

    /// Ends a batch that reserved revisions and used them up to `last`:
    /// with changes, gives back the revisions it did not use, records the
    /// changes and commits; without, rolls back (the reservation with it).
    async fn finish_batch(mut self, changes: &[EntryChange], last: u64) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.release_unused(last).await?;
        self.record_entry_changes(changes).await?;
        self.finish().await
    }

    /// Records the entry changes of a batch, `CHANGE_ROWS` rows a statement.
    async fn record_entry_changes(&mut self, changes: &[EntryChange]) -> Result<(), StoreError> {
        for chunk in changes.chunks(CHANGE_ROWS) {
            let sql = values_sql::<B>(
                "INSERT INTO changes (revision, kind, subject, payload) VALUES ",
                4,
                chunk.len(),
                "",
            );
            // Only placeholders are spliced in: the values are bound.
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for change in chunk {
                query = query
                    .bind(change.revision)
                    .bind(change.kind)
                    .bind(change.subject.as_str())
                    .bind(Some(change.payload.as_str()));
            }
            query.execute(self.conn()).await?;
        }
        Ok(())
    }

    async fn fetch_entry(&mut self, id: &str) -> Result<Option<Entry>, StoreError> {
        sqlx::query(ENTRY_BY_ID)
            .bind(id)
            .fetch_optional(self.conn())
            .await?
            .as_ref()
            .map(entry_from_row)
            .transpose()
    }

    /// Finds another entry with the same (parent_id, spiffe_id, selectors), so
    /// the error can name it; the unique index would only say that one exists.
    /// Only rows with a revision below `before` count (see
    /// [`refusal`](Self::refusal)).
    async fn find_duplicate(
        &mut self,
        entry: &Entry,
        selectors: &str,
        before: i64,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT id FROM entries WHERE parent_id = $1 AND spiffe_id = $2 AND selectors = $3 \
             AND id <> $4 AND revision < $5 LIMIT 1",
        )
        .bind(entry.parent_id.as_str())
        .bind(entry.spiffe_id.as_str())
        .bind(selectors)
        .bind(entry.id.as_str())
        .bind(before)
        .fetch_optional(self.conn())
        .await?;
        Ok(row
            .map(|row| row.text("id").map(str::to_owned))
            .transpose()?)
    }

    /// Inserts new entries, each unless its id, or its parent ID, SPIFFE ID
    /// and selectors, are taken, by a stored entry or one earlier in
    /// `entries`: the unique indexes decide, in the insert itself (`ON
    /// CONFLICT DO NOTHING`, which, unlike a failed statement, leaves a
    /// PostgreSQL transaction usable for the rest of a batch), `ENTRY_ROWS`
    /// rows a statement. Each entry's `revision` must be distinct and
    /// reserved by this write: what comes back is the set of the revisions
    /// inserted. A statement that inserted all its rows says so in its
    /// count; only one that skipped some is asked which it wrote (rows
    /// streamed back one by one cost the common case more than the query).
    async fn insert_entries(
        &mut self,
        entries: &[(Entry, EntryColumns)],
    ) -> Result<HashSet<i64>, StoreError> {
        let mut inserted = HashSet::with_capacity(entries.len());
        for chunk in entries.chunks(ENTRY_ROWS) {
            let sql = values_sql::<B>(
                concat!("INSERT INTO entries (", entry_cols!(), ") VALUES "),
                15,
                chunk.len(),
                " ON CONFLICT DO NOTHING",
            );
            // Only placeholders are spliced in: the values are bound.
            let mut query = sqlx::query(AssertSqlSafe(sql));
            let mut revisions = Vec::with_capacity(chunk.len());
            for (entry, cols) in chunk {
                query = Self::bind_entry(query, entry, cols)?;
                revisions.push(codec::to_i64("revision", entry.revision)?);
            }
            let done = query.execute(self.conn()).await?;
            if B::rows_affected(&done) == chunk.len() as u64 {
                inserted.extend(revisions);
            } else {
                inserted.extend(self.revisions_written(chunk, &revisions).await?);
            }
        }
        Ok(inserted)
    }

    /// Which of `revisions`, those of the rows `chunk` tried to insert, are
    /// stored: a stored row with one of them was inserted by this write
    /// (they were reserved by it), and each row it inserted has the id of
    /// an entry of `chunk`.
    async fn revisions_written(
        &mut self,
        chunk: &[(Entry, EntryColumns)],
        revisions: &[i64],
    ) -> Result<Vec<i64>, StoreError> {
        let mut written = Vec::with_capacity(chunk.len());
        for (entry, _) in chunk {
            let row = sqlx::query("SELECT revision FROM entries WHERE id = $1")
                .bind(entry.id.as_str())
                .fetch_optional(self.conn())
                .await?;
            if let Some(row) = row {
                let revision = row.int("revision")?;
                if revisions.contains(&revision) {
                    written.push(revision);
                }
            }
        }
        Ok(written)
    }

    /// Why the insert of `entry` (revision `before`) did nothing, worded as
    /// [`Store::create_entry`] documents, from the rows written before it
    /// (a lower revision): a later entry of its batch may have taken its id
    /// since. Only a refused insert pays for these queries.
    async fn refusal(
        &mut self,
        entry: &Entry,
        cols: &EntryColumns,
        before: i64,
    ) -> Result<StoreError, StoreError> {
        let taken = sqlx::query("SELECT id FROM entries WHERE id = $1 AND revision < $2")
            .bind(entry.id.as_str())
            .bind(before)
            .fetch_optional(self.conn())
            .await?;
        if taken.is_some() {
            return Ok(StoreError::AlreadyExists(format!(
                "entry {} already exists",
                entry.id
            )));
        }
        if let Some(other) = self.find_duplicate(entry, &cols.selectors, before).await? {
            return Ok(duplicate_error(entry, &other));
        }
        // PostgreSQL's index compares a hash of the selectors: a collision
        // of two different sets lands here.
        Ok(StoreError::AlreadyExists(format!(
            "entry {} duplicates another entry",
            entry.id
        )))
    }

    /// Binds the entry's columns, in the order of `entry_cols!`, as the
    /// next 15 parameters of `query`.
    fn bind_entry<'q>(
        query: sqlx::query::Query<'q, DB, DB::Arguments>,
        entry: &Entry,
        cols: &EntryColumns,
    ) -> Result<sqlx::query::Query<'q, DB, DB::Arguments>, StoreError> {
        Ok(query
            .bind(entry.id.as_str())
            .bind(entry.spiffe_id.as_str())
            .bind(entry.parent_id.as_str())
            .bind(cols.selectors.as_str())
            .bind(cols.x509_svid_ttl)
            .bind(cols.jwt_svid_ttl)
            .bind(cols.dns_names.as_str())
            .bind(cols.federates_with.as_str())
            .bind(entry.admin)
            .bind(entry.downstream)
            .bind(entry.hint.as_str())
            .bind(entry.expires_at)
            .bind(codec::to_i64("revision", entry.revision)?)
            .bind(entry.created_at)
            .bind(cols.attributes.as_str()))
    }

    /// Runs `sql`, an UPDATE taking the entry's columns as `$1` to `$15` in
    /// the order of `entry_cols!`; a unique-index violation the checks
    /// missed is [`StoreError::AlreadyExists`].
    async fn write_entry(
        &mut self,
        sql: &'static str,
        entry: &Entry,
        cols: &EntryColumns,
    ) -> Result<(), StoreError> {
        Self::bind_entry(sqlx::query(sql), entry, cols)?
            .execute(self.conn())
            .await
            .map_err(|e| {
                unique_violation(e, || format!("entry {} duplicates another entry", entry.id))
            })?;
        Ok(())
    }

    /// Runs `query`, an `UPDATE agents .. RETURNING` of agent `id`, as one
    /// write recorded in the feed; `None`, with nothing written and no
    /// revision spent, when it matched no row.
    async fn update_agent(
        backend: &B,
        id: &SpiffeId,
        query: sqlx::query::Query<'_, DB, DB::Arguments>,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let mut write = Self::begin(backend).await?;
        let Some(row) = query.fetch_optional(write.conn()).await? else {
            return Ok(None);
        };
        let agent = agent_from_row(&row)?;
        write
            .commit(codec::AGENT_CHANGED, id.as_str(), None)
            .await?;
        Ok(Some(agent))
    }
}

/// `head`, then `rows` groups of `width` placeholders of `B`'s
/// ([`Backend::placeholder`]: `($1, $2), ($3, $4)` or `(?, ?), (?, ?)`),
/// then `tail`: a multi-row statement whose values are all bound, in order.
fn values_sql<B: Backend>(head: &str, width: usize, rows: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * width * 6);
    sql.push_str(head);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..width {
            if col > 0 {
                sql.push_str(", ");
            }
            B::placeholder(&mut sql, row * width + col + 1);
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

/// Rows of `entries` one statement of a batch inserts (15 parameters each,
/// 960 a statement: far below either database's limit).
const ENTRY_ROWS: usize = 64;

/// Rows of `changes` one statement of a batch inserts: few enough
/// parameters for either database (SQLite allows 32,766, PostgreSQL 65,535),
/// many enough that the round trips stop mattering.
const CHANGE_ROWS: usize = 64;

/// The change a batch records for one entry it wrote.
struct EntryChange {
    revision: i64,
    /// `codec::ENTRY_UPSERTED` or `codec::ENTRY_DELETED`.
    kind: &'static str,
    subject: String,
    payload: String,
}

impl EntryChange {
    fn new(kind: &'static str, revision: u64, entry: &Entry) -> Result<Self, StoreError> {
        Ok(Self {
            revision: codec::to_i64("revision", revision)?,
            kind,
            subject: entry.id.to_string(),
            payload: codec::entry_json(entry)?,
        })
    }
}

/// The entries of a batch that can be stored, with their columns, and per
/// entry its refusal (unstorable), or `None` where it went. Encoded before
/// the transaction, so an unstorable entry is refused on its own and
/// reserves no revision.
#[allow(clippy::type_complexity, reason = "a pair of plain vectors")]
fn encode_batch(
    entries: Vec<Entry>,
) -> (
    Vec<(Entry, EntryColumns)>,
    Vec<Option<Result<Entry, StoreError>>>,
) {
    let mut refused = Vec::with_capacity(entries.len());
    let mut storable = Vec::with_capacity(entries.len());
    for entry in entries {
        match EntryColumns::new(&entry) {
            Ok(cols) => {
                storable.push((entry, cols));
                refused.push(None);
            }
            Err(refusal) => refused.push(Some(Err(refusal))),
        }
    }
    (storable, refused)
}

/// The results of a batch in the caller's order: each refusal of
/// [`encode_batch`] in its place, the transaction's outcomes, in order, in
/// the others.
fn merge_batch(
    refused: Vec<Option<Result<Entry, StoreError>>>,
    outcomes: Vec<Result<Entry, StoreError>>,
) -> Vec<Result<Entry, StoreError>> {
    let mut outcomes = outcomes.into_iter();
    refused
        .into_iter()
        .filter_map(|r| r.or_else(|| outcomes.next()))
        .collect()
}

/// An entry's columns in database form, encoded before any write so that an
/// unstorable value fails before the transaction touches anything.
struct EntryColumns {
    selectors: String,
    x509_svid_ttl: i64,
    jwt_svid_ttl: i64,
    dns_names: String,
    federates_with: String,
    attributes: String,
}

impl EntryColumns {
    fn new(entry: &Entry) -> Result<Self, StoreError> {
        Ok(Self {
            selectors: codec::selectors_json(&entry.selectors)?,
            x509_svid_ttl: codec::to_i64("x509_svid_ttl", entry.x509_svid_ttl)?,
            jwt_svid_ttl: codec::to_i64("jwt_svid_ttl", entry.jwt_svid_ttl)?,
            dns_names: codec::dns_names_json(&entry.dns_names)?,
            federates_with: codec::federates_with_json(&entry.federates_with)?,
            attributes: codec::attributes_json(&entry.attributes)?,
        })
    }
}

#[async_trait::async_trait]
impl<B, DB> Store for B
where
    B: Backend<Db = DB>,
    DB: Database,
    DB::Arguments: IntoArguments<DB>,
    DB::Row: Columns,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a str>: Encode<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: Encode<'a, DB>,
    for<'a> bool: Encode<'a, DB> + Type<DB>,
    for<'a> &'a [u8]: Encode<'a, DB> + Type<DB>,
{
    fn subscribe_changes(&self) -> Option<watch::Receiver<u64>> {
        self.subscribe()
    }

    async fn create_entry(&self, entry: Entry) -> Result<Entry, StoreError> {
        let cols = EntryColumns::new(&entry)?;
        let mut write = Write::begin(self).await?;
        let mut one = [(entry, cols)];
        one[0].0.revision = write.revision;
        let inserted = write.insert_entries(&one).await?;
        let [(entry, cols)] = one;
        if inserted.is_empty() {
            let before = codec::to_i64("revision", entry.revision)?;
            return Err(write.refusal(&entry, &cols, before).await?);
        }
        let payload = codec::entry_json(&entry)?;
        write
            .commit(codec::ENTRY_UPSERTED, entry.id.as_str(), Some(&payload))
            .await?;
        Ok(entry)
    }

    async fn create_entries(
        &self,
        entries: Vec<Entry>,
    ) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
        let (mut storable, results) = encode_batch(entries);
        if storable.is_empty() {
            return Ok(results.into_iter().flatten().collect());
        }
        let reserved = storable.len() as u64;
        let mut write = Write::begin_reserving(self, reserved).await?;
        let first = write.revision + 1 - reserved;
        // Each entry is inserted under a revision of its own, by which the
        // statement says which it inserted; those after a refused one then
        // move down, so the revisions used are contiguous.
        for (entry, revision) in storable.iter_mut().zip(first..) {
            entry.0.revision = revision;
        }
        let inserted = write.insert_entries(&storable).await?;
        let mut next = first;
        let mut changes = Vec::with_capacity(inserted.len());
        let mut outcomes = Vec::with_capacity(storable.len());
        for (mut entry, cols) in storable {
            let provisional = codec::to_i64("revision", entry.revision)?;
            if !inserted.contains(&provisional) {
                outcomes.push(Err(write.refusal(&entry, &cols, provisional).await?));
                continue;
            }
            if entry.revision != next {
                write.move_revision(&entry.id, next).await?;
                entry.revision = next;
            }
            // Failing here (it cannot for a storable entry) fails the whole
            // batch: the entry's row is already written.
            changes.push(EntryChange::new(codec::ENTRY_UPSERTED, next, &entry)?);
            next += 1;
            outcomes.push(Ok(entry));
        }
        write.finish_batch(&changes, next - 1).await?;
        Ok(merge_batch(results, outcomes))
    }

    async fn update_entry(&self, mut entry: Entry) -> Result<Entry, StoreError> {
        let cols = EntryColumns::new(&entry)?;
        let mut write = Write::begin(self).await?;
        let revision = write.revision;
        write.replace_entry(&mut entry, &cols, revision).await??;
        let payload = codec::entry_json(&entry)?;
        write
            .commit(codec::ENTRY_UPSERTED, entry.id.as_str(), Some(&payload))
            .await?;
        Ok(entry)
    }

    async fn update_entries(
        &self,
        entries: Vec<Entry>,
    ) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
        let (storable, results) = encode_batch(entries);
        if storable.is_empty() {
            return Ok(results.into_iter().flatten().collect());
        }
        let reserved = storable.len() as u64;
        let mut write = Write::begin_reserving(self, reserved).await?;
        let mut next = write.revision + 1 - reserved;
        let mut changes = Vec::with_capacity(storable.len());
        let mut outcomes = Vec::with_capacity(storable.len());
        for (mut entry, cols) in storable {
            match write.replace_entry(&mut entry, &cols, next).await? {
                Ok(()) => {
                    changes.push(EntryChange::new(codec::ENTRY_UPSERTED, next, &entry)?);
                    next += 1;
                    outcomes.push(Ok(entry));
                }
                Err(refusal) => outcomes.push(Err(refusal)),
            }
        }
        write.finish_batch(&changes, next - 1).await?;
        Ok(merge_batch(results, outcomes))
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<Entry, StoreError> {
        let mut write = Write::begin(self).await?;
        let Some(entry) = write.remove_entry(id).await? else {
            return Err(StoreError::NotFound(format!("entry {id}")));
        };
        let payload = codec::entry_json(&entry)?;
        write
            .commit(codec::ENTRY_DELETED, id.as_str(), Some(&payload))
            .await?;
        Ok(entry)
    }

    async fn delete_entries(
        &self,
        ids: &[EntryId],
    ) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let reserved = ids.len() as u64;
        let mut write = Write::begin_reserving(self, reserved).await?;
        let mut next = write.revision + 1 - reserved;
        let mut changes = Vec::with_capacity(ids.len());
        let mut outcomes = Vec::with_capacity(ids.len());
        for id in ids {
            match write.remove_entry(id).await? {
                Some(entry) => {
                    changes.push(EntryChange::new(codec::ENTRY_DELETED, next, &entry)?);
                    next += 1;
                    outcomes.push(Ok(entry));
                }
                None => outcomes.push(Err(StoreError::NotFound(format!("entry {id}")))),
            }
        }
        write.finish_batch(&changes, next - 1).await?;
        Ok(outcomes)
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError> {
        sqlx::query(ENTRY_BY_ID)
            .bind(id.as_str())
            .fetch_optional(self.reader())
            .await?
            .as_ref()
            .map(entry_from_row)
            .transpose()
    }

    async fn list_entries(&self) -> Result<EntrySnapshot, StoreError> {
        // The counter and the rows come from the same committed state.
        let mut tx = self.begin_snapshot().await?;
        let meta = sqlx::query("SELECT revision FROM meta WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            entry_cols!(),
            " FROM entries ORDER BY id"
        ))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let entries = rows.iter().map(entry_from_row).collect::<Result<_, _>>()?;
        let revision = meta_revision(&meta)?;
        Ok(EntrySnapshot { entries, revision })
    }

    async fn changes_since(&self, after: u64, limit: u32) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(
            "SELECT revision, kind, subject, payload FROM changes WHERE revision > $1 \
             ORDER BY revision LIMIT $2",
        )
        .bind(codec::clamp_i64(after))
        .bind(i64::from(limit))
        .fetch_all(self.reader())
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT revision FROM meta WHERE id = 1")
            .fetch_one(self.reader())
            .await?;
        meta_revision(&row)
    }

    async fn prune_changes(&self, up_to: u64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM changes WHERE revision <= $1")
            .bind(codec::clamp_i64(up_to))
            .execute(self.writer())
            .await?;
        Ok(B::rows_affected(&done))
    }

    async fn upsert_agent(&self, agent: AgentRecord) -> Result<(), StoreError> {
        let selectors = codec::selectors_json(&agent.selectors)?;
        let mut write = Write::begin(self).await?;
        sqlx::query(concat!(
            "INSERT INTO agents (",
            agent_cols!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (spiffe_id) DO UPDATE SET \
             attestation_type = excluded.attestation_type, selectors = excluded.selectors, \
             serial = excluded.serial, previous_serial = excluded.previous_serial, \
             serial_used = excluded.serial_used, expires_at = excluded.expires_at, \
             banned = (agents.banned OR excluded.banned), can_reattest = excluded.can_reattest, \
             created_at = excluded.created_at, updated_at = excluded.updated_at"
        ))
        .bind(agent.spiffe_id.as_str())
        .bind(agent.attestation_type.as_str())
        .bind(selectors.as_str())
        .bind(agent.serial.as_str())
        .bind(agent.previous_serial.as_str())
        .bind(agent.expires_at)
        .bind(agent.banned)
        .bind(agent.can_reattest)
        .bind(agent.created_at)
        .bind(agent.updated_at)
        .bind(agent.serial_used)
        .execute(write.conn())
        .await?;
        write
            .commit(codec::AGENT_CHANGED, agent.spiffe_id.as_str(), None)
            .await
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            agent_cols!(),
            " FROM agents WHERE spiffe_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(self.reader())
        .await?
        .as_ref()
        .map(agent_from_row)
        .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            agent_cols!(),
            " FROM agents ORDER BY spiffe_id"
        ))
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(agent_from_row)
        .collect()
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<AgentRecord, StoreError> {
        let mut write = Write::begin(self).await?;
        let row = sqlx::query(concat!(
            "DELETE FROM agents WHERE spiffe_id = $1 RETURNING ",
            agent_cols!()
        ))
        .bind(id.as_str())
        .fetch_optional(write.conn())
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("agent {id}")));
        };
        let agent = agent_from_row(&row)?;
        write
            .commit(codec::AGENT_DELETED, id.as_str(), None)
            .await?;
        Ok(agent)
    }

    async fn renew_agent_serial(
        &self,
        id: &SpiffeId,
        presented_serial: &str,
        serial: &str,
        expires_at: i64,
        updated_at: i64,
    ) -> Result<Option<AgentRecord>, StoreError> {
        // Under PostgreSQL's READ COMMITTED, the WHERE clause is checked
        // again on the row as another server's concurrent write left it.
        let query = sqlx::query(concat!(
            "UPDATE agents SET previous_serial = $1, serial = $2, serial_used = FALSE, \
             expires_at = $3, updated_at = $4 WHERE spiffe_id = $5 AND NOT banned AND $1 <> '' \
             AND (serial = $1 OR (previous_serial = $1 AND NOT serial_used)) RETURNING ",
            agent_cols!()
        ))
        .bind(presented_serial)
        .bind(serial)
        .bind(expires_at)
        .bind(updated_at)
        .bind(id.as_str());
        Write::update_agent(self, id, query).await
    }

    async fn mark_agent_serial_used(
        &self,
        id: &SpiffeId,
        serial: &str,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let query = sqlx::query(concat!(
            "UPDATE agents SET serial_used = TRUE \
             WHERE spiffe_id = $1 AND serial = $2 AND NOT serial_used RETURNING ",
            agent_cols!()
        ))
        .bind(id.as_str())
        .bind(serial);
        Write::update_agent(self, id, query).await
    }

    async fn set_agent_banned(
        &self,
        id: &SpiffeId,
        banned: bool,
    ) -> Result<AgentRecord, StoreError> {
        let query = sqlx::query(concat!(
            "UPDATE agents SET banned = $1 WHERE spiffe_id = $2 RETURNING ",
            agent_cols!()
        ))
        .bind(banned)
        .bind(id.as_str());
        Write::update_agent(self, id, query)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, expires_at, created_at) VALUES ($1, $2, $3)",
        )
        .bind(token.token_hash.as_str())
        .bind(token.expires_at)
        .bind(token.created_at)
        .execute(self.writer())
        .await
        .map_err(|e| unique_violation(e, || "join token already exists".to_owned()))?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<JoinToken, StoreError> {
        // One DELETE .. RETURNING: two servers (or two requests) presenting
        // the same token cannot both get it.
        let row = sqlx::query(
            "DELETE FROM join_tokens WHERE token_hash = $1 \
             RETURNING token_hash, expires_at, created_at",
        )
        .bind(token_hash)
        .fetch_optional(self.writer())
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound("join token".to_owned()));
        };
        let token = join_token_from_row(&row)?;
        if token.expires_at <= now {
            return Err(StoreError::TokenExpired);
        }
        Ok(token)
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM join_tokens WHERE expires_at <= $1")
            .bind(now)
            .execute(self.writer())
            .await?;
        Ok(B::rows_affected(&done))
    }

    async fn put_bundle(
        &self,
        trust_domain: &TrustDomain,
        bundle_json: &str,
    ) -> Result<(), StoreError> {
        let mut write = Write::begin(self).await?;
        sqlx::query(
            "INSERT INTO bundles (trust_domain, bundle_json, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (trust_domain) DO UPDATE SET bundle_json = excluded.bundle_json, \
             updated_at = excluded.updated_at",
        )
        .bind(trust_domain.name())
        .bind(bundle_json)
        .bind(unix_now())
        .execute(write.conn())
        .await?;
        write
            .commit(codec::BUNDLE_CHANGED, trust_domain.name(), None)
            .await
    }

    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT bundle_json FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain.name())
            .fetch_optional(self.reader())
            .await?;
        Ok(row
            .map(|row| row.text("bundle_json").map(str::to_owned))
            .transpose()?)
    }

    async fn list_bundles(&self) -> Result<Vec<(TrustDomain, String)>, StoreError> {
        sqlx::query("SELECT trust_domain, bundle_json FROM bundles ORDER BY trust_domain")
            .fetch_all(self.reader())
            .await?
            .iter()
            .map(bundle_from_row)
            .collect()
    }

    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<(), StoreError> {
        let mut write = Write::begin(self).await?;
        let done = sqlx::query("DELETE FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain.name())
            .execute(write.conn())
            .await?;
        if B::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("bundle for {trust_domain}")));
        }
        write
            .commit(codec::BUNDLE_DELETED, trust_domain.name(), None)
            .await
    }

    async fn put_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<(), StoreError> {
        let mut write = Write::begin(self).await?;
        let endpoint_id = relationship
            .profile
            .endpoint_spiffe_id()
            .map(|id| id.as_str())
            .unwrap_or_default();
        sqlx::query(
            "INSERT INTO federation_relationships (trust_domain, bundle_endpoint_url, profile, \
             endpoint_spiffe_id, from_config, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (trust_domain) DO UPDATE SET \
             bundle_endpoint_url = excluded.bundle_endpoint_url, profile = excluded.profile, \
             endpoint_spiffe_id = excluded.endpoint_spiffe_id, \
             from_config = excluded.from_config, updated_at = excluded.updated_at",
        )
        .bind(relationship.trust_domain.name())
        .bind(relationship.bundle_endpoint_url.as_str())
        .bind(relationship.profile.name())
        .bind(endpoint_id)
        .bind(relationship.from_config)
        .bind(unix_now())
        .execute(write.conn())
        .await?;
        write
            .commit(
                codec::FEDERATION_CHANGED,
                relationship.trust_domain.name(),
                None,
            )
            .await
    }

    async fn get_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            federation_cols!(),
            " FROM federation_relationships WHERE trust_domain = $1"
        ))
        .bind(trust_domain.name())
        .fetch_optional(self.reader())
        .await?;
        row.as_ref().map(federation_from_row).transpose()
    }

    async fn list_federation_relationships(
        &self,
    ) -> Result<Vec<FederationRelationship>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            federation_cols!(),
            " FROM federation_relationships ORDER BY trust_domain"
        ))
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(federation_from_row)
        .collect()
    }

    async fn delete_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederationRelationship, StoreError> {
        let mut write = Write::begin(self).await?;
        let row = sqlx::query(concat!(
            "DELETE FROM federation_relationships WHERE trust_domain = $1 RETURNING ",
            federation_cols!()
        ))
        .bind(trust_domain.name())
        .fetch_optional(write.conn())
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!(
                "federation relationship with {trust_domain}"
            )));
        };
        let relationship = federation_from_row(&row)?;
        write
            .commit(codec::FEDERATION_DELETED, trust_domain.name(), None)
            .await?;
        Ok(relationship)
    }

    async fn put_authority(&self, authority: AuthorityRecord) -> Result<(), StoreError> {
        sqlx::query(concat!(
            "INSERT INTO authorities (",
            authority_cols!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO UPDATE SET \
             kind = excluded.kind, state = excluded.state, public = excluded.public, \
             not_before = excluded.not_before, not_after = excluded.not_after, \
             created_at = excluded.created_at, owner = excluded.owner, \
             tainted = excluded.tainted"
        ))
        .bind(authority.id.as_str())
        .bind(authority.kind.as_str())
        .bind(authority.state.as_str())
        .bind(authority.public.as_slice())
        .bind(authority.not_before)
        .bind(authority.not_after)
        .bind(authority.created_at)
        .bind(authority.owner.as_str())
        .bind(authority.tainted)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            authority_cols!(),
            " FROM authorities ORDER BY created_at, id"
        ))
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(authority_from_row)
        .collect()
    }

    async fn delete_authority(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM authorities WHERE id = $1")
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::values_sql;

    /// SQLite's batch statements use anonymous parameters: with numbered
    /// ones, binding a statement costs the square of its parameter count
    /// ([`crate::backend::sqlite::SqliteStore`]'s `placeholder`).
    #[test]
    fn sqlite_batch_statements_bind_by_position() {
        let sql = values_sql::<crate::SqliteStore>("INSERT INTO t (a, b) VALUES ", 2, 3, " X");
        assert_eq!(sql, "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?) X");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_batch_statements_number_their_parameters() {
        let sql = values_sql::<crate::PostgresStore>("INSERT INTO t (a, b) VALUES ", 2, 2, "");
        assert_eq!(sql, "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)");
    }
}
