//! The selector sets the matching benches run on: sigil-types' scan
//! (`benches/types.rs`) and sigil-agent's selector index
//! (`sigil-agent/benches/matching.rs`, which includes this file by `#[path]`),
//! so that both measure the same sets and the same caller.

use sigil_types::Selectors;

/// The set sizes both benches run.
pub(crate) const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

/// The selectors of entry `i`: 1 to 3 over uid, namespace and service
/// account values, so that a few entries match any given caller and many
/// share a namespace or an account.
pub(crate) fn entry_selectors(i: usize) -> Selectors {
    let mut s = vec![format!("unix:uid:{}", i % 5000)];
    if i.is_multiple_of(2) {
        s.push(format!("k8s:ns:ns-{}", i % 97));
    }
    if i.is_multiple_of(3) {
        s.push(format!("k8s:sa:sa-{}", i % 31));
    }
    Selectors::parse_all(s).unwrap()
}

/// The caller's selectors: one uid, namespace and account of the sets,
/// among others no entry holds.
pub(crate) fn caller() -> Selectors {
    Selectors::parse_all([
        "unix:uid:42",
        "unix:gid:42",
        "unix:user:svc",
        "k8s:ns:ns-42",
        "k8s:sa:sa-11",
    ])
    .unwrap()
}
