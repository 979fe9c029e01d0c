//! OIDC discovery for cloud IAMs: `GET /.well-known/openid-configuration`
//! and the JWKS it points to (`GET /keys`), so that GCP Workload Identity
//! Federation, AWS IAM OIDC providers and Azure federated credentials can
//! verify JWT-SVIDs (docs/cloud-identity.md).
//!
//! The key set is the JWT half of the server's own bundle, read at every
//! request: each JWT authority that may still verify a live token (prepared,
//! active, and retired until its expiry). A prepared key is published here
//! from the moment it is prepared, a third of a CA lifetime before it signs.
//!
//! The listener speaks HTTPS with a configured certificate, or plain HTTP for
//! a TLS-terminating proxy in front (clouds fetch both documents over HTTPS
//! only).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use sigil_svid::bundle::Bundle;
use sigil_types::Attribute;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::ca::CaManager;
use crate::cert_files::{CertFiles, FileCertResolver};
use crate::error::ServerError;

pub mod config;

pub use config::{
    OidcConfig, OidcTls, UrlError, default_jwks_uri, validate_https_url, validate_issuer,
};

/// Path of the discovery document, below the issuer's path.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Path of the JWKS, below the issuer's path (the default `jwks_uri`).
pub const KEYS_PATH: &str = "/keys";
/// The registered claims of every JWT-SVID (`iss` only with an issuer).
pub const BASE_CLAIMS: [&str; 5] = ["sub", "aud", "exp", "iat", "iss"];
/// Upper bound of the `max-age` both documents are served with.
pub const MAX_CACHE_AGE: Duration = Duration::from_secs(300);

/// The authority (`host[:port]`) and path of a URL checked by
/// [`validate_https_url`]; the path is empty when the URL has none.
fn split_url(url: &str) -> (&str, &str) {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    }
}

/// The JWKS relying parties verify JWT-SVIDs with: every JWT authority of
/// `bundle` as `{kty, kid, alg, use: "sig", n, e | crv, x, y}`. Only public
/// members are copied; a key sigil cannot name an `alg` for is left out.
pub fn jwks(bundle: &Bundle) -> Value {
    let keys: Vec<Value> = published_keys(bundle)
        .into_iter()
        .map(|(_, k)| Value::Object(k))
        .collect();
    json!({ "keys": keys })
}

/// The keys of [`jwks`] with their algorithms.
fn published_keys(bundle: &Bundle) -> Vec<(&'static str, Map<String, Value>)> {
    let mut out = Vec::new();
    for jwk in &bundle.jwt_authorities {
        let (Some(alg), Some(kid)) = (sigil_svid::jwt::jwk_alg(jwk), jwk.kid.as_ref()) else {
            tracing::debug!(kty = %jwk.kty, "JWT authority without kid or known alg left out of the JWKS");
            continue;
        };
        let members: &[(&str, &Option<String>)] = match jwk.kty.as_str() {
            "RSA" => &[("n", &jwk.n), ("e", &jwk.e)],
            "EC" => &[("crv", &jwk.crv), ("x", &jwk.x), ("y", &jwk.y)],
            _ => continue,
        };
        let mut key = Map::new();
        key.insert("kty".into(), jwk.kty.clone().into());
        key.insert("kid".into(), kid.clone().into());
        key.insert("alg".into(), alg.into());
        key.insert("use".into(), "sig".into());
        let mut complete = true;
        for (name, value) in members {
            match value {
                Some(v) => {
                    key.insert((*name).into(), v.clone().into());
                }
                None => complete = false,
            }
        }
        if complete {
            out.push((alg, key));
        }
    }
    out
}

/// The discovery document: `issuer`, `jwks_uri`, `authorization_endpoint`
/// (empty: there is no interactive flow), `response_types_supported`
/// (`id_token`), `subject_types_supported` (`public`),
/// `id_token_signing_alg_values_supported` (the sorted algorithms of the
/// keys published now) and `claims_supported` (the registered claims and
/// every attribute claim, docs/attributes.md).
pub fn discovery_document(issuer: &str, jwks_uri: &str, bundle: &Bundle) -> Value {
    let mut algs: Vec<&str> = published_keys(bundle).iter().map(|(a, _)| *a).collect();
    algs.sort_unstable();
    algs.dedup();
    let claims: Vec<&str> = BASE_CLAIMS
        .into_iter()
        .chain(Attribute::ALL.iter().map(|a| a.as_str()))
        .collect();
    json!({
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
        "claims_supported": claims,
    })
}

/// What the HTTP handler serves.
struct Endpoints {
    issuer: String,
    jwks_uri: String,
    discovery_paths: Vec<String>,
    keys_paths: Vec<String>,
    cache_control: HeaderValue,
    ca: Arc<CaManager>,
}

