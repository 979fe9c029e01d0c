//! `[server.limits]` on a real server: oversized and malformed requests on
//! the agent and admin APIs, the per-agent and per-address rate limits, the
//! connection cap and the TLS handshake timeout, each followed by proof that
//! the server still serves.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use std::sync::Arc;
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
use tokio::net::TcpStream;
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
    let td = server.state.config.trust_domain.clone();
    let json = server.state.ca.bundle().to_json();
    Arc::new(ArcSwap::from_pointee(Bundle::from_json(td, &json).unwrap()))
}

fn server_id(server: &ServerHandle) -> sigil_types::SpiffeId {
    server
        .state
        .config
        .trust_domain
        .id_with_path(sigil_types::SERVER_PATH)
        .unwrap()
}

/// An agent API client without a certificate (before attestation).
async fn anonymous(server: &ServerHandle) -> AgentApiClient<Channel> {
    sigil_agent::client::connect(
        &sigil_agent::config::ServerAddresses::one(server.agent_api_addr.to_string()),
        trust(server),
        server_id(server),
        None,
    )
    .await
    .unwrap()
}

/// Attests a new agent with a join token; returns a client presenting its SVID.
async fn attested(server: &ServerHandle) -> AgentApiClient<Channel> {
    let token = server.state.generate_join_token(None).await.unwrap();
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
    let cert = Arc::new(RotatingCert::new(resp.cert_chain, &key).unwrap());
    sigil_agent::client::connect(
        &sigil_agent::config::ServerAddresses::one(server.agent_api_addr.to_string()),
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
    let path = server.admin_socket.clone();
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
    let addr = server.agent_api_addr;
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
    let mut silent = TcpStream::connect(server.agent_api_addr).await.unwrap();
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
        &sigil_agent::config::ServerAddresses::one(server.agent_api_addr.to_string()),
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
