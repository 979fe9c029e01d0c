//! Connections to the server's agent API: gRPC over rustls, the server
//! authenticated as `spiffe://<td>/sigil/server` against the current bundle,
//! the agent presenting its SVID once it has one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use sigil_proto::server::v1::agent_api_client::AgentApiClient;
use sigil_svid::bundle::Bundle;
use sigil_svid::tls::{Authorize, RotatingCert, SpiffeServerVerifier, TrustRoots};
use sigil_types::{SpiffeId, TrustDomain};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::AgentError;
use crate::config::ServerAddresses;

/// The bundle the agent trusts now, read at every handshake.
#[derive(Debug)]
pub struct BundleTrust(pub Arc<ArcSwap<Bundle>>);

impl TrustRoots for BundleTrust {
    fn roots_for(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
        let b = self.0.load();
        if &b.trust_domain != td {
            return Vec::new();
        }
        b.x509_authorities
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect()
    }
}

/// Largest message accepted from the server (16 MiB). The server sends a
/// sync update in pages of at most 4 MiB (`sigil_server::sync_pages::PAGE_BYTES`),
/// so this fits a page with room for its bundles; what an update may hold
/// across its pages is bounded separately ([`crate::paging::UpdateBounds`]).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How long one address may take to accept a TCP connection and finish the
/// TLS handshake before the next one is tried.
const PER_ADDRESS_TIMEOUT: Duration = Duration::from_secs(3);

/// How often the agent pings the server over an idle connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a channel to one of the servers. `cert` is the agent SVID, absent
/// before attestation.
pub async fn connect(
    servers: &ServerAddresses,
    trust: Arc<ArcSwap<Bundle>>,
    server_id: SpiffeId,
    cert: Option<Arc<RotatingCert>>,
) -> Result<AgentApiClient<Channel>, AgentError> {
    connect_watched(
        servers,
        trust,
        server_id,
        cert,
        ConnectionFailure::default(),
    )
    .await
}

/// Like [`connect`], recording in `failure` the I/O error that ends any
/// connection the channel opens (see [`ConnectionFailure`]).
pub(crate) async fn connect_watched(
    servers: &ServerAddresses,
    trust: Arc<ArcSwap<Bundle>>,
    server_id: SpiffeId,
    cert: Option<Arc<RotatingCert>>,
    failure: ConnectionFailure,
) -> Result<AgentApiClient<Channel>, AgentError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        Arc::new(BundleTrust(trust)),
        Authorize::Exact(server_id),
    ));
    let builder = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    connect_with(servers, config, failure).await
}

/// Opens a channel with a given TLS config to the first server, in order,
/// that accepts a TCP connection and completes the TLS handshake (the
/// server's identity included) within [`PER_ADDRESS_TIMEOUT`]. A name with
/// several DNS records is tried record by record.
pub(crate) async fn connect_with(
    servers: &ServerAddresses,
    config: ClientConfig,
    failure: ConnectionFailure,
) -> Result<AgentApiClient<Channel>, AgentError> {
    let connector = TlsConnector::from(Arc::new(config));
    let addresses: Arc<[String]> = servers.as_slice().into();
    let endpoint = Endpoint::from_shared(format!("http://{}", addresses[0]))
        .map_err(|e| AgentError::Config(format!("server address {:?}: {e}", addresses[0])))?
        // A silent server (a partition, a dead host) is noticed within
        // 15 s, and the agent moves on to the next address.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let addresses = addresses.clone();
            let failure = failure.clone();
            async move {
                let tls = first_reachable(&addresses, &connector).await?;
                Ok::<_, std::io::Error>(TokioIo::new(Watched {
                    inner: tls,
                    failure,
                }))
            }
        }))
        .await
        .map_err(|e| {
            AgentError::Unavailable(format!(
                "cannot reach a server ({servers}): {}",
                crate::error_chain(&e)
            ))
        })?;
    Ok(AgentApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The index of the address that answered last, so that an agent sticks to
/// a working server; before the first answer, agents start at an index
/// derived from their process ID, which spreads them over the servers.
static PREFERRED: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The TLS stream of the first address that answers, starting with the
/// preferred one; the error names every address tried and why it failed.
async fn first_reachable(
    addresses: &[String],
    connector: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let n = addresses.len();
    let start = match PREFERRED.load(Ordering::Relaxed) {
        usize::MAX => std::process::id() as usize % n,
        i => i % n,
    };
    let mut failures = Vec::new();
    for i in (start..n).chain(0..start) {
        let address = &addresses[i];
        let resolved = match tokio::net::lookup_host(address.as_str()).await {
            Ok(r) => r.collect::<Vec<_>>(),
            Err(e) => {
                failures.push(format!("{address}: {e}"));
                continue;
            }
        };
        for addr in resolved {
            match tokio::time::timeout(PER_ADDRESS_TIMEOUT, handshake(addr, connector)).await {
                Ok(Ok(tls)) => {
                    PREFERRED.store(i, Ordering::Relaxed);
                    return Ok(tls);
                }
                Ok(Err(e)) => failures.push(format!("{address} ({addr}): {e}{}", clock_hint(&e))),
                Err(_) => failures.push(format!(
                    "{address} ({addr}): no answer within {PER_ADDRESS_TIMEOUT:?}"
                )),
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        failures.join("; "),
    ))
}

/// The I/O error that ended the last connection to the server that failed.
///
/// A call in flight when its connection dies (the server killed, a reset,
/// an alert) fails as "operation was canceled: connection closed" or with
/// a broken pipe, without what the HTTP/2 connection task read. The
/// connection records its error here first, so the caller can say why the
/// call failed.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionFailure(Arc<std::sync::Mutex<Option<String>>>);

impl ConnectionFailure {
    fn record(&self, e: &std::io::Error) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(e.to_string());
        }
    }

    /// Takes the recorded error, leaving none.
    pub(crate) fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut last| last.take())
    }
}

