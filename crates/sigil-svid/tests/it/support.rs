//! Fixtures shared by the test modules: fixed times, authorities in a bundle,
//! and a raw JWS signer that bypasses sigil's minting code.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256, RsaEncoding, RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_svid::jwt::{JwtAuthority, JwtKeyType};
use sigil_svid::keys::{KeyAlgorithm, PrivateKey};
use sigil_types::{SpiffeId, TrustDomain};

pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// A fixed instant, in whole seconds.
pub(crate) fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

pub(crate) const NOW_SECS: i64 = 1_750_000_000;

pub(crate) fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

pub(crate) fn sub() -> SpiffeId {
    "spiffe://example.org/ns/web".parse().unwrap()
}

pub(crate) fn aud(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// One authority of `key_type` published in the bundle of example.org.
pub(crate) struct Fixture {
    pub(crate) auth: JwtAuthority,
    pub(crate) keys: BundleSet,
}

pub(crate) fn fixture(key_type: JwtKeyType) -> Fixture {
    let auth = JwtAuthority::generate_with(key_type, 24 * HOUR, now()).unwrap();
    let mut bundle = Bundle::new(td());
    bundle.jwt_authorities.push(auth.public_jwk());
    let mut keys = BundleSet::default();
    keys.insert(bundle);
    Fixture { auth, keys }
}

/// Claims of a valid token for audience `db`, with `exp` as given.
pub(crate) fn claims_with_exp(exp: Value) -> Value {
    json!({"sub": sub().as_str(), "aud": "db", "exp": exp, "iat": NOW_SECS})
}

pub(crate) fn good_claims() -> Value {
    claims_with_exp(json!(NOW_SECS + 3600))
}

pub(crate) fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A compact JWS over `header` and `claims`, signed with `key` directly via
/// aws-lc-rs: ES256 (fixed r||s) for a P-256 key, RSASSA-PKCS1-v1_5 SHA-256
/// for an RSA key, whatever the header says.
pub(crate) fn sign_raw(key: &PrivateKey, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = match key.algorithm() {
        KeyAlgorithm::EcP256 => {
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.pkcs8_der())
                .unwrap()
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec()
        }
        _ => rsa_sign(key, &RSA_PKCS1_SHA256, input.as_bytes()),
    };
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// Signs `msg` with an RSA `key` and any RSA encoding (PKCS#1 v1.5 or PSS).
pub(crate) fn rsa_sign(
    key: &PrivateKey,
    encoding: &'static dyn RsaEncoding,
    msg: &[u8],
) -> Vec<u8> {
    let pair = RsaKeyPair::from_pkcs8(key.pkcs8_der()).unwrap();
    let mut sig = vec![0u8; pair.public_modulus_len()];
    pair.sign(encoding, &SystemRandom::new(), msg, &mut sig)
        .unwrap();
    sig
}

/// The decoded header and claims of a compact token.
pub(crate) fn segments(token: &str) -> (Value, Value) {
    let mut it = token
        .split('.')
        .take(2)
        .map(|s| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap());
    (it.next().unwrap(), it.next().unwrap())
}
