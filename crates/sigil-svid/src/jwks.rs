//! JSON Web Keys as verification keys: the one place that decides which JWK
//! may verify which `alg` (RFC 7518 §3, §6), with a floor of
//! [`MIN_RSA_BITS`] for RSA and full-length EC coordinates. JWT-SVID
//! validation ([`crate::jwt`]) and Kubernetes token verification (a cluster's
//! JWKS) both go through here, so a rule tightened here holds for both.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk as j;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use sigil_types::Jwk;

use crate::SvidError;

/// The smallest RSA modulus accepted for verification (as aws-lc-rs's
/// `RSA_PKCS1_2048_8192_*` parameters require).
pub const MIN_RSA_BITS: usize = 2048;

/// The `alg` a key of this type verifies by default, as an OIDC JWKS
/// advertises it: `ES256` for EC P-256, `ES384` for EC P-384, `RS256` for
/// RSA; `None` for anything else.
pub fn default_alg(jwk: &Jwk) -> Option<&'static str> {
    match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("EC", Some("P-256")) => Some("ES256"),
        ("EC", Some("P-384")) => Some("ES384"),
        ("RSA", _) => Some("RS256"),
        _ => None,
    }
}

/// The verification key of `jwk` for signatures with `alg`, refusing a key
/// whose type or curve does not fit the algorithm, EC coordinates that are
/// not full length (RFC 7518 §6.2.1.2), and RSA moduli below
/// [`MIN_RSA_BITS`] ([`SvidError::JwtKeyMismatch`]); an `alg` outside the
/// RSA/ECDSA families is [`SvidError::JwtUnsupportedAlgorithm`].
pub fn decoding_key(alg: &str, jwk: &Jwk) -> Result<(Algorithm, DecodingKey), SvidError> {
    use Algorithm as A;

    let mismatch = || SvidError::JwtKeyMismatch {
        alg: alg.to_owned(),
        kty: match &jwk.crv {
            Some(crv) => format!("{} {crv}", jwk.kty),
            None => jwk.kty.clone(),
        },
    };
    let (algorithm, needs_curve) = match alg {
        "ES256" => (A::ES256, Some(("P-256", j::EllipticCurve::P256, 32))),
        "ES384" => (A::ES384, Some(("P-384", j::EllipticCurve::P384, 48))),
        "RS256" => (A::RS256, None),
        "RS384" => (A::RS384, None),
        "RS512" => (A::RS512, None),
        "PS256" => (A::PS256, None),
        "PS384" => (A::PS384, None),
        "PS512" => (A::PS512, None),
        other => return Err(SvidError::JwtUnsupportedAlgorithm(other.to_owned())),
    };
    let algorithm_params = match needs_curve {
        Some((crv_name, curve, len)) => {
            if jwk.kty != "EC" || jwk.crv.as_deref() != Some(crv_name) {
                return Err(mismatch());
            }
            let (Some(x), Some(y)) = (&jwk.x, &jwk.y) else {
                return Err(mismatch());
            };
            let coord_ok = |c: &str| URL_SAFE_NO_PAD.decode(c).is_ok_and(|b| b.len() == len);
            if !coord_ok(x) || !coord_ok(y) {
                return Err(mismatch());
            }
            j::AlgorithmParameters::EllipticCurve(j::EllipticCurveKeyParameters {
                key_type: j::EllipticCurveKeyType::EC,
                curve,
                x: x.clone(),
                y: y.clone(),
            })
        }
        None => {
            let (true, Some(n), Some(e)) = (jwk.kty == "RSA", &jwk.n, &jwk.e) else {
                return Err(mismatch());
            };
            // aws-lc-rs would refuse a short modulus only as a failed
            // signature; say what is wrong instead.
            let bits = rsa_modulus_bits(n).ok_or_else(mismatch)?;
            if bits < MIN_RSA_BITS {
                return Err(SvidError::JwtKeyMismatch {
                    alg: alg.to_owned(),
                    kty: format!("RSA {bits}-bit"),
                });
            }
            j::AlgorithmParameters::RSA(j::RSAKeyParameters {
                key_type: j::RSAKeyType::RSA,
                n: n.clone(),
                e: e.clone(),
            })
        }
    };
    let key = j::Jwk {
        common: j::CommonParameters::default(),
        algorithm: algorithm_params,
    };
    let decoding = DecodingKey::from_jwk(&key).map_err(|_| mismatch())?;
    Ok((algorithm, decoding))
}

/// The bit length of a base64url JWK modulus, ignoring leading zero bytes.
fn rsa_modulus_bits(n: &str) -> Option<usize> {
    let bytes = URL_SAFE_NO_PAD.decode(n).ok()?;
    let start = bytes.iter().position(|&b| b != 0)?;
    let top = usize::try_from(u8::BITS - bytes[start].leading_zeros()).ok()?;
    Some((bytes.len() - start - 1) * 8 + top)
}

/// One signing key of a JWKS document, ready to verify.
pub struct VerifyingKey {
    /// The key's `kid`, when it has one.
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub alg: Algorithm,
    /// The key itself.
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A JWKS member: the key plus the optional `alg` it is restricted to.
#[derive(Deserialize)]
struct JwksMember {
    #[serde(flatten)]
    jwk: Jwk,
    #[serde(default)]
    alg: Option<String>,
}

#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<JwksMember>,
}

