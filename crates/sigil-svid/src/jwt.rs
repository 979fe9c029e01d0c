//! JWT-SVIDs (spiffe.md §3): minting with ES256 or RS256, and validation per §3.3.
//!
//! Headers and claims are checked here, by hand, before any key is touched;
//! jsonwebtoken is used only to verify the signature with the authority's key.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::EcdsaKeyPair;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use sigil_types::bundle::USE_JWT_SVID;
use sigil_types::{Jwk, SpiffeId, TrustDomain};

use crate::SvidError;
use crate::keys::{PrivateKey, PublicParts};

/// Leeway applied to `exp` (and to a future `nbf` or `iat`) to tolerate clock
/// skew between the minting server and the validator.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The `alg` values a JWT-SVID may carry (spiffe.md §3.1); `none`, `HS*` and
/// `EdDSA` are refused.
pub const ALLOWED_ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

/// Registered claims (RFC 7519 §4.1) that sigil alone sets; [`JwtClaims::extra`]
/// may not name them.
pub const REGISTERED_CLAIMS: &[&str] = &["sub", "aud", "exp", "iat", "nbf", "iss", "jti"];

/// The most audiences one JWT-SVID may carry.
pub const MAX_AUDIENCES: usize = 32;
/// The longest audience accepted, in bytes (cloud audiences are URLs of
/// about a hundred bytes; tokens travel in HTTP headers).
pub const MAX_AUDIENCE_LEN: usize = 1024;

/// The audience rules for minting a JWT-SVID, applied by the agent (before
/// it spends any of its allowance at the server) and by the server: at least
/// one, at most [`MAX_AUDIENCES`], none empty or longer than
/// [`MAX_AUDIENCE_LEN`]. Returns why not.
pub fn check_audiences(audience: &[String]) -> Result<(), String> {
    if audience.is_empty() || audience.iter().any(String::is_empty) {
        return Err("audience must be specified and must not contain empty strings".into());
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(format!(
            "at most {MAX_AUDIENCES} audiences, got {}",
            audience.len()
        ));
    }
    if let Some(long) = audience.iter().find(|a| a.len() > MAX_AUDIENCE_LEN) {
        return Err(format!(
            "an audience is {} bytes long; the limit is {MAX_AUDIENCE_LEN}",
            long.len()
        ));
    }
    Ok(())
}

/// The key type of a JWT authority, as written in configuration.
///
/// `ec-p256` (the default) signs ES256; `rsa-2048` signs RS256, for relying
/// parties that accept only RSA (such as Azure).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum JwtKeyType {
    /// ECDSA P-256 with SHA-256 (`ES256`); configuration string `ec-p256`.
    #[default]
    #[serde(rename = "ec-p256")]
    Es256,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 (`RS256`); configuration string `rsa-2048`.
    #[serde(rename = "rsa-2048")]
    Rs256,
}

impl JwtKeyType {
    /// The configuration string: `ec-p256` or `rsa-2048`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Es256 => "ec-p256",
            Self::Rs256 => "rsa-2048",
        }
    }

    /// The JWS `alg` tokens signed with this key type carry.
    pub fn alg(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Rs256 => "RS256",
        }
    }

    /// Generates a fresh key of this type.
    pub fn generate_key(self) -> Result<PrivateKey, SvidError> {
        match self {
            Self::Es256 => PrivateKey::generate_p256(),
            Self::Rs256 => PrivateKey::generate_rsa2048(),
        }
    }
}

impl fmt::Display for JwtKeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JwtKeyType {
    type Err = SvidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ec-p256" => Ok(Self::Es256),
            "rsa-2048" => Ok(Self::Rs256),
            other => Err(SvidError::JwtKeyType(other.to_owned())),
        }
    }
}

/// Optional claims for [`JwtAuthority::sign_with`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JwtClaims {
    /// The `iss` claim; emitted only when set (SPIRE sets none by default,
    /// OIDC relying parties need one).
    pub issuer: Option<String>,
    /// Further claims, copied as given. A name from [`REGISTERED_CLAIMS`] is
    /// refused with [`SvidError::JwtReservedClaim`] rather than overriding.
    pub extra: Map<String, Value>,
}

