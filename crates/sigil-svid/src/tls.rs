//! rustls glue: peers are authenticated by X509-SVID and authorized by
//! SPIFFE ID, never by DNS name (spiffe.md §2.3, rust-anchors.md B2).
//!
//! Both verifiers do the same four things, in order: find the leaf's single
//! SPIFFE ID, check the chain against the roots of *that* trust domain only,
//! apply the X509-SVID leaf rules, then authorize the ID. Handshake
//! signatures are checked with the aws-lc-rs provider's algorithms.
//!
//! All rustls-version-specific code lives in this module, so the move to
//! rustls 0.24 touches one file.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, OtherError,
    RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sigil_types::{SpiffeId, TrustDomain};

use crate::SvidError;
use crate::bundle::BundleSet;
use crate::keys::PrivateKey;
use crate::x509::{
    MAX_CHAIN_LEN, SUPPORTED_ALGS, check_intermediate, check_leaf_rules, leaf_spiffe_id,
    parse_cert, trust_anchors,
};

/// Where verifiers find the trusted roots of a trust domain, at handshake time
/// (roots rotate while configurations stay in use).
pub trait TrustRoots: Send + Sync + fmt::Debug + 'static {
    /// The CA certificates of `td`; empty if the trust domain is not trusted.
    fn roots_for(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>>;
}

/// A fixed set of roots per trust domain, for tests and simple callers.
#[derive(Debug, Default, Clone)]
pub struct StaticTrust(pub BTreeMap<TrustDomain, Vec<Vec<u8>>>);

