//! `ServerState::create_entries`, `update_entries` and `delete_entries`,
//! the bulk paths of BatchCreateEntry, BatchUpdateEntry and
//! BatchDeleteEntry: one store transaction for the batch, with the outcome,
//! entry by entry, of writing the entries one after the other.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use sigil_server::error::{EntryRefusal, ServerError};
use sigil_server::{ServerConfig, ServerHandle};
use sigil_types::{Entry, EntryId, Selectors, TrustDomain};

async fn server(dir: &tempfile::TempDir) -> ServerHandle {
    sigil_svid::install_crypto_provider();
    let td = TrustDomain::new("example.org").unwrap();
    let mut config = ServerConfig::with_defaults(td, dir.path().join("server"));
    config.bind_address = "127.0.0.1:0".parse().unwrap();
    config.admin_socket = dir.path().join("admin.sock");
    sigil_server::start(config).await.expect("server starts")
}

fn entry(id: &str, path: &str, selector: &str) -> Entry {
    Entry::new(
        id.parse().unwrap(),
        format!("spiffe://example.org{path}").parse().unwrap(),
        "spiffe://example.org/sigil/agent/join_token/abc"
            .parse()
            .unwrap(),
        Selectors::parse_all([selector]).unwrap(),
    )
}

/// Every rule a batch entry can break, including duplicates inside the
/// batch (of an entry created earlier in it, and of one refused earlier in
/// it, which is no duplicate at all).
fn requests() -> Vec<Result<Entry, ServerError>> {
    vec![
        Ok(entry("a", "/a", "unix:uid:1")),
        // Duplicates a, created just before it in the batch.
        Ok(entry("a-twin", "/a", "unix:uid:1")),
        // Takes a's id.
        Ok(entry("a", "/a-other", "unix:uid:2")),
        // Reserved for sigil's own identities.
        Ok(entry("reserved", "/sigil/agent/x", "unix:uid:3")),
        // Duplicates the entry stored before the batch.
        Ok(entry("stored-twin", "/stored", "unix:uid:0")),
        // Refused before the batch by whoever read the request.
        Err(EntryRefusal::MissingId.into()),
        // The triple of the refused "a" above: no entry has it, so created.
        Ok(entry("c", "/a-other", "unix:uid:2")),
        Ok(entry("b", "/b", "unix:uid:4")),
        // Duplicates c.
        Ok(entry("c-twin", "/a-other", "unix:uid:2")),
    ]
}

