//! Finding a Workload API caller's entries among those an agent holds:
//! through the snapshot's selector index (`Entries::matching`), which every
//! Workload API and SDS call and, for every open stream, every change of
//! what the agent serves runs.
//!
//! Baseline (in the same run): the pass over every entry the agent made
//! before the index (`Entries::matching_by_scan`), on the same entries.
//!
//! `cargo bench -p sigil-agent --bench matching`

#![allow(
    clippy::unwrap_used,
    missing_docs,
    reason = "benchmark setup: a failure is a broken benchmark, reported by the panic"
)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sigil_agent::core::Entries;
use sigil_types::{Entry, SpiffeId};

#[path = "../../sigil-types/benches/common/selector_sets.rs"]
mod selector_sets;

/// `n` entries with the selector sets of the sigil-types scan bench
/// ([`selector_sets::entry_selectors`]), so that a few match any given
/// caller and many share a namespace or account.
fn entries(n: usize) -> Entries {
    let parent = "spiffe://example.org/agent".parse::<SpiffeId>().unwrap();
    (0..n)
        .map(|i| {
            let mut e = Entry::new(
                format!("e{i}").parse().unwrap(),
                format!("spiffe://example.org/w{i}")
                    .parse::<SpiffeId>()
                    .unwrap(),
                parent.clone(),
                selector_sets::entry_selectors(i),
            );
            e.created_at = i as i64;
            Arc::new(e)
        })
        .collect()
}

fn matching(c: &mut Criterion) {
    let caller = selector_sets::caller();
    let mut g = c.benchmark_group("agent_matching");
    for n in selector_sets::SIZES {
        let set = entries(n);
        assert_eq!(
            set.matching(&caller).len(),
            set.matching_by_scan(&caller).len()
        );
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("index", n), &set, |b, set| {
            b.iter(|| set.matching(black_box(&caller)).len())
        });
        g.bench_with_input(BenchmarkId::new("baseline_scan", n), &set, |b, set| {
            b.iter(|| set.matching_by_scan(black_box(&caller)).len())
        });
    }
    g.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
