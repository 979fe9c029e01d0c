//! The conformance suite on PostgreSQL, and what only a shared database
//! promises: writers in several pools (servers) still get gap-free revisions
//! in commit order, commits notify listeners, data survives reconnecting.
//!
//! Each test gets its own database, created on the server at
//! `SIGIL_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and dropped when the test ends. When that server cannot be reached, the
//! test starts a private PostgreSQL server of its own from the installed
//! binaries (`sigil-pgtest`); when there are none either, the tests fail in
//! CI (`CI` set) and are skipped, with a message, elsewhere.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil_store::{
    AuthorityKind, AuthorityRecord, AuthorityState, CHANGES_CHANNEL, JoinToken, PostgresStore,
    Store, StoreError,
};
use sigil_types::{AgentRecord, EntryId, Selectors, TrustDomain};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use sigil_pgtest::PrivatePostgres;

use crate::conformance::{Guard, full_entry, simple_entry};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// How long reaching the server may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn admin_url() -> String {
    std::env::var("SIGIL_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

async fn admin_connection(options: &PgConnectOptions) -> Result<PgConnection, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// A database of its own for one test, dropped (with any connections still
/// open to it) when this is dropped, even if the test panicked.
struct TestDatabase {
    admin: PgConnectOptions,
    name: String,
    /// The private server the database lives on, when the shared one did
    /// not answer; stopped and deleted with this.
    private: Option<PrivatePostgres>,
}

impl TestDatabase {
    /// Creates the database on the shared server, or else on a private one;
    /// `None` (after printing why) if neither is possible outside CI; panics
    /// if neither is possible in CI.
    async fn create() -> Option<Self> {
        let url = admin_url();
        let admin = PgConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("SIGIL_TEST_POSTGRES_URL {url:?} is not a valid URL: {e}"));
        let (admin, mut conn, private) = match admin_connection(&admin).await {
            Ok(conn) => (admin, conn, None),
            Err(e) => match start_private(&url, &e) {
                Some(pg) => {
                    let admin = PgConnectOptions::from_str(&pg.url()).unwrap();
                    let conn = admin_connection(&admin).await.unwrap_or_else(|e| {
                        panic!("the private PostgreSQL server does not answer: {e}")
                    });
                    (admin, conn, Some(pg))
                }
                None => return None,
            },
        };
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "sigil_test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // The name is made of digits and underscores only, so it needs no quoting.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating database {name} at {url}: {e}"));
        conn.close().await.unwrap();
        Some(Self {
            admin,
            name,
            private,
        })
    }

    fn options(&self) -> PgConnectOptions {
        self.admin.clone().database(&self.name)
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::connect_with(self.options()).await.unwrap()
    }
}

/// A private server, after the shared one at `url` failed with `why`;
/// `None` (after printing why) without PostgreSQL binaries outside CI.
fn start_private(url: &str, why: &str) -> Option<PrivatePostgres> {
    eprintln!("PostgreSQL at {url} is not reachable ({why}); starting a private one");
    match PrivatePostgres::start_or_skip("the PostgreSQL store tests") {
        Ok(Some(pg)) => Some(pg),
        Ok(None) => None,
        Err(e) => panic!(
            "PostgreSQL at {url} is not reachable ({why}) and no private server could be \
             started ({e:#}); CI must run the PostgreSQL store tests: start one (.ci/run does) \
             or install the PostgreSQL server binaries"
        ),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.private.is_some() {
            // The whole server goes, with the database.
            return;
        }
        let admin = self.admin.clone();
        let name = std::mem::take(&mut self.name);
        // Drop runs inside the test's runtime, which cannot be blocked on, so
        // the cleanup gets a small runtime of its own on another thread.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut conn = admin_connection(&admin).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
                conn.close().await.map_err(|e| e.to_string())
            })
        });
        if let Ok(Err(e)) = cleanup.join() {
            eprintln!("could not drop a test database: {e}");
        }
    }
}

