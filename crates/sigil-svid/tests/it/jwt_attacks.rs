//! Forged and malformed JWT-SVIDs (spiffe.md §3.1, §3.3), each refused with
//! its own error so a regression in one check cannot hide behind another.
//! Every attack runs against an ES256 and an RS256 authority where it applies.

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sigil_svid::SvidError;
use sigil_svid::jwt::{
    CLOCK_SKEW, JwtAuthority, JwtClaims, JwtKeyType, JwtValidation, validate_jwt, validate_jwt_with,
};
use std::time::Duration;

use crate::support::{
    HOUR, NOW_SECS, aud, b64, claims_with_exp, fixture, good_claims, now, sign_raw, sub,
};

const BOTH: [JwtKeyType; 2] = [JwtKeyType::Es256, JwtKeyType::Rs256];

fn header(auth: &JwtAuthority, alg: &str) -> Value {
    json!({"alg": alg, "kid": auth.kid(), "typ": "JWT"})
}

#[test]
fn alg_none_with_empty_signature_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        for alg in ["none", "None", "NONE"] {
            let token = format!(
                "{}.{}.",
                b64(&json!({"alg": alg, "kid": f.auth.kid(), "typ": "JWT"})),
                b64(&good_claims())
            );
            assert_eq!(
                validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
                SvidError::JwtAlgorithm(alg.to_owned()),
                "{kt} {alg}"
            );
        }
    }
}

/// Algorithm confusion: an HS256 token whose HMAC secret is the authority's
/// public key, as a naive verifier that keys HMAC with "the key" would accept.
#[test]
fn hs256_keyed_with_the_public_key_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let jwk_json = serde_json::to_string(&f.auth.public_jwk()).unwrap();
        let secrets: [(&str, Vec<u8>); 2] = [
            ("SPKI DER", f.auth.key().public_key_spki_der()),
            ("JWK JSON", jwk_json.into_bytes()),
        ];
        for (what, secret) in secrets {
            let input = format!("{}.{}", b64(&header(&f.auth, "HS256")), b64(&good_claims()));
            let tag = hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, &secret),
                input.as_bytes(),
            );
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
            assert_eq!(
                validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
                SvidError::JwtAlgorithm("HS256".to_owned()),
                "{kt} {what}"
            );
        }
    }
}

#[test]
fn wrong_kid_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let token = sign_raw(
            f.auth.key(),
            &json!({"alg": f.auth.alg(), "kid": "not-the-kid", "typ": "JWT"}),
            &good_claims(),
        );
        assert_eq!(
            validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtUnknownKey {
                trust_domain: "example.org".to_owned(),
                kid: "not-the-kid".to_owned()
            },
            "{kt}"
        );
    }
}

#[test]
fn missing_or_empty_kid_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        for header in [
            json!({"alg": f.auth.alg(), "typ": "JWT"}),
            json!({"alg": f.auth.alg(), "kid": "", "typ": "JWT"}),
            json!({"alg": f.auth.alg(), "kid": 7, "typ": "JWT"}),
        ] {
            let token = sign_raw(f.auth.key(), &header, &good_claims());
            assert_eq!(
                validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
                SvidError::JwtMissingKid,
                "{kt} {header}"
            );
        }
    }
}

#[test]
fn missing_aud_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let token = sign_raw(
            f.auth.key(),
            &header(&f.auth, f.auth.alg()),
            &json!({"sub": sub().as_str(), "exp": NOW_SECS + 3600}),
        );
        assert_eq!(
            validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtMissingClaim("aud"),
            "{kt}"
        );
    }
}

#[test]
fn audience_not_in_aud_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let token = f
            .auth
            .sign(&sub(), &aud(&["db", "queue"]), HOUR, now())
            .unwrap();
        assert!(validate_jwt(&token, "queue", &f.keys, now()).is_ok());
        assert_eq!(
            validate_jwt(&token, "cache", &f.keys, now()).unwrap_err(),
            SvidError::JwtAudience("cache".to_owned()),
            "{kt}"
        );
        // A prefix or a case variant is not the audience.
        assert_eq!(
            validate_jwt(&token, "DB", &f.keys, now()).unwrap_err(),
            SvidError::JwtAudience("DB".to_owned())
        );
    }
}

#[test]
fn expired_beyond_the_skew_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        let exp = now() + HOUR;
        assert!(
            validate_jwt(
                &token,
                "db",
                &f.keys,
                exp + CLOCK_SKEW - Duration::from_secs(1)
            )
            .is_ok()
        );
        assert_eq!(
            validate_jwt(&token, "db", &f.keys, exp + CLOCK_SKEW).unwrap_err(),
            SvidError::JwtExpired,
            "{kt}"
        );
    }
}

#[test]
fn non_integer_exp_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        for exp in [
            json!(1_750_003_600.5),
            json!(1_750_003_600.0),
            json!("1750003600"),
        ] {
            let token = sign_raw(
                f.auth.key(),
                &header(&f.auth, f.auth.alg()),
                &claims_with_exp(exp.clone()),
            );
            assert!(
                matches!(
                    validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
                    SvidError::JwtBadClaim { claim: "exp", .. }
                ),
                "{kt} {exp}"
            );
        }
    }
}

