//! The schema migrations, embedded in the binary and listed by hand.
//!
//! `sqlx::migrate!` would list them itself, but it needs sqlx's proc-macro
//! crate, and that crate builds a second copy of sqlx with both drivers (the
//! bundled SQLite C library included) for the compiler: about two minutes of
//! CPU on a first build for a list of seven files. The test below reads the
//! directories the way sqlx does and checks this list against them, so a
//! file added without a line here (or a line without its file) fails.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

/// One migration: version, description, SQL.
type File = (i64, &'static str, &'static str);

/// `migrations/sqlite`, oldest first.
const SQLITE: &[File] = &[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "federation attributes",
        include_str!("../migrations/sqlite/0002_federation_attributes.sql"),
    ),
    (
        3,
        "authority owner",
        include_str!("../migrations/sqlite/0003_authority_owner.sql"),
    ),
    (
        4,
        "agent serial used",
        include_str!("../migrations/sqlite/0004_agent_serial_used.sql"),
    ),
];

/// `migrations/postgres`, oldest first.
#[cfg(feature = "postgres")]
const POSTGRES: &[File] = &[
    (
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "authority owner",
        include_str!("../migrations/postgres/0002_authority_owner.sql"),
    ),
    (
        3,
        "agent serial used",
        include_str!("../migrations/postgres/0003_agent_serial_used.sql"),
    ),
];

/// The migrator for the SQLite schema.
pub(crate) fn sqlite() -> Migrator {
    migrator(SQLITE)
}

/// The migrator for the PostgreSQL schema.
#[cfg(feature = "postgres")]
pub(crate) fn postgres() -> Migrator {
    migrator(POSTGRES)
}

/// A migrator over `files`, each as sqlx would read it from its directory:
/// a simple (not reversible) migration, in a transaction unless the file
/// starts with sqlx's `-- no-transaction` marker, checksummed by sqlx.
fn migrator(files: &[File]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    AssertSqlSafe(sql).into_sql_str(),
                    sql.starts_with("-- no-transaction"),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// What sqlx's own directory reader makes of `dir`, beside this list.
    fn same_as_directory(list: &Migrator, dir: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let read: Vec<Migration> = sqlx::migrate::resolve_blocking(&path)
            .unwrap()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        let key = |m: &Migration| {
            (
                m.version,
                m.description.to_string(),
                m.migration_type,
                m.checksum.to_vec(),
                m.no_tx,
                m.sql.as_str().to_owned(),
            )
        };
        let listed: Vec<_> = list.iter().map(key).collect();
        let on_disk: Vec<_> = read.iter().map(key).collect();
        assert_eq!(
            listed.len(),
            on_disk.len(),
            "{dir}: every file is listed in migrations.rs, and nothing else"
        );
        for (l, d) in listed.iter().zip(&on_disk) {
            assert_eq!(l, d, "{dir}: version {} differs from its file", d.0);
        }
    }

    #[test]
    fn the_sqlite_list_is_the_directory() {
        same_as_directory(&sqlite(), "migrations/sqlite");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn the_postgres_list_is_the_directory() {
        same_as_directory(&postgres(), "migrations/postgres");
    }
}
