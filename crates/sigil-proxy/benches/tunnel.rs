//! Proxy throughput and added latency, against a direct rustls connection
//! measured in the same run (docs/benchmarks.md, "Proxy").
//!
//! Baseline: the client speaks mutual TLS itself to a TLS echo server
//! (the same SVIDs and SPIFFE verifiers the proxies use). Proxied: the
//! client speaks plain TCP to an outbound proxy, which opens mutual TLS to
//! an inbound proxy, which forwards plain TCP to an echo server. Both
//! proxies, the client and the echo servers share this process and its
//! cores, as a sidecar shares a node. Every figure is measured in rounds
//! that alternate baseline and proxied, keeping the best round of each.
//!
//! `cargo bench -p sigil-proxy --bench tunnel` (add `-- --quick` for a smoke run).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::ServerName;
use sigil_proxy::X509Source;
use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_svid::keys::PrivateKey;
use sigil_svid::x509::{SvidRequest, X509Authority};
use sigil_types::TrustDomain;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Sizes {
    rounds: usize,
    round_trips: usize,
    connections: usize,
    bulk_bytes: usize,
}

fn source(ca: &X509Authority, td: &TrustDomain, path: &str) -> Arc<X509Source> {
    let id = td.id_with_path(path).unwrap();
    let key = PrivateKey::generate_p256().unwrap();
    let leaf = ca
        .sign_svid(
            &SvidRequest::new(&id, Duration::from_secs(3600)),
            &key.public_key_spki_der(),
            SystemTime::now(),
        )
        .unwrap();
    let mut b = Bundle::new(td.clone());
    b.x509_authorities.push(ca.cert_der().to_vec());
    let mut set = BundleSet::default();
    set.insert(b);
    X509Source::fixed(vec![leaf], &key, set).unwrap()
}

/// Echoes in one task, reading then writing, without splitting the
/// stream: `tokio::io::split` is not safe for TLS streams (a read may need
/// to write and the other half's waker is lost), see tokio-rs/tls#40.
///
/// A connection whose first byte is `S` is a sink instead: an 8-byte
/// big-endian length follows, that many bytes are read, one byte answers.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = [0u8; 1];
    if s.read_exact(&mut first).await.is_err() {
        return;
    }
    if first[0] == b'S' {
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut left = u64::from_be_bytes(len) as usize;
        while left > 0 {
            match s.read(&mut buf[..left.min(64 * 1024)]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n,
            }
        }
        let _ = s.write_all(b"k").await;
        let _ = s.shutdown().await;
        return;
    }
    if s.write_all(&first).await.is_err() {
        return;
    }
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

async fn plain_echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(echo(s));
        }
    });
    addr
}

async fn tls_echo_server(src: Arc<X509Source>) -> SocketAddr {
    let cfg = Arc::new(sigil_proxy::tls::server_config(&src, &[]).unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    echo(tls).await;
                }
            });
        }
    });
    addr
}

/// How a client reaches an echo server.
#[derive(Clone)]
enum Path {
    Direct(SocketAddr, tokio_rustls::TlsConnector),
    Proxied(SocketAddr),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Path {
    async fn connect(&self) -> Box<dyn Io> {
        match self {
            Self::Direct(addr, connector) => {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let name = ServerName::try_from("backend.bench").unwrap();
                Box::new(connector.connect(name, tcp).await.unwrap())
            }
            Self::Proxied(addr) => {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                Box::new(tcp)
            }
        }
    }
}

async fn round_trip(s: &mut Box<dyn Io>, msg: &[u8], buf: &mut [u8]) {
    s.write_all(msg).await.unwrap();
    s.read_exact(buf).await.unwrap();
}

/// Per-round-trip times on one established connection, sorted.
async fn latencies(path: &Path, n: usize) -> Vec<Duration> {
    let mut s = path.connect().await;
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    for _ in 0..n.min(50) {
        round_trip(&mut s, &msg, &mut buf).await;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        round_trip(&mut s, &msg, &mut buf).await;
        out.push(t.elapsed());
    }
    out.sort();
    out
}

/// Times of connect + first 64-byte round trip, sorted.
async fn connects(path: &Path, n: usize) -> Vec<Duration> {
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = path.connect().await;
        round_trip(&mut s, &msg, &mut buf).await;
        out.push(t.elapsed());
        drop(s);
    }
    out.sort();
    out
}

/// Bytes per second sent through one connection to a sink that
/// acknowledges the end (one direction: full-duplex bulk echo over one TLS
/// stream is left out, see `echo`).
async fn throughput(path: &Path, bytes: usize) -> f64 {
    let mut s = path.connect().await;
    let chunk = vec![1u8; 64 * 1024];
    let t = Instant::now();
    s.write_all(b"S").await.unwrap();
    s.write_all(&(bytes as u64).to_be_bytes()).await.unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    s.flush().await.unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(&ack, b"k");
    bytes as f64 / t.elapsed().as_secs_f64()
}

