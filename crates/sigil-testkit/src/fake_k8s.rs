//! Fake Kubernetes endpoints for tests, fed with the recorded EKS fixtures of
//! `shared/fixtures/k8s`: a kube-apiserver ([`FakeApiServer`]: TokenReview,
//! GET pod, GET node) that mints the projected service account tokens it then
//! authenticates, and a kubelet read-only port ([`FakeKubelet`]: `GET /pods`).
//!
//! Both are real HTTP/1 servers on `127.0.0.1:0` (plain HTTP, which the kube
//! client and sigil's kubelet client accept for `http://` URLs). The agent
//! they describe is the recorded EKS DaemonSet pod `kube-system/aws-node-9t64t`
//! on node `ip-10-0-10-170.ec2.internal` (see the constants).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use aws_lc_rs::signature::KeyPair as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The recorded fixtures (`shared/fixtures/k8s`).
pub const FIXTURES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures/k8s");

/// The namespace of the recorded agent pod.
pub const NAMESPACE: &str = "kube-system";
/// The service account of the recorded agent pod.
pub const SERVICE_ACCOUNT: &str = "aws-node";
/// The recorded agent pod.
pub const POD: &str = "aws-node-9t64t";
/// The recorded agent pod's UID.
pub const POD_UID: &str = "26ad33eb-1244-4226-a6e8-e8ec77195044";
/// The node the recorded agent pod runs on.
pub const NODE: &str = "ip-10-0-10-170.ec2.internal";
/// That node's UID.
pub const NODE_UID: &str = "d06a4e91-b2e9-4907-a60a-66fd3932aaea";
/// That node's IP (the pod's `status.hostIP`).
pub const NODE_IP: &str = "10.0.10.170";
/// The selectors a token of the recorded agent pod proves by itself, under
/// a cluster profile named `eks-dev` (those the API server's answers add
/// depend on the profile, and are not here).
pub const TOKEN_SELECTORS: [&str; 7] = [
    "k8s_psat:cluster:eks-dev",
    "k8s_psat:agent_ns:kube-system",
    "k8s_psat:agent_sa:aws-node",
    "k8s_psat:agent_pod_name:aws-node-9t64t",
    "k8s_psat:agent_pod_uid:26ad33eb-1244-4226-a6e8-e8ec77195044",
    "k8s_psat:agent_node_name:ip-10-0-10-170.ec2.internal",
    "k8s_psat:agent_node_uid:d06a4e91-b2e9-4907-a60a-66fd3932aaea",
];
/// The `iss` of the tokens [`FakeApiServer`] mints (an EKS-style issuer).
pub const ISSUER: &str =
    "https://oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE";
/// The token audience sigil servers expect by default.
pub const DEFAULT_AUDIENCE: &str = "sigil-server";

/// A fixture file's path, `rel` relative to `shared/fixtures/k8s`.
pub fn fixture_path(rel: &str) -> PathBuf {
    Path::new(FIXTURES_DIR).join(rel)
}

/// A fixture file's bytes.
pub fn fixture_bytes(rel: &str) -> anyhow::Result<Vec<u8>> {
    let path = fixture_path(rel);
    std::fs::read(&path).with_context(|| format!("reading fixture {}", path.display()))
}