async fn fresh() -> Option<(Arc<dyn Store>, Guard)> {
    let db = TestDatabase::create().await?;
    let store = db.store().await;
    Some((Arc::new(store), Box::new(db)))
}

mod conformance {
    conformance_suite!(optional super::fresh);
}

/// Two stores on one database stand for two servers: their writers, racing,
/// get every revision exactly once, and a follower on a third store reading
/// the feed meanwhile never sees a revision skipped, because each revision
/// commits before the next one is handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_in_two_pools_commit_revisions_in_order() {
    const TASKS_PER_STORE: usize = 4;
    const EACH: usize = 10;
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let stores = [Arc::new(db.store().await), Arc::new(db.store().await)];
    let follower_store = db.store().await;
    let total = (2 * TASKS_PER_STORE * EACH) as u64;

    let follower = tokio::spawn(async move {
        let mut seen = 0;
        let mut kinds = 0;
        while seen < total {
            for change in follower_store.changes_since(seen, 5).await.unwrap() {
                assert_eq!(change.revision, seen + 1, "the feed skipped a revision");
                seen = change.revision;
                kinds += 1;
            }
            tokio::task::yield_now().await;
        }
        (seen, kinds)
    });

    let mut writers = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for t in 0..TASKS_PER_STORE {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..EACH {
                    let name = format!("s{s}-t{t}-{i}");
                    // Mix entry, agent and bundle writes: all share the counter.
                    match i % 3 {
                        0 => revs.push(
                            store
                                .create_entry(simple_entry(&name))
                                .await
                                .unwrap()
                                .revision,
                        ),
                        1 => {
                            store.upsert_agent(agent(&name)).await.unwrap();
                            revs.push(0);
                        }
                        _ => {
                            let td = TrustDomain::new(&format!("{name}.example")).unwrap();
                            store.put_bundle(&td, "{}").await.unwrap();
                            revs.push(0);
                        }
                    }
                }
                revs
            }));
        }
    }
    let mut entry_revisions = BTreeSet::new();
    for w in writers {
        for rev in w.await.unwrap().into_iter().filter(|&r| r != 0) {
            assert!(
                entry_revisions.insert(rev),
                "revision {rev} handed out twice"
            );
        }
    }
    assert_eq!(follower.await.unwrap(), (total, total));
    let feed = stores[0].changes_since(0, 1000).await.unwrap();
    let revisions: Vec<u64> = feed.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, (1..=total).collect::<Vec<_>>());
    assert_eq!(stores[1].revision().await.unwrap(), total);
    let snapshot = stores[1].list_entries().await.unwrap();
    assert_eq!(snapshot.revision, total);
    assert_eq!(
        snapshot
            .entries
            .iter()
            .map(|e| e.revision)
            .collect::<BTreeSet<_>>(),
        entry_revisions
    );
    for store in &stores {
        store.close().await;
    }
}

fn agent(name: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: format!("spiffe://example.org/sigil/agent/join_token/{name}")
            .parse()
            .unwrap(),
        attestation_type: "join_token".into(),
        selectors: Selectors::parse_all([format!("join_token:{name}")]).unwrap(),
        serial: "01".into(),
        previous_serial: String::new(),
        serial_used: false,
        expires_at: 100,
        banned: false,
        can_reattest: false,
        created_at: 1,
        updated_at: 2,
    }
}

