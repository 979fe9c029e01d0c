//! Signs N CSRs the way the server does (a CSR's proof of possession
//! checked, then a leaf minted for its key by one `LeafSigner`), and does N
//! bare P-256 signs and verifies, each in a function of its own, for
//! counting instructions load-independently:
//!
//! ```sh
//! cargo build --release -p sigil-svid --example sign_count
//! valgrind --tool=callgrind --toggle-collect='*sign_count::csrs*' target/release/examples/sign_count 2000
//! valgrind --tool=callgrind --toggle-collect='*sign_count::floor*' target/release/examples/sign_count 2000
//! ```
//!
//! Divide the instructions counted by N: instructions per CSR, against
//! instructions per sign + verify (docs/benchmarks.md).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    reason = "a measuring tool: a failure is reported by the panic"
)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use sigil_svid::keys::PrivateKey;
use sigil_svid::x509::{LeafSigner, SvidRequest, X509Authority, csr_public_key, make_csr};
use sigil_types::{SpiffeId, TrustDomain};

/// What the server does per CSR, for every CSR of `csrs`.
#[inline(never)]
fn csrs(signer: &LeafSigner<'_>, req: &SvidRequest<'_>, csrs: &[Vec<u8>], now: SystemTime) {
    for csr in csrs {
        let spki = csr_public_key(csr).unwrap();
        black_box(signer.sign_svid(req, &spki, now).unwrap());
    }
}

/// One bare sign and one bare verify (of a 256-byte message) per CSR: the floor.
#[inline(never)]
fn floor(pair: &EcdsaKeyPair, n: usize) {
    let rng = SystemRandom::new();
    let msg = [0x5a; 256];
    for _ in 0..n {
        let sig = pair.sign(&rng, black_box(&msg)).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref())
            .verify(&msg, sig.as_ref())
            .unwrap();
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(1000, |a| a.parse().expect("N, a number"));
    let td = TrustDomain::new("example.org").unwrap();
    let now = SystemTime::now();
    let ca = X509Authority::generate(&td, Duration::from_secs(86_400), now).unwrap();
    let id: SpiffeId = "spiffe://example.org/ns/payments/sa/api".parse().unwrap();
    let req = SvidRequest::new(&id, Duration::from_secs(3600));
    let list: Vec<Vec<u8>> = (0..n)
        .map(|_| make_csr(&PrivateKey::generate_p256().unwrap()).unwrap())
        .collect();
    let signer = ca.leaf_signer().unwrap();
    csrs(&signer, &req, &list, now);
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    floor(&pair, n);
}
