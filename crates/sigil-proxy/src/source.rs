//! The proxy's X509-SVID and trust bundles, followed from the SPIFFE
//! Workload API's FetchX509SVID stream.
//!
//! One task owns the stream: it applies every response it receives (the
//! certificate for new handshakes, the bundles of the SVID's own trust
//! domain and of federated ones), reconnects with backoff when the stream
//! breaks, and keeps the last good SVID in force meanwhile. Connections
//! already established keep the keys they negotiated; only new handshakes
//! see a rotated SVID. The proxy never creates or stores a key: it uses the
//! one the agent hands out, in memory only.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use sigil_client::WorkloadClient;
use sigil_proto::workload as pb;
use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::{RotatingCert, TrustRoots};
use sigil_types::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The first and the longest wait between Workload API reconnection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// Why an SVID or a Workload API response could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The socket address is not a `unix:` address.
    #[error(
        "Workload API socket address {0:?} must be unix:///absolute/path (or an absolute path)"
    )]
    Address(String),
    /// Connecting to or calling the Workload API failed.
    #[error("Workload API at {path}: {message}")]
    Unavailable {
        /// The socket path.
        path: String,
        /// What failed.
        message: String,
    },
    /// The response holds no SVID this proxy can use.
    #[error("{0}")]
    NoSvid(String),
    /// The response is malformed.
    #[error("invalid Workload API response: {0}")]
    Invalid(String),
    /// The proxy was stopped before an SVID arrived.
    #[error("stopped before an X509-SVID arrived")]
    Cancelled,
}

/// Who the proxy currently is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The SPIFFE ID of the SVID in use.
    pub spiffe_id: SpiffeId,
    /// Its identity attributes (name, value), from the certificate.
    pub attributes: Vec<(String, String)>,
    /// The leaf certificate's serial number (lowercase hex); changes on every rotation.
    pub serial_hex: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
    /// Trust domains whose bundles are held (own and federated), sorted.
    pub trust_domains: Vec<String>,
}

/// Trust bundles of every trust domain the proxy trusts, replaceable at run time.
#[derive(Debug, Default)]
pub struct Trust {
    bundles: ArcSwap<BundleSet>,
}

impl Trust {
    /// A trust store holding `bundles`.
    pub fn new(bundles: BundleSet) -> Self {
        Self {
            bundles: ArcSwap::from_pointee(bundles),
        }
    }

    /// Replaces every bundle.
    pub fn replace(&self, bundles: BundleSet) {
        self.bundles.store(Arc::new(bundles));
    }

    /// The bundles held now.
    pub fn bundles(&self) -> Arc<BundleSet> {
        self.bundles.load_full()
    }
}

impl TrustRoots for Trust {
    fn roots_for(&self, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
        self.bundles.load().roots_for(td)
    }
}

/// Where to get the SVID from and which one to use.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// The Workload API socket (`unix:///path` or `/path`).
    pub socket: String,
    /// Use the SVID with this SPIFFE ID; `None` takes the first (the default SVID).
    pub spiffe_id: Option<SpiffeId>,
}

/// The proxy's certificate, key and trust, kept current from the Workload API.
#[derive(Debug)]
pub struct X509Source {
    cert: Arc<RotatingCert>,
    trust: Arc<Trust>,
    identity: watch::Sender<Arc<Identity>>,
}

/// One SVID ready for use.
struct Usable {
    chain: Vec<Vec<u8>>,
    key: PrivateKey,
    bundles: BundleSet,
    identity: Identity,
}

impl X509Source {
    /// A source that never changes, from a chain (leaf first, DER), its key
    /// and bundles; for embedding and benchmarks.
    pub fn fixed(
        chain: Vec<Vec<u8>>,
        key: &PrivateKey,
        bundles: BundleSet,
    ) -> Result<Arc<Self>, SourceError> {
        let identity = identity_of(&chain, &bundles)?;
        let cert =
            RotatingCert::new(chain, key).map_err(|e| SourceError::Invalid(e.to_string()))?;
        Ok(Arc::new(Self {
            cert: Arc::new(cert),
            trust: Arc::new(Trust::new(bundles)),
            identity: watch::Sender::new(Arc::new(identity)),
        }))
    }