#[tokio::test]
async fn data_survives_reconnect() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let td = TrustDomain::new("partner.example").unwrap();
    let agent = agent("n1");
    let authority = AuthorityRecord {
        id: "ca-1".into(),
        kind: AuthorityKind::X509,
        state: AuthorityState::Active,
        public: vec![0, 1, 2, 0xff],
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
        let store = db.store().await;
        let entry = store.create_entry(full_entry("e1")).await.unwrap();
        store.upsert_agent(agent.clone()).await.unwrap();
        store.create_join_token(token.clone()).await.unwrap();
        store.put_bundle(&td, "{}").await.unwrap();
        store.put_authority(authority.clone()).await.unwrap();
        let revision = store.revision().await.unwrap();
        store.close().await;
        (entry, revision)
    };

    let store = db.store().await;
    assert_eq!(store.revision().await.unwrap(), revision);
    assert_eq!(store.get_entry(&entry.id).await.unwrap(), Some(entry));
    assert_eq!(store.list_entries().await.unwrap().revision, revision);
    assert_eq!(
        store.get_agent(&agent.spiffe_id).await.unwrap(),
        Some(agent)
    );
    assert_eq!(store.get_bundle(&td).await.unwrap().as_deref(), Some("{}"));
    assert_eq!(store.list_authorities().await.unwrap(), vec![authority]);
    assert_eq!(store.changes_since(0, 100).await.unwrap().len(), 3);
    assert_eq!(store.consume_join_token("hash", 0).await.unwrap(), token);
    // Connecting ran the migrations again without harm, and the counter goes on.
    let next = store.create_entry(simple_entry("e2")).await.unwrap();
    assert_eq!(next.revision, revision + 1);
    store.close().await;
}

/// Servers starting together on an empty database all come up: the
/// migrations are applied once, under PostgreSQL's advisory lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_migrate_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (a, b, c) = tokio::join!(
        PostgresStore::connect_with(db.options()),
        PostgresStore::connect_with(db.options()),
        PostgresStore::connect_with(db.options()),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    a.create_entry(simple_entry("e")).await.unwrap();
    assert_eq!(b.list_entries().await.unwrap().entries.len(), 1);
    assert_eq!(c.revision().await.unwrap(), 1);
}

/// Each committed write notifies `sigil_changes` with its revision; a refused
/// write notifies nothing.
#[tokio::test]
async fn commits_notify_listeners() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store().await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.options())
        .await
        .unwrap();
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(CHANGES_CHANNEL).await.unwrap();

    let created = store.create_entry(simple_entry("a")).await.unwrap();
    assert!(matches!(
        store
            .delete_entry(&"ghost".parse::<EntryId>().unwrap())
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.create_entry(simple_entry("a")).await,
        Err(StoreError::AlreadyExists(_))
    ));
    store.upsert_agent(agent("n1")).await.unwrap();
    let td = TrustDomain::new("b.example").unwrap();
    store.put_bundle(&td, "{}").await.unwrap();

    let mut payloads = Vec::new();
    for _ in 0..3 {
        let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a notification within 10s")
            .unwrap();
        assert_eq!(note.channel(), CHANGES_CHANNEL);
        payloads.push(note.payload().to_owned());
    }
    assert_eq!(created.revision, 1);
    assert_eq!(payloads, ["1", "2", "3"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "no notification beyond the three commits"
    );
}

/// `subscribe_changes` is the follower's wake-up: a write committed through
/// another pool (another server) changes it, and so does losing the listening
/// connection, after which it listens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_wake_on_other_servers_writes_and_survive_a_lost_connection() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let follower = db.store().await;
    let writer = db.store().await;
    let mut wake = follower
        .subscribe_changes()
        .expect("PostgreSQL offers change notifications");
    // The first value marks the LISTEN being in place.
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .expect("listening within 10s")
        .unwrap();
    wake.borrow_and_update();

    writer.create_entry(simple_entry("a")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .expect("woken by the other pool's commit within 10s")
        .unwrap();
    wake.borrow_and_update();
    assert_eq!(follower.changes_since(0, 10).await.unwrap().len(), 1);

    // Kill the listening backend: the subscription fires (writes may have
    // been missed) and listens again, so later commits still wake it.
    let mut admin = db.options().connect().await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, [true], "one listening backend");
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .expect("woken by the lost connection within 10s")
        .unwrap();
    // Let the reconnection settle (it may fire once more), then a commit
    // must wake it again.
    while tokio::time::timeout(Duration::from_secs(1), wake.changed())
        .await
        .is_ok()
    {}
    wake.borrow_and_update();
    writer.create_entry(simple_entry("b")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .expect("a commit after the reconnection wakes it within 10s")
        .unwrap();
    admin.close().await.unwrap();
}

