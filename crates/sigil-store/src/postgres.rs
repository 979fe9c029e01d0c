//! The PostgreSQL [`Store`]: one database shared by any number of servers.
//!
//! Revisions are allocated by `UPDATE meta SET revision = revision + 1 ..
//! RETURNING revision` as the first statement of every write that the change
//! feed records. The updated row stays locked until the transaction commits
//! or rolls back, so concurrent writers, in this process or in other servers,
//! queue on that lock: the writer holding revision N commits before anyone can
//! be handed N + 1, and a rolled-back write hands its number to the next one.
//! Revisions therefore become visible in commit order without gaps, and a
//! follower reading [`Store::changes_since`] never skips one.
//!
//! Each such write also sends `NOTIFY sigil_changes, '<revision>'` inside its
//! transaction. PostgreSQL delivers the notification only if the transaction
//! commits, and only after it has; a listener should treat it as a wake-up to
//! read the feed, never as the change itself (notifications can be dropped
//! when a listener's connection is lost).

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil_types::{
    AgentRecord, BundleEndpointProfile, Entry, EntryId, FederationRelationship, SpiffeId,
    TrustDomain,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Postgres, Row, Transaction};
use tokio::sync::watch;

use crate::codec::{self, DecodeError};
use crate::rows::{duplicate_error, unique_violation, unix_now};
use crate::{AuthorityRecord, Change, ChangeKind, EntrySnapshot, JoinToken, Store, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The channel every feed-recording write notifies with its revision as the
/// payload, e.g. `LISTEN sigil_changes`.
pub const CHANGES_CHANNEL: &str = "sigil_changes";

/// Connections per store: writers queue on the revision row anyway, so a few
/// cover concurrent reads and writes without crowding the database, which
/// several servers share.
const MAX_CONNECTIONS: u32 = 8;

/// How long a call waits for a connection (a new one included) before it
/// fails with a backend error.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A [`Store`] in a PostgreSQL database, which several servers may share.
///
/// See the module docs for how revisions stay in commit order and for the
/// `sigil_changes` notifications.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The wake-up of [`Store::subscribe_changes`], made on first use.
    notifications: Arc<Mutex<Option<watch::Sender<u64>>>>,
}

impl PostgresStore {
    /// Connects to the database at `url` (for example
    /// `postgres://sigil@db.example:5432/sigil`) and runs the migrations.
    /// The database must exist; the schema is created in it on first use.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(PgConnectOptions::from_str(url)?).await
    }

    /// Like [`connect`](Self::connect), with options built in code.
    ///
    /// Migrations take a PostgreSQL advisory lock, so servers starting at the
    /// same time apply each one exactly once.
    ///
    /// The first connection is made directly, not through the pool, so an
    /// unreachable server or a refused login fails at once with PostgreSQL's
    /// own reason rather than with a pool timeout.
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self, StoreError> {
        let mut first = options.connect().await?;
        MIGRATOR.run(&mut first).await?;
        first.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            // While the database is away, calls fail after this instead of
            // queueing for the default 30 s.
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        tracing::debug!("opened PostgreSQL store");
        Ok(Self {
            pool,
            notifications: Arc::default(),
        })
    }

    /// Closes the pool, waiting for connections in use to be returned; later
    /// calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs `query`, an `UPDATE agents .. RETURNING` of agent `id`, as one
    /// write recorded in the feed; `None`, with nothing written and no
    /// revision spent, when it matched no row.
    async fn update_agent(
        &self,
        id: &SpiffeId,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        let Some(row) = query.fetch_optional(&mut *tx).await? else {
            return Ok(None);
        };
        let agent = agent_from_row(&row)?;
        record_change(&mut tx, revision, codec::AGENT_CHANGED, id.as_str(), None).await?;
        tx.commit().await?;
        Ok(Some(agent))
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

/// Keeps a `LISTEN sigil_changes` session open and bumps `tx` on every
/// notification, and after every (re)connection because notifications sent
/// while it was down are lost. Reconnects with a capped backoff while the
/// database is away; ends when every receiver is gone.
async fn listen_for_changes(pool: PgPool, tx: watch::Sender<u64>) {
    const MIN_DELAY: Duration = Duration::from_millis(200);
    const MAX_DELAY: Duration = Duration::from_secs(5);
    let mut delay = MIN_DELAY;
    loop {
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = tx.closed() => return,
            result = listen_session(&pool, &tx) => {
                let Err(e) = result;
                tracing::warn!(error = %e, retry_in = ?delay, "change notifications interrupted");
            }
        }
        if started.elapsed() > MAX_DELAY {
            delay = MIN_DELAY;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_DELAY);
        // The database may have come back with writes we were not told of.
        bump(&tx);
    }
}

