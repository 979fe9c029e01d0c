//! The agent's sync loop against a fake server: a real agent (restored from
//! a data directory this test writes) connects over real TLS to an agent
//! API served here, whose Sync streams the test scripts page by page. This
//! shows what only a misbehaving or hostile server can provoke: the backoff
//! growing while no whole update is applied, paged updates applied at once
//! and only whole, and the bound on what the agent buffers; and, with
//! `x509_svid_cache_max_size`, an SVID signed on demand for a Workload API
//! caller.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_agent::paging::UpdateBounds;
use sigil_agent::persist::{AgentIdentity, Persist};
use sigil_agent::{AgentConfig, AgentHandle};
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::agent_api_server::{AgentApi, AgentApiServer};
use sigil_svid::bundle::Bundle;
use sigil_svid::keys::PrivateKey;
use sigil_svid::x509::{SvidRequest, X509Authority};
use sigil_types::{Entry, EntryId, Selectors, SpiffeId, TrustDomain};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

/// A bound for what should take milliseconds; exceeding it is a failure.
const PROMPT: Duration = Duration::from_secs(15);
/// The agent's smallest reconnect delay in these tests.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

type Page = Result<pb::SyncMessage, Status>;

/// One Sync call the agent made: when, what it asked, and the stream the
/// test answers on.
struct Call {
    at: Instant,
    request: pb::SyncRequest,
    tx: mpsc::Sender<Page>,
}

/// An agent API whose Sync hands each stream to the test and which signs
/// every workload CSR; everything else is refused.
struct Fake {
    calls: mpsc::UnboundedSender<Call>,
    /// Signs the agent's CSRs: entry `entry-<n>` gets `/workload-<n>`.
    ca: Arc<X509Authority>,
}

#[tonic::async_trait]
impl AgentApi for Fake {
    async fn get_bundle(
        &self,
        _: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn attest_join_token(
        &self,
        _: Request<pb::AttestJoinTokenRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn attest_psat(
        &self,
        _: Request<pb::AttestPsatRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn renew_agent(
        &self,
        _: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type SyncStream = tokio_stream::wrappers::ReceiverStream<Page>;

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let call = Call {
            at: Instant::now(),
            request: req.into_inner(),
            tx,
        };
        self.calls
            .send(call)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<pb::BatchNewX509svidRequest>,
    ) -> Result<Response<pb::BatchNewX509svidResponse>, Status> {
        let td = TrustDomain::new("example.org").unwrap();
        let results = req
            .into_inner()
            .params
            .into_iter()
            .map(|p| {
                let n = p.entry_id.trim_start_matches("entry-");
                let id = td.id_with_path(&format!("/workload-{n}")).unwrap();
                let spki = sigil_svid::x509::csr_public_key(&p.csr).unwrap();
                let leaf = self
                    .ca
                    .sign_svid(
                        &SvidRequest::new(&id, Duration::from_secs(3600)),
                        &spki,
                        SystemTime::now(),
                    )
                    .unwrap();
                pb::X509svidResult {
                    entry_id: p.entry_id,
                    cert_chain: vec![leaf],
                    error: String::new(),
                }
            })
            .collect();
        Ok(Response::new(pb::BatchNewX509svidResponse { results }))
    }
    async fn new_jwtsvid(
        &self,
        _: Request<pb::NewJwtsvidRequest>,
    ) -> Result<Response<pb::NewJwtsvidResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A server-side TLS connection, as tonic's listener wants it.
struct Conn(TlsStream<TcpStream>);

impl Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Serves [`Fake`] with `tls` on a loopback port; returns the port and the
/// Sync calls it receives.
async fn serve_fake(
    ca: Arc<X509Authority>,
    mut tls: rustls::ServerConfig,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Call>) {
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conns_tx, conns_rx) = mpsc::channel::<Result<Conn, std::io::Error>>(16);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let conns_tx = conns_tx.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = conns_tx.send(Ok(Conn(tls))).await;
                }
            });
        }
    });
    let (calls_tx, calls) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentApiServer::new(Fake {
                calls: calls_tx,
                ca,
            }))
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(conns_rx)),
    );
    (addr, calls)
}

/// The fake server and an agent of it.
struct Setup {
    agent: AgentHandle,
    calls: mpsc::UnboundedReceiver<Call>,
    td: TrustDomain,
    agent_id: SpiffeId,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// A CA of `example.org`, the fake server with its SVID on a loopback
    /// port, and an agent restored from an SVID of that CA, which trusts it.
    async fn start(bounds: UpdateBounds) -> Self {
        Self::start_bounded(bounds, 0).await
    }