/// A JWT signing authority: an ES256 (P-256) or RS256 (RSA) key with its key
/// ID and expiry.
#[derive(Clone)]
pub struct JwtAuthority {
    key: PrivateKey,
    kid: String,
    not_after: SystemTime,
    signer: Signer,
}

#[derive(Clone)]
enum Signer {
    // JWS needs fixed-width r||s signatures, unlike X.509's DER ones.
    Es256(Arc<EcdsaKeyPair>),
    Rs256,
}

impl std::fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("alg", &self.alg())
            .field("kid", &self.kid)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl JwtAuthority {
    /// Generates an ES256 (P-256) authority valid until `now + ttl`, with a
    /// random key ID of 32 base64url characters.
    pub fn generate(ttl: Duration, now: SystemTime) -> Result<Self, SvidError> {
        Self::generate_with(JwtKeyType::Es256, ttl, now)
    }

    /// Generates an authority of `key_type` valid until `now + ttl`, with a
    /// random key ID of 32 base64url characters.
    pub fn generate_with(
        key_type: JwtKeyType,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, SvidError> {
        let mut raw = [0u8; 24];
        aws_lc_rs::rand::fill(&mut raw)
            .map_err(|_| SvidError::Crypto("random number generator failed"))?;
        let kid = URL_SAFE_NO_PAD.encode(raw);
        let not_after = now
            .checked_add(ttl)
            .ok_or_else(|| SvidError::Mint("time out of range".to_owned()))?;
        Self::from_parts(key_type.generate_key()?, kid, not_after)
    }

    /// Rebuilds an authority from a stored key, key ID and expiry. The
    /// algorithm follows the key: ES256 for P-256, RS256 for RSA.
    pub fn from_parts(
        key: PrivateKey,
        kid: String,
        not_after: SystemTime,
    ) -> Result<Self, SvidError> {
        if kid.is_empty() {
            return Err(SvidError::JwtMissingKid);
        }
        let signer = if key.algorithm().is_rsa() {
            Signer::Rs256
        } else {
            Signer::Es256(Arc::new(key.fixed_signing_pair()?))
        };
        Ok(Self {
            key,
            kid,
            not_after,
            signer,
        })
    }

    /// The key ID put into every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// When the authority expires; no token outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// The key type: ES256 for a P-256 key, RS256 for an RSA key.
    pub fn key_type(&self) -> JwtKeyType {
        match self.signer {
            Signer::Es256(_) => JwtKeyType::Es256,
            Signer::Rs256 => JwtKeyType::Rs256,
        }
    }

    /// The JWS `alg` of every token this authority signs: `ES256` or `RS256`.
    pub fn alg(&self) -> &'static str {
        self.key_type().alg()
    }

    /// The public key as a bundle JWK with `kid` and `use` jwt-svid: kty EC,
    /// crv P-256 and full-length x/y for ES256; kty RSA with base64url `n` and
    /// `e` (no leading zero bytes, RFC 7518 §6.3.1) for RS256.
    pub fn public_jwk(&self) -> Jwk {
        let common = Jwk {
            key_use: Some(USE_JWT_SVID.to_owned()),
            kid: Some(self.kid.clone()),
            ..Jwk::default()
        };
        match self.key.public_parts() {
            PublicParts::EcP256(point) => {
                // An uncompressed P-256 point is 0x04 || x (32 bytes) || y (32 bytes).
                let coords = point.get(1..).unwrap_or_default();
                let (x, y) = coords.split_at(coords.len() / 2);
                Jwk {
                    kty: "EC".to_owned(),
                    crv: Some("P-256".to_owned()),
                    x: Some(URL_SAFE_NO_PAD.encode(x)),
                    y: Some(URL_SAFE_NO_PAD.encode(y)),
                    ..common
                }
            }
            PublicParts::Rsa { n, e } => Jwk {
                kty: "RSA".to_owned(),
                n: Some(URL_SAFE_NO_PAD.encode(n)),
                e: Some(URL_SAFE_NO_PAD.encode(e)),
                ..common
            },
        }
    }

    /// Mints a JWT-SVID. Header `{"alg":<alg>,"kid":..,"typ":"JWT"}` only;
    /// claims `sub`, `aud` (a string for one audience, an array otherwise;
    /// all requested audiences), integer `exp` = min(now + ttl, authority
    /// expiry) and integer `iat`. Fails if `audience` is empty or holds an
    /// empty string. Same as [`Self::sign_with`] with no issuer or extra claims.
    pub fn sign(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, SvidError> {
        self.sign_with(sub, audience, ttl, now, &JwtClaims::default())
    }

    /// Mints a JWT-SVID like [`Self::sign`], adding `iss` when
    /// `claims.issuer` is set and every claim of `claims.extra`. An extra
    /// claim named like a registered one ([`REGISTERED_CLAIMS`]) fails with
    /// [`SvidError::JwtReservedClaim`]; an empty issuer fails too.
    pub fn sign_with(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        claims: &JwtClaims,
    ) -> Result<String, SvidError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(SvidError::JwtEmptyAudience);
        }
        if let Some(name) = claims
            .extra
            .keys()
            .find(|k| REGISTERED_CLAIMS.contains(&k.as_str()))
        {
            return Err(SvidError::JwtReservedClaim(name.clone()));
        }
        if claims.issuer.as_deref() == Some("") {
            return Err(SvidError::JwtBadClaim {
                claim: "iss",
                reason: "must not be empty".to_owned(),
            });
        }
        if self.not_after <= now {
            return Err(SvidError::Mint("the JWT authority has expired".to_owned()));
        }
        let exp = now
            .checked_add(ttl)
            .ok_or_else(|| SvidError::Mint("time out of range".to_owned()))?
            .min(self.not_after);
        let aud = match audience {
            [one] => Value::String(one.clone()),
            many => Value::Array(many.iter().cloned().map(Value::String).collect()),
        };
        let mut header = Map::new();
        header.insert("alg".to_owned(), self.alg().into());
        header.insert("kid".to_owned(), self.kid.clone().into());
        header.insert("typ".to_owned(), "JWT".into());
        let mut body = claims.extra.clone();
        body.insert("sub".to_owned(), sub.as_str().into());
        body.insert("aud".to_owned(), aud);
        body.insert("exp".to_owned(), unix_secs(exp)?.into());
        body.insert("iat".to_owned(), unix_secs(now)?.into());
        if let Some(iss) = &claims.issuer {
            body.insert("iss".to_owned(), iss.clone().into());
        }
        self.sign_parts(&Value::Object(header), &Value::Object(body))
    }

    fn sign_parts(&self, header: &Value, claims: &Value) -> Result<String, SvidError> {
        let mut token = String::new();
        URL_SAFE_NO_PAD.encode_string(header.to_string(), &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims.to_string(), &mut token);
        let sig = match &self.signer {
            Signer::Es256(pair) => pair
                .sign(&SystemRandom::new(), token.as_bytes())
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SvidError::Crypto("ECDSA signing failed"))?,
            Signer::Rs256 => self.key.sign_rsa_pkcs1_sha256(token.as_bytes())?,
        };
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut token);
        Ok(token)
    }
}

