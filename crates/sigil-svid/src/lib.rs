//! Keys, X509-SVIDs, JWT-SVIDs, SPIFFE bundles and the rustls glue that
//! authenticates peers by SPIFFE ID.
//!
//! Everything cryptographic in sigil goes through this crate, and through one
//! provider: aws-lc-rs (call [`install_crypto_provider`] at start-up).
//!
//! | module | what it holds |
//! |---|---|
//! | [`keys`] | ECDSA P-256 and RSA private keys (zeroized, redacted) and private files (0600 in 0700 directories) |
//! | [`x509`] | minting CA certificates and leaf X509-SVIDs (spiffe.md §2), CSRs, SVID verification, identity attributes |
//! | [`jwks`] | JWK → verification key (alg/kty rules, RSA ≥ 2048 bits) and JWKS documents |
//! | [`jwt`] | minting (ES256 or RS256) and validating JWT-SVIDs (spiffe.md §3) |
//! | [`bundle`] | SPIFFE bundles in JSON, DER and JWKS form (spiffe.md §4) |
//! | [`pem`] | PEM encoding of certificate chains |
//! | [`pod_certificate`] | the key and proof of possession of a Kubernetes PodCertificateRequest |
//! | [`tls`] | the rustls verifiers: SPIFFE (server and client, authorizing by SPIFFE ID), Web PKI, and `danger`; a rotating certificate resolver |
//!
//! ```no_run
//! use std::time::{Duration, SystemTime};
//! use sigil_svid::{keys::PrivateKey, x509::{X509Authority, SvidRequest, make_csr, csr_public_key, verify_svid}};
//! use sigil_types::{SpiffeId, TrustDomain};
//!
//! # fn main() -> Result<(), sigil_svid::SvidError> {
//! let td = TrustDomain::new("example.org").map_err(sigil_svid::SvidError::from)?;
//! let now = SystemTime::now();
//! let ca = X509Authority::generate(&td, Duration::from_secs(86400), now)?;
//! let workload_key = PrivateKey::generate_p256()?;
//! let spki = csr_public_key(&make_csr(&workload_key)?)?;
//! let id: SpiffeId = "spiffe://example.org/web".parse().map_err(sigil_svid::SvidError::from)?;
//! let leaf = ca.sign_svid(
//!     &SvidRequest { spiffe_id: &id, dns_names: &[], ttl: Duration::from_secs(3600), attributes: &[] },
//!     &spki,
//!     now,
//! )?;
//! assert_eq!(verify_svid(&[leaf], &[ca.cert_der().to_vec()], now)?, id);
//! # Ok(())
//! # }
//! ```

pub mod bundle;
mod der;
mod error;
mod hex;
pub mod jwks;
pub mod jwt;
pub mod keys;
mod leaf;
pub mod pem;
pub mod pod_certificate;
pub mod tls;
pub mod x509;

pub use error::SvidError;

/// Installs aws-lc-rs as the process-wide rustls crypto provider.
///
/// Idempotent: a provider installed earlier (by this call or by anyone else)
/// is left in place, since rustls allows only one per process.
pub fn install_crypto_provider() {
    // An Err only says a provider is already installed, which is the goal.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
