//! The client side of a bundle endpoint (spiffe.md §4.3): one HTTPS `GET`
//! over HTTP/1.1, the server authenticated per the relationship's profile,
//! up to [`MAX_REDIRECTS`] redirects that stay `https` and within the profile.
//! Size and time are bounded ([`MAX_BUNDLE_BYTES`], [`FETCH_TIMEOUT`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use sigil_svid::SvidError;
use sigil_svid::tls::{Authorize, SpiffeServerVerifier, StaticTrust};
use sigil_types::{SpiffeId, TrustDomain};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 3;
/// The largest bundle document accepted.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
/// The longest one fetch (connect, handshakes, redirects, body) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a bundle could not be fetched or was not taken.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// An `https_spiffe` endpoint's SVID can only be checked against a bundle
    /// of its trust domain, and the server holds none.
    #[error(
        "no bundle of {endpoint_trust_domain} is held to authenticate the https_spiffe bundle \
         endpoint; set a bootstrap bundle with `sigil bundle set --trust-domain \
         {endpoint_trust_domain} --path <bundle.json>` (or --trust-domain-bundle-path of \
         `sigil federation create|update`, or bundle_file in the config file)"
    )]
    NoEndpointBundle {
        /// The trust domain of the endpoint SPIFFE ID.
        endpoint_trust_domain: TrustDomain,
    },
    /// An `https_web` endpoint cannot be checked: no CA certificate at all.
    #[error(
        "no CA certificates to verify the https_web bundle endpoint with: the system has none \
         and no ca_file is configured"
    )]
    NoWebRoots,
    /// The URL (configured or from a redirect) cannot be used.
    #[error("{0}")]
    Url(String),
    /// The TCP connection failed.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// The system's error.
        reason: String,
    },
    /// The endpoint presented an X509-SVID with another SPIFFE ID.
    #[error(
        "the bundle endpoint {url} presented {presented}, but the relationship expects {expected}"
    )]
    WrongEndpointId {
        /// The URL.
        url: String,
        /// The SPIFFE ID in the endpoint's certificate.
        presented: SpiffeId,
        /// The configured endpoint SPIFFE ID.
        expected: SpiffeId,
    },
    /// The TLS handshake failed (certificate not trusted, expired, wrong host...).
    #[error("TLS handshake with {url} failed: {reason}")]
    Tls {
        /// The URL.
        url: String,
        /// rustls' error, with a hint.
        reason: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with {url} failed: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// hyper's error.
        reason: String,
    },
    /// The endpoint answered with a status other than 200 (or a redirect).
    #[error("{url} answered HTTP {status}; a bundle endpoint must answer 200 with the bundle")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// More than [`MAX_REDIRECTS`] redirects.
    #[error("{url} redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects {
        /// The configured URL.
        url: String,
    },
    /// The document exceeds [`MAX_BUNDLE_BYTES`].
    #[error("the answer of {url} exceeds {MAX_BUNDLE_BYTES} bytes")]
    TooLarge {
        /// The URL.
        url: String,
    },
    /// Taking the fetched bundle would make the federated bundles exceed
    /// [`super::MAX_FEDERATED_BYTES`] in all; the held one is kept.
    #[error("{0}")]
    NoRoom(String),
    /// The whole fetch took longer than [`FETCH_TIMEOUT`].
    #[error("fetching {url} took longer than {}s", FETCH_TIMEOUT.as_secs())]
    Timeout {
        /// The configured URL.
        url: String,
    },
    /// The document is not a valid SPIFFE bundle (spiffe.md §4.1).
    #[error("{url} did not serve a valid SPIFFE bundle: {reason}")]
    BadBundle {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint served a bundle older than the one held.
    #[error(
        "the endpoint served spiffe_sequence {served}, lower than the held bundle's {held}; \
         kept the held bundle (if {trust_domain} was reset, replace its bundle with \
         `sigil bundle set` or remove it with `sigil bundle delete`)"
    )]
    StaleSequence {
        /// The foreign trust domain.
        trust_domain: TrustDomain,
        /// The sequence served.
        served: u64,
        /// The sequence held.
        held: u64,
    },
    /// Reading or writing the store failed.
    #[error("store: {0}")]
    Store(String),
}

