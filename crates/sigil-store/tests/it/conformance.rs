//! The behaviour every `Store` implementation must show.
//!
//! Each case takes a fresh, empty store. A backend runs the whole suite with
//! `conformance_suite!(factory)`, where `factory` is an async fn returning the
//! store and a guard that keeps its resources (a temp dir, a schema) alive.

use std::collections::BTreeSet;
use std::sync::Arc;

use sigil_store::{
    AuthorityKind, AuthorityRecord, AuthorityState, Change, ChangeKind, JoinToken, Store,
    StoreError,
};
use sigil_types::{
    AgentRecord, BundleEndpointProfile, Entry, EntryId, FederationRelationship, Selectors,
    SpiffeId, TrustDomain,
};

/// Expands to one `#[tokio::test]` per conformance case, each with a fresh
/// store from `$make`.
///
/// With `optional`, `$make` returns an `Option` instead, and a case returns
/// early on `None`: for a backend that may be absent where the tests run (the
/// factory itself decides, and prints why, or fails in CI).
macro_rules! conformance_suite {
    (optional $make:path) => {
        conformance_suite!(@list $make, optional);
    };
    ($make:path) => {
        conformance_suite!(@list $make, required);
    };
    (@make required $make:path) => {
        Some($make().await)
    };
    (@make optional $make:path) => {
        $make().await
    };
    (@list $make:path, $mode:ident) => {
        conformance_suite!(@cases $make, $mode;
            entry_round_trip,
            duplicate_entries_rejected,
            missing_entries_not_found,
            change_feed_in_order,
            snapshot_revision_matches,
            agents_lifecycle,
            agent_serial_use,
            join_tokens_single_use,
            bundles,
            bundle_changes_in_feed,
            federation_relationships,
            authorities,
            authority_owner_and_taint,
            concurrent_creates,
            concurrent_duplicate_creates,
            batch_create_refuses_each_entry_on_its_own,
            batch_create_all_refused_writes_nothing,
            batch_create_refusals_in_later_statements,
            concurrent_batches_commit_revisions_in_order,
            batch_update_refuses_each_entry_on_its_own,
            batch_delete_refuses_each_id_on_its_own,
        );
    };
    (@cases $make:path, $mode:ident; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((store, _guard)) = conformance_suite!(@make $mode $make) else {
                    return;
                };
                crate::conformance::$case(store).await;
            }
        )*
    };
}

/// Keeps whatever backs a store (a temp dir, say) alive for one test.
pub(crate) type Guard = Box<dyn std::any::Any + Send>;

fn id(s: &str) -> EntryId {
    s.parse().unwrap()
}

fn sid(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// An entry with every field set away from its default, so a round trip that
/// drops or swaps a column shows.
pub(crate) fn full_entry(entry_id: &str) -> Entry {
    Entry {
        id: id(entry_id),
        spiffe_id: sid("spiffe://example.org/web"),
        parent_id: sid("spiffe://example.org/sigil/agent/join_token/abc"),
        selectors: Selectors::parse_all([
            "unix:uid:1000",
            "unix:gid:1000",
            "k8s:pod-label:app:web",
        ])
        .unwrap(),
        x509_svid_ttl: 3600,
        jwt_svid_ttl: 300,
        dns_names: vec!["web.example.org".into(), "*.web.example.org".into()],
        federates_with: vec![
            TrustDomain::new("partner.example").unwrap(),
            TrustDomain::new("other.example").unwrap(),
        ],
        attributes: vec![
            sigil_types::Attribute::Region,
            sigil_types::Attribute::Namespace,
        ],
        admin: true,
        downstream: true,
        hint: "external".into(),
        expires_at: Some(1_900_000_000),
        revision: 0,
        created_at: 1_700_000_000,
    }
}

/// A plain entry with its own SPIFFE ID, so many can coexist.
pub(crate) fn simple_entry(entry_id: &str) -> Entry {
    Entry {
        id: id(entry_id),
        spiffe_id: sid(&format!("spiffe://example.org/w/{entry_id}")),
        parent_id: sid("spiffe://example.org/sigil/agent/join_token/abc"),
        selectors: Selectors::parse_all(["unix:uid:1000"]).unwrap(),
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec![],
        federates_with: vec![],
        attributes: vec![],
        admin: false,
        downstream: false,
        hint: String::new(),
        expires_at: None,
        revision: 0,
        created_at: 1,
    }
}

fn agent(name: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: sid(&format!(
            "spiffe://example.org/sigil/agent/join_token/{name}"
        )),
        attestation_type: "join_token".into(),
        selectors: Selectors::parse_all(["join_token:abc", "unix:host:node1"]).unwrap(),
        serial: "0a1b".into(),
        previous_serial: "09".into(),
        serial_used: false,
        expires_at: 1_800_000_000,
        banned: false,
        can_reattest: false,
        created_at: 1_700_000_000,
        updated_at: 1_700_000_100,
    }
}

fn assert_already_exists(res: Result<Entry, StoreError>, names: &str) {
    match res {
        Err(StoreError::AlreadyExists(msg)) => {
            assert!(msg.contains(names), "{msg:?} should name entry {names}")
        }
        other => panic!("want AlreadyExists naming {names}, got {other:?}"),
    }
}

fn revisions(changes: &[Change]) -> Vec<u64> {
    changes.iter().map(|c| c.revision).collect()
}

/// Create, get, update, delete, with every field checked.
pub(crate) async fn entry_round_trip(store: Arc<dyn Store>) {
    let base = store.revision().await.unwrap();
    let given = full_entry("e1");
    let created = store.create_entry(given.clone()).await.unwrap();
    assert!(created.revision > base);
    assert_eq!(
        created,
        Entry {
            revision: created.revision,
            ..given
        }
    );
    assert_eq!(
        store.get_entry(&id("e1")).await.unwrap(),
        Some(created.clone())
    );

    let mut changed = simple_entry("e1");
    changed.created_at = 42;
    changed.hint = "new hint".into();
    changed.expires_at = None;
    let updated = store.update_entry(changed.clone()).await.unwrap();
    assert!(updated.revision > created.revision);
    assert_eq!(
        updated.created_at, created.created_at,
        "update keeps created_at"
    );
    assert_eq!(
        updated,
        Entry {
            revision: updated.revision,
            created_at: created.created_at,
            ..changed
        }
    );
    assert_eq!(
        store.get_entry(&id("e1")).await.unwrap(),
        Some(updated.clone())
    );

    let deleted = store.delete_entry(&id("e1")).await.unwrap();
    assert_eq!(deleted, updated);
    assert_eq!(store.get_entry(&id("e1")).await.unwrap(), None);
    assert!(store.list_entries().await.unwrap().entries.is_empty());
}

