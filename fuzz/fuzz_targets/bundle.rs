//! SPIFFE bundles (JWKS documents): arbitrary JSON text, and one-byte edits
//! of a valid bundle. Parsing never panics, and an accepted bundle
//! serializes to a document that parses back to the same bundle.
//! The body is `sigil_fuzz::targets::bundle::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::bundle::run(data));
