//! The SPIFFE bundle endpoint this server serves (spiffe.md §4.3): HTTPS,
//! `GET /` answers the trust domain's current bundle as JSON, any other path
//! 404, any other method 405. No client authentication. TLS 1.2 and 1.3 with
//! AEAD suites only (rustls' defaults, within Mozilla "intermediate").

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig as TlsServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{BundleEndpointConfig, ServeProfile};
use crate::ServerError;
use crate::ca::CaManager;
use crate::cert_files::{CertFiles, FileCertResolver};
use sigil_svid::tls::RotatingCert;

/// How long a client may take to send its request headers.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 512;

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
            let resolver = FileCertResolver::new(CertFiles {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                cert_key: "server.federation.bundle_endpoint.cert_file",
                key_key: "server.federation.bundle_endpoint.key_file",
            })?;
            TlsServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver))
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
    let mut conns = crate::tls::accept_tls(listener, tls, cancel.clone(), "bundle endpoint");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let tasks = tracker.clone();
    tracker.spawn(async move {
        while let Some((tls, remote)) = conns.recv().await {
            // Beyond the limit, finished handshakes wait here for a slot.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let ca = ca.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = serve_connection(tls, remote, ca) => {}
                }
            });
        }
    });
    Ok(addr)
}

async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    remote: SocketAddr,
    ca: Arc<CaManager>,
) {
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
