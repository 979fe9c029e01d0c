//! The SPIFFE bundle document: a JWKS with `spiffe_sequence`,
//! `spiffe_refresh_hint` and per-key `use` (SPIFFE Trust Domain and Bundle §4).
//!
//! Only the serde shape lives here; building and checking keys is the job of
//! `sigil-svid`.

use serde::{Deserialize, Serialize};

/// `use` of a key that verifies X509-SVIDs.
pub const USE_X509_SVID: &str = "x509-svid";
/// `use` of a key that verifies JWT-SVIDs.
pub const USE_JWT_SVID: &str = "jwt-svid";

/// A trust domain's bundle in SPIFFE JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleDocument {
    /// Every authority of the trust domain; an empty list distrusts it all.
    pub keys: Vec<Jwk>,
    /// Increases on every change of the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_sequence: Option<u64>,
    /// How often, in seconds, consumers should refresh it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_refresh_hint: Option<u64>,
}

/// One key of a SPIFFE bundle (a JSON Web Key with SPIFFE's members).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `EC` or `RSA`.
    pub kty: String,
    /// `x509-svid` or `jwt-svid`; `None` when the consumer omits it.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
    /// Key ID; required for JWT keys, absent for X.509 authorities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The CA certificate (standard base64 DER), for X.509 authorities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
    /// EC curve, e.g. `P-256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC x coordinate (base64url, full curve length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate (base64url, full curve length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_member_is_required() {
        let err = serde_json::from_str::<BundleDocument>(r#"{"spiffe_sequence":1}"#).unwrap_err();
        assert!(err.to_string().contains("keys"), "{err}");
        let empty: BundleDocument = serde_json::from_str(r#"{"keys":[]}"#).unwrap();
        assert!(empty.keys.is_empty());
    }

    #[test]
    fn use_member_round_trips() {
        let doc: BundleDocument = serde_json::from_str(
            r#"{"keys":[{"kty":"EC","use":"jwt-svid","kid":"k1","crv":"P-256","x":"a","y":"b","extra":1}],"spiffe_refresh_hint":300}"#,
        )
        .unwrap();
        assert_eq!(doc.keys[0].key_use.as_deref(), Some(USE_JWT_SVID));
        let out = serde_json::to_string(&doc).unwrap();
        assert!(out.contains(r#""use":"jwt-svid""#), "{out}");
        assert!(!out.contains("extra"));
    }
}
