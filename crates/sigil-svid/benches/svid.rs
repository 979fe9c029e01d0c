//! Hot paths of sigil-svid beside their raw baselines, measured in the same
//! run: X509-SVID minting (without and with the workload key generation), CSR
//! creation and verification, SVID chain verification, JWT-SVID signing and
//! validation, and a mutual-TLS handshake with the SPIFFE verifiers.
//!
//! Baselines (group `baseline`): aws-lc-rs ECDSA P-256 key generation, sign
//! and verify, and a plain rustls mutual-TLS handshake with the stock webpki
//! verifiers on the same certificates. Compare each sigil figure with its
//! baseline from the same run; see docs/benchmarks.md.
//!
//! `cargo bench -p sigil-svid --bench svid`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "benchmark setup: a failure is a broken benchmark, reported by the panic"
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, UnparsedPublicKey,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil_svid::bundle::Bundle;
use sigil_svid::jwt::{JwtAuthority, validate_jwt};
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::{Authorize, SpiffeClientVerifier, SpiffeServerVerifier, StaticTrust};
use sigil_svid::x509::{SvidRequest, X509Authority, csr_public_key, make_csr, verify_svid};
use sigil_types::{SpiffeId, TrustDomain};

const MSG: &[u8] = &[0x5a; 256];

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn authority() -> X509Authority {
    X509Authority::generate(&td(), Duration::from_secs(24 * 3600), SystemTime::now()).unwrap()
}

fn baseline(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Elements(1));
    g.bench_function("p256_keygen", |b| {
        b.iter(|| EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap())
    });
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    g.bench_function("p256_sign", |b| {
        b.iter(|| pair.sign(&rng, black_box(MSG)).unwrap())
    });
    let sig = pair.sign(&rng, MSG).unwrap();
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref());
    g.bench_function("p256_verify", |b| {
        b.iter(|| public.verify(black_box(MSG), sig.as_ref()).unwrap())
    });
    let fixed = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    g.bench_function("es256_sign_fixed", |b| {
        b.iter(|| fixed.sign(&rng, black_box(MSG)).unwrap())
    });
    let fsig = fixed.sign(&rng, MSG).unwrap();
    let fpublic = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, fixed.public_key().as_ref());
    g.bench_function("es256_verify_fixed", |b| {
        b.iter(|| fpublic.verify(black_box(MSG), fsig.as_ref()).unwrap())
    });
    g.finish();
}

fn x509(c: &mut Criterion) {
    let ca = authority();
    let id: SpiffeId = "spiffe://example.org/ns/payments/sa/api".parse().unwrap();
    let req = SvidRequest {
        spiffe_id: &id,
        dns_names: &[],
        ttl: Duration::from_secs(3600),
        attributes: &[],
    };
    let key = PrivateKey::generate_p256().unwrap();
    let spki = key.public_key_spki_der();
    let csr = make_csr(&key).unwrap();
    let now = SystemTime::now();
    let leaf = ca.sign_svid(&req, &spki, now).unwrap();
    let roots = vec![ca.cert_der().to_vec()];

    let mut g = c.benchmark_group("x509");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mint_svid_excl_keygen", |b| {
        b.iter(|| ca.sign_svid(&req, black_box(&spki), now).unwrap())
    });
    g.bench_function("mint_svid_incl_keygen", |b| {
        b.iter(|| {
            let k = PrivateKey::generate_p256().unwrap();
            ca.sign_svid(&req, &k.public_key_spki_der(), now).unwrap()
        })
    });
    g.bench_function("make_csr_excl_keygen", |b| {
        b.iter(|| make_csr(black_box(&key)).unwrap())
    });
    g.bench_function("csr_verify", |b| {
        b.iter(|| csr_public_key(black_box(&csr)).unwrap())
    });
    g.bench_function("server_sign_csr", |b| {
        // What the server does per CSR: verify it, then mint.
        b.iter(|| {
            let spki = csr_public_key(black_box(&csr)).unwrap();
            ca.sign_svid(&req, &spki, now).unwrap()
        })
    });
    g.bench_function("verify_svid", |b| {
        b.iter(|| verify_svid(black_box(std::slice::from_ref(&leaf)), &roots, now).unwrap())
    });
    g.finish();
}

