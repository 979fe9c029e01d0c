//! RS256 JWT authorities, checked against an independent verifier, plus the
//! other JWS algorithms the validator accepts and the minting options
//! (issuer, extra claims).

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_SHA256, RSA_PKCS1_SHA384, RSA_PKCS1_SHA512, RSA_PSS_SHA256, RSA_PSS_SHA384,
    RSA_PSS_SHA512, RsaEncoding, UnparsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use sigil_svid::SvidError;
use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_svid::jwt::{
    JwtAuthority, JwtClaims, JwtKeyType, JwtValidation, REGISTERED_CLAIMS, jwk_alg,
    parse_jwt_unverified, validate_jwt, validate_jwt_with,
};
use sigil_svid::keys::{KeyAlgorithm, PrivateKey};
use sigil_types::Jwk;

use crate::support::{HOUR, aud, b64, fixture, good_claims, now, rsa_sign, segments, sub, td};

#[test]
fn rs256_round_trip() {
    let f = fixture(JwtKeyType::Rs256);
    assert_eq!(f.auth.alg(), "RS256");
    assert_eq!(f.auth.key_type(), JwtKeyType::Rs256);
    assert_eq!(f.auth.key().algorithm(), KeyAlgorithm::Rsa2048);
    let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
    let (header, claims) = segments(&token);
    assert_eq!(
        header,
        json!({"alg": "RS256", "kid": f.auth.kid(), "typ": "JWT"})
    );
    assert_eq!(claims["aud"], json!("db"));
    assert!(claims["exp"].is_i64());
    let v = validate_jwt(&token, "db", &f.keys, now()).unwrap();
    assert_eq!(v.spiffe_id, sub());
    assert_eq!(v.expiry, now() + HOUR);

    // The ES256 default is unchanged.
    let ec = JwtAuthority::generate(HOUR, now()).unwrap();
    assert_eq!((ec.alg(), ec.key_type()), ("ES256", JwtKeyType::Es256));
    let (header, _) = segments(&ec.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap());
    assert_eq!(header["alg"], json!("ES256"));
}

#[test]
fn rsa_public_jwk_has_n_and_e_without_leading_zeros() {
    let f = fixture(JwtKeyType::Rs256);
    let jwk = f.auth.public_jwk();
    assert_eq!(jwk.kty, "RSA");
    assert_eq!(jwk.key_use.as_deref(), Some("jwt-svid"));
    assert_eq!(jwk.kid.as_deref(), Some(f.auth.kid()));
    assert!(jwk.crv.is_none() && jwk.x.is_none() && jwk.y.is_none() && jwk.x5c.is_none());
    let n = URL_SAFE_NO_PAD.decode(jwk.n.as_deref().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(jwk.e.as_deref().unwrap()).unwrap();
    assert_eq!(n.len(), 256, "2048-bit modulus, no leading zero byte");
    assert!(n[0] >= 0x80, "top bit of a 2048-bit modulus is set");
    assert_eq!(jwk.e.as_deref(), Some("AQAB"));
    assert_eq!(e, [1, 0, 1]);
    assert_eq!(jwk_alg(&jwk), Some("RS256"));
}

/// DER of a PKCS#1 RSAPublicKey built by hand from a JWK's n and e, so the
/// check below shares no code with sigil.
fn pkcs1_from_jwk(jwk: &Jwk) -> Vec<u8> {
    fn push_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(u8::try_from(len).unwrap());
        } else if len < 0x100 {
            out.extend([0x81, u8::try_from(len).unwrap()]);
        } else {
            out.extend([
                0x82,
                u8::try_from(len >> 8).unwrap(),
                u8::try_from(len & 0xff).unwrap(),
            ]);
        }
    }
    fn integer(out: &mut Vec<u8>, magnitude: &[u8]) {
        let pad = magnitude[0] & 0x80 != 0;
        out.push(0x02);
        push_len(out, magnitude.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(magnitude);
    }
    let n = URL_SAFE_NO_PAD.decode(jwk.n.as_deref().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(jwk.e.as_deref().unwrap()).unwrap();
    let mut body = Vec::new();
    integer(&mut body, &n);
    integer(&mut body, &e);
    let mut out = vec![0x30];
    push_len(&mut out, body.len());
    out.extend(body);
    out
}

#[test]
fn rs256_verifies_with_an_independent_verifier() {
    let f = fixture(JwtKeyType::Rs256);
    let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
    let (input, sig_b64) = token.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig_b64).unwrap();
    assert_eq!(sig.len(), 256);
    let public = pkcs1_from_jwk(&f.auth.public_jwk());
    let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public);
    verifier.verify(input.as_bytes(), &sig).unwrap();
    // Same check fails on other content, so it is not vacuous.
    let mut other = input.as_bytes().to_vec();
    other[0] ^= 1;
    assert!(verifier.verify(&other, &sig).is_err());
}

