//! Hostile input to sigil-svid's parsers and verifiers (the proptest versions
//! of `fuzz/fuzz_targets/{csr,x509,jwt,bundle}.rs`): arbitrary bytes and
//! text, and one-byte edits (flip, insert, delete) of valid samples. Nothing
//! panics, errors carry a message, an edited CSR, X509-SVID or JWT-SVID is
//! never accepted, and an accepted bundle round-trips.

use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use serde_json::{Value, json};
use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_svid::jwt::{JwtAuthority, parse_jwt_unverified, validate_jwt};
use sigil_svid::keys::PrivateKey;
use sigil_svid::x509::{
    SvidRequest, X509Authority, cert_info, check_leaf_rules, csr_public_key, make_csr,
    split_der_certs, svid_attributes, verify_svid,
};
use sigil_types::SpiffeId;

use crate::support::{HOUR, now, td};

/// Cases per property: bounded so that CI stays fast.
const CASES: u32 = 256;

/// Valid samples, minted once for all properties.
struct Samples {
    ca_der: Vec<u8>,
    leaf_der: Vec<u8>,
    csr_der: Vec<u8>,
    spki: Vec<u8>,
    jwt: String,
    jwt_keys: BundleSet,
    bundle: Bundle,
    bundle_json: String,
}

static SAMPLES: LazyLock<Samples> = LazyLock::new(|| {
    sigil_svid::install_crypto_provider();
    let id: SpiffeId = "spiffe://example.org/ns/web".parse().unwrap();
    let ca = X509Authority::generate(&td(), 24 * HOUR, now()).unwrap();
    let key = PrivateKey::generate_p256().unwrap();
    let attributes = [("k8s.namespace".to_owned(), "web".to_owned())];
    let req = SvidRequest {
        attributes: &attributes,
        ..SvidRequest::new(&id, HOUR)
    };
    let leaf_der = ca
        .sign_svid(&req, &key.public_key_spki_der(), now())
        .unwrap();
    let jwt_auth = JwtAuthority::generate(24 * HOUR, now()).unwrap();
    let jwt = jwt_auth
        .sign(&id, &["db".to_owned()], Duration::from_secs(300), now())
        .unwrap();
    let mut bundle = Bundle::new(td());
    bundle.x509_authorities.push(ca.cert_der().to_vec());
    bundle.jwt_authorities.push(jwt_auth.public_jwk());
    bundle.sequence = 7;
    bundle.refresh_hint = Some(300);
    let bundle_json = bundle.to_json();
    let mut jwt_keys = BundleSet::default();
    jwt_keys.insert(bundle.clone());
    Samples {
        ca_der: ca.cert_der().to_vec(),
        leaf_der,
        csr_der: make_csr(&key).unwrap(),
        spki: key.public_key_spki_der(),
        jwt,
        jwt_keys,
        bundle,
        bundle_json,
    }
});

/// One edit of `sample`: flip (xor with a non-zero byte), insert or delete a
/// byte at `pos` (modulo the length).
fn mutate(sample: &[u8], op: u8, pos: usize, value: u8) -> Vec<u8> {
    let mut out = sample.to_vec();
    let pos = pos % out.len().max(1);
    match op % 3 {
        0 => {
            if let Some(b) = out.get_mut(pos) {
                *b ^= value.max(1);
            }
        }
        1 => out.insert(pos.min(out.len()), value),
        _ => {
            if pos < out.len() {
                out.remove(pos);
            }
        }
    }
    out
}

/// An edit as proptest values: operation, position, byte.
fn edit() -> impl Strategy<Value = (u8, usize, u8)> {
    (any::<u8>(), any::<usize>(), any::<u8>())
}

/// Runs every certificate parser on `der`; none may panic, and errors must
/// say something.
fn parse_cert_everywhere(der: &[u8]) {
    for err in [
        cert_info(der).err(),
        check_leaf_rules(der).err(),
        svid_attributes(der).err(),
    ]
    .into_iter()
    .flatten()
    {
        assert!(!err.to_string().is_empty());
    }
    if let Ok(certs) = split_der_certs(der) {
        let _ = verify_svid(&certs, std::slice::from_ref(&SAMPLES.ca_der), now());
    }
}

