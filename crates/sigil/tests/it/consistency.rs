//! Issue #13 items 1 and 2: what a workload sees while its entry is deleted
//! or changed under an open stream, and duplicate entries created at the
//! same moment through one server or through two servers on one database.

use std::time::Duration;

use futures_util::StreamExt;
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::admin_api_client::AdminApiClient;
use spiffe::{WorkloadApiClient, X509Source};
use tonic::transport::Channel;

use crate::{PROMPT, cluster_with_me};

/// The audience of the JWT-SVIDs these tests fetch.
const AUDIENCE: &str = "consistency";

/// The SPIFFE IDs in an X509 context, sorted.
fn ids(ctx: &spiffe::X509Context) -> Vec<String> {
    let mut ids: Vec<String> = ctx
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    ids.sort();
    ids
}

/// Waits until `holds` is true of the source, woken by its updates; panics
/// with `what` once [`PROMPT`] has passed.
async fn source_within(source: &X509Source, what: &str, holds: impl Fn(&X509Source) -> bool) {
    let mut updates = source.updated();
    let deadline = tokio::time::Instant::now() + PROMPT;
    while !holds(source) {
        tokio::time::timeout_at(deadline, updates.changed())
            .await
            .unwrap_or_else(|_| panic!("X509Source: {what}: not within {PROMPT:?}"))
            .unwrap();
    }
}