/// How the endpoint must authenticate itself.
#[derive(Debug, Clone)]
pub enum EndpointAuth {
    /// `https_spiffe`: an X509-SVID with exactly `expected`, chaining to `roots`
    /// (the CA certificates of `expected`'s trust domain).
    Spiffe {
        /// The endpoint SPIFFE ID.
        expected: SpiffeId,
        /// DER CA certificates of its trust domain.
        roots: Vec<Vec<u8>>,
    },
    /// `https_web`: a Web PKI certificate for the URL's host, chaining to `roots`.
    Web {
        /// The trusted CA certificates.
        roots: Arc<RootCertStore>,
    },
}

/// The system's CA certificates, loaded once per process. Certificates the
/// system store holds but rustls cannot parse are skipped.
pub fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "reading system CA certificates");
        }
        found.certs
    })
}

/// A root store of `extra` (e.g. a relationship's `ca_file`) and, when
/// `with_system` is set, the system's roots.
pub fn web_roots(
    extra: &[CertificateDer<'static>],
    with_system: bool,
) -> Result<Arc<RootCertStore>, FetchError> {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(extra.iter().cloned());
    if with_system {
        store.add_parsable_certificates(system_roots().iter().cloned());
    }
    if store.is_empty() {
        return Err(FetchError::NoWebRoots);
    }
    Ok(Arc::new(store))
}

/// Fetches the document at `url`, following redirects; the whole fetch is
/// bounded by [`FETCH_TIMEOUT`].
pub async fn fetch(url: &str, auth: &EndpointAuth) -> Result<Vec<u8>, FetchError> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_unbounded(url, auth)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout {
            url: url.to_owned(),
        }),
    }
}

async fn fetch_unbounded(url: &str, auth: &EndpointAuth) -> Result<Vec<u8>, FetchError> {
    let mut current: Uri = parse_url(url)?;
    for _ in 0..=MAX_REDIRECTS {
        match get_once(&current, auth).await? {
            Answer::Body(body) => return Ok(body),
            Answer::Redirect(location) => {
                current = resolve_redirect(&current, &location)?;
                tracing::debug!(from = %url, to = %current, "bundle endpoint redirected");
            }
        }
    }
    Err(FetchError::TooManyRedirects {
        url: url.to_owned(),
    })
}

/// Parses and checks an endpoint URL (`https`, no userinfo, no fragment).
fn parse_url(url: &str) -> Result<Uri, FetchError> {
    sigil_types::federation::validate_endpoint_url(url)
        .map_err(|e| FetchError::Url(e.to_string()))?;
    url.parse::<Uri>()
        .map_err(|e| FetchError::Url(format!("bundle endpoint URL {url:?}: {e}")))
}

/// The target of a redirect from `base`: an absolute `https` URL or an
/// absolute path on the same host. Anything else would leave the profile.
fn resolve_redirect(base: &Uri, location: &str) -> Result<Uri, FetchError> {
    if location.starts_with('/') && !location.starts_with("//") {
        let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
        return parse_url(&format!("https://{authority}{location}"));
    }
    if !location.starts_with("https://") {
        return Err(FetchError::Url(format!(
            "{base} redirected to {location:?}, which is not an https URL; redirects must stay \
             within the bundle endpoint profile"
        )));
    }
    parse_url(location)
}

enum Answer {
    Body(Vec<u8>),
    Redirect(String),
}

