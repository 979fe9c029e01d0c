//! `/healthz`, `/readyz` and `/metrics` over plain HTTP for `sigil server run`,
//! `sigil agent run` and `sigil dev`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// A readiness answer: `Err` says why the component is not ready.
pub(crate) type ReadyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// What the health listener reports.
pub(crate) trait HealthSource: Send + Sync + 'static {
    /// Whether the component can do its job now; if not, why.
    fn ready(&self) -> ReadyFuture<'_>;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// Serves the health endpoints on `addr` until `cancel`; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    source: Arc<dyn HealthSource>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let ready_src = source.clone();
    let metrics_src = source;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let s = ready_src.clone();
                async move {
                    match s.ready().await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let s = metrics_src.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            sigil_metrics::CONTENT_TYPE,
                        )],
                        s.metrics(),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "health listener stopped");
        }
    });
    Ok(local)
}
