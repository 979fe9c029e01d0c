//! A fake kube-apiserver on loopback with generic object storage: list
//! (with equality label selectors), watch, get, create (409 when the name
//! is taken), replace (409 on a stale resourceVersion), delete (with a
//! resourceVersion precondition), for any core or group resource,
//! namespaced or not. Enough for kube-runtime's watcher and the publisher's
//! and leader election's requests. Failures can be injected per resource.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// (resource version, plural, event type, object)
type Event = (u64, String, &'static str, Value);

#[derive(Default)]
struct Data {
    rv: u64,
    /// plural → (namespace, name) → object
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<Event>,
    /// plural → how many of the next requests on it fail with 500.
    failing: BTreeMap<String, usize>,
    /// (method, path, bearer token) of every request.
    log: Vec<(String, String, String)>,
    /// Resources this server does not serve (404, as a disabled beta API).
    unserved: Vec<String>,
}

struct Shared {
    data: Mutex<Data>,
    events: broadcast::Sender<Event>,
}

/// The fake API server; stopped when dropped.
pub(crate) struct FakeKube {
    shared: Arc<Shared>,
    /// `http://127.0.0.1:<port>`.
    pub(crate) url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn kind_of(plural: &str) -> (&'static str, &'static str) {
    match plural {
        "namespaces" => ("v1", "Namespace"),
        "configmaps" => ("v1", "ConfigMap"),
        "pods" => ("v1", "Pod"),
        "nodes" => ("v1", "Node"),
        "clustertrustbundles" => ("certificates.k8s.io/v1beta1", "ClusterTrustBundle"),
        "leases" => ("coordination.k8s.io/v1", "Lease"),
        "clusterspiffeids" => ("identity.sigil/v1alpha1", "ClusterSPIFFEID"),
        "clusterstaticentries" => ("identity.sigil/v1alpha1", "ClusterStaticEntry"),
        "clusterfederatedtrustdomains" => {
            ("identity.sigil/v1alpha1", "ClusterFederatedTrustDomain")
        }
        other => panic!("fake API: unknown resource {other}"),
    }
}

fn key_of(obj: &Value) -> (String, String) {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_owned(),
        m["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Equality-based label selector `k=v,k2=v2` (what the code sends).
fn selected(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        let v = v.trim_start_matches('=');
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

impl Shared {
    fn emit(&self, d: &mut Data, plural: &str, kind: &'static str, mut obj: Value) -> Value {
        d.rv += 1;
        let (api_version, k) = kind_of(plural);
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(k);
        obj["metadata"]["resourceVersion"] = json!(d.rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{}", d.rv));
        }
        let map = d.objects.entry(plural.to_owned()).or_default();
        if kind == "DELETED" {
            map.remove(&key_of(&obj));
        } else {
            map.insert(key_of(&obj), obj.clone());
        }
        let ev = (d.rv, plural.to_owned(), kind, obj.clone());
        d.history.push(ev.clone());
        let _ = self.events.send(ev);
        obj
    }
}

impl FakeKube {
    /// Starts the server on a free loopback port.
    pub(crate) async fn start() -> Self {
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            data: Mutex::new(Data::default()),
            events,
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { shared, url, task }
    }

    /// Adds or replaces an object as a user would (namespace from its metadata).
    pub(crate) fn put(&self, plural: &str, obj: Value) -> Value {
        let mut d = self.shared.data.lock().unwrap();
        let exists = d
            .objects
            .get(plural)
            .is_some_and(|m| m.contains_key(&key_of(&obj)));
        self.shared.emit(
            &mut d,
            plural,
            if exists { "MODIFIED" } else { "ADDED" },
            obj,
        )
    }

    /// An object, if it exists.
    pub(crate) fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let d = self.shared.data.lock().unwrap();
        d.objects
            .get(plural)
            .and_then(|m| m.get(&(namespace.to_owned(), name.to_owned())))
            .cloned()
    }

    /// Makes the next `n` requests on `plural` fail with 500.
    pub(crate) fn fail_next(&self, plural: &str, n: usize) {
        self.shared
            .data
            .lock()
            .unwrap()
            .failing
            .insert(plural.to_owned(), n);
    }

    /// Stops serving `plural` (404 on every request, as a disabled beta API).
    pub(crate) fn unserve(&self, plural: &str) {
        self.shared
            .data
            .lock()
            .unwrap()
            .unserved
            .push(plural.to_owned());
    }

    /// How many of the injected failures on `plural` are still to come.
    pub(crate) fn failures_left(&self, plural: &str) -> usize {
        let d = self.shared.data.lock().unwrap();
        d.failing.get(plural).copied().unwrap_or(0)
    }

    /// The (method, path) of every write request so far (not GET).
    pub(crate) fn writes(&self) -> Vec<(String, String)> {
        let d = self.shared.data.lock().unwrap();
        d.log
            .iter()
            .filter(|(m, _, _)| m != "GET")
            .map(|(m, p, _)| (m.clone(), p.clone()))
            .collect()
    }

    /// The (method, path) of every request made with this bearer token.
    pub(crate) fn requests_by(&self, token: &str) -> Vec<(String, String)> {
        let d = self.shared.data.lock().unwrap();
        d.log
            .iter()
            .filter(|(_, _, t)| t == token)
            .map(|(m, p, _)| (m.clone(), p.clone()))
            .collect()
    }

    /// A kubeconfig for this server, written into `dir`.
    pub(crate) fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        self.kubeconfig_for(dir, "fake")
    }

    /// A kubeconfig with the bearer token `token` (to tell clients apart).
    pub(crate) fn kubeconfig_for(&self, dir: &std::path::Path, token: &str) -> std::path::PathBuf {
        let path = dir.join(format!("fake-kubeconfig-{token}"));
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "controller", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "controller"}}],
            "current-context": "fake",
        });
        std::fs::write(&path, config.to_string()).unwrap();
        path
    }
}

