//! Outbound listeners: plaintext from the local application, mutual TLS to
//! one upstream whose SPIFFE ID is checked before any byte is sent.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::StatusCode;
use rustls_pki_types::ServerName;
use sigil_svid::tls::peer_spiffe_id;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::config::{OutboundConfig, Protocol};
use crate::metrics::Metrics;
use crate::policy::Request;
use crate::reload::PolicyStore;
use crate::source::X509Source;

const DIRECTION: &str = "outbound";

/// One outbound listener's shared state.
pub(crate) struct Outbound {
    pub(crate) cfg: OutboundConfig,
    pub(crate) connector: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) source: Arc<X509Source>,
    pub(crate) policy: Option<Arc<PolicyStore>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) handshake_timeout: std::time::Duration,
}

/// The name sent in SNI: the upstream's host. The SPIFFE verifier ignores
/// it; an IP address sends none.
pub(crate) fn server_name(upstream: &str) -> ServerName<'static> {
    let host = upstream
        .rsplit_once(':')
        .map_or(upstream, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_owned()).unwrap_or(ServerName::IpAddress(
        std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into(),
    ))
}

impl Outbound {
    /// Accepts connections until `cancel`.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener, cancel: CancellationToken) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(listener = %self.cfg.name, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let this = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = this.handle(tcp, peer) => {}
                }
            });
        }
    }

    async fn refuse(&self, app: &mut TcpStream, status: StatusCode, message: &str) {
        match self.cfg.protocol {
            Protocol::Http => {
                let body = format!(
                    "{} {}: sigil proxy: {message}\n",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                );
                crate::http::answer_raw(app, status, &body).await;
            }
            Protocol::Tcp => {
                let _ = app.shutdown().await;
            }
        }
    }

    async fn handle(&self, mut app: TcpStream, peer: SocketAddr) {
        let _ = app.set_nodelay(true);
        let _active = self.metrics.open(DIRECTION);
        let name = self.cfg.name.as_str();
        let upstream = self.cfg.upstream.as_str();
        let own = app.local_addr().ok();
        let connect = async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(upstream)
                .await
                .map_err(|e| (false, format!("cannot resolve {upstream}: {e}")))?
                .collect();
            // An upstream that resolves to this very listener would make each
            // connection open another, without end: refuse before connecting.
            if own.is_some_and(|own| addrs.contains(&own)) {
                return Err((
                    false,
                    format!("upstream {upstream} is this outbound listener itself"),
                ));
            }
            let tcp = TcpStream::connect(&addrs[..])
                .await
                .map_err(|e| (false, format!("cannot connect to {upstream}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            self.connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| (true, crate::tls::describe_tls_error(&e)))
        };
        let tls = match tokio::time::timeout(self.handshake_timeout, connect).await {
            Ok(Ok(tls)) => tls,
            Ok(Err((tls_failed, why))) => {
                let outcome = if tls_failed {
                    "upstream_refused"
                } else {
                    "upstream_unreachable"
                };
                tracing::warn!(
                    direction = DIRECTION,
                    listener = name,
                    %peer,
                    upstream,
                    expected = self.cfg.upstream_spiffe_id.as_ref().map(|i| i.as_str()),
                    error = %why,
                    "upstream refused; closing the application's connection"
                );
                self.metrics.connection(DIRECTION, name, outcome);
                self.refuse(&mut app, StatusCode::BAD_GATEWAY, &why).await;
                return;
            }
            Err(_) => {
                tracing::warn!(direction = DIRECTION, listener = name, %peer, upstream,
                    "upstream connection or TLS handshake timed out");
                self.metrics
                    .connection(DIRECTION, name, "upstream_unreachable");
                self.refuse(
                    &mut app,
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream did not answer in time",
                )
                .await;
                return;
            }
        };

        let callee = tls.get_ref().1.peer_certificates().and_then(peer_spiffe_id);
        let Some(callee) = callee else {
            self.metrics.connection(DIRECTION, name, "upstream_refused");
            return;
        };
        if let Some(policy) = &self.policy {
            let me = self.source.identity();
            let policy = policy.current();
            let decision = policy.decide(&Request {
                caller: &me.spiffe_id,
                callee: &callee,
                attributes: &me.attributes,
            });
            self.metrics
                .decision(decision.allowed, decision.rule_name());
            if !decision.allowed {
                tracing::warn!(
                    direction = DIRECTION,
                    listener = name,
                    %peer,
                    upstream,
                    caller = %me.spiffe_id,
                    callee = %callee,
                    rule = decision.rule_name(),
                    decision = "denied",
                    "call denied by policy; closing both connections"
                );
                self.metrics.connection(DIRECTION, name, "denied");
                let mut tls = tls;
                let _ = tls.shutdown().await;
                let why = format!("{} may not call {callee}", me.spiffe_id);
                self.refuse(&mut app, StatusCode::FORBIDDEN, &why).await;
                return;
            }
            tracing::info!(
                direction = DIRECTION,
                listener = name,
                %peer,
                upstream,
                caller = %me.spiffe_id,
                callee = %callee,
                rule = decision.rule_name(),
                decision = "allowed",
                "call authorized"
            );
        } else {
            tracing::debug!(direction = DIRECTION, listener = name, %peer, upstream, callee = %callee,
                "upstream authenticated");
        }
        self.metrics.connection(DIRECTION, name, "forwarded");
        let mut tls = tls;
        match tokio::io::copy_bidirectional_with_sizes(
            &mut app,
            &mut tls,
            crate::COPY_BUF,
            crate::COPY_BUF,
        )
        .await
        {
            Ok((up, down)) => {
                tracing::debug!(listener = name, %peer, bytes_out = up, bytes_in = down, "outbound connection closed");
            }
            Err(e) => {
                tracing::debug!(listener = name, %peer, error = %e, "outbound connection ended with an error");
            }
        }
    }
}