#[test]
fn every_rsa_alg_verifies_against_an_rsa_jwk() {
    let f = fixture(JwtKeyType::Rs256);
    let algs: [(&str, &'static dyn RsaEncoding); 6] = [
        ("RS256", &RSA_PKCS1_SHA256),
        ("RS384", &RSA_PKCS1_SHA384),
        ("RS512", &RSA_PKCS1_SHA512),
        ("PS256", &RSA_PSS_SHA256),
        ("PS384", &RSA_PSS_SHA384),
        ("PS512", &RSA_PSS_SHA512),
    ];
    for (alg, encoding) in algs {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": alg, "kid": f.auth.kid()})),
            b64(&good_claims())
        );
        let sig = rsa_sign(f.auth.key(), encoding, input.as_bytes());
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert!(validate_jwt(&token, "db", &f.keys, now()).is_ok(), "{alg}");
        // The header's alg decides the verification: a PKCS#1 signature
        // presented as PSS (or the other hash) fails.
        let swapped_alg = if alg.starts_with("RS") {
            alg.replace("RS", "PS")
        } else {
            alg.replace("PS", "RS")
        };
        let lie = format!(
            "{}.{}.{}",
            b64(&json!({"alg": swapped_alg, "kid": f.auth.kid()})),
            b64(&good_claims()),
            URL_SAFE_NO_PAD.encode(&sig)
        );
        assert_eq!(
            validate_jwt(&lie, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtSignature,
            "{alg} as {swapped_alg}"
        );
    }
}

#[test]
fn es384_verifies_against_a_p384_jwk_and_es256_does_not() {
    let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
    let point = pair.public_key().as_ref();
    let (x, y) = point[1..].split_at(48);
    let jwk = Jwk {
        kty: "EC".to_owned(),
        key_use: Some("jwt-svid".to_owned()),
        kid: Some("p384".to_owned()),
        crv: Some("P-384".to_owned()),
        x: Some(URL_SAFE_NO_PAD.encode(x)),
        y: Some(URL_SAFE_NO_PAD.encode(y)),
        ..Jwk::default()
    };
    assert_eq!(jwk_alg(&jwk), Some("ES384"));
    let mut bundle = Bundle::new(td());
    bundle.jwt_authorities.push(jwk);
    let mut keys = BundleSet::default();
    keys.insert(bundle);
    let sign = |alg: &str| {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": alg, "kid": "p384"})),
            b64(&good_claims())
        );
        let sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    };
    assert!(validate_jwt(&sign("ES384"), "db", &keys, now()).is_ok());
    assert_eq!(
        validate_jwt(&sign("ES256"), "db", &keys, now()).unwrap_err(),
        SvidError::JwtKeyMismatch {
            alg: "ES256".to_owned(),
            kty: "EC P-384".to_owned()
        }
    );
    assert_eq!(
        validate_jwt(&sign("RS256"), "db", &keys, now()).unwrap_err(),
        SvidError::JwtKeyMismatch {
            alg: "RS256".to_owned(),
            kty: "EC P-384".to_owned()
        }
    );
}

#[test]
fn a_short_rsa_modulus_is_refused() {
    let f = fixture(JwtKeyType::Rs256);
    let mut jwk = f.auth.public_jwk();
    let mut n = vec![0xc5u8; 128];
    n[127] |= 1;
    jwk.n = Some(URL_SAFE_NO_PAD.encode(&n));
    let mut bundle = Bundle::new(td());
    bundle.jwt_authorities.push(jwk);
    let mut keys = BundleSet::default();
    keys.insert(bundle);
    let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
    assert_eq!(
        validate_jwt(&token, "db", &keys, now()).unwrap_err(),
        SvidError::JwtKeyMismatch {
            alg: "RS256".to_owned(),
            kty: "RSA 1024-bit".to_owned()
        }
    );
}

#[test]
fn rsa_authority_survives_the_bundle_document_and_storage() {
    let f = fixture(JwtKeyType::Rs256);
    let json = f.keys.get(&td()).unwrap().to_json();
    let again = Bundle::from_json(td(), &json).unwrap();
    assert_eq!(again.jwt_authorities, vec![f.auth.public_jwk()]);

    // Rebuilt from its stored PEM key, the authority is RS256 again.
    let key = PrivateKey::from_pem(&f.auth.key().to_pem()).unwrap();
    let stored =
        JwtAuthority::from_parts(key, f.auth.kid().to_owned(), f.auth.not_after()).unwrap();
    assert_eq!(stored.alg(), "RS256");
    assert_eq!(stored.public_jwk(), f.auth.public_jwk());
    let token = stored.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
    assert!(validate_jwt(&token, "db", &again, now()).is_ok());
}