/// Arbitrary JSON values, small enough to shrink well.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JWK-shaped objects with members drawn from the ones a bundle parser
/// reads, holding wrong types and values as often as right ones.
fn jwk_like() -> impl Strategy<Value = Value> {
    let member = prop_oneof![
        Just("kty"),
        Just("use"),
        Just("kid"),
        Just("crv"),
        Just("x"),
        Just("y"),
        Just("n"),
        Just("e"),
        Just("x5c"),
    ];
    let value = prop_oneof![
        Just(json!("EC")),
        Just(json!("RSA")),
        Just(json!("OKP")),
        Just(json!("x509-svid")),
        Just(json!("jwt-svid")),
        Just(json!("P-256")),
        Just(json!("AQAB")),
        Just(json!([])),
        Just(json!(["AAAA"])),
        "[A-Za-z0-9_+/=-]{0,16}".prop_map(Value::from),
        json_value(),
    ];
    proptest::collection::btree_map(member, value, 0..8)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// Parses `text` as a bundle; an accepted bundle must re-serialize to JSON
/// that parses back to the same bundle.
fn assert_bundle_round_trips(text: &str) {
    match Bundle::from_json(td(), text) {
        Ok(bundle) => {
            let json = bundle.to_json();
            let again = Bundle::from_json(td(), &json).unwrap();
            assert_eq!(again, bundle, "round trip changed the bundle: {json}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn csr_parser_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Err(e) = csr_public_key(&bytes) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn edited_csrs_are_refused((op, pos, value) in edit()) {
        let edited = mutate(&SAMPLES.csr_der, op, pos, value);
        prop_assume!(edited != SAMPLES.csr_der);
        let got = csr_public_key(&edited);
        prop_assert!(got.is_err(), "an edited CSR was accepted");
    }

    #[test]
    fn certificate_parsers_survive_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        parse_cert_everywhere(&bytes);
        let chain = [bytes.clone()];
        prop_assert!(verify_svid(&chain, std::slice::from_ref(&SAMPLES.ca_der), now()).is_err());
        let chain = [SAMPLES.leaf_der.clone(), bytes.clone()];
        prop_assert!(verify_svid(&chain, std::slice::from_ref(&SAMPLES.ca_der), now()).is_err());
        prop_assert!(verify_svid(std::slice::from_ref(&SAMPLES.leaf_der), &[bytes], now()).is_err());
    }

    #[test]
    fn edited_svids_never_verify((op, pos, value) in edit()) {
        let edited = mutate(&SAMPLES.leaf_der, op, pos, value);
        prop_assume!(edited != SAMPLES.leaf_der);
        parse_cert_everywhere(&edited);
        let verdict = verify_svid(&[edited], std::slice::from_ref(&SAMPLES.ca_der), now());
        prop_assert!(verdict.is_err(), "an edited SVID verified: {:?}", verdict);
    }

    #[test]
    fn edited_ca_certificates_do_not_break_the_verifier((op, pos, value) in edit()) {
        let edited = mutate(&SAMPLES.ca_der, op, pos, value);
        prop_assume!(edited != SAMPLES.ca_der);
        parse_cert_everywhere(&edited);
        let verdict = verify_svid(std::slice::from_ref(&SAMPLES.leaf_der), &[edited], now());
        // An edit outside the CA's name and key (say in its validity) still
        // anchors the leaf: trust anchors are not signature-checked. The
        // parser must survive; when the leaf verifies, the ID is the leaf's.
        if let Ok(id) = verdict {
            prop_assert_eq!(id.as_str(), "spiffe://example.org/ns/web");
        }
    }

    #[test]
    fn jwt_validation_survives_arbitrary_text(text in prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_-]{0,40}(\\.[A-Za-z0-9_-]{0,40}){0,3}",
    ]) {
        let _ = parse_jwt_unverified(&text);
        let verdict = validate_jwt(&text, "db", &SAMPLES.jwt_keys, now());
        match verdict {
            Ok(_) => prop_assert_eq!(text, SAMPLES.jwt.clone()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn jwt_validation_survives_arbitrary_segments(
        header in json_value(),
        claims in json_value(),
        sig in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(&sig),
        );
        let _ = parse_jwt_unverified(&token);
        prop_assert!(validate_jwt(&token, "db", &SAMPLES.jwt_keys, now()).is_err());
    }

    #[test]
    fn edited_jwts_never_validate((op, pos, value) in edit()) {
        let edited = mutate(SAMPLES.jwt.as_bytes(), op, pos, value);
        prop_assume!(edited != SAMPLES.jwt.as_bytes());
        let edited = String::from_utf8_lossy(&edited).into_owned();
        let _ = parse_jwt_unverified(&edited);
        let verdict = validate_jwt(&edited, "db", &SAMPLES.jwt_keys, now());
        prop_assert!(verdict.is_err(), "an edited token validated: {}", edited);
    }

    #[test]
    fn bundle_parser_survives_arbitrary_json(doc in json_value()) {
        assert_bundle_round_trips(&doc.to_string());
    }

    #[test]
    fn bundle_parser_survives_arbitrary_keys(
        keys in proptest::collection::vec(jwk_like(), 0..4),
        sequence in json_value(),
    ) {
        let doc = json!({"keys": keys, "spiffe_sequence": sequence});
        assert_bundle_round_trips(&doc.to_string());
    }

    #[test]
    fn edited_bundles_round_trip_or_fail_cleanly((op, pos, value) in edit()) {
        let edited = mutate(SAMPLES.bundle_json.as_bytes(), op, pos, value);
        assert_bundle_round_trips(&String::from_utf8_lossy(&edited));
    }
}

#[test]
fn the_samples_are_valid() {
    let s = &*SAMPLES;
    assert_eq!(csr_public_key(&s.csr_der).unwrap(), s.spki);
    let id = verify_svid(
        std::slice::from_ref(&s.leaf_der),
        std::slice::from_ref(&s.ca_der),
        now(),
    )
    .unwrap();
    assert_eq!(id.as_str(), "spiffe://example.org/ns/web");
    assert!(validate_jwt(&s.jwt, "db", &s.jwt_keys, now()).is_ok());
    assert_eq!(Bundle::from_json(td(), &s.bundle_json).unwrap(), s.bundle);
}

/// Every single-bit flip of the X509-SVID (all 8 bits of every byte of the
/// DER: the envelope, the signed part and the signature alike) makes
/// verification fail.
#[test]
fn no_bit_flip_of_an_svid_verifies() {
    let s = &*SAMPLES;
    for pos in 0..s.leaf_der.len() {
        for bit in (0..8).map(|b| 1u8 << b) {
            let mut edited = s.leaf_der.clone();
            edited[pos] ^= bit;
            let verdict = verify_svid(&[edited], std::slice::from_ref(&s.ca_der), now());
            assert!(
                verdict.is_err(),
                "flipping bit {bit:#x} of byte {pos} verified"
            );
        }
    }
}

/// Every change of one character of the JWT-SVID (header, payload or
/// signature) to another base64url character makes validation fail.
#[test]
fn no_character_change_of_a_jwt_validates() {
    let s = &*SAMPLES;
    let alphabet = b"AQgw_-.9";
    for pos in 0..s.jwt.len() {
        for &c in alphabet {
            let mut edited = s.jwt.clone().into_bytes();
            if edited[pos] == c {
                continue;
            }
            edited[pos] = c;
            let edited = String::from_utf8(edited).unwrap();
            let verdict = validate_jwt(&edited, "db", &s.jwt_keys, now());
            assert!(
                verdict.is_err(),
                "changing character {pos} to {} validated",
                c as char
            );
        }
    }
}

/// The bundle's JWT key members must decode; a key whose `x` was replaced
/// by junk fails the whole document and names the key.
#[test]
fn a_junk_key_member_fails_the_bundle_by_index() {
    let mut doc: Value = serde_json::from_str(&SAMPLES.bundle_json).unwrap();
    let keys = doc["keys"].as_array_mut().unwrap();
    let jwt_key = keys.iter_mut().find(|k| k["use"] == "jwt-svid").unwrap();
    jwt_key["x"] = json!("!!not base64!!");
    let err = Bundle::from_json(td(), &doc.to_string()).unwrap_err();
    assert!(err.to_string().contains("key 1"), "{err}");
}
