//! `[agent.limits]` on a real agent socket: oversized and malformed
//! requests, the per-uid rate limit, the connection caps (connections of
//! callers that exited count against their uid) and the request timeout,
//! each followed by proof that the Workload API still serves.

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
pub(crate) async fn channel(path: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
}

/// A request carrying the Workload API security header.
pub(crate) fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// Opens FetchX509SVID on `client` and returns the first response's SVID
/// count; no answer within [`PROMPT`] is `DeadlineExceeded`.
async fn fetch_x509(client: &mut SpiffeWorkloadApiClient<Channel>) -> Result<usize, tonic::Status> {
    let call = async {
        let mut stream = client
            .fetch_x509svid(req(pb::X509svidRequest {}))
            .await?
            .into_inner();
        let first = stream.message().await?.expect("a response");
        Ok(first.svids.len())
    };
    tokio::time::timeout(PROMPT, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
}

/// A new client on `path` and its first X509-SVID response's SVID count;
/// any failure, or no answer within [`PROMPT`], is an error.
async fn connect_and_fetch(path: &std::path::Path) -> Result<usize, String> {
    let ch = tokio::time::timeout(PROMPT, channel(path.to_owned()))
        .await
        .map_err(|_| "no connection in time".to_owned())?
        .map_err(|e| e.to_string())?;
    fetch_x509(&mut SpiffeWorkloadApiClient::new(ch))
        .await
        .map_err(|e| e.to_string())
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
    let over = connect_and_fetch(&path).await;
    assert!(
        over.is_err(),
        "a connection over the cap was served: {over:?}"
    );
    assert_eq!(fetch_x509(&mut client).await.unwrap(), 1);

    // Once the flood is gone, new clients are served again.
    drop(held);
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        let attempt = connect_and_fetch(&path).await;
        if attempt.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots never freed after the flood closed: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::timeout(PROMPT, cluster.shutdown())
        .await
        .expect("the agent stopped in time");
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

/// Tells [`helper_unix_connect`] what to do: `hold <socket> <n>` (connect `n`
/// times, print `ready`, keep them until stdin closes) or `connect <socket>
/// <fd>,<fd>…` (connect the inherited sockets, then exit).
const HELPER_ENV: &str = "SIGIL_LIMITS_TEST_HELPER";

/// Not a test: the process the test below runs as another uid. The test
/// binary re-runs itself with only this function selected.
#[test]
#[ignore = "helper process, run by other tests"]
fn helper_unix_connect() {
    use std::io::{BufRead, Write};
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let words: Vec<&str> = spec.split(' ').collect();
    match words.as_slice() {
        ["hold", path, n] => {
            let held: Vec<_> = (0..n.parse::<usize>().unwrap())
                .map(|_| std::os::unix::net::UnixStream::connect(path).unwrap())
                .collect();
            println!("ready");
            std::io::stdout().flush().unwrap();
            for _ in std::io::stdin().lock().lines() {}
            drop(held);
        }
        ["connect", path, fds] => {
            let addr = nix::sys::socket::UnixAddr::new(*path).unwrap();
            for fd in fds.split(',') {
                nix::sys::socket::connect(fd.parse().unwrap(), &addr).unwrap();
            }
        }
        _ => panic!("bad helper spec {spec:?}"),
    }
}

/// A child process that connected and exited, leaving its connections to
/// its parent, cannot be attested; its connections still count against its
/// uid (from the kernel's peer credentials), so that one user cannot fill
/// both its own share and everything else: root is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_of_exited_callers_count_against_their_uid() {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    if !sigil_testkit::runnable(
        "connections_of_exited_callers_count_against_their_uid",
        nix::unistd::geteuid().is_root(),
        "needs root to run a client as another uid",
    ) {
        return;
    }
    const PER_UID: usize = 4;
    const NOBODY: u32 = 65534;
    let cluster = cluster(AgentLimits {
        max_connections: 2 * PER_UID,
        max_connections_per_uid: PER_UID,
        ..Default::default()
    })
    .await;
    let path = cluster.agent_config.socket_path.clone();
    // The build directory may sit under a home only root can enter: run a
    // copy from the cluster's world-readable directory.
    let helper = cluster.dir.path().join("helper");
    std::fs::copy(std::env::current_exe().unwrap(), &helper).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_as_nobody = |spec: String| {
        let mut cmd = Command::new(&helper);
        cmd.args([
            "--exact",
            "limits::helper_unix_connect",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
            "--quiet",
        ])
        .env(HELPER_ENV, spec)
        .uid(NOBODY)
        .gid(NOBODY);
        cmd
    };

    // nobody fills its own share with live connections.
    let mut holder = run_as_nobody(format!("hold {} {PER_UID}", path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(holder.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.trim() == "ready")),
        "the holder did not connect"
    );

    // Then a process of nobody connects sockets this test holds, and exits.
    let fds: Vec<std::os::fd::OwnedFd> = (0..2 * PER_UID)
        .map(|_| {
            // Without close-on-exec, so that the child inherits them.
            nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::empty(),
                None,
            )
            .unwrap()
        })
        .collect();
    let list: Vec<String> = fds.iter().map(|f| f.as_raw_fd().to_string()).collect();
    // The agent must accept those connections only once their process is
    // gone, as when a child exits at once: the agent runs in this runtime,
    // so both of its workers wait (blocked) until the child has exited.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Arc::new(std::sync::Mutex::new(released));
    let mut blockers = Vec::new();
    for _ in 0..2 {
        let barrier = barrier.clone();
        let released = released.clone();
        blockers.push(tokio::spawn(async move {
            barrier.wait();
            let _ = released.lock().unwrap().recv();
        }));
    }
    barrier.wait();
    let out = run_as_nobody(format!("connect {} {}", path.display(), list.join(",")))
        .output()
        .unwrap();
    let _ = release.send(());
    let _ = release.send(());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for b in blockers {
        b.await.unwrap();
    }

    // nobody's uid is at its cap: every connection of the exited process is
    // closed (before the fix they filled a shared "unknown" share instead).
    for (i, fd) in fds.into_iter().enumerate() {
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true).unwrap();
        let mut conn = UnixStream::from_std(std_stream).unwrap();
        assert!(
            wire::closed_by_peer(&mut conn, PROMPT).await,
            "connection {i} of the exited process was kept"
        );
    }
    // Root is served.
    let mut client = SpiffeWorkloadApiClient::new(channel(path.clone()).await.unwrap());
    assert_eq!(fetch_x509(&mut client).await.unwrap(), 1);
    drop(holder.stdin.take());
    holder.wait().unwrap();
    cluster.shutdown().await;
}

/// A client that connected and never sent a byte, one that sent half its
/// preface, and one with an open stream that stopped reading, all still
/// connected: the agent stops anyway, within its drain time, and each of
/// them sees its connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_clients_that_keep_their_connections() {
    use tokio::io::AsyncWriteExt;
    let cluster = cluster(AgentLimits::default()).await;
    let path = cluster.agent_config.socket_path.clone();
    let mut silent = UnixStream::connect(&path).await.unwrap();
    let mut half = UnixStream::connect(&path).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut client = SpiffeWorkloadApiClient::new(channel(path.clone()).await.unwrap());
    let stream = tokio::time::timeout(PROMPT, client.fetch_x509svid(req(pb::X509svidRequest {})))
        .await
        .expect("answered in time")
        .unwrap()
        .into_inner();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(PROMPT, cluster.shutdown())
        .await
        .expect("the agent stopped with connections still open");
    assert!(
        started.elapsed() < sigil_agent::SHUTDOWN_DRAIN + Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(
        wire::closed_after_reading(&mut silent, PROMPT).await,
        "silent client still connected"
    );
    assert!(
        wire::closed_after_reading(&mut half, PROMPT).await,
        "half-preface client still connected"
    );
    drop(stream);
}
