//! SPIFFE bundles (spiffe.md §4): a trust domain's X.509 and JWT authorities,
//! in SPIFFE JSON form (§4.1) and in the Workload API's forms (§4.2).
//!
//! Output is kept go-jose-clean: every X.509 key carries the key members
//! (`crv`/`x`/`y` or `n`/`e`) matching its `x5c` certificate, and every JWT
//! key carries a `kid`.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sigil_types::bundle::{USE_JWT_SVID, USE_X509_SVID};
use sigil_types::{BundleDocument, Jwk, TrustDomain};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::public_key::PublicKey;

use crate::SvidError;
use crate::jwt::JwtKeyLookup;
use crate::x509::parse_cert;

/// Key types this implementation understands; keys of other types are ignored (§4.1).
const KNOWN_KTY: &[&str] = &["EC", "RSA", "OKP"];

/// A trust domain's authorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The trust domain the bundle belongs to (the document itself does not say).
    pub trust_domain: TrustDomain,
    /// CA certificates (DER) that anchor X509-SVIDs of the trust domain.
    pub x509_authorities: Vec<Vec<u8>>,
    /// Public keys that verify JWT-SVIDs of the trust domain; each has a `kid`.
    pub jwt_authorities: Vec<Jwk>,
    /// `spiffe_sequence`: increases on every change.
    pub sequence: u64,
    /// `spiffe_refresh_hint` in seconds.
    pub refresh_hint: Option<u64>,
}

impl Bundle {
    /// An empty bundle (which distrusts everything) for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// The SPIFFE bundle document: X.509 keys with `use` x509-svid, one
    /// standard-base64 `x5c` certificate and the matching key members (no
    /// `kid`); JWT keys as stored, with `use` jwt-svid.
    ///
    /// An X.509 authority whose key type cannot be described as a JWK (neither
    /// EC, RSA nor Ed25519) is left out, since go-jose would reject the whole
    /// document over it.
    pub fn to_document(&self) -> BundleDocument {
        let x509 = self.x509_authorities.iter().filter_map(|der| {
            let mut jwk = cert_key_jwk(der).ok()?;
            jwk.key_use = Some(USE_X509_SVID.to_owned());
            jwk.x5c = Some(vec![STANDARD.encode(der)]);
            Some(jwk)
        });
        let jwt = self.jwt_authorities.iter().map(|k| Jwk {
            key_use: Some(USE_JWT_SVID.to_owned()),
            ..k.clone()
        });
        BundleDocument {
            keys: x509.chain(jwt).collect(),
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: self.refresh_hint,
        }
    }

    /// [`Self::to_document`] as compact JSON.
    pub fn to_json(&self) -> String {
        // Serializing strings, numbers and lists cannot fail.
        serde_json::to_string(&self.to_document()).unwrap_or_default()
    }

    /// Parses a SPIFFE bundle document (spiffe.md §4.1) for `trust_domain`.
    ///
    /// Keys with a missing or unknown `use`, or an unknown `kty`, are ignored.
    /// An `x509-svid` key must hold exactly one `x5c` certificate, which must
    /// be a CA whose public key matches the key members when present; a
    /// `jwt-svid` key must have a `kid` and complete key members. Any other
    /// problem fails the whole document, naming the key's index.
    pub fn from_json(trust_domain: TrustDomain, json: &str) -> Result<Self, SvidError> {
        let doc: BundleDocument =
            serde_json::from_str(json).map_err(|e| SvidError::BundleJson(e.to_string()))?;
        let mut bundle = Self::new(trust_domain);
        bundle.sequence = doc.spiffe_sequence.unwrap_or(0);
        bundle.refresh_hint = doc.spiffe_refresh_hint;
        for (index, key) in doc.keys.into_iter().enumerate() {
            let err = |problem: String| SvidError::BundleKey { index, problem };
            if !KNOWN_KTY.contains(&key.kty.as_str()) {
                continue;
            }
            match key.key_use.as_deref() {
                Some(USE_X509_SVID) => bundle.x509_authorities.push(x509_key(&key).map_err(err)?),
                Some(USE_JWT_SVID) => {
                    check_jwt_key(&key).map_err(err)?;
                    bundle.jwt_authorities.push(key);
                }
                _ => {}
            }
        }
        Ok(bundle)
    }