async fn get_once(uri: &Uri, auth: &EndpointAuth) -> Result<Answer, FetchError> {
    let url = uri.to_string();
    let host = uri
        .host()
        .ok_or_else(|| FetchError::Url(format!("{url} has no host")))?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let server_name = ServerName::try_from(bare_host.to_owned())
        .map_err(|e| FetchError::Url(format!("{url}: host {host:?}: {e}")))?;

    let mut config = match auth {
        EndpointAuth::Spiffe { expected, roots } => {
            let trust = StaticTrust(
                [(expected.trust_domain(), roots.clone())]
                    .into_iter()
                    .collect(),
            );
            let verifier =
                SpiffeServerVerifier::new(Arc::new(trust), Authorize::Exact(expected.clone()));
            ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        EndpointAuth::Web { roots } => ClientConfig::builder()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];

    let tcp = tokio::net::TcpStream::connect((bare_host, port))
        .await
        .map_err(|e| FetchError::Connect {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| handshake_error(&url, auth, &e))?;

    let http = |reason: String| FetchError::Http {
        url: url.clone(),
        reason,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| http(e.to_string()))?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "bundle endpoint connection ended with an error");
        }
    });
    let result = async {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
        let request = Request::get(path)
            .header(
                header::HOST,
                HeaderValue::from_str(authority).map_err(|e| http(e.to_string()))?,
            )
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "sigil-server")
            .body(Empty::<Bytes>::new())
            .map_err(|e| http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = response.status();
        if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| http(format!("HTTP {status} without a Location")))?;
            return Ok(Answer::Redirect(location.to_owned()));
        }
        if status != StatusCode::OK {
            return Err(FetchError::Status {
                url: url.clone(),
                status: status.as_u16(),
            });
        }
        let body = Limited::new(response.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge { url: url.clone() }
                } else {
                    http(e.to_string())
                }
            })?;
        Ok(Answer::Body(body.to_bytes().to_vec()))
    }
    .await;
    conn_task.abort();
    result
}

/// What a failed TLS handshake with the endpoint means for the operator.
fn handshake_error(url: &str, auth: &EndpointAuth, e: &std::io::Error) -> FetchError {
    let EndpointAuth::Spiffe { expected, .. } = auth else {
        return FetchError::Tls {
            url: url.to_owned(),
            reason: e.to_string(),
        };
    };
    let hint = match sigil_svid::tls::refusal(e) {
        Some(SvidError::Unauthorized { presented, .. }) => {
            return FetchError::WrongEndpointId {
                url: url.to_owned(),
                presented: presented.clone(),
                expected: expected.clone(),
            };
        }
        Some(SvidError::UriSanCount(_) | SvidError::BadUriSan { .. }) => {
            "the endpoint's certificate is not an X509-SVID; is it an https_web endpoint?"
                .to_owned()
        }
        _ => format!(
            "checked against the held bundle of {}; is it current?",
            expected.trust_domain()
        ),
    };
    FetchError::Tls {
        url: url.to_owned(),
        reason: format!("{e} ({hint})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_stay_https() {
        let base: Uri = "https://a.example:8443/bundle".parse().unwrap();
        assert_eq!(
            resolve_redirect(&base, "/v2").unwrap().to_string(),
            "https://a.example:8443/v2"
        );
        assert_eq!(
            resolve_redirect(&base, "https://b.example/x")
                .unwrap()
                .to_string(),
            "https://b.example/x"
        );
        for bad in [
            "http://a.example/",
            "//b.example/x",
            "ftp://x",
            "v2",
            "https://u@b/",
        ] {
            assert!(resolve_redirect(&base, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn handshake_errors_say_what_the_endpoint_presented() {
        let expected: SpiffeId = "spiffe://b.test/sigil/server".parse().unwrap();
        let auth = EndpointAuth::Spiffe {
            expected: expected.clone(),
            roots: Vec::new(),
        };
        let refused = |e: SvidError| {
            let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(e)),
            ));
            std::io::Error::new(std::io::ErrorKind::InvalidData, tls)
        };
        let presented: SpiffeId = "spiffe://b.test/other".parse().unwrap();
        let wrong = refused(SvidError::Unauthorized {
            presented: presented.clone(),
            expected: expected.to_string(),
        });
        assert!(matches!(
            handshake_error("u", &auth, &wrong),
            FetchError::WrongEndpointId { presented: p, expected: x, .. } if p == presented && x == expected
        ));
        let web = handshake_error("u", &auth, &refused(SvidError::UriSanCount(0)));
        assert!(web.to_string().contains("not an X509-SVID"), "{web}");
        let other = handshake_error("u", &auth, &std::io::Error::other("reset"));
        assert!(
            other.to_string().contains("held bundle of b.test"),
            "{other}"
        );
    }

    #[test]
    fn web_roots_need_a_root() {
        assert!(matches!(web_roots(&[], false), Err(FetchError::NoWebRoots)));
    }
}
