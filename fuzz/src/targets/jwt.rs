//! JWT-SVIDs: arbitrary strings, and one-byte edits of a valid token.
//! Validation never panics, and no token but the one minted validates.

use super::super::{SAMPLES, mutate, now};
use sigil_svid::jwt::{parse_jwt_unverified, validate_jwt};

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let samples = &*SAMPLES;
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_jwt_unverified(text);
        if validate_jwt(text, "db", &samples.jwt_keys, now()).is_ok() {
            assert_eq!(text, samples.jwt, "a token sigil never minted validated");
        }
    }
    let Some(edited) = mutate(samples.jwt.as_bytes(), data) else {
        return;
    };
    let Ok(edited) = String::from_utf8(edited) else {
        return;
    };
    if edited == samples.jwt {
        return;
    }
    let _ = parse_jwt_unverified(&edited);
    let verdict = validate_jwt(&edited, "db", &samples.jwt_keys, now());
    assert!(verdict.is_err(), "an edited token validated: {edited}");
}
