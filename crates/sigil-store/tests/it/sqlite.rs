//! The conformance suite on SQLite, in memory and in a file, and what only the
//! file store promises: durability across reopen and WAL mode.

use std::path::Path;
use std::sync::Arc;

use sigil_store::{
    AuthorityKind, AuthorityRecord, AuthorityState, JoinToken, SqliteStore, Store, StoreError,
};
use sigil_types::{AgentRecord, Selectors, TrustDomain};
use sqlx::Row;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::conformance::{Guard, full_entry, simple_entry};

async fn memory() -> (Arc<dyn Store>, Guard) {
    let store = SqliteStore::open_in_memory().await.unwrap();
    (Arc::new(store), Box::new(()))
}

async fn file() -> (Arc<dyn Store>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("sigil.db"))
        .await
        .unwrap();
    (Arc::new(store), Box::new(dir))
}

mod in_memory {
    conformance_suite!(super::memory);
}

mod in_file {
    conformance_suite!(super::file);
}

async fn journal_mode(path: &Path) -> String {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .unwrap();
    let row = sqlx::query("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let mode: String = row.try_get(0).unwrap();
    conn.close().await.unwrap();
    mode
}

#[tokio::test]
async fn file_is_created_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    assert!(!path.exists());
    let store = SqliteStore::open(&path).await.unwrap();
    assert!(path.exists());
    store.create_entry(simple_entry("e")).await.unwrap();
    // WAL is a property of the file, so a fresh connection that does not ask
    // for it still reports it.
    assert_eq!(journal_mode(&path).await, "wal");
    store.close().await;
    assert_eq!(journal_mode(&path).await, "wal");
}

/// The database, its WAL and its shared memory hold every entry and agent:
/// owner only, for new files and for files an older version left 0644.
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigil.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.create_entry(simple_entry("e")).await.unwrap();
    let wal = dir.path().join("sigil.db-wal");
    let shm = dir.path().join("sigil.db-shm");
    for p in [&path, &wal, &shm] {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    // Loosened by someone else: tightened again at the next open.
    for p in [&path, &wal, &shm] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let again = SqliteStore::open(&path).await.unwrap();
    for p in [&path, &wal, &shm] {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    again.close().await;
    store.close().await;
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigil.db");
    let td = TrustDomain::new("partner.example").unwrap();
    let agent = AgentRecord {
        spiffe_id: "spiffe://example.org/sigil/agent/join_token/n1"
            .parse()
            .unwrap(),
        attestation_type: "join_token".into(),
        selectors: Selectors::parse_all(["join_token:n1"]).unwrap(),
        serial: "01".into(),
        previous_serial: String::new(),
        serial_used: false,
        expires_at: 100,
        banned: false,
        can_reattest: false,
        created_at: 1,
        updated_at: 2,
    };
    let authority = AuthorityRecord {
        id: "ca-1".into(),
        kind: AuthorityKind::X509,
        state: AuthorityState::Active,
        public: vec![1, 2, 3],
        not_before: 0,
        not_after: 10,
        created_at: 0,
        owner: "instance-a".into(),
        tainted: true,
    };
    let token = JoinToken {
        token_hash: "hash".into(),
        expires_at: 50,
        created_at: 1,
    };

    let (entry, revision) = {
        let store = SqliteStore::open(&path).await.unwrap();
        let entry = store.create_entry(full_entry("e1")).await.unwrap();
        store.upsert_agent(agent.clone()).await.unwrap();
        store.create_join_token(token.clone()).await.unwrap();
        store.put_bundle(&td, "{}").await.unwrap();
        store.put_authority(authority.clone()).await.unwrap();
        let revision = store.revision().await.unwrap();
        store.close().await;
        (entry, revision)
    };

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), revision);
    assert_eq!(
        store.get_entry(&entry.id).await.unwrap(),
        Some(entry.clone())
    );
    assert_eq!(store.list_entries().await.unwrap().revision, revision);
    assert_eq!(
        store.get_agent(&agent.spiffe_id).await.unwrap(),
        Some(agent)
    );
    assert_eq!(store.get_bundle(&td).await.unwrap().as_deref(), Some("{}"));
    assert_eq!(store.list_authorities().await.unwrap(), vec![authority]);
    assert_eq!(
        store.changes_since(0, 100).await.unwrap().len(),
        3,
        "entry, agent and bundle writes"
    );
    assert_eq!(store.consume_join_token("hash", 0).await.unwrap(), token);
    // Reopening ran the migrations again without harm, and the counter goes on.
    let next = store.create_entry(simple_entry("e2")).await.unwrap();
    assert_eq!(next.revision, revision + 1);
    store.close().await;
}

#[tokio::test]
async fn open_in_missing_directory_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteStore::open(&dir.path().join("no/such/dir/sigil.db"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
}

#[tokio::test]
async fn in_memory_stores_are_private() {
    let a = SqliteStore::open_in_memory().await.unwrap();
    let b = SqliteStore::open_in_memory().await.unwrap();
    a.create_entry(simple_entry("e")).await.unwrap();
    assert!(b.list_entries().await.unwrap().entries.is_empty());
}

/// A batch the database fails partway writes nothing: a trigger, added
/// through a connection of its own, fails the insert of one entry.
#[tokio::test]
async fn batch_failing_partway_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigil.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let mut conn = SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER fail_boom BEFORE INSERT ON entries WHEN NEW.id = 'boom' \
         BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    crate::conformance::batch_failure_writes_nothing(Arc::new(store), "boom").await;
}

/// The same for batches of updates and deletes: triggers fail the update
/// and the delete of one stored entry.
#[tokio::test]
async fn update_and_delete_batches_failing_partway_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigil.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.create_entry(simple_entry("stuck")).await.unwrap();
    let mut conn = SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    for trigger in [
        "CREATE TRIGGER fail_update BEFORE UPDATE ON entries WHEN OLD.id = 'stuck' \
         BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
        "CREATE TRIGGER fail_delete BEFORE DELETE ON entries WHEN OLD.id = 'stuck' \
         BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
    ] {
        sqlx::query(trigger).execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();
    crate::conformance::update_and_delete_batch_failures_write_nothing(Arc::new(store), "stuck")
        .await;
}
