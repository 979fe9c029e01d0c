//! The fuzz targets on stable Rust: every target body of `fuzz/` (shared with
//! the libFuzzer binaries through `fuzz/src/targets/`) is compiled here and
//! replays the seeds committed under `fuzz/corpus/<target>/`, plus the valid
//! samples the targets mint. A target whose code no longer compiles against
//! the crates, or whose property breaks on a seed, fails this test, so the
//! fuzz crate cannot rot although CI has no nightly toolchain.

use std::path::PathBuf;

#[path = "../../../../fuzz/src/lib.rs"]
#[allow(
    unreachable_pub,
    dead_code,
    reason = "the fuzz crate's library, compiled as a module of this test"
)]
mod sigil_fuzz;

use sigil_fuzz::{SAMPLES, targets};

/// Seeds per target below which the corpus counts as missing.
const MIN_SEEDS: usize = 4;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

#[test]
fn every_target_replays_its_committed_corpus() {
    for (name, run) in targets::ALL {
        let dir = corpus_dir(name);
        let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        seeds.sort();
        assert!(
            seeds.len() >= MIN_SEEDS,
            "{name}: {} seeds in {}, want at least {MIN_SEEDS}",
            seeds.len(),
            dir.display()
        );
        for seed in &seeds {
            let data = std::fs::read(seed).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: seed {} broke", seed.display());
        }
    }
}

#[test]
fn every_target_binary_has_a_body_and_a_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let mut bins: Vec<String> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| !matches!(*n, "sigil-fuzz" | "sigil_fuzz"))
        .map(str::to_owned)
        .collect();
    bins.sort();
    let mut bodies: Vec<String> = targets::ALL.iter().map(|(n, _)| (*n).to_owned()).collect();
    bodies.sort();
    assert_eq!(bins, bodies, "fuzz/Cargo.toml [[bin]]s vs targets::ALL");
    for name in &bins {
        let bin = std::fs::read_to_string(root.join(format!("fuzz_targets/{name}.rs"))).unwrap();
        assert!(
            bin.contains(&format!("sigil_fuzz::targets::{name}::run(data)")),
            "fuzz_targets/{name}.rs does not run its shared body"
        );
        assert!(corpus_dir(name).is_dir(), "no corpus for {name}");
    }
}

#[test]
fn valid_samples_pass_through_the_targets() {
    let samples = &*SAMPLES;
    targets::x509::run(&samples.leaf_der);
    targets::x509::run(&samples.ca_der);
    targets::csr::run(&samples.csr_der);
    targets::jwt::run(samples.jwt.as_bytes());
    targets::bundle::run(samples.bundle_json.as_bytes());
    targets::spiffe_id::run(samples.id.as_str().as_bytes());
    targets::spiffe_id::run(samples.td.name().as_bytes());
}