/// The `alg` to advertise for a JWT authority's key, as an OIDC JWKS does
/// (see [`crate::jwks::default_alg`]).
pub use crate::jwks::default_alg as jwk_alg;

/// Finds the JWT authority that verifies a token.
pub trait JwtKeyLookup {
    /// The key with ID `kid` in the JWT bundle of trust domain `td`, if any.
    fn jwt_key(&self, td: &TrustDomain, kid: &str) -> Option<Jwk>;
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
    /// The `exp` claim.
    pub expiry: SystemTime,
}

/// Validates a JWT-SVID per spiffe.md §3.3 steps 1–8 and returns its subject
/// and claims.
///
/// 1. three unpadded base64url segments, header and claims JSON objects;
/// 2. `alg` on the SPIFFE allow-list ([`ALLOWED_ALGS`]), `typ` absent, `JWT`
///    or `JOSE`, `kid` present, no `crit` header;
/// 3. `sub` a SPIFFE ID, integer `exp`, `aud` a string or array of strings;
/// 4. the key found by `sub`'s trust domain and `kid`;
/// 5. key type fitting `alg`, then the signature verified;
/// 6. `exp` not in the past and `nbf`/`iat` not in the future, each with
///    [`CLOCK_SKEW`] leeway;
/// 7. `aud` containing `audience`.
///
/// The same as [`validate_jwt_with`] with default [`JwtValidation`] options.
pub fn validate_jwt(
    token: &str,
    audience: &str,
    keys: &dyn JwtKeyLookup,
    now: SystemTime,
) -> Result<ValidatedJwt, SvidError> {
    validate_jwt_with(token, audience, keys, now, &JwtValidation::default())
}

