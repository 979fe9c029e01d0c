//! In-process figures and the raw baselines everything is compared with:
//! aws-lc-rs P-256 sign, verify and key generation on one thread, `openssl
//! speed ecdsap256` when openssl is on PATH, a plain rustls mutual-TLS
//! handshake, and the protobuf encode/decode floor of a sync message.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use prost::Message;
use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil_agent::core::Snapshot;
use sigil_agent::jwt_validation::JwtValidationCache;
use sigil_proto::server::v1 as pb;
use sigil_svid::bundle::Bundle;
use sigil_svid::jwt::{JwtAuthority, validate_jwt};
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::{Authorize, SpiffeClientVerifier, SpiffeServerVerifier, StaticTrust};
use sigil_svid::x509::{SvidRequest, X509Authority, csr_public_key, make_csr};
use sigil_types::{Entry, SpiffeId, TrustDomain};

use crate::report::{Budget, Report};

const MSG: &[u8] = &[0x5a; 256];

/// Operations per second of `f`, run on this thread for at least `min`.
fn rate(min: Duration, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..8 {
            f()?;
        }
        n += 8;
        let elapsed = start.elapsed();
        if elapsed >= min {
            return Ok(n as f64 / elapsed.as_secs_f64());
        }
    }
}

fn td() -> anyhow::Result<TrustDomain> {
    Ok(TrustDomain::new("example.org")?)
}

/// `openssl speed -seconds N ecdsap256`: (sign/s, verify/s) of one core.
fn openssl_speed(seconds: u32) -> anyhow::Result<(f64, f64)> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-seconds", &seconds.to_string(), "ecdsap256"])
        .output()
        .context("running openssl speed")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        if line.contains("nistp256") {
            let nums: Vec<f64> = line
                .split_whitespace()
                .filter_map(|w| w.parse::<f64>().ok())
                .collect();
            if let [.., sign, verify] = nums.as_slice() {
                return Ok((*sign, *verify));
            }
        }
    }
    bail!("no nistp256 line in openssl speed output")
}

/// One in-process operation whose rate is measured.
type Op<'a> = (&'static str, Box<dyn FnMut() -> anyhow::Result<()> + 'a>);