/// Rewrites the selectors of the entry of `spiffe_id` through the admin
/// API; returns the entry's id and its new revision.
async fn update_selectors(
    cluster: &sigil_testkit::Cluster,
    spiffe_id: &str,
    change: impl FnOnce(&mut Vec<String>),
) -> (String, u64) {
    let mut admin = crate::procs::admin_client(&cluster.admin_socket())
        .await
        .unwrap();
    let id = entry_id_of(&mut admin, spiffe_id).await;
    let mut entry = admin
        .get_entry(pb::GetEntryRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    change(&mut entry.selectors);
    let updated = admin
        .batch_update_entry(pb::BatchUpdateEntryRequest {
            entries: vec![entry],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.results[0].error.is_empty(), "{updated:?}");
    (id, updated.results[0].entry.as_ref().unwrap().revision)
}

/// An X509Source on the cluster's Workload API socket.
async fn source_of(cluster: &sigil_testkit::Cluster) -> X509Source {
    X509Source::builder()
        .endpoint(cluster.socket_uri())
        .build()
        .await
        .unwrap()
}

/// The id of the entry of `spiffe_id`, through the admin API.
async fn entry_id_of(admin: &mut AdminApiClient<Channel>, spiffe_id: &str) -> String {
    let list = admin
        .list_entries(pb::ListEntriesRequest {
            spiffe_id: spiffe_id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1, "{:?}", list.entries);
    list.entries[0].id.clone()
}

/// Item 1a: the entry of one of a workload's two identities is deleted while
/// it streams. The stream's next message holds only the other one, the
/// X509Source stops offering the deleted one, and a JWT-SVID minted for it is
/// never served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_entry_leaves_the_stream_the_source_and_the_jwt_cache() {
    let (cluster, me) = cluster_with_me(Default::default()).await;
    let uid = nix::unistd::getuid();
    let keep = cluster
        .register("/keep", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    cluster.wait_for_svid(&keep.spiffe_id).await.unwrap();
    let both = vec![keep.spiffe_id.to_string(), me.to_string()];

    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(PROMPT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ids(&first), both);
    let source = source_of(&cluster).await;
    assert_eq!(ids(&source.x509_context().unwrap()), both);
    let old_jwt = client.fetch_jwt_svid([AUDIENCE], Some(&me)).await.unwrap();

    let mut admin = crate::procs::admin_client(&cluster.admin_socket())
        .await
        .unwrap();
    let id = entry_id_of(&mut admin, &me.to_string()).await;
    let deleted = admin
        .batch_delete_entry(pb::BatchDeleteEntryRequest { ids: vec![id] })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.results[0].error.is_empty(), "{deleted:?}");

    let next = tokio::time::timeout(PROMPT, stream.next())
        .await
        .expect("the stream was pushed the change")
        .unwrap()
        .unwrap();
    assert_eq!(ids(&next), vec![keep.spiffe_id.to_string()]);
    source_within(&source, "drops the deleted entry's SVID", |s| {
        s.x509_context()
            .is_ok_and(|c| ids(&c) == vec![keep.spiffe_id.to_string()])
    })
    .await;
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        keep.spiffe_id.to_string()
    );

    // The old token, asked for by its SPIFFE ID: no identity any more.
    let err = client
        .fetch_jwt_svid([AUDIENCE], Some(&me))
        .await
        .unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
    // Asked for by audience only: the remaining identity's token.
    let other = client.fetch_jwt_svid([AUDIENCE], None).await.unwrap();
    assert_ne!(other.token(), old_jwt.token());
    assert_eq!(other.spiffe_id().to_string(), keep.spiffe_id.to_string());
    source.shutdown().await;
    cluster.shutdown().await;
}

/// Item 1b: the selectors of a workload's only entry change so that it no
/// longer matches. The stream ends with PermissionDenied "no identity
/// issued" (the Workload API's answer when nothing is left, never an empty
/// message), the X509Source withdraws its SVID, and FetchJWTSVID refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_selectors_stop_matching_leaves_the_stream_and_the_source() {
    let (cluster, me) = cluster_with_me(Default::default()).await;
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = tokio::time::timeout(PROMPT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.spiffe_id(), &me);
    let source = source_of(&cluster).await;
    assert_eq!(source.svid().unwrap().spiffe_id(), &me);
    let old_jwt = client.fetch_jwt_svid([AUDIENCE], Some(&me)).await.unwrap();

    // A uid no process here runs as.
    update_selectors(&cluster, &me.to_string(), |s| {
        *s = vec!["unix:uid:4242424".into()];
    })
    .await;

    let next = tokio::time::timeout(PROMPT, stream.next())
        .await
        .expect("the stream was told")
        .expect("the stream ends with a status, not silently");
    let err = next.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
    source_within(&source, "withdraws the SVID", |s| s.svid().is_err()).await;

    for wanted in [Some(&me), None] {
        match client.fetch_jwt_svid([AUDIENCE], wanted).await {
            Err(spiffe::WorkloadApiError::NoIdentityIssued) => {}
            Err(e) => panic!("unexpected error: {e:?}"),
            Ok(jwt) => panic!(
                "a JWT-SVID was served after the entry stopped matching (old token: {})",
                jwt.token() == old_jwt.token()
            ),
        }
    }
    source.shutdown().await;
    cluster.shutdown().await;
}

/// Item 1c: a cached JWT-SVID is not served once its entry has changed, even
/// when the caller still matches it: here the selectors are narrowed (uid,
/// then uid and gid), so a token minted while the entry read otherwise is
/// never handed out again for the same audience.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_svid_cached_before_an_entry_change_is_not_served_after_it() {
    let (cluster, me) = cluster_with_me(Default::default()).await;
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let old_jwt = client.fetch_jwt_svid([AUDIENCE], Some(&me)).await.unwrap();
    // Cached: asked again before any change, the same token.
    let again = client.fetch_jwt_svid([AUDIENCE], Some(&me)).await.unwrap();
    assert_eq!(again.token(), old_jwt.token(), "the agent caches JWT-SVIDs");

    let gid = nix::unistd::getegid();
    let (id, revision) = update_selectors(&cluster, &me.to_string(), |s| {
        s.push(format!("unix:gid:{gid}"));
    })
    .await;
    let mut snapshots = cluster.agent().unwrap().snapshots.clone();
    tokio::time::timeout(
        PROMPT,
        snapshots.wait_for(|s| {
            s.entries
                .iter()
                .any(|e| e.id.to_string() == id && e.revision == revision)
        }),
    )
    .await
    .expect("the agent learns of the change")
    .unwrap();

    let after = client.fetch_jwt_svid([AUDIENCE], Some(&me)).await.unwrap();
    assert_eq!(after.spiffe_id(), &me);
    assert_ne!(
        after.token(),
        old_jwt.token(),
        "the token cached before the entry changed was served after it"
    );
    cluster.shutdown().await;
}

