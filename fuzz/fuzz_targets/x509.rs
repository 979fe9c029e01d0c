//! X.509 certificates and chains: arbitrary DER, and one-byte edits of a
//! valid X509-SVID. The parsers never panic, and an edited SVID never
//! verifies against the CA that signed the original.
//! The body is `sigil_fuzz::targets::x509::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::x509::run(data));