/// What the caller sees of each result: the entry's id, or the message.
fn outcome(results: &[Result<Entry, ServerError>]) -> Vec<Result<String, String>> {
    results
        .iter()
        .map(|r| match r {
            Ok(e) => Ok(e.id.to_string()),
            Err(e) => Err(e.to_string()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_has_the_outcome_of_creating_its_entries_one_after_the_other() {
    let (one_dir, batch_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (one, batch) = (server(&one_dir).await, server(&batch_dir).await);
    for s in [&one, &batch] {
        s.state()
            .create_entry(entry("stored", "/stored", "unix:uid:0"))
            .await
            .unwrap();
    }

    let mut singly = Vec::new();
    for r in requests() {
        singly.push(match r {
            Ok(e) => one.state().create_entry(e).await,
            Err(e) => Err(e),
        });
    }
    let before = batch.state().store().revision().await.unwrap();
    let batched = batch.state().create_entries(requests()).await.unwrap();

    assert_eq!(outcome(&batched), outcome(&singly));
    let created: Vec<&Entry> = batched.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        created.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["a", "c", "b"]
    );
    assert!(
        matches!(
            &batched[1],
            Err(ServerError::Entry(EntryRefusal::Duplicate(other))) if other.as_str() == "a"
        ),
        "{:?}",
        batched[1]
    );
    // One revision each, contiguous, and the index holds them on return.
    let revisions: Vec<u64> = created.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, [before + 1, before + 2, before + 3]);
    for e in &created {
        assert_eq!(batch.state().index().get(&e.id).as_deref(), Some(*e));
    }
    let changes = batch
        .state()
        .store()
        .changes_since(before, 100)
        .await
        .unwrap();
    assert_eq!(changes.len(), 3);
}

/// A batch of refusals only writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_refusals_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir).await;
    let before = s.state().store().revision().await.unwrap();
    let results = s
        .state()
        .create_entries(vec![
            Ok(entry("reserved", "/sigil/agent/x", "unix:uid:3")),
            Err(EntryRefusal::MissingId.into()),
        ])
        .await
        .unwrap();
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert_eq!(s.state().store().revision().await.unwrap(), before);
}

/// The entries both servers of a comparison hold before the batch.
const STORED: [(&str, &str, &str); 5] = [
    ("a", "/a", "unix:uid:1"),
    ("b", "/b", "unix:uid:1"),
    ("c", "/c", "unix:uid:1"),
    ("d", "/d", "unix:uid:1"),
    ("stored", "/stored", "unix:uid:0"),
];

/// Two servers holding `STORED`: one for single calls, one for the batch.
async fn pair(dirs: &(tempfile::TempDir, tempfile::TempDir)) -> (ServerHandle, ServerHandle) {
    let (one, batch) = (server(&dirs.0).await, server(&dirs.1).await);
    for s in [&one, &batch] {
        for (id, path, selector) in STORED {
            s.state()
                .create_entry(entry(id, path, selector))
                .await
                .unwrap();
        }
    }
    (one, batch)
}

/// Every rule an update can break, and entries handing their parent ID,
/// SPIFFE ID and selectors to one another within the batch.
fn updates() -> Vec<Result<Entry, ServerError>> {
    vec![
        // a moves away from /a, and b takes /a after it.
        Ok(entry("a", "/a-moved", "unix:uid:1")),
        Ok(entry("b", "/a", "unix:uid:1")),
        Ok(entry("missing", "/m", "unix:uid:1")),
        // Duplicates a, moved there earlier in the batch.
        Ok(entry("c", "/a-moved", "unix:uid:1")),
        // Duplicates d, which moves away only later in the batch.
        Ok(entry("c", "/d", "unix:uid:1")),
        // Duplicates the entry no update touches.
        Ok(entry("c", "/stored", "unix:uid:0")),
        Ok(entry("c", "/sigil/agent/x", "unix:uid:1")),
        Err(EntryRefusal::MissingId.into()),
        Ok(entry("d", "/d-moved", "unix:uid:1")),
        // Now free: d moved away.
        Ok(entry("c", "/d", "unix:uid:1")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_updates_has_the_outcome_of_updating_one_after_the_other() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (one, batch) = pair(&dirs).await;
    let mut singly = Vec::new();
    for r in updates() {
        singly.push(match r {
            Ok(e) => one.state().update_entry(e).await,
            Err(e) => Err(e),
        });
    }
    let before = batch.state().store().revision().await.unwrap();
    let batched = batch.state().update_entries(updates()).await.unwrap();

    assert_eq!(outcome(&batched), outcome(&singly));
    for (i, other) in [(3, "a"), (4, "d"), (5, "stored")] {
        assert!(
            matches!(
                &batched[i],
                Err(ServerError::Entry(EntryRefusal::Duplicate(o))) if o.as_str() == other
            ),
            "result {i}: {:?}",
            batched[i]
        );
    }
    let written: Vec<&Entry> = batched.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        written.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["a", "b", "d", "c"]
    );
    let revisions: Vec<u64> = written.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, [before + 1, before + 2, before + 3, before + 4]);
    // The index holds them on return, as the single updates left theirs.
    for (id, ..) in STORED {
        let id: EntryId = id.parse().unwrap();
        let path = |s: &ServerHandle| s.state().index().get(&id).map(|e| e.spiffe_id.clone());
        assert_eq!(path(&batch), path(&one), "entry {id}");
    }
    for e in &written {
        assert_eq!(batch.state().index().get(&e.id).as_deref(), Some(*e));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_deletes_has_the_outcome_of_deleting_one_after_the_other() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (one, batch) = pair(&dirs).await;
    let ids = || -> Vec<Result<EntryId, ServerError>> {
        vec![
            Ok("a".parse().unwrap()),
            Ok("missing".parse().unwrap()),
            Err(EntryRefusal::MissingId.into()),
            Ok("c".parse().unwrap()),
            Ok("a".parse().unwrap()),
        ]
    };
    let mut singly = Vec::new();
    for r in ids() {
        singly.push(match r {
            Ok(id) => one.state().delete_entry(&id).await,
            Err(e) => Err(e),
        });
    }
    let before = batch.state().store().revision().await.unwrap();
    let batched = batch.state().delete_entries(ids()).await.unwrap();
    assert_eq!(outcome(&batched), outcome(&singly));
    assert_eq!(
        outcome(&batched)
            .into_iter()
            .filter_map(Result::ok)
            .collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert_eq!(batch.state().store().revision().await.unwrap(), before + 2);
    // Gone from the index on return; the others stay.
    for (id, ..) in STORED {
        let id: EntryId = id.parse().unwrap();
        let held = batch.state().index().get(&id).is_some();
        assert_eq!(held, !["a", "c"].contains(&id.as_str()), "entry {id}");
    }
}
