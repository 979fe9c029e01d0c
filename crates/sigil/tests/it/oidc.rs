//! OIDC discovery end to end, as a cloud IAM sees it: a server with
//! `jwt_issuer` and `[server.oidc]` over HTTPS (a test CA made with rcgen),
//! a JWT-SVID fetched by a workload through a real agent, and that token
//! verified by an independent JWT library (jwt-compact) from the discovery
//! document and the JWKS it points to, nothing else. Also: forged and
//! malformed tokens refused by the agent's ValidateJWTSVID.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_compact::alg::{Es256, Rsa, RsaPublicKey};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmExt, TimeOptions, UntrustedToken};
use serde_json::{Map, Value, json};
use sigil_proto::workload::ValidateJwtsvidRequest;
use sigil_server::config::{OidcConfig, OidcTls};
use sigil_svid::jwt::JwtKeyType;
use sigil_svid::keys::PrivateKey;
use spiffe::WorkloadApiClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::init;

/// A server and a join-token agent with this process registered as
/// `spiffe://example.org/test`.
pub(crate) struct Stack {
    pub dir: tempfile::TempDir,
    pub server: sigil_server::ServerHandle,
    pub agent: sigil_agent::AgentHandle,
    /// Trusts the test CA of the discovery listener.
    pub roots: Arc<rustls::RootCertStore>,
    /// The configured `jwt_issuer`.
    pub issuer: String,
}

impl Stack {
    pub(crate) fn socket_uri(&self) -> String {
        format!("unix://{}", self.dir.path().join("agent.sock").display())
    }

