//! What the health endpoints say while a dependency fails, and the limits
//! that bound a call on the agent's socket: `/readyz` follows the database
//! (`/healthz` does not), the request timeout cuts a unary call but not a
//! stream, and the rate limit refuses before attestation.

use std::time::Duration;

use nix::sys::signal::Signal;
use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_testkit::postgres::PrivatePostgres;

use crate::procs::{
    ServerBin, create_entry_for_me, http_get, server_and_agent_with, wait_for_svid_of, wait_until,
};

/// A bound for `/readyz` to follow the database: the store query times out
/// after 2 s and answers are cached for 1 s, so 15 s is far beyond it.
const FOLLOWS: Duration = Duration::from_secs(15);

/// A `sigil server` process on PostgreSQL: `/readyz` is 200, turns 503
/// naming the store while PostgreSQL is stopped (the process keeps running
/// and `/healthz` stays 200), and turns 200 again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_postgresql_is_down_and_200_when_it_is_back() {
    crate::init();
    let Some(pg) = PrivatePostgres::start_or_skip(
        "readyz_is_503_while_postgresql_is_down_and_200_when_it_is_back",
    )
    .unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerBin::new(
        dir.path(),
        &format!(
            "[server.store]\ndriver = \"postgres\"\nurl = \"{}\"",
            pg.url()
        ),
    );
    server.start().await;
    let health = server.health;
    let (code, body) = http_get(health, "/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");

    tokio::task::block_in_place(|| pg.stop()).unwrap();
    let body = wait_until(FOLLOWS, "/readyz 503 with PostgreSQL down", || async {
        match http_get(health, "/readyz").await {
            Some((503, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    assert!(
        body.contains("not ready: store unreachable: "),
        "the reason is the store: {body}"
    );
    let (code, body) = http_get(health, "/healthz").await.unwrap();
    assert_eq!(code, 200, "/healthz is liveness only: {body}");

    tokio::task::block_in_place(|| pg.start_again()).unwrap();
    wait_until(FOLLOWS, "/readyz 200 with PostgreSQL back", || async {
        matches!(http_get(health, "/readyz").await, Some((200, _))).then_some(())
    })
    .await;
    assert!(server.stop(), "clean exit:\n{}", server.log());
}

/// A Workload API request with the header the spec requires.
fn workload_request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

fn jwt_request(audience: &str) -> tonic::Request<pb::JwtsvidRequest> {
    workload_request(pb::JwtsvidRequest {
        audience: vec![audience.to_owned()],
        spiffe_id: String::new(),
    })
}

/// `[agent.limits] request_timeout = "1s"`: with the server frozen
/// (SIGSTOP), FetchJWTSVID for a new audience waits on the server and is cut
/// after the timeout with `Cancelled` "Timeout expired"; a FetchX509SVID
/// stream opened before is not cut, and still delivers the next SVID once
/// the server runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_is_cut_at_the_request_timeout_and_a_stream_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, agent_id) =
        server_and_agent_with(dir.path(), "", "[agent.limits]\nrequest_timeout = \"1s\"\n").await;
    let mut admin = server.admin().await;
    create_entry_for_me(&mut admin, "spiffe://example.org/timeout/a", &agent_id).await;
    wait_for_svid_of(
        &agent.uri(),
        "spiffe://example.org/timeout/a",
        "the first SVID",
    )
    .await;

    let mut client = SpiffeWorkloadApiClient::new(crate::unix_channel(agent.socket.clone()).await);
    let mut stream = client
        .fetch_x509svid(workload_request(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);

    server.signal(Signal::SIGSTOP);
    let started = std::time::Instant::now();
    let cut = tokio::time::timeout(FOLLOWS, client.fetch_jwtsvid(jwt_request("frozen")))
        .await
        .expect("the agent's request timeout ends the call");
    let waited = started.elapsed();
    server.signal(Signal::SIGCONT);
    let status = cut.expect_err("no token while the server is frozen");
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    assert_eq!(status.message(), "Timeout expired");
    assert!(
        waited >= Duration::from_secs(1),
        "cut only at the timeout: {waited:?}"
    );

    // The stream, open for longer than the timeout, still delivers.
    create_entry_for_me(&mut admin, "spiffe://example.org/timeout/b", &agent_id).await;
    let next = tokio::time::timeout(FOLLOWS, async {
        loop {
            let m = stream
                .message()
                .await
                .unwrap()
                .expect("the stream stays open");
            if m.svids.len() == 2 {
                return m;
            }
        }
    })
    .await
    .expect("the stream delivers the second SVID");
    assert!(
        next.svids
            .iter()
            .any(|s| s.spiffe_id == "spiffe://example.org/timeout/b")
    );
    assert!(started.elapsed() > Duration::from_secs(1));
}

/// A forked child, killed and reaped when dropped.
struct ForkedChild(nix::unistd::Pid);

impl Drop for ForkedChild {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.0, None);
    }
}

/// Connects to the Unix socket at `path` from a forked child that then
/// waits to be killed: once it is (drop the [`ForkedChild`]), the
/// connection's peer is a process that no longer exists, so the agent can
/// attest nothing about it, while the kernel still reports its uid.
#[expect(
    unsafe_code,
    reason = "fork: only a forked child can connect and then die while the test keeps the \
              connection; every safe way to pass it back (SCM_RIGHTS) needs unsafe as well"
)]
fn connect_from_a_child(path: &std::path::Path) -> (std::os::unix::net::UnixStream, ForkedChild) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use nix::unistd::{ForkResult, fork, pause, pipe};
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let addr = UnixAddr::new(path).unwrap();
    let (ready_rx, ready_tx) = pipe().unwrap();
    // SAFETY: the child calls only async-signal-safe functions (connect,
    // write, pause) until it is killed.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let ok = connect(sock.as_raw_fd(), &addr).is_ok();
            let _ = std::fs::File::from(ready_tx).write(&[u8::from(ok)]);
            loop {
                pause();
            }
        }
        ForkResult::Parent { child } => {
            drop(ready_tx);
            let mut b = [0u8; 1];
            std::fs::File::from(ready_rx).read_exact(&mut b).unwrap();
            let child = ForkedChild(child);
            assert_eq!(b[0], 1, "the child connected");
            (std::os::unix::net::UnixStream::from(sock), child)
        }
    }
}