/// Rates of `ops`, interleaved: `rounds` rounds in which every operation runs
/// for `window`, keeping each operation's best window. Interleaving puts a
/// figure and its baseline under the same load from other processes; the
/// best window is the one least disturbed.
fn rates(ops: &mut [Op<'_>], window: Duration, rounds: usize) -> anyhow::Result<Vec<f64>> {
    let mut best = vec![0.0f64; ops.len()];
    for _ in 0..rounds {
        for (i, (_, f)) in ops.iter_mut().enumerate() {
            best[i] = best[i].max(rate(window, &mut *f)?);
        }
    }
    Ok(best)
}

/// Measures the raw baselines and the in-process sigil figures.
pub(crate) fn measure(
    report: &mut Report,
    min: Duration,
    openssl_seconds: u32,
) -> anyhow::Result<()> {
    sigil_svid::install_crypto_provider();
    let rng = SystemRandom::new();
    let now = SystemTime::now();

    // Everything the operations use, made once.
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
        .map_err(|_| anyhow::anyhow!("keygen"))?;
    let sig = pair.sign(&rng, MSG).map_err(|_| anyhow::anyhow!("sign"))?;
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref());
    let ca = X509Authority::generate(&td()?, Duration::from_secs(24 * 3600), now)?;
    let id: SpiffeId = "spiffe://example.org/ns/payments/sa/api".parse()?;
    let req = SvidRequest {
        spiffe_id: &id,
        dns_names: &[],
        ttl: Duration::from_secs(3600),
        attributes: &[],
    };
    let key = PrivateKey::generate_p256()?;
    let spki = key.public_key_spki_der();
    let csr = make_csr(&key)?;
    let jwt = JwtAuthority::generate(Duration::from_secs(24 * 3600), now)?;
    let aud = vec!["https://api.example.com".to_owned()];
    let token = jwt.sign(&id, &aud, Duration::from_secs(300), now)?;
    let mut bundle = Bundle::new(td()?);
    bundle.jwt_authorities.push(jwt.public_jwk());
    let [plain, spiffe] = tls_configs(&ca)?;
    // The agent's ValidateJWTSVID check behind its cache, for the same token
    // and bundle: after the first call, every call is a hit.
    let validated = JwtValidationCache::default();
    let snap = Snapshot {
        entries: Default::default(),
        svids: Default::default(),
        bundle: Arc::new(bundle.clone()),
        federated: Default::default(),
        connected: true,
        tainted: Default::default(),
    };

    let mut ops: Vec<Op<'_>> = vec![
        (
            "keygen",
            Box::new(|| {
                black_box(
                    EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
                        .map_err(|_| anyhow::anyhow!("keygen"))?,
                );
                Ok(())
            }),
        ),
        (
            "sign",
            Box::new(|| {
                black_box(pair.sign(&rng, MSG).map_err(|_| anyhow::anyhow!("sign"))?);
                Ok(())
            }),
        ),
        (
            "verify",
            Box::new(|| {
                public
                    .verify(black_box(MSG), sig.as_ref())
                    .map_err(|_| anyhow::anyhow!("verify"))
            }),
        ),
        (
            "mint",
            Box::new(|| {
                black_box(ca.sign_svid(&req, &spki, now)?);
                Ok(())
            }),
        ),
        (
            "mint_kg",
            Box::new(|| {
                let k = PrivateKey::generate_p256()?;
                black_box(ca.sign_svid(&req, &k.public_key_spki_der(), now)?);
                Ok(())
            }),
        ),
        (
            "csr_verify",
            Box::new(|| {
                black_box(csr_public_key(&csr)?);
                Ok(())
            }),
        ),
        (
            "sign_csr",
            Box::new(|| {
                let spki = csr_public_key(&csr)?;
                black_box(ca.sign_svid(&req, &spki, now)?);
                Ok(())
            }),
        ),
        (
            // The crypto an entry change needs before a workload holds its
            // SVID: agent key + CSR, server CSR check + mint.
            "floor",
            Box::new(|| {
                let k = PrivateKey::generate_p256()?;
                let c = make_csr(&k)?;
                let spki = csr_public_key(&c)?;
                black_box(ca.sign_svid(&req, &spki, now)?);
                Ok(())
            }),
        ),
        (
            "jwt_sign",
            Box::new(|| {
                black_box(jwt.sign(&id, &aud, Duration::from_secs(300), now)?);
                Ok(())
            }),
        ),
        (
            "jwt_validate",
            Box::new(|| {
                black_box(validate_jwt(&token, &aud[0], &bundle, now)?);
                Ok(())
            }),
        ),
        (
            "jwt_validate_cached",
            Box::new(|| {
                black_box(validated.validate(&snap, &[], &token, &aud[0], now)?);
                Ok(())
            }),
        ),
        ("tls_plain", Box::new(|| handshake(&plain.0, &plain.1))),
        ("tls_spiffe", Box::new(|| handshake(&spiffe.0, &spiffe.1))),
    ];
    let rounds = 5;
    let measured = rates(&mut ops, min / rounds, rounds as usize)?;
    let r = |name: &str| -> anyhow::Result<f64> {
        ops.iter()
            .position(|(n, _)| *n == name)
            .map(|i| measured[i])
            .with_context(|| format!("no rate {name}"))
    };
    let (sign, verify) = (r("sign")?, r("verify")?);
    let note = format!(
        "1 thread; best of {rounds} interleaved windows of {:?}",
        min / rounds
    );

    // --- raw P-256 baselines (aws-lc-rs, one thread) ----------------------
    report.baseline(
        "baseline.p256_keygen",
        r("keygen")?,
        "/s",
        &format!("aws-lc-rs, {note}"),
    );
    report.baseline(
        "baseline.p256_sign",
        sign,
        "/s",
        &format!("aws-lc-rs ECDSA P-256 SHA-256, {note}"),
    );
    report.baseline(
        "baseline.p256_verify",
        verify,
        "/s",
        &format!("aws-lc-rs ECDSA P-256 SHA-256, {note}"),
    );
    report.baseline(
        "baseline.p256_sign_plus_verify",
        1.0 / (1.0 / sign + 1.0 / verify),
        "/s",
        "one sign and one verify back to back (what signing a CSR needs at least), from the two rates above",
    );
    if openssl_seconds > 0 {
        match openssl_speed(openssl_seconds) {
            Ok((s, v)) => {
                let how = format!(
                    "openssl speed -seconds {openssl_seconds} ecdsap256 (run after the in-process rates)"
                );
                report.figure(
                    "openssl.ecdsap256_sign",
                    s,
                    "/s",
                    "baseline.p256_sign",
                    None,
                    &how,
                );
                report.figure(
                    "openssl.ecdsap256_verify",
                    v,
                    "/s",
                    "baseline.p256_verify",
                    None,
                    &how,
                );
            }
            Err(e) => eprintln!("openssl speed skipped: {e:#}"),
        }
    }

    // --- X509-SVIDs ---------------------------------------------------------
    report.figure(
        "x509.mint_excl_keygen",
        r("mint")?,
        "/s",
        "baseline.p256_sign",
        None,
        &format!("X509Authority::sign_svid, {note}"),
    );
    report.figure(
        "x509.mint_incl_keygen",
        r("mint_kg")?,
        "/s",
        "baseline.p256_sign",
        None,
        &format!("P-256 key generation + sign_svid, {note}"),
    );
    report.figure(
        "x509.csr_verify",
        r("csr_verify")?,
        "/s",
        "baseline.p256_verify",
        None,
        &format!("csr_public_key (parse + proof-of-possession check), {note}"),
    );
    report.figure(
        "x509.sign_csr",
        r("sign_csr")?,
        "/s",
        "baseline.p256_sign_plus_verify",
        None,
        &format!("what the server does per CSR: csr_public_key + sign_svid, {note}"),
    );
    let floor = r("floor")?;
    report.baseline(
        "baseline.svid_crypto_floor",
        1000.0 / floor,
        "ms",
        "keygen + make_csr + csr_public_key + sign_svid in one thread: the crypto on the path from entry to SVID",
    );
    report.baseline(
        "baseline.svid_crypto_floor_rate",
        floor,
        "/s",
        "the same, as a rate on one core",
    );

    // --- JWT-SVIDs ----------------------------------------------------------
    let jwt_sign = r("jwt_sign")?;
    report.figure(
        "jwt.sign",
        jwt_sign,
        "/s",
        "baseline.p256_sign",
        None,
        &format!("JwtAuthority::sign (ES256), {note}"),
    );
    report.baseline(
        "baseline.jwt_sign_time",
        1000.0 / jwt_sign,
        "ms",
        "the time of one JwtAuthority::sign, from the rate above",
    );
    report.figure(
        "jwt.validate",
        r("jwt_validate")?,
        "/s",
        "baseline.p256_verify",
        Some(Budget::MinRatio(0.8)),
        &format!("validate_jwt against a bundle, {note}"),
    );
    report.figure(
        "jwt.validate_cached",
        r("jwt_validate_cached")?,
        "/s",
        "jwt.validate",
        None,
        &format!(
            "the agent's ValidateJWTSVID check behind its validation cache (SHA-256 of token and audience, every call after the first a hit), {note}"
        ),
    );

    // --- TLS ------------------------------------------------------------------
    report.baseline(
        "baseline.tls_mtls_handshake_rustls",
        r("tls_plain")?,
        "/s",
        &format!("plain rustls 0.23 + aws-lc-rs, webpki verifiers, mutual TLS 1.3, no resumption, in memory, {note}"),
    );
    report.figure(
        "tls.mtls_handshake_spiffe",
        r("tls_spiffe")?,
        "/s",
        "baseline.tls_mtls_handshake_rustls",
        None,
        "the same certificates with sigil's SpiffeServerVerifier/SpiffeClientVerifier",
    );
    drop(ops);

    // --- memory of a held key (what each cached SVID carries) ---------------
    let n = if min < Duration::from_millis(500) {
        1000
    } else {
        10_000
    };
    let before = crate::child::rss_of("/proc/self/status", "VmRSS")?;
    let keys = (0..n)
        .map(|_| PrivateKey::generate_p256())
        .collect::<Result<Vec<_>, _>>()?;
    let after = crate::child::rss_of("/proc/self/status", "VmRSS")?;
    report.baseline(
        "baseline.pkcs8_key",
        key.pkcs8_der().len() as f64,
        "B",
        "PKCS#8 DER of one P-256 key",
    );
    report.figure(
        "memory.private_key",
        (after as f64 - before as f64) / n as f64,
        "B",
        "baseline.pkcs8_key",
        None,
        &format!("RSS growth of this process per sigil PrivateKey held ({n} keys: PKCS#8 copy + parsed aws-lc-rs key pair)"),
    );
    drop(keys);
    Ok(())
}