/// Runs one phase, failing loudly instead of hanging.
async fn phase<T>(path: &str, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(120), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} over the {path} path took more than two minutes"),
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let medium = std::env::args().any(|a| a == "--medium");
    let sizes = if medium {
        Sizes {
            rounds: 1,
            round_trips: 2000,
            connections: 100,
            bulk_bytes: 32 << 20,
        }
    } else if quick {
        Sizes {
            rounds: 2,
            round_trips: 200,
            connections: 20,
            bulk_bytes: 4 << 20,
        }
    } else {
        Sizes {
            rounds: 5,
            round_trips: 5000,
            connections: 300,
            bulk_bytes: 256 << 20,
        }
    };
    let mut sizes = sizes;
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        let n = || w[1].parse::<usize>().expect("a number");
        match w[0].as_str() {
            "--rounds" => sizes.rounds = n(),
            "--round-trips" => sizes.round_trips = n(),
            "--connections" => sizes.connections = n(),
            "--bulk-mib" => sizes.bulk_bytes = n() << 20,
            _ => {}
        }
    }
    sigil_svid::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(sizes));
}

async fn run(sizes: Sizes) {
    let td = TrustDomain::new("bench.org").unwrap();
    let ca = X509Authority::generate(&td, Duration::from_secs(86400), SystemTime::now()).unwrap();
    let frontend = source(&ca, &td, "/frontend");
    let backend = source(&ca, &td, "/backend");

    // Baseline: the client does mutual TLS itself.
    let tls_echo = tls_echo_server(backend.clone()).await;
    let client_cfg =
        sigil_proxy::tls::client_config(&frontend, Some(td.id_with_path("/backend").unwrap()))
            .unwrap();
    let direct = Path::Direct(
        tls_echo,
        tokio_rustls::TlsConnector::from(Arc::new(client_cfg)),
    );

    // Proxied: client → outbound proxy → inbound proxy → echo.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[allow]]\nname = \"fe-be\"\nfrom = { spiffe_id = \"spiffe://bench.org/frontend\" }\nto = { spiffe_id = \"spiffe://bench.org/backend\" }\n",
    )
    .unwrap();
    let app = plain_echo_server().await;
    let be_cfg = format!(
        "workload_api_socket = \"unix:///unused\"\npolicy_file = \"policy.toml\"\n[[inbound]]\nlisten = \"127.0.0.1:0\"\nforward_to = \"{app}\"\n"
    );
    let be_cfg =
        sigil_proxy::ProxyConfig::parse(&be_cfg, &dir.path().join("be.toml"), None).unwrap();
    let be = sigil_proxy::start_with_source(be_cfg, backend)
        .await
        .unwrap();
    let fe_cfg = format!(
        "workload_api_socket = \"unix:///unused\"\n[[outbound]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nupstream_spiffe_id = \"spiffe://bench.org/backend\"\n",
        be.inbound[0]
    );
    let fe_cfg =
        sigil_proxy::ProxyConfig::parse(&fe_cfg, &dir.path().join("fe.toml"), None).unwrap();
    let fe = sigil_proxy::start_with_source(fe_cfg, frontend)
        .await
        .unwrap();
    let proxied = Path::Proxied(fe.outbound[0]);

    let mut best_lat: [Option<Vec<Duration>>; 2] = [None, None];
    let mut best_conn: [Option<Vec<Duration>>; 2] = [None, None];
    let mut best_tput = [0f64; 2];
    for round in 0..sizes.rounds {
        for (i, path) in [&direct, &proxied].into_iter().enumerate() {
            let started = Instant::now();
            let which = if i == 0 { "direct" } else { "proxied" };
            let l = phase(which, "round trips", latencies(path, sizes.round_trips)).await;
            if best_lat[i]
                .as_ref()
                .is_none_or(|b| pct(&l, 0.5) < pct(b, 0.5))
            {
                best_lat[i] = Some(l);
            }
            let c = phase(which, "connections", connects(path, sizes.connections)).await;
            if best_conn[i]
                .as_ref()
                .is_none_or(|b| pct(&c, 0.5) < pct(b, 0.5))
            {
                best_conn[i] = Some(c);
            }
            let t = phase(which, "throughput", throughput(path, sizes.bulk_bytes)).await;
            best_tput[i] = best_tput[i].max(t);
            eprintln!("  {which}: {:.1} s", started.elapsed().as_secs_f64());
        }
        eprintln!("round {} of {} done", round + 1, sizes.rounds);
    }
    let [Some(lat_d), Some(lat_p)] = best_lat else {
        panic!("no rounds ran")
    };
    let [Some(con_d), Some(con_p)] = best_conn else {
        panic!("no rounds ran")
    };

    println!(
        "proxy benchmark ({} rounds, best kept; baseline = direct rustls mutual TLS)",
        sizes.rounds
    );
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (d, x) = (pct(&lat_d, p), pct(&lat_p, p));
        println!(
            "round trip 64 B on an open connection, {name}: {:.1} us ({:.2}x baseline = {:.1} us; added {:.1} us)",
            us(x),
            us(x) / us(d),
            us(d),
            us(x) - us(d)
        );
    }
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (d, x) = (pct(&con_d, p), pct(&con_p, p));
        println!(
            "new connection + first round trip, {name}: {:.1} us ({:.2}x baseline = {:.1} us; added {:.1} us)",
            us(x),
            us(x) / us(d),
            us(d),
            us(x) - us(d)
        );
    }
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "throughput, one connection ({} MiB one way): {:.0} MiB/s ({:.2}x baseline = {:.0} MiB/s)",
        sizes.bulk_bytes >> 20,
        mib(best_tput[1]),
        best_tput[1] / best_tput[0],
        mib(best_tput[0])
    );
    fe.shutdown().await;
    be.shutdown().await;
}
