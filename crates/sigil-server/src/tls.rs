//! The agent API's TLS listener: rustls with SPIFFE verifiers, handing tonic
//! connections that carry the peer's SPIFFE ID and certificate serial.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use sigil_svid::tls::{Authorize, RotatingCert, SpiffeClientVerifier, TrustRoots};
use sigil_types::slots::{KeyedSlots, Slot};
use sigil_types::{SpiffeId, TrustDomain};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::ca::CaManager;

/// Who is at the other end of an agent API connection.
#[derive(Debug, Clone)]
pub struct AgentPeer {
    /// The SPIFFE ID of the client certificate; `None` before attestation.
    pub spiffe_id: Option<SpiffeId>,
    /// Serial number (hex) of the client certificate.
    pub serial: Option<String>,
    /// The remote address.
    pub remote: SocketAddr,
    /// Marked at the connection's first call.
    pub(crate) first_call: FirstCall,
}

/// Whether a connection has carried a call yet: set by the agent API's
/// interceptor, read by the connection, which is closed at
/// `first_request_timeout` while it is unset.
#[derive(Debug, Clone, Default)]
pub(crate) struct FirstCall(Arc<AtomicBool>);

impl FirstCall {
    /// Records that a call arrived.
    pub(crate) fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The slots of the connection caps an accepted connection holds until it
/// closes.
#[derive(Debug, Default)]
struct Slots {
    /// Under `max_connections`.
    _total: Option<OwnedSemaphorePermit>,
    /// Under `max_connections_per_source`.
    _source: Option<Slot<IpAddr>>,
    /// Under `max_anonymous_connections`, for a client without a certificate.
    _anonymous: Option<OwnedSemaphorePermit>,
}

/// A TLS connection with its peer information.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: AgentPeer,
    /// Fires `first_request_timeout` after the handshake; dropped at the
    /// first call.
    first_request: Option<Pin<Box<Sleep>>>,
    _slots: Slots,
}

impl Connected for TlsConn {
    type ConnectInfo = AgentPeer;
    fn connect_info(&self) -> AgentPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // HTTP/2 keeps a read pending on an open connection, so polling the
        // deadline here wakes the connection when it fires; the read error
        // makes the server close it.
        if let Some(deadline) = &mut this.first_request {
            if this.peer.first_call.seen() {
                this.first_request = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!(remote = %this.peer.remote, "no call within the first-request timeout; closing the connection");
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no call within the first-request timeout",
                )));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The server's own bundle as the trust source of client verification; read
/// at each handshake, so CA rotation needs no restart.
#[derive(Debug)]
pub struct OwnBundleTrust(pub Arc<CaManager>);

impl TrustRoots for OwnBundleTrust {
    fn roots_for(&self, td: &TrustDomain) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        if td != self.0.trust_domain() {
            return Vec::new();
        }
        self.0
            .bundle()
            .x509_authorities
            .iter()
            .map(|d| rustls_pki_types::CertificateDer::from(d.clone()))
            .collect()
    }
}

/// The rustls config of the agent API: the server's SVID, client
/// certificates optional (attestation comes before the agent has one) but,
/// when presented, verified and required to be agent IDs of our trust domain.
pub fn server_config(
    ca: Arc<CaManager>,
    cert: Arc<RotatingCert>,
) -> Result<ServerConfig, crate::ServerError> {
    let td = ca.trust_domain().clone();
    let agent_prefix = crate::error::own_id(&td, sigil_types::AGENT_PATH_PREFIX)?;
    let verifier = SpiffeClientVerifier::new(
        Arc::new(OwnBundleTrust(ca)),
        Authorize::AnyPathPrefix(agent_prefix),
        true,
    );
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// How long a client of [`accept_tls`] may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and runs their TLS handshakes concurrently, each
/// bounded by a timeout, so a slow client never blocks others; yields the
/// finished connections. `what` names the listener in logs. Ends (the
/// receiver sees `None`) when `cancel` fires.
pub(crate) fn accept_tls(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    cancel: CancellationToken,
    what: &'static str,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let bounds = ConnBounds {
        max_connections: None,
        max_per_source: None,
        handshake_timeout: HANDSHAKE_TIMEOUT,
    };
    accept_with(listener, config, cancel, what, bounds, |tls, remote, _| {
        (tls, remote)
    })
}

