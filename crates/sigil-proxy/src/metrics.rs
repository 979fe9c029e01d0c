//! Prometheus metrics of the proxy, and the small HTTP listener that serves
//! them (`/metrics`, `/healthz`, `/readyz`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Label pairs of one metric sample.
type Labels = Vec<(&'static str, String)>;

/// The proxy's counters and gauges, all under the `sigil_proxy_` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<Labels, Counter>,
    connections: Family<Labels, Counter>,
    active: Family<Labels, Gauge>,
    policy_reloads: Family<Labels, Counter>,
    policy_rules: Gauge,
    svid_updates: Counter,
    workload_api_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sigil_proxy");
        let decisions = Family::<Labels, Counter>::default();
        let connections = Family::<Labels, Counter>::default();
        let active = Family::<Labels, Gauge>::default();
        let policy_reloads = Family::<Labels, Counter>::default();
        let policy_rules = Gauge::default();
        let svid_updates = Counter::default();
        let workload_api_errors = Counter::default();
        registry.register(
            "decisions",
            "Authorization decisions, by decision (allowed, denied) and deciding rule",
            decisions.clone(),
        );
        registry.register(
            "connections",
            "Connections handled, by direction, listener and outcome",
            connections.clone(),
        );
        registry.register(
            "active_connections",
            "Connections open now, by direction",
            active.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy file loads after start, by result (ok, error)",
            policy_reloads.clone(),
        );
        registry.register(
            "policy_rules",
            "Rules in the policy in force",
            policy_rules.clone(),
        );
        registry.register(
            "svid_updates",
            "X509-SVID and bundle updates received from the Workload API",
            svid_updates.clone(),
        );
        registry.register(
            "workload_api_errors",
            "Failed connections to or broken streams from the Workload API",
            workload_api_errors.clone(),
        );
        Self {
            registry,
            decisions,
            connections,
            active,
            policy_reloads,
            policy_rules,
            svid_updates,
            workload_api_errors,
        }
    }
}

impl Metrics {
    /// Counts one authorization decision.
    pub fn decision(&self, allowed: bool, rule: &str) {
        let decision = if allowed { "allowed" } else { "denied" };
        self.decisions
            .get_or_create(&vec![
                ("decision", decision.to_owned()),
                ("rule", rule.to_owned()),
            ])
            .inc();
    }

    /// Counts one finished connection attempt.
    pub fn connection(&self, direction: &'static str, listener: &str, outcome: &'static str) {
        self.connections
            .get_or_create(&vec![
                ("direction", direction.to_owned()),
                ("listener", listener.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// Marks a connection open until the returned guard is dropped.
    pub fn open(&self, direction: &'static str) -> ActiveGuard {
        let gauge = self
            .active
            .get_or_create(&vec![("direction", direction.to_owned())])
            .clone();
        gauge.inc();
        ActiveGuard(gauge)
    }

    /// Counts one policy reload.
    pub fn policy_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.policy_reloads
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    /// Records the number of rules now in force.
    pub fn set_policy_rules(&self, n: usize) {
        self.policy_rules.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one update from the Workload API.
    pub fn svid_update(&self) {
        self.svid_updates.inc();
    }

    /// Counts one Workload API failure.
    pub fn workload_api_error(&self) {
        self.workload_api_errors.inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        sigil_metrics::render(&self.registry)
    }
}

/// Decrements the active-connections gauge when dropped.
#[derive(Debug)]
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `cancel`;
/// returns the bound address. `ready` says whether the proxy holds an SVID.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener: accept failed");
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.encode()),
                        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
                        "/readyz" if ready() => (StatusCode::OK, "ready\n".to_owned()),
                        "/readyz" => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no X509-SVID yet\n".to_owned(),
                        ),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    if status == StatusCode::OK && req.uri().path() == "/metrics" {
                        resp.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(sigil_metrics::CONTENT_TYPE),
                        );
                    }
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}
