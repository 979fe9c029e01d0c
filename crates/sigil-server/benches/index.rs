//! The entry index: building it, the authorized-set computation behind every
//! sync, signing request and JWT mint, selector-filtered listing, and
//! applying one change, over registries of up to 100,000 entries.
//!
//! Baseline (in the same run): cloning the same number of `Arc<Entry>` into
//! a `Vec`, the least work that hands out a set of that size.
//!
//! `cargo bench -p sigil-server --bench index`

#![allow(
    clippy::unwrap_used,
    missing_docs,
    reason = "benchmark setup: a failure is a broken benchmark, reported by the panic"
)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sigil_server::index::{EntryFilter, EntryIndex, SelectorMatch};
use sigil_store::{Change, ChangeKind, EntrySnapshot};
use sigil_types::{Entry, Selectors, SpiffeId};

const TD: &str = "spiffe://example.org";

fn agent_id(a: usize) -> SpiffeId {
    format!("{TD}/sigil/agent/join_token/{a:016x}")
        .parse()
        .unwrap()
}

fn entry(i: usize, parent: &SpiffeId) -> Entry {
    Entry {
        id: format!("e{i:08}").parse().unwrap(),
        spiffe_id: format!("{TD}/ns/ns-{}/sa/sa-{i}", i % 97).parse().unwrap(),
        parent_id: parent.clone(),
        selectors: Selectors::parse_all([
            format!("unix:uid:{}", i % 5000),
            format!("k8s:ns:ns-{}", i % 97),
        ])
        .unwrap(),
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec![],
        federates_with: vec![],
        attributes: vec![],
        admin: false,
        downstream: false,
        hint: String::new(),
        expires_at: None,
        revision: i as u64 + 1,
        created_at: 0,
    }
}

/// `total` entries spread over `agents` agents, plus `big` entries under
/// agent `agents` (the one whose set is measured).
fn registry(total: usize, agents: usize, big: usize) -> Vec<Entry> {
    let ids: Vec<SpiffeId> = (0..=agents).map(agent_id).collect();
    let mut v: Vec<Entry> = (0..total).map(|i| entry(i, &ids[i % agents])).collect();
    v.extend((total..total + big).map(|i| entry(i, &ids[agents])));
    v
}

fn index_of(entries: Vec<Entry>) -> EntryIndex {
    let revision = entries.len() as u64;
    EntryIndex::new(EntrySnapshot { entries, revision })
}

fn build(c: &mut Criterion) {
    let entries = registry(100_000, 1000, 0);
    let mut g = c.benchmark_group("index_build");
    g.sample_size(10);
    g.throughput(Throughput::Elements(entries.len() as u64));
    g.bench_function("100k_entries", |b| {
        b.iter(|| index_of(black_box(entries.clone())))
    });
    g.finish();
}

fn authorized(c: &mut Criterion) {
    let none = Selectors::new();
    let mut g = c.benchmark_group("authorized_set");
    // An agent holding `big` entries in a registry of 100,000 others spread
    // over 1,000 agents (100 each, the design's sizing).
    for big in [100usize, 10_000, 100_000] {
        let idx = index_of(registry(100_000, 1000, big));
        let me = agent_id(1000);
        assert_eq!(idx.authorized(&me, &none).entries.len(), big);
        let arcs: Vec<Arc<Entry>> = (0..big)
            .map(|i| Arc::new(entry(i, &me)))
            .collect::<Vec<_>>();
        g.throughput(Throughput::Elements(big as u64));
        g.bench_with_input(BenchmarkId::new("agent_entries", big), &big, |b, _| {
            b.iter(|| idx.authorized(black_box(&me), &none))
        });
        g.bench_with_input(
            BenchmarkId::new("baseline_clone_arcs", big),
            &arcs,
            |b, arcs| b.iter(|| black_box(arcs).to_vec()),
        );
    }
    g.finish();
}

fn list(c: &mut Criterion) {
    let idx = index_of(registry(100_000, 1000, 0));
    let caller = Selectors::parse_all(["unix:uid:42", "k8s:ns:ns-42", "unix:gid:42"]).unwrap();
    let filter = EntryFilter {
        selectors: Some((caller, SelectorMatch::Subset)),
        ..EntryFilter::default()
    };
    let mut g = c.benchmark_group("list_selector_subset");
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("100k_entries", |b| {
        b.iter(|| idx.list(black_box(&filter), None, 5000))
    });
    g.finish();
}

fn apply(c: &mut Criterion) {
    let idx = index_of(registry(100_000, 1000, 0));
    let parent = agent_id(7);
    let mut revision = idx.revision();
    let mut g = c.benchmark_group("apply_change");
    g.throughput(Throughput::Elements(1));
    g.bench_function("upsert_in_100k", |b| {
        b.iter(|| {
            revision += 1;
            let mut e = entry(1_000_000, &parent);
            e.revision = revision;
            idx.apply(Change {
                revision,
                kind: ChangeKind::EntryUpserted(e),
            });
        })
    });
    g.finish();
}

criterion_group!(benches, build, authorized, list, apply);
criterion_main!(benches);
