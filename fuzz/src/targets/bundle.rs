//! SPIFFE bundles (JWKS documents): arbitrary JSON text, and one-byte edits
//! of a valid bundle. Parsing never panics, and an accepted bundle
//! serializes to a document that parses back to the same bundle.

use super::super::{SAMPLES, mutate};
use sigil_svid::bundle::Bundle;

fn round_trip(text: &[u8]) {
    let samples = &*SAMPLES;
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(bundle) = Bundle::from_json(samples.td.clone(), text) else {
        return;
    };
    let json = bundle.to_json();
    let again = Bundle::from_json(samples.td.clone(), &json);
    assert_eq!(
        again.as_ref().ok(),
        Some(&bundle),
        "bundle changed across a round trip: {json}"
    );
}

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    round_trip(data);
    if let Some(edited) = mutate(SAMPLES.bundle_json.as_bytes(), data) {
        round_trip(&edited);
    }
}