    /// The same, the agent holding at most `svid_cache_max_size` idle SVIDs.
    async fn start_bounded(bounds: UpdateBounds, svid_cache_max_size: usize) -> Self {
        sigil_svid::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Arc::new(X509Authority::generate(&td, Duration::from_secs(7200), now).unwrap());
        let svid = |id: &SpiffeId| {
            let key = PrivateKey::generate_p256().unwrap();
            let req = SvidRequest::new(id, Duration::from_secs(3600));
            let der = ca.sign_svid(&req, &key.public_key_spki_der(), now).unwrap();
            (der, key)
        };

        let server_id = td.id_with_path(sigil_types::SERVER_PATH).unwrap();
        let (server_cert, server_key) = svid(&server_id);
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server_cert)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.pkcs8_der().to_vec())),
            )
            .unwrap();
        let (addr, calls) = serve_fake(ca.clone(), tls).await;

        let agent_id = td.id_with_path("/sigil/agent/test/node-1").unwrap();
        let (agent_cert, agent_key) = svid(&agent_id);
        let data_dir = dir.path().join("agent");
        let persist = Persist::open(&data_dir).unwrap();
        let mut bundle = Bundle::new(td.clone());
        bundle.x509_authorities.push(ca.cert_der().to_vec());
        persist.save_bundle(&bundle).unwrap();
        persist
            .save_identity(&AgentIdentity::new(vec![agent_cert], agent_key).unwrap())
            .unwrap();
        let mut cfg = AgentConfig::with_defaults(td.clone(), addr.to_string(), data_dir);
        cfg.socket_path = dir.path().join("agent.sock");
        cfg.min_backoff = MIN_BACKOFF;
        cfg.max_backoff = Duration::from_secs(30);
        cfg.sync_update_bounds = bounds;
        cfg.x509_svid_cache_max_size = svid_cache_max_size;
        let agent = sigil_agent::start(cfg).await.unwrap();
        Self {
            agent,
            calls,
            td,
            agent_id,
            _dir: dir,
        }
    }

    /// The agent's next Sync call.
    async fn next_call(&mut self) -> Call {
        tokio::time::timeout(Duration::from_secs(30), self.calls.recv())
            .await
            .expect("the agent calls Sync again")
            .expect("the fake server runs")
    }

    /// A valid entry of this agent, as the server sends it.
    fn entry(&self, n: usize) -> pb::Entry {
        self.entry_for(n, "unix:uid:424242")
    }

    /// A valid entry of this agent for callers with `selector`.
    fn entry_for(&self, n: usize, selector: &str) -> pb::Entry {
        let mut e = Entry::new(
            EntryId::try_from(format!("entry-{n}")).unwrap(),
            self.td.id_with_path(&format!("/workload-{n}")).unwrap(),
            self.agent_id.clone(),
            Selectors::parse_all([selector]).unwrap(),
        );
        e.revision = 1;
        pb::Entry::from(&e)
    }

    /// A page of `entries` at `revision`.
    fn page(&self, revision: u64, entries: &[usize], continued: bool) -> pb::SyncMessage {
        pb::SyncMessage {
            revision,
            upserted: entries.iter().map(|n| self.entry(*n)).collect(),
            continued,
            ..Default::default()
        }
    }

    /// The IDs of the entries the agent serves from now.
    fn served(&self) -> BTreeSet<String> {
        self.agent
            .snapshots
            .borrow()
            .entries
            .iter()
            .map(|e| e.id.to_string())
            .collect()
    }
}

fn ids(ns: &[usize]) -> BTreeSet<String> {
    ns.iter().map(|n| format!("entry-{n}")).collect()
}

/// Records every set of entry IDs the agent publishes, until it stops.
fn record_served(setup: &Setup) -> tokio::task::JoinHandle<Vec<BTreeSet<String>>> {
    let mut rx = setup.agent.snapshots.clone();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            let set: BTreeSet<String> = rx
                .borrow_and_update()
                .entries
                .iter()
                .map(|e| e.id.to_string())
                .collect();
            seen.push(set);
        }
        seen
    })
}

/// The entry IDs a Sync call names as held.
fn known(call: &Call) -> BTreeSet<String> {
    call.request.known_entry_ids.iter().cloned().collect()
}

/// Answers `n` Sync calls with `answer` each and returns when they came.
async fn calls_answered_with(setup: &mut Setup, n: usize, answer: &[Page]) -> Vec<Instant> {
    let mut at = Vec::new();
    for _ in 0..n {
        let call = setup.next_call().await;
        at.push(call.at);
        for page in answer {
            // The agent may have dropped the stream already.
            let _ = call.tx.send(page.clone()).await;
        }
    }
    at
}

