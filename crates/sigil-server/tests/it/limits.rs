//! `[server.limits]` on a real server: oversized and malformed requests on
//! the agent and admin APIs, the per-agent and per-address rate limits (and
//! that the latter refuses before any attestation work), the
//! connection caps (in all, per source address, without a certificate), the
//! TLS handshake and first-request timeouts, each followed by proof that the
//! server still serves; and a fleet behind one address that attests despite
//! the rate limit, by retrying as agents do.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::admin_api_client::AdminApiClient;
use sigil_proto::server::v1::agent_api_client::AgentApiClient;
use sigil_server::limits::ServerLimits;
use sigil_server::{ServerConfig, ServerHandle};
use sigil_svid::bundle::Bundle;
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::RotatingCert;
use sigil_testkit::wire;
use sigil_types::TrustDomain;
use sigil_types::ratelimit::Rate;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// A bound for what should take milliseconds; exceeding it is a failure.
const PROMPT: Duration = Duration::from_secs(10);

/// A server on a free loopback port with `limits`.
async fn server(dir: &tempfile::TempDir, limits: ServerLimits) -> ServerHandle {
    sigil_svid::install_crypto_provider();
    let td = TrustDomain::new("example.org").unwrap();
    let mut config = ServerConfig::with_defaults(td, dir.path().join("server"));
    config.bind_address = "127.0.0.1:0".parse().unwrap();
    config.admin_socket = dir.path().join("admin.sock");
    config.limits = limits;
    sigil_server::start(config).await.expect("server starts")
}

fn trust(server: &ServerHandle) -> Arc<ArcSwap<Bundle>> {
    let td = server.state().config().trust_domain.clone();
    let json = server.state().ca().bundle().to_json();
    Arc::new(ArcSwap::from_pointee(Bundle::from_json(td, &json).unwrap()))
}

fn server_id(server: &ServerHandle) -> sigil_types::SpiffeId {
    server
        .state()
        .config()
        .trust_domain
        .id_with_path(sigil_types::SERVER_PATH)
        .unwrap()
}

/// An agent API client without a certificate (before attestation).
async fn anonymous(server: &ServerHandle) -> AgentApiClient<Channel> {
    sigil_agent::client::connect(
        &sigil_agent::config::ServerAddresses::one(server.agent_api_addr().to_string()),
        trust(server),
        server_id(server),
        None,
    )
    .await
    .unwrap()
}

/// Attests a new agent with a join token; returns a client presenting its SVID.
async fn attested(server: &ServerHandle) -> AgentApiClient<Channel> {
    let cert = attest(server).await;
    with_cert(server, cert).await
}

/// Attests a new agent with a join token; returns its SVID.
async fn attest(server: &ServerHandle) -> Arc<RotatingCert> {
    let token = server.state().generate_join_token(None).await.unwrap();
    let key = PrivateKey::generate_p256().unwrap();
    let resp = anonymous(server)
        .await
        .attest_join_token(pb::AttestJoinTokenRequest {
            token: token.token,
            csr: sigil_svid::x509::make_csr(&key).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    Arc::new(RotatingCert::new(resp.cert_chain, &key).unwrap())
}

/// A new connection presenting `cert`.
async fn with_cert(server: &ServerHandle, cert: Arc<RotatingCert>) -> AgentApiClient<Channel> {
    sigil_agent::client::connect(
        &sigil_agent::config::ServerAddresses::one(server.agent_api_addr().to_string()),
        trust(server),
        server_id(server),
        Some(cert),
    )
    .await
    .unwrap()
}

/// A NewJWTSVID for an entry the agent is not entitled to: answered with an
/// error, which is not a rate-limit refusal unless the limit was hit.
async fn jwt_call(client: &mut AgentApiClient<Channel>) -> tonic::Status {
    client
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: "no-such-entry".into(),
            audience: vec!["a".into()],
        })
        .await
        .unwrap_err()
}

