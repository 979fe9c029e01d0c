//! PKCS#10 CSRs: arbitrary bytes, and one-byte edits of a valid CSR. Parsing
//! never panics; an edited CSR is accepted only if it still carries exactly
//! the original public key (and then its signature still verified).
//! The body is `sigil_fuzz::targets::csr::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::csr::run(data));
