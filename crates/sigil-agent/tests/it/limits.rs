//! `[agent.limits]` on a real agent socket: oversized and malformed
//! requests, the per-uid rate limit, the connection cap and the request
//! timeout, each followed by proof that the Workload API still serves.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sigil_agent::limits::AgentLimits;
use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_testkit::wire;
use sigil_testkit::{Cluster, ClusterOptions};
use sigil_types::ratelimit::Rate;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

/// A bound for what should take milliseconds; exceeding it is a failure.
const PROMPT: Duration = Duration::from_secs(10);

/// A cluster whose agent has `limits`, with this process (by uid) entitled
/// to `spiffe://example.org/test` and its SVID issued.
async fn cluster(limits: AgentLimits) -> Cluster {
    sigil_svid::install_crypto_provider();
    let cluster = Cluster::start(ClusterOptions {
        agent_limits: limits,
        ..Default::default()
    })
    .await
    .expect("cluster starts");
    let uid = nix::unistd::getuid();
    let entry = cluster
        .register("/test", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    cluster.wait_for_svid(&entry.spiffe_id).await.unwrap();
    cluster
}

/// A new connection to the socket.
async fn channel(path: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
}

/// A request carrying the Workload API security header.
fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// Opens FetchX509SVID on `client` and returns the first response's SVID count.
async fn fetch_x509(client: &mut SpiffeWorkloadApiClient<Channel>) -> Result<usize, tonic::Status> {
    let mut stream = client
        .fetch_x509svid(req(pb::X509svidRequest {}))
        .await?
        .into_inner();
    let first = tokio::time::timeout(PROMPT, stream.message())
        .await
        .expect("first response in time")?
        .expect("a response");
    Ok(first.svids.len())
}

fn validate(svid: &str) -> Request<pb::ValidateJwtsvidRequest> {
    req(pb::ValidateJwtsvidRequest {
        audience: "a".into(),
        svid: svid.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_are_refused_and_the_api_keeps_serving() {
    let cluster = cluster(AgentLimits::default()).await;
    let path = cluster.agent_config.socket_path.clone();
    let mut client = SpiffeWorkloadApiClient::new(channel(path.clone()).await.unwrap());

    // Over the 64 KiB default: refused before decoding.
    let big = "x".repeat(AgentLimits::default().max_request_bytes + 1);
    let err = client.validate_jwtsvid(validate(&big)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Bytes that are not a ValidateJWTSVIDRequest.
    let err = wire::unary(
        channel(path.clone()).await.unwrap(),
        "/SpiffeWorkloadAPI/ValidateJWTSVID",
        req(vec![0xff, 0xff, 0xff, 0xff]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");

    // The same connection and a new one are served as before.
    assert_eq!(fetch_x509(&mut client).await.unwrap(), 1);
    let mut other = SpiffeWorkloadApiClient::new(channel(path).await.unwrap());
    assert_eq!(fetch_x509(&mut other).await.unwrap(), 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_rate_is_refused_until_the_bucket_refills() {
    let cluster = cluster(AgentLimits {
        calls: Rate::new(1, 3),
        streams: Rate::new(1, 2),
        ..Default::default()
    })
    .await;
    let path = cluster.agent_config.socket_path.clone();
    let mut client = SpiffeWorkloadApiClient::new(channel(path).await.unwrap());

    // Within the burst every call is answered (here: the token is invalid).
    for _ in 0..3 {
        let err = client.validate_jwtsvid(validate("x")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    // Then refused (a token may refill meanwhile, hence a few tries).
    let mut refused = None;
    for _ in 0..20 {
        let err = client.validate_jwtsvid(validate("x")).await.unwrap_err();
        if err.code() == Code::ResourceExhausted {
            refused = Some(err);
            break;
        }
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let err = refused.expect("a call over the burst was refused");
    assert!(
        err.message().contains("rate limit exceeded: calls by uid"),
        "{err:?}"
    );
    // Opening streams is a separate budget: still served.
    assert_eq!(fetch_x509(&mut client).await.unwrap(), 1);
    assert_eq!(fetch_x509(&mut client).await.unwrap(), 1);
    let mut refused = None;
    for _ in 0..20 {
        if let Err(err) = fetch_x509(&mut client).await {
            refused = Some(err);
            break;
        }
    }
    let err = refused.expect("a stream over the burst was refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("streams opened by uid"), "{err:?}");

    // At 1/s the bucket refills: the same caller is answered again.
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        let err = client.validate_jwtsvid(validate("x")).await.unwrap_err();
        if err.code() == Code::InvalidArgument {
            break;
        }
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(tokio::time::Instant::now() < deadline, "never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_and_open_connections_keep_working() {
    const CAP: usize = 8;
    let cluster = cluster(AgentLimits {
        max_connections: CAP,
        ..Default::default()
    })
    .await;
    let path = cluster.agent_config.socket_path.clone();
    // A workload connected before the flood holds one slot.
    let mut client = SpiffeWorkloadApiClient::new(channel(path.clone()).await.unwrap());
    assert_eq!(fetch_x509(&mut client).await.unwrap(), 1);

    // The flood: the first CAP - 1 connections take the remaining slots
    // (accepted in order), every later one is closed at once.
    let mut held = Vec::new();
    for _ in 0..CAP - 1 {
        held.push(UnixStream::connect(&path).await.unwrap());
    }
    for i in 0..10 {
        let mut extra = UnixStream::connect(&path).await.unwrap();
        assert!(
            wire::closed_by_peer(&mut extra, PROMPT).await,
            "connection {i} over the cap was not closed"
        );
    }
    // A new client over the cap is refused; the open one is still served.
    let refused = match channel(path.clone()).await {
        Err(_) => true,
        Ok(ch) => fetch_x509(&mut SpiffeWorkloadApiClient::new(ch))
            .await
            .is_err(),
    };
    assert!(refused, "a connection over the cap was served");
    assert_eq!(fetch_x509(&mut client).await.unwrap(), 1);

    // Once the flood is gone, new clients are served again.
    drop(held);
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        if let Ok(ch) = channel(path.clone()).await
            && fetch_x509(&mut SpiffeWorkloadApiClient::new(ch))
                .await
                .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots never freed after the flood closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_request_timeout() {
    let timeout = Duration::from_secs(1);
    let cluster = cluster(AgentLimits {
        request_timeout: timeout,
        ..Default::default()
    })
    .await;
    let path = cluster.agent_config.socket_path.clone();
    let mut client = SpiffeWorkloadApiClient::new(channel(path).await.unwrap());
    let mut stream = client
        .fetch_x509svid(req(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    // Well past the request timeout, a second identity for this caller is
    // pushed on the same stream.
    tokio::time::sleep(timeout * 3).await;
    let uid = nix::unistd::getuid();
    cluster
        .register("/second", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    let next = tokio::time::timeout(PROMPT, stream.message())
        .await
        .expect("an update in time")
        .expect("the stream is still open")
        .expect("a response");
    assert_eq!(next.svids.len(), 2);
    cluster.shutdown().await;
}