/// Further requirements for [`validate_jwt_with`]; the default adds none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JwtValidation<'a> {
    /// When set, the token's `iss` must be a string equal to it, else
    /// [`SvidError::JwtIssuer`].
    pub issuer: Option<&'a str>,
}

/// [`validate_jwt`] with further requirements from `options`, checked after
/// the signature and the audience.
pub fn validate_jwt_with(
    token: &str,
    audience: &str,
    keys: &dyn JwtKeyLookup,
    now: SystemTime,
    options: &JwtValidation<'_>,
) -> Result<ValidatedJwt, SvidError> {
    if audience.is_empty() {
        return Err(SvidError::JwtEmptyAudience);
    }
    // Step 1.
    let parts = split_token(token)?;
    let header = decode_object(parts.header, "header")?;
    let claims = decode_object(parts.claims, "claims")?;

    // Step 2.
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.as_str(),
        Some(_) => return Err(SvidError::JwtMalformed("alg is not a string".to_owned())),
        None => return Err(SvidError::JwtMalformed("header has no alg".to_owned())),
    };
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(SvidError::JwtAlgorithm(alg.to_owned()));
    }
    // Checked after alg so that `alg: none` with its empty signature is
    // reported as the refused algorithm it is.
    require_signature(&parts)?;
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(other) => {
            let shown = other
                .as_str()
                .map_or_else(|| other.to_string(), str::to_owned);
            return Err(SvidError::JwtTyp(shown));
        }
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.as_str(),
        _ => return Err(SvidError::JwtMissingKid),
    };
    if header.contains_key("crit") {
        // RFC 7515 §4.1.11: critical extensions we do not understand must be refused.
        return Err(SvidError::JwtMalformed(
            "crit header is not supported".to_owned(),
        ));
    }

    // Step 3.
    let subject = subject_claim(&claims)?;
    let exp = integer_claim(&claims, "exp")?.ok_or(SvidError::JwtMissingClaim("exp"))?;
    let auds = audience_claim(&claims)?;
    let nbf = integer_claim(&claims, "nbf")?;
    let iat = integer_claim(&claims, "iat")?;

    // Step 4.
    let td = subject.trust_domain();
    let jwk = keys
        .jwt_key(&td, kid)
        .ok_or_else(|| SvidError::JwtUnknownKey {
            trust_domain: td.to_string(),
            kid: kid.to_owned(),
        })?;

    // Step 5.
    let (algorithm, decoding_key) = crate::jwks::decoding_key(alg, &jwk)?;
    let signing_input = &token[..parts.header.len() + 1 + parts.claims.len()];
    match jsonwebtoken::crypto::verify(
        parts.signature,
        signing_input.as_bytes(),
        &decoding_key,
        algorithm,
    ) {
        Ok(true) => {}
        Ok(false) | Err(_) => return Err(SvidError::JwtSignature),
    }

    // Step 6.
    let now_secs = unix_secs(now)?;
    let skew = i64::try_from(CLOCK_SKEW.as_secs()).unwrap_or(i64::MAX);
    if now_secs >= exp.saturating_add(skew) {
        return Err(SvidError::JwtExpired);
    }
    for t in [nbf, iat].into_iter().flatten() {
        if t > now_secs.saturating_add(skew) {
            return Err(SvidError::JwtNotYetValid);
        }
    }

    // Step 7.
    if !auds.iter().any(|a| a == audience) {
        return Err(SvidError::JwtAudience(audience.to_owned()));
    }

    if let Some(expected) = options.issuer {
        match claims.get("iss") {
            Some(Value::String(iss)) if iss == expected => {}
            found => {
                return Err(SvidError::JwtIssuer {
                    expected: expected.to_owned(),
                    found: found.map(Value::to_string),
                });
            }
        }
    }

    // Step 8.
    Ok(ValidatedJwt {
        spiffe_id: subject,
        claims,
        expiry: from_unix_secs(exp),
    })
}

/// What a cache needs to know about a token it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtInfo {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// The `aud` claim, as a list.
    pub audience: Vec<String>,
    /// The `exp` claim.
    pub expiry: SystemTime,
}

