//! Inbound listeners: terminate mutual TLS, authorize the caller by policy,
//! forward plaintext to the local application.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::HeaderName;
use sigil_svid::tls::peer_spiffe_id;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{InboundConfig, Protocol};
use crate::metrics::Metrics;
use crate::policy::Request;
use crate::reload::PolicyStore;
use crate::source::X509Source;

const DIRECTION: &str = "inbound";

/// One inbound listener's shared state.
pub(crate) struct Inbound {
    pub(crate) cfg: InboundConfig,
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) source: Arc<X509Source>,
    pub(crate) policy: Arc<PolicyStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) handshake_timeout: std::time::Duration,
}

impl Inbound {
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

    async fn handle(&self, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let _active = self.metrics.open(DIRECTION);
        let name = self.cfg.name.as_str();
        let tls = match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(listener = name, %peer, error = %e, "inbound TLS handshake failed");
                self.metrics.connection(DIRECTION, name, "tls_error");
                return;
            }
            Err(_) => {
                tracing::info!(listener = name, %peer, "inbound TLS handshake timed out");
                self.metrics.connection(DIRECTION, name, "tls_error");
                return;
            }
        };
        let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
        let (Some(caller), Some(leaf)) = (peer_spiffe_id(certs), certs.first()) else {
            // The verifier requires a certificate with one SPIFFE ID, so this
            // does not happen; refuse rather than guess.
            self.metrics.connection(DIRECTION, name, "tls_error");
            return;
        };
        let attributes = match sigil_svid::x509::svid_attributes(leaf) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = name, %peer, caller = %caller, error = %e,
                    "the caller's identity attributes are malformed; connection refused");
                self.metrics.connection(DIRECTION, name, "denied");
                return;
            }
        };
        let me = self.source.identity();
        let policy = self.policy.current();
        let decision = policy.decide(&Request {
            caller: &caller,
            callee: &me.spiffe_id,
            attributes: &attributes,
        });
        self.metrics
            .decision(decision.allowed, decision.rule_name());
        if decision.allowed {
            tracing::info!(
                direction = DIRECTION,
                listener = name,
                %peer,
                caller = %caller,
                callee = %me.spiffe_id,
                rule = decision.rule_name(),
                decision = "allowed",
                "connection authorized"
            );
        } else {
            tracing::warn!(
                direction = DIRECTION,
                listener = name,
                %peer,
                caller = %caller,
                callee = %me.spiffe_id,
                rule = decision.rule_name(),
                decision = "denied",
                "connection denied"
            );
            self.metrics.connection(DIRECTION, name, "denied");
            let mut tls = tls;
            match self.cfg.protocol {
                Protocol::Tcp => {
                    let _ = tls.shutdown().await;
                }
                Protocol::Http => {
                    let body = format!(
                        "403 Forbidden: {caller} is not allowed to call {}\n",
                        me.spiffe_id
                    );
                    crate::http::serve_denied(tls, body).await;
                }
            }
            return;
        }
        drop(policy);

        if let (Protocol::Http, Some(header)) = (self.cfg.protocol, &self.cfg.caller_header) {
            let Ok(header) = HeaderName::from_bytes(header.as_bytes()) else {
                return;
            };
            self.metrics.connection(DIRECTION, name, "forwarded");
            crate::http::serve_injecting(tls, self.cfg.forward_to.clone(), header, caller.as_str())
                .await;
            return;
        }

        let mut app = match TcpStream::connect(&self.cfg.forward_to).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = name, app = %self.cfg.forward_to, error = %e,
                    "cannot connect to the application; closing the caller's connection");
                self.metrics.connection(DIRECTION, name, "app_unreachable");
                let mut tls = tls;
                if self.cfg.protocol == Protocol::Http {
                    crate::http::answer_raw(
                        &mut tls,
                        hyper::StatusCode::BAD_GATEWAY,
                        "502 Bad Gateway: the application behind the proxy is unreachable\n",
                    )
                    .await;
                } else {
                    let _ = tls.shutdown().await;
                }
                return;
            }
        };
        let _ = app.set_nodelay(true);
        self.metrics.connection(DIRECTION, name, "forwarded");
        let mut tls = tls;
        match tokio::io::copy_bidirectional_with_sizes(
            &mut tls,
            &mut app,
            crate::COPY_BUF,
            crate::COPY_BUF,
        )
        .await
        {
            Ok((up, down)) => {
                tracing::debug!(listener = name, %peer, bytes_in = up, bytes_out = down, "inbound connection closed");
            }
            Err(e) => {
                tracing::debug!(listener = name, %peer, error = %e, "inbound connection ended with an error");
            }
        }
    }
}