/// A fixture file parsed as JSON.
pub fn fixture_json(rel: &str) -> anyhow::Result<Value> {
    let bytes = fixture_bytes(rel)?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing fixture {rel}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The API server's error body (`kind: Status`).
fn status_response(code: StatusCode, reason: &str, message: String) -> Response {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

/// A server on `127.0.0.1:0` that can be stopped (connections included).
struct Serving {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Serving {
    async fn start(app: Router) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                eprintln!("fake Kubernetes endpoint stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops listening and closes the connections (idle keep-alive ones at
    /// once; a request in flight is answered first, for at most 5 s).
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------- tokens --

/// What a minted token says. The default is the recorded agent's token for
/// the default audience, valid for 10 minutes, with the node claims of
/// Kubernetes 1.30+, and known to the API server.
#[derive(Debug, Clone)]
pub struct TokenOptions {
    /// `aud`.
    pub audiences: Vec<String>,
    /// Seconds from now to `exp`; negative for a token that already expired.
    pub ttl_secs: i64,
    /// `iss`.
    pub issuer: String,
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
    /// `kubernetes.io.pod.name`.
    pub pod: String,
    /// `kubernetes.io.pod.uid`.
    pub pod_uid: String,
    /// `kubernetes.io.node` (`None`: a token from before Kubernetes 1.30).
    pub node: Option<(String, String)>,
    /// Whether the API server's TokenReview authenticates the token (a
    /// real one refuses tokens whose pod or service account was deleted).
    pub accepted: bool,
}

impl Default for TokenOptions {
    fn default() -> Self {
        Self {
            audiences: vec![DEFAULT_AUDIENCE.to_owned()],
            ttl_secs: 600,
            issuer: ISSUER.to_owned(),
            namespace: NAMESPACE.to_owned(),
            service_account: SERVICE_ACCOUNT.to_owned(),
            pod: POD.to_owned(),
            pod_uid: POD_UID.to_owned(),
            node: Some((NODE.to_owned(), NODE_UID.to_owned())),
            accepted: true,
        }
    }
}

impl TokenOptions {
    /// The default token for another audience.
    pub fn audience(audience: &str) -> Self {
        Self {
            audiences: vec![audience.to_owned()],
            ..Self::default()
        }
    }
}

/// The cluster's service account signing key: P-256, generated per fake.
struct SigningKey {
    key: EncodingKey,
    kid: String,
    jwk: Value,
}

impl SigningKey {
    fn generate() -> anyhow::Result<Self> {
        let alg = &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pair = aws_lc_rs::signature::EcdsaKeyPair::generate(alg)
            .map_err(|_| anyhow::anyhow!("generating a P-256 key failed"))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| anyhow::anyhow!("encoding the P-256 key failed"))?;
        let point = pair.public_key().as_ref();
        anyhow::ensure!(point.len() == 65, "not an uncompressed P-256 point");
        let (x, y) = (&point[1..33], &point[33..]);
        // kube-apiserver's kid is base64url(SHA-256(DER SPKI)); a hash of the
        // point is as unique and as opaque to verifiers.
        let kid =
            URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, point));
        Ok(Self {
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({
                "use": "sig", "kty": "EC", "alg": "ES256", "kid": kid, "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
            }),
            kid,
        })
    }

    fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }
}

/// Claims in the shape of `sa_token/docs_claims_pod_bound_with_node_info.json`.
fn claims_for(opts: &TokenOptions) -> anyhow::Result<Value> {
    let mut c = fixture_json("sa_token/docs_claims_pod_bound_with_node_info.json")?;
    let now = unix_now();
    let exp = now.saturating_add(opts.ttl_secs);
    let iat = now.min(exp) - 60;
    c["aud"] = json!(opts.audiences);
    c["iss"] = json!(opts.issuer);
    c["iat"] = json!(iat);
    c["nbf"] = json!(iat);
    c["exp"] = json!(exp);
    c["jti"] = json!(format!("{:032x}", u128::from_le_bytes(random_16()?)));
    c["sub"] = json!(format!(
        "system:serviceaccount:{}:{}",
        opts.namespace, opts.service_account
    ));
    let k = &mut c["kubernetes.io"];
    k["namespace"] = json!(opts.namespace);
    k["serviceaccount"] = json!({
        "name": opts.service_account, "uid": "0b8c5a2e-7c4b-4a86-9f57-1f7d3c1f2a11",
    });
    k["pod"] = json!({ "name": opts.pod, "uid": opts.pod_uid });
    match &opts.node {
        Some((name, uid)) => k["node"] = json!({ "name": name, "uid": uid }),
        None => {
            if let Some(map) = k.as_object_mut() {
                map.remove("node");
            }
        }
    }
    Ok(c)
}

fn random_16() -> anyhow::Result<[u8; 16]> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(b)
}

// ------------------------------------------------------ fake kube-apiserver --

/// What the fake API server knows.
#[derive(Default)]
struct ApiData {
    /// Tokens the TokenReview authenticates, with their claims.
    tokens: HashMap<String, Value>,
    pods: HashMap<(String, String), Value>,
    nodes: HashMap<String, Value>,
}

#[derive(Default)]
struct ApiState {
    data: Mutex<ApiData>,
    /// `POST tokenreviews`, `GET pod ns/name`, `GET node name`, in order.
    requests: Mutex<Vec<String>>,
}