/// How many connections a TLS listener keeps and how long a handshake may take.
#[derive(Debug, Clone, Copy)]
struct ConnBounds {
    /// Open connections (handshakes included) beyond which a new one is
    /// closed at once; `None`: no cap.
    max_connections: Option<usize>,
    /// The same, per source address (IPv6 by /64); `None`: no cap.
    max_per_source: Option<usize>,
    /// A client that has not finished the handshake by then is disconnected.
    handshake_timeout: Duration,
}

/// The accept loop behind [`accept_tls`] and [`incoming`]: each accepted
/// connection takes a slot of its source address and one of
/// `bounds.max_connections` (released when the connection is dropped) or is
/// closed at once, so connections already open are never disturbed by a
/// flood of new ones, and one address cannot take every slot.
fn accept_with<T: Send + 'static>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    cancel: CancellationToken,
    what: &'static str,
    bounds: ConnBounds,
    wrap: fn(TlsStream<TcpStream>, SocketAddr, Slots) -> T,
) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let slots = bounds
        .max_connections
        .map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS))));
    let per_source = bounds.max_per_source.map(KeyedSlots::new);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // The source's cap first: an address at its cap must not take
            // a slot of the total from others, even for a moment.
            let source = match &per_source {
                Some(per_source) => {
                    match per_source.try_acquire(crate::limits::source_key(remote.ip())) {
                        Some(s) => Some(s),
                        None => {
                            tracing::debug!(listener = what, %remote, "per-source connection limit reached; closing the new connection");
                            continue;
                        }
                    }
                }
                None => None,
            };
            let total = match &slots {
                Some(slots) => match slots.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        tracing::debug!(listener = what, %remote, "connection limit reached; closing the new connection");
                        continue;
                    }
                },
                None => None,
            };
            let held = Slots {
                _total: total,
                _source: source,
                _anonymous: None,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(bounds.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(wrap(tls, remote, held)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = what, %remote, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(listener = what, %remote, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// The agent API's connections: at most `limits.max_connections` open
/// (handshakes included; more are closed at once), at most
/// `limits.max_connections_per_source` of them from one address, at most
/// `limits.max_anonymous_connections` without a client certificate; each
/// handshake bounded by `limits.handshake_timeout`, each connection closed
/// if no call arrives within `limits.first_request_timeout` of it; each with
/// the peer's SPIFFE ID and certificate serial for the handlers.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    cancel: CancellationToken,
    limits: &crate::limits::ServerLimits,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let bounds = ConnBounds {
        max_connections: Some(limits.max_connections),
        max_per_source: Some(limits.max_connections_per_source),
        handshake_timeout: limits.handshake_timeout,
    };
    let anonymous = Arc::new(Semaphore::new(
        limits.max_anonymous_connections.min(Semaphore::MAX_PERMITS),
    ));
    let first_request_timeout = limits.first_request_timeout;
    let mut conns = accept_with(
        listener,
        config,
        cancel,
        "agent API",
        bounds,
        |tls, remote, slots| (tls, remote, slots),
    );
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some((tls, remote, mut slots)) = conns.recv().await {
            let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
            // A certificate that was presented has been verified by now, so
            // only clients without one share the small anonymous cap.
            if certs.is_empty() {
                match anonymous.clone().try_acquire_owned() {
                    Ok(p) => slots._anonymous = Some(p),
                    Err(_) => {
                        tracing::debug!(%remote, "limit of connections without a client certificate reached; closing the new connection");
                        continue;
                    }
                }
            }
            let spiffe_id = sigil_svid::tls::peer_spiffe_id(certs);
            let serial = certs
                .first()
                .and_then(|c| sigil_svid::x509::cert_info(c.as_ref()).ok())
                .map(|i| i.serial_hex);
            let conn = TlsConn {
                inner: tls,
                peer: AgentPeer {
                    spiffe_id,
                    serial,
                    remote,
                    first_call: FirstCall::default(),
                },
                first_request: Some(Box::pin(tokio::time::sleep(first_request_timeout))),
                _slots: slots,
            };
            if tx.send(Ok(conn)).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