/// Reads `sub`, `aud` and `exp` of a token WITHOUT verifying it; only for
/// tokens this process minted or fetched itself (caches).
pub fn parse_jwt_unverified(token: &str) -> Result<JwtInfo, SvidError> {
    let parts = split_token(token)?;
    require_signature(&parts)?;
    let claims = decode_object(parts.claims, "claims")?;
    let spiffe_id = subject_claim(&claims)?;
    let exp = integer_claim(&claims, "exp")?.ok_or(SvidError::JwtMissingClaim("exp"))?;
    Ok(JwtInfo {
        spiffe_id,
        audience: audience_claim(&claims)?,
        expiry: from_unix_secs(exp),
    })
}

struct TokenParts<'a> {
    header: &'a str,
    claims: &'a str,
    signature: &'a str,
}

fn split_token(token: &str) -> Result<TokenParts<'_>, SvidError> {
    let mut it = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(SvidError::JwtMalformed(
            "a JWT-SVID has exactly three segments (JWS compact serialization)".to_owned(),
        ));
    };
    for (name, seg) in [
        ("header", header),
        ("claims", claims),
        ("signature", signature),
    ] {
        // An empty signature is refused by require_signature, once the
        // header has been read.
        if seg.is_empty() && name != "signature" {
            return Err(SvidError::JwtMalformed(format!("{name} segment is empty")));
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(SvidError::JwtMalformed(format!(
                "{name} segment is not unpadded base64url"
            )));
        }
    }
    Ok(TokenParts {
        header,
        claims,
        signature,
    })
}

fn require_signature(parts: &TokenParts<'_>) -> Result<(), SvidError> {
    if parts.signature.is_empty() {
        return Err(SvidError::JwtMalformed(
            "signature segment is empty".to_owned(),
        ));
    }
    Ok(())
}

fn decode_object(segment: &str, name: &str) -> Result<Map<String, Value>, SvidError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|e| SvidError::JwtMalformed(format!("{name}: {e}")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(SvidError::JwtMalformed(format!(
            "{name} is not a JSON object"
        ))),
        Err(e) => Err(SvidError::JwtMalformed(format!("{name}: {e}"))),
    }
}

fn subject_claim(claims: &Map<String, Value>) -> Result<SpiffeId, SvidError> {
    match claims.get("sub") {
        Some(Value::String(sub)) => sub.parse().map_err(SvidError::JwtSubject),
        Some(_) => Err(SvidError::JwtBadClaim {
            claim: "sub",
            reason: "must be a string".to_owned(),
        }),
        None => Err(SvidError::JwtMissingClaim("sub")),
    }
}

/// A NumericDate claim that must be an integer: rust-spiffe deserializes
/// `exp` as i64, so a float would break interop (spiffe.md §3.1).
fn integer_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, SvidError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            n.as_i64().map(Some).ok_or_else(|| SvidError::JwtBadClaim {
                claim: name,
                reason: "out of range".to_owned(),
            })
        }
        Some(_) => Err(SvidError::JwtBadClaim {
            claim: name,
            reason: "must be an integer number of seconds".to_owned(),
        }),
    }
}

