//! The one error type of this crate.

use sigil_types::SpiffeIdError;

use crate::keys::KeyAlgorithm;

/// Why a key, certificate, token or bundle operation failed.
///
/// Messages name the rule that was broken (with its spiffe.md section where
/// there is one) but never include key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    // --- keys -------------------------------------------------------------
    /// A private key is not an unencrypted ECDSA P-256 or RSA (2048 to 8192
    /// bits) PKCS#8 key.
    #[error("private key rejected: {0} (expected an unencrypted ECDSA P-256 or RSA PKCS#8 key)")]
    KeyRejected(String),
    /// An operation that needs an ECDSA P-256 key (certificates, CSRs, TLS,
    /// ES256) was given a key of another algorithm, or RS256 signing was asked
    /// of a P-256 key.
    #[error("{operation} needs an {needs} key; this key is {found}")]
    WrongKeyAlgorithm {
        /// What the key was needed for.
        operation: &'static str,
        /// The kind of key it needs: `ECDSA P-256` or `RSA`.
        needs: &'static str,
        /// The key's actual algorithm.
        found: KeyAlgorithm,
    },
    /// The system random number generator or a signing primitive failed.
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
    /// rustls refused a key or certificate handed to it.
    #[error("rustls rejected the key or certificate: {0}")]
    Tls(String),

    // --- encodings --------------------------------------------------------
    /// PEM text could not be decoded, or held no block of the wanted kind.
    #[error("PEM: {0}")]
    Pem(String),
    /// DER bytes are malformed or truncated (for example in concatenated certificates).
    #[error("malformed DER: {0}")]
    Der(String),
    /// A certificate could not be parsed as X.509.
    #[error("certificate could not be parsed: {0}")]
    CertParse(String),
    /// A SPIFFE ID or trust domain given to (or found by) this crate is invalid.
    #[error("invalid SPIFFE ID: {0}")]
    SpiffeId(#[from] SpiffeIdError),

    // --- minting ----------------------------------------------------------
    /// Building or signing a certificate or CSR failed.
    #[error("could not mint certificate: {0}")]
    Mint(String),
    /// The authority's certificate is not a CA (cA=true with keyCertSign).
    #[error("authority certificate is not a CA: {0}")]
    NotCa(String),
    /// A private key does not belong to the certificate it was paired with.
    #[error("private key does not match the certificate's public key")]
    KeyMismatch,
    /// A public key (SubjectPublicKeyInfo) could not be used.
    #[error("unsupported or malformed public key: {0}")]
    PublicKey(String),
    /// A CSR is malformed.
    #[error("invalid CSR: {0}")]
    Csr(String),
    /// A CSR's self-signature does not verify with the key it carries.
    #[error("CSR signature does not verify")]
    CsrSignature,

    // --- X509-SVID leaf rules (spiffe.md §2.1, §2.3) ----------------------
    /// The leaf has basicConstraints cA=true (§2.3 rule 2).
    #[error("X509-SVID leaf is a CA certificate (cA=true)")]
    LeafIsCa,
    /// The leaf has keyUsage keyCertSign or cRLSign (§2.3 rule 2).
    #[error("X509-SVID leaf has keyCertSign or cRLSign key usage")]
    LeafCanSign,
    /// The leaf has no keyUsage extension, or it lacks digitalSignature (§2.1).
    #[error("X509-SVID leaf lacks keyUsage digitalSignature")]
    LeafNoDigitalSignature,
    /// The leaf has zero or several URI SANs; exactly one is required (§2.3 rule 3).
    #[error("X509-SVID leaf must have exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    /// The leaf's URI SAN is not a valid SPIFFE ID (§2.3 rule 3).
    #[error("X509-SVID URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    BadUriSan {
        /// The URI as found in the certificate.
        uri: String,
        /// Why it was rejected.
        reason: SpiffeIdError,
    },
    /// The leaf's SPIFFE ID has no path, which only a CA's ID may lack (§2.3 rule 3).
    #[error("X509-SVID leaf ID {0} has no path")]
    LeafRootId(String),

    // --- chain validation (spiffe.md §2.3 rule 1) -------------------------
    /// No certificates were given to verify.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The chain is longer than the 16 certificates SPIFFE clients accept.
    #[error("certificate chain has {0} certificates; at most 16 are accepted")]
    ChainTooLong(usize),
    /// There are no trusted roots for the leaf's trust domain.
    #[error("no trusted roots for trust domain {0}")]
    NoRoots(String),
    /// A certificate after the leaf is not a CA with keyCertSign (§2.2).
    #[error("certificate {0} of the chain is not a CA with keyCertSign")]
    IntermediateNotCa(usize),
    /// A certificate of the chain has expired.
    #[error("certificate has expired")]
    Expired,
    /// A certificate of the chain is not valid yet.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// The chain does not lead to any of the trusted roots.
    #[error("certificate is not signed by a trusted root")]
    UntrustedIssuer,
    /// Path validation failed for another reason (bad signature, EKU, encoding...).
    #[error("certificate chain is invalid: {0}")]
    ChainInvalid(String),
    /// The peer authenticated, but its SPIFFE ID is not allowed here.
    #[error("the peer presented {presented}, but {expected} is required")]
    Unauthorized {
        /// The SPIFFE ID of the peer's verified certificate.
        presented: sigil_types::SpiffeId,
        /// What the authorizer allows, e.g. the one expected ID.
        expected: String,
    },

    // --- JWT-SVID (spiffe.md §3) ------------------------------------------
    /// The token is not three unpadded base64url segments of JSON objects (§3.3 step 1).
    #[error("malformed JWT: {0}")]
    JwtMalformed(String),
    /// The header's `alg` is not on the SPIFFE allow-list (§3.1).
    #[error("JWT algorithm {0:?} is not allowed for JWT-SVIDs")]
    JwtAlgorithm(String),
    /// The `alg` is on the SPIFFE allow-list but not supported by this implementation.
    #[error("JWT algorithm {0} is not supported")]
    JwtUnsupportedAlgorithm(String),
    /// The header's `typ` is neither absent, `JWT` nor `JOSE` (§3.1).
    #[error("JWT typ {0:?} is not allowed; use JWT or JOSE")]
    JwtTyp(String),
    /// The header has no `kid` (required de facto, §3.1).
    #[error("JWT header has no kid")]
    JwtMissingKid,
    /// A required claim (`sub`, `exp`, `aud`) is missing.
    #[error("JWT has no {0} claim")]
    JwtMissingClaim(&'static str),
    /// A claim has the wrong JSON type or value (for example a float `exp`).
    #[error("JWT claim {claim} is invalid: {reason}")]
    JwtBadClaim {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `sub` claim is not a SPIFFE ID (§3.3 step 3).
    #[error("JWT sub is not a SPIFFE ID: {0}")]
    JwtSubject(SpiffeIdError),
    /// No JWT authority with that `kid` in the bundle of `sub`'s trust domain (§3.3 step 4).
    #[error("no JWT authority with kid {kid:?} for trust domain {trust_domain}")]
    JwtUnknownKey {
        /// The trust domain of the token's subject.
        trust_domain: String,
        /// The key ID from the header.
        kid: String,
    },
    /// The key's type or curve does not fit the header's `alg` (§3.3 step 5).
    #[error("JWT alg {alg} cannot be used with a {kty} key")]
    JwtKeyMismatch {
        /// The header's algorithm.
        alg: String,
        /// The key's type (and curve).
        kty: String,
    },
    /// The signature does not verify with the authority's key (§3.3 step 5).
    #[error("JWT signature does not verify")]
    JwtSignature,
    /// The token expired (beyond the allowed clock skew) (§3.3 step 6).
    #[error("JWT has expired")]
    JwtExpired,
    /// The token's `nbf` or `iat` lies in the future (beyond the allowed clock skew).
    #[error("JWT is not valid yet")]
    JwtNotYetValid,
    /// The `aud` claim does not contain the validator's audience (§3.3 step 7).
    #[error("JWT audience does not include {0:?}")]
    JwtAudience(String),
    /// An empty audience list, or an empty audience string, was given.
    #[error("JWT audience must be a non-empty list of non-empty strings")]
    JwtEmptyAudience,
    /// The token's `iss` claim is missing, not a string, or not the issuer the
    /// validator requires.
    #[error(
        "JWT issuer {} does not match the required issuer {expected:?}",
        found.as_deref().unwrap_or("(none)")
    )]
    JwtIssuer {
        /// The issuer the validator requires.
        expected: String,
        /// The token's `iss` as JSON text (a string is quoted), or `None` when absent.
        found: Option<String>,
    },
    /// An extra claim given for minting has the name of a registered claim
    /// (`sub`, `aud`, `exp`, `iat`, `nbf`, `iss`, `jti`), which only sigil sets.
    #[error(
        "extra JWT claim {0:?} would override a registered claim (sub, aud, exp, iat, nbf, iss, jti); \
         set the issuer through JwtClaims::issuer"
    )]
    JwtReservedClaim(String),
    /// A JWT authority key type is not one of the configuration strings.
    #[error("unknown JWT key type {0:?}; expected \"ec-p256\" or \"rsa-2048\"")]
    JwtKeyType(String),

    // --- Kubernetes pod certificates ---------------------------------------
    /// A PodCertificateRequest's key is well formed but of a type Kubernetes
    /// pod certificates do not allow (ECDSA P-256, P-384, P-521, Ed25519,
    /// RSA 3072 and 4096 are allowed).
    #[error("unsupported pod certificate key type: {0}")]
    PodKeyType(String),
    /// A PodCertificateRequest's proofOfPossession is not a valid signature
    /// of the pod UID by its key.
    #[error("the proof of possession is not a signature of the pod UID by the requested key")]
    ProofOfPossession,
    /// A PodCertificateRequest carries neither or both of its key forms
    /// (pkixPublicKey with proofOfPossession, stubPKCS10Request).
    #[error("invalid pod certificate request: {0}")]
    PodKeyRequest(&'static str),

    // --- SVID attributes extension ------------------------------------------
    /// Identity attributes to put into an X509-SVID are invalid (an empty or
    /// duplicate name), or the extension in a certificate is malformed.
    #[error("invalid SVID attributes: {0}")]
    SvidAttributes(String),

    // --- bundles (spiffe.md §4.1) -----------------------------------------
    /// The bundle document is not valid JSON of the right shape (for example no `keys`).
    #[error("bundle is not a valid SPIFFE bundle document: {0}")]
    BundleJson(String),
    /// One key of a bundle is invalid.
    #[error("bundle key {index}: {problem}")]
    BundleKey {
        /// Index of the key in the `keys` array.
        index: usize,
        /// What is wrong with it.
        problem: String,
    },
}