/// How many concurrent creates of one entry each test makes.
const RACERS: usize = 8;

/// Creates `entry` from [`RACERS`] tasks at once, each with its own admin
/// connection to one of `sockets` (round robin), released together; returns
/// the results.
async fn race_creates(
    sockets: &[std::path::PathBuf],
    entry: &pb::Entry,
) -> Vec<Result<String, String>> {
    let mut clients = Vec::new();
    for i in 0..RACERS {
        clients.push(
            crate::procs::admin_client(&sockets[i % sockets.len()])
                .await
                .unwrap(),
        );
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut admin| {
            let start = start.clone();
            let entry = entry.clone();
            tokio::spawn(async move {
                start.wait().await;
                crate::procs::create_entry(
                    &mut admin,
                    &entry.spiffe_id,
                    &entry.parent_id,
                    &entry.selectors,
                    "",
                )
                .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    results
}

/// Exactly one result is a success; every other is a clear duplicate error.
fn exactly_one_wins(results: &[Result<String, String>]) {
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            err.contains("already has") || err.contains("already exists"),
            "not a clear duplicate error: {err}"
        );
    }
}

/// The entries listed (by any server) with this SPIFFE ID.
async fn listed(socket: &std::path::Path, spiffe_id: &str) -> usize {
    let mut admin = crate::procs::admin_client(socket).await.unwrap();
    admin
        .list_entries(pb::ListEntriesRequest {
            spiffe_id: spiffe_id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .len()
}

/// Item 2a: the same entry created by several admin clients of one server at
/// once: one wins, the others are told it already exists, one is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_creates_through_one_server_store_one() {
    crate::init();
    let cluster = sigil_testkit::Cluster::start(Default::default())
        .await
        .unwrap();
    let sockets = [cluster.admin_socket()];
    for round in 0..3 {
        let spiffe_id = format!("spiffe://example.org/race/{round}");
        let entry = pb::Entry {
            spiffe_id: spiffe_id.clone(),
            parent_id: cluster.agent_id().to_string(),
            selectors: vec!["unix:uid:4243".into(), "unix:gid:4243".into()],
            ..Default::default()
        };
        exactly_one_wins(&race_creates(&sockets, &entry).await);
        assert_eq!(listed(&sockets[0], &spiffe_id).await, 1);
    }
    cluster.shutdown().await;
}

/// Item 2b: the same entry created at once through two servers sharing one
/// PostgreSQL database: the database decides, exactly one wins, and both
/// servers list one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_creates_through_two_servers_store_one() {
    crate::init();
    let Some(pg) = sigil_testkit::postgres::PrivatePostgres::start_or_skip(
        "concurrent_duplicate_creates_through_two_servers_store_one",
    )
    .unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = sigil_server::start(crate::ha::server_config(dir.path(), "a", &pg.url()))
        .await
        .unwrap();
    let b = sigil_server::start(crate::ha::server_config(dir.path(), "b", &pg.url()))
        .await
        .unwrap();
    let sockets = [
        a.admin_socket().to_path_buf(),
        b.admin_socket().to_path_buf(),
    ];
    for round in 0..5 {
        let spiffe_id = format!("spiffe://example.org/race/{round}");
        let entry = pb::Entry {
            spiffe_id: spiffe_id.clone(),
            parent_id: "spiffe://example.org/node/n1".into(),
            selectors: vec!["unix:uid:4243".into()],
            ..Default::default()
        };
        exactly_one_wins(&race_creates(&sockets, &entry).await);
        // Each server reads the one entry, the other's once it followed the feed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        for socket in &sockets {
            loop {
                let n = listed(socket, &spiffe_id).await;
                assert!(n <= 1, "{n} entries listed by {}", socket.display());
                if n == 1 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} never lists the entry",
                    socket.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}
