//! The SQLite [`Store`]: one file in WAL mode, one writer connection, a few
//! readers.

use std::path::Path;
use std::time::Duration;

use sigil_types::{
    AgentRecord, BundleEndpointProfile, Entry, EntryId, FederationRelationship, SpiffeId,
    TrustDomain,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use crate::codec::{self, DecodeError};
use crate::rows::{duplicate_error, unique_violation, unix_now};
use crate::{AuthorityRecord, Change, ChangeKind, EntrySnapshot, JoinToken, Store, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a connection waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Readers never block the writer in WAL mode; a few cover the server's
/// concurrent reads without holding many file handles.
const MAX_READERS: u32 = 4;

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

/// A [`Store`] in a SQLite database.
///
/// Writes go through a pool of exactly one connection, so write transactions
/// queue in the process instead of racing for SQLite's write lock, and
/// revisions commit in the order they are allocated. Reads use a separate pool
/// whose connections are `query_only`.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs migrations. WAL
    /// mode, synchronous=FULL (an acknowledged write survives a crash),
    /// foreign_keys on, busy_timeout 5s; one writer connection and up to 4 readers.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        make_private(path)?;
        let base = SqliteConnectOptions::new()
            .filename(path)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .synchronous(SqliteSynchronous::Full);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await?;
        MIGRATOR.run(&writer).await?;
        // Opened after the migrations so readers never see a half-made schema;
        // journal_mode is persistent in the file, so readers need not set it.
        let reader = SqlitePoolOptions::new()
            .max_connections(MAX_READERS)
            .connect_with(base.pragma("query_only", "ON"))
            .await?;
        tracing::debug!(path = %path.display(), "opened SQLite store");
        Ok(Self { writer, reader })
    }

    /// A private in-memory database (for tests); shared-cache or a single
    /// connection so all queries see the same data.
    ///
    /// This uses one connection for reads and writes. It is never closed for
    /// idleness or age, because the database disappears with it.
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self {
            writer: pool.clone(),
            reader: pool,
        })
    }

    /// Closes both pools, waiting for connections in use to be returned; later
    /// calls fail. Closing the last connection checkpoints the WAL into the file.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    /// Starts a write transaction holding SQLite's write lock from the start,
    /// so it cannot fail halfway on an upgrade from a read lock.
    /// Runs `query`, an `UPDATE agents .. RETURNING` of agent `id`, as one
    /// write recorded in the feed; `None`, with nothing written and no
    /// revision spent, when it matched no row.
    async fn update_agent(
        &self,
        id: &SpiffeId,
        query: sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
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

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Makes the database file (created empty if missing, which SQLite takes as
/// a new database) and any WAL and shared-memory files readable by the owner
/// only; SQLite creates the WAL and shared-memory files later with the mode
/// of the database file.
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| {
        StoreError::Backend(sqlx::Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        )))
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let mut names = vec![path.to_owned()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        names.push(name.into());
    }
    for name in names {
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
    }
    Ok(())
}

/// Allocates the next revision inside the caller's transaction; it is rolled
/// back with the transaction, so a failed write leaves no gap.
async fn next_revision(conn: &mut SqliteConnection) -> Result<u64, StoreError> {
    let revision: i64 = sqlx::query_scalar(
        "UPDATE meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
    )
    .fetch_one(conn)
    .await?;
    codec::to_u64(revision).map_err(|e| StoreError::Corrupt(format!("meta revision: {e}")))
}

async fn record_change(
    conn: &mut SqliteConnection,
    revision: u64,
    kind: &str,
    subject: &str,
    payload: Option<String>,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO changes (revision, kind, subject, payload) VALUES (?, ?, ?, ?)")
        .bind(codec::to_i64("revision", revision)?)
        .bind(kind)
        .bind(subject)
        .bind(payload)
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

async fn fetch_entry(conn: &mut SqliteConnection, id: &str) -> Result<Option<Entry>, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        entry_cols!(),
        " FROM entries WHERE id = ?"
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
    conn: &mut SqliteConnection,
    entry: &Entry,
    selectors: &str,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM entries WHERE parent_id = ? AND spiffe_id = ? AND selectors = ? \
         AND id <> ? LIMIT 1",
    )
    .bind(entry.parent_id.as_str())
    .bind(entry.spiffe_id.as_str())
    .bind(selectors)
    .bind(entry.id.as_str())
    .fetch_optional(conn)
    .await?)
}

