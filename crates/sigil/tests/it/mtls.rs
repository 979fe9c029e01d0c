//! Two workloads with sigil SVIDs complete mutual TLS using `spiffe-rustls`,
//! each authorizing the other's SPIFFE ID; `openssl verify` accepts a
//! fetched chain against the bundle.

use std::sync::Arc;

use spiffe::{X509Source, X509Svid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster_with_me;

/// Picks the SVID with a given hint.
struct ByHint(&'static str);

impl spiffe::x509_source::SvidPicker for ByHint {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0))
    }
}

async fn source(uri: &str, hint: &'static str) -> X509Source {
    X509Source::builder()
        .endpoint(uri)
        .picker(ByHint(hint))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_complete_mutual_tls_with_spiffe_rustls() {
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let uid = nix::unistd::getuid();
    let sel = format!("unix:uid:{uid}");
    let fe = cluster
        .register_with("/frontend", &[&sel], |e| e.hint = "frontend".into())
        .await
        .unwrap();
    let be = cluster
        .register_with("/backend", &[&sel], |e| e.hint = "backend".into())
        .await
        .unwrap();
    cluster.wait_for_svid(&fe.spiffe_id).await.unwrap();
    cluster.wait_for_svid(&be.spiffe_id).await.unwrap();

    let uri = cluster.socket_uri();
    let server_src = source(&uri, "backend").await;
    let client_src = source(&uri, "frontend").await;

    let server_cfg = spiffe_rustls::mtls_server(server_src)
        .authorize(spiffe_rustls::authorizer::exact(["spiffe://example.org/frontend"]).unwrap())
        .build()
        .unwrap();
    let client_cfg = spiffe_rustls::mtls_client(client_src.clone())
        .authorize(spiffe_rustls::authorizer::exact(["spiffe://example.org/backend"]).unwrap())
        .build()
        .unwrap();
    // A client that expects someone else must be refused.
    let wrong_cfg = spiffe_rustls::mtls_client(client_src)
        .authorize(spiffe_rustls::authorizer::exact(["spiffe://example.org/database"]).unwrap())
        .build()
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let mut served = 0;
        while served < 2 {
            let (tcp, _) = listener.accept().await.unwrap();
            served += 1;
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let id = sigil_svid::x509::cert_info(peer.as_ref())
                    .unwrap()
                    .spiffe_id
                    .unwrap();
                let mut buf = [0u8; 5];
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(format!("hello {id}").as_bytes())
                    .await
                    .unwrap();
                tls.shutdown().await.unwrap();
            }
        }
    });

    let name = rustls_pki_types::ServerName::try_from("backend.local").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
    tls.write_all(b"hello").await.unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "hello spiffe://example.org/frontend");

    let connector = tokio_rustls::TlsConnector::from(Arc::new(wrong_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        connector.connect(name, tcp).await.is_err(),
        "a client expecting another server ID must fail the handshake"
    );
    server.await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_verify_accepts_the_fetched_chain() {
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let out = tempfile::tempdir().unwrap();
    let status = assert_cmd::Command::cargo_bin("sigil")
        .unwrap()
        .args(["svid", "fetch", "--write"])
        .arg(out.path())
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.socket_uri())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let svid = out.path().join("svid.0.pem");
    let bundle = out.path().join("bundle.0.pem");
    for purpose in ["sslclient", "sslserver"] {
        let v = std::process::Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(&bundle)
            .arg(&svid)
            .output()
            .expect("openssl is installed");
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(
            v.status.success() && text.contains(": OK"),
            "openssl verify ({purpose}): {text} {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // A bundle of another trust domain must not verify it.
    let other = sigil_svid::x509::X509Authority::generate(
        &sigil_types::TrustDomain::new("other.org").unwrap(),
        std::time::Duration::from_secs(3600),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let other_pem = out.path().join("other.pem");
    std::fs::write(
        &other_pem,
        sigil_svid::pem::certs_to_pem(&[other.cert_der().to_vec()]),
    )
    .unwrap();
    let v = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&other_pem)
        .arg(&svid)
        .output()
        .unwrap();
    assert!(!v.status.success());
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(out.path().join("svid.0.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    cluster.shutdown().await;
}
