//! Federation against real listeners on 127.0.0.1: the bundle endpoint of
//! a second trust domain, Web PKI endpoints minted here, and a SQLite store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sigil_store::SqliteStore;
use sigil_svid::jwt::{JwtAuthority, JwtKeyType};
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::RotatingCert;
use sigil_svid::x509::{SvidRequest, X509Authority};
use sigil_types::SpiffeId;
use tonic::Code;

use super::config::{BundleEndpointConfig, ConfiguredRelationship, ServeProfile};
use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// One trust domain's store, CA and server SVID.
struct Domain {
    dir: tempfile::TempDir,
    td: TrustDomain,
    store: Arc<dyn Store>,
    ca: Arc<CaManager>,
    cert: Arc<RotatingCert>,
}

impl Domain {
    async fn new(name: &str) -> Self {
        sigil_svid::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("db.sqlite"))
                .await
                .unwrap(),
        );
        let ca = CaManager::load(
            td(name),
            store.clone(),
            "test-instance",
            &dir.path().join("keys"),
            DAY,
            Duration::from_secs(1),
            JwtKeyType::default(),
            SystemTime::now(),
        )
        .await
        .unwrap();
        let id = td(name).id_with_path(sigil_types::SERVER_PATH).unwrap();
        let (chain, key) = svid(&ca, &id, &[]);
        let cert = Arc::new(RotatingCert::new(chain, &key).unwrap());
        Self {
            dir,
            td: td(name),
            store,
            ca,
            cert,
        }
    }

    fn server_id(&self) -> SpiffeId {
        self.td.id_with_path(sigil_types::SERVER_PATH).unwrap()
    }

    async fn serve(&self, profile: ServeProfile) -> Result<SocketAddr, ServerError> {
        endpoint::serve(
            &BundleEndpointConfig {
                address: "127.0.0.1:0".parse().unwrap(),
                profile,
            },
            self.ca.clone(),
            self.cert.clone(),
            CancellationToken::new(),
            &TaskTracker::new(),
        )
        .await
    }

    async fn federation(&self, configured: &[ConfiguredRelationship]) -> Arc<Federation> {
        let config = FederationConfig {
            bundle_endpoint: None,
            federates_with: configured
                .iter()
                .map(|c| (c.relationship.trust_domain.clone(), c.clone()))
                .collect(),
            min_refresh_interval: Duration::from_secs(1),
        };
        let f = Federation::new(
            self.td.clone(),
            self.store.clone(),
            self.ca.clone(),
            &config,
            CancellationToken::new(),
            TaskTracker::new(),
        )
        .await
        .unwrap();
        f.start().await.unwrap();
        f
    }
}

fn svid(ca: &CaManager, id: &SpiffeId, dns: &[String]) -> (Vec<Vec<u8>>, PrivateKey) {
    let key = PrivateKey::generate_p256().unwrap();
    let mut req = SvidRequest::new(id, Duration::from_secs(3600));
    req.dns_names = dns;
    let leaf = ca
        .active()
        .x509
        .sign_svid(&req, &key.public_key_spki_der(), SystemTime::now())
        .unwrap();
    (vec![leaf], key)
}

/// A Web PKI CA and a `localhost` certificate from it, as PEM files.
struct WebPki {
    ca_der: Vec<u8>,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn web_pki(dir: &Path) -> WebPki {
    let ca = X509Authority::generate(&td("web.test"), DAY, SystemTime::now()).unwrap();
    let key = PrivateKey::generate_p256().unwrap();
    let id: SpiffeId = "spiffe://web.test/bundle-host".parse().unwrap();
    let dns = ["localhost".to_owned()];
    let mut req = SvidRequest::new(&id, Duration::from_secs(3600));
    req.dns_names = &dns;
    let leaf = ca
        .sign_svid(&req, &key.public_key_spki_der(), SystemTime::now())
        .unwrap();
    let w = WebPki {
        ca_der: ca.cert_der().to_vec(),
        ca_file: dir.join("web-ca.pem"),
        cert_file: dir.join("web.pem"),
        key_file: dir.join("web.key"),
    };
    std::fs::write(
        &w.ca_file,
        sigil_svid::pem::certs_to_pem(std::slice::from_ref(&w.ca_der)),
    )
    .unwrap();
    std::fs::write(&w.cert_file, sigil_svid::pem::certs_to_pem(&[leaf])).unwrap();
    std::fs::write(&w.key_file, key.to_pem().as_bytes()).unwrap();
    w
}

fn web_auth(w: &WebPki) -> EndpointAuth {
    EndpointAuth::Web {
        roots: fetch::web_roots(&[CertificateDer::from(w.ca_der.clone())], false).unwrap(),
    }
}

/// Sends one request without checking the server's certificate.
async fn raw_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
) -> (StatusCode, String, Vec<u8>) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sigil_svid::tls::danger::NoServerVerification(
            provider,
        )))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let ctype = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, body.to_vec())
}

