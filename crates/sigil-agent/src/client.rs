//! Connections to the server's agent API: gRPC over rustls, the server
//! authenticated as `spiffe://<td>/sigil/server` against the current bundle,
//! the agent presenting its SVID once it has one.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use sigil_proto::server::v1::agent_api_client::AgentApiClient;
use sigil_svid::bundle::Bundle;
use sigil_svid::tls::{Authorize, RotatingCert, SpiffeServerVerifier, TrustRoots};
use sigil_types::{SpiffeId, TrustDomain};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::AgentError;

/// The bundle the agent trusts now, read at every handshake.
#[derive(Debug)]
pub struct BundleTrust(pub Arc<ArcSwap<Bundle>>);

impl TrustRoots for BundleTrust {
    fn roots_for(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
        let b = self.0.load();
        if &b.trust_domain != td {
            return Vec::new();
        }
        b.x509_authorities
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect()
    }
}

/// Largest message accepted from the server (a sync snapshot of many entries).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Opens a channel to the server. `cert` is the agent SVID, absent before
/// attestation.
pub async fn connect(
    address: &str,
    trust: Arc<ArcSwap<Bundle>>,
    server_id: SpiffeId,
    cert: Option<Arc<RotatingCert>>,
) -> Result<AgentApiClient<Channel>, AgentError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        Arc::new(BundleTrust(trust)),
        Authorize::Exact(server_id),
    ));
    let builder = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    connect_with(address, config).await
}

/// Opens a channel with a given TLS config.
pub(crate) async fn connect_with(
    address: &str,
    config: ClientConfig,
) -> Result<AgentApiClient<Channel>, AgentError> {
    let connector = TlsConnector::from(Arc::new(config));
    let addr = address.to_owned();
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| AgentError::Config(format!("server address {address:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let addr = addr.clone();
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                let _ = tcp.set_nodelay(true);
                // The verifier checks the SPIFFE ID, not this name.
                let name = ServerName::try_from("sigil-server")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| AgentError::Unavailable(format!("cannot reach server at {address}: {e}")))?;
    Ok(AgentApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Fetches the bundle without authenticating the server, then accepts it
/// only if one of its X.509 authorities has the SHA-256 `fingerprint`:
/// nothing read over that connection is trusted before the fingerprint
/// matched, and the bundle is its only use.
pub async fn bootstrap_bundle_by_fingerprint(
    address: &str,
    trust_domain: &TrustDomain,
    fingerprint: &str,
) -> Result<Bundle, AgentError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sigil_svid::tls::danger::NoServerVerification(
            provider,
        )))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = connect_with(address, config).await?;
    let resp = client
        .get_bundle(sigil_proto::server::v1::GetBundleRequest {})
        .await
        .map_err(|s| {
            AgentError::Unavailable(format!("fetching the bootstrap bundle: {}", s.message()))
        })?
        .into_inner();
    let bundle = Bundle::from_json(trust_domain.clone(), &resp.bundle_json)?;
    let want = fingerprint.to_ascii_lowercase();
    if bundle
        .x509_authorities
        .iter()
        .any(|c| sigil_svid::x509::sha256_hex(c) == want)
    {
        Ok(bundle)
    } else {
        Err(AgentError::Bootstrap(format!(
            "the server at {address} offered a bundle without the CA fingerprint {want} from the join token; refusing to trust it"
        )))
    }
}
