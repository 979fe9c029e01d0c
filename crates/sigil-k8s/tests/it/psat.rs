//! PSAT node attestation against a fake kube-apiserver on 127.0.0.1 that
//! serves the recorded EKS pod, node and TokenReview fixtures.
//!
//! Tokens are minted here with jsonwebtoken in the shape of
//! `sa_token/docs_claims_pod_bound_with_node_info.json`, filled with the EKS
//! agent's values, and signed with keys generated per run: the fixture RSA
//! key is 2046 bits, which aws-lc-rs refuses (see
//! `spire_fixture_key_is_refused_as_too_small`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::KeyPair as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sigil_k8s::psat::{
    ClusterConfig, DEFAULT_AUDIENCE, PsatAttestation, PsatError, PsatVerifier, Verification,
    read_token,
};
use sigil_types::{Selectors, TrustDomain};

// The agent of the recorded EKS cluster: pod kube-system/aws-node-9t64t on
// node ip-10-0-10-170.ec2.internal. `fixture_values_are_the_constants` checks
// each against the fixture files.
const CLUSTER: &str = "eks-dev";
const NS: &str = "kube-system";
const SA: &str = "aws-node";
const POD: &str = "aws-node-9t64t";
const POD_UID: &str = "26ad33eb-1244-4226-a6e8-e8ec77195044";
const NODE: &str = "ip-10-0-10-170.ec2.internal";
const NODE_UID: &str = "d06a4e91-b2e9-4907-a60a-66fd3932aaea";
const NODE_IP: &str = "10.0.10.170";
const REGION: &str = "us-east-1";
const ZONE: &str = "us-east-1a";
const ZONE_ID: &str = "use1-az1";
const OTHER_NODE: &str = "ip-10-0-20-143.ec2.internal";
const OTHER_NODE_UID: &str = "53d6f86e-a84a-4bc7-bd00-b9498a533d3b";
const ISSUER: &str = "https://oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE";

const AGENT_PATH: &str = "/sigil/agent/k8s_psat/eks-dev/d06a4e91-b2e9-4907-a60a-66fd3932aaea";

/// What the token alone proves (offline, API server down).
const TOKEN_SELECTORS: [&str; 7] = [
    "k8s_psat:agent_node_name:ip-10-0-10-170.ec2.internal",
    "k8s_psat:agent_node_uid:d06a4e91-b2e9-4907-a60a-66fd3932aaea",
    "k8s_psat:agent_ns:kube-system",
    "k8s_psat:agent_pod_name:aws-node-9t64t",
    "k8s_psat:agent_pod_uid:26ad33eb-1244-4226-a6e8-e8ec77195044",
    "k8s_psat:agent_sa:aws-node",
    "k8s_psat:cluster:eks-dev",
];

/// Added when the API server answered: node IP (pod `status.hostIP`), the
/// configured label copies, and the location from the providerID-confirmed
/// topology labels.
const API_SELECTORS: [&str; 5] = [
    "k8s_psat:agent_node_ip:10.0.10.170",
    "k8s_psat:agent_node_label:topology.k8s.aws/zone-id:use1-az1",
    "k8s_psat:agent_pod_label:k8s-app:aws-node",
    "k8s_psat:region:us-east-1",
    "k8s_psat:zone:us-east-1a",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/k8s")
}