/// Asserts that the delays between consecutive calls grew as the backoff
/// does without a reset: the k-th delay is at least the smallest jittered
/// value of the k-th backoff step (half of `MIN_BACKOFF` × 2^k). Only lower
/// bounds: a loaded machine makes delays longer, never shorter. A backoff
/// reset at any step keeps every later delay near `MIN_BACKOFF` and fails.
fn assert_backoff_grew(at: &[Instant]) {
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (k, gap) in gaps.iter().enumerate() {
        let floor = MIN_BACKOFF.mul_f64(0.5 * f64::from(1u32 << k));
        assert!(
            *gap >= floor,
            "delay {k} was {gap:?}, below {floor:?}: {gaps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_before_any_update_backs_off_more_each_time() {
    let mut setup = Setup::start(UpdateBounds::default()).await;
    let at = calls_answered_with(&mut setup, 6, &[Err(Status::internal("broken"))]).await;
    assert_backoff_grew(&at);
    setup.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_page_alone_neither_applies_nor_resets_the_backoff() {
    let mut setup = Setup::start(UpdateBounds::default()).await;
    let mut first = setup.page(3, &[1, 2], true);
    first.snapshot = true;
    let at =
        calls_answered_with(&mut setup, 6, &[Ok(first), Err(Status::internal("broken"))]).await;
    assert_backoff_grew(&at);
    // No page was applied; the snapshot's first page is only staged: the
    // agent resumes from its revision, naming its entries as held.
    let call = setup.next_call().await;
    assert_eq!(call.request.revision, 3);
    assert_eq!(known(&call), ids(&[1, 2]));
    assert!(setup.served().is_empty(), "{:?}", setup.served());
    setup.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_broken_off_resumes_from_its_pages_and_drops_what_was_deleted() {
    let mut setup = Setup::start(UpdateBounds::default()).await;
    let seen = record_served(&setup);
    // A first sync at revision 5: two pages of three arrive, then the
    // stream breaks.
    let call = setup.next_call().await;
    assert_eq!(call.request.revision, 0);
    let mut first = setup.page(5, &[1, 2], true);
    first.snapshot = true;
    call.tx.send(Ok(first)).await.unwrap();
    call.tx.send(Ok(setup.page(5, &[3], true))).await.unwrap();
    call.tx.send(Err(Status::internal("broken"))).await.unwrap();

    // The next stream resumes: revision 5, entries 1 to 3 named as held.
    let call = setup.next_call().await;
    assert_eq!(call.request.revision, 5);
    assert_eq!(known(&call), ids(&[1, 2, 3]));
    assert!(setup.served().is_empty(), "{:?}", setup.served());
    // What a server answers: entry 2 deleted since, entry 4 the rest of the
    // set, in two pages.
    call.tx.send(Ok(setup.page(8, &[4], true))).await.unwrap();
    let last = pb::SyncMessage {
        revision: 8,
        deleted_ids: vec!["entry-2".into()],
        ..Default::default()
    };
    call.tx.send(Ok(last)).await.unwrap();
    let mut rx = setup.agent.snapshots.clone();
    tokio::time::timeout(PROMPT, rx.wait_for(|s| s.entries.len() == 3))
        .await
        .expect("the completed snapshot is served")
        .unwrap();
    assert_eq!(setup.served(), ids(&[1, 3, 4]));

    // From there on the agent is at revision 8 with that set.
    call.tx
        .send(Err(Status::internal("broken again")))
        .await
        .unwrap();
    let again = setup.next_call().await;
    assert_eq!(again.request.revision, 8);
    assert_eq!(known(&again), ids(&[1, 3, 4]));
    setup.agent.shutdown().await;
    drop((call, again));
    let seen = seen.await.unwrap();
    for set in &seen {
        assert!(
            set.is_empty() || *set == ids(&[1, 3, 4]),
            "the agent served a partial or stale set: {set:?} (all: {seen:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_update_is_applied_whole_once_and_resets_the_backoff() {
    let mut setup = Setup::start(UpdateBounds::default()).await;
    // Record every set the agent ever publishes.
    let seen = record_served(&setup);

    // Six failures grow the backoff: the next delay is 1.6 to 3.2 s.
    let at = calls_answered_with(&mut setup, 6, &[Err(Status::internal("broken"))]).await;
    assert_backoff_grew(&at);

    // A snapshot in three pages; the third comes only after a pause in
    // which a page applied on its own would have been published.
    let call = setup.next_call().await;
    let mut first = setup.page(5, &[1, 2], true);
    first.snapshot = true;
    call.tx.send(Ok(first)).await.unwrap();
    call.tx.send(Ok(setup.page(5, &[3], true))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(setup.served().is_empty(), "{:?}", setup.served());
    call.tx.send(Ok(setup.page(5, &[4], false))).await.unwrap();
    let mut rx = setup.agent.snapshots.clone();
    tokio::time::timeout(PROMPT, rx.wait_for(|s| s.entries.len() == 4))
        .await
        .expect("the whole snapshot is served")
        .unwrap();
    assert_eq!(setup.served(), ids(&[1, 2, 3, 4]));

    // A second snapshot (entry 1 gone) whose later pages must not be lost
    // to its snapshot flag, then an update cut off after its first page.
    let mut first = setup.page(6, &[2], true);
    first.snapshot = true;
    call.tx.send(Ok(first)).await.unwrap();
    call.tx.send(Ok(setup.page(6, &[5], false))).await.unwrap();
    tokio::time::timeout(PROMPT, rx.wait_for(|s| s.entries.len() == 2))
        .await
        .expect("the second snapshot is served")
        .unwrap();
    assert_eq!(setup.served(), ids(&[2, 5]));
    let broke = Instant::now();
    call.tx
        .send(Ok(setup.page(7, &[6, 7], true)))
        .await
        .unwrap();
    call.tx
        .send(Err(Status::internal("broken mid-update")))
        .await
        .unwrap();

    // The agent resumes from the last whole update, soon: its backoff was
    // reset by the applied update (without the reset the delay would be
    // 3.2 to 6.4 s; the bound leaves a loaded machine 2 s to reconnect).
    let again = setup.next_call().await;
    let delay = again.at - broke;
    assert!(delay < Duration::from_millis(2500), "{delay:?}");
    assert_eq!(again.request.revision, 6);
    assert_eq!(known(&again), ids(&[2, 5]));
    assert_eq!(setup.served(), ids(&[2, 5]));

    setup.agent.shutdown().await;
    drop(again);
    let seen = seen.await.unwrap();
    for set in &seen {
        assert!(
            set.is_empty() || *set == ids(&[1, 2, 3, 4]) || *set == ids(&[2, 5]),
            "the agent served a partial update: {set:?} (all: {seen:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_over_the_bound_is_refused_with_a_backoff_and_not_buffered() {
    let mut setup = Setup::start(UpdateBounds {
        max_entries: 3,
        max_bytes: usize::MAX,
    })
    .await;
    let mut at = Vec::new();
    for _ in 0..5 {
        let call = setup.next_call().await;
        at.push(call.at);
        let mut first = setup.page(2, &[1, 2], true);
        first.snapshot = true;
        call.tx.send(Ok(first)).await.unwrap();
        // Pages keep coming; the agent must end the stream itself. Bounded,
        // so that an agent that takes them all fails the test instead of
        // hanging it (sends into a queue that never fills do not yield to
        // the timeout); one that stops reading without closing fills the
        // 64-page queue, and the timeout ends the wait.
        let flood = async {
            for n in (10..20_000).step_by(2) {
                if call
                    .tx
                    .send(Ok(setup.page(2, &[n, n + 1], true)))
                    .await
                    .is_err()
                {
                    return true;
                }
            }
            false
        };
        let ended = tokio::time::timeout(PROMPT, flood)
            .await
            .expect("the agent ends a stream over its bound");
        assert!(ended, "the agent took 10,000 pages of one update");
    }
    assert_backoff_grew(&at);
    assert!(setup.served().is_empty(), "{:?}", setup.served());
    // An update within the bound is still taken.
    let call = setup.next_call().await;
    assert_eq!(call.request.revision, 0);
    call.tx
        .send(Ok(setup.page(3, &[1, 2, 3], false)))
        .await
        .unwrap();
    let mut rx = setup.agent.snapshots.clone();
    tokio::time::timeout(PROMPT, rx.wait_for(|s| s.entries.len() == 3))
        .await
        .expect("a bounded update is served")
        .unwrap();
    setup.agent.shutdown().await;
}

/// A server that refuses the agent's certificate does so after the agent's
/// side of the TLS 1.3 handshake is done. Left to the HTTP/2 connection,
/// its alert is lost to the call in flight, which fails with a bare
/// "transport error" ("connection closed", or a broken pipe); the agent
/// reads the server's first records before it uses a connection, so its
/// error, which it logs as "server unreachable", names the cause: here the
/// server's alert that the agent's SVID expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_agent_svid_is_named_in_the_agents_error() {
    use sigil_agent::server_api::{GrpcServer, ServerClient};
    use sigil_svid::tls::{Authorize, RotatingCert, SpiffeClientVerifier, StaticTrust};

    sigil_svid::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let td = TrustDomain::new("example.org").unwrap();
    let ca = Arc::new(X509Authority::generate(&td, 24 * hour, now - 2 * hour).unwrap());
    let svid = |id: &SpiffeId, at: SystemTime| {
        let key = PrivateKey::generate_p256().unwrap();
        let der = ca
            .sign_svid(&SvidRequest::new(id, hour), &key.public_key_spki_der(), at)
            .unwrap();
        (der, key)
    };
    let server_id = td.id_with_path(sigil_types::SERVER_PATH).unwrap();
    let (server_cert, server_key) = svid(&server_id, now);
    let verifier = SpiffeClientVerifier::new(
        Arc::new(StaticTrust(
            [(td.clone(), vec![ca.cert_der().to_vec()])].into(),
        )),
        Authorize::AnyPathPrefix(td.id_with_path("/sigil/agent").unwrap()),
        true,
    );
    let tls = rustls::ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(
            vec![CertificateDer::from(server_cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.pkcs8_der().to_vec())),
        )
        .unwrap();
    let (addr, mut calls) = serve_fake(ca.clone(), tls).await;

    // Signed two hours ago for an hour: expired.
    let agent_id = td.id_with_path("/sigil/agent/test/node-1").unwrap();
    let (agent_cert, agent_key) = svid(&agent_id, now - 2 * hour);
    let cfg = AgentConfig::with_defaults(td.clone(), addr.to_string(), dir.path().into());
    let mut bundle = Bundle::new(td.clone());
    bundle.x509_authorities.push(ca.cert_der().to_vec());
    let server = GrpcServer::new(
        &cfg,
        Arc::new(arc_swap::ArcSwap::from_pointee(bundle)),
        Arc::new(RotatingCert::new(vec![agent_cert], &agent_key).unwrap()),
    )
    .unwrap();
    let err = match server.open_sync(pb::SyncRequest::default()).await {
        Ok(_) => panic!("the server took an expired agent SVID"),
        Err(e) => e.to_string(),
    };
    println!("{err}");
    assert!(
        err.contains("the server refused the connection after the TLS handshake"),
        "{err}"
    );
    assert!(
        err.contains("received fatal alert: CertificateExpired"),
        "{err}"
    );
    assert!(calls.try_recv().is_err(), "no Sync call reached the server");
}

/// With `x509_svid_cache_max_size = 1` and three entries, the agent signs
/// one SVID up front (the first entry's); a Workload API caller whose entry
/// has none is answered with its SVID, signed on demand, in its first
/// response, not with an empty answer or `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_gets_its_svid_signed_on_demand_under_the_bound() {
    use sigil_proto::workload as wl;
    use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let mut setup = Setup::start_bounded(UpdateBounds::default(), 1).await;
    let call = setup.next_call().await;
    let uid = nix::unistd::getuid();
    let mut page = setup.page(1, &[1, 2], false);
    page.upserted
        .push(setup.entry_for(3, &format!("unix:uid:{uid}")));
    call.tx.send(Ok(page)).await.unwrap();
    let held = |setup: &Setup| -> BTreeSet<String> {
        let snap = setup.agent.snapshots.borrow();
        snap.svids.keys().map(ToString::to_string).collect()
    };
    let deadline = Instant::now() + PROMPT;
    while held(&setup).is_empty() {
        assert!(Instant::now() < deadline, "no SVID signed up front");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(held(&setup), ids(&[1]));

    let channel = crate::limits::channel(setup.agent.socket_path.clone())
        .await
        .unwrap();
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut stream = client
        .fetch_x509svid(crate::limits::req(wl::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(PROMPT, stream.message())
        .await
        .expect("first response in time")
        .unwrap()
        .expect("a response");
    let got: Vec<&str> = first.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(got, ["spiffe://example.org/workload-3"]);
    // Held beside the first while the stream is open.
    assert_eq!(held(&setup), ids(&[1, 3]));
    drop(stream);
    // Its end makes entry-3 the most recently asked: entry-1 goes.
    let deadline = Instant::now() + PROMPT;
    while held(&setup) != ids(&[3]) {
        assert!(Instant::now() < deadline, "held {:?}", held(&setup));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    setup.agent.shutdown().await;
}
