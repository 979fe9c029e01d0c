//! The index against a plain list of its entries: after any sequence of
//! upserts and deletes, its maps, its shared selector table, the authorized
//! sets and the duplicate check say what a scan of the list says. Guards
//! the compact representation (#15 item 2): one entry ID held inline per
//! key, parent IDs, SPIFFE IDs and selectors shared between entries.

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;
use sigil_store::{Change, ChangeKind, EntrySnapshot};
use sigil_types::{Entry, EntryId, Selector, Selectors, SpiffeId};

use super::EntryIndex;

const TD: &str = "spiffe://td";
const SERVER: &str = "spiffe://td/sigil/server";
const AGENTS: [&str; 2] = [
    "spiffe://td/sigil/agent/join_token/a1",
    "spiffe://td/sigil/agent/join_token/b2",
];
const SELECTORS: [&str; 4] = ["node:region:eu", "node:zone:a", "unix:uid:1", "unix:uid:2"];

#[derive(Debug, Clone)]
enum Op {
    /// Entry `id` with SPIFFE ID `w<spiffe>`, parent `parent` (0-1 agents,
    /// 2 the server: a node alias, else `w<parent - 3>`), the selectors of
    /// the bits of `sels`.
    Upsert {
        id: u8,
        spiffe: u8,
        parent: u8,
        sels: u8,
    },
    Delete(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..10, 0u8..5, 0u8..8, 1u8..16).prop_map(|(id, spiffe, parent, sels)| Op::Upsert {
            id,
            spiffe,
            parent,
            sels
        }),
        1 => (0u8..10).prop_map(Op::Delete),
    ]
}

fn entry(id: u8, spiffe: u8, parent: u8, sels: u8) -> Entry {
    let parent = match parent {
        0 | 1 => AGENTS[parent as usize].to_owned(),
        2 => SERVER.to_owned(),
        p => format!("{TD}/w{}", p - 3),
    };
    let mut e = Entry::new(
        format!("e{id}").parse().unwrap(),
        format!("{TD}/w{spiffe}").parse().unwrap(),
        parent.parse().unwrap(),
        Selectors::parse_all(
            SELECTORS
                .iter()
                .enumerate()
                .filter(|(i, _)| sels & (1 << i) != 0)
                .map(|(_, s)| s),
        )
        .unwrap(),
    );
    e.revision = u64::from(id) + 1;
    e
}

/// The entries an agent is authorized for, by a scan to a fixpoint.
fn scan_authorized(
    model: &BTreeMap<EntryId, Entry>,
    agent: &SpiffeId,
    node: &Selectors,
) -> HashSet<EntryId> {
    let mut roots: HashSet<SpiffeId> = HashSet::from([agent.clone()]);
    roots.extend(
        model
            .values()
            .filter(|e| e.is_node_alias() && e.selectors.is_subset_of(node))
            .map(|e| e.spiffe_id.clone()),
    );
    let mut out = HashSet::new();
    loop {
        let before = out.len();
        for e in model.values() {
            if !e.is_node_alias() && roots.contains(&e.parent_id) && out.insert(e.id.clone()) {
                roots.insert(e.spiffe_id.clone());
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

fn check(idx: &EntryIndex, model: &BTreeMap<EntryId, Entry>) -> Result<(), TestCaseError> {
    prop_assert_eq!(idx.len(), model.len());
    for (id, e) in model {
        let got = idx.get(id);
        prop_assert_eq!(got.as_deref(), Some(e));
    }
    {
        let state = idx.read();
        let mut by_parent: HashMap<SpiffeId, Vec<EntryId>> = HashMap::new();
        let mut by_spiffe_id: HashMap<SpiffeId, Vec<EntryId>> = HashMap::new();
        let mut selectors: HashMap<Selector, u32> = HashMap::new();
        for e in model.values() {
            by_parent
                .entry(e.parent_id.clone())
                .or_default()
                .push(e.id.clone());
            by_spiffe_id
                .entry(e.spiffe_id.clone())
                .or_default()
                .push(e.id.clone());
            for s in &e.selectors {
                *selectors.entry(s.clone()).or_default() += 1;
            }
        }
        let listed = |m: &HashMap<SpiffeId, super::Ids>| -> HashMap<SpiffeId, Vec<EntryId>> {
            m.iter()
                .map(|(k, ids)| {
                    assert_eq!(ids.len(), ids.iter().count());
                    // `One` whenever one: the compact form is kept.
                    assert_eq!(ids.len() == 1, matches!(ids, super::Ids::One(_)));
                    (k.clone(), ids.iter().cloned().collect())
                })
                .collect()
        };
        prop_assert_eq!(listed(&state.by_parent), by_parent);
        prop_assert_eq!(listed(&state.by_spiffe_id), by_spiffe_id);
        prop_assert_eq!(&state.selectors, &selectors);
    }
    for agent in AGENTS {
        let agent: SpiffeId = agent.parse().unwrap();
        for node in [
            Selectors::new(),
            Selectors::parse_all(["node:region:eu"]).unwrap(),
            Selectors::parse_all(["node:region:eu", "node:zone:a"]).unwrap(),
        ] {
            let want = scan_authorized(model, &agent, &node);
            let got = idx.authorized(&agent, &node);
            let got_ids: HashSet<EntryId> = got.entries.keys().cloned().collect();
            prop_assert_eq!(&got_ids, &want);
            for id in model.keys() {
                prop_assert_eq!(
                    idx.authorized_entry(id, &agent, &node).is_some(),
                    want.contains(id)
                );
            }
        }
    }
    for e in model.values() {
        let mut twin = e.clone();
        twin.id = "twin".parse().unwrap();
        prop_assert_eq!(idx.duplicate_of(&twin), Some(e.id.clone()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_index_says_what_a_scan_says(
        initial in proptest::collection::vec(op(), 0..12),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut model: BTreeMap<EntryId, Entry> = BTreeMap::new();
        let apply = |model: &mut BTreeMap<EntryId, Entry>, op: &Op| match *op {
            Op::Upsert { id, spiffe, parent, sels } => {
                let e = entry(id, spiffe, parent, sels);
                // One entry per (parent, SPIFFE ID, selectors), as the
                // registry keeps them; a write that would break it is skipped.
                let dup = model.values().any(|o| {
                    o.id != e.id
                        && o.parent_id == e.parent_id
                        && o.spiffe_id == e.spiffe_id
                        && o.selectors == e.selectors
                });
                if dup {
                    return None;
                }
                model.insert(e.id.clone(), e.clone());
                Some(ChangeKind::EntryUpserted(e))
            }
            Op::Delete(id) => {
                let id: EntryId = format!("e{id}").parse().unwrap();
                let e = model.remove(&id)?;
                Some(ChangeKind::EntryDeleted(e))
            }
        };
        for op in &initial {
            apply(&mut model, op);
        }
        let idx = EntryIndex::new(EntrySnapshot {
            entries: model.values().cloned().collect(),
            revision: 1,
        });
        check(&idx, &model)?;
        for op in &ops {
            if let Some(kind) = apply(&mut model, op) {
                idx.apply(Change {
                    revision: idx.revision() + 1,
                    kind,
                });
            }
            check(&idx, &model)?;
        }
    }
}
