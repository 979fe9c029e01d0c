//! SPIFFE IDs and trust domains from arbitrary text: parsing never panics and
//! every accepted value is canonical (re-parses to itself, lowercase scheme
//! and trust domain, no empty segments, at most 2048 bytes).
//! The body is `sigil_fuzz::targets::spiffe_id::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::spiffe_id::run(data));