impl Endpoints {
    fn new(config: &OidcConfig, ca: Arc<CaManager>, ca_ttl: Duration) -> Self {
        let (issuer_host, issuer_path) = split_url(&config.issuer);
        let prefix = issuer_path.trim_end_matches('/');
        // At the issuer's path (what clouds fetch), and at the root for a
        // proxy that strips the issuer's path before forwarding.
        let mut discovery_paths = vec![format!("{prefix}{DISCOVERY_PATH}")];
        let mut keys_paths = vec![format!("{prefix}{KEYS_PATH}")];
        if !prefix.is_empty() {
            discovery_paths.push(DISCOVERY_PATH.to_owned());
            keys_paths.push(KEYS_PATH.to_owned());
        }
        let (jwks_host, jwks_path) = split_url(&config.jwks_uri);
        if jwks_host == issuer_host
            && !jwks_path.is_empty()
            && !keys_paths.iter().any(|p| p == jwks_path)
        {
            keys_paths.push(jwks_path.to_owned());
        }
        // A new key is published a third of a CA lifetime before it signs;
        // a cache shorter than half of that can never hide it from a
        // verifier at the moment it is needed.
        let max_age = MAX_CACHE_AGE.min(ca_ttl / 6).as_secs();
        let cache_control = HeaderValue::from_str(&format!("public, max-age={max_age}"))
            .unwrap_or(HeaderValue::from_static("no-cache"));
        Self {
            issuer: config.issuer.clone(),
            jwks_uri: config.jwks_uri.clone(),
            discovery_paths,
            keys_paths,
            cache_control,
            ca,
        }
    }
}

async fn handle(State(ep): State<Arc<Endpoints>>, req: Request<Body>) -> Response {
    let path = req.uri().path();
    let discovery = ep.discovery_paths.iter().any(|p| p == path);
    if !discovery && !ep.keys_paths.iter().any(|p| p == path) {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "method not allowed\n",
        )
            .into_response();
    }
    let bundle = ep.ca.bundle();
    let (content_type, body) = if discovery {
        (
            "application/json",
            discovery_document(&ep.issuer, &ep.jwks_uri, &bundle),
        )
    } else {
        ("application/jwk-set+json", jwks(&bundle))
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, ep.cache_control.clone()),
            // Public documents; browsers-based tools may read them too.
            (
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            ),
        ],
        body.to_string(),
    )
        .into_response()
}

/// Binds the OIDC discovery listener of `config` and returns its address
/// and the future that serves it until `cancel`. A certificate or key that
/// cannot be used, or an address that cannot be bound, fails here, before
/// anything is served.
pub async fn bind(
    config: &OidcConfig,
    ca: Arc<CaManager>,
    ca_ttl: Duration,
    cancel: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), ServerError> {
    let tls = config.tls.as_ref().map(tls_config).transpose()?;
    let listener = TcpListener::bind(config.address).await.map_err(|e| {
        ServerError::Io(std::io::Error::new(
            e.kind(),
            format!(
                "cannot bind the OIDC discovery address {}: {e}",
                config.address
            ),
        ))
    })?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .fallback(handle)
        .with_state(Arc::new(Endpoints::new(config, ca, ca_ttl)));
    match &tls {
        Some(_) => tracing::info!(
            address = %addr,
            issuer = %config.issuer,
            "serving OIDC discovery over HTTPS"
        ),
        None => tracing::warn!(
            address = %addr,
            issuer = %config.issuer,
            "serving OIDC discovery over PLAIN HTTP (no cert_file/key_file): clouds fetch \
             the issuer over HTTPS only, so a TLS-terminating proxy must serve this \
             listener as the issuer URL"
        ),
    }
    let serve = async move {
        let result = match tls {
            Some(tls) => {
                let incoming = TlsListener::start(listener, tls, cancel.clone());
                axum::serve(incoming, app)
                    .with_graceful_shutdown(cancel.cancelled_owned())
                    .await
            }
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(cancel.cancelled_owned())
                    .await
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "OIDC discovery listener stopped");
        }
    };
    Ok((addr, serve))
}

/// The rustls config of the HTTPS listener: the configured certificate, no
/// client certificates, HTTP/1.1.
fn tls_config(tls: &OidcTls) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let resolver = FileCertResolver::new(CertFiles {
        cert_file: tls.cert_file.clone(),
        key_file: tls.key_file.clone(),
        cert_key: "server.oidc.cert_file",
        key_key: "server.oidc.key_file",
    })?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Finished TLS connections for axum; handshakes run concurrently, each