/// A sync message of `n` entries shaped like the load generator's, and how
/// long encoding and decoding it takes in process: the floor of a first sync.
pub(crate) fn sync_floor(n: usize) -> anyhow::Result<(Duration, usize)> {
    let td = td()?;
    let parent = td.id_with_path("/sigil/agent/join_token/0123456789abcdef")?;
    let mut upserted = Vec::with_capacity(n);
    for i in 0..n {
        upserted.push(pb::Entry::from(&crate::sample::sample_entry(
            &td, &parent, "floor", i,
        )?));
    }
    let msg = pb::SyncMessage {
        revision: n as u64,
        snapshot: true,
        upserted,
        deleted_ids: vec![],
        bundle_json: String::new(),
        ..Default::default()
    };
    let mut best = Duration::MAX;
    let mut len = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let bytes = msg.encode_to_vec();
        let back = pb::SyncMessage::decode(bytes.as_slice())?;
        let entries: Result<Vec<Entry>, _> = back
            .upserted
            .iter()
            .map(|e| {
                let id = e.id.parse()?;
                sigil_proto::entry_from_proto(e, move || id).map_err(anyhow::Error::from)
            })
            .collect();
        black_box(entries?);
        best = best.min(t.elapsed());
        len = bytes.len();
    }
    Ok((best, len))
}