/// Whether an error is the handler's answer, not a refusal by a limit or
/// the transport.
fn served(err: &tonic::Status) -> bool {
    !matches!(
        err.code(),
        Code::ResourceExhausted | Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// Calls until refused by the rate limit (at most 20 calls).
async fn refused_soon(client: &mut AgentApiClient<Channel>) -> tonic::Status {
    for _ in 0..20 {
        let err = jwt_call(client).await;
        if err.code() == Code::ResourceExhausted {
            return err;
        }
        assert!(served(&err), "{err:?}");
    }
    panic!("20 calls over the burst were all answered");
}

/// A connection to the admin socket.
async fn admin_channel(server: &ServerHandle) -> Channel {
    let path = server.admin_socket().to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_are_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        max_request_bytes: 64 * 1024,
        admin_max_request_bytes: 32 * 1024,
        ..Default::default()
    };
    let server = server(&dir, limits).await;
    let mut client = anonymous(&server).await;
    let err = client
        .attest_join_token(pb::AttestJoinTokenRequest {
            token: "x".repeat(64 * 1024 + 1),
            csr: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // Sync's request too: the server frames Sync's responses itself
    // (agent_api::SyncBody), not its requests' bound.
    let err = client
        .sync(pb::SyncRequest {
            revision: 1,
            known_entry_ids: vec!["x".repeat(64 * 1024 + 1)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // The same connection still serves.
    client.get_bundle(pb::GetBundleRequest {}).await.unwrap();

    // The admin API has its own cap.
    let channel = admin_channel(&server).await;
    let mut admin = AdminApiClient::new(channel.clone());
    let err = admin
        .get_agent(pb::GetAgentRequest {
            spiffe_id: "x".repeat(32 * 1024 + 1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // Bytes that are not a GetAgentRequest.
    let err = wire::unary(
        channel,
        "/sigil.server.v1.AdminApi/GetAgent",
        tonic::Request::new(vec![0xff, 0xff, 0xff, 0xff]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    admin
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_per_agent_and_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        &dir,
        ServerLimits {
            agent_calls: Rate::new(1, 3),
            attest: Rate::new(1, 4),
            ..Default::default()
        },
    )
    .await;
    // Two attestations (2 of the 4 unauthenticated calls from 127.0.0.1).
    let mut a = attested(&server).await;
    let mut b = attested(&server).await;

    // Agent A: the burst is answered, the next call refused.
    for _ in 0..3 {
        let err = jwt_call(&mut a).await;
        assert_ne!(err.code(), Code::ResourceExhausted, "{err:?}");
    }
    // The next ones are refused (a token may have refilled meanwhile).
    let err = refused_soon(&mut a).await;
    assert!(
        err.message()
            .contains("rate limit exceeded: calls of agent spiffe://example.org/sigil/agent/"),
        "{err:?}"
    );
    // Agent B has its own budget.
    let err = jwt_call(&mut b).await;
    assert_ne!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Unauthenticated calls from this address: 2 left, then refused.
    let mut anon = anonymous(&server).await;
    anon.get_bundle(pb::GetBundleRequest {}).await.unwrap();
    anon.get_bundle(pb::GetBundleRequest {}).await.unwrap();
    let mut refused = None;
    for _ in 0..20 {
        if let Err(e) = anon.get_bundle(pb::GetBundleRequest {}).await {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("GetBundle over the burst was refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("unauthenticated calls from 127.0.0.1"),
        "{err:?}"
    );

    // At 1/s agent A is answered again.
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        let err = jwt_call(&mut a).await;
        if err.code() != Code::ResourceExhausted {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_and_open_connections_keep_working() {
    const CAP: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    // The default handshake timeout (10s): silent connections hold their
    // slots for longer than any wait below.
    let server = server(
        &dir,
        ServerLimits {
            max_connections: CAP,
            ..Default::default()
        },
    )
    .await;
    // An agent connected before the flood holds one slot.
    let mut agent = attested(&server).await;
    let err = jwt_call(&mut agent).await;
    assert!(served(&err), "{err:?}");

    // The flood: CAP - 1 silent connections take the remaining slots
    // (accepted in order); every later one is closed at once, long before
    // a handshake timeout could close it.
    let addr = server.agent_api_addr();
    let mut silent = Vec::new();
    for _ in 0..CAP - 1 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    for i in 0..10 {
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(
            wire::closed_by_peer(&mut extra, Duration::from_secs(5)).await,
            "connection {i} over the cap was not closed"
        );
    }
    assert!(
        !anonymous_ok(&server).await,
        "a client over the cap was served"
    );
    // The connected agent is still served.
    let err = jwt_call(&mut agent).await;
    assert!(served(&err), "{err:?}");

    // Once the flood is gone, new clients are served again.
    drop(silent);
    let deadline = tokio::time::Instant::now() + PROMPT;
    while !anonymous_ok(&server).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots never freed after the flood"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_starts_the_handshake_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        &dir,
        ServerLimits {
            handshake_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let mut silent = TcpStream::connect(server.agent_api_addr()).await.unwrap();
    // Closed by the configured timeout: the default (10s) is longer than
    // this wait.
    assert!(
        wire::closed_by_peer(&mut silent, Duration::from_secs(8)).await,
        "a silent client outlived the handshake timeout"
    );
    assert!(anonymous_ok(&server).await);
    server.shutdown().await;
}

/// Whether a new connection gets the bundle.
async fn anonymous_ok(server: &ServerHandle) -> bool {
    match sigil_agent::client::connect(
        &sigil_agent::config::ServerAddresses::one(server.agent_api_addr().to_string()),
        trust(server),
        server_id(server),
        None,
    )
    .await
    {
        Ok(mut c) => c.get_bundle(pb::GetBundleRequest {}).await.is_ok(),
        Err(_) => false,
    }
}

/// A TLS connection without a client certificate (the server is not
/// verified: these tests look at what the server does with the connection),
/// from `from` when given, else from 127.0.0.1.
async fn raw_tls(
    addr: SocketAddr,
    from: Option<IpAddr>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(addr).await?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sigil_svid::tls::danger::NoServerVerification(
            provider,
        )))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("sigil-server").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Whether the server closes `conn` within `within`, whatever it sends
/// before (HTTP/2 settings).
async fn closed_within<C: tokio::io::AsyncRead + Unpin>(conn: &mut C, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_call_is_closed_at_the_first_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        &dir,
        ServerLimits {
            first_request_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    // Finishes TLS (without a certificate), then says nothing: closed by
    // the configured timeout, long before this wait ends.
    let mut silent = raw_tls(server.agent_api_addr(), None).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(8)).await,
        "a silent client outlived the first-request timeout"
    );
    // A client that calls is served, also past the timeout, on one
    // connection: its stream is still open after it.
    let mut agent = attested(&server).await;
    let mut stream = agent
        .sync(pb::SyncRequest {
            revision: 0,
            known_entry_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    stream
        .message()
        .await
        .unwrap()
        .expect("a first sync message");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), stream.message())
            .await
            .is_err(),
        "the sync stream ended within 2 s"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_address_is_capped_and_another_still_connects() {
    const PER_SOURCE: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        &dir,
        ServerLimits {
            max_connections_per_source: PER_SOURCE,
            ..Default::default()
        },
    )
    .await;
    let addr = server.agent_api_addr();
    // Silent connections from 127.0.0.1 (in their handshake, whose
    // default timeout outlasts this test) fill its slots, accepted in order.
    let mut held = Vec::new();
    for _ in 0..PER_SOURCE {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut over = TcpStream::connect(addr).await.unwrap();
    assert!(
        wire::closed_by_peer(&mut over, Duration::from_secs(5)).await,
        "a connection over the per-source cap was kept"
    );
    assert!(
        !anonymous_ok(&server).await,
        "127.0.0.1 was served over its cap"
    );
    // Another address is not affected.
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let mut tls = raw_tls(addr, Some(other))
        .await
        .expect("127.0.0.2 completes its handshake");
    assert!(
        !closed_within(&mut tls, Duration::from_millis(500)).await,
        "the connection from 127.0.0.2 was closed"
    );
    // Once 127.0.0.1's connections close, it is served again.
    drop(held);
    let deadline = tokio::time::Instant::now() + PROMPT;
    while !anonymous_ok(&server).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "127.0.0.1's slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_certificate_are_capped_and_agents_still_connect() {
    const ANONYMOUS: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        &dir,
        ServerLimits {
            max_anonymous_connections: ANONYMOUS,
            ..Default::default()
        },
    )
    .await;
    // Attested first: attestation itself needs a connection without one.
    let cert = attest(&server).await;
    // Clients without a certificate take the anonymous slots; each is held
    // open once served (the attestation's connection may linger a moment).
    let mut held = Vec::new();
    let deadline = tokio::time::Instant::now() + PROMPT;
    while held.len() < ANONYMOUS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the anonymous slots never filled"
        );
        if let Ok(mut c) = sigil_agent::client::connect(
            &sigil_agent::config::ServerAddresses::one(server.agent_api_addr().to_string()),
            trust(&server),
            server_id(&server),
            None,
        )
        .await
            && c.get_bundle(pb::GetBundleRequest {}).await.is_ok()
        {
            held.push(c);
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        !anonymous_ok(&server).await,
        "a client without a certificate was served over the cap"
    );
    let mut raw = raw_tls(server.agent_api_addr(), None).await.unwrap();
    assert!(
        closed_within(&mut raw, Duration::from_secs(5)).await,
        "a connection without a certificate over the cap was kept"
    );
    // A new connection of an agent with its certificate is served.
    let mut agent = with_cert(&server, cert).await;
    let err = jwt_call(&mut agent).await;
    assert!(served(&err), "{err:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_one_address_attests_despite_a_low_rate_limit() {
    const AGENTS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        &dir,
        ServerLimits {
            attest: Rate::new(25, 10),
            ..Default::default()
        },
    )
    .await;
    let mut tokens = Vec::new();
    for _ in 0..AGENTS {
        tokens.push(
            server
                .state()
                .generate_join_token(None)
                .await
                .unwrap()
                .token,
        );
    }
    // All at once from 127.0.0.1, each retrying as the agent does.
    let client = anonymous(&server).await;
    let refusals = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for token in tokens {
        let client = client.clone();
        let refusals = refusals.clone();
        set.spawn(async move {
            let key = PrivateKey::generate_p256().unwrap();
            let csr = sigil_svid::x509::make_csr(&key).unwrap();
            sigil_agent::retry::while_exhausted("AttestJoinToken", || {
                let mut client = client.clone();
                let req = pb::AttestJoinTokenRequest {
                    token: token.clone(),
                    csr: csr.clone(),
                };
                let refusals = refusals.clone();
                async move {
                    let r = client.attest_join_token(req).await;
                    if matches!(&r, Err(e) if e.code() == Code::ResourceExhausted) {
                        refusals.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                }
            })
            .await
            .map(tonic::Response::into_inner)
        });
    }
    let mut attested = 0;
    while let Some(r) = set.join_next().await {
        let resp = r.unwrap().expect("every agent attests in the end");
        assert!(!resp.cert_chain.is_empty());
        attested += 1;
    }
    assert_eq!(attested, AGENTS);
    // The limit was hit (so the retries are what let everyone in).
    assert!(refusals.load(Ordering::Relaxed) > 0);
    server.shutdown().await;
}

/// An agent starting while its address has no attestation budget left (a
/// fleet behind one address) waits for the limit instead of failing: both
/// its bootstrap bundle fetch and its attestation are refused at first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_start_waits_out_the_attestation_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        &dir,
        ServerLimits {
            attest: Rate::new(1, 1),
            ..Default::default()
        },
    )
    .await;
    // Spend 127.0.0.1's budget.
    let mut anon = anonymous(&server).await;
    let mut refused = false;
    for _ in 0..5 {
        if let Err(e) = anon.get_bundle(pb::GetBundleRequest {}).await {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            refused = true;
            break;
        }
    }
    assert!(refused, "the budget was never spent");
    let token = server.state().generate_join_token(None).await.unwrap();
    let mut cfg = sigil_agent::config::AgentConfig::with_defaults(
        server.state().config().trust_domain.clone(),
        server.agent_api_addr().to_string(),
        dir.path().join("agent"),
    );
    cfg.socket_path = dir.path().join("agent.sock");
    cfg.join_token = Some(token.token);
    let agent = tokio::time::timeout(Duration::from_secs(60), sigil_agent::start(cfg))
        .await
        .expect("the agent started within 60 s")
        .expect("the agent attests once the limit admits it");
    assert!(
        agent
            .agent_id
            .to_string()
            .starts_with("spiffe://example.org/sigil/agent/")
    );
    agent.shutdown().await;
    server.shutdown().await;
}

/// The per-address limit of unauthenticated calls is checked before
/// attestation: join-token attestations with an unknown token (each a
/// store read, counted in `sigil_server_attestation_failures_total`) are
/// refused while the address has tokens, then `ResourceExhausted`, and the
/// refused ones add no attestation failure: no attestation work was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestations_over_the_rate_limit_are_refused_before_attestation() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        &dir,
        ServerLimits {
            attest: Rate::new(1, 3),
            ..Default::default()
        },
    )
    .await;
    let failures = || {
        server
            .health()
            .metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix("sigil_server_attestation_failures_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("the failure counter is exported")
    };
    let before = failures();
    let key = PrivateKey::generate_p256().unwrap();
    let csr = sigil_svid::x509::make_csr(&key).unwrap();
    let mut anon = anonymous(&server).await;
    let mut attested_and_refused = 0;
    let mut exhausted = 0;
    for _ in 0..20 {
        let err = anon
            .attest_join_token(pb::AttestJoinTokenRequest {
                token: "no-such-token".into(),
                csr: csr.clone(),
            })
            .await
            .expect_err("an unknown token is refused");
        if err.code() == Code::ResourceExhausted {
            exhausted += 1;
        } else {
            assert!(served(&err), "{err:?}");
            attested_and_refused += 1;
        }
    }
    assert!(
        exhausted > 0,
        "20 attestations over a burst of 3 are limited"
    );
    assert!(attested_and_refused > 0, "the burst reaches attestation");
    assert_eq!(
        failures() - before,
        attested_and_refused,
        "only the calls within the limit were attested"
    );
    server.shutdown().await;
}

/// Clients that keep connections open without sending their HTTP/2 preface
/// (after the TLS handshake on the agent API; at once on the admin socket)
/// do not hold the server's shutdown: it ends within its drain time and
/// their connections are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_clients_that_keep_their_connections() {
    use rustls::pki_types::ServerName;
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir, ServerLimits::default()).await;
    let mut roots = rustls::RootCertStore::empty();
    for der in &server.state().ca().bundle().x509_authorities {
        roots.add(der.clone().into()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sigil_svid::tls::WebPkiVerifier::chain_only(
            Arc::new(roots),
        )))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.agent_api_addr()).await.unwrap();
    let mut silent_tls = tokio::time::timeout(
        PROMPT,
        tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("TLS handshake in time")
    .unwrap();
    let admin = dir.path().join("admin.sock");
    let mut silent_admin = tokio::net::UnixStream::connect(&admin).await.unwrap();
    // Both connections were accepted and handed to the HTTP/2 server.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(PROMPT * 2, server.shutdown())
        .await
        .expect("the server stopped with connections still open");
    assert!(
        started.elapsed() < sigil_server::SHUTDOWN_DRAIN + Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(wire::closed_after_reading(&mut silent_tls, PROMPT).await);
    assert!(wire::closed_after_reading(&mut silent_admin, PROMPT).await);
}