fn jwt(c: &mut Criterion) {
    let now = SystemTime::now();
    let authority = JwtAuthority::generate(Duration::from_secs(24 * 3600), now).unwrap();
    let id: SpiffeId = "spiffe://example.org/ns/payments/sa/api".parse().unwrap();
    let aud = vec!["https://api.example.com".to_owned()];
    let token = authority
        .sign(&id, &aud, Duration::from_secs(300), now)
        .unwrap();
    let mut bundle = Bundle::new(td());
    bundle.jwt_authorities.push(authority.public_jwk());

    let mut g = c.benchmark_group("jwt");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| {
        b.iter(|| {
            authority
                .sign(black_box(&id), &aud, Duration::from_secs(300), now)
                .unwrap()
        })
    });
    g.bench_function("validate", |b| {
        b.iter(|| validate_jwt(black_box(&token), &aud[0], &bundle, now).unwrap())
    });
    g.finish();
}

/// Drives a client and a server connection through a full handshake in memory.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) {
    let name = ServerName::try_from("bench.example.org").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::new();
    for _ in 0..32 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return;
        }
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
    }
    panic!("handshake did not finish");
}

/// Client and server configs, plain rustls (webpki) and SPIFFE, over the same
/// SVIDs; resumption is off so every handshake verifies certificates.
fn tls_configs() -> [(Arc<ClientConfig>, Arc<ServerConfig>); 2] {
    sigil_svid::install_crypto_provider();
    let ca = authority();
    let now = SystemTime::now();
    let server_id: SpiffeId = "spiffe://example.org/sigil/server".parse().unwrap();
    let client_id: SpiffeId = "spiffe://example.org/sigil/agent/join_token/x"
        .parse()
        .unwrap();
    let dns = vec!["bench.example.org".to_owned()];
    let mint = |id: &SpiffeId, dns: &[String]| {
        let key = PrivateKey::generate_p256().unwrap();
        let req = SvidRequest {
            spiffe_id: id,
            dns_names: dns,
            ttl: Duration::from_secs(3600),
            attributes: &[],
        };
        let leaf = ca.sign_svid(&req, &key.public_key_spki_der(), now).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
        (vec![CertificateDer::from(leaf)], der)
    };
    let (server_chain, server_key) = mint(&server_id, &dns);
    let (client_chain, client_key) = mint(&client_id, &[]);

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .unwrap();
    let roots = Arc::new(roots);
    let trust = Arc::new(StaticTrust(BTreeMap::from([(
        td(),
        vec![ca.cert_der().to_vec()],
    )])));

    let finish_client = |mut c: ClientConfig| {
        c.resumption = Resumption::disabled();
        Arc::new(c)
    };
    let finish_server = |mut s: ServerConfig| {
        s.session_storage = Arc::new(NoServerSessionStorage {});
        s.send_tls13_tickets = 0;
        Arc::new(s)
    };
    let plain_client = ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(client_chain.clone(), client_key.clone_key())
        .unwrap();
    let plain_server = ServerConfig::builder()
        .with_client_cert_verifier(WebPkiClientVerifier::builder(roots).build().unwrap())
        .with_single_cert(server_chain.clone(), server_key.clone_key())
        .unwrap();
    let spiffe_client = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            trust.clone(),
            Authorize::Exact(server_id),
        )))
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();
    let spiffe_server = ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            trust,
            Authorize::AnyInTrustDomain(td()),
            false,
        )))
        .with_single_cert(server_chain, server_key)
        .unwrap();
    [
        (finish_client(plain_client), finish_server(plain_server)),
        (finish_client(spiffe_client), finish_server(spiffe_server)),
    ]
}

fn tls(c: &mut Criterion) {
    let [plain, spiffe] = tls_configs();
    let mut g = c.benchmark_group("tls_mtls_handshake");
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_plain_rustls", |b| {
        b.iter(|| handshake(&plain.0, &plain.1))
    });
    g.bench_function("spiffe_verifiers", |b| {
        b.iter(|| handshake(&spiffe.0, &spiffe.1))
    });
    g.finish();
}

criterion_group!(benches, baseline, x509, jwt, tls);
criterion_main!(benches);
