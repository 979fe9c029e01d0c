//! Selectors and selector sets from arbitrary text: parsing never panics,
//! accepted selectors print and re-parse to themselves, and a set built from
//! several lines is sorted, free of duplicates and a subset of itself.
//! The body is `sigil_fuzz::targets::selector::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::selector::run(data));
