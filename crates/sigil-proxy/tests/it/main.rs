//! Integration tests of sigil-proxy: the policy language, and the tunnel
//! over real sockets with real TLS, fed by a fake Workload API (a real
//! tonic server on a Unix socket in a temp dir) so that tests can push
//! rotations.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod config;
mod policy;
mod tunnel;

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proxy::{ProxyConfig, ProxyHandle, X509Source};
use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_svid::keys::PrivateKey;
use sigil_svid::x509::{SvidRequest, X509Authority};
use sigil_types::{SpiffeId, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// A bound for waits that should take milliseconds.
pub(crate) const PROMPT: Duration = Duration::from_secs(10);

/// A trust domain with its CA.
pub(crate) struct Td {
    pub(crate) name: TrustDomain,
    pub(crate) ca: X509Authority,
}

/// An X509-SVID with its key.
pub(crate) struct Svid {
    pub(crate) id: SpiffeId,
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) key: PrivateKey,
    pub(crate) ca_der: Vec<u8>,
}

impl Td {
    pub(crate) fn new(name: &str) -> Self {
        sigil_svid::install_crypto_provider();
        let name = TrustDomain::new(name).unwrap();
        let ca = X509Authority::generate(&name, Duration::from_secs(24 * 3600), SystemTime::now())
            .unwrap();
        Self { name, ca }
    }

    pub(crate) fn id(&self, path: &str) -> SpiffeId {
        self.name.id_with_path(path).unwrap()
    }

    /// A fresh SVID for `path` with identity attributes.
    pub(crate) fn svid_with(&self, path: &str, attributes: &[(&str, &str)]) -> Svid {
        let id = self.id(path);
        let key = PrivateKey::generate_p256().unwrap();
        let attrs: Vec<(String, String)> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let leaf = self
            .ca
            .sign_svid(
                &SvidRequest {
                    spiffe_id: &id,
                    dns_names: &[],
                    ttl: Duration::from_secs(3600),
                    attributes: &attrs,
                },
                &key.public_key_spki_der(),
                SystemTime::now(),
            )
            .unwrap();
        Svid {
            id,
            chain: vec![leaf],
            key,
            ca_der: self.ca.cert_der().to_vec(),
        }
    }

    pub(crate) fn svid(&self, path: &str) -> Svid {
        self.svid_with(path, &[])
    }

    pub(crate) fn bundle(&self) -> Bundle {
        let mut b = Bundle::new(self.name.clone());
        b.x509_authorities.push(self.ca.cert_der().to_vec());
        b
    }
}

impl Svid {
    /// The Workload API message for this SVID.
    pub(crate) fn message(&self) -> pb::X509svid {
        pb::X509svid {
            spiffe_id: self.id.to_string(),
            x509_svid: self.chain.concat(),
            x509_svid_key: self.key.pkcs8_der().to_vec(),
            bundle: self.ca_der.clone(),
            hint: String::new(),
        }
    }

    /// A response offering this SVID and the bundles of `federated`.
    pub(crate) fn response(&self, federated: &[&Td]) -> pb::X509svidResponse {
        pb::X509svidResponse {
            svids: vec![self.message()],
            crl: Vec::new(),
            federated_bundles: federated
                .iter()
                .map(|td| (td.name.id_string(), td.ca.cert_der().to_vec()))
                .collect(),
        }
    }

    /// A fixed source for test clients (trusting `trusted` besides its own domain).
    pub(crate) fn source(&self, trusted: &[&Td]) -> Arc<X509Source> {
        let mut set = BundleSet::default();
        let own_td = self.id.trust_domain();
        let mut own = Bundle::new(own_td);
        own.x509_authorities.push(self.ca_der.clone());
        set.insert(own);
        for td in trusted {
            set.insert(td.bundle());
        }
        X509Source::fixed(self.chain.clone(), &self.key, set).unwrap()
    }

    pub(crate) fn serial(&self) -> String {
        sigil_svid::x509::cert_info(&self.chain[0])
            .unwrap()
            .serial_hex
    }
}

/// A fake Workload API: streams whatever the test last pushed.
pub(crate) struct FakeApi {
    tx: watch::Sender<Option<pb::X509svidResponse>>,
    pub(crate) socket: String,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

struct FakeService {
    rx: watch::Receiver<Option<pb::X509svidResponse>>,
}

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for FakeService {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        if request
            .metadata()
            .get("workload.spiffe.io")
            .map(|v| v.as_bytes())
            != Some(b"true")
        {
            return Err(Status::invalid_argument("security header missing"));
        }
        let stream =
            tokio_stream::wrappers::WatchStream::new(self.rx.clone()).filter_map(|r| r.map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

impl FakeApi {
    /// Starts serving `first` (or nothing yet).
    pub(crate) async fn start(first: Option<pb::X509svidResponse>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = watch::channel(first);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(FakeService { rx }))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    c.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        Self {
            tx,
            socket: format!("unix://{}", path.display()),
            cancel,
            _dir: dir,
        }
    }

    /// Pushes a new response to every open stream.
    pub(crate) fn push(&self, resp: pb::X509svidResponse) {
        self.tx.send_replace(Some(resp));
    }

    pub(crate) fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts a proxy from config text (the Workload API socket is filled in);
/// files are written into `dir`.
pub(crate) async fn start_proxy(dir: &Path, api: &FakeApi, config: &str) -> ProxyHandle {
    let text = format!("workload_api_socket = {:?}\n{config}", api.socket);
    let path = dir.join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    let cfg = ProxyConfig::parse(&text, &path, None).unwrap();
    tokio::time::timeout(PROMPT, sigil_proxy::start(cfg))
        .await
        .expect("the proxy starts promptly")
        .unwrap()
}

/// A TCP echo server; returns its address.
pub(crate) async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An HTTP server (HTTP/1.1 and HTTP/2 with prior knowledge) that answers
/// with every `x-spiffe-id` header it received, one per line, then the
/// protocol version.
pub(crate) async fn http_echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let mut text = String::new();
                        for v in req.headers().get_all("x-spiffe-id") {
                            text.push_str(&format!("x-spiffe-id: {}\n", v.to_str().unwrap_or("?")));
                        }
                        text.push_str(&format!("version: {:?}\n", req.version()));
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        text.push_str(&format!("body: {}\n", String::from_utf8_lossy(&body)));
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sends one HTTP/1.1 request as text and returns the whole response text.
pub(crate) async fn http_get(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    extra_headers: &str,
) -> String {
    let req =
        format!("GET /hello HTTP/1.1\r\nhost: app\r\n{extra_headers}connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PROMPT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes a policy file.
pub(crate) fn write_policy(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(&p, text).unwrap();
    p
}
