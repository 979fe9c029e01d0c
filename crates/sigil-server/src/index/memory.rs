//! Where the index's bytes go (#15 item 2; docs/benchmarks.md, "Server
//! memory per entry"): the heap bytes of an index of N entries, per entry,
//! broken down by structure, counted by the test binary's allocator
//! (`crate::test_alloc`) on this test's thread, against the same entries'
//! protobuf encoding, measured in the same run.
//!
//! Print the breakdown with
//! `cargo test -p sigil-server --lib index::memory -- --nocapture`.

use std::sync::Arc;

use prost::Message as _;
use sigil_store::EntrySnapshot;
use sigil_types::{Entry, Selectors, SpiffeId};

use super::{EntryIndex, IndexState};
use crate::test_alloc::{Held, Meter, held};

/// An entry as the load generator registers them (sigil-bench, `sample_entry`):
/// a random UUID entry ID, one selector of its own, parented round-robin to join
/// token agents.
fn bench_entry(i: usize, agents: &[SpiffeId]) -> Entry {
    let mut e = Entry::new(
        crate::registry::new_entry_id().unwrap(),
        format!("spiffe://example.org/bench/p/w{i}")
            .parse()
            .unwrap(),
        agents[i % agents.len()].clone(),
        Selectors::parse_all([format!("bench:id:p-{i}")]).unwrap(),
    );
    e.revision = i as u64 + 1;
    e.created_at = 1_700_000_000;
    e
}

/// An entry as the criterion bench of the index registers them
/// (benches/index.rs): Kubernetes-like, two selectors shared with many
/// other entries (97 namespaces, 5,000 UIDs).
fn k8s_entry(i: usize, agents: &[SpiffeId]) -> Entry {
    let mut e = Entry::new(
        format!("e{i:08}").parse().unwrap(),
        format!("spiffe://example.org/ns/ns-{}/sa/sa-{i}", i % 97)
            .parse()
            .unwrap(),
        agents[i % agents.len()].clone(),
        Selectors::parse_all([
            format!("unix:uid:{}", i % 5000),
            format!("k8s:ns:ns-{}", i % 97),
        ])
        .unwrap(),
    );
    e.revision = i as u64 + 1;
    e
}

fn agents(n: usize) -> Vec<SpiffeId> {
    (0..n)
        .map(|a| {
            format!("spiffe://example.org/sigil/agent/join_token/{a:016x}")
                .parse()
                .unwrap()
        })
        .collect()
}

/// The bytes of an index of `n` entries, by structure.
struct Breakdown {
    n: usize,
    /// The entries' protobuf encoding (what an agent receives), summed.
    encoded: usize,
    /// The same entries in a plain `Vec<Entry>`.
    plain: Held,
    /// The whole index.
    total: Held,
    /// What dropping each structure in turn frees.
    parts: Vec<(&'static str, Held)>,
}

fn measure(n: usize, agent_count: usize, make: fn(usize, &[SpiffeId]) -> Entry) -> Breakdown {
    let agents = agents(agent_count);
    let encoded = (0..n)
        .map(|i| sigil_proto::server::v1::Entry::from(&make(i, &agents)).encoded_len())
        .sum();

    let start = held();
    let entries: Vec<Entry> = (0..n).map(|i| make(i, &agents)).collect();
    let plain = held() - start;
    drop(entries);

    let start = held();
    let entries: Vec<Entry> = (0..n).map(|i| make(i, &agents)).collect();
    let idx = EntryIndex::new(EntrySnapshot {
        entries,
        revision: n as u64,
    });
    let total = held() - start;
    assert_eq!(idx.len(), n);

    // Each structure dropped in turn: what it alone holds. Strings shared
    // with a structure still alive are not freed, so each part is the cost
    // of that structure on top of the others.
    let mut m = Meter::new();
    let EntryIndex { state, revision } = idx;
    let IndexState {
        revision: _,
        entries,
        by_parent,
        by_spiffe_id,
        selectors,
        aliases,
        subs,
    } = state.into_inner().unwrap();
    drop((revision, aliases, subs));
    m.freed("revision channel, aliases, subscriptions");
    drop(by_spiffe_id);
    m.freed("by SPIFFE ID (HashMap<SpiffeId, Ids>)");
    drop(by_parent);
    m.freed("by parent (HashMap<SpiffeId, Ids>)");
    drop(selectors);
    m.freed("selector table (HashMap<Selector, u32>)");
    let mut kept: Vec<Arc<Entry>> = entries.values().cloned().collect();
    let kept_vec = held() - m.at;
    m.at = held();
    drop(entries);
    m.freed("by entry ID (BTreeMap<EntryId, Arc<Entry>>)");
    for e in &mut kept {
        Arc::get_mut(e).unwrap().selectors = Selectors::new();
    }
    m.freed("selectors (each entry's set)");
    drop(kept);
    let size = std::mem::size_of::<Entry>() + 16;
    let structs = Held {
        requested: (n * size) as i64,
        chunks: n as i64 * crate::test_alloc::chunk(size),
    };
    let rest = m.at - held() - kept_vec - structs;
    let mut parts = m.parts;
    parts.push(("Arc<Entry> (the struct)", structs));
    parts.push(("entry ID, SPIFFE ID, parent ID text", rest));
    Breakdown {
        n,
        encoded,
        plain,
        total,
        parts,
    }
}

impl Breakdown {
    fn per_entry(&self, h: Held) -> (f64, f64) {
        h.per(self.n)
    }

