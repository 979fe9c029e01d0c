//! Per-uid bounds on the agent's socket (issue #21): idle connections are
//! closed and give their slots back, open streams are capped per uid, the
//! JWT-SVID cache is bounded in bytes with a share per uid, and each uid has
//! a share of the agent's allowance at the server. Every test goes through
//! the real socket with real gRPC clients; a second uid is the `sigil` CLI
//! run as `nobody` (65534).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use sigil_agent::limits::AgentLimits;
use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_testkit::{Cluster, ClusterOptions};
use sigil_types::ratelimit::Rate;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};

use crate::{PROMPT, cluster_with_me};

/// The other uid of these tests.
const NOBODY: u32 = 65534;
/// A generous bound for what the product does within its documented time.
const SLACK: Duration = Duration::from_secs(30);

/// A new connection to the socket; `None` if it is refused.
async fn channel(path: PathBuf) -> Option<Channel> {
    sigil_client::channel(&path).await.ok()
}

async fn workload(cluster: &Cluster) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(
        channel(cluster.agent_config.socket_path.clone())
            .await
            .expect("connects"),
    )
}

/// A Workload API request with its security header.
fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

fn jwt_request(audience: Vec<String>) -> Request<pb::JwtsvidRequest> {
    req(pb::JwtsvidRequest {
        audience,
        spiffe_id: String::new(),
    })
}

