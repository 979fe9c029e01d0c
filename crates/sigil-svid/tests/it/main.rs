//! Integration tests of sigil-svid through its public API only: JWT-SVID
//! attacks, RS256 authorities checked by an independent verifier, and the
//! X509-SVID identity-attributes extension checked by OpenSSL.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

mod hostile;
mod jwt_attacks;
mod jwt_rsa;
mod support;
mod x509_attributes;
