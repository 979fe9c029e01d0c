//! The RBAC shipped under `deploy/` against the Kubernetes requests the code
//! makes: every request is granted, and nothing else is (least privilege).
//!
//! The single source of truth is the pair of lists below, [`SERVER_API_CALLS`]
//! and [`AGENT_KUBELET_CALLS`]. Two tests keep them honest against the code:
//! they read `src/psat.rs` (every `Api<T>` it binds and every method called
//! on it) and `src/kubelet.rs` (every request method and kubelet path), and
//! fail when the code makes a request the lists lack, or when kube API calls
//! turn up in another file of the workspace (a further test checks that the
//! scanner sees a new call and refuses code it cannot follow). Two more read
//! the ClusterRoles of `deploy/kubernetes/*.yaml` and of the Helm chart's
//! `templates/rbac.yaml` and compare the grants of each service account,
//! through its bindings and the containers that run under it, with the lists,
//! both ways. The last one checks that the plain manifests wire the agent to
//! the server (allow list, audience, cluster name, trust domain, service
//! address).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One RBAC permission: (API group, resource or `resource/subresource`, verb).
type Grant = (&'static str, &'static str, &'static str);

/// Every API server request of the server's PSAT verifier
/// (`crates/sigil-k8s/src/psat.rs`, TokenReview mode; offline JWKS mode uses
/// a subset).
const SERVER_API_CALLS: &[Grant] = &[
    // `token_review`: `Api::<TokenReview>::all(..).create(..)`.
    ("authentication.k8s.io", "tokenreviews", "create"),
    // `read_pod_and_node`: `Api::<Pod>::namespaced(..).get_opt(..)`.
    ("", "pods", "get"),
    // `read_pod_and_node`: `Api::<Node>::all(..).get_opt(..)`.
    ("", "nodes", "get"),
];

/// The agent's one Kubernetes request, `GET /pods` on its own kubelet
/// (`crates/sigil-k8s/src/kubelet.rs`), which the kubelet authorizes as `get`
/// on `nodes/pods` (KubeletFineGrainedAuthz, on by default from 1.33). The
/// agent never calls the API server.
const AGENT_KUBELET_CALLS: &[Grant] = &[("", "nodes/pods", "get")];

/// What Kubernetes 1.32 and older check for the same request instead. Only
/// the chart grants it, behind `agent.legacyKubeletAuthorization`; the plain
/// manifests carry it commented out.
const AGENT_LEGACY_KUBELET: Grant = ("", "nodes/proxy", "get");

/// Source paths (prefixes) whose kube API use is not checked here: the entry
/// controller (`src/controller.rs`, `src/controller/`) is a component of its
/// own, with its own Kubernetes identity, and `deploy/kubernetes` does not
/// deploy it. When it gets manifests, give it a list like the two above.
const OTHER_COMPONENTS: &[&str] = &["crates/sigil-k8s/src/controller"];

type GrantSet = BTreeSet<(String, String, String)>;

fn set(grants: &[Grant]) -> GrantSet {
    grants
        .iter()
        .map(|(g, r, v)| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
        .collect()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let path = workspace_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// The code side.
// ---------------------------------------------------------------------------

/// The non-test code of a Rust file with `//` comments removed (a `//` inside
/// a string literal, as in `"https://…"`, stays).
fn code_of(src: &str) -> String {
    let src = src.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = String::new();
    for line in src.lines() {
        let mut in_string = false;
        let mut escaped = false;
        let mut cut = line.len();
        let bytes = line.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if in_string => escaped = true,
                b'"' => in_string = !in_string,
                b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => {
                    cut = i;
                    break;
                }
                _ => {}
            }
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Byte offsets of `needle` where it starts a word (no identifier character before it).
fn word_starts(code: &str, needle: &str) -> Vec<usize> {
    code.match_indices(needle)
        .map(|(i, _)| i)
        .filter(|&i| !code[..i].chars().next_back().is_some_and(is_ident))
        .collect()
}

/// The identifier at the start of `s`.
fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    &s[..end]
}

/// The type argument of `Api<T>` or `Api::<T>` that starts at `s` (just after `<`).
fn type_arg(s: &str) -> &str {
    let mut depth = 1;
    for (i, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => {
                depth -= 1;
                if depth == 0 {
                    return s[..i].trim();
                }
            }
            _ => {}
        }
    }
    panic!("unterminated type argument in {s:?}")
}

/// (API group, resource) of a k8s-openapi type.
fn resource_of(ty: &str) -> (&'static str, &'static str) {
    match ty.rsplit("::").next().unwrap_or(ty) {
        "TokenReview" => ("authentication.k8s.io", "tokenreviews"),
        "SubjectAccessReview" => ("authorization.k8s.io", "subjectaccessreviews"),
        "Pod" => ("", "pods"),
        "Node" => ("", "nodes"),
        "Namespace" => ("", "namespaces"),
        "ServiceAccount" => ("", "serviceaccounts"),
        "ConfigMap" => ("", "configmaps"),
        "Secret" => ("", "secrets"),
        "CertificateSigningRequest" => ("certificates.k8s.io", "certificatesigningrequests"),
        other => panic!(
            "psat.rs uses Api<{other}>: add its group and resource to resource_of, the call to \
             SERVER_API_CALLS, and the grant to the server's ClusterRole in deploy/"
        ),
    }
}

/// The RBAC verb (and subresource) of a method of `kube::Api`.
fn verb_of(method: &str) -> (&'static str, Option<&'static str>) {
    match method {
        "create" => ("create", None),
        "get" | "get_opt" | "get_metadata" | "get_metadata_opt" => ("get", None),
        "list" | "list_metadata" => ("list", None),
        "watch" | "watch_metadata" => ("watch", None),
        "patch" | "patch_metadata" => ("patch", None),
        "replace" => ("update", None),
        "delete" => ("delete", None),
        "delete_collection" => ("deletecollection", None),
        "get_status" => ("get", Some("status")),
        "patch_status" => ("patch", Some("status")),
        "replace_status" => ("update", Some("status")),
        "get_scale" => ("get", Some("scale")),
        "patch_scale" => ("patch", Some("scale")),
        "replace_scale" => ("update", Some("scale")),
        "logs" | "log_stream" => ("get", Some("log")),
        "exec" => ("create", Some("exec")),
        "attach" => ("create", Some("attach")),
        "portforward" => ("create", Some("portforward")),
        "evict" => ("create", Some("eviction")),
        other => panic!(
            "psat.rs calls Api::{other}: add its verb to verb_of, the call to SERVER_API_CALLS, and \
             the grant to the server's ClusterRole in deploy/"
        ),
    }
}

/// The API requests a source file makes through `kube::Api`: each `Api<T>`
/// must be bound to a local (`let x: Api<T> = …` or `let x = Api::<T>::…`),
/// and each method called on that local, up to the next `fn`, is a request.
fn api_calls_in(file: &str, code: &str) -> GrantSet {
    let mut calls = GrantSet::new();
    let mut bound = 0;
    for (needle, turbofish) in [("Api<", false), ("Api::<", true)] {
        for at in word_starts(code, needle) {
            let ty = type_arg(&code[at + needle.len()..]);
            let stmt_start = code[..at].rfind(['\n', ';', '{']).map_or(0, |i| i + 1);
            let before = code[stmt_start..at].trim();
            // `let name: Api<T>` or `let name = Api::<T>`.
            let binding = if turbofish {
                before.strip_suffix('=')
            } else {
                before.strip_suffix(':')
            }
            .and_then(|b| b.trim().strip_prefix("let "))
            .map(|b| b.trim().trim_start_matches("mut ").trim());
            let Some(var) = binding.filter(|v| !v.is_empty() && v.chars().all(is_ident)) else {
                panic!(
                    "{file} uses Api<{ty}> in a way this test cannot follow ({before:?}): bind it \
                     to a local with `let name: Api<{ty}> = …`, or teach tests/it/rbac.rs"
                );
            };
            bound += 1;
            let (group, resource) = resource_of(ty);
            let scope_end = code[at..].find("fn ").map_or(code.len(), |i| at + i);
            let scope = &code[at..scope_end];
            for call in word_starts(scope, &format!("{var}.")) {
                if scope[..call].ends_with('.') {
                    continue; // `self.var.`: a field, not this local
                }
                let method = ident_at(&scope[call + var.len() + 1..]);
                let after = &scope[call + var.len() + 1 + method.len()..];
                if !(after.starts_with('(') || after.starts_with("::<")) {
                    continue;
                }
                let (verb, sub) = verb_of(method);
                let resource = match sub {
                    Some(sub) => format!("{resource}/{sub}"),
                    None => resource.to_owned(),
                };
                calls.insert((group.to_owned(), resource, verb.to_owned()));
            }
        }
    }
    let constructors = ["Api::all", "Api::namespaced", "Api::default_namespaced"]
        .iter()
        .map(|c| word_starts(code, c).len())
        .sum::<usize>()
        + word_starts(code, "Api::<").len();
    assert_eq!(
        constructors, bound,
        "{file} builds {constructors} kube Api values but binds only {bound} to typed locals; \
         this test cannot tell which resources the others reach"
    );
    for escape in [
        ".request(",
        ".request::<",
        ".request_",
        "kube::core::Request",
        "kube::runtime",
    ] {
        assert!(
            !code.contains(escape),
            "{file} uses {escape}: a raw or runtime request this test cannot map to RBAC"
        );
    }
    calls
}

#[test]
fn the_server_call_list_matches_psat_rs() {
    let code = code_of(&read("crates/sigil-k8s/src/psat.rs"));
    let found = api_calls_in("psat.rs", &code);
    assert_eq!(
        found,
        set(SERVER_API_CALLS),
        "the Kubernetes API calls of psat.rs (left) differ from SERVER_API_CALLS (right): update \
         the list and the server's ClusterRole in deploy/kubernetes and the Helm chart"
    );
}

#[test]
fn the_agent_call_list_matches_kubelet_rs() {
    let code = code_of(&read("crates/sigil-k8s/src/kubelet.rs"));
    // HTTP methods of the requests built.
    let methods: BTreeSet<&str> = word_starts(&code, "Request::")
        .into_iter()
        .map(|at| ident_at(&code[at + "Request::".len()..]))
        .filter(|m| *m != "builder")
        .collect();
    assert_eq!(
        methods,
        BTreeSet::from(["get"]),
        "kubelet.rs sends other requests than GET; update AGENT_KUBELET_CALLS and the agent's \
         ClusterRole"
    );
    // Kubelet paths: the base URL's path plus a suffix.
    let paths: BTreeSet<&str> = code
        .match_indices("format!(\"{}/")
        .map(|(at, m)| {
            let rest = &code[at + m.len()..];
            &rest[..rest.find('"').unwrap_or(rest.len())]
        })
        .collect();
    assert_eq!(
        paths,
        BTreeSet::from(["pods"]),
        "kubelet paths of kubelet.rs"
    );
    for endpoint in [
        "runningpods",
        "stats",
        "metrics",
        "logs",
        "exec",
        "attach",
        "portForward",
        "containerLogs",
        "run",
        "spec",
        "healthz",
        "configz",
        "checkpoint",
        "debug",
        "cri",
    ] {
        for quoted in [format!("\"/{endpoint}"), format!("}}/{endpoint}")] {
            assert!(
                !code.contains(&quoted),
                "kubelet.rs names the kubelet endpoint /{endpoint}: map it to its nodes/… \
                 subresource in AGENT_KUBELET_CALLS and grant it to the agent"
            );
        }
    }
    // GET /pods → get nodes/pods (KEP-2862); every other path would be nodes/proxy.
    let derived: GrantSet = paths
        .iter()
        .map(|p| {
            let sub = match *p {
                "pods" | "healthz" | "configz" | "stats" | "metrics" => *p,
                "logs" => "log",
                _ => "proxy",
            };
            (String::new(), format!("nodes/{sub}"), "get".to_owned())
        })
        .collect();
    assert_eq!(derived, set(AGENT_KUBELET_CALLS));
}

/// The scanner itself: it sees a request added to code shaped like psat.rs,
/// and refuses code it cannot follow.
#[test]
fn the_scanner_sees_new_calls_and_refuses_what_it_cannot_follow() {
    let code = code_of(
        r#"
        async fn a(client: &kube::Client) {
            let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
            // pods.delete("commented out")
            let url = "https://example.org/x"; let _ = pods.list(&Default::default()).await;
        }
        async fn b(client: &kube::Client) {
            let pods = Api::<Node>::all(client.clone());
            let _ = pods.patch_status("n", &pp, &patch).await;
        }
        #[cfg(test)]
        mod tests { fn t(c: Client) { let x: Api<Secret> = Api::all(c); x.get("s"); } }
        "#,
    );
    assert_eq!(
        api_calls_in("sample", &code),
        [("", "pods", "list"), ("", "nodes/status", "patch")]
            .iter()
            .map(|(g, r, v)| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
            .collect::<GrantSet>()
    );
    for unfollowable in [
        "fn f(api: Api<Pod>) { api.list(&lp); }",
        "fn f(c: Client) { reflect(Api::<Pod>::all(c)); }",
        "fn f(c: Client) { let x: Api<Pod> = Api::all(c.clone()); let y = Api::all(c); }",
        "fn f(c: Client) { let x: Api<Lease> = Api::all(c); }",
        "fn f(c: Client) { c.request::<Pod>(req); }",
    ] {
        let code = code_of(unfollowable);
        let result = std::panic::catch_unwind(|| api_calls_in("sample", &code));
        assert!(result.is_err(), "accepted {unfollowable:?}");
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_other_code_calls_the_kubernetes_api() {
    let root = workspace_root();
    let mut files = Vec::new();
    for krate in std::fs::read_dir(root.join("crates")).unwrap().flatten() {
        rust_files(&krate.path().join("src"), &mut files);
    }
    assert!(files.len() > 10, "found only {} source files", files.len());
    let mut offenders = Vec::new();
    for path in files {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel == "crates/sigil-k8s/src/psat.rs"
            || OTHER_COMPONENTS.iter().any(|c| rel.starts_with(c))
        {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&path).unwrap());
        let uses_api = ["Api<", "Api::", "kube::api", "kube::Api", "kube::runtime"]
            .iter()
            .any(|n| !word_starts(&code, n).is_empty());
        if uses_api {
            offenders.push(rel);
        }
    }
    assert!(
        offenders.is_empty(),
        "these files use kube's API, whose requests this test does not check: {offenders:?}; \
         add their calls to a list in tests/it/rbac.rs and the grants to deploy/"
    );
}

// ---------------------------------------------------------------------------
// The deploy side.
// ---------------------------------------------------------------------------

/// All YAML documents of a multi-document stream.
fn yaml_docs(name: &str, text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn plain_manifests() -> Vec<Value> {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
        .iter()
        .flat_map(|f| {
            yaml_docs(
                &f.display().to_string(),
                &std::fs::read_to_string(f).unwrap(),
            )
        })
        .collect()
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The permissions of a Role or ClusterRole, which may not use wildcards,
/// non-resource URLs or aggregation.
fn role_grants(role: &Value) -> GrantSet {
    let name = str_at(role, &["metadata", "name"]);
    assert!(
        role.get("aggregationRule").is_none(),
        "{name}: aggregated roles grant whatever other roles add"
    );
    let mut out = GrantSet::new();
    for rule in role["rules"].as_array().cloned().unwrap_or_default() {
        assert!(
            rule.get("nonResourceURLs").is_none(),
            "{name}: non-resource URLs are not needed"
        );
        let (groups, resources, verbs) = (
            strings(&rule["apiGroups"]),
            strings(&rule["resources"]),
            strings(&rule["verbs"]),
        );
        assert!(
            !groups.is_empty() && !resources.is_empty() && !verbs.is_empty(),
            "{name}: incomplete rule {rule}"
        );
        for g in &groups {
            for r in &resources {
                for v in &verbs {
                    assert!(
                        g != "*" && r != "*" && v != "*" && !r.ends_with("/*"),
                        "{name}: wildcard in {rule}"
                    );
                    out.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn is_role(d: &Value) -> bool {
    matches!(d["kind"].as_str(), Some("ClusterRole" | "Role"))
}

fn is_binding(d: &Value) -> bool {
    matches!(
        d["kind"].as_str(),
        Some("ClusterRoleBinding" | "RoleBinding")
    )
}

/// What a container of a workload needs, by the command it runs.
fn expected_for(args: &[String]) -> GrantSet {
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", "run", ..] => set(SERVER_API_CALLS),
        ["agent", "run", ..] => set(AGENT_KUBELET_CALLS),
        other => panic!(
            "a container runs `sigil {}`: tell tests/it/rbac.rs which Kubernetes calls it makes",
            other.join(" ")
        ),
    }
}

#[test]
fn plain_manifests_grant_exactly_the_api_calls() {
    let docs = plain_manifests();

    let roles: BTreeMap<(String, String), GrantSet> = docs
        .iter()
        .filter(|d| is_role(d))
        .map(|d| {
            let key = (
                d["kind"].as_str().unwrap().to_owned(),
                str_at(d, &["metadata", "name"]).to_owned(),
            );
            (key, role_grants(d))
        })
        .collect();

    // Service account (namespace, name) → what its bindings grant.
    let mut granted: BTreeMap<(String, String), GrantSet> = BTreeMap::new();
    let mut bound_roles = BTreeSet::new();
    for b in docs.iter().filter(|d| is_binding(d)) {
        let name = str_at(b, &["metadata", "name"]);
        let role = (
            str_at(b, &["roleRef", "kind"]).to_owned(),
            str_at(b, &["roleRef", "name"]).to_owned(),
        );
        let grants = roles
            .get(&role)
            .unwrap_or_else(|| panic!("binding {name} names {role:?}, which is not in deploy/"));
        bound_roles.insert(role);
        for s in b["subjects"].as_array().cloned().unwrap_or_default() {
            assert_eq!(
                str_at(&s, &["kind"]),
                "ServiceAccount",
                "binding {name}: only service accounts get permissions"
            );
            let key = (
                str_at(&s, &["namespace"]).to_owned(),
                str_at(&s, &["name"]).to_owned(),
            );
            granted
                .entry(key)
                .or_default()
                .extend(grants.iter().cloned());
        }
    }
    let unbound: Vec<_> = roles.keys().filter(|r| !bound_roles.contains(*r)).collect();
    assert!(unbound.is_empty(), "roles bound to nobody: {unbound:?}");

    // Service account → what the containers running under it need.
    let mut needed: BTreeMap<(String, String), GrantSet> = BTreeMap::new();
    for w in docs.iter().filter(|d| {
        matches!(
            d["kind"].as_str(),
            Some("StatefulSet" | "DaemonSet" | "Deployment" | "Pod")
        )
    }) {
        let spec = if w["kind"] == "Pod" {
            &w["spec"]
        } else {
            &w["spec"]["template"]["spec"]
        };
        assert_ne!(
            spec["automountServiceAccountToken"],
            Value::Bool(false),
            "{}: the server's in-cluster client and the agent's kubelet requests use the \
             service account token",
            str_at(w, &["metadata", "name"])
        );
        let sa = (
            str_at(w, &["metadata", "namespace"]).to_owned(),
            spec["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
        );
        let entry = needed.entry(sa).or_default();
        for c in spec["containers"].as_array().cloned().unwrap_or_default() {
            entry.extend(expected_for(&strings(&c["args"])));
        }
    }
    assert_eq!(
        needed.len(),
        2,
        "expected the server and the agent under their own service accounts: {needed:?}"
    );
    assert_eq!(
        granted, needed,
        "what the bindings grant each service account (left) differs from what its containers \
         call (right)"
    );
}

/// The Helm RBAC template as YAML, with every whole-line `if` block kept
/// (`conditions = true`) or dropped (`false`); template values may appear
/// only inside double-quoted strings, so the rest is plain YAML.
fn helm_rbac(text: &str, conditions: bool) -> Vec<Value> {
    let mut kept = String::new();
    let mut stack: Vec<bool> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("{{") && t.ends_with("}}") {
            let action = t
                .trim_start_matches("{{")
                .trim_end_matches("}}")
                .trim_matches('-')
                .trim();
            if action.starts_with("if ") {
                stack.push(conditions);
            } else if action == "else" {
                let top = stack.last_mut().expect("else without if");
                *top = !*top;
            } else if action == "end" {
                stack.pop().expect("end without if");
            } else {
                panic!("templates/rbac.yaml: {t:?} is more than if/else/end; keep it plain");
            }
            continue;
        }
        if !stack.iter().all(|c| *c) {
            continue;
        }
        let unquoted: String = line.split('"').step_by(2).collect();
        assert!(
            !unquoted.contains("{{"),
            "templates/rbac.yaml: {line:?}: template values only inside double quotes"
        );
        kept.push_str(line);
        kept.push('\n');
    }
    assert!(stack.is_empty(), "templates/rbac.yaml: unbalanced if/end");
    yaml_docs("templates/rbac.yaml", &kept)
}

#[test]
fn helm_chart_grants_exactly_the_api_calls() {
    let text = read("deploy/helm/sigil/templates/rbac.yaml");
    for legacy in [false, true] {
        let docs = helm_rbac(&text, legacy);
        let roles: BTreeMap<String, GrantSet> = docs
            .iter()
            .filter(|d| is_role(d))
            .map(|d| (str_at(d, &["metadata", "name"]).to_owned(), role_grants(d)))
            .collect();
        let mut agent = set(AGENT_KUBELET_CALLS);
        if legacy {
            agent.extend(set(&[AGENT_LEGACY_KUBELET]));
        }
        let expected = BTreeMap::from([
            ("sigil-agent".to_owned(), agent),
            ("sigil-server".to_owned(), set(SERVER_API_CALLS)),
        ]);
        assert_eq!(
            roles, expected,
            "the chart's ClusterRoles (left) with legacyKubeletAuthorization={legacy}"
        );
        // Each role bound once, to the service account of its name's component.
        let bindings: BTreeMap<&str, (&str, Vec<String>)> = docs
            .iter()
            .filter(|d| is_binding(d))
            .map(|b| {
                let subjects = b["subjects"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|s| str_at(s, &["name"]).to_owned())
                    .collect();
                (
                    str_at(b, &["roleRef", "name"]),
                    (str_at(b, &["metadata", "name"]), subjects),
                )
            })
            .collect();
        assert_eq!(
            bindings,
            BTreeMap::from([
                (
                    "sigil-agent",
                    (
                        "sigil-agent",
                        vec!["{{ .Values.agent.serviceAccountName }}".to_owned()]
                    )
                ),
                (
                    "sigil-server",
                    ("sigil-server", vec!["sigil-server".to_owned()])
                ),
            ])
        );
    }
    // The workloads run under those service accounts.
    let server = read("deploy/helm/sigil/templates/server.yaml");
    assert!(server.contains("serviceAccountName: sigil-server"));
    let agent = read("deploy/helm/sigil/templates/agent.yaml");
    assert!(agent.contains("serviceAccountName: {{ .Values.agent.serviceAccountName | quote }}"));
}

fn toml_of(docs: &[Value], key: &str) -> toml::Table {
    let text = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .find_map(|d| d["data"][key].as_str())
        .unwrap_or_else(|| panic!("no ConfigMap holds {key}"));
    text.parse()
        .unwrap_or_else(|e| panic!("{key} is not valid TOML: {e}"))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

#[test]
fn plain_manifests_wire_the_agent_to_the_server() {
    let docs = plain_manifests();
    let server = toml_of(&docs, "server.toml");
    let agent = toml_of(&docs, "agent.toml");
    let (server, agent) = (&server["server"], &agent["agent"]);
    assert_eq!(server["trust_domain"], agent["trust_domain"]);

    let daemonset = find(&docs, "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    let agent_sa = format!(
        "{}:{}",
        str_at(daemonset, &["metadata", "namespace"]),
        pod["serviceAccountName"].as_str().unwrap()
    );

    // The cluster profile the agents name exists, allows their service
    // account, uses TokenReview (what the RBAC is for) and expects the
    // audience of their projected token.
    let cluster = agent["k8s_psat"]["cluster"].as_str().unwrap();
    let profile = server["k8s_psat"].get(cluster).unwrap_or_else(|| {
        panic!("the agents' cluster {cluster:?} has no [server.k8s_psat] table")
    });
    let allowed: Vec<&str> = profile["service_account_allow_list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        allowed,
        [agent_sa.as_str()],
        "the allow list names the agents' account only"
    );
    assert_eq!(
        profile.get("verification").and_then(|v| v.as_str()),
        Some("token_review")
    );
    let audience = profile
        .get("audience")
        .and_then(|v| v.as_str())
        .unwrap_or("sigil-server");

    // The projected token: that audience, at the agent's token_path.
    let token_path = agent["k8s_psat"]["token_path"].as_str().unwrap();
    let container = &pod["containers"][0];
    let mut found = false;
    for volume in pod["volumes"].as_array().unwrap() {
        for source in volume["projected"]["sources"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let token = &source["serviceAccountToken"];
            if token.is_null() {
                continue;
            }
            assert_eq!(token["audience"].as_str(), Some(audience));
            assert!(token["expirationSeconds"].as_u64().unwrap() <= 3600);
            let mount = container["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == volume["name"])
                .expect("the token volume is mounted");
            assert_eq!(
                format!(
                    "{}/{}",
                    mount["mountPath"].as_str().unwrap(),
                    token["path"].as_str().unwrap()
                ),
                token_path
            );
            found = true;
        }
    }
    assert!(found, "the DaemonSet projects no service account token");

    // The server address is the Service in front of the server.
    let service = find(&docs, "Service");
    let address = agent["server_address"].as_str().unwrap();
    assert_eq!(
        address,
        format!(
            "{}.{}.svc:{}",
            str_at(service, &["metadata", "name"]),
            str_at(service, &["metadata", "namespace"]),
            service["spec"]["ports"][0]["port"]
        )
    );
    let bind = server["bind_address"].as_str().unwrap();
    let target_port = &service["spec"]["ports"][0]["targetPort"];
    let statefulset = find(&docs, "StatefulSet");
    let ports = statefulset["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap();
    let port = ports
        .iter()
        .find(|p| &p["name"] == target_port || &p["containerPort"] == target_port)
        .expect("the Service's target port is a server container port");
    assert!(bind.ends_with(&format!(":{}", port["containerPort"])));
}