crate::rows::row_decoders!(SqliteRow);

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_entry(&self, mut entry: Entry) -> Result<Entry, StoreError> {
        let mut tx = self.begin_write().await?;
        entry.revision = next_revision(&mut tx).await?;
        let cols = EntryColumns::new(&entry)?;
        let taken: Option<i64> = sqlx::query_scalar("SELECT 1 FROM entries WHERE id = ?")
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
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
            "UPDATE entries SET spiffe_id = ?, parent_id = ?, selectors = ?, x509_svid_ttl = ?, \
             jwt_svid_ttl = ?, dns_names = ?, federates_with = ?, admin = ?, downstream = ?, \
             hint = ?, expires_at = ?, revision = ?, attributes = ? WHERE id = ?",
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
        sqlx::query("DELETE FROM entries WHERE id = ?")
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
        let mut conn = self.reader.acquire().await?;
        fetch_entry(&mut conn, id.as_str()).await
    }

    async fn list_entries(&self) -> Result<EntrySnapshot, StoreError> {
        // One read transaction is one WAL snapshot: the counter and the rows
        // come from the same committed state.
        let mut tx = self.reader.begin().await?;
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
            "SELECT revision, kind, subject, payload FROM changes WHERE revision > ? \
             ORDER BY revision LIMIT ?",
        )
        .bind(codec::clamp_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM meta WHERE id = 1")
            .fetch_one(&self.reader)
            .await?;
        codec::to_u64(revision).map_err(|e| StoreError::Corrupt(format!("meta revision: {e}")))
    }

    async fn prune_changes(&self, up_to: u64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM changes WHERE revision <= ?")
            .bind(codec::clamp_i64(up_to))
            .execute(&self.writer)
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
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (spiffe_id) DO UPDATE SET \
             attestation_type = excluded.attestation_type, selectors = excluded.selectors, \
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
            " FROM agents WHERE spiffe_id = ?"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.reader)
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
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(agent_from_row)
        .collect()
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<AgentRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let revision = next_revision(&mut tx).await?;
        let row = sqlx::query(concat!(
            "DELETE FROM agents WHERE spiffe_id = ? RETURNING ",
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
        let query = sqlx::query(concat!(
            "UPDATE agents SET previous_serial = ?, serial = ?, serial_used = 0, expires_at = ?, \
             updated_at = ? WHERE spiffe_id = ? AND NOT banned AND ? <> '' AND (serial = ? \
             OR (previous_serial = ? AND NOT serial_used)) RETURNING ",
            agent_cols!()
        ))
        .bind(presented_serial)
        .bind(serial)
        .bind(expires_at)
        .bind(updated_at)
        .bind(id.as_str())
        .bind(presented_serial)
        .bind(presented_serial)
        .bind(presented_serial);
        self.update_agent(id, query).await
    }

    async fn mark_agent_serial_used(
        &self,
        id: &SpiffeId,
        serial: &str,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let query = sqlx::query(concat!(
            "UPDATE agents SET serial_used = 1 \
             WHERE spiffe_id = ? AND serial = ? AND NOT serial_used RETURNING ",
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
            "UPDATE agents SET banned = ? WHERE spiffe_id = ? RETURNING ",
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
            "INSERT INTO join_tokens (token_hash, expires_at, created_at) VALUES (?, ?, ?)",
        )
        .bind(&token.token_hash)
        .bind(token.expires_at)
        .bind(token.created_at)
        .execute(&self.writer)
        .await
        .map_err(|e| unique_violation(e, || "join token already exists".to_owned()))?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<JoinToken, StoreError> {
        // One DELETE .. RETURNING: two servers (or two requests) presenting the
        // same token cannot both get it.
        let row = sqlx::query(
            "DELETE FROM join_tokens WHERE token_hash = ? \
             RETURNING token_hash, expires_at, created_at",
        )
        .bind(token_hash)
        .fetch_optional(&self.writer)
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
        let done = sqlx::query("DELETE FROM join_tokens WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.writer)
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
            "INSERT INTO bundles (trust_domain, bundle_json, updated_at) VALUES (?, ?, ?) \
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
            sqlx::query_scalar("SELECT bundle_json FROM bundles WHERE trust_domain = ?")
                .bind(trust_domain.name())
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    async fn list_bundles(&self) -> Result<Vec<(TrustDomain, String)>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT trust_domain, bundle_json FROM bundles ORDER BY trust_domain")
                .fetch_all(&self.reader)
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
        let done = sqlx::query("DELETE FROM bundles WHERE trust_domain = ?")
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
             endpoint_spiffe_id, from_config, updated_at) VALUES (?, ?, ?, ?, ?, ?) \
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
            " FROM federation_relationships WHERE trust_domain = ?"
        ))
        .bind(trust_domain.name())
        .fetch_optional(&self.reader)
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
        .fetch_all(&self.reader)
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
            "DELETE FROM federation_relationships WHERE trust_domain = ? RETURNING ",
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
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET \
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
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            authority_cols!(),
            " FROM authorities ORDER BY created_at, id"
        ))
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(authority_from_row)
        .collect()
    }

    async fn delete_authority(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM authorities WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pragma(pool: &SqlitePool, name: &'static str) -> String {
        let sql = match name {
            "journal_mode" => "PRAGMA journal_mode",
            "synchronous" => "PRAGMA synchronous",
            "foreign_keys" => "PRAGMA foreign_keys",
            "busy_timeout" => "PRAGMA busy_timeout",
            "query_only" => "PRAGMA query_only",
            _ => unreachable!(),
        };
        let row = sqlx::query(sql).fetch_one(pool).await.unwrap();
        match row.try_get::<String, _>(0) {
            Ok(s) => s,
            Err(_) => row.try_get::<i64, _>(0).unwrap().to_string(),
        }
    }

    #[tokio::test]
    async fn file_store_pragmas() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).await.unwrap();
        assert_eq!(pragma(&store.writer, "journal_mode").await, "wal");
        // 2 is FULL.
        assert_eq!(pragma(&store.writer, "synchronous").await, "2");
        assert_eq!(pragma(&store.writer, "foreign_keys").await, "1");
        assert_eq!(pragma(&store.writer, "busy_timeout").await, "5000");
        assert_eq!(pragma(&store.writer, "query_only").await, "0");
        assert_eq!(pragma(&store.reader, "journal_mode").await, "wal");
        assert_eq!(pragma(&store.reader, "query_only").await, "1");
        assert_eq!(pragma(&store.reader, "busy_timeout").await, "5000");
        assert_eq!(store.writer.options().get_max_connections(), 1);
        assert_eq!(store.reader.options().get_max_connections(), MAX_READERS);
        store.close().await;
    }

    #[tokio::test]
    async fn corrupt_rows_name_the_row() {
        let store = SqliteStore::open_in_memory().await.unwrap();
        sqlx::query(
            "INSERT INTO entries VALUES ('bad', 'not-an-id', 'spiffe://td/p', '[]', 0, 0, '[]', \
             '[]', 0, 0, '', NULL, 1, 0, '[]')",
        )
        .execute(&store.writer)
        .await
        .unwrap();
        let id: EntryId = "bad".parse().unwrap();
        match store.get_entry(&id).await {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains("entry bad"), "{msg}"),
            other => panic!("want Corrupt, got {other:?}"),
        }
        sqlx::query("INSERT INTO changes VALUES (7, 'entry_upserted', 'x', '{')")
            .execute(&store.writer)
            .await
            .unwrap();
        match store.changes_since(0, 10).await {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains("change 7"), "{msg}"),
            other => panic!("want Corrupt, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn failed_write_allocates_no_revision() {
        let store = SqliteStore::open_in_memory().await.unwrap();
        let id: SpiffeId = "spiffe://td/sigil/agent/x".parse().unwrap();
        assert!(matches!(
            store.set_agent_banned(&id, true).await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.revision().await.unwrap(), 0);
    }
}