    /// Connects to the Workload API and waits for the first usable SVID
    /// (retrying with backoff, logging why), then follows the stream in a
    /// task until `cancel`.
    pub async fn connect(
        opts: SourceOptions,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, SourceError> {
        let path = socket_path(&opts.socket)?;
        let mut delay = BACKOFF.0;
        let (first, stream) = loop {
            let attempt = async {
                let mut stream = open_stream(&path).await?;
                loop {
                    let resp = next_message(&path, &mut stream).await?;
                    metrics.svid_update();
                    match usable(&resp, opts.spiffe_id.as_ref()) {
                        Ok(u) => return Ok::<_, SourceError>((u, stream)),
                        Err(e) => tracing::warn!(error = %e, "waiting for a usable X509-SVID"),
                    }
                }
            };
            let result = tokio::select! {
                _ = cancel.cancelled() => return Err(SourceError::Cancelled),
                r = attempt => r,
            };
            match result {
                Ok(ok) => break ok,
                Err(e) => {
                    metrics.workload_api_error();
                    tracing::warn!(error = %e, retry_in = ?delay, "no X509-SVID from the Workload API yet");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(SourceError::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(BACKOFF.1);
                }
            }
        };
        let cert = RotatingCert::new(first.chain, &first.key)
            .map_err(|e| SourceError::Invalid(e.to_string()))?;
        tracing::info!(
            spiffe_id = %first.identity.spiffe_id,
            not_after = %humantime_secs(first.identity.not_after),
            trust_domains = ?first.identity.trust_domains,
            "X509-SVID received"
        );
        let source = Arc::new(Self {
            cert: Arc::new(cert),
            trust: Arc::new(Trust::new(first.bundles)),
            identity: watch::Sender::new(Arc::new(first.identity)),
        });
        tokio::spawn(follow(
            source.clone(),
            path,
            opts.spiffe_id,
            Some(stream),
            metrics,
            cancel,
        ));
        Ok(source)
    }

    /// The rotating certificate (server and client resolver for rustls).
    pub fn cert(&self) -> Arc<RotatingCert> {
        self.cert.clone()
    }

    /// The trust bundles.
    pub fn trust(&self) -> Arc<Trust> {
        self.trust.clone()
    }

    /// Who the proxy is now.
    pub fn identity(&self) -> Arc<Identity> {
        self.identity.borrow().clone()
    }

    /// A receiver that sees every change of identity (rotation included).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Identity>> {
        self.identity.subscribe()
    }

    fn apply(&self, u: Usable) -> Result<(), SourceError> {
        self.cert
            .update(u.chain, &u.key)
            .map_err(|e| SourceError::Invalid(e.to_string()))?;
        self.trust.replace(u.bundles);
        let old = self.identity();
        if old.serial_hex != u.identity.serial_hex || old.trust_domains != u.identity.trust_domains
        {
            tracing::info!(
                spiffe_id = %u.identity.spiffe_id,
                not_after = %humantime_secs(u.identity.not_after),
                trust_domains = ?u.identity.trust_domains,
                "X509-SVID or bundles updated; new connections use them"
            );
        }
        self.identity.send_replace(Arc::new(u.identity));
        Ok(())
    }
}

type Stream = tonic::Streaming<pb::X509svidResponse>;

/// Follows the stream, reconnecting with backoff, until `cancel`.
async fn follow(
    source: Arc<X509Source>,
    path: PathBuf,
    want: Option<SpiffeId>,
    mut stream: Option<Stream>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut delay = BACKOFF.0;
    loop {
        let s = match stream.take() {
            Some(s) => s,
            None => {
                let opened = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = open_stream(&path) => r,
                };
                match opened {
                    Ok(s) => s,
                    Err(e) => {
                        metrics.workload_api_error();
                        tracing::warn!(error = %e, retry_in = ?delay, "Workload API unavailable; keeping the current SVID");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(BACKOFF.1);
                        continue;
                    }
                }
            }
        };
        let mut s = s;
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                m = next_message(&path, &mut s) => m,
            };
            match msg {
                Ok(resp) => {
                    delay = BACKOFF.0;
                    metrics.svid_update();
                    match usable(&resp, want.as_ref()).and_then(|u| source.apply(u)) {
                        Ok(()) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "Workload API update ignored; keeping the current SVID");
                        }
                    }
                }
                Err(e) => {
                    metrics.workload_api_error();
                    tracing::warn!(error = %e, retry_in = ?delay, "Workload API stream ended; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(BACKOFF.1);
                    break;
                }
            }
        }
    }
}