fn fixture(rel: &str) -> Value {
    let path = fixtures().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn fixture_text(rel: &str) -> String {
    std::fs::read_to_string(fixtures().join(rel)).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn selectors(groups: &[&[&str]]) -> Selectors {
    Selectors::parse_all(groups.iter().flat_map(|g| g.iter())).unwrap()
}

// ------------------------------------------------------------ signing keys --

struct Signer {
    key: EncodingKey,
    alg: Algorithm,
    kid: String,
    jwk: Value,
}

impl Signer {
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }

    fn jwks(signers: &[&Signer]) -> String {
        json!({ "keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>() }).to_string()
    }
}

fn rsa_signer(kid: &str) -> Signer {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8 = pair.as_der().unwrap();
    let public = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    Signer {
        key: EncodingKey::from_rsa_der(pkcs1_of_pkcs8(pkcs8.as_ref())),
        alg: Algorithm::RS256,
        kid: kid.to_owned(),
        jwk: json!({
            "use": "sig", "kty": "RSA", "alg": "RS256", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(&public.n), "e": URL_SAFE_NO_PAD.encode(&public.e),
        }),
    }
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (jsonwebtoken
/// takes RSA keys as PKCS#1 DER; its PEM support is a feature we do not build).
fn pkcs1_of_pkcs8(der: &[u8]) -> &[u8] {
    // Returns (tag, content, rest) of the DER element at the start of `input`.
    fn element(input: &[u8]) -> (u8, &[u8], &[u8]) {
        let (tag, first) = (input[0], input[1]);
        let (len, header) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            let len = input[2..2 + n]
                .iter()
                .fold(0, |acc, b| acc << 8 | usize::from(*b));
            (len, 2 + n)
        };
        (tag, &input[header..header + len], &input[header + len..])
    }
    let (tag, info, _) = element(der);
    assert_eq!(tag, 0x30, "PrivateKeyInfo is a SEQUENCE");
    let (_, _, rest) = element(info); // version
    let (_, _, rest) = element(rest); // algorithm
    let (tag, key, _) = element(rest);
    assert_eq!(tag, 0x04, "privateKey is an OCTET STRING");
    key
}

fn ec_signer(kid: &str) -> Signer {
    let alg = &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pair = aws_lc_rs::signature::EcdsaKeyPair::generate(alg).unwrap();
    let pkcs8 = pair.to_pkcs8v1().unwrap();
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 65, "uncompressed P-256 point");
    Signer {
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        alg: Algorithm::ES256,
        kid: kid.to_owned(),
        jwk: json!({
            "use": "sig", "kty": "EC", "alg": "ES256", "kid": kid, "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        }),
    }
}

/// The cluster's signing key, generated once per test run (RSA generation is slow).
fn cluster_key() -> &'static Signer {
    static KEY: OnceLock<Signer> = OnceLock::new();
    KEY.get_or_init(|| rsa_signer("eks-dev-key-1"))
}

/// Claims of the EKS agent's projected token: the docs fixture
/// (`kubernetes.io` with namespace, node, pod, serviceaccount) filled with the
/// EKS values, valid from now for `ttl` seconds (negative: already expired).
fn agent_claims(aud: &[&str], ttl: i64) -> Value {
    let mut c = fixture("sa_token/docs_claims_pod_bound_with_node_info.json");
    let now = now() as i64;
    c["aud"] = json!(aud);
    c["iss"] = json!(ISSUER);
    c["iat"] = json!(now.min(now + ttl) - 60);
    c["nbf"] = c["iat"].clone();
    c["exp"] = json!(now + ttl);
    c["sub"] = json!(format!("system:serviceaccount:{NS}:{SA}"));
    let k = &mut c["kubernetes.io"];
    k["namespace"] = json!(NS);
    k["serviceaccount"] = json!({ "name": SA, "uid": "0b8c5a2e-7c4b-4a86-9f57-1f7d3c1f2a11" });
    k["pod"] = json!({ "name": POD, "uid": POD_UID });
    k["node"] = json!({ "name": NODE, "uid": NODE_UID });
    c
}

fn agent_token(ttl: i64) -> String {
    cluster_key().sign(&agent_claims(&[DEFAULT_AUDIENCE], ttl))
}

// ------------------------------------------------------ fake kube-apiserver --

/// What the fake API server knows; filled before [`FakeApi::start`].
#[derive(Default)]
struct ApiData {
    /// token → TokenReview answer; unknown tokens get the unauthenticated fixture.
    reviews: HashMap<String, Value>,
    pods: HashMap<(String, String), Value>,
    nodes: HashMap<String, Value>,
    /// Answer every TokenReview with this HTTP status (RBAC missing, outage).
    reviews_fail_with: Option<u16>,
    /// Answer every pod GET with this HTTP status.
    pods_fail_with: Option<u16>,
}

struct ApiState {
    data: ApiData,
    /// `POST tokenreviews`, `GET pod ns/name`, `GET node name`, in order.
    requests: Mutex<Vec<String>>,
    review_bodies: Mutex<Vec<Value>>,
}

struct FakeApi {
    addr: SocketAddr,
    state: Arc<ApiState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_response(code: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The API server's error body (`kind: Status`).
fn status_response(code: u16, reason: &str, message: String) -> Response {
    json_response(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
        }),
    )
}

async fn token_reviews(State(s): State<Arc<ApiState>>, body: Bytes) -> Response {
    s.requests.lock().unwrap().push("POST tokenreviews".into());
    let request: Value = serde_json::from_slice(&body).unwrap();
    s.review_bodies.lock().unwrap().push(request.clone());
    if let Some(code) = s.data.reviews_fail_with {
        return status_response(code, "Forbidden", "tokenreviews is forbidden".into());
    }
    let token = request["spec"]["token"].as_str().unwrap_or_default();
    let answer = s.data.reviews.get(token).cloned().unwrap_or_else(|| {
        fixture("tokenreview/SYNTH_response_unauthenticated_kube_apiserver_shape.json")
    });
    json_response(201, answer)
}

async fn get_pod(
    State(s): State<Arc<ApiState>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    s.requests
        .lock()
        .unwrap()
        .push(format!("GET pod {ns}/{name}"));
    if let Some(code) = s.data.pods_fail_with {
        return status_response(code, "InternalError", "etcd is down".into());
    }
    match s.data.pods.get(&(ns, name.clone())) {
        Some(pod) => json_response(200, pod.clone()),
        None => status_response(404, "NotFound", format!("pods \"{name}\" not found")),
    }
}

async fn get_node(State(s): State<Arc<ApiState>>, UrlPath(name): UrlPath<String>) -> Response {
    s.requests.lock().unwrap().push(format!("GET node {name}"));
    match s.data.nodes.get(&name) {
        Some(node) => json_response(200, node.clone()),
        None => status_response(404, "NotFound", format!("nodes \"{name}\" not found")),
    }
}

impl FakeApi {
    async fn start(data: ApiData) -> Self {
        let state = Arc::new(ApiState {
            data,
            requests: Mutex::default(),
            review_bodies: Mutex::default(),
        });
        let app = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_reviews),
            )
            .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
            .route("/api/v1/nodes/{name}", get(get_node))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state, task }
    }

    fn client(&self) -> kube::Client {
        client_for(self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }
}

fn client_for(addr: SocketAddr) -> kube::Client {
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

/// A client for an API server that is down: the port was bound and released,
/// so connecting is refused.
fn down_client() -> kube::Client {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    client_for(addr)
}

/// The recorded EKS cluster: the aws-node pod and its node, and a TokenReview
/// answer (the SYNTH EKS fixture) for `token` confirming `audiences`.
fn eks_data(token: &str, audiences: &[&str]) -> ApiData {
    let mut data = ApiData::default();
    data.pods.insert(
        (NS.into(), POD.into()),
        fixture("kubelet/eks131_pod_kube-system_aws-node-9t64t.json"),
    );
    data.nodes.insert(
        NODE.into(),
        fixture("nodes/eks131_node_ip-10-0-10-170_us-east-1a.json"),
    );
    data.reviews
        .insert(token.into(), review_for(token, audiences));
    data
}

fn review_for(token: &str, audiences: &[&str]) -> Value {
    let mut review = fixture("tokenreview/SYNTH_response_eks131_aws-node.json");
    review["spec"]["token"] = json!(token);
    review["spec"]["audiences"] = json!(audiences);
    review["status"]["audiences"] = json!(audiences);
    review
}

// ------------------------------------------------------------------ configs --

fn eks_config(verification: Verification) -> ClusterConfig {
    let mut c = ClusterConfig::new(CLUSTER, verification);
    c.service_account_allow_list = vec![format!("{NS}:{SA}")];
    c.allowed_node_label_keys = vec!["topology.k8s.aws/zone-id".into()];
    c.allowed_pod_label_keys = vec!["k8s-app".into()];
    c
}

fn offline(signers: &[&Signer]) -> Verification {
    Verification::OfflineJwks {
        jwks_json: Signer::jwks(signers),
        issuer: ISSUER.into(),
    }
}

fn review_verifier(api: &FakeApi) -> PsatVerifier {
    PsatVerifier::new(eks_config(Verification::TokenReview), Some(api.client())).unwrap()
}

fn offline_verifier(client: Option<kube::Client>) -> PsatVerifier {
    PsatVerifier::new(eks_config(offline(&[cluster_key()])), client).unwrap()
}

fn assert_full(att: &PsatAttestation) {
    assert_eq!(att.agent_path, AGENT_PATH);
    assert_eq!(
        att.selectors,
        selectors(&[&TOKEN_SELECTORS, &API_SELECTORS])
    );
    assert!(att.api_checked);
}

// -------------------------------------------------------------------- tests --

#[test]
fn fixture_values_are_the_constants() {
    let pod = fixture("kubelet/eks131_pod_kube-system_aws-node-9t64t.json");
    assert_eq!(pod["metadata"]["namespace"], NS);
    assert_eq!(pod["metadata"]["name"], POD);
    assert_eq!(pod["metadata"]["uid"], POD_UID);
    assert_eq!(pod["metadata"]["labels"]["k8s-app"], "aws-node");
    assert_eq!(pod["spec"]["serviceAccountName"], SA);
    assert_eq!(pod["spec"]["nodeName"], NODE);
    assert_eq!(pod["status"]["hostIP"], NODE_IP);

    let node = fixture("nodes/eks131_node_ip-10-0-10-170_us-east-1a.json");
    assert_eq!(node["metadata"]["name"], NODE);
    assert_eq!(node["metadata"]["uid"], NODE_UID);
    let labels = &node["metadata"]["labels"];
    assert_eq!(labels["topology.kubernetes.io/region"], REGION);
    assert_eq!(labels["topology.kubernetes.io/zone"], ZONE);
    assert_eq!(labels["topology.k8s.aws/zone-id"], ZONE_ID);
    assert_eq!(
        node["spec"]["providerID"],
        format!("aws:///{ZONE}/i-08736224042c4ee75")
    );

    let other = fixture("nodes/eks131_nodelist_two_zones.json");
    assert_eq!(other["items"][1]["metadata"]["name"], OTHER_NODE);
    assert_eq!(other["items"][1]["metadata"]["uid"], OTHER_NODE_UID);

    let review = fixture("tokenreview/SYNTH_response_eks131_aws-node.json");
    let user = &review["status"]["user"];
    assert_eq!(user["username"], format!("system:serviceaccount:{NS}:{SA}"));
    assert_eq!(
        user["extra"]["authentication.kubernetes.io/pod-name"][0],
        POD
    );
    assert_eq!(
        user["extra"]["authentication.kubernetes.io/pod-uid"][0],
        POD_UID
    );
    assert_eq!(
        user["extra"]["authentication.kubernetes.io/node-name"][0],
        NODE
    );
    assert_eq!(
        user["extra"]["authentication.kubernetes.io/node-uid"][0],
        NODE_UID
    );

    assert_eq!(
        AGENT_PATH,
        format!("/sigil/agent/k8s_psat/{CLUSTER}/{NODE_UID}")
    );
}

#[tokio::test]
async fn token_review_attests_the_eks_agent() {
    let issued = now();
    let token = agent_token(600);
    let api = FakeApi::start(eks_data(&token, &[DEFAULT_AUDIENCE])).await;
    let att = review_verifier(&api).attest(&token).await.unwrap();

    assert_full(&att);
    let exp = att
        .expires_at
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((issued + 600..=issued + 602).contains(&exp), "{exp}");
    let id = TrustDomain::new("example.org")
        .unwrap()
        .id_with_path(&att.agent_path)
        .unwrap();
    assert_eq!(
        id.to_string(),
        format!("spiffe://example.org/sigil/agent/k8s_psat/eks-dev/{NODE_UID}")
    );

    assert_eq!(
        api.requests(),
        [
            "POST tokenreviews",
            "GET pod kube-system/aws-node-9t64t",
            "GET node ip-10-0-10-170.ec2.internal"
        ]
    );
    let body = api.state.review_bodies.lock().unwrap()[0].clone();
    assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(body["spec"]["token"], token.as_str());
    assert_eq!(body["spec"]["audiences"], json!(["sigil-server"]));
}

#[tokio::test]
async fn token_review_without_node_extras_takes_the_node_from_the_pod() {
    // A pre-1.30 cluster: neither the claims nor the TokenReview name the node.
    let mut claims = agent_claims(&[DEFAULT_AUDIENCE], 600);
    claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("node");
    let token = cluster_key().sign(&claims);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    let extra = data.reviews.get_mut(&token).unwrap()["status"]["user"]["extra"]
        .as_object_mut()
        .unwrap();
    extra.remove("authentication.kubernetes.io/node-name");
    extra.remove("authentication.kubernetes.io/node-uid");
    let api = FakeApi::start(data).await;
    assert_full(&review_verifier(&api).attest(&token).await.unwrap());
}

#[tokio::test]
async fn spire_fixture_token_is_reviewed_with_its_fixture_answer() {
    // SPIRE's recorded token and the TokenReview answer for it, unmodified:
    // the answer parses and the flow goes on to the pod, which this API
    // server does not have.
    let token = fixture_text("sa_token/spire_testdata_psat_rs256.jwt");
    let token = token.trim();
    let mut data = ApiData::default();
    data.reviews.insert(
        token.into(),
        fixture("tokenreview/SYNTH_response_for_spire_test_psat.json"),
    );
    let api = FakeApi::start(data).await;
    let mut config = ClusterConfig::new("kind", Verification::TokenReview);
    config.audience = "spire-server".into();
    config.service_account_allow_list = vec!["spire:spire-server".into()];
    let verifier = PsatVerifier::new(config, Some(api.client())).unwrap();
    let err = verifier.attest(token).await.unwrap_err();
    assert!(
        matches!(&err, PsatError::PodNotFound { namespace, name } if namespace == "spire" && name == "spire-server-0"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "pod spire/spire-server-0 named by the token does not exist"
    );
    assert_eq!(
        api.requests(),
        ["POST tokenreviews", "GET pod spire/spire-server-0"]
    );
}

#[tokio::test]
async fn wrong_audience_is_refused() {
    // The token is for the API server itself: refused before any API call.
    let token = cluster_key().sign(&agent_claims(&["https://kubernetes.default.svc"], 600));
    let api = FakeApi::start(eks_data(&token, &[DEFAULT_AUDIENCE])).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(
        matches!(&err, PsatError::WrongAudience { expected } if expected == "sigil-server"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the token's audience does not include \"sigil-server\""
    );
    assert!(api.requests().is_empty());

    // The token says sigil-server, but the TokenReview does not confirm it
    // (the unmodified EKS fixture answers for spire-server).
    let token = agent_token(600);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.reviews.insert(
        token.clone(),
        fixture("tokenreview/SYNTH_response_eks131_aws-node.json"),
    );
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(matches!(err, PsatError::WrongAudience { .. }), "{err:?}");
    assert_eq!(api.requests(), ["POST tokenreviews"]);

    // Offline: the signature is good, the audience is not.
    let token = cluster_key().sign(&agent_claims(&["spire-server"], 600));
    let err = offline_verifier(None).attest(&token).await.unwrap_err();
    assert!(matches!(err, PsatError::WrongAudience { .. }), "{err:?}");
}

#[tokio::test]
async fn expired_token_is_refused() {
    let claims = agent_claims(&[DEFAULT_AUDIENCE], -3600);
    let exp = claims["exp"].as_u64().unwrap();
    let token = cluster_key().sign(&claims);

    let api = FakeApi::start(eks_data(&token, &[DEFAULT_AUDIENCE])).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(
        matches!(err, PsatError::Expired { expired_at } if expired_at == exp),
        "{err:?}"
    );
    assert!(
        api.requests().is_empty(),
        "refused before asking the API server"
    );

    let err = offline_verifier(None).attest(&token).await.unwrap_err();
    assert!(
        matches!(err, PsatError::Expired { expired_at } if expired_at == exp),
        "{err:?}"
    );

    // Within the 60 s leeway it still counts.
    let token = cluster_key().sign(&agent_claims(&[DEFAULT_AUDIENCE], -30));
    offline_verifier(None).attest(&token).await.unwrap();
}

#[tokio::test]
async fn deleted_pod_is_refused() {
    let token = agent_token(600);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.pods.clear();
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(
        matches!(&err, PsatError::PodNotFound { namespace, name } if namespace == NS && name == POD),
        "{err:?}"
    );
    assert_eq!(
        api.requests(),
        ["POST tokenreviews", "GET pod kube-system/aws-node-9t64t"]
    );

    // Deleted and recreated under the same name: another UID.
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    let pod = data.pods.get_mut(&(NS.into(), POD.into())).unwrap();
    pod["metadata"]["uid"] = json!("11111111-2222-3333-4444-555555555555");
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(matches!(err, PsatError::PodUidMismatch { .. }), "{err:?}");
}

#[tokio::test]
async fn service_account_outside_the_allow_list_is_refused() {
    let token = agent_token(600);
    let api = FakeApi::start(eks_data(&token, &[DEFAULT_AUDIENCE])).await;
    let mut config = eks_config(Verification::TokenReview);
    config.service_account_allow_list = vec!["sigil:sigil-agent".into()];
    let verifier = PsatVerifier::new(config, Some(api.client())).unwrap();
    let err = verifier.attest(&token).await.unwrap_err();
    assert!(
        matches!(&err, PsatError::ServiceAccountNotAllowed { service_account, cluster }
            if service_account == "kube-system:aws-node" && cluster == CLUSTER),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "service account kube-system:aws-node may not attest agents in cluster \"eks-dev\""
    );
    assert_eq!(
        api.requests(),
        ["POST tokenreviews"],
        "no pod read for a refused account"
    );

    let mut config = eks_config(offline(&[cluster_key()]));
    config.service_account_allow_list = vec!["sigil:sigil-agent".into()];
    let err = PsatVerifier::new(config, None)
        .unwrap()
        .attest(&token)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PsatError::ServiceAccountNotAllowed { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn token_the_api_server_does_not_authenticate_is_refused() {
    // Unknown to the API server: the unauthenticated fixture shape.
    let token = agent_token(600);
    let api = FakeApi::start(eks_data("some other token", &[DEFAULT_AUDIENCE])).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(matches!(err, PsatError::InvalidToken { .. }), "{err:?}");

    // Rejected with an error text, which stays in the server log.
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.reviews.insert(
        token.clone(),
        fixture("tokenreview/docs_webhook_response_failure_v1.json"),
    );
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(matches!(err, PsatError::InvalidToken { .. }), "{err:?}");
    assert!(
        !err.to_string().contains("Credentials are expired"),
        "{err}"
    );

    // Garbage never reaches the API server.
    let api = FakeApi::start(ApiData::default()).await;
    for garbage in ["", "not-a-jwt", "a.b.c", "a.b"] {
        let err = review_verifier(&api).attest(garbage).await.unwrap_err();
        assert!(
            matches!(err, PsatError::InvalidToken { .. }),
            "{garbage:?}: {err:?}"
        );
    }
    assert!(api.requests().is_empty());
}

#[tokio::test]
async fn token_review_answer_for_another_pod_is_refused() {
    // An authenticator whose answer does not match the token's own claims.
    let token = agent_token(600);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.reviews.get_mut(&token).unwrap()["status"]["user"]["extra"]["authentication.kubernetes.io/pod-uid"] =
        json!(["99999999-2222-3333-4444-555555555555"]);
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(matches!(err, PsatError::InvalidToken { .. }), "{err:?}");
}

#[tokio::test]
async fn pod_on_another_node_than_the_token_says_is_refused() {
    // The TokenReview and the claims say the other node; the pod runs on NODE.
    let mut claims = agent_claims(&[DEFAULT_AUDIENCE], 600);
    claims["kubernetes.io"]["node"] = json!({ "name": OTHER_NODE, "uid": OTHER_NODE_UID });
    let token = cluster_key().sign(&claims);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    let extra = &mut data.reviews.get_mut(&token).unwrap()["status"]["user"]["extra"];
    extra["authentication.kubernetes.io/node-name"] = json!([OTHER_NODE]);
    extra["authentication.kubernetes.io/node-uid"] = json!([OTHER_NODE_UID]);
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(
        matches!(&err, PsatError::PodNotOnNode { token_node, pod_node, .. }
            if token_node == OTHER_NODE && pod_node == NODE),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "pod kube-system/aws-node-9t64t is on node \"ip-10-0-10-170.ec2.internal\", not on \
         \"ip-10-0-20-143.ec2.internal\" as the token says"
    );

    // Same node name, but the node was deleted and registered again since.
    let mut claims = agent_claims(&[DEFAULT_AUDIENCE], 600);
    claims["kubernetes.io"]["node"]["uid"] = json!(OTHER_NODE_UID);
    let token = cluster_key().sign(&claims);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.reviews.get_mut(&token).unwrap()["status"]["user"]["extra"]["authentication.kubernetes.io/node-uid"] =
        json!([OTHER_NODE_UID]);
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(
        matches!(&err, PsatError::NodeUidMismatch { name } if name == NODE),
        "{err:?}"
    );

    // A token requested (TokenRequest API) for a pod that is still pending.
    let token = agent_token(600);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    let pod = data.pods.get_mut(&(NS.into(), POD.into())).unwrap();
    pod["spec"].as_object_mut().unwrap().remove("nodeName");
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(matches!(err, PsatError::PodNotScheduled { .. }), "{err:?}");
}

#[tokio::test]
async fn api_server_down_fails_token_review() {
    let verifier =
        PsatVerifier::new(eks_config(Verification::TokenReview), Some(down_client())).unwrap();
    let err = verifier.attest(&agent_token(600)).await.unwrap_err();
    assert!(
        matches!(&err, PsatError::ApiUnavailable { cluster } if cluster == CLUSTER),
        "{err:?}"
    );
    assert!(err.is_unavailable());
    assert_eq!(
        err.to_string(),
        "the Kubernetes API server of cluster \"eks-dev\" is unreachable; try again later"
    );
}

#[tokio::test]
async fn api_server_refusing_the_server_is_not_unavailable() {
    // 403: the server's RBAC lacks `create tokenreviews`; retrying won't help.
    let token = agent_token(600);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.reviews_fail_with = Some(403);
    let api = FakeApi::start(data).await;
    let err = review_verifier(&api).attest(&token).await.unwrap_err();
    assert!(
        matches!(
            err,
            PsatError::ApiFailed {
                status: Some(403),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_unavailable());
    assert_eq!(
        err.to_string(),
        "the Kubernetes API server of cluster \"eks-dev\" refused the server's request (HTTP 403)"
    );

    // Offline mode degrades only when the API server is unavailable, not when
    // it refuses (`get pods` missing): that is a misconfiguration to surface.
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.pods_fail_with = Some(403);
    let api = FakeApi::start(data).await;
    let err = offline_verifier(Some(api.client()))
        .attest(&token)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PsatError::ApiFailed {
                status: Some(403),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn offline_jwks_attests_while_the_api_server_is_down() {
    let issued = now();
    let token = agent_token(600);
    let token_only = selectors(&[&TOKEN_SELECTORS]);

    let att = offline_verifier(Some(down_client()))
        .attest(&token)
        .await
        .unwrap();
    assert_eq!(att.agent_path, AGENT_PATH);
    assert_eq!(att.selectors, token_only);
    assert!(!att.api_checked);
    let exp = att
        .expires_at
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((issued + 600..=issued + 602).contains(&exp), "{exp}");

    // Without any client: the same, and nothing is asked.
    let att = offline_verifier(None).attest(&token).await.unwrap();
    assert_eq!(att.selectors, token_only);
    assert_eq!(att.agent_path, AGENT_PATH);

    // An API server answering 500 counts as down, too.
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.pods_fail_with = Some(500);
    let api = FakeApi::start(data).await;
    let att = offline_verifier(Some(api.client()))
        .attest(&token)
        .await
        .unwrap();
    assert_eq!(att.selectors, token_only);
}

#[tokio::test]
async fn offline_jwks_reads_pod_and_node_when_the_api_server_answers() {
    let token = agent_token(600);
    let api = FakeApi::start(eks_data(&token, &[DEFAULT_AUDIENCE])).await;
    let att = offline_verifier(Some(api.client()))
        .attest(&token)
        .await
        .unwrap();
    assert_full(&att);
    assert_eq!(
        api.requests(),
        [
            "GET pod kube-system/aws-node-9t64t",
            "GET node ip-10-0-10-170.ec2.internal"
        ],
        "offline mode never asks for a TokenReview"
    );

    // An authoritative "pod gone" counts even offline.
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.pods.clear();
    let api = FakeApi::start(data).await;
    let err = offline_verifier(Some(api.client()))
        .attest(&token)
        .await
        .unwrap_err();
    assert!(matches!(err, PsatError::PodNotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn offline_jwks_accepts_es256_keys() {
    let ec = ec_signer("eks-dev-ec");
    // Several keys (rotation): the token names its key by kid.
    let verifier = PsatVerifier::new(eks_config(offline(&[cluster_key(), &ec])), None).unwrap();
    let token = ec.sign(&agent_claims(&[DEFAULT_AUDIENCE], 600));
    let att = verifier.attest(&token).await.unwrap();
    assert_eq!(att.selectors, selectors(&[&TOKEN_SELECTORS]));
    verifier.attest(&agent_token(600)).await.unwrap();
}

#[tokio::test]
async fn offline_jwks_refuses_forged_and_foreign_tokens() {
    let verifier = offline_verifier(None);
    let invalid = |r: Result<PsatAttestation, PsatError>, why: &str| match r {
        Err(PsatError::InvalidToken { reason }) => assert!(reason.contains(why), "{reason}"),
        other => panic!("{other:?}"),
    };

    // Another key claiming the cluster key's kid.
    let forger = rsa_signer("eks-dev-key-1");
    invalid(
        verifier
            .attest(&forger.sign(&agent_claims(&[DEFAULT_AUDIENCE], 600)))
            .await,
        "signature does not verify",
    );
    // A kid the JWKS does not have.
    let stranger = ec_signer("unknown");
    invalid(
        verifier
            .attest(&stranger.sign(&agent_claims(&[DEFAULT_AUDIENCE], 600)))
            .await,
        "not in the cluster's JWKS",
    );
    // HS256 with the public modulus as the secret (algorithm confusion).
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(cluster_key().kid.clone());
    let secret = cluster_key().jwk["n"].as_str().unwrap().as_bytes().to_vec();
    let hs = jsonwebtoken::encode(
        &header,
        &agent_claims(&[DEFAULT_AUDIENCE], 600),
        &EncodingKey::from_secret(&secret),
    )
    .unwrap();
    invalid(verifier.attest(&hs).await, "RS256, ES256 or ES384");
    // A tampered payload.
    let token = agent_token(600);
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut claims = agent_claims(&[DEFAULT_AUDIENCE], 600);
    claims["kubernetes.io"]["node"]["uid"] = json!(OTHER_NODE_UID);
    parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
    invalid(
        verifier.attest(&parts.join(".")).await,
        "signature does not verify",
    );
    // Another cluster's issuer.
    let mut claims = agent_claims(&[DEFAULT_AUDIENCE], 600);
    claims["iss"] = json!("https://kubernetes.default.svc.cluster.local");
    invalid(
        verifier.attest(&cluster_key().sign(&claims)).await,
        "another issuer",
    );
    // Subject and kubernetes.io claims disagree.
    let mut claims = agent_claims(&[DEFAULT_AUDIENCE], 600);
    claims["sub"] = json!("system:serviceaccount:kube-system:coredns");
    invalid(
        verifier.attest(&cluster_key().sign(&claims)).await,
        "disagree with its subject",
    );
    // A legacy Secret-based token (no exp, aud, pod binding), signed by the cluster key.
    let legacy = fixture("sa_token/spire_comment_claims_legacy_secret_sat.json");
    invalid(
        verifier.attest(&cluster_key().sign(&legacy)).await,
        "not a projected",
    );

    // Not yet valid.
    let mut claims = agent_claims(&[DEFAULT_AUDIENCE], 7200);
    claims["nbf"] = json!(now() + 3600);
    let err = verifier
        .attest(&cluster_key().sign(&claims))
        .await
        .unwrap_err();
    assert!(matches!(err, PsatError::NotYetValid), "{err:?}");

    // Valid signature, but bound to no pod.
    let mut claims = agent_claims(&[DEFAULT_AUDIENCE], 600);
    claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("pod");
    let err = verifier
        .attest(&cluster_key().sign(&claims))
        .await
        .unwrap_err();
    assert!(matches!(err, PsatError::NotPodBound), "{err:?}");
}

#[tokio::test]
async fn offline_token_without_node_claims_needs_the_api_server() {
    // A pre-1.30 token (fixture shape: no kubernetes.io.node), re-issued for the EKS agent.
    let mut claims = fixture("sa_token/spire_comment_claims_psat_pre_1_29.json");
    let template = agent_claims(&[DEFAULT_AUDIENCE], 600);
    for key in ["aud", "exp", "iat", "nbf", "iss", "sub"] {
        claims[key] = template[key].clone();
    }
    claims["kubernetes.io"] = template["kubernetes.io"].clone();
    claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("node");
    let token = cluster_key().sign(&claims);

    let err = offline_verifier(Some(down_client()))
        .attest(&token)
        .await
        .unwrap_err();
    assert!(matches!(err, PsatError::NoNodeBinding), "{err:?}");

    let api = FakeApi::start(eks_data(&token, &[DEFAULT_AUDIENCE])).await;
    assert_full(
        &offline_verifier(Some(api.client()))
            .attest(&token)
            .await
            .unwrap(),
    );
}

#[test]
fn spire_fixture_key_is_refused_as_too_small() {
    // The SPIRE fixture key is 2046 bits. aws-lc-rs (our only provider) can
    // neither sign nor verify with it, so the JWKS is refused at start.
    let jwks = fixture_text("sa_token/DERIVED_spire_testdata_psat_jwks.json");
    let config = ClusterConfig {
        service_account_allow_list: vec!["spire:spire-server".into()],
        ..ClusterConfig::new(
            "kind",
            Verification::OfflineJwks {
                jwks_json: jwks.clone(),
                issuer: "https://kubernetes".into(),
            },
        )
    };
    let err = PsatVerifier::new(config, None).unwrap_err();
    assert!(
        matches!(err, PsatError::Config { key: "jwks", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("2046-bit"), "{err}");

    // What the check spares the operator: the fixture token does not verify.
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&set.keys[0]).unwrap();
    let token = fixture_text("sa_token/spire_testdata_psat_rs256.jwt");
    let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
    validation.set_audience(&["spire-server"]);
    assert!(jsonwebtoken::decode::<Value>(token.trim(), &key, &validation).is_err());
    let pem = fixture_text("sa_token/spire_testdata_psat_signing_key_rsa.pem");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let signing = EncodingKey::from_rsa_der(&STANDARD.decode(body).unwrap());
    assert!(jsonwebtoken::encode(&Header::new(Algorithm::RS256), &json!({}), &signing).is_err());
}

// ------------------------------------------------------------ node labels --

async fn attest_with_node(node: Value, config: ClusterConfig) -> PsatAttestation {
    let token = agent_token(600);
    let mut data = eks_data(&token, &[DEFAULT_AUDIENCE]);
    data.nodes.insert(NODE.into(), node);
    let api = FakeApi::start(data).await;
    PsatVerifier::new(config, Some(api.client()))
        .unwrap()
        .attest(&token)
        .await
        .unwrap()
}

fn eks_node() -> Value {
    fixture("nodes/eks131_node_ip-10-0-10-170_us-east-1a.json")
}

fn locations(att: &PsatAttestation) -> Vec<String> {
    att.selectors
        .to_strings()
        .into_iter()
        .filter(|s| s.starts_with("k8s_psat:region:") || s.starts_with("k8s_psat:zone:"))
        .collect()
}

#[tokio::test]
async fn kubelet_settable_labels_need_the_provider_id_to_become_locations() {
    let config = || eks_config(Verification::TokenReview);

    // The recorded node: topology labels agree with providerID aws:///us-east-1a/….
    let att = attest_with_node(eks_node(), config()).await;
    assert_eq!(
        locations(&att),
        ["k8s_psat:region:us-east-1", "k8s_psat:zone:us-east-1a"]
    );

    // A compromised kubelet relabels its node (NodeRestriction lets it set
    // topology.kubernetes.io/zone); providerID cannot be changed once set.
    let mut node = eks_node();
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-west-1b");
    node["metadata"]["labels"]["topology.kubernetes.io/region"] = json!("eu-west-1");
    let mut verbatim = config();
    verbatim
        .allowed_node_label_keys
        .push("topology.kubernetes.io/zone".into());
    let att = attest_with_node(node, verbatim).await;
    assert!(locations(&att).is_empty(), "{:?}", att.selectors);
    // SPIRE-style label copies stay verbatim: they are the operator's choice.
    assert!(
        att.selectors.to_strings().contains(
            &"k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-west-1b".to_owned()
        )
    );

    // Only the zone lies: the region is still confirmed.
    let mut node = eks_node();
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("us-east-1b");
    let att = attest_with_node(node, config()).await;
    assert_eq!(locations(&att), ["k8s_psat:region:us-east-1"]);

    // No providerID (bare metal, kind): nothing confirms the labels.
    let mut node = eks_node();
    node["spec"].as_object_mut().unwrap().remove("providerID");
    let att = attest_with_node(node, config()).await;
    assert!(locations(&att).is_empty(), "{:?}", att.selectors);
}

#[tokio::test]
async fn node_restriction_labels_are_locations_without_confirmation() {
    // Labels under node-restriction.kubernetes.io/ can only be set by the
    // control plane or an administrator, so they count as they are.
    let mut node = eks_node();
    node["spec"].as_object_mut().unwrap().remove("providerID");
    let labels = node["metadata"]["labels"].as_object_mut().unwrap();
    labels.insert(
        "node-restriction.kubernetes.io/region".into(),
        json!("dc-frankfurt"),
    );
    labels.insert(
        "node-restriction.kubernetes.io/zone".into(),
        json!("rack-7"),
    );
    let mut config = eks_config(Verification::TokenReview);
    config.trusted_node_label_keys = vec![
        "node-restriction.kubernetes.io/region".into(),
        "node-restriction.kubernetes.io/zone".into(),
        "topology.kubernetes.io/zone".into(),
    ];
    let att = attest_with_node(node, config).await;
    assert_eq!(
        locations(&att),
        ["k8s_psat:region:dc-frankfurt", "k8s_psat:zone:rack-7"]
    );

    // Two trusted sources that disagree give no zone at all.
    let mut node = eks_node();
    let labels = node["metadata"]["labels"].as_object_mut().unwrap();
    labels.insert(
        "node-restriction.kubernetes.io/zone".into(),
        json!("rack-7"),
    );
    let mut config = eks_config(Verification::TokenReview);
    config
        .trusted_node_label_keys
        .push("node-restriction.kubernetes.io/zone".into());
    let att = attest_with_node(node, config).await;
    assert_eq!(locations(&att), ["k8s_psat:region:us-east-1"]);
}

// ------------------------------------------------------------ configuration --

#[test]
fn bad_cluster_configs_are_refused_naming_the_key() {
    let key_of = |config: ClusterConfig, client: Option<kube::Client>| match PsatVerifier::new(
        config, client,
    )
    .unwrap_err()
    {
        PsatError::Config { key, .. } => key,
        other => panic!("{other:?}"),
    };
    let jwks = || offline(&[cluster_key()]);

    let mut c = eks_config(jwks());
    c.service_account_allow_list.clear();
    assert_eq!(key_of(c, None), "service_account_allow_list");
    for bad in ["kube-system", ":aws-node", "kube-system:", "a:b:c"] {
        let mut c = eks_config(jwks());
        c.service_account_allow_list = vec![bad.into()];
        assert_eq!(key_of(c, None), "service_account_allow_list", "{bad}");
    }
    for bad in ["", "eks/dev", "eks dev", ".."] {
        let mut c = eks_config(jwks());
        c.name = bad.into();
        assert_eq!(key_of(c, None), "name", "{bad:?}");
    }
    let mut c = eks_config(jwks());
    c.audience = String::new();
    assert_eq!(key_of(c, None), "audience");
    // Location keys must say whether they are a region or a zone.
    for bad in ["topology.k8s.aws/zone-id", "kubernetes.io/hostname"] {
        let mut c = eks_config(jwks());
        c.trusted_node_label_keys.push(bad.into());
        assert_eq!(key_of(c, None), "trusted_node_label_keys", "{bad}");
    }
    assert_eq!(
        key_of(eks_config(Verification::TokenReview), None),
        "verification"
    );
    let offline_with = |jwks_json: &str, issuer: &str| {
        eks_config(Verification::OfflineJwks {
            jwks_json: jwks_json.into(),
            issuer: issuer.into(),
        })
    };
    let good = Signer::jwks(&[cluster_key()]);
    assert_eq!(key_of(offline_with(&good, ""), None), "issuer");
    assert_eq!(key_of(offline_with("{", ISSUER), None), "jwks");
    assert_eq!(key_of(offline_with(r#"{"keys":[]}"#, ISSUER), None), "jwks");
    // A symmetric key would let anyone who read the (public) JWKS sign tokens.
    let oct = r#"{"keys":[{"kty":"oct","kid":"k","k":"c2VjcmV0"}]}"#;
    assert_eq!(key_of(offline_with(oct, ISSUER), None), "jwks");

    // The kube-apiserver's published JWKS (RSA-2048 + P-256) is accepted as is.
    let apiserver = fixture_text("oidc/kube_apiserver_jwks_testdata.json");
    PsatVerifier::new(offline_with(&apiserver, "https://issuer.example.com"), None).unwrap();
}

// ------------------------------------------------------------- agent side --

#[test]
fn agent_reads_the_token_afresh_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigil-agent");
    std::fs::write(&path, "first.token.value\n").unwrap();
    assert_eq!(read_token(&path).unwrap(), "first.token.value");
    // The kubelet rotates the file; the next read sees the new token.
    std::fs::write(&path, "second.token.value").unwrap();
    assert_eq!(read_token(&path).unwrap(), "second.token.value");

    std::fs::write(&path, " \n").unwrap();
    assert!(matches!(
        read_token(&path),
        Err(PsatError::BadTokenFile {
            reason: "is empty",
            ..
        })
    ));
    std::fs::write(&path, "x".repeat(17 * 1024)).unwrap();
    assert!(matches!(
        read_token(&path),
        Err(PsatError::BadTokenFile { .. })
    ));
    let missing = dir.path().join("missing");
    let err = read_token(&missing).unwrap_err();
    assert!(matches!(err, PsatError::TokenFile { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");
}

// ----------------------------------------------------------- hostile tokens --

/// Hostile tokens against offline verification (issue #13): arbitrary text
/// and one-character edits of a signed agent token never attest, and every
/// refusal says why. One verifier and runtime serve all cases (RSA keys are
/// slow to generate).
#[test]
fn edited_or_arbitrary_tokens_never_attest_offline() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let verifier = offline_verifier(None);
    let valid = agent_token(600);
    rt.block_on(verifier.attest(&valid)).unwrap();

    let edit = (any::<u8>(), any::<usize>(), any::<u8>());
    let input = prop_oneof![
        any::<String>().prop_map(|s| (s, None)),
        edit.prop_map(|e| (String::new(), Some(e))),
    ];
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(256)
    });
    let outcome = runner.run(&input, |(text, edit)| {
        let token = match edit {
            None => text,
            Some((op, pos, value)) => {
                String::from_utf8_lossy(&crate::hostile::mutate(valid.as_bytes(), op, pos, value))
                    .into_owned()
            }
        };
        if token == valid {
            return Ok(());
        }
        match rt.block_on(verifier.attest(&token)) {
            Ok(att) => Err(TestCaseError::fail(format!(
                "{token:?} attested as {att:?}"
            )))?,
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    });
    assert!(outcome.is_ok(), "{outcome:?}");
}