#[test]
fn key_type_config_strings() {
    for (s, kt, alg) in [
        ("ec-p256", JwtKeyType::Es256, "ES256"),
        ("rsa-2048", JwtKeyType::Rs256, "RS256"),
    ] {
        let parsed: JwtKeyType = s.parse().unwrap();
        assert_eq!(parsed, kt);
        assert_eq!(kt.to_string(), s);
        assert_eq!(kt.alg(), alg);
        assert_eq!(serde_json::to_value(kt).unwrap(), json!(s));
        assert_eq!(serde_json::from_value::<JwtKeyType>(json!(s)).unwrap(), kt);
    }
    assert_eq!(JwtKeyType::default(), JwtKeyType::Es256);
    for bad in ["rsa", "RSA-2048", "es256", ""] {
        let err = bad.parse::<JwtKeyType>().unwrap_err();
        assert_eq!(err, SvidError::JwtKeyType(bad.to_owned()));
        let msg = err.to_string();
        assert!(
            msg.contains("\"ec-p256\"") && msg.contains("\"rsa-2048\""),
            "{msg}"
        );
    }
    assert!(serde_json::from_value::<JwtKeyType>(json!("rsa-4096")).is_err());
}

#[test]
fn jwk_alg_names_what_an_oidc_jwks_advertises() {
    let ec = fixture(JwtKeyType::Es256).auth.public_jwk();
    assert_eq!(jwk_alg(&ec), Some("ES256"));
    let p521 = Jwk {
        crv: Some("P-521".to_owned()),
        ..ec.clone()
    };
    assert_eq!(jwk_alg(&p521), None);
    let okp = Jwk {
        kty: "OKP".to_owned(),
        crv: Some("Ed25519".to_owned()),
        ..Jwk::default()
    };
    assert_eq!(jwk_alg(&okp), None);
    let no_curve = Jwk { crv: None, ..ec };
    assert_eq!(jwk_alg(&no_curve), None);
}

#[test]
fn issuer_and_extra_claims_are_minted_and_validated() {
    for kt in [JwtKeyType::Es256, JwtKeyType::Rs256] {
        let f = fixture(kt);
        let mut extra = Map::new();
        extra.insert("tenant".to_owned(), json!("blue"));
        extra.insert("groups".to_owned(), json!(["a", "b"]));
        let claims = JwtClaims {
            issuer: Some("https://oidc.example.org".to_owned()),
            extra,
        };
        let token = f
            .auth
            .sign_with(&sub(), &aud(&["db"]), HOUR, now(), &claims)
            .unwrap();
        let (_, body) = segments(&token);
        assert_eq!(body["iss"], json!("https://oidc.example.org"));
        assert_eq!(body["tenant"], json!("blue"));
        assert_eq!(body["groups"], json!(["a", "b"]));
        assert_eq!(body["sub"], json!(sub().as_str()));
        let opts = JwtValidation {
            issuer: Some("https://oidc.example.org"),
        };
        let v = validate_jwt_with(&token, "db", &f.keys, now(), &opts).unwrap();
        assert_eq!(v.claims["tenant"], json!("blue"));
        assert_eq!(parse_jwt_unverified(&token).unwrap().spiffe_id, sub());

        // Without an issuer no iss is emitted.
        let plain = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        let (_, body) = segments(&plain);
        let names: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(names, ["aud", "exp", "iat", "sub"]);
    }
}

#[test]
fn extra_claims_may_not_override_registered_ones() {
    let f = fixture(JwtKeyType::Es256);
    for name in REGISTERED_CLAIMS {
        let mut extra = Map::new();
        extra.insert(
            (*name).to_owned(),
            Value::from("spiffe://example.org/admin"),
        );
        let claims = JwtClaims {
            issuer: None,
            extra,
        };
        let err = f
            .auth
            .sign_with(&sub(), &aud(&["db"]), HOUR, now(), &claims)
            .unwrap_err();
        assert_eq!(err, SvidError::JwtReservedClaim((*name).to_owned()));
        assert!(err.to_string().contains(name), "{err}");
    }
    assert_eq!(REGISTERED_CLAIMS.len(), 7);
    let empty_issuer = JwtClaims {
        issuer: Some(String::new()),
        ..JwtClaims::default()
    };
    assert!(matches!(
        f.auth
            .sign_with(&sub(), &aud(&["db"]), HOUR, now(), &empty_issuer),
        Err(SvidError::JwtBadClaim { claim: "iss", .. })
    ));
}