    pub(crate) fn socket_path(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub(crate) async fn shutdown(self) {
        self.agent.shutdown().await;
        self.server.shutdown().await;
    }
}

/// A test CA and a `localhost` certificate it signed, as PEM files in `dir`.
fn test_ca(dir: &Path) -> (Arc<rustls::RootCertStore>, OidcTls) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sigil OIDC test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let tls = OidcTls {
        cert_file: dir.join("oidc.crt"),
        key_file: dir.join("oidc.key"),
    };
    // The chain a public CA hands out: leaf, then the issuing CA.
    std::fs::write(&tls.cert_file, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(&tls.key_file, leaf_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    (Arc::new(roots), tls)
}

/// Starts the stack; `adjust` edits the server config first.
pub(crate) async fn stack(
    key_type: JwtKeyType,
    adjust: impl FnOnce(&mut sigil_server::ServerConfig),
) -> Stack {
    init();
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("sigil-oidc-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (roots, tls) = test_ca(dir.path());
    let oidc_addr = sigil_testkit::free_addr().unwrap();
    let issuer = format!("https://localhost:{}", oidc_addr.port());
    let td = sigil_types::TrustDomain::new("example.org").unwrap();
    let mut cfg = sigil_server::ServerConfig::with_defaults(td.clone(), dir.path().join("server"));
    cfg.bind_address = sigil_testkit::free_addr().unwrap();
    cfg.admin_socket = dir.path().join("admin.sock");
    cfg.jwt_key_type = key_type;
    cfg.jwt_issuer = Some(issuer.clone());
    cfg.oidc = Some(OidcConfig {
        address: oidc_addr,
        issuer: issuer.clone(),
        jwks_uri: sigil_server::oidc::default_jwks_uri(&issuer),
        tls: Some(tls),
    });
    adjust(&mut cfg);
    let server = sigil_server::start(cfg).await.unwrap();
    let token = server.state().generate_join_token(None).await.unwrap();
    let mut acfg = sigil_agent::AgentConfig::with_defaults(
        td,
        server.agent_api_addr().to_string(),
        dir.path().join("agent"),
    );
    acfg.socket_path = dir.path().join("agent.sock");
    acfg.join_token = Some(token.token);
    acfg.min_backoff = Duration::from_millis(100);
    acfg.max_backoff = Duration::from_secs(1);
    let agent = sigil_agent::start(acfg).await.unwrap();
    let uid = nix::unistd::getuid();
    let entry = sigil_types::Entry::new(
        sigil_server::registry::new_entry_id().unwrap(),
        "spiffe://example.org/test".parse().unwrap(),
        agent.agent_id.clone(),
        sigil_types::Selectors::parse_all([format!("unix:uid:{uid}")]).unwrap(),
    );
    server.state().create_entry(entry).await.unwrap();
    let mut rx = agent.snapshots.clone();
    tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|s| {
            s.svids
                .values()
                .any(|v| v.spiffe_id.as_str() == "spiffe://example.org/test")
        }),
    )
    .await
    .expect("the SVID reaches the agent")
    .unwrap();
    Stack {
        dir,
        server,
        agent,
        roots,
        issuer,
    }
}

/// An HTTP response: status, lower-cased header lines, body.
pub(crate) struct HttpResponse {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// GET of an `https://localhost:<port>/...` URL, trusting only `roots`.
pub(crate) async fn https_get(roots: &Arc<rustls::RootCertStore>, url: &str) -> HttpResponse {
    let rest = url.strip_prefix("https://").expect("an https URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let (host, port) = authority.rsplit_once(':').expect("host:port");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap()))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    if let Err(e) = tls.read_to_end(&mut raw).await {
        // A peer closing without close_notify after a complete response.
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    HttpResponse {
        status,
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// The discovery document of `issuer`, checked against what GCP, AWS and
/// Azure read from it (docs/cloud-identity.md), and the JWKS it points to,
/// checked the same way.
async fn discover(roots: &Arc<rustls::RootCertStore>, issuer: &str) -> (Value, Value) {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let resp = https_get(roots, &url).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(
        resp.headers.contains("content-type: application/json"),
        "{}",
        resp.headers
    );
    assert!(resp.headers.contains("cache-control: public, max-age="));
    let doc: Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(doc["issuer"], issuer, "issuer must equal the tokens' iss");
    let jwks_uri = doc["jwks_uri"].as_str().unwrap();
    assert!(jwks_uri.starts_with("https://"), "{jwks_uri}");
    assert_eq!(doc["response_types_supported"], json!(["id_token"]));
    assert_eq!(doc["subject_types_supported"], json!(["public"]));
    let claims = doc["claims_supported"].as_array().unwrap();
    for c in ["sub", "aud", "exp", "iat", "iss"] {
        assert!(claims.contains(&json!(c)), "claims_supported lacks {c}");
    }

    let resp = https_get(roots, jwks_uri).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(
        resp.headers
            .contains("content-type: application/jwk-set+json"),
        "{}",
        resp.headers
    );
    let jwks: Value = serde_json::from_str(&resp.body).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    let algs = doc["id_token_signing_alg_values_supported"]
        .as_array()
        .unwrap();
    for k in keys {
        for member in ["kty", "kid", "alg"] {
            assert!(k[member].is_string(), "{member} missing in {k}");
        }
        assert_eq!(k["use"], "sig", "{k}");
        assert!(algs.contains(&k["alg"]), "{k} not in {algs:?}");
        for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
            assert!(k.get(private).is_none(), "private member {private} in {k}");
        }
    }
    (doc, jwks)
}

/// What the independent verifier reads besides exp/iat.
#[derive(Debug, Clone, serde::Deserialize)]
struct TokenClaims {
    iss: String,
    sub: String,
    aud: Value,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// Verifies `token` with jwt-compact from the discovery document and JWKS
/// alone: the key found by `kid`, its `alg` matching the token's, the
/// signature, `exp`, `iss` equal to the document's issuer, `aud`
/// containing `audience`. Returns the claims.
fn verify_independently(
    token: &str,
    doc: &Value,
    jwks: &Value,
    audience: &str,
) -> Result<TokenClaims, String> {
    let untrusted = UntrustedToken::new(token).map_err(|e| e.to_string())?;
    let kid = untrusted
        .header()
        .key_id
        .clone()
        .ok_or("the token has no kid")?;
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .ok_or_else(|| format!("kid {kid} is not in the JWKS"))?;
    if key["alg"] != untrusted.algorithm() {
        return Err(format!(
            "token alg {} but key alg {}",
            untrusted.algorithm(),
            key["alg"]
        ));
    }
    let verified = match untrusted.algorithm() {
        "RS256" => {
            let jwk: JsonWebKey<'_> =
                serde_json::from_value(key.clone()).map_err(|e| e.to_string())?;
            let public = RsaPublicKey::try_from(&jwk).map_err(|e| e.to_string())?;
            Rsa::rs256()
                .validator::<TokenClaims>(&public)
                .validate(&untrusted)
        }
        "ES256" => {
            let jwk: JsonWebKey<'_> =
                serde_json::from_value(key.clone()).map_err(|e| e.to_string())?;
            let public =
                <Es256 as Algorithm>::VerifyingKey::try_from(&jwk).map_err(|e| e.to_string())?;
            Es256.validator::<TokenClaims>(&public).validate(&untrusted)
        }
        other => return Err(format!("unexpected alg {other}")),
    }
    .map_err(|e| e.to_string())?;
    let claims = verified.claims();
    claims
        .validate_expiration(&TimeOptions::default())
        .map_err(|e| e.to_string())?;
    if claims.issued_at.is_none() {
        return Err("no iat".into());
    }
    let custom = &claims.custom;
    if custom.iss != doc["issuer"] {
        return Err(format!("iss {} is not the issuer", custom.iss));
    }
    let auds = match &custom.aud {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => vec![],
    };
    if !auds.iter().any(|a| a == audience) {
        return Err(format!("aud {:?} lacks {audience}", custom.aud));
    }
    Ok(custom.clone())
}

/// Fetches a JWT-SVID for `audience` through the agent, as a workload does.
async fn fetch_jwt(stack: &Stack, audience: &str) -> String {
    let client = WorkloadApiClient::connect_to(stack.socket_uri())
        .await
        .unwrap();
    let jwt = client.fetch_jwt_svid([audience], None).await.unwrap();
    jwt.token().to_owned()
}

async fn cloud_verifies_a_workload_token(key_type: JwtKeyType, alg: &str) {
    let stack = stack(key_type, |_| {}).await;
    let (doc, jwks) = discover(&stack.roots, &stack.issuer).await;
    assert_eq!(doc["id_token_signing_alg_values_supported"], json!([alg]));
    assert_eq!(
        doc["jwks_uri"],
        format!("{}/keys", stack.issuer),
        "jwks_uri defaults to <issuer>/keys"
    );
    let active_kid = stack.server.state().ca().active().jwt.kid().to_owned();
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == active_kid.as_str() && k["alg"] == alg)
    );

    let token = fetch_jwt(&stack, "sts.amazonaws.com").await;
    let claims = verify_independently(&token, &doc, &jwks, "sts.amazonaws.com").unwrap();
    assert_eq!(claims.sub, "spiffe://example.org/test");
    assert_eq!(claims.iss, stack.issuer);
    assert_eq!(claims.aud, json!("sts.amazonaws.com"));
    assert!(
        claims.rest.is_empty(),
        "no attribute claims: {:?}",
        claims.rest
    );

    // The verifier is not vacuous: a changed claim, another audience or a
    // foreign issuer are all caught.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    payload["sub"] = json!("spiffe://example.org/admin");
    parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
    assert!(verify_independently(&parts.join("."), &doc, &jwks, "sts.amazonaws.com").is_err());
    assert!(verify_independently(&token, &doc, &jwks, "api://AzureADTokenExchange").is_err());
    let mut other_doc = doc.clone();
    other_doc["issuer"] = json!("https://elsewhere.example.org");
    assert!(verify_independently(&token, &other_doc, &jwks, "sts.amazonaws.com").is_err());
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_verifies_rs256_jwt_svids_from_the_discovery_document_alone() {
    cloud_verifies_a_workload_token(JwtKeyType::Rs256, "RS256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_verifies_es256_jwt_svids_by_default() {
    cloud_verifies_a_workload_token(JwtKeyType::default(), "ES256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_is_only_get_on_two_paths_and_a_prepared_key_is_published_before_it_signs() {
    // A one-minute CA: the JWT authority is prepared 30 s in, activated at 50 s.
    let stack = stack(JwtKeyType::Rs256, |c| {
        c.ca_ttl = Duration::from_secs(60);
        c.default_x509_svid_ttl = Duration::from_secs(30);
        c.agent_svid_ttl = Duration::from_secs(30);
        c.rotation_tick = Duration::from_millis(200);
    })
    .await;
    let base = stack.issuer.clone();
    assert_eq!(
        https_get(&stack.roots, &format!("{base}/")).await.status,
        404
    );
    assert_eq!(
        https_get(&stack.roots, &format!("{base}/.well-known/other"))
            .await
            .status,
        404
    );
    let (_, jwks) = discover(&stack.roots, &base).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    let first = stack.server.state().ca().active().jwt.kid().to_owned();

    // Wait for the successor: published, not yet signing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let next = loop {
        let (_, jwks) = discover(&stack.roots, &base).await;
        let kids: Vec<String> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect();
        if let Some(next) = kids.iter().find(|k| **k != first) {
            break next.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no prepared key appeared"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(stack.server.state().ca().active().jwt.kid(), first);
    let token = fetch_jwt(&stack, "aud-before").await;
    let kid = UntrustedToken::new(&token)
        .unwrap()
        .header()
        .key_id
        .clone()
        .unwrap();
    assert_eq!(kid, first, "the prepared key does not sign yet");
    assert_ne!(next, first);
    stack.shutdown().await;
}

// ------------------------------------------------------------ attack cases

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `header.claims.signature` with `sign` applied to `header.claims`.
fn forge(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// A JWS signature with `key` (RS256 for RSA keys, ES256 for P-256).
fn sign_with(key: &PrivateKey) -> impl FnOnce(&[u8]) -> Vec<u8> + '_ {
    move |msg| {
        use aws_lc_rs::signature::{
            ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        if key.algorithm().is_rsa() {
            let pair = RsaKeyPair::from_pkcs8(key.pkcs8_der()).unwrap();
            let mut sig = vec![0; pair.public_modulus_len()];
            pair.sign(&RSA_PKCS1_SHA256, &rng, msg, &mut sig).unwrap();
            sig
        } else {
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.pkcs8_der())
                .unwrap();
            pair.sign(&rng, msg).unwrap().as_ref().to_vec()
        }
    }
}

fn hs256(secret: &[u8]) -> impl FnOnce(&[u8]) -> Vec<u8> + '_ {
    move |msg| {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
        aws_lc_rs::hmac::sign(&key, msg).as_ref().to_vec()
    }
}

/// The agent's ValidateJWTSVID, called directly (no client-side parsing).
pub(crate) async fn validate_raw(
    socket: &Path,
    audience: &str,
    token: &str,
) -> Result<sigil_proto::workload::ValidateJwtsvidResponse, tonic::Status> {
    let mut client = sigil_client::WorkloadClient::connect(socket).await.unwrap();
    client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: audience.to_owned(),
            svid: token.to_owned(),
        })
        .await
}

async fn forged_tokens_are_refused(key_type: JwtKeyType) {
    let stack = stack(key_type, |_| {}).await;
    let socket = stack.socket_path();
    let active = stack.server.state().ca().active().jwt.clone();
    let real_key = active.key().clone();
    let kid = active.kid().to_owned();
    let alg = active.alg();
    let header = |alg: &str, kid: Option<&str>| {
        let mut h = json!({ "alg": alg, "typ": "JWT" });
        if let Some(k) = kid {
            h["kid"] = json!(k);
        }
        h
    };
    let now = now_secs();
    let good_claims = json!({
        "sub": "spiffe://example.org/test",
        "aud": "api",
        "exp": now + 300,
        "iat": now,
        "iss": stack.issuer,
    });

    // Control: a token made here with the real key and the real kid passes,
    // so every refusal below is about what was changed.
    let control = forge(&header(alg, Some(&kid)), &good_claims, sign_with(&real_key));
    let ok = validate_raw(&socket, "api", &control).await.unwrap();
    assert_eq!(ok.spiffe_id, "spiffe://example.org/test");
    let claims = ok.claims.expect("claims");
    assert_eq!(
        claims.fields["iss"].kind,
        Some(prost_types::value::Kind::StringValue(stack.issuer.clone()))
    );
    // And a real token fetched by the workload passes too.
    let real = fetch_jwt(&stack, "api").await;
    validate_raw(&socket, "api", &real).await.unwrap();

    let spki = real_key.public_key_spki_der();
    let spki_pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let jwk_json = serde_json::to_vec(&active.public_jwk()).unwrap();
    let foreign = sigil_svid::jwt::JwtAuthority::generate_with(
        key_type,
        Duration::from_secs(3600),
        SystemTime::now(),
    )
    .unwrap();
    let other_alg = if alg == "RS256" { "ES256" } else { "RS256" };
    let mut no_aud = good_claims.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    let mut expired = good_claims.clone();
    expired["exp"] = json!(now - 120);
    expired["iat"] = json!(now - 420);
    let mut evil_issuer = good_claims.clone();
    evil_issuer["iss"] = json!("https://evil.example.org");
    let mut float_exp = good_claims.clone();
    float_exp["exp"] = json!((now + 300) as f64 + 0.5);

    let cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            forge(&header("none", Some(&kid)), &good_claims, |_| Vec::new()),
        ),
        (
            "alg NONE, real signature",
            forge(
                &header("NONE", Some(&kid)),
                &good_claims,
                sign_with(&real_key),
            ),
        ),
        (
            "HS256 with the public key (PEM) as secret",
            forge(
                &header("HS256", Some(&kid)),
                &good_claims,
                hs256(spki_pem.as_bytes()),
            ),
        ),
        (
            "HS256 with the public key (DER) as secret",
            forge(&header("HS256", Some(&kid)), &good_claims, hs256(&spki)),
        ),
        (
            "HS256 with the JWK as secret",
            forge(&header("HS256", Some(&kid)), &good_claims, hs256(&jwk_json)),
        ),
        (
            "alg of the other key type",
            forge(
                &header(other_alg, Some(&kid)),
                &good_claims,
                sign_with(&real_key),
            ),
        ),
        (
            "wrong kid",
            forge(
                &header(alg, Some("not-a-published-kid")),
                &good_claims,
                sign_with(&real_key),
            ),
        ),
        (
            "no kid",
            forge(&header(alg, None), &good_claims, sign_with(&real_key)),
        ),
        (
            "missing aud",
            forge(&header(alg, Some(&kid)), &no_aud, sign_with(&real_key)),
        ),
        (
            "expired",
            forge(&header(alg, Some(&kid)), &expired, sign_with(&real_key)),
        ),
        (
            "non-integer exp",
            forge(&header(alg, Some(&kid)), &float_exp, sign_with(&real_key)),
        ),
        (
            "wrong issuer: another issuer's key under our kid",
            forge(
                &header(alg, Some(&kid)),
                &evil_issuer,
                sign_with(foreign.key()),
            ),
        ),
        (
            "wrong issuer: another issuer's key and kid",
            forge(
                &header(alg, Some(foreign.kid())),
                &evil_issuer,
                sign_with(foreign.key()),
            ),
        ),
    ];
    for (name, token) in cases {
        let err = validate_raw(&socket, "api", &token).await.expect_err(name);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
    }
    // The real token for another audience.
    let err = validate_raw(&socket, "someone-else", &real)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_jwt_svid_refuses_forged_rs256_tokens() {
    forged_tokens_are_refused(JwtKeyType::Rs256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_jwt_svid_refuses_forged_es256_tokens() {
    forged_tokens_are_refused(JwtKeyType::Es256).await;
}
