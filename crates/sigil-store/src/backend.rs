//! What differs between the databases the store runs on, behind [`Backend`];
//! everything else is written once in [`crate::sql`].

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod sqlite;

use std::future::Future;

use sqlx::{Database, Pool, Transaction};
use tokio::sync::watch;

/// A database the store runs on: its pools, how a write transaction takes
/// the write lock, how a consistent read is begun, and how other processes
/// learn of a commit.
///
/// Every type implementing it is a [`Store`](crate::Store): the queries and
/// the revision rule live in [`crate::sql`].
pub(crate) trait Backend: Send + Sync + 'static {
    /// The sqlx driver.
    type Db: Database;

    /// The pool writes run on.
    fn writer(&self) -> &Pool<Self::Db>;

    /// The pool plain reads run on.
    fn reader(&self) -> &Pool<Self::Db>;

    /// Begins a write transaction on [`writer`](Self::writer). Its first
    /// statement takes the revision counter's row, and the transaction must
    /// be serialized with every other writer from then until it ends (see
    /// [`crate::sql`]); this is where a backend does what that needs beyond
    /// the row update itself.
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send;

    /// Begins a read-only transaction in which every statement sees the same
    /// committed state.
    fn begin_snapshot(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send;

    /// Runs, in a write transaction just before its commit, what tells other
    /// processes sharing the database that `revision` is there to read.
    fn announce(
        conn: &mut <Self::Db as Database>::Connection,
        revision: u64,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// How many rows a statement changed.
    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;

    /// Appends the placeholder of the `n`th (1-based) parameter of a
    /// generated multi-row statement ([`crate::sql`]'s batch inserts, whose
    /// parameters are bound in order): `$n`, which both databases read.
    fn placeholder(sql: &mut String, n: usize) {
        sql.push('$');
        sql.push_str(&n.to_string());
    }

    /// [`Store::subscribe_changes`](crate::Store::subscribe_changes).
    fn subscribe(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}