/// Same id, or same (parent, SPIFFE ID, selectors), is refused and changes nothing.
pub(crate) async fn duplicate_entries_rejected(store: Arc<dyn Store>) {
    let a = store.create_entry(full_entry("a")).await.unwrap();
    let before = store.revision().await.unwrap();

    let mut same_id = simple_entry("a");
    same_id.spiffe_id = sid("spiffe://example.org/elsewhere");
    assert_already_exists(store.create_entry(same_id).await, "a");

    // Same set in another order and with a repeat: still the same selectors.
    let mut same_triple = full_entry("b");
    same_triple.selectors = Selectors::parse_all([
        "k8s:pod-label:app:web",
        "unix:uid:1000",
        "unix:gid:1000",
        "unix:uid:1000",
    ])
    .unwrap();
    same_triple.hint = "other fields differ".into();
    assert_already_exists(store.create_entry(same_triple).await, "a");

    assert_eq!(
        store.revision().await.unwrap(),
        before,
        "a refused write allocates no revision"
    );
    assert!(store.changes_since(before, 100).await.unwrap().is_empty());
    let snapshot = store.list_entries().await.unwrap();
    assert_eq!(snapshot.entries, vec![a.clone()]);

    // Differing only in selectors is a different entry.
    let mut b = full_entry("b");
    b.selectors = Selectors::parse_all(["unix:uid:1001"]).unwrap();
    let b = store.create_entry(b).await.unwrap();

    // Updating b onto a's (parent, SPIFFE ID, selectors) is refused too.
    let mut onto_a = b.clone();
    onto_a.selectors = a.selectors.clone();
    assert_already_exists(store.update_entry(onto_a).await, "a");
    assert_eq!(store.get_entry(&id("b")).await.unwrap(), Some(b.clone()));

    // Updating an entry without changing its triple is not a conflict with itself.
    let mut b2 = b.clone();
    b2.hint = "renamed".into();
    store.update_entry(b2).await.unwrap();
}

/// Updating or deleting an absent entry is NotFound and writes nothing.
pub(crate) async fn missing_entries_not_found(store: Arc<dyn Store>) {
    let before = store.revision().await.unwrap();
    assert!(matches!(
        store.update_entry(full_entry("ghost")).await,
        Err(StoreError::NotFound(m)) if m.contains("ghost")
    ));
    assert!(matches!(
        store.delete_entry(&id("ghost")).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.get_entry(&id("ghost")).await.unwrap(), None);
    assert_eq!(store.revision().await.unwrap(), before);
    assert!(store.changes_since(before, 10).await.unwrap().is_empty());
    assert!(store.list_entries().await.unwrap().entries.is_empty());
}

/// Each write gets the next revision and leaves exactly one change, in order.
pub(crate) async fn change_feed_in_order(store: Arc<dyn Store>) {
    let base = store.revision().await.unwrap();
    let a1 = store.create_entry(full_entry("a")).await.unwrap();
    let mut change = a1.clone();
    change.hint = "v2".into();
    let a2 = store.update_entry(change).await.unwrap();
    let gone = store.delete_entry(&id("a")).await.unwrap();
    let b = store.create_entry(simple_entry("b")).await.unwrap();
    let last = store.revision().await.unwrap();
    assert_eq!(last, base + 4);
    assert_eq!(
        (a1.revision, a2.revision, b.revision),
        (base + 1, base + 2, base + 4)
    );

    let all = store.changes_since(base, 100).await.unwrap();
    assert_eq!(
        revisions(&all),
        vec![base + 1, base + 2, base + 3, base + 4]
    );
    assert_eq!(all[0].kind, ChangeKind::EntryUpserted(a1));
    assert_eq!(all[1].kind, ChangeKind::EntryUpserted(a2.clone()));
    assert_eq!(
        all[2].kind,
        ChangeKind::EntryDeleted(a2.clone()),
        "delete carries the last state"
    );
    assert_eq!(gone, a2);
    assert_eq!(all[3].kind, ChangeKind::EntryUpserted(b));

    assert_eq!(
        store.changes_since(base, 2).await.unwrap(),
        all[..2].to_vec()
    );
    assert_eq!(
        store.changes_since(base + 2, 1).await.unwrap(),
        all[2..3].to_vec()
    );
    assert!(store.changes_since(last, 10).await.unwrap().is_empty());
    assert!(store.changes_since(base, 0).await.unwrap().is_empty());
    assert!(store.changes_since(u64::MAX, 10).await.unwrap().is_empty());

    assert_eq!(store.prune_changes(base + 2).await.unwrap(), 2);
    assert_eq!(
        store.changes_since(0, 100).await.unwrap(),
        all[2..].to_vec()
    );
    assert_eq!(store.prune_changes(base + 2).await.unwrap(), 0);
    // Pruning the feed does not reset the counter.
    assert_eq!(store.revision().await.unwrap(), last);
    let c = store.create_entry(simple_entry("c")).await.unwrap();
    assert_eq!(c.revision, last + 1);
}

/// A snapshot's revision is the counter it was read with.
pub(crate) async fn snapshot_revision_matches(store: Arc<dyn Store>) {
    let empty = store.list_entries().await.unwrap();
    assert_eq!(empty.revision, store.revision().await.unwrap());
    for name in ["c", "a", "b"] {
        store.create_entry(simple_entry(name)).await.unwrap();
    }
    // Agent writes share the counter.
    store.upsert_agent(agent("n1")).await.unwrap();
    let snap = store.list_entries().await.unwrap();
    assert_eq!(snap.revision, store.revision().await.unwrap());
    assert_eq!(snap.revision, empty.revision + 4);
    let ids: Vec<&str> = snap.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);

    let mut b = snap.entries[1].clone();
    b.hint = "changed".into();
    let b = store.update_entry(b).await.unwrap();
    let snap2 = store.list_entries().await.unwrap();
    assert_eq!(snap2.revision, b.revision);
    assert_eq!(snap2.entries[1], b);
    // Following the feed from the first snapshot leads to the second.
    let feed = store.changes_since(snap.revision, 100).await.unwrap();
    assert_eq!(
        feed,
        vec![Change {
            revision: b.revision,
            kind: ChangeKind::EntryUpserted(b)
        }]
    );
}