/// A connection's stream that records its I/O errors in a [`ConnectionFailure`].
struct Watched<S> {
    inner: S,
    failure: ConnectionFailure,
}

impl<S> Watched<S> {
    fn seen<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            self.failure.record(e);
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.seen(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.seen(r)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.seen(r)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.seen(r)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.seen(r)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A hint when the server's certificate was refused for its validity
/// period: with server SVIDs backdated by only [`sigil_svid::x509::BACKDATE`],
/// that is nearly always this host's clock, not the server.
fn clock_hint(e: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    let Some(rustls::Error::InvalidCertificate(c)) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "";
    };
    match c {
        C::NotValidYet | C::NotValidYetContext { .. } => {
            " (this host's clock is behind the server's by more than the 10 s the \
             server backdates its certificates; fix the clock, e.g. with NTP)"
        }
        C::Expired | C::ExpiredContext { .. } => {
            " (if the server is up to date, this host's clock is ahead of the \
             server's; fix the clock, e.g. with NTP)"
        }
        _ => "",
    }
}

async fn handshake(
    addr: std::net::SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    // The verifier checks the SPIFFE ID, not this name.
    let name = ServerName::try_from("sigil-server")
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut tls = connector.connect(name, tcp).await?;
    server_verdict(&mut tls).await?;
    Ok(tls)
}

/// How long a new connection waits for the server's first records after
/// the agent's side of the TLS handshake is done.
const VERDICT_WAIT: Duration = Duration::from_secs(1);

/// Waits, at most [`VERDICT_WAIT`], for the server's first records after the
/// handshake, leaving what they carry for HTTP/2 to read. With TLS 1.3 the
/// server checks the agent's certificate only once the agent's side of the
/// handshake is done, and refuses it with an alert; read later by the
/// HTTP/2 connection, the alert is lost to the call in flight ("connection
/// closed", or a broken pipe if the request was written after the server
/// closed). Read here, it fails the connection with the server's reason.
/// A server that sends nothing within the wait is left to the call.
async fn server_verdict(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
) -> std::io::Result<()> {
    let refused = |why: String| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("the server refused the connection after the TLS handshake: {why}"),
        )
    };
    let first_records = async {
        loop {
            let (tcp, conn) = tls.get_mut();
            let state = conn
                .process_new_packets()
                .map_err(|e| refused(e.to_string()))?;
            if state.plaintext_bytes_to_read() > 0 {
                return Ok(());
            }
            if state.peer_has_closed() {
                return Err(refused("it closed it".into()));
            }
            tcp.readable().await?;
            match conn.read_tls(&mut TryRead(tcp)) {
                Ok(0) => return Err(refused("it closed it".into())),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(VERDICT_WAIT, first_records)
        .await
        .unwrap_or(Ok(()))
}

/// A socket read without waiting, as rustls's `read_tls` wants it.
struct TryRead<'a>(&'a TcpStream);

impl std::io::Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// The trust anchor for a first attestation with a join token that carries
/// the CA fingerprint: a bundle holding only the X.509 authority whose
/// SHA-256 is `fingerprint`.
///
/// The bundle is fetched over a connection that authenticates nothing, so
/// whoever answers may add authorities of its own next to the real one; the
/// only thing taken from that answer is the one certificate the token pins.
/// The attestation handshake is then anchored on that certificate alone, and
/// the agent's full bundle comes from the authenticated attestation answer.
pub async fn bootstrap_bundle_by_fingerprint(
    servers: &ServerAddresses,
    trust_domain: &TrustDomain,
    fingerprint: &str,
) -> Result<Bundle, AgentError> {
    let want = fingerprint.to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AgentError::Bootstrap(format!(
            "the join token's CA fingerprint {fingerprint:?} is not a SHA-256 (64 hex characters); \
             copy the whole token from `sigil token generate`"
        )));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sigil_svid::tls::danger::NoServerVerification(
            provider,
        )))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let client = connect_with(servers, config, ConnectionFailure::default()).await?;
    let resp = crate::retry::while_exhausted("GetBundle", || {
        let mut client = client.clone();
        async move {
            client
                .get_bundle(sigil_proto::server::v1::GetBundleRequest {})
                .await
        }
    })
    .await
    .map_err(|s| {
        AgentError::Unavailable(format!(
            "fetching the bootstrap bundle: {}",
            crate::status_chain(&s)
        ))
    })?
    .into_inner();
    let offered = Bundle::from_json(trust_domain.clone(), &resp.bundle_json)?;
    let Some(pinned) = offered
        .x509_authorities
        .into_iter()
        .find(|c| sigil_svid::x509::sha256_hex(c) == want)
    else {
        return Err(AgentError::Bootstrap(format!(
            "the server ({servers}) offered a bundle without the CA fingerprint {want} from the join token; refusing to trust it"
        )));
    };
    let mut anchor = Bundle::new(trust_domain.clone());
    anchor.x509_authorities.push(pinned);
    Ok(anchor)
}
