//! rustls configurations of the tunnel: both ends present the proxy's
//! rotating X509-SVID and authenticate the peer's X509-SVID against the
//! bundle of the peer's own trust domain (own or federated).
//!
//! Session resumption is off on both sides, so every connection runs the
//! full certificate checks against the bundles in force at that moment.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::NoServerSessionStorage;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError,
    OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sigil_svid::tls::{
    Authorize, SpiffeClientVerifier, SpiffeServerVerifier, TrustRoots, peer_spiffe_id,
};
use sigil_types::SpiffeId;

use crate::source::X509Source;

/// The upstream presented an X509-SVID that verifies, but for another SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the upstream presented {presented}, not the expected {expected}")]
pub struct WrongPeer {
    /// The ID the upstream's SVID carries.
    pub presented: SpiffeId,
    /// The ID the configuration expects.
    pub expected: SpiffeId,
}

/// Verifies a peer's X509-SVID whatever its SPIFFE ID, as long as its chain
/// leads to the bundle of its own trust domain; optionally requires one
/// exact ID (server authentication on the outbound side). Authorization
/// beyond that is the policy's job, after the handshake.
pub struct PeerVerifier {
    trust: Arc<dyn TrustRoots>,
    expect: Option<SpiffeId>,
    /// Used for the handshake signature checks only (they do not depend on the ID).
    signatures: SpiffeServerVerifier,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("expect", &self.expect)
            .finish_non_exhaustive()
    }
}

impl PeerVerifier {
    /// A verifier over `trust`; with `expect`, only that SPIFFE ID passes.
    pub fn new(trust: Arc<dyn TrustRoots>, expect: Option<SpiffeId>) -> Self {
        Self {
            signatures: SpiffeServerVerifier::new(trust.clone(), Authorize::OneOf(Vec::new())),
            trust,
            expect,
        }
    }

    /// What the SPIFFE verifiers must authorize: exactly the presented ID
    /// (the chain check is what matters here), or nothing when the leaf has
    /// no single SPIFFE ID, so that the verifier reports why.
    fn authorize_presented(end_entity: &CertificateDer<'_>) -> (Option<SpiffeId>, Authorize) {
        match peer_spiffe_id(std::slice::from_ref(end_entity)) {
            Some(id) => (Some(id.clone()), Authorize::Exact(id)),
            None => (None, Authorize::OneOf(Vec::new())),
        }
    }

    fn check_expected(&self, presented: Option<SpiffeId>) -> Result<(), TlsError> {
        match (&self.expect, presented) {
            (Some(expected), Some(presented)) if presented != *expected => {
                Err(CertificateError::Other(OtherError(Arc::new(WrongPeer {
                    presented,
                    expected: expected.clone(),
                })))
                .into())
            }
            _ => Ok(()),
        }
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let (presented, authorize) = Self::authorize_presented(end_entity);
        SpiffeServerVerifier::new(self.trust.clone(), authorize).verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.check_expected(presented)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let (presented, authorize) = Self::authorize_presented(end_entity);
        SpiffeClientVerifier::new(self.trust.clone(), authorize, false).verify_client_cert(
            end_entity,
            intermediates,
            now,
        )?;
        self.check_expected(presented)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The inbound listener's server configuration: client certificates
/// required and verified, the proxy's SVID presented, `alpn` offered.
pub fn server_config(source: &X509Source, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let trust: Arc<dyn TrustRoots> = source.trust();
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(PeerVerifier::new(trust, None)))
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
        .with_custom_certificate_verifier(Arc::new(PeerVerifier::new(trust, expect)))
        .with_client_cert_resolver(source.cert());
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// A readable account of a failed TLS connection: the wrong upstream ID
/// spelled out, other errors with their causes.
pub fn describe_tls_error(e: &std::io::Error) -> String {
    if let Some(TlsError::InvalidCertificate(CertificateError::Other(OtherError(inner)))) =
        e.get_ref().and_then(|i| i.downcast_ref::<TlsError>())
    {
        if let Some(w) = inner.downcast_ref::<WrongPeer>() {
            return w.to_string();
        }
        return format!("invalid peer certificate: {inner}");
    }
    e.to_string()
}
