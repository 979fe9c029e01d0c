//! SPIFFE ID and selector parsing, and selector matching against a large
//! entry set: the scan the agent's Workload API runs on every call (every
//! entry whose selectors are a subset of the caller's).
//!
//! Baseline (in the same run): the same scan comparing one pre-hashed `u64`
//! per entry, which is what any matcher must at least touch.
//!
//! `cargo bench -p sigil-types --bench types`

#![allow(
    clippy::unwrap_used,
    missing_docs,
    reason = "benchmark setup: a failure is a broken benchmark, reported by the panic"
)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sigil_types::{Selector, Selectors, SpiffeId, TrustDomain};

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    let short = "spiffe://example.org/web";
    let long =
        "spiffe://prod.eu-west-1.example.org/ns/payments/sa/api-gateway/cluster/eks-blue/pod/7f9c";
    g.bench_function("spiffe_id_short", |b| {
        b.iter(|| black_box(short).parse::<SpiffeId>().unwrap())
    });
    g.bench_function("spiffe_id_long", |b| {
        b.iter(|| black_box(long).parse::<SpiffeId>().unwrap())
    });
    g.bench_function("trust_domain", |b| {
        b.iter(|| TrustDomain::new(black_box("prod.eu-west-1.example.org")).unwrap())
    });
    g.bench_function("selector", |b| {
        b.iter(|| {
            black_box("k8s:pod-label:app:web")
                .parse::<Selector>()
                .unwrap()
        })
    });
    g.finish();
}

#[path = "common/selector_sets.rs"]
mod selector_sets;

/// `n` entries' selector sets ([`selector_sets::entry_selectors`]).
fn entry_set(n: usize) -> Vec<Selectors> {
    (0..n).map(selector_sets::entry_selectors).collect()
}

fn matching(c: &mut Criterion) {
    let caller = selector_sets::caller();
    let mut g = c.benchmark_group("selector_match_scan");
    for n in selector_sets::SIZES {
        let set = entry_set(n);
        let hashed: Vec<u64> = (0..n as u64).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("subset_of", n), &set, |b, set| {
            b.iter(|| {
                set.iter()
                    .filter(|s| s.is_subset_of(black_box(&caller)))
                    .count()
            })
        });
        g.bench_with_input(BenchmarkId::new("baseline_u64_eq", n), &hashed, |b, h| {
            b.iter(|| h.iter().filter(|x| **x == black_box(42)).count())
        });
    }
    g.finish();
}

criterion_group!(benches, parse, matching);
criterion_main!(benches);