/// An open FetchX509SVID stream, its first response received.
async fn x509_stream(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> Result<Streaming<pb::X509svidResponse>, tonic::Status> {
    let mut s = client
        .fetch_x509svid(req(pb::X509svidRequest {}))
        .await?
        .into_inner();
    let first = tokio::time::timeout(PROMPT, s.next())
        .await
        .expect("the first response comes promptly")
        .expect("the stream is open")?;
    assert!(!first.svids.is_empty());
    Ok(s)
}

/// An SDS StreamSecrets stream asking for everything, its first response
/// received.
async fn sds_stream(
    cluster: &Cluster,
) -> Result<
    (
        tokio::sync::mpsc::Sender<DiscoveryRequest>,
        Streaming<DiscoveryResponse>,
    ),
    tonic::Status,
> {
    let mut client = SecretDiscoveryServiceClient::new(
        channel(cluster.agent_config.socket_path.clone())
            .await
            .expect("connects"),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest::default()).await.unwrap();
    let mut s = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tokio::time::timeout(PROMPT, s.next())
        .await
        .expect("the first response comes promptly")
        .expect("the stream is open")?;
    Ok((tx, s))
}

/// Whether the agent ends `conn` (end of stream or reset) within `within`,
/// reading past whatever it sends first (its HTTP/2 SETTINGS).
async fn ended_by_agent(conn: &mut UnixStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Runs the `sigil` CLI as `uid` (a copy in the cluster's world-readable
/// directory: the build directory may be closed to other users); its
/// success and output.
fn sigil_as(cluster: &Cluster, uid: u32, args: &[&str]) -> (bool, String, String) {
    let copy = cluster.dir.path().join("sigil");
    if !copy.exists() {
        std::fs::copy(assert_cmd::cargo::cargo_bin("sigil"), &copy).unwrap();
    }
    let mut cmd = std::process::Command::new(&copy);
    cmd.args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.socket_uri())
        .uid(uid)
        .gid(uid);
    // The agent runs in this process: keep a worker free for it.
    let out = tokio::task::block_in_place(|| cmd.output()).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JWT-SVID `nobody` gets for `audience`, or the CLI's error.
fn nobody_jwt(cluster: &Cluster, audience: &str) -> Result<String, String> {
    let (ok, stdout, stderr) = sigil_as(
        cluster,
        NOBODY,
        &["jwt", "fetch", "--audience", audience, "-o", "json"],
    );
    if !ok {
        return Err(stderr);
    }
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    Ok(v[0]["token"].as_str().unwrap().to_owned())
}

/// Registers `nobody` and waits for its SVID.
async fn register_nobody(cluster: &Cluster) {
    let e = cluster
        .register("/nobody", &[&format!("unix:uid:{NOBODY}")])
        .await
        .unwrap();
    cluster.wait_for_svid(&e.spiffe_id).await.unwrap();
}

/// A connection that opens no stream is closed after the idle timeout, as
/// is one whose only call has ended, and their slots of the per-uid cap
/// return; a connection holding a quiet stream is kept, and the stream
/// still gets its pushes. On the old agent the silent connection is never
/// closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_their_slots_return_while_streams_stay() {
    const IDLE: Duration = Duration::from_secs(2);
    let (cluster, _me) = cluster_with_me(ClusterOptions {
        agent_limits: AgentLimits {
            max_connections_per_uid: 3,
            idle_timeout: IDLE,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let path = cluster.agent_config.socket_path.clone();
    // Slot 1: a stream, quiet from now on.
    let mut streaming = workload(&cluster).await;
    let mut stream = x509_stream(&mut streaming).await.unwrap();
    let stream_opened = Instant::now();
    // Slot 2: a call, then nothing.
    let mut unary = workload(&cluster).await;
    unary
        .fetch_jwtsvid(jwt_request(vec!["idle".into()]))
        .await
        .unwrap();
    // Slot 3: a connection that never says a word.
    let connected = Instant::now();
    let mut silent = UnixStream::connect(&path).await.unwrap();

    assert!(
        ended_by_agent(&mut silent, IDLE + SLACK).await,
        "a silent connection was kept past the idle timeout"
    );
    assert!(
        connected.elapsed() >= IDLE,
        "closed after {:?}, before the idle timeout",
        connected.elapsed()
    );
    // Both idle slots come back: two new connections fit beside the stream.
    let deadline = Instant::now() + SLACK;
    let (_a, _b) = loop {
        let (a, b) = (channel(path.clone()).await, channel(path.clone()).await);
        if let (Some(a), Some(b)) = (a, b) {
            let (mut a, mut b) = (
                SpiffeWorkloadApiClient::new(a),
                SpiffeWorkloadApiClient::new(b),
            );
            let ok_a = a.fetch_jwtsvid(jwt_request(vec!["a".into()])).await.is_ok();
            let ok_b = b.fetch_jwtsvid(jwt_request(vec!["b".into()])).await.is_ok();
            if ok_a && ok_b {
                break (a, b);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the idle connections' slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The stream, quiet for longer than the idle timeout, is still served.
    assert!(stream_opened.elapsed() >= IDLE);
    let uid = nix::unistd::getuid();
    cluster
        .register("/second", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    let pushed = tokio::time::timeout(SLACK, async {
        loop {
            let r = stream.next().await.expect("stream open").expect("no error");
            if r.svids.len() == 2 {
                return r;
            }
        }
    })
    .await
    .expect("the quiet stream got the new SVID");
    assert_eq!(pushed.svids.len(), 2);
    drop(unary);
    cluster.shutdown().await;
}

/// One uid at `max_streams_per_uid` (Workload API and SDS streams together)
/// is refused another stream with `ResourceExhausted` naming the limit;
/// another uid still opens its stream; a closed stream gives its slot back.
/// On the old agent the fourth stream is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_capped_per_uid() {
    if !crate::need_root("open_streams_are_capped_per_uid") {
        return;
    }
    let (cluster, _me) = cluster_with_me(ClusterOptions {
        agent_limits: AgentLimits {
            max_streams_per_uid: Some(3),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    register_nobody(&cluster).await;
    let mut client = workload(&cluster).await;
    let first = x509_stream(&mut client).await.unwrap();
    let _second = x509_stream(&mut client).await.unwrap();
    let _sds = sds_stream(&cluster).await.unwrap();

    for refused in [
        sds_stream(&cluster).await.map(|_| ()).unwrap_err(),
        x509_stream(&mut client).await.map(|_| ()).unwrap_err(),
        client
            .fetch_jwt_bundles(req(pb::JwtBundlesRequest {}))
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused.message().contains("max_streams_per_uid"),
            "{}",
            refused.message()
        );
    }
    // Another uid is not affected.
    let (ok, _, stderr) = sigil_as(&cluster, NOBODY, &["svid", "fetch"]);
    assert!(ok, "{stderr}");
    // Unary calls are not streams.
    client
        .fetch_jwtsvid(jwt_request(vec!["x".into()]))
        .await
        .unwrap();
    // A stream that ends gives its slot back.
    drop(first);
    let deadline = Instant::now() + SLACK;
    while x509_stream(&mut client).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the stream's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}

/// One uid fetching many JWT-SVIDs with large audiences fills only its
/// share of the cache's byte budget, and another uid's cached token is
/// still served from the cache (the same token, no new mint at the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwt_cache_is_bounded_in_bytes_with_a_share_per_uid() {
    if !crate::need_root("the_jwt_cache_is_bounded_in_bytes_with_a_share_per_uid") {
        return;
    }
    const TOTAL: usize = 256 * 1024;
    const PER_UID: usize = 64 * 1024;
    let (cluster, _me) = cluster_with_me(ClusterOptions {
        agent_limits: AgentLimits {
            jwt_cache_bytes: TOTAL,
            jwt_cache_bytes_per_uid: PER_UID,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    register_nobody(&cluster).await;
    let metrics = cluster.agent().unwrap().metrics.clone();
    let minted = || {
        cluster
            .server()
            .unwrap()
            .state()
            .metrics()
            .jwt_svids_minted
            .get()
    };
    let kept = nobody_jwt(&cluster, "kept").unwrap();
    let nobody_bytes = metrics.jwt_cache_bytes.get();
    assert!(nobody_bytes > 0);

    // This uid: 40 tokens of about 10 KiB each, 400 KiB in all.
    let mut client = workload(&cluster).await;
    let mut peak = 0;
    for i in 0..40 {
        let audience = (0..4)
            .map(|j| format!("{i:03}-{j}-{}", "a".repeat(1000)))
            .collect();
        client.fetch_jwtsvid(jwt_request(audience)).await.unwrap();
        peak = peak.max(metrics.jwt_cache_bytes.get());
    }
    println!("JWT cache peak: {peak} bytes (share {PER_UID}, nobody's {nobody_bytes})");
    assert!(
        peak <= PER_UID as i64 + nobody_bytes,
        "the cache held {peak} bytes; this uid's share is {PER_UID}"
    );

    let before = minted();
    assert_eq!(nobody_jwt(&cluster, "kept").unwrap(), kept);
    assert_eq!(minted(), before, "nobody's token was minted again");
    cluster.shutdown().await;
}

/// One uid flooding JWT-SVID requests that each need the server is refused
/// at its own share with `ResourceExhausted`, while the agent's allowance
/// at the server still serves another uid. On the old agent the flood
/// drains the allowance and the other uid's request fails with the server's
/// "rate limit exceeded".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_cannot_use_up_the_agents_allowance_at_the_server() {
    if !crate::need_root("one_uid_cannot_use_up_the_agents_allowance_at_the_server") {
        return;
    }
    let (cluster, _me) = cluster_with_me(ClusterOptions {
        server_limits: sigil_server::limits::ServerLimits {
            agent_calls: Rate::new(2, 60),
            ..Default::default()
        },
        agent_limits: AgentLimits {
            server_calls: Rate::new(1, 10),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    register_nobody(&cluster).await;

    // The flood runs on while the other uid asks, so that on the old agent
    // it takes every token the server's allowance regains meanwhile.
    let (first_refusal_tx, first_refusal) = tokio::sync::oneshot::channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let flood = {
        let mut client = workload(&cluster).await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tx = Some(first_refusal_tx);
            let (mut served, mut refused) = (0u32, 0u32);
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                match client
                    .fetch_jwtsvid(jwt_request(vec![format!("flood-{i}")]))
                    .await
                {
                    Ok(_) => served += 1,
                    Err(status) => {
                        refused += 1;
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(status);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (served, refused)
        })
    };
    let refusal = tokio::time::timeout(SLACK, first_refusal)
        .await
        .expect("the flood is refused")
        .unwrap();
    let other = nobody_jwt(&cluster, "fresh-audience");
    stop.cancel();
    let (served, refused) = flood.await.unwrap();
    println!("flood: {served} served, {refused} refused");
    let token = other.expect("the other uid gets a JWT-SVID");
    assert!(!token.is_empty());
    // The flood was refused at its own share, with a message naming it.
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal.message().contains("server_calls_per_second"),
        "{}",
        refusal.message()
    );
    cluster.shutdown().await;
}
