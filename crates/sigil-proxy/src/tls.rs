//! rustls configurations of the tunnel: both ends present the proxy's
//! rotating X509-SVID and authenticate the peer's X509-SVID against the
//! bundle of the peer's own trust domain (own or federated).
//!
//! Session resumption is off on both sides, so every connection runs the
//! full certificate checks against the bundles in force at that moment.

use std::sync::Arc;

use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, Error as TlsError, ServerConfig};
use sigil_svid::SvidError;
use sigil_svid::tls::{Authorize, SpiffeClientVerifier, SpiffeServerVerifier, TrustRoots};
use sigil_types::SpiffeId;

use crate::source::X509Source;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The inbound listener's server configuration: client certificates
/// required and verified, the proxy's SVID presented, `alpn` offered.
pub fn server_config(source: &X509Source, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let trust: Arc<dyn TrustRoots> = source.trust();
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        // Any peer whose SVID chains to its own trust domain's bundle:
        // authorization is the policy's job, after the handshake.
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            trust,
            Authorize::Any,
            false,
        )))
        .with_cert_resolver(source.cert());
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// An outbound client configuration: the proxy's SVID presented, the
/// server's SVID verified and, with `expect`, required to carry that ID.
pub fn client_config(
    source: &X509Source,
    expect: Option<SpiffeId>,
) -> Result<ClientConfig, TlsError> {
    let trust: Arc<dyn TrustRoots> = source.trust();
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            trust,
            expect.map_or(Authorize::Any, Authorize::Exact),
        )))
        .with_client_cert_resolver(source.cert());
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// A readable account of a failed TLS connection: the wrong upstream ID
/// spelled out, other errors with their causes.
pub fn describe_tls_error(e: &std::io::Error) -> String {
    match sigil_svid::tls::refusal(e) {
        Some(SvidError::Unauthorized {
            presented,
            expected,
        }) => format!("the upstream presented {presented}, not the expected {expected}"),
        Some(other) => format!("invalid peer certificate: {other}"),
        None => e.to_string(),
    }
}