/// The previous agent serial: renewing with it works until the current
/// serial is marked used (persisted, and in the feed for other servers);
/// after that only the current one renews.
pub(crate) async fn agent_serial_use(store: Arc<dyn Store>) {
    let a = agent("a"); // serial 0a1b, previous 09, unused
    store.upsert_agent(a.clone()).await.unwrap();
    let id = &a.spiffe_id;

    // A retry with the previous serial (the answer to the renewal that made
    // 0a1b was lost): renewed, and the serial it holds stays the previous.
    let r1 = store
        .renew_agent_serial(id, "09", "10", 99, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            r1.serial.as_str(),
            r1.previous_serial.as_str(),
            r1.serial_used
        ),
        ("10", "09", false)
    );
    // 0a1b was never delivered and is refused now; empty serials never match.
    for stale in ["0a1b", "", "zz"] {
        assert_eq!(
            store
                .renew_agent_serial(id, stale, "11", 99, 100)
                .await
                .unwrap(),
            None,
            "{stale:?}"
        );
    }
    assert_eq!(
        store.mark_agent_serial_used(id, "09").await.unwrap(),
        None,
        "only the current serial is marked"
    );
    let before = store.revision().await.unwrap();
    let used = store
        .mark_agent_serial_used(id, "10")
        .await
        .unwrap()
        .unwrap();
    assert!(used.serial_used);
    assert_eq!(store.get_agent(id).await.unwrap(), Some(used.clone()));
    let feed = store.changes_since(before, 10).await.unwrap();
    assert_eq!(
        feed.iter().map(|c| c.kind.clone()).collect::<Vec<_>>(),
        vec![ChangeKind::AgentChanged(id.clone())]
    );
    assert_eq!(
        store.mark_agent_serial_used(id, "10").await.unwrap(),
        None,
        "marked once"
    );
    assert_eq!(store.revision().await.unwrap(), feed[0].revision);

    // The previous serial is dead; the current one renews, and the new
    // serial starts unused with the current one as previous.
    assert_eq!(
        store
            .renew_agent_serial(id, "09", "12", 99, 100)
            .await
            .unwrap(),
        None
    );
    let r2 = store
        .renew_agent_serial(id, "10", "13", 199, 200)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r2,
        AgentRecord {
            serial: "13".into(),
            previous_serial: "10".into(),
            serial_used: false,
            expires_at: 199,
            updated_at: 200,
            ..used.clone()
        }
    );
    // upsert_agent stores the flag as given (re-attestation starts unused).
    let mut marked = r2.clone();
    marked.serial_used = true;
    store.upsert_agent(marked.clone()).await.unwrap();
    assert_eq!(store.get_agent(id).await.unwrap(), Some(marked));
}