fn audience_claim(claims: &Map<String, Value>) -> Result<Vec<String>, SvidError> {
    let bad = || SvidError::JwtBadClaim {
        claim: "aud",
        reason: "must be a string or a non-empty array of strings".to_owned(),
    };
    match claims.get("aud") {
        Some(Value::String(a)) => Ok(vec![a.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
        None => Err(SvidError::JwtMissingClaim("aud")),
    }
}

fn unix_secs(t: SystemTime) -> Result<i64, SvidError> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .ok_or_else(|| SvidError::Mint("time out of range".to_owned()))
}

fn from_unix_secs(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::bundle::{Bundle, BundleSet};

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_750_000_000)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn sub() -> SpiffeId {
        "spiffe://example.org/ns/web".parse().unwrap()
    }

    fn aud(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    struct Fixture {
        auth: JwtAuthority,
        other_td_auth: JwtAuthority,
        keys: BundleSet,
    }

    fn fixture() -> Fixture {
        let auth = JwtAuthority::generate(24 * HOUR, now()).unwrap();
        let other_td_auth = JwtAuthority::generate(24 * HOUR, now()).unwrap();
        let mut own = Bundle::new(td("example.org"));
        own.jwt_authorities.push(auth.public_jwk());
        let mut other = Bundle::new(td("other.org"));
        other.jwt_authorities.push(other_td_auth.public_jwk());
        let mut keys = BundleSet::default();
        keys.insert(own);
        keys.insert(other);
        Fixture {
            auth,
            other_td_auth,
            keys,
        }
    }

    fn claims(exp: Value) -> Value {
        json!({"sub": sub().as_str(), "aud": "db", "exp": exp, "iat": 1_750_000_000})
    }

    fn header(auth: &JwtAuthority, alg: &str) -> Value {
        json!({"alg": alg, "kid": auth.kid(), "typ": "JWT"})
    }

    fn segments(token: &str) -> Vec<Value> {
        token
            .split('.')
            .take(2)
            .map(|s| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn sign_then_validate() {
        let f = fixture();
        let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        let v = validate_jwt(&token, "db", &f.keys, now()).unwrap();
        assert_eq!(v.spiffe_id, sub());
        assert_eq!(v.expiry, now() + HOUR);
        assert_eq!(v.claims["iat"], json!(1_750_000_000));

        let seg = segments(&token);
        assert_eq!(
            seg[0],
            json!({"alg":"ES256","kid":f.auth.kid(),"typ":"JWT"})
        );
        assert_eq!(seg[1]["aud"], json!("db"), "one audience is a string");
        assert!(seg[1]["exp"].is_i64());
        assert_eq!(f.auth.kid().len(), 32);
    }

    #[test]
    fn several_audiences_are_an_array() {
        let f = fixture();
        let token = f.auth.sign(&sub(), &aud(&["a", "b"]), HOUR, now()).unwrap();
        assert_eq!(segments(&token)[1]["aud"], json!(["a", "b"]));
        assert!(validate_jwt(&token, "b", &f.keys, now()).is_ok());
        let info = parse_jwt_unverified(&token).unwrap();
        assert_eq!(info.audience, aud(&["a", "b"]));
        assert_eq!(info.spiffe_id, sub());
        assert_eq!(info.expiry, now() + HOUR);
    }

    #[test]
    fn exp_is_capped_at_the_authority() {
        let auth = JwtAuthority::generate(HOUR, now()).unwrap();
        let token = auth.sign(&sub(), &aud(&["db"]), 10 * HOUR, now()).unwrap();
        assert_eq!(parse_jwt_unverified(&token).unwrap().expiry, now() + HOUR);
    }

    #[test]
    fn empty_audiences_are_refused() {
        let f = fixture();
        assert_eq!(
            f.auth.sign(&sub(), &[], HOUR, now()).unwrap_err(),
            SvidError::JwtEmptyAudience
        );
        assert_eq!(
            f.auth
                .sign(&sub(), &aud(&["a", ""]), HOUR, now())
                .unwrap_err(),
            SvidError::JwtEmptyAudience
        );
    }

    #[test]
    fn public_jwk_has_full_length_coordinates() {
        let f = fixture();
        let jwk = f.auth.public_jwk();
        assert_eq!(jwk.kty, "EC");
        assert_eq!(jwk.crv.as_deref(), Some("P-256"));
        assert_eq!(jwk.key_use.as_deref(), Some("jwt-svid"));
        assert_eq!(jwk.kid.as_deref(), Some(f.auth.kid()));
        assert_eq!(jwk.x.as_ref().unwrap().len(), 43);
        assert_eq!(jwk.y.as_ref().unwrap().len(), 43);
    }

    /// Each attack gets its own error, so a regression in one check cannot hide
    /// behind another.
    #[test]
    fn attacks_are_rejected() {
        let f = fixture();
        let good_exp = json!(1_750_003_600);
        let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());

        // alg none, no signature.
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg":"none","kid":f.auth.kid()})),
            b64(&claims(good_exp.clone()))
        );
        assert_eq!(
            validate_jwt(&none, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtAlgorithm("none".to_owned())
        );
        let none_sig = format!("{none}AAAA");
        assert_eq!(
            validate_jwt(&none_sig, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtAlgorithm("none".to_owned())
        );

        // HS256 keyed with the public key bytes (algorithm confusion).
        let hs_input = format!(
            "{}.{}",
            b64(&header(&f.auth, "HS256")),
            b64(&claims(good_exp.clone()))
        );
        let secret = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &f.auth.key().public_key_spki_der(),
        );
        let tag = aws_lc_rs::hmac::sign(&secret, hs_input.as_bytes());
        let hs = format!("{hs_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        assert_eq!(
            validate_jwt(&hs, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtAlgorithm("HS256".to_owned())
        );

        // Missing kid.
        let no_kid = f
            .auth
            .sign_parts(
                &json!({"alg":"ES256","typ":"JWT"}),
                &claims(good_exp.clone()),
            )
            .unwrap();
        assert_eq!(
            validate_jwt(&no_kid, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtMissingKid
        );

        // Unknown kid.
        let unknown = f
            .auth
            .sign_parts(
                &json!({"alg":"ES256","kid":"nope"}),
                &claims(good_exp.clone()),
            )
            .unwrap();
        assert_eq!(
            validate_jwt(&unknown, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtUnknownKey {
                trust_domain: "example.org".to_owned(),
                kid: "nope".to_owned()
            }
        );

        // Wrong audience.
        let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        assert_eq!(
            validate_jwt(&token, "cache", &f.keys, now()).unwrap_err(),
            SvidError::JwtAudience("cache".to_owned())
        );

        // Expired beyond the skew, but accepted within it.
        let at_exp = now() + HOUR;
        assert!(
            validate_jwt(
                &token,
                "db",
                &f.keys,
                at_exp + CLOCK_SKEW - Duration::from_secs(1)
            )
            .is_ok()
        );
        assert_eq!(
            validate_jwt(&token, "db", &f.keys, at_exp + CLOCK_SKEW).unwrap_err(),
            SvidError::JwtExpired
        );

        // Float exp.
        let float = f
            .auth
            .sign_parts(&header(&f.auth, "ES256"), &claims(json!(1_750_003_600.5)))
            .unwrap();
        assert!(matches!(
            validate_jwt(&float, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtBadClaim { claim: "exp", .. }
        ));

        // sub not a SPIFFE ID.
        let bad_sub = f
            .auth
            .sign_parts(
                &header(&f.auth, "ES256"),
                &json!({"sub":"https://example.org/web","aud":"db","exp":1_750_003_600}),
            )
            .unwrap();
        assert!(matches!(
            validate_jwt(&bad_sub, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtSubject(_)
        ));

        // A key of another trust domain: its kid is unknown in the subject's bundle...
        let foreign = f
            .other_td_auth
            .sign(&sub(), &aud(&["db"]), HOUR, now())
            .unwrap();
        assert_eq!(
            validate_jwt(&foreign, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtUnknownKey {
                trust_domain: "example.org".to_owned(),
                kid: f.other_td_auth.kid().to_owned()
            }
        );
        // ...and claiming our kid while signing with the foreign key fails the signature.
        let forged = f
            .other_td_auth
            .sign_parts(&header(&f.auth, "ES256"), &claims(good_exp.clone()))
            .unwrap();
        assert_eq!(
            validate_jwt(&forged, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtSignature
        );

        // RS256 header naming an EC key.
        let rs = f
            .auth
            .sign_parts(&header(&f.auth, "RS256"), &claims(good_exp.clone()))
            .unwrap();
        assert_eq!(
            validate_jwt(&rs, "db", &f.keys, now()).unwrap_err(),
            SvidError::JwtKeyMismatch {
                alg: "RS256".to_owned(),
                kty: "EC P-256".to_owned()
            }
        );
    }

    #[test]
    fn structural_checks() {
        let f = fixture();
        let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        let v = |t: &str| validate_jwt(t, "db", &f.keys, now()).unwrap_err();

        assert!(matches!(v("a.b"), SvidError::JwtMalformed(_)));
        assert!(matches!(
            v(&format!("{token}.x")),
            SvidError::JwtMalformed(_)
        ));
        assert!(matches!(
            v(&format!("{token}=")),
            SvidError::JwtMalformed(_)
        ));

        // A flipped signature byte.
        let mut chars: Vec<char> = token.chars().collect();
        let last = chars.len() - 3;
        chars[last] = if chars[last] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert_eq!(v(&tampered), SvidError::JwtSignature);

        let typ = f
            .auth
            .sign_parts(
                &json!({"alg":"ES256","kid":f.auth.kid(),"typ":"at+jwt"}),
                &claims(json!(1_750_003_600)),
            )
            .unwrap();
        assert_eq!(v(&typ), SvidError::JwtTyp("at+jwt".to_owned()));
        let jose = f
            .auth
            .sign_parts(
                &json!({"alg":"ES256","kid":f.auth.kid(),"typ":"JOSE"}),
                &claims(json!(1_750_003_600)),
            )
            .unwrap();
        assert!(validate_jwt(&jose, "db", &f.keys, now()).is_ok());
        let no_typ = f
            .auth
            .sign_parts(
                &json!({"alg":"ES256","kid":f.auth.kid()}),
                &claims(json!(1_750_003_600)),
            )
            .unwrap();
        assert!(validate_jwt(&no_typ, "db", &f.keys, now()).is_ok());

        let eddsa = f
            .auth
            .sign_parts(&header(&f.auth, "EdDSA"), &claims(json!(1_750_003_600)))
            .unwrap();
        assert_eq!(v(&eddsa), SvidError::JwtAlgorithm("EdDSA".to_owned()));

        let no_exp = f
            .auth
            .sign_parts(
                &header(&f.auth, "ES256"),
                &json!({"sub": sub().as_str(), "aud": "db"}),
            )
            .unwrap();
        assert_eq!(v(&no_exp), SvidError::JwtMissingClaim("exp"));
        let no_sub = f
            .auth
            .sign_parts(
                &header(&f.auth, "ES256"),
                &json!({"aud": "db", "exp": 1_750_003_600}),
            )
            .unwrap();
        assert_eq!(v(&no_sub), SvidError::JwtMissingClaim("sub"));

        let future = f
            .auth
            .sign_parts(
                &header(&f.auth, "ES256"),
                &json!({"sub": sub().as_str(), "aud": ["x", "db"], "exp": 1_750_003_600, "nbf": 1_750_000_100}),
            )
            .unwrap();
        assert_eq!(v(&future), SvidError::JwtNotYetValid);
        assert_eq!(
            validate_jwt(&token, "", &f.keys, now()).unwrap_err(),
            SvidError::JwtEmptyAudience
        );
    }

    #[test]
    fn empty_signature_is_malformed_after_the_alg_check() {
        let f = fixture();
        let token = f.auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        let (input, _) = token.rsplit_once('.').unwrap();
        let unsigned = format!("{input}.");
        let want = SvidError::JwtMalformed("signature segment is empty".to_owned());
        assert_eq!(
            validate_jwt(&unsigned, "db", &f.keys, now()).unwrap_err(),
            want
        );
        assert_eq!(parse_jwt_unverified(&unsigned).unwrap_err(), want);
        assert!(matches!(
            validate_jwt(&format!(".{input}"), "db", &f.keys, now()),
            Err(SvidError::JwtMalformed(_))
        ));
    }

    #[test]
    fn rs256_authority_from_parts_follows_the_key() {
        let key = PrivateKey::generate_rsa2048().unwrap();
        let auth = JwtAuthority::from_parts(key, "k1".to_owned(), now() + HOUR).unwrap();
        assert_eq!((auth.alg(), auth.key_type()), ("RS256", JwtKeyType::Rs256));
        assert!(format!("{auth:?}").contains("RS256"));
        let mut bundle = Bundle::new(td("example.org"));
        bundle.jwt_authorities.push(auth.public_jwk());
        let token = auth.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        assert_eq!(segments(&token)[0]["alg"], json!("RS256"));
        assert!(validate_jwt(&token, "db", &bundle, now()).is_ok());
    }

    #[test]
    fn authority_round_trips_through_parts() {
        let f = fixture();
        let again = JwtAuthority::from_parts(
            f.auth.key().clone(),
            f.auth.kid().to_owned(),
            f.auth.not_after(),
        )
        .unwrap();
        let token = again.sign(&sub(), &aud(&["db"]), HOUR, now()).unwrap();
        assert!(validate_jwt(&token, "db", &f.keys, now()).is_ok());
        assert!(!format!("{again:?}").contains("PrivateKey"));
        assert_eq!(
            JwtAuthority::from_parts(f.auth.key().clone(), String::new(), now()).unwrap_err(),
            SvidError::JwtMissingKid
        );
    }
}