/// A fake kube-apiserver serving the recorded EKS agent pod and node, and
/// TokenReviews of the tokens it minted.
pub struct FakeApiServer {
    serving: Serving,
    state: Arc<ApiState>,
    signer: SigningKey,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.serving.addr)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Starts the fake with the recorded pod `kube-system/aws-node-9t64t` and
    /// node `ip-10-0-10-170.ec2.internal`, and a fresh signing key.
    pub async fn start() -> anyhow::Result<Self> {
        let state = Arc::new(ApiState::default());
        {
            let mut data = lock(&state.data);
            data.pods.insert(
                (NAMESPACE.to_owned(), POD.to_owned()),
                fixture_json("kubelet/eks131_pod_kube-system_aws-node-9t64t.json")?,
            );
            data.nodes.insert(
                NODE.to_owned(),
                fixture_json("nodes/eks131_node_ip-10-0-10-170_us-east-1a.json")?,
            );
        }
        let app = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_reviews),
            )
            .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
            .route("/api/v1/nodes/{name}", get(get_node))
            .with_state(state.clone());
        Ok(Self {
            serving: Serving::start(app).await?,
            state,
            signer: SigningKey::generate()?,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.serving.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.serving.addr)
    }

    /// Mints a projected service account token signed with the cluster key;
    /// with `opts.accepted` the TokenReview authenticates it.
    pub fn mint_token(&self, opts: &TokenOptions) -> anyhow::Result<String> {
        let claims = claims_for(opts)?;
        let token = self.signer.sign(&claims)?;
        if opts.accepted {
            lock(&self.state.data).tokens.insert(token.clone(), claims);
        }
        Ok(token)
    }

    /// The recorded agent's token ([`TokenOptions::default`]).
    pub fn token(&self) -> anyhow::Result<String> {
        self.mint_token(&TokenOptions::default())
    }

    /// Makes the TokenReview refuse a token from now on.
    pub fn revoke(&self, token: &str) {
        lock(&self.state.data).tokens.remove(token);
    }

    /// Deletes a pod (GET answers 404).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        lock(&self.state.data)
            .pods
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Adds or replaces a pod (`metadata.namespace` and `metadata.name` say where).
    pub fn put_pod(&self, pod: Value) -> anyhow::Result<()> {
        let meta = &pod["metadata"];
        let (Some(ns), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str()) else {
            anyhow::bail!("the pod has no metadata.namespace or metadata.name");
        };
        let key = (ns.to_owned(), name.to_owned());
        lock(&self.state.data).pods.insert(key, pod);
        Ok(())
    }

    /// Adds or replaces a node (`metadata.name` says which).
    pub fn put_node(&self, node: Value) -> anyhow::Result<()> {
        let Some(name) = node["metadata"]["name"].as_str() else {
            anyhow::bail!("the node has no metadata.name");
        };
        let name = name.to_owned();
        lock(&self.state.data).nodes.insert(name, node);
        Ok(())
    }

    /// The cluster's JWKS (`GET /openid/v1/jwks`), for offline verification.
    pub fn jwks_json(&self) -> String {
        json!({ "keys": [self.signer.jwk.clone()] }).to_string()
    }

    /// Writes [`FakeApiServer::jwks_json`] to `dir/jwks.json`.
    pub fn write_jwks(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("jwks.json");
        std::fs::write(&path, self.jwks_json())?;
        Ok(path)
    }

    /// Writes a kubeconfig for this API server into `dir` and returns its
    /// path (for `kube_config_file`). It stays valid after [`stop`](Self::stop),
    /// pointing at a closed port.
    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("kubeconfig-{}", self.serving.addr.port()));
        // JSON is YAML, and needs no indentation care.
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "fake", "cluster": { "server": self.url() } }],
            "users": [{ "name": "sigil-server", "user": { "token": "fake-credential" } }],
            "contexts": [{
                "name": "fake",
                "context": { "cluster": "fake", "user": "sigil-server" },
            }],
            "current-context": "fake",
        });
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        Ok(path)
    }

    /// The requests served so far: `POST tokenreviews`, `GET pod <ns>/<name>`,
    /// `GET node <name>`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state.requests).clone()
    }

    /// Stops the API server: the port is closed and open connections end.
    pub async fn stop(&mut self) {
        self.serving.stop().await;
    }
}

/// A TokenReview answer like kube-apiserver's: the service account
/// authenticator's user info for a known token whose audience matches.
async fn token_reviews(State(s): State<Arc<ApiState>>, body: Bytes) -> Response {
    lock(&s.requests).push("POST tokenreviews".into());
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return status_response(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
    };
    let token = request["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = request["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let claims = lock(&s.data).tokens.get(token).cloned();
    let review = match claims {
        None => unauthenticated(&request, None),
        Some(claims) => review_of(&request, &claims, &wanted),
    };
    match review {
        Ok(review) => json_response(StatusCode::CREATED, &review),
        Err(e) => status_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            e.to_string(),
        ),
    }
}

fn unauthenticated(request: &Value, error: Option<String>) -> anyhow::Result<Value> {
    let mut review =
        fixture_json("tokenreview/SYNTH_response_unauthenticated_kube_apiserver_shape.json")?;
    review["spec"] = request["spec"].clone();
    if let Some(error) = error {
        review["status"]["error"] = json!(error);
    }
    Ok(review)
}