    /// Reads PEM certificates as the X.509 authorities of `trust_domain`.
    /// There must be at least one, and each must be a CA certificate
    /// (cA=true) whose key a SPIFFE bundle can carry, the same rules as an
    /// `x509-svid` key of [`Bundle::from_json`]: a leaf SVID pasted by
    /// mistake would otherwise anchor nothing and hide the mistake.
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, SvidError> {
        let certs = crate::pem::pem_to_certs(pem)?;
        for (index, der) in certs.iter().enumerate() {
            let err = |problem: String| SvidError::BundleKey { index, problem };
            let cert = parse_cert(der).map_err(|e| err(e.to_string()))?;
            if !cert.is_ca() {
                return Err(err(
                    "not a CA certificate (a trust bundle holds the trust domain's root CAs, \
                     not SVIDs)"
                        .to_owned(),
                ));
            }
            cert_key_jwk(der).map_err(err)?;
        }
        let mut bundle = Self::new(trust_domain);
        bundle.x509_authorities = certs;
        Ok(bundle)
    }

    /// Reads a bundle file of either form: SPIFFE bundle JSON (the text
    /// starts with `{`, [`Bundle::from_json`]) or PEM CA certificates
    /// ([`Bundle::from_pem`]).
    pub fn parse(trust_domain: TrustDomain, text: &str) -> Result<Self, SvidError> {
        if text.trim_start().starts_with('{') {
            Self::from_json(trust_domain, text)
        } else {
            Self::from_pem(trust_domain, text)
        }
    }

    /// The X.509 authorities as concatenated DER (the Workload API's bundle format).
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The X.509 authorities as PEM.
    pub fn x509_pem(&self) -> String {
        crate::pem::certs_to_pem(&self.x509_authorities)
    }

    /// The JWT authorities as the Workload API's JWKS (spiffe.md §4.2):
    /// `{"keys":[...]}` with a `kid` on every key and no `use`,
    /// `spiffe_sequence` or `spiffe_refresh_hint`. Keys without `kid` are left
    /// out, since SPIFFE clients fail on them.
    pub fn workload_jwks(&self) -> Vec<u8> {
        let keys: Vec<Jwk> = self
            .jwt_authorities
            .iter()
            .filter(|k| k.kid.as_deref().is_some_and(|kid| !kid.is_empty()))
            .map(|k| Jwk {
                key_use: None,
                ..k.clone()
            })
            .collect();
        // Serializing strings and lists cannot fail.
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap_or_default()
    }
}

impl JwtKeyLookup for Bundle {
    fn jwt_key(&self, td: &TrustDomain, kid: &str) -> Option<Jwk> {
        if *td != self.trust_domain {
            return None;
        }
        self.jwt_authorities
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .cloned()
    }
}

/// Bundles of several trust domains, one per trust domain, never merged.
#[derive(Debug, Clone, Default)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Bundle>,
}

impl BundleSet {
    /// Adds a bundle, replacing the one held for its trust domain.
    pub fn insert(&mut self, b: Bundle) {
        self.bundles.insert(b.trust_domain.clone(), b);
    }

    /// The bundle of `td`.
    pub fn get(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(td)
    }

    /// Removes and returns the bundle of `td`.
    pub fn remove(&mut self, td: &TrustDomain) -> Option<Bundle> {
        self.bundles.remove(td)
    }

    /// All bundles, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }

    /// How many trust domains are held.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// Whether no bundle is held.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl JwtKeyLookup for BundleSet {
    fn jwt_key(&self, td: &TrustDomain, kid: &str) -> Option<Jwk> {
        self.get(td)?.jwt_key(td, kid)
    }
}

