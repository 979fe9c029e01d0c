//! The floor entry writes are compared with: plain SQLite inserts of the
//! same rows through sqlx, with the store's pragmas (WAL, synchronous=FULL,
//! one writer connection, `BEGIN IMMEDIATE`), into a table with the
//! entries table's columns and unique indexes, in a database file of its
//! own. No revision counter, no change feed, no index, no gRPC: what sigil
//! adds on top of the database is what a figure's ratio to it shows, and a
//! loaded or slow machine slows both.

use std::path::Path;
use std::time::{Duration, Instant};

use sigil_types::Entry;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The columns of sigil's entries table, in SQLite's types.
const SCHEMA: &str = "CREATE TABLE entries (id TEXT PRIMARY KEY NOT NULL, \
    spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL, selectors TEXT NOT NULL, \
    x509_svid_ttl BIGINT NOT NULL, jwt_svid_ttl BIGINT NOT NULL, dns_names TEXT NOT NULL, \
    federates_with TEXT NOT NULL, admin BOOLEAN NOT NULL, downstream BOOLEAN NOT NULL, \
    hint TEXT NOT NULL, expires_at BIGINT, revision BIGINT NOT NULL, \
    created_at BIGINT NOT NULL, attributes TEXT NOT NULL)";
const UNIQUE: &str = "CREATE UNIQUE INDEX entries_parent_spiffe_selectors ON entries (parent_id, spiffe_id, selectors)";
const BY_SPIFFE_ID: &str = "CREATE INDEX entries_spiffe_id ON entries (spiffe_id)";
const INSERT: &str = "INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_svid_ttl, \
    jwt_svid_ttl, dns_names, federates_with, admin, downstream, hint, expires_at, revision, \
    created_at, attributes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
    $14, $15)";

/// Inserts `rows` into a new database at `path`, `per_tx` rows to a
/// transaction, and returns the wall time the inserts took (opening the
/// database and creating the table excluded).
pub(crate) async fn plain_inserts(
    path: &Path,
    rows: &[Entry],
    per_tx: usize,
) -> anyhow::Result<Duration> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5))
        .synchronous(SqliteSynchronous::Full)
        .journal_mode(SqliteJournalMode::Wal);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    for ddl in [SCHEMA, UNIQUE, BY_SPIFFE_ID] {
        sqlx::query(ddl).execute(&pool).await?;
    }
    let t0 = Instant::now();
    for (n, chunk) in rows.chunks(per_tx.max(1)).enumerate() {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        for (i, e) in chunk.iter().enumerate() {
            sqlx::query(INSERT)
                .bind(e.id.as_str())
                .bind(e.spiffe_id.as_str())
                .bind(e.parent_id.as_str())
                .bind(serde_json::to_string(&e.selectors.to_strings())?)
                .bind(i64::try_from(e.x509_svid_ttl)?)
                .bind(i64::try_from(e.jwt_svid_ttl)?)
                .bind(serde_json::to_string(&e.dns_names)?)
                .bind(serde_json::to_string(&e.federates_with)?)
                .bind(e.admin)
                .bind(e.downstream)
                .bind(e.hint.as_str())
                .bind(e.expires_at)
                .bind(i64::try_from(n * per_tx + i)?)
                .bind(e.created_at)
                .bind(serde_json::to_string(&e.attributes)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    let took = t0.elapsed();
    pool.close().await;
    Ok(took)
}