fn review_of(request: &Value, claims: &Value, wanted: &[String]) -> anyhow::Result<Value> {
    let token_aud: Vec<String> = match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    // Without spec.audiences the API server checks its own audience, which
    // is never sigil's; model it as the token's own.
    let audiences: Vec<String> = if wanted.is_empty() {
        token_aud.clone()
    } else {
        wanted
            .iter()
            .filter(|a| token_aud.contains(a))
            .cloned()
            .collect()
    };
    if audiences.is_empty() {
        return unauthenticated(
            request,
            Some(format!(
                "[invalid bearer token, token audiences {token_aud:?} is invalid for the target \
                 audiences {wanted:?}]"
            )),
        );
    }
    if claims["exp"].as_i64().is_some_and(|exp| exp < unix_now()) {
        return unauthenticated(
            request,
            Some("[invalid bearer token, service account token has expired]".into()),
        );
    }
    let k = &claims["kubernetes.io"];
    let mut extra = BTreeMap::new();
    extra.insert(
        "authentication.kubernetes.io/credential-id",
        json!([format!(
            "JTI={}",
            claims["jti"].as_str().unwrap_or_default()
        )]),
    );
    extra.insert(
        "authentication.kubernetes.io/pod-name",
        json!([k["pod"]["name"]]),
    );
    extra.insert(
        "authentication.kubernetes.io/pod-uid",
        json!([k["pod"]["uid"]]),
    );
    if k["node"].is_object() {
        extra.insert(
            "authentication.kubernetes.io/node-name",
            json!([k["node"]["name"]]),
        );
        extra.insert(
            "authentication.kubernetes.io/node-uid",
            json!([k["node"]["uid"]]),
        );
    }
    let ns = k["namespace"].as_str().unwrap_or_default();
    let mut review = fixture_json("tokenreview/SYNTH_response_eks131_aws-node.json")?;
    review["spec"] = request["spec"].clone();
    review["status"]["audiences"] = json!(audiences);
    review["status"]["user"] = json!({
        "username": claims["sub"],
        "uid": k["serviceaccount"]["uid"],
        "groups": [
            "system:serviceaccounts",
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated",
        ],
        "extra": extra,
    });
    Ok(review)
}

async fn get_pod(
    State(s): State<Arc<ApiState>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    lock(&s.requests).push(format!("GET pod {ns}/{name}"));
    let pod = lock(&s.data).pods.get(&(ns, name.clone())).cloned();
    match pod {
        Some(pod) => json_response(StatusCode::OK, &pod),
        None => status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{name}\" not found"),
        ),
    }
}

async fn get_node(State(s): State<Arc<ApiState>>, UrlPath(name): UrlPath<String>) -> Response {
    lock(&s.requests).push(format!("GET node {name}"));
    let node = lock(&s.data).nodes.get(&name).cloned();
    match node {
        Some(node) => json_response(StatusCode::OK, &node),
        None => status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("nodes \"{name}\" not found"),
        ),
    }
}

// ----------------------------------------------------------- fake kubelet --

#[derive(Default)]
struct KubeletState {
    pods_json: Mutex<Bytes>,
    requests: AtomicUsize,
}

/// A fake kubelet read-only port: `GET /pods` answers the pod list it was
/// given, over plain HTTP, and counts the requests.
pub struct FakeKubelet {
    serving: Serving,
    state: Arc<KubeletState>,
}

impl std::fmt::Debug for FakeKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubelet")
            .field("addr", &self.serving.addr)
            .finish_non_exhaustive()
    }
}

impl FakeKubelet {
    /// Starts serving `pods_json` (e.g. [`fixture_bytes`] of
    /// `kubelet/eks131_pods_on_node_ip-10-0-10-170.json`) at `GET /pods`.
    pub async fn start(pods_json: Vec<u8>) -> anyhow::Result<Self> {
        let state = Arc::new(KubeletState {
            pods_json: Mutex::new(Bytes::from(pods_json)),
            requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/pods", get(kubelet_pods))
            .with_state(state.clone());
        Ok(Self {
            serving: Serving::start(app).await?,
            state,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.serving.addr
    }

    /// `http://127.0.0.1:<port>`: the read-only URL (`/pods` is appended by clients).
    pub fn url(&self) -> String {
        format!("http://{}", self.serving.addr)
    }

    /// How many `GET /pods` requests were served.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Serves another pod list from now on (a new pod started, say).
    pub fn set_pods(&self, pods_json: Vec<u8>) {
        *lock(&self.state.pods_json) = Bytes::from(pods_json);
    }

    /// Stops the kubelet: the port is closed and open connections end.
    pub async fn stop(&mut self) {
        self.serving.stop().await;
    }
}

async fn kubelet_pods(State(s): State<Arc<KubeletState>>) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let body = lock(&s.pods_json).clone();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}