/// One `LISTEN` session; returns only with the error that ended it.
async fn listen_session(
    pool: &PgPool,
    tx: &watch::Sender<u64>,
) -> Result<std::convert::Infallible, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANGES_CHANNEL).await?;
    tracing::debug!("listening for changes of other servers");
    bump(tx);
    loop {
        // `None`: the connection dropped and was re-established; what was
        // sent in between is lost, so read the feed anyway.
        listener.try_recv().await?;
        bump(tx);
    }
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n = n.wrapping_add(1));
}

/// Allocates the next revision inside the caller's transaction, locking the
/// counter row until it ends; it is rolled back with the transaction, so a
/// failed write leaves no gap.
async fn next_revision(conn: &mut PgConnection) -> Result<u64, StoreError> {
    let revision: i64 = sqlx::query_scalar(
        "UPDATE meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
    )
    .fetch_one(conn)
    .await?;
    codec::to_u64(revision).map_err(|e| StoreError::Corrupt(format!("meta revision: {e}")))
}

/// Writes the change row and queues the `sigil_changes` notification, which
/// PostgreSQL sends when (and only if) the transaction commits.
async fn record_change(
    conn: &mut PgConnection,
    revision: u64,
    kind: &str,
    subject: &str,
    payload: Option<String>,
) -> Result<(), StoreError> {
    let stored = codec::to_i64("revision", revision)?;
    sqlx::query("INSERT INTO changes (revision, kind, subject, payload) VALUES ($1, $2, $3, $4)")
        .bind(stored)
        .bind(kind)
        .bind(subject)
        .bind(payload)
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGES_CHANNEL)
        .bind(revision.to_string())
        .execute(conn)
        .await?;
    Ok(())
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
    revision: i64,
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
            revision: codec::to_i64("revision", entry.revision)?,
        })
    }
}

async fn fetch_entry(conn: &mut PgConnection, id: &str) -> Result<Option<Entry>, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        entry_cols!(),
        " FROM entries WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .as_ref()
    .map(entry_from_row)
    .transpose()
}

/// Finds another entry with the same (parent_id, spiffe_id, selectors), so the
/// error can name it; the unique index would only say that one exists.
async fn find_duplicate(
    conn: &mut PgConnection,
    entry: &Entry,
    selectors: &str,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM entries WHERE parent_id = $1 AND spiffe_id = $2 AND selectors = $3 \
         AND id <> $4 LIMIT 1",
    )
    .bind(entry.parent_id.as_str())
    .bind(entry.spiffe_id.as_str())
    .bind(selectors)
    .bind(entry.id.as_str())
    .fetch_optional(conn)
    .await?)
}

