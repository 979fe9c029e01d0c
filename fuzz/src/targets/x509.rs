//! X.509 certificates and chains: arbitrary DER, and one-byte edits of a
//! valid X509-SVID. The parsers never panic, and an edited SVID never
//! verifies against the CA that signed the original.

use super::super::{SAMPLES, mutate, now};
use sigil_svid::x509::{
    cert_info, check_leaf_rules, split_der_certs, svid_attributes, verify_svid,
};

fn exercise(der: &[u8], ca: &[u8]) {
    let _ = cert_info(der);
    let _ = check_leaf_rules(der);
    let _ = svid_attributes(der);
    if let Ok(certs) = split_der_certs(der) {
        let _ = verify_svid(&certs, &[ca.to_vec()], now());
    }
}

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let samples = &*SAMPLES;
    exercise(data, &samples.ca_der);
    let _ = verify_svid(
        &[data.to_vec()],
        std::slice::from_ref(&samples.ca_der),
        now(),
    );
    let _ = verify_svid(
        &[samples.leaf_der.clone(), data.to_vec()],
        std::slice::from_ref(&samples.ca_der),
        now(),
    );
    let _ = verify_svid(
        std::slice::from_ref(&samples.leaf_der),
        &[data.to_vec()],
        now(),
    );
    let Some(edited) = mutate(&samples.leaf_der, data) else {
        return;
    };
    if edited == samples.leaf_der {
        return;
    }
    exercise(&edited, &samples.ca_der);
    let verdict = verify_svid(&[edited], std::slice::from_ref(&samples.ca_der), now());
    assert!(verdict.is_err(), "an edited SVID verified: {verdict:?}");
}
