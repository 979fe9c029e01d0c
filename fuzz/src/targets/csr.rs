//! PKCS#10 CSRs: arbitrary bytes, and one-byte edits of a valid CSR. Parsing
//! never panics; an edited CSR is accepted only if it still carries exactly
//! the original public key (and then its signature still verified).

use super::super::{SAMPLES, mutate};
use sigil_svid::x509::csr_public_key;

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let _ = csr_public_key(data);
    let samples = &*SAMPLES;
    let Some(edited) = mutate(&samples.csr_der, data) else {
        return;
    };
    if edited == samples.csr_der {
        return;
    }
    if let Ok(spki) = csr_public_key(&edited) {
        let original = csr_public_key(&samples.csr_der).ok();
        assert_eq!(Some(spki), original, "an edited CSR yielded another key");
    }
}
