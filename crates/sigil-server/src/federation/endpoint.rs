//! The SPIFFE bundle endpoint this server serves (spiffe.md §4.3): HTTPS,
//! `GET /` answers the trust domain's current bundle as JSON, any other path
//! 404, any other method 405. No client authentication. TLS 1.2 and 1.3 with
//! AEAD suites only (rustls' defaults, within Mozilla "intermediate").

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig as TlsServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{BundleEndpointConfig, ServeProfile};
use crate::ServerError;
use crate::ca::CaManager;
use sigil_svid::tls::RotatingCert;
use sigil_types::config::ConfigError;

/// How long a client may take for the TLS handshake, and to send its request headers.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 512;

fn file_error(key: &'static str, path: &Path, message: String) -> ServerError {
    ServerError::Config(ConfigError::Invalid {
        path: None,
        key,
        message: format!("{}: {message}", path.display()),
    })
}

/// Reads a PEM certificate chain (leaf first) and private key for `https_web`.
pub(crate) fn load_web_identity(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServerError> {
    const CERT_KEY: &str = "server.federation.bundle_endpoint.cert_file";
    const KEY_KEY: &str = "server.federation.bundle_endpoint.key_file";
    let pem = std::fs::read(cert_file)
        .map_err(|e| file_error(CERT_KEY, cert_file, format!("cannot read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(CERT_KEY, cert_file, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(file_error(
            CERT_KEY,
            cert_file,
            "holds no CERTIFICATE block".into(),
        ));
    }
    let pem = std::fs::read(key_file)
        .map_err(|e| file_error(KEY_KEY, key_file, format!("cannot read: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        file_error(
            KEY_KEY,
            key_file,
            format!("no PKCS#8, SEC1 or PKCS#1 private key: {e}"),
        )
    })?;
    Ok((chain, key))
}

/// The TLS configuration of the endpoint for its profile.
fn tls_config(
    profile: &ServeProfile,
    server_cert: Arc<RotatingCert>,
) -> Result<TlsServerConfig, ServerError> {
    let mut config = match profile {
        ServeProfile::HttpsSpiffe => TlsServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(server_cert),
        ServeProfile::HttpsWeb {
            cert_file,
            key_file,
        } => {
            let (chain, key) = load_web_identity(cert_file, key_file)?;
            TlsServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|e| {
                    file_error(
                        "server.federation.bundle_endpoint.key_file",
                        key_file,
                        format!("unusable with {}: {e}", cert_file.display()),
                    )
                })?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Binds the endpoint and serves it until `cancel`; returns the bound address.
pub(crate) async fn serve(
    config: &BundleEndpointConfig,
    ca: Arc<CaManager>,
    server_cert: Arc<RotatingCert>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, ServerError> {
    let tls = Arc::new(tls_config(&config.profile, server_cert)?);
    let listener = TcpListener::bind(config.address).await.map_err(|e| {
        ServerError::Io(std::io::Error::new(
            e.kind(),
            format!(
                "cannot bind the bundle endpoint to {} (server.federation.bundle_endpoint.address): {e}",
                config.address
            ),
        ))
    })?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let conns = tracker.clone();
    tracker.spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, remote) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "bundle endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let ca = ca.clone();
            let cancel = cancel.clone();
            conns.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = serve_connection(tcp, remote, acceptor, ca) => {}
                }
            });
        }
    });
    Ok(addr)
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    ca: Arc<CaManager>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "bundle endpoint: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "bundle endpoint: TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let ca = ca.clone();
        async move { Ok::<_, Infallible>(answer(&req, &ca)) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "bundle endpoint: connection ended with an error");
    }
}

/// The answer to one request.
fn answer(req: &Request<Incoming>, ca: &CaManager) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/" {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(ca.bundle().to_json())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