async fn open_stream(path: &std::path::Path) -> Result<Stream, SourceError> {
    let unavailable = |message: String| SourceError::Unavailable {
        path: path.display().to_string(),
        message,
    };
    let mut client = WorkloadClient::connect(path)
        .await
        .map_err(|e| unavailable(format!("cannot connect: {}", error_chain(&e))))?;
    client
        .fetch_x509svid()
        .await
        .map_err(|s| unavailable(format!("{} ({:?})", s.message(), s.code())))
}

async fn next_message(
    path: &std::path::Path,
    stream: &mut Stream,
) -> Result<pb::X509svidResponse, SourceError> {
    let unavailable = |message: String| SourceError::Unavailable {
        path: path.display().to_string(),
        message,
    };
    match stream.message().await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(unavailable("the stream ended".to_owned())),
        Err(s) => Err(unavailable(format!("{} ({:?})", s.message(), s.code()))),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Picks the SVID and gathers the bundles of a response.
fn usable(resp: &pb::X509svidResponse, want: Option<&SpiffeId>) -> Result<Usable, SourceError> {
    let svid = match want {
        Some(id) => resp.svids.iter().find(|s| s.spiffe_id == id.as_str()),
        None => resp.svids.first(),
    };
    let Some(svid) = svid else {
        let offered: Vec<&str> = resp.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        return Err(SourceError::NoSvid(match want {
            Some(id) => format!(
                "the Workload API offers no X509-SVID for {id} (it offers {offered:?}); register an entry for it"
            ),
            None => "the Workload API response holds no X509-SVID".to_owned(),
        }));
    };
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        SourceError::Invalid(format!("{what} of {}: {e}", svid.spiffe_id))
    };
    let chain =
        sigil_svid::x509::split_der_certs(&svid.x509_svid).map_err(|e| invalid("x509_svid", &e))?;
    let key = PrivateKey::from_pkcs8_der(&svid.x509_svid_key)
        .map_err(|e| invalid("x509_svid_key", &e))?;
    let id = SpiffeId::from_str(&svid.spiffe_id).map_err(|e| invalid("spiffe_id", &e))?;
    let mut bundles = BundleSet::default();
    let mut own = Bundle::new(id.trust_domain());
    own.x509_authorities =
        sigil_svid::x509::split_der_certs(&svid.bundle).map_err(|e| invalid("bundle", &e))?;
    bundles.insert(own);
    for (key, der) in &resp.federated_bundles {
        let name = key.strip_prefix("spiffe://").unwrap_or(key);
        let td = TrustDomain::new(name)
            .map_err(|e| SourceError::Invalid(format!("federated bundle key {key:?}: {e}")))?;
        if td == id.trust_domain() {
            // A workload's own trust domain comes from `bundle`; never let a
            // federated entry replace it.
            continue;
        }
        let mut b = Bundle::new(td);
        b.x509_authorities = sigil_svid::x509::split_der_certs(der)
            .map_err(|e| SourceError::Invalid(format!("federated bundle {key}: {e}")))?;
        bundles.insert(b);
    }
    let identity = identity_of(&chain, &bundles)?;
    if identity.spiffe_id != id {
        return Err(SourceError::Invalid(format!(
            "the certificate says {}, the response says {id}",
            identity.spiffe_id
        )));
    }
    Ok(Usable {
        chain,
        key,
        bundles,
        identity,
    })
}

fn identity_of(chain: &[Vec<u8>], bundles: &BundleSet) -> Result<Identity, SourceError> {
    let leaf = chain
        .first()
        .ok_or_else(|| SourceError::Invalid("empty certificate chain".to_owned()))?;
    let info =
        sigil_svid::x509::cert_info(leaf).map_err(|e| SourceError::Invalid(e.to_string()))?;
    let spiffe_id = info.spiffe_id.ok_or_else(|| {
        SourceError::Invalid("the leaf certificate has no single SPIFFE ID".to_owned())
    })?;
    let attributes =
        sigil_svid::x509::svid_attributes(leaf).map_err(|e| SourceError::Invalid(e.to_string()))?;
    Ok(Identity {
        spiffe_id,
        attributes,
        serial_hex: info.serial_hex,
        not_after: info.not_after,
        trust_domains: bundles.iter().map(|b| b.trust_domain.to_string()).collect(),
    })
}

fn humantime_secs(t: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(t)
}

/// The filesystem path of a Workload API address (`unix:///path`, `unix:/path` or `/path`).
pub fn socket_path(addr: &str) -> Result<PathBuf, SourceError> {
    sigil_client::socket_path(addr).map_err(|e| SourceError::Address(e.address().to_owned()))
}
