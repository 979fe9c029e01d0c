//! The SQLite [`Store`](crate::Store): one file in WAL mode, one writer
//! connection, a few readers. Only what differs from PostgreSQL is here; the
//! queries are in [`crate::sql`].

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteQueryResult, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::StoreError;
use crate::backend::Backend;

/// How long a connection waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Readers never block the writer in WAL mode; a few cover the server's
/// concurrent reads without holding many file handles.
const MAX_READERS: u32 = 4;

/// A [`Store`](crate::Store) in a SQLite database.
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
        crate::migrations::sqlite().run(&writer).await?;
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
        crate::migrations::sqlite().run(&pool).await?;
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

/// One writer connection is SQLite's way of keeping revisions in commit
/// order: write transactions queue for it in the process, and `BEGIN
/// IMMEDIATE` takes the database's write lock before the revision is
/// allocated, so a transaction cannot fail halfway on an upgrade from a read
/// lock.
impl Backend for SqliteStore {
    type Db = Sqlite;

    /// An anonymous `?`, bound by position. sqlx asks SQLite for the name
    /// of every parameter it binds, and SQLite finds a numbered (`$n`) or
    /// named parameter by a walk of the statement's list of names, so
    /// binding a statement of numbered parameters costs the square of their
    /// count: at 16 entry rows (240 parameters), a tenth of the server's CPU
    /// in a bulk load (docs/benchmarks.md). Anonymous parameters have no
    /// names to walk.
    fn placeholder(sql: &mut String, _n: usize) {
        sql.push('?');
    }

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }

    /// One read transaction is one WAL snapshot.
    async fn begin_snapshot(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.reader.begin().await
    }

    /// Nothing to announce: one process writes, and its own followers are
    /// woken locally.
    async fn announce(_: &mut SqliteConnection, _: u64) -> Result<(), sqlx::Error> {
        Ok(())
    }

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }
}

#[cfg(test)]
mod tests {
    use sigil_types::{EntryId, SpiffeId};
    use sqlx::Row;

    use super::*;
    use crate::Store;

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

    /// The shared SQL is written with `$N` placeholders: SQLite binds them by
    /// number, so one may appear twice and out of order.
    #[tokio::test]
    async fn numbered_placeholders_bind_by_number() {
        let store = SqliteStore::open_in_memory().await.unwrap();
        let row = sqlx::query("SELECT $2 || $1 || $2 AS s")
            .bind("a")
            .bind("b")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(row.try_get::<String, _>("s").unwrap(), "bab");
    }
}
