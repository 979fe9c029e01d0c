//! `ServerState::create_entries`, the bulk path of BatchCreateEntry: one
//! store transaction for the batch, with the outcome, entry by entry, of
//! creating the entries one after the other.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use sigil_server::error::{EntryRefusal, ServerError};
use sigil_server::{ServerConfig, ServerHandle};
use sigil_types::{Entry, Selectors, TrustDomain};

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