    /// Heap bytes (malloc blocks) per entry ÷ encoded bytes per entry.
    fn ratio(&self) -> f64 {
        self.total.chunks as f64 / self.encoded as f64
    }

    fn print(&self, shape: &str) {
        let (req, chunks) = self.per_entry(self.total);
        let (preq, pchunks) = self.per_entry(self.plain);
        println!(
            "{shape}, {} entries: index {req:.0} B/entry asked, {chunks:.0} B/entry in malloc blocks \
             ({:.2}x the protobuf encoding, {:.0} B/entry); a plain Vec<Entry> {preq:.0} / {pchunks:.0} B/entry",
            self.n,
            self.ratio(),
            self.encoded as f64 / self.n as f64,
        );
        let mut sum = Held::default();
        for (name, h) in &self.parts {
            let (r, c) = self.per_entry(*h);
            println!("  {r:>7.1} {c:>7.1}  {name}");
            sum = Held {
                requested: sum.requested + h.requested,
                chunks: sum.chunks + h.chunks,
            };
        }
        let (r, c) = self.per_entry(self.total - sum);
        println!("  {r:>7.1} {c:>7.1}  not accounted for above");
    }
}

/// Most heap bytes (malloc blocks) the index may hold per entry, as a
/// multiple of the entry's protobuf encoding, before CI fails: about twice
/// what it holds (3.77x for the load generator's entries, 3.89x for the
/// Kubernetes-like ones at 100,000 entries); it held 10.5x and 12.1x before
/// the compact representation of #15 item 2 (docs/benchmarks.md, "Server
/// memory per entry"). A ratio of two counts of one run, not a time; the
/// counts do not depend on the machine's load.
const MAX_BYTES_PER_ENCODED_BYTE: f64 = 7.5;

#[test]
fn index_memory_per_entry() {
    for (shape, make) in [
        (
            "load generator shape",
            bench_entry as fn(usize, &[SpiffeId]) -> Entry,
        ),
        ("Kubernetes-like shape", k8s_entry),
    ] {
        let b = measure(100_000, 1000, make);
        b.print(shape);
        assert!(
            b.ratio() <= MAX_BYTES_PER_ENCODED_BYTE,
            "the index holds {:.2}x its entries' protobuf encoding ({shape}; more than \
             {MAX_BYTES_PER_ENCODED_BYTE}x): a structure grew a copy of each entry, its IDs or its \
             selectors? Run `cargo test -p sigil-server --lib index::memory -- --nocapture` \
             for the breakdown, and see docs/benchmarks.md",
            b.ratio()
        );
    }
}

/// The inline ID of the maps' values costs nothing over the ID itself.
#[test]
fn a_set_of_ids_is_as_small_as_one_id() {
    assert_eq!(
        std::mem::size_of::<super::Ids>(),
        std::mem::size_of::<sigil_types::EntryId>()
    );
}