use rustls_pki_types::ServerName;

/// A Web PKI HTTPS server answering each path with `route`.
async fn web_server(
    w: &WebPki,
    route: impl Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> SocketAddr {
    let resolver = crate::cert_files::FileCertResolver::new(crate::cert_files::CertFiles {
        cert_file: w.cert_file.clone(),
        key_file: w.key_file.clone(),
        cert_key: "cert_file",
        key_key: "key_file",
    })
    .unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = Arc::new(route);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let route = route.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let r = route(req.uri().path());
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", to)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn ok(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::new(Full::new(body.into()))
}

/// The gRPC code the admin API answers the refusal in `r` with.
fn code<T: std::fmt::Debug>(r: Result<T, FederationError>) -> Code {
    tonic::Status::from(r.expect_err("a refusal")).code()
}

#[tokio::test]
async fn endpoint_serves_the_bundle_at_root_only() {
    let b = Domain::new("b.test").await;
    let addr = b.serve(ServeProfile::HttpsSpiffe).await.unwrap();

    let (status, ctype, body) = raw_request(addr, Method::GET, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ctype, "application/json");
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["spiffe_refresh_hint"], json!(1));
    assert!(doc["spiffe_sequence"].as_u64().unwrap() >= 1);
    let bundle = Bundle::from_json(b.td.clone(), std::str::from_utf8(&body).unwrap()).unwrap();
    assert_eq!(bundle, *b.ca.bundle());

    assert_eq!(
        raw_request(addr, Method::GET, "/bundle").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        raw_request(addr, Method::POST, "/").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        raw_request(addr, Method::HEAD, "/").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn endpoint_follows_the_server_svid_and_rotation() {
    let b = Domain::new("b.test").await;
    let addr = b.serve(ServeProfile::HttpsSpiffe).await.unwrap();
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let auth = |roots: Vec<Vec<u8>>, expected: SpiffeId| EndpointAuth::Spiffe { expected, roots };

    let body = fetch::fetch(
        &url,
        &auth(b.ca.bundle().x509_authorities.clone(), b.server_id()),
    )
    .await
    .unwrap();
    let first = Bundle::from_json(b.td.clone(), std::str::from_utf8(&body).unwrap()).unwrap();

    // A new server SVID from a rotated CA is served without a restart, and
    // the published bundle follows the rotation.
    let later = SystemTime::now() + DAY * 3 / 5;
    b.ca.rotate(later).await.unwrap();
    let (chain, key) = svid(&b.ca, &b.server_id(), &[]);
    b.cert.update(chain, &key).unwrap();
    let body = fetch::fetch(
        &url,
        &auth(b.ca.bundle().x509_authorities.clone(), b.server_id()),
    )
    .await
    .unwrap();
    let second = Bundle::from_json(b.td.clone(), std::str::from_utf8(&body).unwrap()).unwrap();
    assert!(second.sequence > first.sequence);
    assert_eq!(second.x509_authorities.len(), 2);
}

#[tokio::test]
async fn https_spiffe_requires_the_endpoint_id_and_its_bundle() {
    let b = Domain::new("b.test").await;
    let other = Domain::new("b.test").await;
    let addr = b.serve(ServeProfile::HttpsSpiffe).await.unwrap();
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let roots = b.ca.bundle().x509_authorities.clone();

    let wrong: SpiffeId = "spiffe://b.test/not/the/server".parse().unwrap();
    let err = fetch::fetch(
        &url,
        &EndpointAuth::Spiffe {
            expected: wrong.clone(),
            roots: roots.clone(),
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, FetchError::WrongEndpointId { presented, expected, .. }
            if *presented == b.server_id() && *expected == wrong),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("spiffe://b.test/sigil/server") && msg.contains("not/the/server"),
        "{msg}"
    );

    // The right ID signed by a CA that is not in the given roots.
    let err = fetch::fetch(
        &url,
        &EndpointAuth::Spiffe {
            expected: b.server_id(),
            roots: other.ca.bundle().x509_authorities.clone(),
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("held bundle of b.test"), "{err}");
}

#[tokio::test]
async fn https_web_checks_the_host_and_the_roots() {
    let b = Domain::new("b.test").await;
    let w = web_pki(b.dir.path());
    let addr = b
        .serve(ServeProfile::HttpsWeb {
            cert_file: w.cert_file.clone(),
            key_file: w.key_file.clone(),
        })
        .await
        .unwrap();
    let body = fetch::fetch(
        &format!("https://localhost:{}/", addr.port()),
        &web_auth(&w),
    )
    .await
    .unwrap();
    assert_eq!(
        Bundle::from_json(b.td.clone(), std::str::from_utf8(&body).unwrap()).unwrap(),
        *b.ca.bundle()
    );
    // The certificate names localhost, not the address.
    let err = fetch::fetch(
        &format!("https://127.0.0.1:{}/", addr.port()),
        &web_auth(&w),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Tls { .. }), "{err}");
    // Another CA does not vouch for it.
    let stranger = X509Authority::generate(&td("x.test"), DAY, SystemTime::now()).unwrap();
    let err = fetch::fetch(
        &format!("https://localhost:{}/", addr.port()),
        &EndpointAuth::Web {
            roots: fetch::web_roots(&[CertificateDer::from(stranger.cert_der().to_vec())], false)
                .unwrap(),
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("UnknownIssuer") || err.to_string().contains("issuer"),
        "{err}"
    );
}

#[tokio::test]
async fn https_web_identity_files_are_checked_at_start() {
    let b = Domain::new("b.test").await;
    let w = web_pki(b.dir.path());
    let missing = b.dir.path().join("missing.pem");
    for (cert_file, key_file, key) in [
        (missing.clone(), w.key_file.clone(), "cert_file"),
        (w.cert_file.clone(), missing.clone(), "key_file"),
        (w.key_file.clone(), w.key_file.clone(), "cert_file"),
        (w.cert_file.clone(), w.cert_file.clone(), "key_file"),
    ] {
        let err = b
            .serve(ServeProfile::HttpsWeb {
                cert_file,
                key_file,
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err} should name {key}");
    }
}

#[tokio::test]
async fn redirects_are_followed_within_limits() {
    let b = Domain::new("b.test").await;
    let w = web_pki(b.dir.path());
    let bundle_json = b.ca.bundle().to_json();
    let addr = web_server(&w, move |path| match path {
        "/" => redirect("/one"),
        "/one" => redirect("/two"),
        "/two" => redirect("/bundle"),
        "/bundle" => ok(bundle_json.clone()),
        "/loop" => redirect("/loop"),
        "/plain" => redirect("http://localhost/bundle"),
        "/big" => ok(vec![b' '; fetch::MAX_BUNDLE_BYTES + 1]),
        "/teapot" => Response::builder()
            .status(StatusCode::IM_A_TEAPOT)
            .body(Full::new(Bytes::new()))
            .unwrap(),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    })
    .await;
    let url = |p: &str| format!("https://localhost:{}{p}", addr.port());
    let auth = web_auth(&w);

    let body = fetch::fetch(&url("/"), &auth).await.unwrap();
    assert_eq!(body, b.ca.bundle().to_json().into_bytes());
    assert!(matches!(
        fetch::fetch(&url("/loop"), &auth).await,
        Err(FetchError::TooManyRedirects { .. })
    ));
    let err = fetch::fetch(&url("/plain"), &auth).await.unwrap_err();
    assert!(matches!(err, FetchError::Url(_)), "{err}");
    assert!(matches!(
        fetch::fetch(&url("/big"), &auth).await,
        Err(FetchError::TooLarge { .. })
    ));
    assert!(matches!(
        fetch::fetch(&url("/teapot"), &auth).await,
        Err(FetchError::Status { status: 418, .. })
    ));
}

fn relationship(name: &str, url: String, profile: BundleEndpointProfile) -> FederationRelationship {
    FederationRelationship {
        trust_domain: td(name),
        bundle_endpoint_url: url,
        profile,
        from_config: false,
    }
}

fn spiffe_profile(id: &SpiffeId) -> BundleEndpointProfile {
    BundleEndpointProfile::HttpsSpiffe {
        endpoint_spiffe_id: id.clone(),
    }
}

#[tokio::test]
async fn https_spiffe_relationship_bootstraps_then_follows_the_fetched_bundle() {
    let a = Domain::new("a.test").await;
    let b = Domain::new("b.test").await;
    let addr = b.serve(ServeProfile::HttpsSpiffe).await.unwrap();
    let fed = a.federation(&[]).await;
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let r = relationship("b.test", url.clone(), spiffe_profile(&b.server_id()));

    // Without a bundle of b.test the endpoint cannot be authenticated.
    fed.create_relationship(r.clone(), None).await.unwrap();
    let err = fed.refresh(&b.td).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("sigil bundle set"), "{msg}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::FailedPrecondition
    );
    let (_, status) = fed.get_relationship(&b.td).await.unwrap();
    assert!(status.last_error.unwrap().contains("no bundle of b.test"));
    assert_eq!(status.last_refresh, None);
    assert!(a.store.get_bundle(&b.td).await.unwrap().is_none());

    // With a bootstrap bundle the fetch succeeds.
    let mut bootstrap = (*b.ca.bundle()).clone();
    bootstrap.sequence = 0;
    fed.update_relationship(r.clone(), Some(&bootstrap.to_json()))
        .await
        .unwrap();
    let json = fed.refresh(&b.td).await.unwrap();
    assert_eq!(
        Bundle::from_json(b.td.clone(), &json).unwrap(),
        *b.ca.bundle()
    );
    let (_, status) = fed.get_relationship(&b.td).await.unwrap();
    assert_eq!(status.last_error, None);
    assert!(status.last_refresh.is_some());
    assert!(status.next_refresh.unwrap() >= status.last_refresh.unwrap());

    // b.test prepares its next CA (published before use) and a.test fetches
    // it; once b.test signs with it, the fetched bundle (not the bootstrap)
    // authenticates the endpoint's new SVID.
    let later = SystemTime::now() + DAY * 3 / 5;
    b.ca.rotate(later).await.unwrap();
    let json = fed.refresh(&b.td).await.unwrap();
    assert_eq!(
        Bundle::from_json(b.td.clone(), &json)
            .unwrap()
            .x509_authorities
            .len(),
        2
    );
    b.ca.rotate(later + DAY / 4).await.unwrap();
    let (chain, key) = svid(&b.ca, &b.server_id(), &[]);
    b.cert.update(chain, &key).unwrap();
    let json = fed.refresh(&b.td).await.unwrap();
    assert_eq!(
        Bundle::from_json(b.td.clone(), &json).unwrap(),
        *b.ca.bundle()
    );
    assert!(
        !bootstrap
            .x509_authorities
            .contains(&b.ca.active().x509.cert_der().to_vec())
    );

    // The publisher goes backwards: the held bundle stays.
    let mut newer = (*b.ca.bundle()).clone();
    newer.sequence += 10;
    fed.set_bundle(&b.td, &newer.to_json()).await.unwrap();
    let err = fed.refresh(&b.td).await.unwrap_err();
    assert!(
        matches!(
            &err,
            FederationError::Refresh {
                source: FetchError::StaleSequence { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        a.store.get_bundle(&b.td).await.unwrap().unwrap(),
        newer.to_json()
    );

    // Deleting the relationship keeps the bundle.
    fed.delete_relationship(&b.td).await.unwrap();
    assert!(fed.get_bundle(&b.td).await.is_ok());
    assert_eq!(code(fed.refresh(&b.td).await), Code::NotFound);
}

#[tokio::test]
async fn a_wrong_endpoint_id_is_reported_and_stores_nothing() {
    let a = Domain::new("a.test").await;
    let b = Domain::new("b.test").await;
    let addr = b.serve(ServeProfile::HttpsSpiffe).await.unwrap();
    let fed = a.federation(&[]).await;
    let wrong: SpiffeId = "spiffe://b.test/spire/server".parse().unwrap();
    let url = format!("https://127.0.0.1:{}/", addr.port());
    fed.create_relationship(
        relationship("b.test", url, spiffe_profile(&wrong)),
        Some(&b.ca.bundle().to_json()),
    )
    .await
    .unwrap();
    let before = a.store.get_bundle(&b.td).await.unwrap();
    let err = fed.refresh(&b.td).await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    let (_, status) = fed.get_relationship(&b.td).await.unwrap();
    let last = status.last_error.unwrap();
    assert!(
        last.contains("presented spiffe://b.test/sigil/server")
            && last.contains("expects spiffe://b.test/spire/server"),
        "{last}"
    );
    assert_eq!(a.store.get_bundle(&b.td).await.unwrap(), before);
}

#[tokio::test]
async fn pollers_follow_the_refresh_hint() {
    let a = Domain::new("a.test").await;
    let b = Domain::new("b.test").await;
    let w = web_pki(a.dir.path());
    let addr = b
        .serve(ServeProfile::HttpsWeb {
            cert_file: w.cert_file.clone(),
            key_file: w.key_file.clone(),
        })
        .await
        .unwrap();
    let configured = ConfiguredRelationship {
        relationship: FederationRelationship {
            from_config: true,
            ..relationship(
                "b.test",
                format!("https://localhost:{}/", addr.port()),
                BundleEndpointProfile::HttpsWeb,
            )
        },
        bundle_file: None,
        ca_file: Some(w.ca_file.clone()),
    };
    let fed = a.federation(&[configured]).await;
    let mut rx = fed.subscribe_bundles();

    // The first fetch happens at once; b.test publishes a 1 s hint, so its
    // rotation arrives within seconds without anyone asking.
    let wait_for = |want: Arc<Bundle>| {
        let store = a.store.clone();
        let fed = fed.clone();
        let td = b.td.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let Some(json) = store.get_bundle(&td).await.unwrap()
                        && Bundle::from_json(td.clone(), &json).unwrap() == *want
                    {
                        // No change feed here: hand the change over as the follower would.
                        fed.reload_bundle(&td).await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .expect("the poller stored the bundle")
        }
    };
    wait_for(b.ca.bundle()).await;
    assert!(rx.has_changed().unwrap());
    assert!(rx.borrow_and_update().contains_key(&b.td));
    b.ca.rotate(SystemTime::now() + DAY * 3 / 5).await.unwrap();
    wait_for(b.ca.bundle()).await;
    let (r, status) = fed.get_relationship(&b.td).await.unwrap();
    assert!(r.from_config);
    assert_eq!(status.last_error, None);

    // Configured relationships are not the admin API's to change.
    for err in [
        fed.update_relationship(r.clone(), None).await.unwrap_err(),
        fed.delete_relationship(&b.td).await.unwrap_err(),
    ] {
        assert!(err.to_string().contains("config file"), "{err}");
        assert_eq!(code::<()>(Err(err)), Code::FailedPrecondition);
    }
    assert_eq!(
        code(fed.create_relationship(r, None).await),
        Code::AlreadyExists
    );
}

#[tokio::test]
async fn admin_operations_check_before_they_change_anything() {
    let a = Domain::new("a.test").await;
    let fed = a.federation(&[]).await;
    let b = td("b.test");
    let url = "https://b.test:8443/".to_owned();
    let r = relationship("b.test", url.clone(), BundleEndpointProfile::HttpsWeb);

    // Own trust domain, bad URL, bad bootstrap bundle: nothing is stored.
    for (bad, bundle) in [
        (
            relationship("a.test", url.clone(), BundleEndpointProfile::HttpsWeb),
            None,
        ),
        (
            relationship(
                "b.test",
                "http://b.test/".into(),
                BundleEndpointProfile::HttpsWeb,
            ),
            None,
        ),
        (
            r.clone(),
            Some(r#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256"}]}"#),
        ),
    ] {
        let err = fed.create_relationship(bad, bundle).await.unwrap_err();
        let text = err.to_string();
        assert_eq!(code::<()>(Err(err)), Code::InvalidArgument, "{text}");
    }
    assert!(fed.list_relationships().await.unwrap().is_empty());
    assert!(fed.list_bundles().await.unwrap().is_empty());

    assert_eq!(
        code(fed.update_relationship(r.clone(), None).await),
        Code::NotFound
    );
    assert_eq!(code(fed.delete_relationship(&b).await), Code::NotFound);
    fed.create_relationship(r.clone(), None).await.unwrap();
    let err = fed.create_relationship(r.clone(), None).await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::AlreadyExists);
    let listed = fed.list_relationships().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, r);

    // Bundles: strict parsing, never the own trust domain.
    let own = a.ca.bundle().to_json();
    assert_eq!(
        code(fed.set_bundle(&a.td, &own).await),
        Code::InvalidArgument
    );
    assert_eq!(code(fed.delete_bundle(&a.td).await), Code::InvalidArgument);
    for bad in [
        "",
        "{}",
        "not json",
        r#"{"keys":[{"kty":"EC","use":"x509-svid"}]}"#,
    ] {
        assert_eq!(code(fed.set_bundle(&b, bad).await), Code::InvalidArgument);
    }
    assert_eq!(code(fed.get_bundle(&b).await), Code::NotFound);
    let foreign = Domain::new("b.test").await;
    let stored = fed
        .set_bundle(&b, &foreign.ca.bundle().to_json())
        .await
        .unwrap();
    assert_eq!(fed.get_bundle(&b).await.unwrap(), stored);
    assert_eq!(
        fed.list_bundles().await.unwrap(),
        vec![(b.clone(), stored.clone())]
    );

    // The federated set follows the store, without the own bundle.
    fed.reload_bundle(&b).await;
    fed.reload_bundle(&a.td).await;
    assert_eq!(fed.bundles().keys().collect::<Vec<_>>(), vec![&b]);
    assert_eq!(fed.delete_bundle(&b).await.unwrap(), stored);
    fed.reload_bundle(&b).await;
    assert!(fed.bundles().is_empty());
    assert_eq!(code(fed.delete_bundle(&b).await), Code::NotFound);
}

#[tokio::test]
async fn bootstrap_bundle_files_are_read_at_start() {
    let a = Domain::new("a.test").await;
    let b = Domain::new("b.test").await;
    let file = a.dir.path().join("b.json");
    std::fs::write(&file, b.ca.bundle().to_json()).unwrap();
    let configured = |bundle_file: PathBuf| ConfiguredRelationship {
        relationship: FederationRelationship {
            from_config: true,
            ..relationship(
                "b.test",
                "https://127.0.0.1:1/".into(),
                spiffe_profile(&b.server_id()),
            )
        },
        bundle_file: Some(bundle_file),
        ca_file: None,
    };
    let fed = a.federation(&[configured(file.clone())]).await;
    assert_eq!(
        Bundle::from_json(b.td.clone(), &fed.get_bundle(&b.td).await.unwrap()).unwrap(),
        *b.ca.bundle()
    );
    assert!(fed.bundles().contains_key(&b.td));

    // A broken file stops the start and names the key.
    std::fs::write(&file, r#"{"keys":[{"kty":"EC","use":"jwt-svid"}]}"#).unwrap();
    let config = FederationConfig {
        federates_with: [(b.td.clone(), configured(file))].into_iter().collect(),
        ..FederationConfig::default()
    };
    let err = Federation::new(
        a.td.clone(),
        a.store.clone(),
        a.ca.clone(),
        &config,
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("bundle_file") && err.contains("kid"), "{err}");
}

#[test]
fn intervals_are_clamped_and_failures_back_off() {
    let min = Duration::from_secs(30);
    assert_eq!(interval(min, None), DEFAULT_REFRESH_HINT);
    assert_eq!(interval(min, Some(1)), min);
    assert_eq!(interval(min, Some(600)), Duration::from_secs(600));
    assert_eq!(interval(min, Some(86_400)), MAX_REFRESH_INTERVAL);
    let waits: Vec<u64> = (1..=6).map(|n| backoff(min, n, None).as_secs()).collect();
    assert_eq!(waits, vec![30, 60, 120, 240, 300, 300]);
    assert_eq!(backoff(min, u32::MAX, Some(3600)), MAX_REFRESH_INTERVAL);
    // Tests shorten the minimum; a hint below it never makes polling faster.
    assert_eq!(
        interval(Duration::from_secs(1), Some(1)),
        Duration::from_secs(1)
    );
}

/// A bundle as SPIRE lays it out (its bundle endpoint, `spire-server bundle
/// show -format spiffe`): pretty-printed, `use` first, EC and RSA JWT keys,
/// `spiffe_refresh_hint` and `spiffe_sequence` after the keys.
fn spire_style(ca: &X509Authority, ec: &JwtAuthority, rsa: &JwtAuthority) -> String {
    let ours: Value = serde_json::from_str(&{
        let mut b = Bundle::new(td("spire.test"));
        b.x509_authorities.push(ca.cert_der().to_vec());
        b.to_json()
    })
    .unwrap();
    let x509 = &ours["keys"][0];
    let jwk = |a: &JwtAuthority| {
        let k = serde_json::to_value(a.public_jwk()).unwrap();
        let mut out = serde_json::Map::new();
        out.insert("use".into(), json!("jwt-svid"));
        for (name, v) in k.as_object().unwrap() {
            if name != "use" {
                out.insert(name.clone(), v.clone());
            }
        }
        Value::Object(out)
    };
    let doc = json!({
        "keys": [
            {
                "use": "x509-svid",
                "kty": "EC",
                "crv": x509["crv"],
                "x": x509["x"],
                "y": x509["y"],
                "x5c": [STANDARD.encode(ca.cert_der())]
            },
            jwk(ec),
            jwk(rsa),
        ],
        "spiffe_refresh_hint": 300,
        "spiffe_sequence": 42
    });
    serde_json::to_string_pretty(&doc).unwrap()
}

#[test]
fn spire_style_bundles_parse_and_strictness_rules_hold() {
    sigil_svid::install_crypto_provider();
    let now = SystemTime::now();
    let ca = X509Authority::generate(&td("spire.test"), DAY, now).unwrap();
    let ec = JwtAuthority::generate(DAY, now).unwrap();
    let rsa = JwtAuthority::generate_with(JwtKeyType::Rs256, DAY, now).unwrap();
    let text = spire_style(&ca, &ec, &rsa);
    let b = parse_bundle(&td("spire.test"), &text).unwrap();
    assert_eq!(b.x509_authorities, vec![ca.cert_der().to_vec()]);
    let kids: Vec<_> = b
        .jwt_authorities
        .iter()
        .map(|k| k.kid.clone().unwrap())
        .collect();
    assert_eq!(kids, vec![ec.kid().to_owned(), rsa.kid().to_owned()]);
    assert_eq!((b.sequence, b.refresh_hint), (42, Some(300)));

    let doc: Value = serde_json::from_str(&text).unwrap();
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut d = doc.clone();
        edit(&mut d);
        parse_bundle(&td("spire.test"), &d.to_string())
    };
    // Errors, as in go-spiffe: a jwt-svid key without kid, two x5c
    // certificates, no keys array.
    let err = broken(&|d| {
        d["keys"][1].as_object_mut().unwrap().remove("kid");
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("kid"), "{err}");
    let err = broken(&|d| {
        let c = d["keys"][0]["x5c"][0].clone();
        d["keys"][0]["x5c"] = json!([c.clone(), c]);
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("exactly one"), "{err}");
    assert!(
        broken(&|d| {
            d.as_object_mut().unwrap().remove("keys");
        })
        .is_err()
    );
    // Ignored: keys of another use (wit-svid), without use, of unknown kty;
    // unknown top-level members.
    let ignored = broken(&|d| {
        let keys = d["keys"].as_array_mut().unwrap();
        keys.push(json!({"use": "wit-svid", "kty": "EC", "kid": "w1", "crv": "P-256", "x": "AA", "y": "AA"}));
        keys.push(json!({"kty": "EC", "kid": "n1", "crv": "P-256", "x": "AA", "y": "AA"}));
        keys.push(json!({"use": "jwt-svid", "kty": "oct", "kid": "h1", "k": "c2VjcmV0"}));
        d["spiffe_extension"] = json!({"x": 1});
    })
    .unwrap();
    assert_eq!(ignored, b);
}

/// What go-spiffe (and so SPIRE) requires of a bundle it fetches (spiffe.md
/// §4.1, de-facto rules), checked on a document this server publishes.
fn assert_go_spiffe_accepts(json: &str) {
    let doc: Value = serde_json::from_str(json).unwrap();
    let keys = doc["keys"].as_array().expect("a keys array");
    assert!(doc["spiffe_sequence"].is_u64() && doc["spiffe_refresh_hint"].is_u64());
    for k in keys {
        let kty = k["kty"].as_str().unwrap();
        assert!(["EC", "RSA", "OKP"].contains(&kty), "{k}");
        if kty == "EC" {
            let len = match k["crv"].as_str().unwrap() {
                "P-256" => 43,
                "P-384" => 64,
                other => panic!("curve {other}"),
            };
            assert_eq!(k["x"].as_str().unwrap().len(), len, "{k}");
            assert_eq!(k["y"].as_str().unwrap().len(), len, "{k}");
        }
        match k["use"].as_str().unwrap() {
            "x509-svid" => {
                let x5c = k["x5c"].as_array().unwrap();
                assert_eq!(x5c.len(), 1, "{k}");
                let der = STANDARD.decode(x5c[0].as_str().unwrap()).unwrap();
                // The key members are those of the certificate.
                let mut b = Bundle::new(td("any.test"));
                b.x509_authorities.push(der);
                let again: Value = serde_json::from_str(&b.to_json()).unwrap();
                assert_eq!(again["keys"][0], *k);
                assert!(k.get("kid").is_none());
            }
            "jwt-svid" => assert!(!k["kid"].as_str().unwrap().is_empty(), "{k}"),
            other => panic!("use {other}"),
        }
    }
}

#[tokio::test]
async fn published_bundles_meet_go_spiffe_rules() {
    let b = Domain::new("b.test").await;
    b.ca.rotate(SystemTime::now() + DAY * 3 / 5).await.unwrap();
    let addr = b.serve(ServeProfile::HttpsSpiffe).await.unwrap();
    let (_, _, body) = raw_request(addr, Method::GET, "/").await;
    let json = String::from_utf8(body).unwrap();
    let doc: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["keys"].as_array().unwrap().len(), 4);
    assert_go_spiffe_accepts(&json);
}

#[test]
fn the_federated_bundles_are_bounded_in_all_when_stored_and_when_sent() {
    let td = |n: &str| TrustDomain::new(n).unwrap();
    let mib = 1024 * 1024;
    let held: Vec<(TrustDomain, usize)> = (0..7).map(|i| (td(&format!("t{i}.org")), mib)).collect();
    let sizes = || held.iter().map(|(t, n)| (t, *n));
    // 7 MiB held: one more MiB fits, a byte more does not.
    assert_eq!(no_room(sizes(), &td("new.org"), mib), None);
    let why = no_room(sizes(), &td("new.org"), mib + 1).unwrap();
    assert!(why.contains("at most 1048576 bytes"), "{why}");
    let why = no_room(sizes(), &td("new.org"), mib - 1 + 1).map(|_| ());
    assert_eq!(why, None);
    // Replacing a held bundle counts it once.
    assert_eq!(no_room(sizes(), &td("t3.org"), mib), None);
    let mut eight = held.clone();
    eight.push((td("t7.org"), mib));
    let why = no_room(eight.iter().map(|(t, n)| (t, *n)), &td("new.org"), 1).unwrap();
    assert!(why.contains("at most 8388608 in all"), "{why}");
    assert_eq!(
        no_room(eight.iter().map(|(t, n)| (t, *n)), &td("t0.org"), mib),
        None
    );

    // A set over the budget (two HA servers each took one) is sent only as
    // far as it fits, in trust-domain order.
    let set: FederatedBundles = (0..10)
        .map(|i| (td(&format!("t{i}.org")), " ".repeat(mib)))
        .collect();
    let sent: Vec<String> = within_budget(&set).map(|(t, _)| t.to_string()).collect();
    assert_eq!(
        sent,
        (0..8).map(|i| format!("t{i}.org")).collect::<Vec<_>>()
    );
    let small: FederatedBundles = [(td("a.org"), "x".to_owned())].into_iter().collect();
    assert_eq!(within_budget(&small).count(), 1);
}

#[tokio::test]
async fn a_fetched_bundle_that_would_overflow_the_federated_set_is_not_taken() {
    let a = Domain::new("a.test").await;
    let b = Domain::new("b.test").await;
    let addr = b.serve(ServeProfile::HttpsSpiffe).await.unwrap();
    let fed = a.federation(&[]).await;
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let r = relationship("b.test", url, spiffe_profile(&b.server_id()));
    let mut bootstrap = (*b.ca.bundle()).clone();
    bootstrap.sequence = 0;
    fed.create_relationship(r, Some(&bootstrap.to_json()))
        .await
        .unwrap();
    let held = fed.refresh(&b.td).await.unwrap();
    // Another server stored bundles up to the budget in the meantime (the
    // store takes them as they come; the check is the servers'), and b.test
    // publishes its next CA: the grown bundle no longer fits.
    let filler = " ".repeat(MAX_FEDERATED_BYTES - held.len());
    a.store
        .put_bundle(&td("filler.test"), &filler)
        .await
        .unwrap();
    b.ca.rotate(SystemTime::now() + DAY * 3 / 5).await.unwrap();
    let err = fed.refresh(&b.td).await.unwrap_err();
    assert!(
        matches!(
            &err,
            FederationError::Refresh {
                source: FetchError::NoRoom(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("at most 8388608 in all"), "{err}");
    // The held bundle stays, and the relationship says why.
    assert_eq!(a.store.get_bundle(&b.td).await.unwrap().unwrap(), held);
    let (_, status) = fed.get_relationship(&b.td).await.unwrap();
    assert!(status.last_error.unwrap().contains("at most"));
    // Room made: the fetch is taken.
    a.store.delete_bundle(&td("filler.test")).await.unwrap();
    let json = fed.refresh(&b.td).await.unwrap();
    assert_eq!(
        Bundle::from_json(b.td.clone(), &json).unwrap(),
        *b.ca.bundle()
    );
}