#[test]
fn wrong_issuer_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let claims = JwtClaims {
            issuer: Some("https://evil.example".to_owned()),
            ..JwtClaims::default()
        };
        let token = f
            .auth
            .sign_with(&sub(), &aud(&["db"]), HOUR, now(), &claims)
            .unwrap();
        let want = JwtValidation {
            issuer: Some("https://oidc.example.org"),
        };
        assert_eq!(
            validate_jwt_with(&token, "db", &f.keys, now(), &want).unwrap_err(),
            SvidError::JwtIssuer {
                expected: "https://oidc.example.org".to_owned(),
                found: Some("\"https://evil.example\"".to_owned()),
            },
            "{kt}"
        );
        // Without an issuer requirement the token is fine.
        assert!(validate_jwt(&token, "db", &f.keys, now()).is_ok());
    }
}

#[test]
fn missing_or_non_string_issuer_is_refused_when_required() {
    for kt in BOTH {
        let f = fixture(kt);
        let want = JwtValidation {
            issuer: Some("https://oidc.example.org"),
        };
        let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        assert_eq!(
            validate_jwt_with(&token, "db", &f.keys, now(), &want).unwrap_err(),
            SvidError::JwtIssuer {
                expected: "https://oidc.example.org".to_owned(),
                found: None,
            },
            "{kt}"
        );
        let mut claims = good_claims();
        claims["iss"] = json!(["https://oidc.example.org"]);
        let array_iss = sign_raw(f.auth.key(), &header(&f.auth, f.auth.alg()), &claims);
        assert_eq!(
            validate_jwt_with(&array_iss, "db", &f.keys, now(), &want).unwrap_err(),
            SvidError::JwtIssuer {
                expected: "https://oidc.example.org".to_owned(),
                found: Some("[\"https://oidc.example.org\"]".to_owned()),
            },
            "{kt}"
        );
    }
}

#[test]
fn rsa_algs_on_an_ec_key_are_refused() {
    let f = fixture(JwtKeyType::Es256);
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        let token = sign_raw(f.auth.key(), &header(&f.auth, alg), &good_claims());
        assert_eq!(
            validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtKeyMismatch {
                alg: alg.to_owned(),
                kty: "EC P-256".to_owned()
            }
        );
    }
}

#[test]
fn ec_algs_on_an_rsa_key_are_refused() {
    let f = fixture(JwtKeyType::Rs256);
    for alg in ["ES256", "ES384"] {
        let token = sign_raw(f.auth.key(), &header(&f.auth, alg), &good_claims());
        assert_eq!(
            validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtKeyMismatch {
                alg: alg.to_owned(),
                kty: "RSA".to_owned()
            }
        );
    }
}

/// An attacker with their own key reuses the trusted authority's kid.
#[test]
fn another_authority_with_the_same_kid_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let impostor = JwtAuthority::from_parts(
            kt.generate_key().unwrap(),
            f.auth.kid().to_owned(),
            now() + HOUR,
        )
        .unwrap();
        assert_eq!(impostor.kid(), f.auth.kid());
        let token = impostor.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        assert_eq!(
            validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtSignature,
            "{kt}"
        );
    }
}

#[test]
fn crit_header_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let token = sign_raw(
            f.auth.key(),
            &json!({"alg": f.auth.alg(), "kid": f.auth.kid(), "crit": ["exp"], "exp": 1}),
            &good_claims(),
        );
        assert_eq!(
            validate_jwt(&token, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtMalformed("crit header is not supported".to_owned()),
            "{kt}"
        );
    }
}

/// RFC 7515 §7.2 JSON serialization (flattened and general) of a token that
/// is valid in compact form.
#[test]
fn json_serialization_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        assert!(validate_jwt(&token, "db", &f.keys, now()).is_ok());
        let [protected, payload, signature]: [&str; 3] =
            token.split('.').collect::<Vec<_>>().try_into().unwrap();
        let flattened = json!({"payload": payload, "protected": protected, "signature": signature});
        let general = json!({
            "payload": payload,
            "signatures": [{"protected": protected, "signature": signature}]
        });
        for doc in [flattened, general] {
            let text = doc.to_string();
            for input in [text.clone(), URL_SAFE_NO_PAD.encode(&text)] {
                assert_eq!(
                    validate_jwt(&input, "db", &f.keys, now()).unwrap_err(),
                    SvidError::JwtMalformed(
                        "a JWT-SVID has exactly three segments (JWS compact serialization)"
                            .to_owned()
                    ),
                    "{kt} {input}"
                );
            }
        }
    }
}

/// A token signed by the right key but with a signature that was cut off or
/// belongs to other content.
#[test]
fn signature_over_other_content_is_refused() {
    for kt in BOTH {
        let f = fixture(kt);
        let a = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        let b = f.auth.sign(&sub(), &aud(&["other"]), HOUR, now()).unwrap();
        let (a_input, _) = a.rsplit_once('.').unwrap();
        let (_, b_sig) = b.rsplit_once('.').unwrap();
        let spliced = format!("{a_input}.{b_sig}");
        assert_eq!(
            validate_jwt(&spliced, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtSignature,
            "{kt}"
        );
        let empty_sig = format!("{a_input}.");
        assert_eq!(
            validate_jwt(&empty_sig, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtMalformed("signature segment is empty".to_owned()),
            "{kt}"
        );
    }
}