/// The JWK members (kty, crv/x/y, n/e) describing a certificate's public key.
fn cert_key_jwk(der: &[u8]) -> Result<Jwk, String> {
    let cert = parse_cert(der).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    let data = spki.subject_public_key.data.as_ref();
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or("EC key without a named curve")?;
        let (crv, len) = if curve == OID_EC_P256 {
            ("P-256", 32)
        } else if curve == OID_NIST_EC_P384 {
            ("P-384", 48)
        } else if curve == OID_NIST_EC_P521 {
            ("P-521", 66)
        } else {
            return Err(format!("unsupported EC curve {curve}"));
        };
        let coords = match data.split_first() {
            Some((4, coords)) if coords.len() == 2 * len => coords,
            _ => return Err("EC key is not an uncompressed point".to_owned()),
        };
        let (x, y) = coords.split_at(len);
        Ok(Jwk {
            kty: "EC".to_owned(),
            crv: Some(crv.to_owned()),
            x: Some(URL_SAFE_NO_PAD.encode(x)),
            y: Some(URL_SAFE_NO_PAD.encode(y)),
            ..Jwk::default()
        })
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err("malformed RSA key".to_owned());
        };
        Ok(Jwk {
            kty: "RSA".to_owned(),
            n: Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus))),
            e: Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent))),
            ..Jwk::default()
        })
    } else if *alg == OID_SIG_ED25519 {
        Ok(Jwk {
            kty: "OKP".to_owned(),
            crv: Some("Ed25519".to_owned()),
            x: Some(URL_SAFE_NO_PAD.encode(data)),
            ..Jwk::default()
        })
    } else {
        Err(format!("unsupported public key algorithm {alg}"))
    }
}

/// RFC 7518 encodes RSA integers without leading zero octets.
fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

/// Checks an `x509-svid` key and returns its certificate.
fn x509_key(key: &Jwk) -> Result<Vec<u8>, String> {
    let certs = key.x5c.as_deref().unwrap_or_default();
    let [cert_b64] = certs else {
        return Err(format!(
            "an x509-svid key needs exactly one certificate in x5c, found {}",
            certs.len()
        ));
    };
    let der = STANDARD
        .decode(cert_b64)
        .map_err(|e| format!("x5c is not standard base64: {e}"))?;
    let cert = parse_cert(&der).map_err(|e| e.to_string())?;
    if !cert.is_ca() {
        return Err("x5c certificate is not a CA (cA=true is required)".to_owned());
    }
    let actual = cert_key_jwk(&der)?;
    if key.kty != actual.kty {
        return Err(format!(
            "kty {} does not match the certificate's {} key",
            key.kty, actual.kty
        ));
    }
    for (name, given, want) in [
        ("crv", &key.crv, &actual.crv),
        ("x", &key.x, &actual.x),
        ("y", &key.y, &actual.y),
        ("n", &key.n, &actual.n),
        ("e", &key.e, &actual.e),
    ] {
        if given.is_some() && given != want {
            return Err(format!("{name} does not match the x5c certificate's key"));
        }
    }
    Ok(der)
}