/// Drives a client and a server connection through a full handshake in memory.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> anyhow::Result<()> {
    let name = ServerName::try_from("bench.example.org")?;
    let mut c = ClientConnection::new(client.clone(), name)?;
    let mut s = ServerConnection::new(server.clone())?;
    complete_handshake(&mut c, &mut s)
}

/// Exchanges a new client and server connection's records in memory until
/// both have finished the handshake.
pub(crate) fn complete_handshake(
    c: &mut ClientConnection,
    s: &mut ServerConnection,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    for _ in 0..32 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf)?;
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd)?;
            s.process_new_packets()?;
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf)?;
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            c.read_tls(&mut rd)?;
            c.process_new_packets()?;
        }
    }
    bail!("handshake did not finish")
}

pub(crate) type TlsPair = (Arc<ClientConfig>, Arc<ServerConfig>);

/// Plain rustls (webpki) and SPIFFE configs over the same SVIDs; resumption
/// is off so every handshake verifies certificates.
pub(crate) fn tls_configs(ca: &X509Authority) -> anyhow::Result<[TlsPair; 2]> {
    let now = SystemTime::now();
    let server_id: SpiffeId = "spiffe://example.org/sigil/server".parse()?;
    let client_id: SpiffeId = "spiffe://example.org/sigil/agent/join_token/x".parse()?;
    let mint = |id: &SpiffeId, dns: &[String]| -> anyhow::Result<_> {
        let key = PrivateKey::generate_p256()?;
        let req = SvidRequest {
            spiffe_id: id,
            dns_names: dns,
            ttl: Duration::from_secs(3600),
            attributes: &[],
        };
        let leaf = ca.sign_svid(&req, &key.public_key_spki_der(), now)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
        Ok((vec![CertificateDer::from(leaf)], der))
    };
    let (server_chain, server_key) = mint(&server_id, &["bench.example.org".to_owned()])?;
    let (client_chain, client_key) = mint(&client_id, &[])?;
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.cert_der().to_vec()))?;
    let roots = Arc::new(roots);
    let trust = Arc::new(StaticTrust(BTreeMap::from([(
        td()?,
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
        .with_client_auth_cert(client_chain.clone(), client_key.clone_key())?;
    let plain_server = ServerConfig::builder()
        .with_client_cert_verifier(WebPkiClientVerifier::builder(roots).build()?)
        .with_single_cert(server_chain.clone(), server_key.clone_key())?;
    let spiffe_client = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            trust.clone(),
            Authorize::Exact(server_id),
        )))
        .with_client_auth_cert(client_chain, client_key)?;
    let spiffe_server = ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            trust,
            Authorize::AnyInTrustDomain(td()?),
            false,
        )))
        .with_single_cert(server_chain, server_key)?;
    Ok([
        (finish_client(plain_client), finish_server(plain_server)),
        (finish_client(spiffe_client), finish_server(spiffe_server)),
    ])
}

/// One sign and one verify back to back, as the floor counts them, on
/// `threads` threads at once for `window`: the ops per second of all the
/// threads together (wall clock) and each op's thread CPU time in µs
/// (`RUSAGE_THREAD`, summed over the threads). With every core busy, as
/// the server's signing keeps them, a core may do less than alone (a
/// shared physical core, a lower clock); the one-thread floor cannot show
/// that, this does.
pub(crate) fn sign_verify_on_threads(
    threads: usize,
    window: Duration,
) -> anyhow::Result<(f64, f64)> {
    let one = || -> anyhow::Result<(u64, f64)> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map_err(|_| anyhow::anyhow!("keygen"))?;
        let cpu0 = thread_cpu()?;
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < window {
            let sig = pair.sign(&rng, MSG).map_err(|_| anyhow::anyhow!("sign"))?;
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref())
                .verify(black_box(MSG), sig.as_ref())
                .map_err(|_| anyhow::anyhow!("verify"))?;
            n += 1;
        }
        Ok((n, thread_cpu()? - cpu0))
    };
    let t0 = Instant::now();
    let done = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(one)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a floor thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let ops: u64 = done.iter().map(|(n, _)| n).sum();
    let cpu: f64 = done.iter().map(|(_, c)| c).sum();
    Ok((ops as f64 / wall, cpu / ops.max(1) as f64 * 1e6))
}

/// This thread's user + system CPU time, in seconds.
fn thread_cpu() -> anyhow::Result<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_THREAD)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(secs(u.user_time()) + secs(u.system_time()))
}
