//! The bodies of the fuzz targets, one module each: `run` takes one input.
//! The libFuzzer binaries in `fuzz_targets/` call them, and the stable test
//! `sigil`'s `tests/it/fuzz_replay.rs` replays `fuzz/corpus/<target>/` through them.

pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod csr;
pub mod entry_proto;
pub mod jwt;
pub mod proto;
pub mod selector;
pub mod spiffe_id;
pub mod x509;

/// A target's body: runs one input, panics only when a property breaks.
pub type Body = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus/`) and body.
pub const ALL: &[(&str, Body)] = &[
    ("bundle", bundle::run),
    ("cgroup", cgroup::run),
    ("config", config::run),
    ("csr", csr::run),
    ("entry_proto", entry_proto::run),
    ("jwt", jwt::run),
    ("proto", proto::run),
    ("selector", selector::run),
    ("spiffe_id", spiffe_id::run),
    ("x509", x509::run),
];