/// The resource path: (plural, namespace, name).
fn parse_path(path: &str) -> Option<(String, String, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return None,
    };
    let own = |s: &&str| (*s).to_owned();
    Some(match rest {
        [plural] => (own(plural), String::new(), None),
        ["namespaces", name] => ("namespaces".into(), String::new(), Some(own(name))),
        [plural, name] => (own(plural), String::new(), Some(own(name))),
        ["namespaces", ns, plural] => (own(plural), own(ns), None),
        ["namespaces", ns, plural, name] => (own(plural), own(ns), Some(own(name))),
        _ => return None,
    })
}

async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((plural, ns, name)) = parse_path(uri.path()) else {
        return status(404, "NotFound", "no such path");
    };
    let query: BTreeMap<String, String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    {
        let mut d = s.data.lock().unwrap();
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        d.log
            .push((method.to_string(), uri.path().to_owned(), token));
        if d.unserved.contains(&plural) {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        if let Some(n) = d.failing.get_mut(&plural).filter(|n| **n > 0) {
            *n -= 1;
            return status(500, "InternalError", "injected failure");
        }
    }
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    let key = (ns.clone(), name.clone().unwrap_or_default());
    match (method, name.is_some()) {
        (Method::GET, false) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(&s, plural, ns, &query)
        }
        (Method::GET, false) => {
            let d = s.data.lock().unwrap();
            let items: Vec<Value> = d
                .objects
                .get(&plural)
                .map(|m| {
                    m.iter()
                        .filter(|((o_ns, _), _)| ns.is_empty() || *o_ns == ns)
                        .map(|(_, v)| v)
                        .filter(|v| selected(v, query.get("labelSelector")))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let (api_version, kind) = kind_of(&plural);
            ok(
                StatusCode::OK,
                &json!({
                    "apiVersion": api_version, "kind": format!("{kind}List"),
                    "metadata": {"resourceVersion": d.rv.to_string()},
                    "items": items,
                }),
            )
        }
        (Method::GET, true) => {
            let d = s.data.lock().unwrap();
            match d.objects.get(&plural).and_then(|m| m.get(&key)) {
                Some(o) => ok(StatusCode::OK, o),
                None => status(404, "NotFound", "not found"),
            }
        }
        (Method::POST, false) => {
            let mut obj = body;
            if !ns.is_empty() {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let k = key_of(&obj);
            let mut d = s.data.lock().unwrap();
            if !ns.is_empty()
                && !d
                    .objects
                    .get("namespaces")
                    .is_some_and(|m| m.contains_key(&(String::new(), ns.clone())))
            {
                return status(404, "NotFound", "namespace not found");
            }
            if d.objects.get(&plural).is_some_and(|m| m.contains_key(&k)) {
                return status(409, "AlreadyExists", "already exists");
            }
            let stored = s.emit(&mut d, &plural, "ADDED", obj);
            ok(StatusCode::CREATED, &stored)
        }
        (Method::PUT, true) => {
            let mut obj = body;
            if !ns.is_empty() {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let mut d = s.data.lock().unwrap();
            let Some(have) = d.objects.get(&plural).and_then(|m| m.get(&key)).cloned() else {
                return status(404, "NotFound", "not found");
            };
            if obj["metadata"]["resourceVersion"] != have["metadata"]["resourceVersion"] {
                return status(409, "Conflict", "the object has been modified");
            }
            obj["metadata"]["uid"] = have["metadata"]["uid"].clone();
            let stored = s.emit(&mut d, &plural, "MODIFIED", obj);
            ok(StatusCode::OK, &stored)
        }
        (Method::DELETE, true) => {
            let mut d = s.data.lock().unwrap();
            let Some(have) = d.objects.get(&plural).and_then(|m| m.get(&key)).cloned() else {
                return status(404, "NotFound", "not found");
            };
            let want_rv = &body["preconditions"]["resourceVersion"];
            if !want_rv.is_null() && *want_rv != have["metadata"]["resourceVersion"] {
                return status(409, "Conflict", "precondition failed");
            }
            let gone = s.emit(&mut d, &plural, "DELETED", have);
            ok(StatusCode::OK, &gone)
        }
        _ => status(405, "MethodNotAllowed", "not supported by the fake"),
    }
}

fn watch(
    s: &Arc<Shared>,
    plural: String,
    ns: String,
    query: &BTreeMap<String, String>,
) -> Response {
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let selector = query.get("labelSelector").cloned();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let (backlog, mut live) = {
        let d = s.data.lock().unwrap();
        let backlog: Vec<Event> = d
            .history
            .iter()
            .filter(|e| e.0 > since && e.1 == plural)
            .cloned()
            .collect();
        (backlog, s.events.subscribe())
    };
    let wanted = move |e: &Event| {
        e.1 == plural
            && e.0 > since
            && (ns.is_empty() || key_of(&e.3).0 == ns)
            && selected(&e.3, selector.as_ref())
    };
    tokio::spawn(async move {
        let line = |e: &Event| Bytes::from(format!("{}\n", json!({"type": e.2, "object": e.3})));
        for e in backlog.iter().filter(|e| wanted(e)) {
            if tx.send(line(e)).await.is_err() {
                return;
            }
        }
        while let Ok(e) = live.recv().await {
            if wanted(&e) && tx.send(line(&e)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
