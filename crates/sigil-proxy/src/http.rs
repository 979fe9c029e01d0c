//! HTTP on the inbound side when a caller header is configured: each
//! request is parsed (HTTP/1.1 or HTTP/2, told apart by the connection
//! preface), every copy of the header the caller sent is removed, the
//! caller's authenticated SPIFFE ID is put in its place, and the request is
//! forwarded to the application over one connection per inbound connection
//! (HTTP/1.1 to HTTP/1.1, HTTP/2 to HTTP/2 with prior knowledge). HTTP/1.1
//! upgrades (WebSocket) are passed through once the application agrees.
//!
//! Also the small answers the proxy itself gives over HTTP: `403` to a
//! denied caller, `502` to the local application when the upstream is
//! unreachable or refused.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// The body type of every response the proxy sends.
type Body = BoxBody<Bytes, hyper::Error>;

/// How long a denied caller's connection is kept to deliver the `403`.
const DENIED_LINGER: Duration = Duration::from_secs(5);

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn full(status: StatusCode, text: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The application side of one inbound connection.
struct AppConn {
    app: String,
    h1: Mutex<Option<client1::SendRequest<Incoming>>>,
    h2: Mutex<Option<client2::SendRequest<Incoming>>>,
    header: HeaderName,
    caller: HeaderValue,
}

impl AppConn {
    async fn h1(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<client1::SendRequest<Incoming>>>, String> {
        let mut slot = self.h1.lock().await;
        let usable = match slot.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let tcp = TcpStream::connect(&self.app)
                .await
                .map_err(|e| format!("cannot connect to the application at {}: {e}", self.app))?;
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = client1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP/1.1 to the application at {}: {e}", self.app))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "application connection (HTTP/1.1) ended");
                }
            });
            *slot = Some(sender);
        }
        Ok(slot)
    }

    async fn h2(&self) -> Result<client2::SendRequest<Incoming>, String> {
        let mut slot = self.h2.lock().await;
        if let Some(s) = slot.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let tcp = TcpStream::connect(&self.app)
            .await
            .map_err(|e| format!("cannot connect to the application at {}: {e}", self.app))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = client2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2 to the application at {}: {e}", self.app))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "application connection (HTTP/2) ended");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let headers = req.headers_mut();
        // Whatever the caller said about its identity is dropped; only the
        // authenticated ID goes to the application.
        while headers.remove(&self.header).is_some() {}
        headers.insert(self.header.clone(), self.caller.clone());
        let result = if req.version() == Version::HTTP_2 {
            match self.h2().await {
                Ok(mut s) => s.send_request(req).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            }
        } else {
            self.forward_h1(req).await
        };
        match result {
            Ok(resp) => resp.map(|b| b.boxed()),
            Err(e) => {
                tracing::warn!(app = %self.app, error = %e, "cannot forward the request to the application");
                full(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: the application behind the proxy is unreachable\n".to_owned(),
                )
            }
        }
    }

    async fn forward_h1(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let server_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let mut slot = self.h1().await?;
        let sender = slot
            .as_mut()
            .ok_or_else(|| "no application connection".to_owned())?;
        let mut resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(server_side) = server_side
        {
            // This application connection now belongs to the upgraded stream.
            *slot = None;
            let app_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(server_side, app_side) {
                    Ok((a, b)) => {
                        let mut a = TokioIo::new(a);
                        let mut b = TokioIo::new(b);
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "HTTP upgrade failed"),
                }
            });
        }
        Ok(resp)
    }
}

/// Serves one authorized inbound connection, putting `caller` into `header`
/// of every request and forwarding it to `app`.
pub(crate) async fn serve_injecting<S>(io: S, app: String, header: HeaderName, caller: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let caller = match HeaderValue::from_str(caller) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "the caller's SPIFFE ID cannot be a header value");
            return;
        }
    };
    let conn = Arc::new(AppConn {
        app,
        h1: Mutex::new(None),
        h2: Mutex::new(None),
        header,
        caller,
    });
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.forward(req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await
    {
        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

/// Answers requests on a denied connection with `403` and `body`, then closes it.
pub(crate) async fn serve_denied<S>(io: S, body: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let answered = Arc::new(tokio::sync::Notify::new());
    let notify = answered.clone();
    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let body = body.clone();
        let notify = notify.clone();
        async move {
            notify.notify_one();
            let mut resp = full(StatusCode::FORBIDDEN, body);
            resp.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let run = async {
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = answered.notified() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.as_mut().await;
            }
        }
    };
    let _ = tokio::time::timeout(DENIED_LINGER, run).await;
}

/// Answers the local application's HTTP/1.x request with `status` and
/// `body` (read the request head first, so the application sees a response
/// rather than a reset), then closes. An HTTP/2 client is just disconnected.
pub(crate) async fn answer_raw<S>(io: &mut S, status: StatusCode, body: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read_head).await;
    if head.starts_with(&H2_PREFACE[..head.len().min(H2_PREFACE.len())]) && !head.is_empty() {
        return;
    }
    let reason = status.canonical_reason().unwrap_or("");
    let text = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    );
    let _ = io.write_all(text.as_bytes()).await;
    let _ = io.shutdown().await;
    // Drain what the application still sends, briefly, so closing does not reset.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