/// A channel over one already connected stream.
async fn channel_over(stream: std::os::unix::net::UnixStream) -> tonic::transport::Channel {
    stream.set_nonblocking(true).unwrap();
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(stream)));
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = slot.lock().unwrap().take();
            async move {
                let s = s.ok_or_else(|| std::io::Error::other("the one connection is used"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::from_std(s)?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// The per-uid call limit is checked before attestation: a caller that
/// cannot be attested (its process has exited) gets `Unavailable`
/// "workload attestation failed" while it has tokens, then
/// `ResourceExhausted`, which it could not get if attestation ran first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_limit_is_refused_before_attestation() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent, _agent_id) = server_and_agent_with(
        dir.path(),
        "",
        "[agent.limits]\ncalls_per_second = 1\ncall_burst = 3\n",
    )
    .await;
    let (conn, child) = connect_from_a_child(&agent.socket);
    let mut client = SpiffeWorkloadApiClient::new(channel_over(conn).await);
    // Answered while the child lives, so the agent accepted the connection
    // and read its credentials; the answer itself does not matter.
    let _ = client.fetch_jwtsvid(jwt_request("alive")).await;
    drop(child);

    let mut codes = Vec::new();
    for _ in 0..10 {
        let status = client
            .fetch_jwtsvid(jwt_request("dead"))
            .await
            .expect_err("nothing for a dead caller");
        codes.push((status.code(), status.message().to_owned()));
    }
    assert_eq!(
        codes[0],
        (
            tonic::Code::Unavailable,
            "workload attestation failed".to_owned()
        ),
        "the dead caller cannot be attested: {codes:?}"
    );
    let first_refused = codes
        .iter()
        .position(|(c, _)| *c == tonic::Code::ResourceExhausted)
        .unwrap_or_else(|| panic!("the rate limit refuses before attestation: {codes:?}"));
    assert!(
        codes[first_refused]
            .1
            .starts_with("rate limit exceeded: calls by uid "),
        "{codes:?}"
    );
}