crate::rows::row_decoders!(PgRow);

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn subscribe_changes(&self) -> Option<watch::Receiver<u64>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut slot = self.notifications.lock().ok()?;
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return Some(tx.subscribe());
        }
        let (tx, rx) = watch::channel(0);
        runtime.spawn(listen_for_changes(self.pool.clone(), tx.clone()));
        *slot = Some(tx);
        Some(rx)
    }

    async fn create_entry(&self, mut entry: Entry) -> Result<Entry, StoreError> {
        let mut tx = self.begin_write().await?;
        entry.revision = next_revision(&mut tx).await?;
        let cols = EntryColumns::new(&entry)?;
        let taken: Option<i32> = sqlx::query_scalar("SELECT 1 FROM entries WHERE id = $1")
            .bind(entry.id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(StoreError::AlreadyExists(format!(
                "entry {} already exists",
                entry.id
            )));
        }
        if let Some(other) = find_duplicate(&mut tx, &entry, &cols.selectors).await? {
            return Err(duplicate_error(&entry, &other));
        }
        sqlx::query(concat!(
            "INSERT INTO entries (",
            entry_cols!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        ))
        .bind(entry.id.as_str())
        .bind(entry.spiffe_id.as_str())
        .bind(entry.parent_id.as_str())
        .bind(&cols.selectors)
        .bind(cols.x509_svid_ttl)
        .bind(cols.jwt_svid_ttl)
        .bind(&cols.dns_names)
        .bind(&cols.federates_with)
        .bind(entry.admin)
        .bind(entry.downstream)
        .bind(&entry.hint)
        .bind(entry.expires_at)
        .bind(cols.revision)
        .bind(entry.created_at)
        .bind(&cols.attributes)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            unique_violation(e, || format!("entry {} duplicates another entry", entry.id))
        })?;
        record_change(
            &mut tx,
            entry.revision,
            codec::ENTRY_UPSERTED,
            entry.id.as_str(),
            Some(codec::entry_json(&entry)?),
        )
        .await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn update_entry(&self, mut entry: Entry) -> Result<Entry, StoreError> {
        let mut tx = self.begin_write().await?;
        entry.revision = next_revision(&mut tx).await?;
        let cols = EntryColumns::new(&entry)?;
        let Some(stored) = fetch_entry(&mut tx, entry.id.as_str()).await? else {
            return Err(StoreError::NotFound(format!("entry {}", entry.id)));
        };
        entry.created_at = stored.created_at;
        if let Some(other) = find_duplicate(&mut tx, &entry, &cols.selectors).await? {
            return Err(duplicate_error(&entry, &other));
        }
        sqlx::query(
            "UPDATE entries SET spiffe_id = $1, parent_id = $2, selectors = $3, \
             x509_svid_ttl = $4, jwt_svid_ttl = $5, dns_names = $6, federates_with = $7, \
             admin = $8, downstream = $9, hint = $10, expires_at = $11, revision = $12, \
             attributes = $13 WHERE id = $14",
        )
        .bind(entry.spiffe_id.as_str())
        .bind(entry.parent_id.as_str())
        .bind(&cols.selectors)
        .bind(cols.x509_svid_ttl)
        .bind(cols.jwt_svid_ttl)
        .bind(&cols.dns_names)
        .bind(&cols.federates_with)
        .bind(entry.admin)
        .bind(entry.downstream)
        .bind(&entry.hint)
        .bind(entry.expires_at)
        .bind(cols.revision)
        .bind(&cols.attributes)
        .bind(entry.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            unique_violation(e, || format!("entry {} duplicates another entry", entry.id))
        })?;
        record_change(
            &mut tx,
            entry.revision,
            codec::ENTRY_UPSERTED,
            entry.id.as_str(),
            Some(codec::entry_json(&entry)?),
        )
        .await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<Entry, StoreError> {
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        let Some(entry) = fetch_entry(&mut tx, id.as_str()).await? else {
            return Err(StoreError::NotFound(format!("entry {id}")));
        };
        sqlx::query("DELETE FROM entries WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        record_change(
            &mut tx,
            revision,
            codec::ENTRY_DELETED,
            id.as_str(),
            Some(codec::entry_json(&entry)?),
        )
        .await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        fetch_entry(&mut conn, id.as_str()).await
    }

    async fn list_entries(&self) -> Result<EntrySnapshot, StoreError> {
        // Under READ COMMITTED each statement would see a newer state; one
        // REPEATABLE READ transaction reads the counter and the rows from the
        // same snapshot.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM meta WHERE id = 1")
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
        let revision = codec::to_u64(revision)
            .map_err(|e| StoreError::Corrupt(format!("meta revision: {e}")))?;
        Ok(EntrySnapshot { entries, revision })
    }

    async fn changes_since(&self, after: u64, limit: u32) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(
            "SELECT revision, kind, subject, payload FROM changes WHERE revision > $1 \
             ORDER BY revision LIMIT $2",
        )
        .bind(codec::clamp_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM meta WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        codec::to_u64(revision).map_err(|e| StoreError::Corrupt(format!("meta revision: {e}")))
    }

    async fn prune_changes(&self, up_to: u64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM changes WHERE revision <= $1")
            .bind(codec::clamp_i64(up_to))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn upsert_agent(&self, agent: AgentRecord) -> Result<(), StoreError> {
        let selectors = codec::selectors_json(&agent.selectors)?;
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        sqlx::query(concat!(
            "INSERT INTO agents (",
            agent_cols!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (spiffe_id) DO UPDATE \
             SET attestation_type = excluded.attestation_type, selectors = excluded.selectors, \
             serial = excluded.serial, previous_serial = excluded.previous_serial, \
             serial_used = excluded.serial_used, expires_at = excluded.expires_at, \
             banned = (agents.banned OR excluded.banned), can_reattest = excluded.can_reattest, \
             created_at = excluded.created_at, updated_at = excluded.updated_at"
        ))
        .bind(agent.spiffe_id.as_str())
        .bind(&agent.attestation_type)
        .bind(&selectors)
        .bind(&agent.serial)
        .bind(&agent.previous_serial)
        .bind(agent.expires_at)
        .bind(agent.banned)
        .bind(agent.can_reattest)
        .bind(agent.created_at)
        .bind(agent.updated_at)
        .bind(agent.serial_used)
        .execute(&mut *tx)
        .await?;
        record_change(
            &mut tx,
            revision,
            codec::AGENT_CHANGED,
            agent.spiffe_id.as_str(),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            agent_cols!(),
            " FROM agents WHERE spiffe_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
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
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(agent_from_row)
        .collect()
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<AgentRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        let row = sqlx::query(concat!(
            "DELETE FROM agents WHERE spiffe_id = $1 RETURNING ",
            agent_cols!()
        ))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("agent {id}")));
        };
        let agent = agent_from_row(&row)?;
        record_change(&mut tx, revision, codec::AGENT_DELETED, id.as_str(), None).await?;
        tx.commit().await?;
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
        // Under READ COMMITTED, PostgreSQL checks the WHERE clause again on
        // the row as another server's concurrent write left it.
        let query = sqlx::query(concat!(
            "UPDATE agents SET previous_serial = $1, serial = $2, serial_used = false, \
             expires_at = $3, updated_at = $4 WHERE spiffe_id = $5 AND NOT banned AND $1 <> '' \
             AND (serial = $1 OR (previous_serial = $1 AND NOT serial_used)) RETURNING ",
            agent_cols!()
        ))
        .bind(presented_serial)
        .bind(serial)
        .bind(expires_at)
        .bind(updated_at)
        .bind(id.as_str());
        self.update_agent(id, query).await
    }

    async fn mark_agent_serial_used(
        &self,
        id: &SpiffeId,
        serial: &str,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let query = sqlx::query(concat!(
            "UPDATE agents SET serial_used = true \
             WHERE spiffe_id = $1 AND serial = $2 AND NOT serial_used RETURNING ",
            agent_cols!()
        ))
        .bind(id.as_str())
        .bind(serial);
        self.update_agent(id, query).await
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
        self.update_agent(id, query)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, expires_at, created_at) VALUES ($1, $2, $3)",
        )
        .bind(&token.token_hash)
        .bind(token.expires_at)
        .bind(token.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| unique_violation(e, || "join token already exists".to_owned()))?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<JoinToken, StoreError> {
        // One DELETE .. RETURNING: the row lock lets exactly one of two
        // servers (or requests) presenting the same token get it.
        let row = sqlx::query(
            "DELETE FROM join_tokens WHERE token_hash = $1 \
             RETURNING token_hash, expires_at, created_at",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound("join token".to_owned()));
        };
        let token = JoinToken {
            token_hash: row.try_get("token_hash")?,
            expires_at: row.try_get("expires_at")?,
            created_at: row.try_get("created_at")?,
        };
        if token.expires_at <= now {
            return Err(StoreError::TokenExpired);
        }
        Ok(token)
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM join_tokens WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn put_bundle(
        &self,
        trust_domain: &TrustDomain,
        bundle_json: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        sqlx::query(
            "INSERT INTO bundles (trust_domain, bundle_json, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (trust_domain) DO UPDATE SET bundle_json = excluded.bundle_json, \
             updated_at = excluded.updated_at",
        )
        .bind(trust_domain.name())
        .bind(bundle_json)
        .bind(unix_now())
        .execute(&mut *tx)
        .await?;
        record_change(
            &mut tx,
            revision,
            codec::BUNDLE_CHANGED,
            trust_domain.name(),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT bundle_json FROM bundles WHERE trust_domain = $1")
                .bind(trust_domain.name())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn list_bundles(&self) -> Result<Vec<(TrustDomain, String)>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT trust_domain, bundle_json FROM bundles ORDER BY trust_domain")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(td, json)| match TrustDomain::new(&td) {
                Ok(td) => Ok((td, json)),
                Err(e) => Err(StoreError::Corrupt(format!("bundle {td}: {e}"))),
            })
            .collect()
    }

    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        let done = sqlx::query("DELETE FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain.name())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("bundle for {trust_domain}")));
        }
        record_change(
            &mut tx,
            revision,
            codec::BUNDLE_DELETED,
            trust_domain.name(),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        let endpoint_id = relationship
            .profile
            .endpoint_spiffe_id()
            .map(|id| id.as_str().to_owned())
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
        .bind(&relationship.bundle_endpoint_url)
        .bind(relationship.profile.name())
        .bind(endpoint_id)
        .bind(relationship.from_config)
        .bind(unix_now())
        .execute(&mut *tx)
        .await?;
        record_change(
            &mut tx,
            revision,
            codec::FEDERATION_CHANGED,
            relationship.trust_domain.name(),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(())
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
        .fetch_optional(&self.pool)
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
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(federation_from_row)
        .collect()
    }

    async fn delete_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederationRelationship, StoreError> {
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        let row = sqlx::query(concat!(
            "DELETE FROM federation_relationships WHERE trust_domain = $1 RETURNING ",
            federation_cols!()
        ))
        .bind(trust_domain.name())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!(
                "federation relationship with {trust_domain}"
            )));
        };
        let relationship = federation_from_row(&row)?;
        record_change(
            &mut tx,
            revision,
            codec::FEDERATION_DELETED,
            trust_domain.name(),
            None,
        )
        .await?;
        tx.commit().await?;
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
        .bind(&authority.id)
        .bind(authority.kind.as_str())
        .bind(authority.state.as_str())
        .bind(&authority.public)
        .bind(authority.not_before)
        .bind(authority.not_after)
        .bind(authority.created_at)
        .bind(&authority.owner)
        .bind(authority.tainted)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            authority_cols!(),
            " FROM authorities ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(authority_from_row)
        .collect()
    }

    async fn delete_authority(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM authorities WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
