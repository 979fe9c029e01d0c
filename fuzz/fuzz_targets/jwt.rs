//! JWT-SVIDs: arbitrary strings, and one-byte edits of a valid token.
//! Validation never panics, and no token but the one minted validates.
//! The body is `sigil_fuzz::targets::jwt::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::jwt::run(data));
