//! The PostgreSQL [`Store`](crate::Store): one database shared by any number
//! of servers. Only what differs from SQLite is here; the queries, and how
//! revisions stay in commit order, are in [`crate::sql`].
//!
//! Each write the feed records also sends `NOTIFY sigil_changes,
//! '<revision>'` inside its transaction. PostgreSQL delivers the notification
//! only if the transaction commits, and only after it has; a listener should
//! treat it as a wake-up to read the feed, never as the change itself
//! (notifications can be dropped when a listener's connection is lost).

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgQueryResult,
};
use sqlx::{ConnectOptions, Connection, Postgres, Transaction};
use tokio::sync::watch;

use crate::StoreError;
use crate::backend::Backend;

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

/// A [`Store`](crate::Store) in a PostgreSQL database, which several servers
/// may share.
///
/// See the module docs for the `sigil_changes` notifications.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The wake-up of [`Store::subscribe_changes`](crate::Store::subscribe_changes),
    /// made on first use.
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
        crate::migrations::postgres().run(&mut first).await?;
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

/// The revision counter's row lock is what keeps revisions in commit order
/// across servers, so a write transaction needs nothing beyond `BEGIN`.
impl Backend for PostgresStore {
    type Db = Postgres;

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    /// Under READ COMMITTED each statement would see a newer state; REPEATABLE
    /// READ reads every statement from the same snapshot.
    async fn begin_snapshot(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
    }

    /// Queues the `sigil_changes` notification, which PostgreSQL sends when
    /// (and only if) the transaction commits.
    async fn announce(conn: &mut PgConnection, revision: u64) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(revision.to_string())
            .execute(conn)
            .await?;
        Ok(())
    }

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn subscribe(&self) -> Option<watch::Receiver<u64>> {
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
}