/// Checks a `jwt-svid` key: a `kid` and complete, well-formed key members.
fn check_jwt_key(key: &Jwk) -> Result<(), String> {
    if key.kid.as_deref().is_none_or(str::is_empty) {
        return Err("a jwt-svid key must have a kid".to_owned());
    }
    let b64url = |name: &str, v: &Option<String>| -> Result<Vec<u8>, String> {
        let v = v.as_deref().ok_or_else(|| format!("missing {name}"))?;
        URL_SAFE_NO_PAD
            .decode(v)
            .map_err(|e| format!("{name} is not unpadded base64url: {e}"))
    };
    match key.kty.as_str() {
        "EC" => {
            let len = match key.crv.as_deref() {
                Some("P-256") => 32,
                Some("P-384") => 48,
                Some("P-521") => 66,
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            for (name, v) in [("x", &key.x), ("y", &key.y)] {
                if b64url(name, v)?.len() != len {
                    return Err(format!("{name} is not {len} bytes long"));
                }
            }
        }
        "RSA" => {
            b64url("n", &key.n)?;
            b64url("e", &key.e)?;
        }
        _ => {
            b64url("x", &key.x)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde_json::{Value, json};

    use super::*;
    use crate::jwt::JwtAuthority;
    use crate::x509::X509Authority;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_750_000_000)
    }

    const DAY: Duration = Duration::from_secs(86_400);

    fn sample() -> (Bundle, X509Authority, JwtAuthority) {
        let ca = X509Authority::generate(&td(), DAY, now()).unwrap();
        let jwt = JwtAuthority::generate(DAY, now()).unwrap();
        let mut b = Bundle::new(td());
        b.x509_authorities.push(ca.cert_der().to_vec());
        b.jwt_authorities.push(jwt.public_jwk());
        b.sequence = 7;
        b.refresh_hint = Some(300);
        (b, ca, jwt)
    }

    fn doc(b: &Bundle) -> Value {
        serde_json::from_str(&b.to_json()).unwrap()
    }

    #[test]
    fn pem_bundles_hold_ca_certificates_only() {
        let (_, ca, _) = sample();
        let pem = crate::pem::certs_to_pem(&[ca.cert_der().to_vec()]);
        let b = Bundle::from_pem(td(), &pem).unwrap();
        assert_eq!(b.x509_authorities, vec![ca.cert_der().to_vec()]);
        assert_eq!(Bundle::parse(td(), &pem).unwrap(), b);
        let json = b.to_json();
        assert_eq!(Bundle::parse(td(), &json).unwrap(), b);

        // A leaf SVID is not a trust anchor, in a PEM file as in JSON.
        let key = crate::keys::PrivateKey::generate_p256().unwrap();
        let id = "spiffe://example.org/web".parse().unwrap();
        let leaf = ca
            .sign_svid(
                &crate::x509::SvidRequest::new(&id, DAY),
                &key.public_key_spki_der(),
                now(),
            )
            .unwrap();
        let mixed = crate::pem::certs_to_pem(&[ca.cert_der().to_vec(), leaf]);
        let err = Bundle::parse(td(), &mixed).unwrap_err();
        assert!(
            matches!(&err, SvidError::BundleKey { index: 1, problem } if problem.contains("not a CA")),
            "{err}"
        );
        assert!(Bundle::parse(td(), "").is_err());
        assert!(Bundle::parse(td(), "not pem").is_err());
    }

    #[test]
    fn json_round_trip() {
        let (b, _, _) = sample();
        let again = Bundle::from_json(td(), &b.to_json()).unwrap();
        assert_eq!(again, b);
        let v = doc(&b);
        assert_eq!(v["spiffe_sequence"], json!(7));
        assert_eq!(v["spiffe_refresh_hint"], json!(300));
    }

    #[test]
    fn x509_key_members_follow_section_4_1() {
        let (b, ca, _) = sample();
        let v = doc(&b);
        let x509 = &v["keys"][0];
        assert_eq!(x509["use"], json!("x509-svid"));
        assert_eq!(x509["kty"], json!("EC"));
        assert_eq!(x509["crv"], json!("P-256"));
        assert!(x509.get("kid").is_none());
        assert_eq!(x509["x"].as_str().unwrap().len(), 43);
        assert_eq!(x509["y"].as_str().unwrap().len(), 43);
        assert_eq!(x509["x5c"], json!([STANDARD.encode(ca.cert_der())]));
        // The coordinates are those of the certificate's key.
        let point = ca.key().ec_public_point("test").unwrap();
        assert_eq!(x509["x"], json!(URL_SAFE_NO_PAD.encode(&point[1..33])));

        let jwt = &v["keys"][1];
        assert_eq!(jwt["use"], json!("jwt-svid"));
        assert!(jwt["kid"].is_string());
        assert_eq!(jwt["x"].as_str().unwrap().len(), 43);
    }

    #[test]
    fn unknown_use_and_kty_are_ignored() {
        let (b, _, _) = sample();
        let mut v = doc(&b);
        let keys = v["keys"].as_array_mut().unwrap();
        keys.push(json!({"kty":"EC","use":"foo","crv":"P-256","x":"a","y":"b"}));
        keys.push(json!({"kty":"OKP2","use":"x509-svid","x5c":["!!"]}));
        keys.push(json!({"kty":"EC","crv":"P-256"}));
        let again = Bundle::from_json(td(), &v.to_string()).unwrap();
        assert_eq!(again, b);
    }

    #[test]
    fn jwt_key_without_kid_is_an_error() {
        let (b, _, _) = sample();
        let mut v = doc(&b);
        v["keys"][1].as_object_mut().unwrap().remove("kid");
        let err = Bundle::from_json(td(), &v.to_string()).unwrap_err();
        assert!(
            matches!(err, SvidError::BundleKey { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("kid"), "{err}");
    }

    #[test]
    fn x5c_with_two_certificates_is_an_error() {
        let (b, ca, _) = sample();
        let mut v = doc(&b);
        let cert = STANDARD.encode(ca.cert_der());
        v["keys"][0]["x5c"] = json!([cert.clone(), cert]);
        let err = Bundle::from_json(td(), &v.to_string()).unwrap_err();
        assert!(
            matches!(err, SvidError::BundleKey { index: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("exactly one"), "{err}");

        v["keys"][0].as_object_mut().unwrap().remove("x5c");
        assert!(Bundle::from_json(td(), &v.to_string()).is_err());
    }

    #[test]
    fn x5c_must_be_a_ca_matching_the_key_members() {
        let (b, ca, _) = sample();
        let mut v = doc(&b);
        v["keys"][0]["x"] = v["keys"][1]["x"].clone();
        let err = Bundle::from_json(td(), &v.to_string()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        let key = crate::keys::PrivateKey::generate_p256().unwrap();
        let id = "spiffe://example.org/w".parse().unwrap();
        let leaf = ca
            .sign_svid(
                &crate::x509::SvidRequest {
                    spiffe_id: &id,
                    dns_names: &[],
                    ttl: DAY,
                    attributes: &[],
                },
                &key.public_key_spki_der(),
                now(),
            )
            .unwrap();
        let mut v = doc(&b);
        v["keys"][0] = json!({"kty":"EC","use":"x509-svid","x5c":[STANDARD.encode(leaf)]});
        let err = Bundle::from_json(td(), &v.to_string()).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn missing_keys_member_is_an_error() {
        assert!(matches!(
            Bundle::from_json(td(), r#"{"spiffe_sequence":1}"#),
            Err(SvidError::BundleJson(_))
        ));
        let empty = Bundle::from_json(td(), r#"{"keys":[]}"#).unwrap();
        assert!(empty.x509_authorities.is_empty() && empty.jwt_authorities.is_empty());
    }

    #[test]
    fn workload_forms() {
        let (b, ca, jwt) = sample();
        let jwks: Value = serde_json::from_slice(&b.workload_jwks()).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].get("use").is_none());
        assert_eq!(keys[0]["kid"], json!(jwt.kid()));
        assert!(jwks.get("spiffe_sequence").is_none());
        assert!(jwks.get("spiffe_refresh_hint").is_none());

        assert_eq!(b.x509_der_concat(), ca.cert_der());
        assert_eq!(
            crate::pem::pem_to_certs(&b.x509_pem()).unwrap(),
            vec![ca.cert_der().to_vec()]
        );
    }

    #[test]
    fn key_lookup_stays_in_its_trust_domain() {
        let (b, _, jwt) = sample();
        let other = TrustDomain::new("other.org").unwrap();
        assert!(b.jwt_key(&td(), jwt.kid()).is_some());
        assert!(b.jwt_key(&other, jwt.kid()).is_none());
        assert!(b.jwt_key(&td(), "nope").is_none());

        let mut set = BundleSet::default();
        set.insert(b.clone());
        set.insert(Bundle::new(other.clone()));
        assert!(set.jwt_key(&td(), jwt.kid()).is_some());
        assert!(set.jwt_key(&other, jwt.kid()).is_none());
        assert_eq!(set.len(), 2);
        assert_eq!(set.get(&td()), Some(&b));
        assert_eq!(
            set.iter()
                .map(|b| b.trust_domain.name())
                .collect::<Vec<_>>(),
            vec!["example.org", "other.org"]
        );
    }
}