impl TrustRoots for StaticTrust {
    fn roots_for(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
        self.0
            .get(td)
            .map(|roots| {
                roots
                    .iter()
                    .map(|r| CertificateDer::from(r.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl TrustRoots for BundleSet {
    fn roots_for(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
        self.get(td)
            .map(|b| {
                b.x509_authorities
                    .iter()
                    .map(|r| CertificateDer::from(r.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Which authenticated peers are allowed.
#[derive(Clone)]
pub enum Authorize {
    /// Any ID whose chain leads to the bundle of its own trust domain (the
    /// caller authorizes later, e.g. by policy on the presented ID).
    Any,
    /// Any ID in the trust domain.
    AnyInTrustDomain(TrustDomain),
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any of these IDs.
    OneOf(Vec<SpiffeId>),
    /// This ID or any ID below it (path prefix at a segment boundary), in the
    /// same trust domain: `spiffe://td/a` allows `spiffe://td/a` and
    /// `spiffe://td/a/b`, but not `spiffe://td/ab`.
    AnyPathPrefix(SpiffeId),
    /// IDs for which the function answers `true`; `describe` says which in
    /// errors ("an ID of a registered workload").
    Matching {
        /// What the function allows, for error messages.
        describe: String,
        /// The test.
        allows: Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>,
    },
}

impl Authorize {
    /// Whether `id` is allowed.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::AnyInTrustDomain(td) => id.is_member_of(td),
            Self::Exact(want) => id == want,
            Self::OneOf(ids) => ids.contains(id),
            Self::AnyPathPrefix(prefix) => {
                id.trust_domain_name() == prefix.trust_domain_name()
                    && id
                        .path()
                        .strip_prefix(prefix.path())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Self::Matching { allows, .. } => allows(id),
        }
    }

    /// `Ok` if `id` is allowed, else [`SvidError::Unauthorized`] naming
    /// both `id` and what was required.
    pub fn check(&self, id: &SpiffeId) -> Result<(), SvidError> {
        if self.allows(id) {
            Ok(())
        } else {
            Err(SvidError::Unauthorized {
                presented: id.clone(),
                expected: self.to_string(),
            })
        }
    }
}

impl fmt::Display for Authorize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any SPIFFE ID"),
            Self::AnyInTrustDomain(td) => write!(f, "an ID of trust domain {td}"),
            Self::Exact(id) => write!(f, "{id}"),
            Self::OneOf(ids) if ids.is_empty() => f.write_str("no ID at all"),
            Self::OneOf(ids) => {
                f.write_str("one of ")?;
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{id}")?;
                }
                Ok(())
            }
            Self::AnyPathPrefix(prefix) => write!(f, "{prefix} or an ID below it"),
            Self::Matching { describe, .. } => f.write_str(describe),
        }
    }
}

impl fmt::Debug for Authorize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Authorize({self})")
    }
}

/// The leaf's single SPIFFE URI SAN, or `None` if there is not exactly one.
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    let leaf = certs.first()?;
    let cert = parse_cert(leaf).ok()?;
    leaf_spiffe_id(&cert).ok()
}

/// Client-side verifier of a server's X509-SVID (spiffe.md §2.3): the server
/// is authenticated by its SPIFFE ID; the TLS server name is not checked.
pub struct SpiffeServerVerifier {
    trust: Arc<dyn TrustRoots>,
    authorize: Authorize,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("trust", &self.trust)
            .field("authorize", &self.authorize)
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    /// A verifier taking roots from `trust` and allowing servers per `authorize`.
    pub fn new(trust: Arc<dyn TrustRoots>, authorize: Authorize) -> Self {
        Self {
            trust,
            authorize,
            algs: *SUPPORTED_ALGS,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let (id, roots) = start_verification(self.trust.as_ref(), end_entity, intermediates)?;
        let mut store = RootCertStore::empty();
        for root in roots {
            // A malformed root cannot anchor anything; the others still can.
            let _ = store.add(root);
        }
        if store.is_empty() {
            return Err(CertificateError::UnknownIssuer.into());
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &store,
            intermediates,
            now,
            self.algs.all,
        )?;
        finish_verification(end_entity, &id, &self.authorize)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server-side verifier of client X509-SVIDs. With `optional`, clients
/// without a certificate are let through (node attestation happens before an
/// agent has an SVID); a certificate that is presented must still verify.
/// No root hints are sent: roots come from `trust` at handshake time.
pub struct SpiffeClientVerifier {
    trust: Arc<dyn TrustRoots>,
    authorize: Authorize,
    optional: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust", &self.trust)
            .field("authorize", &self.authorize)
            .field("optional", &self.optional)
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    /// A verifier taking roots from `trust` and allowing clients per `authorize`.
    pub fn new(trust: Arc<dyn TrustRoots>, authorize: Authorize, optional: bool) -> Self {
        Self {
            trust,
            authorize,
            optional,
            algs: *SUPPORTED_ALGS,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
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
        let (id, roots) = start_verification(self.trust.as_ref(), end_entity, intermediates)?;
        // rustls offers no chain-only client check, so use webpki directly
        // with the clientAuth purpose.
        let anchors = trust_anchors(&roots).map_err(svid_to_tls)?;
        if anchors.is_empty() {
            return Err(CertificateError::UnknownIssuer.into());
        }
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_to_tls)?;
        ee.verify_for_usage(
            self.algs.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(webpki_to_tls)?;
        finish_verification(end_entity, &id, &self.authorize)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The [`SvidError`] with which a verifier of this module refused the peer
/// of a failed TLS connection (`e` as tokio-rustls returns it), e.g.
/// [`SvidError::Unauthorized`] with the ID the peer presented.
pub fn refusal(e: &std::io::Error) -> Option<&SvidError> {
    match e.get_ref()?.downcast_ref::<TlsError>()? {
        TlsError::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// Client-side verifier of a Web PKI server certificate (not an X509-SVID),
/// such as a kubelet's serving certificate: the chain to `roots` with the
/// serverAuth purpose, then the server name unless built with
/// [`WebPkiVerifier::chain_only`].
#[derive(Debug)]
pub struct WebPkiVerifier {
    roots: Arc<RootCertStore>,
    check_name: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl WebPkiVerifier {
    /// Chain and server name, as a browser checks them.
    pub fn new(roots: Arc<RootCertStore>) -> Self {
        Self {
            roots,
            check_name: true,
            algs: *SUPPORTED_ALGS,
        }
    }

    /// The chain alone, for a peer whose address already pins it (a kubelet
    /// reached over loopback, whose certificate names the node, never
    /// 127.0.0.1).
    pub fn chain_only(roots: Arc<RootCertStore>) -> Self {
        Self {
            check_name: false,
            ..Self::new(roots)
        }
    }
}

impl ServerCertVerifier for WebPkiVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&parsed, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Steps shared by both verifiers before the chain check: the leaf's SPIFFE
/// ID, the §2.2 shape of the intermediates, and the roots of the ID's own
/// trust domain (never a pool across trust domains, §2.3 rule 1).
fn start_verification(
    trust: &dyn TrustRoots,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(SpiffeId, Vec<CertificateDer<'static>>), TlsError> {
    let cert = parse_cert(end_entity).map_err(svid_to_tls)?;
    let id = leaf_spiffe_id(&cert).map_err(svid_to_tls)?;
    let chain_len = intermediates.len() + 1;
    if chain_len > MAX_CHAIN_LEN {
        return Err(svid_to_tls(SvidError::ChainTooLong(chain_len)));
    }
    for (i, der) in intermediates.iter().enumerate() {
        check_intermediate(der, i + 1).map_err(svid_to_tls)?;
    }
    let roots = trust.roots_for(&id.trust_domain());
    if roots.is_empty() {
        return Err(CertificateError::UnknownIssuer.into());
    }
    Ok((id, roots))
}

/// Steps shared by both verifiers after the chain check: leaf rules, then authorization.
fn finish_verification(
    end_entity: &CertificateDer<'_>,
    id: &SpiffeId,
    authorize: &Authorize,
) -> Result<(), TlsError> {
    check_leaf_rules(end_entity).map_err(svid_to_tls)?;
    authorize.check(id).map_err(svid_to_tls)
}

fn svid_to_tls(e: SvidError) -> TlsError {
    CertificateError::Other(OtherError(Arc::new(e))).into()
}

fn webpki_to_tls(e: webpki::Error) -> TlsError {
    match e {
        webpki::Error::CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }.into()
        }
        webpki::Error::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }.into()
        }
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose.into(),
        webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding.into(),
        other => CertificateError::Other(OtherError(Arc::new(other))).into(),
    }
}

/// A certificate chain and key that can be swapped at run time (rotation)
/// while the rustls configurations holding it stay in use. Serves as both
/// server and client certificate resolver.
pub struct RotatingCert {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        f.debug_struct("RotatingCert")
            .field("spiffe_id", &peer_spiffe_id(&current.cert))
            .field("chain_len", &current.cert.len())
            .finish_non_exhaustive()
    }
}

impl RotatingCert {
    /// Starts with `chain` (leaf first, DER) and its `key`.
    pub fn new(chain: Vec<Vec<u8>>, key: &PrivateKey) -> Result<Self, SvidError> {
        Ok(Self {
            current: ArcSwap::new(certified_key(chain, key)?),
        })
    }

    /// Replaces the chain and key; handshakes already under way keep the old pair.
    pub fn update(&self, chain: Vec<Vec<u8>>, key: &PrivateKey) -> Result<(), SvidError> {
        self.current.store(certified_key(chain, key)?);
        Ok(())
    }

    /// The certificate presented now (DER).
    pub fn leaf(&self) -> Vec<u8> {
        self.current
            .load()
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
}

/// Checks that `key` is the private key of the leaf of `chain` (leaf first,
/// DER), as [`RotatingCert`] does before presenting them: a chain paired with
/// another key (a torn write, a mix-up of files) is refused with
/// [`SvidError::KeyMismatch`] instead of failing every handshake later.
pub fn check_chain_key(chain: &[Vec<u8>], key: &PrivateKey) -> Result<(), SvidError> {
    certified_key(chain.to_vec(), key).map(|_| ())
}

fn certified_key(chain: Vec<Vec<u8>>, key: &PrivateKey) -> Result<Arc<CertifiedKey>, SvidError> {
    if chain.is_empty() {
        return Err(SvidError::EmptyChain);
    }
    let certs = chain.into_iter().map(CertificateDer::from).collect();
    let certified = CertifiedKey::new(certs, key.rustls_signing_key()?);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(TlsError::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(SvidError::KeyMismatch)
        }
        Err(e) => Err(SvidError::Tls(e.to_string())),
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ResolvesClientCert for RotatingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifiers that deliberately check less than a SPIFFE verifier. Each use
/// must say why it is safe where it is used.
pub mod danger {
    use std::sync::Arc;

    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    /// Accepts any server certificate; only the handshake signature is
    /// checked, which proves nothing about who the server is. Used to fetch
    /// a bundle that is then checked against a fingerprint, and for kubelets
    /// whose operators chose to skip verification.
    #[derive(Debug)]
    pub struct NoServerVerification(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoServerVerification {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::{Duration, SystemTime};

    use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

    use super::*;
    use crate::x509::{SvidRequest, X509Authority};

    const HOUR: Duration = Duration::from_secs(3600);

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn server_id() -> SpiffeId {
        id("spiffe://example.org/sigil/server")
    }

    fn client_id() -> SpiffeId {
        id("spiffe://example.org/sigil/agent/x")
    }

    /// A fresh SVID (chain, key) for `spiffe_id`, minted by `ca` at the real current time.
    fn svid(ca: &X509Authority, spiffe_id: &SpiffeId) -> (Vec<Vec<u8>>, PrivateKey) {
        let key = PrivateKey::generate_p256().unwrap();
        let req = SvidRequest {
            spiffe_id,
            dns_names: &[],
            ttl: HOUR,
            attributes: &[],
        };
        let leaf = ca
            .sign_svid(&req, &key.public_key_spki_der(), SystemTime::now())
            .unwrap();
        (vec![leaf], key)
    }

    fn trust(ca: &X509Authority) -> Arc<dyn TrustRoots> {
        let mut map = BTreeMap::new();
        map.insert(td("example.org"), vec![ca.cert_der().to_vec()]);
        Arc::new(StaticTrust(map))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn client_config(
        trust: Arc<dyn TrustRoots>,
        expect: Authorize,
        cert: Option<Arc<RotatingCert>>,
    ) -> ClientConfig {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(trust, expect)));
        match cert {
            Some(c) => builder.with_client_cert_resolver(c),
            None => builder.with_no_client_auth(),
        }
    }

    fn server_config(
        trust: Arc<dyn TrustRoots>,
        allow: Authorize,
        optional: bool,
        cert: Arc<RotatingCert>,
    ) -> ServerConfig {
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(trust, allow, optional)))
            .with_cert_resolver(cert)
    }

    /// Runs a handshake in memory and exchanges one message each way.
    /// Returns the server's view of the client's SPIFFE ID.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<Option<SpiffeId>, TlsError> {
        let name = ServerName::try_from("sigil-server.invalid").unwrap();
        let mut c = Connection::Client(ClientConnection::new(Arc::new(client), name)?);
        let mut s = Connection::Server(ServerConnection::new(Arc::new(server))?);
        c.writer().write_all(b"ping").unwrap();
        s.writer().write_all(b"pong").unwrap();
        for _ in 0..20 {
            pump(&mut c, &mut s)?;
            pump(&mut s, &mut c)?;
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
                break;
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        let mut got = Vec::new();
        let _ = s.reader().read_to_end(&mut got);
        assert_eq!(got, b"ping");
        let mut got = Vec::new();
        let _ = c.reader().read_to_end(&mut got);
        assert_eq!(got, b"pong");
        Ok(s.peer_certificates().and_then(peer_spiffe_id))
    }

    /// Moves every pending TLS record from one side to the other.
    fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), TlsError> {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut slice = buf.as_slice();
        while !slice.is_empty() {
            to.read_tls(&mut slice).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    struct Setup {
        ca: X509Authority,
        server_cert: Arc<RotatingCert>,
        client_cert: Arc<RotatingCert>,
    }

    fn setup() -> Setup {
        let ca = X509Authority::generate(&td("example.org"), 24 * HOUR, SystemTime::now()).unwrap();
        let (chain, key) = svid(&ca, &server_id());
        let server_cert = Arc::new(RotatingCert::new(chain, &key).unwrap());
        let (chain, key) = svid(&ca, &client_id());
        let client_cert = Arc::new(RotatingCert::new(chain, &key).unwrap());
        Setup {
            ca,
            server_cert,
            client_cert,
        }
    }

    #[test]
    fn mutual_tls_succeeds() {
        let s = setup();
        let client = client_config(
            trust(&s.ca),
            Authorize::Exact(server_id()),
            Some(s.client_cert.clone()),
        );
        let server = server_config(
            trust(&s.ca),
            Authorize::AnyInTrustDomain(td("example.org")),
            false,
            s.server_cert.clone(),
        );
        assert_eq!(handshake(client, server).unwrap(), Some(client_id()));
    }

    #[test]
    fn wrong_expected_server_id_fails() {
        let s = setup();
        let client = client_config(
            trust(&s.ca),
            Authorize::Exact(id("spiffe://example.org/someone/else")),
            Some(s.client_cert.clone()),
        );
        let server = server_config(
            trust(&s.ca),
            Authorize::AnyInTrustDomain(td("example.org")),
            false,
            s.server_cert.clone(),
        );
        let err = handshake(client, server).unwrap_err();
        let TlsError::InvalidCertificate(CertificateError::Other(OtherError(inner))) = &err else {
            panic!("unexpected {err:?}");
        };
        assert_eq!(
            inner.downcast_ref::<SvidError>(),
            Some(&SvidError::Unauthorized {
                presented: server_id(),
                expected: "spiffe://example.org/someone/else".to_owned(),
            })
        );
    }

    #[test]
    fn server_refuses_unauthorized_client() {
        let s = setup();
        let client = client_config(
            trust(&s.ca),
            Authorize::Exact(server_id()),
            Some(s.client_cert.clone()),
        );
        let server = server_config(
            trust(&s.ca),
            Authorize::Exact(id("spiffe://example.org/only/this")),
            false,
            s.server_cert.clone(),
        );
        assert!(handshake(client, server).is_err());
    }

    #[test]
    fn untrusted_root_fails_both_ways() {
        let s = setup();
        let stranger =
            X509Authority::generate(&td("example.org"), 24 * HOUR, SystemTime::now()).unwrap();
        let client = client_config(
            trust(&stranger),
            Authorize::Exact(server_id()),
            Some(s.client_cert.clone()),
        );
        let server = server_config(
            trust(&s.ca),
            Authorize::AnyInTrustDomain(td("example.org")),
            false,
            s.server_cert.clone(),
        );
        let err = handshake(client, server).unwrap_err();
        assert_eq!(
            err,
            TlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        );

        let client = client_config(
            trust(&s.ca),
            Authorize::Exact(server_id()),
            Some(s.client_cert.clone()),
        );
        let server = server_config(
            trust(&stranger),
            Authorize::AnyInTrustDomain(td("example.org")),
            false,
            s.server_cert.clone(),
        );
        assert!(handshake(client, server).is_err());
    }

    #[test]
    fn roots_of_another_trust_domain_are_not_used() {
        let s = setup();
        // The right CA, but filed under a different trust domain.
        let mut map = BTreeMap::new();
        map.insert(td("other.org"), vec![s.ca.cert_der().to_vec()]);
        let wrong: Arc<dyn TrustRoots> = Arc::new(StaticTrust(map));
        let client = client_config(
            wrong,
            Authorize::Exact(server_id()),
            Some(s.client_cert.clone()),
        );
        let server = server_config(
            trust(&s.ca),
            Authorize::AnyInTrustDomain(td("example.org")),
            false,
            s.server_cert.clone(),
        );
        assert_eq!(
            handshake(client, server).unwrap_err(),
            TlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[test]
    fn mandatory_client_auth_refuses_anonymous_client() {
        let s = setup();
        let client = client_config(trust(&s.ca), Authorize::Exact(server_id()), None);
        let server = server_config(
            trust(&s.ca),
            Authorize::AnyInTrustDomain(td("example.org")),
            false,
            s.server_cert.clone(),
        );
        assert!(handshake(client, server).is_err());
    }

    #[test]
    fn optional_client_auth_accepts_anonymous_client() {
        let s = setup();
        let client = client_config(trust(&s.ca), Authorize::Exact(server_id()), None);
        let server = server_config(
            trust(&s.ca),
            Authorize::AnyInTrustDomain(td("example.org")),
            true,
            s.server_cert.clone(),
        );
        assert_eq!(handshake(client, server).unwrap(), None);
    }

    #[test]
    fn rotation_takes_effect_for_new_handshakes() {
        let s = setup();
        let new_server = id("spiffe://example.org/sigil/server2");
        let make = |expect: SpiffeId| {
            (
                client_config(
                    trust(&s.ca),
                    Authorize::Exact(expect),
                    Some(s.client_cert.clone()),
                ),
                server_config(
                    trust(&s.ca),
                    Authorize::AnyInTrustDomain(td("example.org")),
                    false,
                    s.server_cert.clone(),
                ),
            )
        };
        let (c, srv) = make(new_server.clone());
        assert!(handshake(c, srv).is_err());
        let (chain, key) = svid(&s.ca, &new_server);
        s.server_cert.update(chain, &key).unwrap();
        let (c, srv) = make(new_server);
        assert!(handshake(c, srv).is_ok());
    }

    #[test]
    fn rotating_cert_checks_key_and_chain() {
        let s = setup();
        let (chain, _) = svid(&s.ca, &server_id());
        let other = PrivateKey::generate_p256().unwrap();
        assert_eq!(
            RotatingCert::new(chain.clone(), &other).unwrap_err(),
            SvidError::KeyMismatch
        );
        assert_eq!(
            s.server_cert.update(chain, &other).unwrap_err(),
            SvidError::KeyMismatch
        );
        assert_eq!(
            RotatingCert::new(vec![], &other).unwrap_err(),
            SvidError::EmptyChain
        );
        assert!(format!("{:?}", s.server_cert).contains("spiffe://example.org/sigil/server"));
    }

    #[test]
    fn authorize_rules() {
        let a = id("spiffe://example.org/ns/a");
        let ab = id("spiffe://example.org/ns/a/b");
        let abc = id("spiffe://example.org/ns/abc");
        let other = id("spiffe://other.org/ns/a/b");
        let prefix = Authorize::AnyPathPrefix(a.clone());
        assert!(prefix.allows(&a) && prefix.allows(&ab));
        assert!(!prefix.allows(&abc) && !prefix.allows(&other));
        let td_any = Authorize::AnyInTrustDomain(td("example.org"));
        assert!(td_any.allows(&abc) && !td_any.allows(&other));
        let one_of = Authorize::OneOf(vec![a.clone(), other.clone()]);
        assert!(one_of.allows(&other) && !one_of.allows(&ab));
        assert!(Authorize::Exact(a.clone()).allows(&a) && !Authorize::Exact(a).allows(&ab));
    }

    #[test]
    fn refusals_name_the_presented_id_and_what_was_required() {
        let a = id("spiffe://example.org/ns/a");
        let b = id("spiffe://example.org/ns/b");
        let check = |auth: Authorize| auth.check(&a).unwrap_err().to_string();
        assert_eq!(
            check(Authorize::Exact(b.clone())),
            "the peer presented spiffe://example.org/ns/a, but spiffe://example.org/ns/b is required"
        );
        assert!(
            check(Authorize::OneOf(vec![b.clone()]))
                .ends_with("one of spiffe://example.org/ns/b is required")
        );
        assert!(
            check(Authorize::AnyInTrustDomain(td("other.org")))
                .contains("an ID of trust domain other.org")
        );
        let only_b = Authorize::Matching {
            describe: "a registered workload".to_owned(),
            allows: Arc::new(move |x: &SpiffeId| *x == b),
        };
        assert!(check(only_b.clone()).ends_with("but a registered workload is required"));
        assert!(Authorize::Any.check(&a).is_ok());
        assert_eq!(format!("{only_b:?}"), "Authorize(a registered workload)");
    }

    #[test]
    fn a_refusal_is_found_behind_the_io_error() {
        let s = setup();
        let client = client_config(
            trust(&s.ca),
            Authorize::Exact(id("spiffe://example.org/other")),
            None,
        );
        let server = server_config(trust(&s.ca), Authorize::Any, true, s.server_cert.clone());
        let err = handshake(client, server).unwrap_err();
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, err);
        assert!(matches!(
            refusal(&io),
            Some(SvidError::Unauthorized { presented, .. }) if *presented == server_id()
        ));
        assert!(refusal(&std::io::Error::other("plain")).is_none());
    }

    #[test]
    fn bundle_set_supplies_roots_per_trust_domain() {
        let s = setup();
        let mut b = crate::bundle::Bundle::new(td("example.org"));
        b.x509_authorities.push(s.ca.cert_der().to_vec());
        let mut set = BundleSet::default();
        set.insert(b);
        assert_eq!(set.roots_for(&td("example.org")).len(), 1);
        assert!(set.roots_for(&td("other.org")).is_empty());
    }

    #[test]
    fn install_is_idempotent() {
        crate::install_crypto_provider();
        crate::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