/// A row that does not parse is reported as Corrupt, naming the row.
#[tokio::test]
async fn corrupt_rows_name_the_row() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store().await;
    let mut conn = db.options().connect().await.unwrap();
    sqlx::query(
        "INSERT INTO entries VALUES ('bad', 'not-an-id', 'spiffe://td/p', '[]', 0, 0, '[]', \
         '[]', false, false, '', NULL, 1, 0, '[]')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    match store.get_entry(&"bad".parse().unwrap()).await {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("entry bad"), "{msg}"),
        other => panic!("want Corrupt, got {other:?}"),
    }
    sqlx::query("INSERT INTO changes VALUES (7, 'entry_upserted', 'x', '{')")
        .execute(&mut conn)
        .await
        .unwrap();
    match store.changes_since(0, 10).await {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("change 7"), "{msg}"),
        other => panic!("want Corrupt, got {other:?}"),
    }
    sqlx::query("INSERT INTO authorities VALUES ('k1', 'x509', 'lost', '\\x00', 0, 0, 0)")
        .execute(&mut conn)
        .await
        .unwrap_err();
    conn.close().await.unwrap();
}

/// An entry with many long selectors is stored (the unique index hashes the
/// selector text, which a plain btree index could not hold), and a second
/// entry with the same ones is still refused.
#[tokio::test]
async fn long_selectors_fit_the_unique_index() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store().await;
    let selectors =
        Selectors::parse_all((0..64).map(|i| format!("k8s:pod-label:key{i}:{}", "v".repeat(200))))
            .unwrap();
    let mut entry = simple_entry("long");
    entry.selectors = selectors.clone();
    let created = store.create_entry(entry).await.unwrap();
    assert_eq!(
        store
            .get_entry(&created.id)
            .await
            .unwrap()
            .unwrap()
            .selectors,
        selectors
    );
    let mut twin = simple_entry("twin");
    twin.spiffe_id = created.spiffe_id.clone();
    twin.selectors = selectors;
    match store.create_entry(twin).await {
        Err(StoreError::AlreadyExists(msg)) => assert!(msg.contains("long"), "{msg}"),
        other => panic!("want AlreadyExists, got {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_server_is_a_backend_error() {
    let started = std::time::Instant::now();
    let err = PostgresStore::connect("postgres://postgres@127.0.0.1:1/sigil")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("refused"),
        "the error gives the reason: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refused connection fails at once, not after a pool timeout"
    );
    let err = PostgresStore::connect("not a url").await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
}

/// A batch the database fails partway writes nothing: a trigger fails the
/// insert of one entry, after others of the batch were inserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_failing_partway_writes_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store().await;
    let mut conn = db.options().connect().await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION fail_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.id = 'boom' THEN RAISE EXCEPTION 'injected fault'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER fail_boom BEFORE INSERT ON entries FOR EACH ROW \
         EXECUTE FUNCTION fail_boom();",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    crate::conformance::batch_failure_writes_nothing(Arc::new(store), "boom").await;
}

/// The same for batches of updates and deletes: a trigger fails the update
/// and the delete of one stored entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_delete_batches_failing_partway_write_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store().await;
    store.create_entry(simple_entry("stuck")).await.unwrap();
    let mut conn = db.options().connect().await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION fail_stuck() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF OLD.id = 'stuck' THEN RAISE EXCEPTION 'injected fault'; END IF; \
         IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER fail_stuck BEFORE UPDATE OR DELETE ON entries FOR EACH ROW \
         EXECUTE FUNCTION fail_stuck();",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    crate::conformance::update_and_delete_batch_failures_write_nothing(Arc::new(store), "stuck")
        .await;
}