/// Parses a JWKS document (RFC 7517 §5, `{"keys":[…]}`) into the keys that
/// can verify one of `allowed` algorithms. Keys marked for another `use`
/// than `sig` (encryption keys published alongside) are skipped; a key's
/// algorithm is its `alg` member or, without one, [`default_alg`]. A key
/// that fits none of `allowed`, or fails [`decoding_key`], fails the whole
/// document ([`SvidError::BundleKey`] names it), so that a bad file is
/// noticed when loaded rather than on every verification; so does a document
/// without any signing key.
pub fn parse_jwks(json: &str, allowed: &[Algorithm]) -> Result<Vec<VerifyingKey>, SvidError> {
    let doc: JwksDocument = serde_json::from_str(json)
        .map_err(|e| SvidError::BundleJson(format!("not a JWKS document: {e}")))?;
    let mut keys = Vec::new();
    for (index, member) in doc.keys.into_iter().enumerate() {
        let jwk = member.jwk;
        let err = |problem: String| SvidError::BundleKey {
            index,
            problem: match &jwk.kid {
                Some(kid) => format!("key {kid:?}: {problem}"),
                None => problem,
            },
        };
        if jwk.key_use.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let alg = member.alg.as_deref().or_else(|| default_alg(&jwk));
        let allowed_names: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        let Some(alg) = alg.filter(|a| allowed_names.iter().any(|n| n == a)) else {
            return Err(err(format!(
                "only {} signing keys are accepted",
                allowed_names.join(", ")
            )));
        };
        let (alg, key) = decoding_key(alg, &jwk).map_err(|e| err(e.to_string()))?;
        keys.push(VerifyingKey {
            kid: jwk.kid.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err(SvidError::BundleJson(
            "the JWKS holds no signing key".to_owned(),
        ));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa(bits: usize) -> Jwk {
        let mut n = vec![0xffu8; bits / 8];
        n[0] = 0x80;
        Jwk {
            kty: "RSA".to_owned(),
            n: Some(URL_SAFE_NO_PAD.encode(&n)),
            e: Some("AQAB".to_owned()),
            ..Jwk::default()
        }
    }

    #[test]
    fn rsa_floor_and_bit_count() {
        assert!(decoding_key("RS256", &rsa(2048)).is_ok());
        let err = decoding_key("RS256", &rsa(1024)).unwrap_err();
        assert!(err.to_string().contains("RSA 1024-bit"), "{err}");
    }

    #[test]
    fn rsa_modulus_bits_ignores_leading_zeros() {
        let enc = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        assert_eq!(rsa_modulus_bits(&enc(&[0x80; 256])), Some(2048));
        assert_eq!(rsa_modulus_bits(&enc(&[0x7f; 256])), Some(2047));
        let mut padded = vec![0u8];
        padded.extend([0xff; 256]);
        assert_eq!(rsa_modulus_bits(&enc(&padded)), Some(2048));
        assert_eq!(rsa_modulus_bits(&enc(&[0, 0])), None);
        assert_eq!(rsa_modulus_bits("!!"), None);
    }

    #[test]
    fn ec_keys_need_their_curve_and_full_coordinates() {
        let ec = |crv: &str, len: usize| Jwk {
            kty: "EC".to_owned(),
            crv: Some(crv.to_owned()),
            x: Some(URL_SAFE_NO_PAD.encode(vec![1u8; len])),
            y: Some(URL_SAFE_NO_PAD.encode(vec![2u8; len])),
            ..Jwk::default()
        };
        assert!(matches!(
            decoding_key("ES256", &ec("P-384", 48)),
            Err(SvidError::JwtKeyMismatch { .. })
        ));
        assert!(matches!(
            decoding_key("ES256", &ec("P-256", 31)),
            Err(SvidError::JwtKeyMismatch { .. })
        ));
        assert!(matches!(
            decoding_key("RS256", &ec("P-256", 32)),
            Err(SvidError::JwtKeyMismatch { .. })
        ));
        assert!(matches!(
            decoding_key("HS256", &rsa(2048)),
            Err(SvidError::JwtUnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn jwks_documents_keep_signing_keys_and_refuse_weak_ones() {
        let allowed = [Algorithm::RS256, Algorithm::ES256];
        let good = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "a", "use": "sig", "alg": "RS256", "n": rsa(2048).n, "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": rsa(1024).n, "e": "AQAB"},
        ]});
        let keys = parse_jwks(&good.to_string(), &allowed).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("a"));
        assert_eq!(keys[0].alg, Algorithm::RS256);

        let weak = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "w", "n": rsa(1024).n, "e": "AQAB"},
        ]});
        let err = parse_jwks(&weak.to_string(), &allowed).unwrap_err();
        assert!(
            err.to_string().contains("\"w\"") && err.to_string().contains("1024"),
            "{err}"
        );

        let ps = serde_json::json!({"keys": [
            {"kty": "RSA", "alg": "PS256", "n": rsa(2048).n, "e": "AQAB"},
        ]});
        let err = parse_jwks(&ps.to_string(), &allowed).unwrap_err();
        assert!(err.to_string().contains("only RS256, ES256"), "{err}");

        let empty = serde_json::json!({"keys": []});
        assert!(parse_jwks(&empty.to_string(), &allowed).is_err());
        assert!(parse_jwks("{}", &allowed).is_err());
    }
}