/// bounded in time, so a slow client never blocks others.
struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        cancel: CancellationToken,
    ) -> Self {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let rx = crate::tls::accept_tls(listener, config, cancel, "OIDC discovery");
        Self { rx, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // Cancelled: nothing more will come; axum's graceful shutdown ends the serve.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_store::{SqliteStore, Store};
    use sigil_svid::jwt::{JwtAuthority, JwtKeyType};
    use sigil_types::TrustDomain;
    use std::path::Path;
    use std::time::SystemTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn bundle_of(authorities: &[&JwtAuthority]) -> Bundle {
        let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
        b.jwt_authorities = authorities.iter().map(|a| a.public_jwk()).collect();
        b
    }

    fn authority(kt: JwtKeyType) -> JwtAuthority {
        JwtAuthority::generate_with(kt, Duration::from_secs(3600), SystemTime::now()).unwrap()
    }

    #[test]
    fn issuers_and_jwks_uris_are_https_without_query_or_fragment() {
        for good in [
            "https://oidc.example.org",
            "https://oidc.example.org/",
            "https://oidc.example.org:8443/td/prod",
        ] {
            assert_eq!(validate_issuer(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("http://oidc.example.org", "https://"),
            ("oidc.example.org", "https://"),
            ("https://", "no host"),
            ("https:///path", "no host"),
            ("https://user@oidc.example.org", "user information"),
            ("https://oidc.example.org/?a=1", "query"),
            ("https://oidc.example.org/#f", "fragment"),
            ("https://oidc.example.org/a b", "whitespace"),
        ] {
            let err = validate_issuer(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(
            default_jwks_uri("https://oidc.example.org"),
            "https://oidc.example.org/keys"
        );
        assert_eq!(
            default_jwks_uri("https://oidc.example.org/td/"),
            "https://oidc.example.org/td/keys"
        );
    }

    #[test]
    fn jwks_publishes_ec_and_rsa_keys_with_kid_alg_and_use_sig_only() {
        let ec = authority(JwtKeyType::Es256);
        let rsa = authority(JwtKeyType::Rs256);
        let doc = jwks(&bundle_of(&[&ec, &rsa]));
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        let ec_key = keys[0].as_object().unwrap();
        let mut names: Vec<&str> = ec_key.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["alg", "crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(ec_key["kty"], "EC");
        assert_eq!(ec_key["alg"], "ES256");
        assert_eq!(ec_key["use"], "sig");
        assert_eq!(ec_key["crv"], "P-256");
        assert_eq!(ec_key["kid"], ec.kid());
        let rsa_key = keys[1].as_object().unwrap();
        let mut names: Vec<&str> = rsa_key.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["alg", "e", "kid", "kty", "n", "use"]);
        assert_eq!(rsa_key["kty"], "RSA");
        assert_eq!(rsa_key["alg"], "RS256");
        assert_eq!(rsa_key["kid"], rsa.kid());
        assert_eq!(rsa_key["e"], "AQAB");
        // A 2048-bit modulus: 256 bytes, 342 base64url characters.
        assert_eq!(rsa_key["n"].as_str().unwrap().len(), 342);
        let public = rsa.public_jwk();
        assert_eq!(rsa_key["n"].as_str(), public.n.as_deref());
        // No private member ever appears.
        let text = doc.to_string();
        for private in ["\"d\"", "\"p\"", "\"q\"", "\"dp\"", "\"dq\"", "\"qi\""] {
            assert!(!text.contains(private), "{text}");
        }
    }

    #[test]
    fn keys_without_a_known_alg_or_kid_are_left_out() {
        let ec = authority(JwtKeyType::Es256);
        let mut b = bundle_of(&[&ec]);
        let mut no_kid = ec.public_jwk();
        no_kid.kid = None;
        let mut odd = ec.public_jwk();
        odd.crv = Some("P-521".into());
        b.jwt_authorities.extend([no_kid, odd]);
        let doc = jwks(&b);
        assert_eq!(doc["keys"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn discovery_document_has_what_clouds_read() {
        let ec = authority(JwtKeyType::Es256);
        let rsa = authority(JwtKeyType::Rs256);
        let doc = discovery_document(
            "https://oidc.example.org",
            "https://oidc.example.org/keys",
            &bundle_of(&[&rsa, &ec, &authority(JwtKeyType::Rs256)]),
        );
        assert_eq!(doc["issuer"], "https://oidc.example.org");
        assert_eq!(doc["jwks_uri"], "https://oidc.example.org/keys");
        assert_eq!(doc["authorization_endpoint"], "");
        assert_eq!(doc["response_types_supported"], json!(["id_token"]));
        assert_eq!(doc["subject_types_supported"], json!(["public"]));
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["ES256", "RS256"])
        );
        assert_eq!(
            doc["claims_supported"],
            json!([
                "sub",
                "aud",
                "exp",
                "iat",
                "iss",
                "cluster",
                "region",
                "zone",
                "node_name",
                "namespace",
                "service_account"
            ])
        );
        // Only the algorithms of the keys actually published.
        let doc = discovery_document("https://i", "https://i/keys", &bundle_of(&[&ec]));
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["ES256"])
        );
    }

    /// One HTTP/1.1 exchange; returns the status line, headers and body.
    async fn http(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: oidc.example.org\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap();
        (
            status.to_owned(),
            headers.to_ascii_lowercase(),
            body.to_owned(),
        )
    }

    #[tokio::test]
    async fn serves_both_documents_under_the_issuer_path_and_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("db.sqlite"))
                .await
                .unwrap(),
        );
        let t0 = SystemTime::now();
        let ttl = Duration::from_secs(600);
        let ca = CaManager::load(
            TrustDomain::new("example.org").unwrap(),
            store,
            "test-instance",
            &dir.path().join("keys"),
            ttl,
            Duration::from_secs(300),
            JwtKeyType::Rs256,
            t0,
        )
        .await
        .unwrap();
        let config = OidcConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            issuer: "https://oidc.example.org/td".into(),
            jwks_uri: "https://oidc.example.org/td/keys".into(),
            tls: None,
        };
        let cancel = CancellationToken::new();
        let (addr, serve) = bind(&config, ca.clone(), ttl, cancel.clone())
            .await
            .unwrap();
        let task = tokio::spawn(serve);

        let (status, headers, body) =
            http(addr, "GET", "/td/.well-known/openid-configuration").await;
        assert!(status.contains("200"), "{status}");
        assert!(
            headers.contains("content-type: application/json"),
            "{headers}"
        );
        assert!(
            headers.contains("cache-control: public, max-age=100"),
            "{headers}"
        );
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["issuer"], "https://oidc.example.org/td");
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["RS256"])
        );
        // A proxy that strips the issuer's path reaches the same documents.
        let (status, _, same) = http(addr, "GET", "/.well-known/openid-configuration").await;
        assert!(status.contains("200"), "{status}");
        assert_eq!(same, body);

        let (status, headers, body) = http(addr, "GET", "/td/keys").await;
        assert!(status.contains("200"), "{status}");
        assert!(
            headers.contains("content-type: application/jwk-set+json"),
            "{headers}"
        );
        let keys: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
        assert_eq!(keys["keys"][0]["kid"], ca.active().jwt.kid());

        // At half-life the next key is published before it signs.
        ca.rotate(t0 + Duration::from_secs(310)).await.unwrap();
        let (_, _, body) = http(addr, "GET", "/keys").await;
        let keys: Value = serde_json::from_str(&body).unwrap();
        let kids: Vec<&str> = keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids.len(), 2);
        assert!(kids.contains(&ca.active().jwt.kid()));

        let (status, _, _) = http(addr, "GET", "/td/other").await;
        assert!(status.contains("404"), "{status}");
        let (status, headers, _) = http(addr, "POST", "/td/keys").await;
        assert!(status.contains("405"), "{status}");
        assert!(headers.contains("allow: get, head"), "{headers}");
        let (status, headers, body) = http(addr, "HEAD", "/td/keys").await;
        assert!(status.contains("200"), "{status}");
        assert!(headers.contains("application/jwk-set+json"), "{headers}");
        assert!(body.is_empty());

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn unusable_certificate_files_stop_the_start_and_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        let a = sigil_svid::x509::X509Authority::generate(
            &TrustDomain::new("example.org").unwrap(),
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
        let other = sigil_svid::keys::PrivateKey::generate_p256().unwrap();
        std::fs::write(
            &cert,
            sigil_svid::pem::certs_to_pem(&[a.cert_der().to_vec()]),
        )
        .unwrap();
        std::fs::write(&key, other.to_pem().as_bytes()).unwrap();
        let tls = |c: &Path, k: &Path| OidcTls {
            cert_file: c.to_owned(),
            key_file: k.to_owned(),
        };
        for (t, want) in [
            (
                tls(&dir.path().join("missing.pem"), &key),
                "server.oidc.cert_file",
            ),
            (tls(&key, &key), "server.oidc.cert_file"),
            (tls(&cert, &cert), "server.oidc.key_file"),
            (tls(&cert, &key), "server.oidc.key_file"),
        ] {
            let err = tls_config(&t).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should name {want}");
        }
        std::fs::write(&key, a.key().to_pem().as_bytes()).unwrap();
        assert!(tls_config(&tls(&cert, &key)).is_ok());
    }
}
