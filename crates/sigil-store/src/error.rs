//! The store's one error type.

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The entry, agent, join token or bundle named does not exist; the field
    /// names it, e.g. `entry e1`.
    #[error("{0} not found")]
    NotFound(String),
    /// A create would duplicate an existing entry: the same id, or the same
    /// parent ID, SPIFFE ID and selectors as another entry. The message names
    /// the existing entry's id.
    #[error("{0}")]
    AlreadyExists(String),
    /// The join token exists but its `expires_at` is not after the time given;
    /// it has been deleted all the same, so it can never be used.
    #[error("join token expired")]
    TokenExpired,
    /// A row read back does not parse into the sigil types (a bad SPIFFE ID,
    /// selector or JSON column); the message names the row.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A value cannot be written, such as a number beyond the database's
    /// signed 64-bit integers; nothing was changed.
    #[error("cannot store {0}")]
    Unstorable(String),
    /// The database failed: I/O, locking, a connection or a constraint the
    /// store did not check first.
    #[error("database error: {0}")]
    Backend(#[from] sqlx::Error),
    /// Applying the schema migrations failed at open.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}