/// Agents: upsert, get, list, ban, delete, each recorded in the feed.
pub(crate) async fn agents_lifecycle(store: Arc<dyn Store>) {
    let base = store.revision().await.unwrap();
    let a = agent("a");
    let b = agent("b");
    store.upsert_agent(a.clone()).await.unwrap();
    store.upsert_agent(b.clone()).await.unwrap();
    assert_eq!(
        store.get_agent(&a.spiffe_id).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        store.list_agents().await.unwrap(),
        vec![a.clone(), b.clone()]
    );

    let mut renewed = a.clone();
    renewed.previous_serial = a.serial.clone();
    renewed.serial = "0c".into();
    renewed.updated_at += 60;
    renewed.can_reattest = true;
    store.upsert_agent(renewed.clone()).await.unwrap();
    assert_eq!(
        store.get_agent(&a.spiffe_id).await.unwrap(),
        Some(renewed.clone())
    );

    let banned = store.set_agent_banned(&a.spiffe_id, true).await.unwrap();
    assert_eq!(
        banned,
        AgentRecord {
            banned: true,
            ..renewed.clone()
        }
    );
    assert_eq!(store.get_agent(&a.spiffe_id).await.unwrap(), Some(banned));

    // A ban holds against writers that read the record before it.
    store.upsert_agent(renewed.clone()).await.unwrap();
    assert!(store.get_agent(&a.spiffe_id).await.unwrap().unwrap().banned);
    // A conditional renewal changes nothing for a banned agent, for a serial
    // that is no longer current, or for an agent that is gone.
    assert_eq!(
        store
            .renew_agent_serial(&a.spiffe_id, "0c", "0d", 99, 99)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .renew_agent_serial(&b.spiffe_id, "stale", "0e", 99, 99)
            .await
            .unwrap(),
        None
    );
    let b_renewed = store
        .renew_agent_serial(&b.spiffe_id, &b.serial, "0e", 99, 100)
        .await
        .unwrap();
    let Some(b_renewed) = b_renewed else {
        panic!("a current, unbanned agent is renewed");
    };
    assert_eq!(
        b_renewed,
        AgentRecord {
            previous_serial: b.serial.clone(),
            serial_used: false,
            serial: "0e".into(),
            expires_at: 99,
            updated_at: 100,
            ..b.clone()
        }
    );
    assert_eq!(
        store.get_agent(&b.spiffe_id).await.unwrap(),
        Some(b_renewed.clone())
    );
    let b = b_renewed;

    assert_eq!(store.delete_agent(&b.spiffe_id).await.unwrap(), b);
    assert_eq!(
        store
            .renew_agent_serial(&b.spiffe_id, &b.serial, "0f", 99, 99)
            .await
            .unwrap(),
        None,
        "an evicted agent is not brought back"
    );
    assert_eq!(store.get_agent(&b.spiffe_id).await.unwrap(), None);
    assert!(matches!(
        store.delete_agent(&b.spiffe_id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.set_agent_banned(&b.spiffe_id, true).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.list_agents().await.unwrap().len(), 1);

    let feed = store.changes_since(base, 100).await.unwrap();
    let kinds: Vec<ChangeKind> = feed.iter().map(|c| c.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            ChangeKind::AgentChanged(a.spiffe_id.clone()),
            ChangeKind::AgentChanged(b.spiffe_id.clone()),
            ChangeKind::AgentChanged(a.spiffe_id.clone()),
            ChangeKind::AgentChanged(a.spiffe_id.clone()),
            ChangeKind::AgentChanged(a.spiffe_id.clone()),
            ChangeKind::AgentChanged(b.spiffe_id.clone()),
            ChangeKind::AgentDeleted(b.spiffe_id.clone()),
        ]
    );
    assert_eq!(revisions(&feed), (base + 1..=base + 7).collect::<Vec<_>>());
}

/// A join token works once; an expired one fails and is gone.
pub(crate) async fn join_tokens_single_use(store: Arc<dyn Store>) {
    let before = store.revision().await.unwrap();
    let t1 = JoinToken {
        token_hash: "h1".into(),
        expires_at: 1000,
        created_at: 10,
    };
    store.create_join_token(t1.clone()).await.unwrap();
    assert!(matches!(
        store.create_join_token(t1.clone()).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(store.consume_join_token("h1", 999).await.unwrap(), t1);
    assert!(matches!(
        store.consume_join_token("h1", 999).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.consume_join_token("nope", 0).await,
        Err(StoreError::NotFound(_))
    ));

    store
        .create_join_token(JoinToken {
            token_hash: "h2".into(),
            expires_at: 1000,
            created_at: 10,
        })
        .await
        .unwrap();
    assert!(matches!(
        store.consume_join_token("h2", 1000).await,
        Err(StoreError::TokenExpired)
    ));
    assert!(
        matches!(
            store.consume_join_token("h2", 0).await,
            Err(StoreError::NotFound(_))
        ),
        "an expired token is deleted when presented"
    );

    for (hash, expires_at) in [("p1", 100), ("p2", 200), ("p3", 300)] {
        store
            .create_join_token(JoinToken {
                token_hash: hash.into(),
                expires_at,
                created_at: 1,
            })
            .await
            .unwrap();
    }
    assert_eq!(store.prune_join_tokens(200).await.unwrap(), 2);
    assert_eq!(store.prune_join_tokens(200).await.unwrap(), 0);
    assert!(matches!(
        store.consume_join_token("p2", 0).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.consume_join_token("p3", 0).await.unwrap().expires_at,
        300
    );
    assert_eq!(
        store.revision().await.unwrap(),
        before,
        "tokens are not in the feed"
    );
}

/// Bundles: put (replacing), get, list in order, delete.
pub(crate) async fn bundles(store: Arc<dyn Store>) {
    let a = TrustDomain::new("a.example").unwrap();
    let b = TrustDomain::new("b.example").unwrap();
    assert_eq!(store.get_bundle(&a).await.unwrap(), None);
    store.put_bundle(&b, r#"{"keys":[2]}"#).await.unwrap();
    store.put_bundle(&a, r#"{"keys":[]}"#).await.unwrap();
    store.put_bundle(&a, r#"{"keys":[1]}"#).await.unwrap();
    assert_eq!(
        store.get_bundle(&a).await.unwrap().as_deref(),
        Some(r#"{"keys":[1]}"#)
    );
    assert_eq!(
        store.list_bundles().await.unwrap(),
        vec![
            (a.clone(), r#"{"keys":[1]}"#.to_owned()),
            (b.clone(), r#"{"keys":[2]}"#.to_owned())
        ]
    );
    store.delete_bundle(&a).await.unwrap();
    assert_eq!(store.get_bundle(&a).await.unwrap(), None);
    assert!(matches!(
        store.delete_bundle(&a).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.list_bundles().await.unwrap().len(), 1);
}

/// Bundle writes are in the change feed, with revisions, so that other
/// servers and sync streams learn of federated bundles.
pub(crate) async fn bundle_changes_in_feed(store: Arc<dyn Store>) {
    let a = TrustDomain::new("a.example").unwrap();
    let start = store.revision().await.unwrap();
    store.put_bundle(&a, r#"{"keys":[]}"#).await.unwrap();
    store.delete_bundle(&a).await.unwrap();
    assert!(store.delete_bundle(&a).await.is_err());
    let kinds: Vec<ChangeKind> = store
        .changes_since(start, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            ChangeKind::BundleChanged(a.clone()),
            ChangeKind::BundleDeleted(a.clone())
        ],
        "a failed delete records nothing"
    );
    assert_eq!(store.revision().await.unwrap(), start + 2);
}

/// Federation relationships: put (replacing), get, list in order, delete
/// returning the last state, each write in the change feed.
pub(crate) async fn federation_relationships(store: Arc<dyn Store>) {
    let a = TrustDomain::new("a.example").unwrap();
    let b = TrustDomain::new("b.example").unwrap();
    let web = FederationRelationship {
        trust_domain: b.clone(),
        bundle_endpoint_url: "https://b.example:8443/".to_owned(),
        profile: BundleEndpointProfile::HttpsWeb,
        from_config: false,
    };
    let spiffe = FederationRelationship {
        trust_domain: a.clone(),
        bundle_endpoint_url: "https://a.example/bundle".to_owned(),
        profile: BundleEndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: "spiffe://a.example/sigil/server".parse().unwrap(),
        },
        from_config: true,
    };
    let start = store.revision().await.unwrap();
    assert_eq!(store.get_federation_relationship(&a).await.unwrap(), None);
    store
        .put_federation_relationship(web.clone())
        .await
        .unwrap();
    store
        .put_federation_relationship(FederationRelationship {
            bundle_endpoint_url: "https://old.example/".to_owned(),
            ..spiffe.clone()
        })
        .await
        .unwrap();
    store
        .put_federation_relationship(spiffe.clone())
        .await
        .unwrap();
    assert_eq!(
        store.get_federation_relationship(&a).await.unwrap(),
        Some(spiffe.clone())
    );
    assert_eq!(
        store.list_federation_relationships().await.unwrap(),
        vec![spiffe.clone(), web.clone()]
    );
    assert_eq!(store.delete_federation_relationship(&b).await.unwrap(), web);
    assert!(matches!(
        store.delete_federation_relationship(&b).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.list_federation_relationships().await.unwrap(),
        vec![spiffe]
    );
    let kinds: Vec<ChangeKind> = store
        .changes_since(start, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            ChangeKind::FederationChanged(b.clone()),
            ChangeKind::FederationChanged(a.clone()),
            ChangeKind::FederationChanged(a.clone()),
            ChangeKind::FederationDeleted(b.clone()),
        ]
    );
}

/// Authorities: upsert by id, list by (created_at, id), delete.
pub(crate) async fn authorities(store: Arc<dyn Store>) {
    let rec = |id: &str, kind, created_at| AuthorityRecord {
        id: id.into(),
        kind,
        state: AuthorityState::Prepared,
        public: vec![0x30, 0x82, 0, 0xff, id.len() as u8],
        not_before: created_at,
        not_after: created_at + 86_400,
        created_at,
        owner: String::new(),
        tainted: false,
    };
    let x_b = rec("x509-b", AuthorityKind::X509, 10);
    let jwt = rec("jwt-1", AuthorityKind::Jwt, 5);
    let x_a = rec("x509-a", AuthorityKind::X509, 10);
    for r in [&x_b, &jwt, &x_a] {
        store.put_authority(r.clone()).await.unwrap();
    }
    assert_eq!(
        store.list_authorities().await.unwrap(),
        vec![jwt.clone(), x_a.clone(), x_b.clone()]
    );

    let active = AuthorityRecord {
        state: AuthorityState::Active,
        ..x_a.clone()
    };
    let retired = AuthorityRecord {
        state: AuthorityState::Retired,
        ..jwt.clone()
    };
    store.put_authority(active.clone()).await.unwrap();
    store.put_authority(retired.clone()).await.unwrap();
    assert_eq!(
        store.list_authorities().await.unwrap(),
        vec![retired.clone(), active.clone(), x_b.clone()]
    );

    store.delete_authority("x509-b").await.unwrap();
    store.delete_authority("x509-b").await.unwrap();
    assert_eq!(
        store.list_authorities().await.unwrap(),
        vec![retired, active]
    );
}

/// Owner and taint flag round-trip and are replaced by a later put, so one
/// server can adopt a record and taint it.
pub(crate) async fn authority_owner_and_taint(store: Arc<dyn Store>) {
    let legacy = AuthorityRecord {
        id: "x509-legacy".into(),
        kind: AuthorityKind::X509,
        state: AuthorityState::Active,
        public: vec![1, 2, 3],
        not_before: 1,
        not_after: 100,
        created_at: 1,
        owner: String::new(),
        tainted: false,
    };
    let peer = AuthorityRecord {
        id: "jwt-peer".into(),
        kind: AuthorityKind::Jwt,
        state: AuthorityState::Retired,
        public: b"{}".to_vec(),
        not_before: 2,
        not_after: 200,
        created_at: 2,
        owner: "0123456789abcdef".into(),
        tainted: true,
    };
    store.put_authority(legacy.clone()).await.unwrap();
    store.put_authority(peer.clone()).await.unwrap();
    assert_eq!(
        store.list_authorities().await.unwrap(),
        vec![legacy.clone(), peer.clone()]
    );

    let adopted = AuthorityRecord {
        owner: "fedcba9876543210".into(),
        state: AuthorityState::Retired,
        tainted: true,
        ..legacy
    };
    let untainted = AuthorityRecord {
        tainted: false,
        ..peer
    };
    store.put_authority(adopted.clone()).await.unwrap();
    store.put_authority(untainted.clone()).await.unwrap();
    assert_eq!(
        store.list_authorities().await.unwrap(),
        vec![adopted, untainted]
    );
}

/// A follower reading the feed from `base`, `page` changes a read, until it
/// has seen `total` more revisions, failing if it ever skips one; returns
/// the last revision seen.
fn follow_feed(
    store: &Arc<dyn Store>,
    base: u64,
    total: u64,
    page: u32,
) -> tokio::task::JoinHandle<u64> {
    let store = store.clone();
    tokio::spawn(async move {
        let mut seen = base;
        while seen < base + total {
            for change in store.changes_since(seen, page).await.unwrap() {
                assert_eq!(change.revision, seen + 1, "the feed skipped a revision");
                seen = change.revision;
            }
            tokio::task::yield_now().await;
        }
        seen
    })
}

/// Checks that the writers were handed `base + 1 ..= base + total`, each
/// once (`handed`), that the follower saw them all, and that the feed holds
/// one change for each; returns the feed.
async fn every_revision_once(
    store: &Arc<dyn Store>,
    handed: &BTreeSet<u64>,
    follower: tokio::task::JoinHandle<u64>,
    base: u64,
    total: u64,
) -> Vec<Change> {
    assert_eq!(*handed, (base + 1..=base + total).collect::<BTreeSet<_>>());
    assert_eq!(follower.await.unwrap(), base + total);
    let feed = store.changes_since(base, 1000).await.unwrap();
    assert_eq!(
        revisions(&feed),
        (base + 1..=base + total).collect::<Vec<_>>()
    );
    feed
}

/// A task creating entries `<prefix>0` to `<prefix><n - 1>` one at a time;
/// returns their revisions.
fn single_creates(
    store: &Arc<dyn Store>,
    prefix: String,
    n: usize,
) -> tokio::task::JoinHandle<Vec<u64>> {
    let store = store.clone();
    tokio::spawn(async move {
        let mut revs = Vec::new();
        for i in 0..n {
            let e = store
                .create_entry(simple_entry(&format!("{prefix}{i}")))
                .await
                .unwrap();
            revs.push(e.revision);
        }
        revs
    })
}

/// Eight tasks creating at once all succeed, with distinct revisions, and a
/// follower reading the feed meanwhile never sees a gap.
pub(crate) async fn concurrent_creates(store: Arc<dyn Store>) {
    const TASKS: usize = 8;
    const EACH: usize = 5;
    let base = store.revision().await.unwrap();
    let total = (TASKS * EACH) as u64;

    let follower = follow_feed(&store, base, total, 7);

    let writers: Vec<_> = (0..TASKS)
        .map(|t| single_creates(&store, format!("t{t}-"), EACH))
        .collect();
    let mut all = BTreeSet::new();
    for w in writers {
        for rev in w.await.unwrap() {
            assert!(all.insert(rev), "revision {rev} handed out twice");
        }
    }
    every_revision_once(&store, &all, follower, base, total).await;
    let snap = store.list_entries().await.unwrap();
    assert_eq!(snap.entries.len(), TASKS * EACH);
    assert_eq!(snap.revision, base + total);
}

/// Eight tasks creating the same (parent ID, SPIFFE ID, selectors) under
/// different ids at once: the store alone decides, whatever its callers
/// checked before (two servers on one database each pass their own index).
/// Exactly one is stored; every other is AlreadyExists naming it, and
/// allocates no revision.
pub(crate) async fn concurrent_duplicate_creates(store: Arc<dyn Store>) {
    const TASKS: usize = 8;
    let base = store.revision().await.unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let writers: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            let start = start.clone();
            tokio::spawn(async move {
                let mut e = simple_entry(&format!("dup{t}"));
                e.spiffe_id = sid("spiffe://example.org/w/same");
                start.wait().await;
                store.create_entry(e).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for w in writers {
        results.push(w.await.unwrap());
    }
    let won: Vec<&Entry> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    let winner = won[0].id.to_string();
    for r in results.iter().filter(|r| r.is_err()) {
        match r {
            Err(StoreError::AlreadyExists(msg)) => {
                assert!(msg.contains(&winner), "{msg:?} should name entry {winner}")
            }
            other => panic!("want AlreadyExists naming {winner}, got {other:?}"),
        }
    }
    let snap = store.list_entries().await.unwrap();
    assert_eq!(snap.entries.len(), 1);
    assert_eq!(snap.revision, base + 1);
}

/// The message of a refused entry in a batch's results.
fn refusal(result: &Result<Entry, StoreError>) -> String {
    match result {
        Err(StoreError::AlreadyExists(msg)) => msg.clone(),
        other => panic!("want AlreadyExists, got {other:?}"),
    }
}

/// A batch has the outcome of creating its entries one after the other:
/// an entry duplicating one created earlier in the batch, or a stored one,
/// or taking a used id, or unstorable, is refused with the message a single
/// create gives, and the others are created, with contiguous revisions in
/// batch order and one change each.
pub(crate) async fn batch_create_refuses_each_entry_on_its_own(store: Arc<dyn Store>) {
    let stored = store.create_entry(full_entry("stored")).await.unwrap();
    let base = store.revision().await.unwrap();

    let mut same_triple_as_a = simple_entry("a-twin");
    same_triple_as_a.spiffe_id = sid("spiffe://example.org/w/a");
    let mut same_id_as_a = simple_entry("a");
    same_id_as_a.spiffe_id = sid("spiffe://example.org/w/a-other");
    let mut same_triple_as_stored = full_entry("stored-twin");
    same_triple_as_stored.hint = "other fields differ".into();
    let mut unstorable = simple_entry("huge");
    unstorable.x509_svid_ttl = u64::MAX;
    // Refused as a's duplicate, though an entry later in the batch takes
    // its id: what is said is what was true when its turn came.
    let mut x_as_a = simple_entry("x");
    x_as_a.spiffe_id = sid("spiffe://example.org/w/a");
    let batch = vec![
        simple_entry("a"),
        same_triple_as_a.clone(),
        same_id_as_a.clone(),
        unstorable,
        same_triple_as_stored.clone(),
        x_as_a,
        simple_entry("x"),
        simple_entry("b"),
    ];
    let results = store.create_entries(batch).await.unwrap();
    assert_eq!(results.len(), 8);

    let a = results[0].as_ref().unwrap();
    assert_eq!(a.revision, base + 1);
    assert_eq!(
        refusal(&results[1]),
        "entry a already has parent_id spiffe://example.org/sigil/agent/join_token/abc, spiffe_id spiffe://example.org/w/a and the same selectors"
    );
    assert_eq!(refusal(&results[2]), "entry a already exists");
    assert!(
        matches!(&results[3], Err(StoreError::Unstorable(m)) if m.contains("x509_svid_ttl")),
        "{:?}",
        results[3]
    );
    assert!(refusal(&results[4]).starts_with("entry stored already has parent_id"));
    assert_eq!(refusal(&results[5]), refusal(&results[1]));
    let x = results[6].as_ref().unwrap();
    assert_eq!(x.revision, base + 2, "a refused entry takes no revision");
    let b = results[7].as_ref().unwrap();
    assert_eq!(
        *b,
        Entry {
            revision: base + 3,
            ..simple_entry("b")
        }
    );

    // Single creates of the same entries now are refused in the same words.
    for (entry, result) in [
        (same_triple_as_a, &results[1]),
        (same_id_as_a, &results[2]),
        (same_triple_as_stored, &results[4]),
    ] {
        let single_result = store.create_entry(entry).await;
        assert_eq!(refusal(&single_result), refusal(result));
    }

    assert_eq!(store.revision().await.unwrap(), base + 3);
    let feed = store.changes_since(base, 100).await.unwrap();
    assert_eq!(revisions(&feed), vec![base + 1, base + 2, base + 3]);
    assert_eq!(feed[0].kind, ChangeKind::EntryUpserted(a.clone()));
    assert_eq!(feed[1].kind, ChangeKind::EntryUpserted(x.clone()));
    assert_eq!(feed[2].kind, ChangeKind::EntryUpserted(b.clone()));
    let snapshot = store.list_entries().await.unwrap();
    assert_eq!(
        snapshot.entries,
        vec![a.clone(), b.clone(), stored, x.clone()]
    );
    assert_eq!(snapshot.revision, base + 3);
    // The revisions reserved for the refused entries were given back.
    let c = store.create_entry(simple_entry("c")).await.unwrap();
    assert_eq!(c.revision, base + 4);
}

/// A batch longer than one insert statement, with refusals in its later
/// statements (a duplicate of an entry of an earlier statement, an id taken
/// by a stored entry) and in a statement of its own: each refused entry,
/// and only it, is refused; the others get contiguous revisions in batch
/// order, as they would in a batch of one statement.
pub(crate) async fn batch_create_refusals_in_later_statements(store: Arc<dyn Store>) {
    store.create_entry(simple_entry("stored")).await.unwrap();
    let base = store.revision().await.unwrap();
    let mut batch: Vec<Entry> = (0..200).map(|i| simple_entry(&format!("e{i}"))).collect();
    // Index 100: the triple of e3 (an earlier statement); 150: the id of
    // the stored entry; 199, alone in the last statement of 64: e198's triple.
    batch[100].spiffe_id = sid("spiffe://example.org/w/e3");
    batch[150] = Entry {
        spiffe_id: sid("spiffe://example.org/w/other"),
        ..simple_entry("stored")
    };
    batch[199].spiffe_id = sid("spiffe://example.org/w/e198");
    let results = store.create_entries(batch).await.unwrap();
    assert_eq!(results.len(), 200);
    let mut next = base;
    for (i, result) in results.iter().enumerate() {
        match i {
            100 => assert!(refusal(result).starts_with("entry e3 already has parent_id")),
            150 => assert_eq!(refusal(result), "entry stored already exists"),
            199 => assert!(refusal(result).starts_with("entry e198 already has parent_id")),
            _ => {
                next += 1;
                let e = result.as_ref().unwrap();
                assert_eq!(
                    (e.id.as_str(), e.revision),
                    (format!("e{i}").as_str(), next)
                );
            }
        }
    }
    assert_eq!(next, base + 197);
    assert_eq!(store.revision().await.unwrap(), next);
    let feed = store.changes_since(base, 1000).await.unwrap();
    assert_eq!(revisions(&feed), (base + 1..=next).collect::<Vec<_>>());
    assert_eq!(store.list_entries().await.unwrap().entries.len(), 198);
}

/// A batch whose every entry is refused writes nothing and spends no revision.
pub(crate) async fn batch_create_all_refused_writes_nothing(store: Arc<dyn Store>) {
    store.create_entry(simple_entry("a")).await.unwrap();
    let base = store.revision().await.unwrap();
    let mut huge = simple_entry("huge");
    huge.jwt_svid_ttl = u64::MAX;
    let results = store
        .create_entries(vec![simple_entry("a"), huge])
        .await
        .unwrap();
    assert_eq!(refusal(&results[0]), "entry a already exists");
    assert!(matches!(&results[1], Err(StoreError::Unstorable(_))));
    assert!(store.create_entries(vec![]).await.unwrap().is_empty());
    assert_eq!(store.revision().await.unwrap(), base);
    assert!(store.changes_since(base, 10).await.unwrap().is_empty());
    assert_eq!(store.list_entries().await.unwrap().entries.len(), 1);
}

/// A batch of updates has the outcome of updating its entries one after
/// the other: one not found, unstorable, or duplicating a stored entry or
/// one updated earlier in the batch is refused with the message a single
/// update gives; the others are written with contiguous revisions in batch
/// order, their stored `created_at`, and one change each. An entry may
/// take the parent ID, SPIFFE ID and selectors another one gave up earlier
/// in the same batch.
pub(crate) async fn batch_update_refuses_each_entry_on_its_own(store: Arc<dyn Store>) {
    for name in ["a", "b", "c", "stored"] {
        store.create_entry(simple_entry(name)).await.unwrap();
    }
    let base = store.revision().await.unwrap();

    // a gives up its SPIFFE ID, and b takes it after that.
    let mut a = simple_entry("a");
    a.spiffe_id = sid("spiffe://example.org/w/a-moved");
    a.created_at = 99;
    let mut b_as_old_a = simple_entry("b");
    b_as_old_a.spiffe_id = sid("spiffe://example.org/w/a");
    // c takes a's new SPIFFE ID: a duplicate of a, updated earlier.
    let mut c_as_a = simple_entry("c");
    c_as_a.spiffe_id = sid("spiffe://example.org/w/a-moved");
    let mut c_as_stored = simple_entry("c");
    c_as_stored.spiffe_id = sid("spiffe://example.org/w/stored");
    let mut unstorable = simple_entry("c");
    unstorable.jwt_svid_ttl = u64::MAX;
    let mut c = simple_entry("c");
    c.hint = "updated".into();
    let batch = vec![
        a,
        simple_entry("missing"),
        b_as_old_a,
        c_as_a.clone(),
        c_as_stored.clone(),
        unstorable,
        c,
    ];
    let results = store.update_entries(batch).await.unwrap();
    assert_eq!(results.len(), 7);
    let a = results[0].as_ref().unwrap();
    assert_eq!(
        (a.revision, a.created_at),
        (base + 1, 1),
        "stored created_at kept"
    );
    assert!(
        matches!(&results[1], Err(StoreError::NotFound(m)) if m == "entry missing"),
        "{:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().unwrap().revision, base + 2);
    assert!(refusal(&results[3]).starts_with("entry a already has parent_id"));
    assert!(refusal(&results[4]).starts_with("entry stored already has parent_id"));
    assert!(matches!(&results[5], Err(StoreError::Unstorable(_))));
    let c = results[6].as_ref().unwrap();
    assert_eq!((c.revision, c.hint.as_str()), (base + 3, "updated"));

    // What was written is what a reader sees, one change each, in order.
    assert_eq!(store.revision().await.unwrap(), base + 3);
    let feed = store.changes_since(base, 100).await.unwrap();
    assert_eq!(revisions(&feed), vec![base + 1, base + 2, base + 3]);
    for (change, want) in feed.iter().zip([&results[0], &results[2], &results[6]]) {
        assert_eq!(
            change.kind,
            ChangeKind::EntryUpserted(want.as_ref().unwrap().clone())
        );
    }
    assert_eq!(
        store.get_entry(&id("b")).await.unwrap().unwrap().spiffe_id,
        sid("spiffe://example.org/w/a")
    );
    // Single updates of the refused entries are refused in the same words.
    assert_eq!(
        refusal(&store.update_entry(c_as_a).await),
        refusal(&results[3])
    );
    assert_eq!(
        refusal(&store.update_entry(c_as_stored).await),
        refusal(&results[4])
    );

    // A batch with nothing to write writes nothing, not even a revision.
    let results = store
        .update_entries(vec![simple_entry("missing")])
        .await
        .unwrap();
    assert!(matches!(&results[0], Err(StoreError::NotFound(_))));
    assert!(store.update_entries(vec![]).await.unwrap().is_empty());
    assert_eq!(store.revision().await.unwrap(), base + 3);
}

/// A batch of deletes has the outcome of deleting its IDs one after the
/// other: each entry deleted returns as it was, with a change of its own
/// under contiguous revisions; an ID not found, or given a second time,
/// is `NotFound` in its place.
pub(crate) async fn batch_delete_refuses_each_id_on_its_own(store: Arc<dyn Store>) {
    let a = store.create_entry(full_entry("a")).await.unwrap();
    let b = store.create_entry(simple_entry("b")).await.unwrap();
    store.create_entry(simple_entry("kept")).await.unwrap();
    let base = store.revision().await.unwrap();

    let results = store
        .delete_entries(&[id("a"), id("missing"), id("b"), id("a")])
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0].as_ref().unwrap(), &a);
    assert!(
        matches!(&results[1], Err(StoreError::NotFound(m)) if m == "entry missing"),
        "{:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().unwrap(), &b);
    assert!(matches!(&results[3], Err(StoreError::NotFound(_))));

    assert_eq!(store.revision().await.unwrap(), base + 2);
    let feed = store.changes_since(base, 100).await.unwrap();
    assert_eq!(revisions(&feed), vec![base + 1, base + 2]);
    assert_eq!(feed[0].kind, ChangeKind::EntryDeleted(a));
    assert_eq!(feed[1].kind, ChangeKind::EntryDeleted(b));
    let left: Vec<EntryId> = store
        .list_entries()
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, vec![id("kept")]);

    // Nothing to delete: nothing written, not even a revision.
    let results = store.delete_entries(&[id("a")]).await.unwrap();
    assert!(matches!(&results[0], Err(StoreError::NotFound(_))));
    assert!(store.delete_entries(&[]).await.unwrap().is_empty());
    assert_eq!(store.revision().await.unwrap(), base + 2);
}

/// Batches and single creates racing: every revision is handed out once,
/// each batch's are contiguous (it commits as one), and a follower reading
/// the feed meanwhile never sees a gap; the feed has one change per entry.
pub(crate) async fn concurrent_batches_commit_revisions_in_order(store: Arc<dyn Store>) {
    const BATCHES: usize = 4;
    const EACH: usize = 30;
    const SINGLES: usize = 10;
    let base = store.revision().await.unwrap();
    let total = (BATCHES * EACH + SINGLES) as u64;
    let follower = follow_feed(&store, base, total, 13);
    let batches: Vec<_> = (0..BATCHES)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let entries = (0..EACH)
                    .map(|i| simple_entry(&format!("b{t}-{i}")))
                    .collect();
                let created: Vec<Entry> = store
                    .create_entries(entries)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(Result::unwrap)
                    .collect();
                created
            })
        })
        .collect();
    let singles = single_creates(&store, "s".to_owned(), SINGLES);
    let mut all = BTreeSet::new();
    let mut created = Vec::new();
    for b in batches {
        let entries = b.await.unwrap();
        let revs: Vec<u64> = entries.iter().map(|e| e.revision).collect();
        let first = revs[0];
        assert_eq!(
            revs,
            (first..first + EACH as u64).collect::<Vec<_>>(),
            "a batch's revisions are contiguous, in batch order"
        );
        all.extend(revs);
        created.extend(entries);
    }
    for rev in singles.await.unwrap() {
        assert!(all.insert(rev), "revision {rev} handed out twice");
    }
    let feed = every_revision_once(&store, &all, follower, base, total).await;
    for e in created {
        let change = &feed[(e.revision - base - 1) as usize];
        assert_eq!(change.kind, ChangeKind::EntryUpserted(e));
    }
    let snap = store.list_entries().await.unwrap();
    assert_eq!(snap.entries.len(), BATCHES * EACH + SINGLES);
    assert_eq!(snap.revision, base + total);
}

/// A batch the database fails partway (`fails` is an entry whose insert
/// the backend's test has made fail, e.g. with a trigger) writes nothing:
/// not the entries before it (more than one statement's worth), not their
/// changes, not a revision.
pub(crate) async fn batch_failure_writes_nothing(store: Arc<dyn Store>, fails: &str) {
    store.create_entry(simple_entry("before")).await.unwrap();
    let base = store.revision().await.unwrap();
    let mut batch: Vec<Entry> = (1..=200).map(|i| simple_entry(&format!("x{i}"))).collect();
    batch.insert(150, simple_entry(fails));
    match store.create_entries(batch).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("want the batch to fail with a backend error, got {other:?}"),
    }
    assert_eq!(store.revision().await.unwrap(), base);
    assert!(store.changes_since(base, 10).await.unwrap().is_empty());
    let snap = store.list_entries().await.unwrap();
    assert_eq!(snap.entries.len(), 1, "{:?}", snap.entries);
    assert_eq!(store.get_entry(&id("x1")).await.unwrap(), None);
    // The store goes on: the same entries without the failing one.
    let results = store
        .create_entries(vec![simple_entry("x1"), simple_entry("x2")])
        .await
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap().revision, base + 1);
    assert_eq!(results[1].as_ref().unwrap().revision, base + 2);
}

/// Batches of updates and deletes the database fails partway (`stuck` is
/// a stored entry whose update and delete the backend's test has made
/// fail) write nothing either: not the entries before it, not their
/// changes, not a revision.
pub(crate) async fn update_and_delete_batch_failures_write_nothing(
    store: Arc<dyn Store>,
    stuck: &str,
) {
    let names: Vec<String> = (1..=100).map(|i| format!("u{i}")).collect();
    for name in &names {
        store.create_entry(simple_entry(name)).await.unwrap();
    }
    let base = store.revision().await.unwrap();
    let before = store.list_entries().await.unwrap().entries;

    let mut updates: Vec<Entry> = names
        .iter()
        .map(|n| {
            let mut e = simple_entry(n);
            e.hint = "changed".into();
            e
        })
        .collect();
    updates.insert(60, simple_entry(stuck));
    match store.update_entries(updates).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("want the update batch to fail with a backend error, got {other:?}"),
    }
    let mut ids: Vec<EntryId> = names.iter().map(|n| id(n)).collect();
    ids.insert(60, id(stuck));
    match store.delete_entries(&ids).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("want the delete batch to fail with a backend error, got {other:?}"),
    }
    assert_eq!(store.revision().await.unwrap(), base);
    assert!(store.changes_since(base, 10).await.unwrap().is_empty());
    assert_eq!(store.list_entries().await.unwrap().entries, before);
}
