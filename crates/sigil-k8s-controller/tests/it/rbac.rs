//! The RBAC shipped under `deploy/` against the Kubernetes requests the code
//! makes: every request is granted, and nothing else is (least privilege).
//!
//! The single source of truth is the three lists below, [`SERVER_API_CALLS`],
//! [`CONTROLLER_API_CALLS`] and [`AGENT_KUBELET_CALLS`]. Tests keep them
//! honest against the code: they read sigil-k8s's `src/psat.rs` (every `Api<T>` it binds
//! and every method called on it), the entry controller's crate
//! `sigil-k8s-controller` (every `Api<T>` it builds, followed through
//! locals, struct fields and helper functions to the methods called on it and
//! the watchers it feeds) and `src/kubelet.rs` (every request method and
//! kubelet path), and fail when the code makes a request the lists lack, or
//! when kube API calls turn up in another file of the workspace (further
//! tests check that both scanners see a new call and refuse code they cannot
//! follow). Two more read the ClusterRoles of `deploy/kubernetes/*.yaml` and
//! of the Helm chart's `templates/rbac.yaml` and compare each role, and the
//! grants of each service account through its bindings and the containers
//! that run under it, with the lists, both ways. The rest check that the
//! plain manifests wire the agent and the controller to the server (allow
//! list, audience, cluster name, trust domain, service address, admin
//! socket, user), and that the chart ships the generated CRDs of
//! `deploy/crds/`.

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

/// Every API server request of the entry controller (`sigil k8s
/// controller`, `crates/sigil-k8s-controller/src/run.rs`). It runs as a
/// second container of the server pod, so under the server's service
/// account, with a ClusterRole of its own (`sigil-controller`).
const CONTROLLER_API_CALLS: &[Grant] = &[
    // `run`: one reflector per kind, fed by `watcher(api, …)` (`reflect`):
    // a paged list, then watches from its resource version.
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("identity.sigil", "clusterspiffeids", "list"),
    ("identity.sigil", "clusterspiffeids", "watch"),
    ("identity.sigil", "clusterstaticentries", "list"),
    ("identity.sigil", "clusterstaticentries", "watch"),
    ("identity.sigil", "clusterfederatedtrustdomains", "list"),
    ("identity.sigil", "clusterfederatedtrustdomains", "watch"),
    // `reconcile_once` / `reconcile_federation`: `patch_status(&status_api.…)`,
    // a merge patch of each resource's status.
    ("identity.sigil", "clusterspiffeids/status", "patch"),
    ("identity.sigil", "clusterstaticentries/status", "patch"),
    (
        "identity.sigil",
        "clusterfederatedtrustdomains/status",
        "patch",
    ),
    // `publish.rs`: the trust bundle publisher. Its own namespace watcher
    // (list, watch on namespaces, above); the objects it owns, found by
    // label (`list`, cluster-wide), created, replaced with their resource
    // version (`update`) and deleted with a precondition; never `get`,
    // `watch` or `patch`.
    ("", "configmaps", "list"),
    ("", "configmaps", "create"),
    ("", "configmaps", "update"),
    ("", "configmaps", "delete"),
    ("certificates.k8s.io", "clustertrustbundles", "list"),
    ("certificates.k8s.io", "clustertrustbundles", "create"),
    ("certificates.k8s.io", "clustertrustbundles", "update"),
    ("certificates.k8s.io", "clustertrustbundles", "delete"),
];

/// The controller's leader election (`leader.rs`): read the Lease, create
/// it when absent, replace it (take over, renew, release) with the resource
/// version read. Granted by a Role of the controller's own namespace,
/// `sigil-controller-leader`, never cluster-wide (other components' leases,
/// kube-controller-manager's among them, are none of its business).
const CONTROLLER_LEASE_CALLS: &[Grant] = &[
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
];

/// Everything the controller's service account needs.
fn controller_all_calls() -> GrantSet {
    let mut all = set(CONTROLLER_API_CALLS);
    all.extend(set(CONTROLLER_LEASE_CALLS));
    all
}

/// The entry controller's sources: everything under its crate's `src/`.
const CONTROLLER_SOURCES: &str = "crates/sigil-k8s-controller/src/";

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
        "ClusterTrustBundle" => ("certificates.k8s.io", "clustertrustbundles"),
        "Lease" => ("coordination.k8s.io", "leases"),
        other => panic!(
            "the code uses Api<{other}>: add its group and resource to resource_of, the call to \
             the component's list here, and the grant to its ClusterRole in deploy/"
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
            "the code calls Api::{other}: add its verb to verb_of (if it is a request), the call \
             to the component's list here, and the grant to its ClusterRole in deploy/"
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
        "fn f(c: Client) { let x: Api<CronJob> = Api::all(c); }",
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
        // Checked by their own tests.
        if rel == "crates/sigil-k8s/src/psat.rs" || rel.starts_with(CONTROLLER_SOURCES) {
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
// The entry controller's calls.
// ---------------------------------------------------------------------------

/// Rust source as the controller scanner reads it: comments removed, string
/// and character literals emptied (their line breaks kept, so that line
/// numbers stay right), and nothing from the first `#[cfg(test)]` on.
fn bare_code(src: &str) -> String {
    let s: Vec<char> = src.chars().collect();
    let at = |i: usize| s.get(i).copied().unwrap_or('\0');
    let cfg_test: Vec<char> = "#[cfg(test)]".chars().collect();
    let breaks = |from: usize, to: usize| -> String {
        s[from..to.min(s.len())]
            .iter()
            .filter(|c| **c == '\n')
            .collect()
    };
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let ident_before = |n: usize| i >= n && is_ident(s[i - n]);
        if s[i..].starts_with(&cfg_test) {
            break;
        }
        if c == '/' && at(i + 1) == '/' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && at(i + 1) == '*' {
            let (start, mut depth) = (i, 0usize);
            while i < s.len() {
                if s[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
            out.push_str(&breaks(start, i));
            continue;
        }
        // r"…", r#"…"#, br"…": `r` not inside an identifier (but after a `b`).
        if c == 'r' && (!ident_before(1) || (at(i - 1) == 'b' && !ident_before(2))) {
            let mut j = i + 1;
            while at(j) == '#' {
                j += 1;
            }
            let hashes = j - i - 1;
            if at(j) == '"' {
                let mut k = j + 1;
                while k < s.len() && !(s[k] == '"' && (1..=hashes).all(|h| at(k + h) == '#')) {
                    k += 1;
                }
                out.push_str("\"\"");
                out.push_str(&breaks(j, k));
                i = k + 1 + hashes;
                continue;
            }
        }
        if c == '"' {
            let start = i;
            i += 1;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            out.push_str(&breaks(start, i));
            i += 1;
            continue;
        }
        // A character literal ('x', '\n', '\u{…}'), not a lifetime ('a).
        if c == '\'' && (at(i + 1) == '\\' || at(i + 2) == '\'') {
            let mut k = i + if at(i + 1) == '\\' { 3 } else { 2 };
            while k < s.len() && s[k] != '\'' {
                k += 1;
            }
            out.push_str("' '");
            i = k + 1;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// The first non-whitespace byte offset at or after `pos`.
fn skip_ws(code: &str, pos: usize) -> usize {
    pos + (code[pos..].len() - code[pos..].trim_start().len())
}

/// The offset of the bracket that closes the one at `open`.
fn close_of(code: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (i, b) in code.bytes().enumerate().skip(open) {
        match b {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced brackets from byte {open}")
}

/// The offset of the `>` that closes the `<` at `open` (`->` does not count).
fn close_angle(code: &str, open: usize) -> usize {
    let b = code.as_bytes();
    let mut depth = 0usize;
    for i in open..b.len() {
        match b[i] {
            b'<' => depth += 1,
            b'>' if b[i - 1] != b'-' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced angle brackets from byte {open}")
}

/// The innermost bracket still open at `pos`: its offset and kind, how many
/// commas of its level lie between it and `pos`, and whether a `;` does.
fn enclosing(code: &str, pos: usize) -> Option<(usize, u8, usize, bool)> {
    let b = code.as_bytes();
    let (mut depth, mut commas, mut semicolon) = (0usize, 0usize, false);
    for i in (0..pos).rev() {
        match b[i] {
            b')' | b']' | b'}' => depth += 1,
            b'(' | b'[' | b'{' if depth == 0 => return Some((i, b[i], commas, semicolon)),
            b'(' | b'[' | b'{' => depth -= 1,
            b',' if depth == 0 => commas += 1,
            b';' if depth == 0 => semicolon = true,
            _ => {}
        }
    }
    None
}

/// `s` split at the commas outside brackets, each piece with its offset in `s`.
fn split_top(s: &str) -> Vec<(usize, &str)> {
    let b = s.as_bytes();
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for i in 0..b.len() {
        match b[i] {
            b'(' | b'[' | b'{' | b'<' => depth += 1,
            b'>' if i > 0 && b[i - 1] == b'-' => {}
            b')' | b']' | b'}' | b'>' => depth -= 1,
            b',' if depth == 0 => {
                out.push((start, &s[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push((start, &s[start..]));
    out.retain(|(_, p)| !p.trim().is_empty());
    out
}

/// A type without a leading `&`, `&'a`, `&mut` or `mut`.
fn unref(ty: &str) -> &str {
    let mut t = ty.trim();
    if let Some(r) = t.strip_prefix('&') {
        t = r.trim_start();
        if t.starts_with('\'') {
            t = t[1 + ident_at(&t[1..]).len()..].trim_start();
        }
    }
    t.strip_prefix("mut ").unwrap_or(t).trim()
}

/// `name: Type` (a parameter, a field or a `let` pattern) split at its first
/// single colon.
fn split_typed(s: &str) -> Option<(&str, &str)> {
    let b = s.as_bytes();
    (0..b.len())
        .find(|&i| b[i] == b':' && b.get(i + 1) != Some(&b':') && (i == 0 || b[i - 1] != b':'))
        .map(|i| (s[..i].trim(), &s[i + 1..]))
}

/// The `Api<…>` type argument of `ty` (without references), if it is one.
fn api_type_arg(ty: &str) -> Option<&str> {
    let t = unref(ty);
    t.strip_prefix("Api<").map(type_arg)
}

/// One kube request: its RBAC verb and subresource.
type Op = (&'static str, Option<&'static str>);

/// What `watcher(api, …)` sends: a (paged) list, then watches.
const WATCHER_OPS: [Op; 2] = [("list", None), ("watch", None)];

/// A parameter of a function the controller defines.
struct Param {
    name: String,
    /// The type, as written.
    ty: String,
}

/// A function the controller defines: its generic parameters, its
/// parameters and its body (the offsets of its braces).
struct Func {
    name: String,
    generics: Vec<String>,
    params: Vec<Param>,
    body: Option<(usize, usize)>,
}

/// Where a kube `Api` value ends up.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Sink {
    /// A parameter (function index, parameter index).
    Param(usize, usize),
    /// A field of a struct.
    Field(String, String),
}

/// What is done with a kube `Api` value at one place.
enum Flow {
    /// Requests made right there.
    Ops(BTreeSet<Op>),
    /// Handed on.
    Sink(Sink),
}

/// The controller's code, with the functions and the `Api` fields of its
/// structs, for [`controller_calls`].
struct Controller {
    code: String,
    /// (offset in `code`, file name).
    files: Vec<(usize, String)>,
    fns: Vec<Func>,
    /// Struct name → its fields of type `Api<T>` → `T`.
    structs: BTreeMap<String, BTreeMap<String, String>>,
    /// Offsets of the `Api<` that the scan has accounted for.
    typed: BTreeSet<usize>,
}

impl Controller {
    fn new(files: &[(String, String)]) -> Self {
        let mut code = String::new();
        let mut offsets = Vec::new();
        for (name, src) in files {
            offsets.push((code.len(), name.clone()));
            code.push_str(&bare_code(src));
            code.push('\n');
        }
        let mut c = Self {
            code,
            files: offsets,
            fns: Vec::new(),
            structs: BTreeMap::new(),
            typed: BTreeSet::new(),
        };
        c.parse_fns();
        c.parse_structs();
        c
    }

    /// `file:line` of an offset.
    fn place(&self, pos: usize) -> String {
        let (start, file) = self
            .files
            .iter()
            .rev()
            .find(|(o, _)| *o <= pos)
            .cloned()
            .unwrap_or_default();
        let line = self.code[start..pos].matches('\n').count() + 1;
        format!("{file}:{line}")
    }

    /// Where the `Api<` in `text`, found at offset `at` of the code, starts.
    fn account(&mut self, at: usize, text: &str) {
        if let Some(i) = text.find("Api<") {
            self.typed.insert(at + i);
        }
    }

    fn parse_fns(&mut self) {
        let code = self.code.clone();
        for at in word_starts(&code, "fn ") {
            let name_at = skip_ws(&code, at + 3);
            let name = ident_at(&code[name_at..]).to_owned();
            let mut p = skip_ws(&code, name_at + name.len());
            let mut generics = Vec::new();
            if code[p..].starts_with('<') {
                let close = close_angle(&code, p);
                generics = split_top(&code[p + 1..close])
                    .into_iter()
                    .map(|(_, g)| g.trim())
                    .filter(|g| !g.starts_with('\'') && !g.starts_with("const "))
                    .map(|g| ident_at(g).to_owned())
                    .collect();
                p = skip_ws(&code, close + 1);
            }
            assert!(
                code[p..].starts_with('('),
                "{}: cannot read the signature of fn {name}",
                self.place(at)
            );
            let close = close_of(&code, p);
            let mut params = Vec::new();
            for (off, piece) in split_top(&code[p + 1..close]) {
                let Some((pat, ty)) = split_typed(piece) else {
                    continue; // self, &self, &mut self
                };
                let pat = pat.strip_prefix("mut ").unwrap_or(pat).trim();
                if api_type_arg(ty).is_some() {
                    assert!(
                        pat.chars().all(is_ident),
                        "{}: fn {name} takes a kube Api through the pattern {pat:?}: bind it to a \
                         plain name, or teach tests/it/rbac.rs",
                        self.place(at)
                    );
                    self.account(p + 1 + off, piece);
                }
                params.push(Param {
                    name: pat.to_owned(),
                    ty: ty.trim().to_owned(),
                });
            }
            let body = code[close..]
                .find(['{', ';'])
                .map(|i| close + i)
                .filter(|&i| code.as_bytes()[i] == b'{')
                .map(|open| (open, close_of(&code, open)));
            self.fns.push(Func {
                name,
                generics,
                params,
                body,
            });
        }
    }

    fn parse_structs(&mut self) {
        let code = self.code.clone();
        for at in word_starts(&code, "struct ") {
            let name_at = skip_ws(&code, at + 7);
            let name = ident_at(&code[name_at..]).to_owned();
            let mut p = skip_ws(&code, name_at + name.len());
            if code[p..].starts_with('<') {
                p = skip_ws(&code, close_angle(&code, p) + 1);
            }
            if !code[p..].starts_with('{') {
                continue; // tuple and unit structs: an `Api<` in them is not accounted for
            }
            let close = close_of(&code, p);
            let mut fields = BTreeMap::new();
            for (off, piece) in split_top(&code[p + 1..close]) {
                let Some((field, ty)) = split_typed(piece) else {
                    continue;
                };
                let Some(arg) = api_type_arg(ty) else {
                    continue;
                };
                let field = field.rsplit(' ').next().unwrap_or(field).trim(); // `pub(crate) f`
                fields.insert(field.to_owned(), arg.to_owned());
                self.account(p + 1 + off, piece);
            }
            if !fields.is_empty() {
                self.structs.insert(name, fields);
            }
        }
    }

    /// The function called at the `(` at `open`, if it is a plain path
    /// (`f`, `a::b::f`): not a method, a macro, a closure or a turbofish.
    fn callee(&self, open: usize) -> Option<&str> {
        let before = &self.code[..open];
        let start = before
            .rfind(|c: char| !(is_ident(c) || c == ':'))
            .map_or(0, |i| i + 1);
        let path = &before[start..];
        if path.is_empty() || before[..start].ends_with('.') {
            return None;
        }
        Some(path)
    }

    /// The function, and the index of the argument, of a call whose argument
    /// occupies `start..end` (an `&` or `&mut` before it allowed).
    fn call_argument(&self, start: usize, end: usize) -> Option<(&str, usize)> {
        let code = &self.code;
        let before = code[..start].trim_end();
        let before = before
            .strip_suffix("&mut")
            .or_else(|| before.strip_suffix('&'))
            .unwrap_or(before)
            .trim_end();
        let after = skip_ws(code, end);
        if !(before.ends_with('(') || before.ends_with(','))
            || !(code[after..].starts_with(',') || code[after..].starts_with(')'))
        {
            return None;
        }
        let (open, kind, index, semicolon) = enclosing(code, start)?;
        if kind != b'(' || semicolon {
            return None;
        }
        Some((self.callee(open)?, index))
    }

    /// The function defined here that `path` names, if exactly one.
    fn func(&self, path: &str) -> Option<usize> {
        let name = path.rsplit("::").next().unwrap_or(path);
        let mut found = self.fns.iter().enumerate().filter(|(_, f)| f.name == name);
        let (i, _) = found.next()?;
        found.next().is_none().then_some(i)
    }

    /// What happens to the kube `Api` value that occupies `start..end`: a
    /// method called on it, or an argument of a watcher or of a function of
    /// the controller's; `None` for anything else.
    fn flow(&self, start: usize, end: usize) -> Option<Flow> {
        let code = &self.code;
        let after = skip_ws(code, end);
        if code[after..].starts_with('.') {
            let m = skip_ws(code, after + 1);
            let method = ident_at(&code[m..]);
            let rest = &code[m + method.len()..];
            if method.is_empty() || !(rest.starts_with('(') || rest.starts_with("::<")) {
                return None;
            }
            return Some(Flow::Ops(BTreeSet::from([verb_of(method)])));
        }
        let (path, index) = self.call_argument(start, end)?;
        let name = path.rsplit("::").next().unwrap_or(path);
        if matches!(name, "watcher" | "metadata_watcher")
            && path
                .split("::")
                .all(|s| matches!(s, "kube" | "runtime" | "watcher" | "metadata_watcher"))
            && self.func(name).is_none()
        {
            return (index == 0).then(|| Flow::Ops(WATCHER_OPS.into_iter().collect()));
        }
        let f = self.func(path)?;
        let param = self.fns[f].params.get(index)?;
        api_type_arg(&param.ty)?;
        Some(Flow::Sink(Sink::Param(f, index)))
    }

    /// Like [`Self::flow`], but a value it cannot follow is an error.
    fn flow_or_panic(&self, start: usize, end: usize, what: &str) -> Flow {
        self.flow(start, end).unwrap_or_else(|| {
            panic!(
                "{}: the controller uses the kube Api value `{what}` in a way this test cannot \
                 follow ({:?}): call its methods, or pass it to a watcher or to a function of the \
                 controller's, or teach tests/it/rbac.rs",
                self.place(start),
                code_line(&self.code, start)
            )
        })
    }

    /// The uses of the local or parameter `var` in `from..to`: the name as
    /// a value, not a field, a path segment or a field name in a struct
    /// literal.
    fn uses(&self, var: &str, from: usize, to: usize) -> Vec<usize> {
        let code = &self.code;
        word_starts(&code[from..to], var)
            .into_iter()
            .map(|i| from + i)
            .filter(|&i| {
                let end = i + var.len();
                let before = code[..i].trim_end();
                let after = code[end..].trim_start();
                let field_name = after.starts_with(':') && !after.starts_with("::");
                !code[end..].starts_with(is_ident)
                    && !before.ends_with('.')
                    && !before.ends_with("::")
                    && !field_name
            })
            .collect()
    }

    /// The requests made through the values that reach `sink`.
    fn ops(&self, sink: &Sink, memo: &mut BTreeMap<Sink, BTreeSet<Op>>) -> BTreeSet<Op> {
        if let Some(ops) = memo.get(sink) {
            return ops.clone();
        }
        memo.insert(sink.clone(), BTreeSet::new()); // recursion ends here
        let mut flows = Vec::new();
        match sink {
            Sink::Param(f, i) => {
                let func = &self.fns[*f];
                let var = &func.params[*i].name;
                let (open, close) = func
                    .body
                    .unwrap_or_else(|| panic!("fn {} takes a kube Api but has no body", func.name));
                for u in self.uses(var, open, close) {
                    flows.push(self.flow_or_panic(u, u + var.len(), var));
                }
            }
            Sink::Field(name, field) => {
                for (var, from, to) in self.struct_vars(name) {
                    for u in self.uses(&var, from, to) {
                        let end = u + var.len();
                        let rest = &self.code[end..];
                        let Some(accessed) = rest.strip_prefix('.').map(ident_at) else {
                            continue; // checked by struct_vars_are_followed
                        };
                        if accessed == field {
                            let what = format!("{var}.{field}");
                            flows.push(self.flow_or_panic(u, end + 1 + field.len(), &what));
                        }
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        for flow in flows {
            match flow {
                Flow::Ops(ops) => out.extend(ops),
                Flow::Sink(s) => out.extend(self.ops(&s, memo)),
            }
        }
        memo.insert(sink.clone(), out.clone());
        out
    }

    /// The region of the `let` at `at` in which its name is in scope: from
    /// its initializer to the end of the block.
    fn let_scope(&self, at: usize) -> (usize, usize) {
        let end = enclosing(&self.code, at)
            .filter(|(_, kind, _, _)| *kind == b'{')
            .map_or(self.code.len(), |(open, ..)| close_of(&self.code, open));
        (at, end)
    }

    /// The `let` statement at `at`: its name, its type if written, and the
    /// offset of its initializer.
    fn let_at(&self, at: usize) -> Option<(String, Option<String>, usize)> {
        let code = &self.code;
        let rest = &code[at + 4..];
        let eq = rest.find('=')?;
        let head = rest[..eq].trim();
        let (pat, ty) = match split_typed(head) {
            Some((p, t)) => (p, Some(t.trim().to_owned())),
            None => (head, None),
        };
        let pat = pat.strip_prefix("mut ").unwrap_or(pat).trim();
        if pat.is_empty() || !pat.chars().all(is_ident) || rest[eq..].starts_with("==") {
            return None;
        }
        Some((pat.to_owned(), ty, skip_ws(code, at + 4 + eq + 1)))
    }

    /// The variables that hold a value of the struct `name`, each with the
    /// region where it is in scope: parameters of type `name` (or a
    /// reference to it), and `let v = Name { … }` or `let v: Name = …`.
    fn struct_vars(&self, name: &str) -> Vec<(String, usize, usize)> {
        let mut out = Vec::new();
        for f in &self.fns {
            for p in &f.params {
                if unref(&p.ty) == name
                    && let Some((open, close)) = f.body
                {
                    out.push((p.name.clone(), open, close));
                }
            }
        }
        for at in word_starts(&self.code, "let ") {
            let Some((var, ty, init)) = self.let_at(at) else {
                continue;
            };
            let value = unref(&self.code[init..]);
            let literal = value.starts_with(name)
                && !value[name.len()..].starts_with(is_ident)
                && value[name.len()..].trim_start().starts_with('{');
            if ty.as_deref().map(unref) == Some(name) || literal {
                let (_, end) = self.let_scope(at);
                out.push((var, init, end));
            }
        }
        out
    }

    /// Whether the argument at `start..end` goes to a parameter of type
    /// `name` (or a reference to it) of a function of the controller's.
    fn passed_as(&self, start: usize, end: usize, name: &str) -> bool {
        self.call_argument(start, end).is_some_and(|(path, index)| {
            self.func(path).is_some_and(|f| {
                self.fns[f]
                    .params
                    .get(index)
                    .is_some_and(|p| unref(&p.ty) == name)
            })
        })
    }

    /// Checks that values of a struct with `Api` fields go nowhere this test
    /// cannot see: the struct is named only in its definition, as the type
    /// of parameters and locals (`v: Name`, `v: &Name`), in literals that
    /// initialize a `let` or are passed to a parameter of its type; its
    /// variables are used only to read fields and as arguments of such
    /// parameters; and it has no methods (`self` is not followed).
    fn struct_vars_are_followed(&self, name: &str) {
        let code = &self.code;
        for at in word_starts(code, name) {
            let end = at + name.len();
            if code[end..].starts_with(is_ident) {
                continue;
            }
            let before = code[..at].trim_end();
            let unreferenced = before
                .strip_suffix("&mut")
                .or_else(|| before.strip_suffix('&'))
                .map_or(before, str::trim_end);
            let after = code[end..].trim_start();
            let ok = if after.starts_with('{') && !before.ends_with("struct") {
                let close = close_of(code, end + (code[end..].len() - after.len()));
                let stmt = before.rfind([';', '{', '}']).map_or(0, |i| i + 1);
                (unreferenced.ends_with('=') && code[stmt..at].trim_start().starts_with("let "))
                    || self.passed_as(at, close + 1, name)
            } else {
                before.ends_with("struct")
                    || (unreferenced.ends_with(':') && !unreferenced.ends_with("::"))
            };
            assert!(
                ok,
                "{}: the struct {name} holds kube Api values and is used in a way this test \
                 cannot follow ({:?}); keep it to `let v = {name} {{ … }}`, parameters of \
                 type {name} (and literals passed to them) and field reads, or teach \
                 tests/it/rbac.rs",
                self.place(at),
                code_line(code, at)
            );
        }
        for (var, from, to) in self.struct_vars(name) {
            for u in self.uses(&var, from, to) {
                let end = u + var.len();
                if let Some(field) = code[end..].strip_prefix('.').map(ident_at) {
                    let rest = &code[end + 1 + field.len()..];
                    if !(rest.starts_with('(') || rest.starts_with("::<")) {
                        continue; // a field
                    }
                }
                assert!(
                    self.passed_as(u, end, name),
                    "{}: {var} (a {name}, which holds kube Api values) is used in a way this \
                     test cannot follow ({:?})",
                    self.place(u),
                    code_line(code, u)
                );
            }
        }
    }

    /// Every `Api::…(…)` the code builds, with its resource type and what
    /// happens to it.
    fn constructors(&mut self) -> Vec<(String, Flow)> {
        let code = self.code.clone();
        let mut out = Vec::new();
        for at in word_starts(&code, "Api::") {
            let mut p = at + "Api::".len();
            let mut ty = None;
            if code[p..].starts_with('<') {
                let t = type_arg(&code[p + 1..]);
                ty = Some(t.to_owned());
                p = close_angle(&code, p) + 1;
                assert!(
                    code[p..].starts_with("::"),
                    "{}: {:?}",
                    self.place(at),
                    code_line(&code, at)
                );
                p += 2;
            }
            let method = ident_at(&code[p..]);
            assert!(
                matches!(method, "all" | "namespaced" | "default_namespaced")
                    && code[p + method.len()..].starts_with('('),
                "{}: Api::{method} is not a constructor this test knows ({:?}); build Api values \
                 with Api::all, Api::namespaced or Api::default_namespaced, or teach \
                 tests/it/rbac.rs",
                self.place(at),
                code_line(&code, at)
            );
            let end = close_of(&code, p + method.len()) + 1;
            let place = self.place(at);
            // `let name[: Api<T>] = Api::…(…);`
            let stmt = code[..at].rfind([';', '{', '}']).map_or(0, |i| i + 1);
            let head = code[stmt..at].trim();
            if head.starts_with("let ")
                && head.ends_with('=')
                && code[skip_ws(&code, end)..].starts_with(';')
            {
                let (var, annotated, _) = self
                    .let_at(stmt + code[stmt..].find("let ").unwrap_or(0))
                    .unwrap_or_else(|| panic!("{}: cannot read {head:?}", self.place(at)));
                if let Some(t) = &annotated {
                    let arg = api_type_arg(t)
                        .unwrap_or_else(|| {
                            unknown_resource(&place, method, "a let of another type")
                        })
                        .to_owned();
                    self.account(stmt, &code[stmt..at]);
                    ty = Some(arg);
                }
                if var == "_" {
                    continue; // dropped at once
                }
                let (_, scope_end) = self.let_scope(at);
                let ty =
                    ty.unwrap_or_else(|| unknown_resource(&place, method, "a let without a type"));
                for u in self.uses(&var, end, scope_end) {
                    out.push((ty.clone(), self.flow_or_panic(u, u + var.len(), &var)));
                }
                continue;
            }
            // `Name { field: Api::…(…), … }`
            let field_init = code[..at]
                .trim_end()
                .strip_suffix(':')
                .filter(|b| !b.ends_with(':'))
                .map(|b| {
                    let b = b.trim_end();
                    &b[b.rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1)..]
                });
            let literal = enclosing(&code, at).filter(|(_, kind, _, _)| *kind == b'{');
            if let (Some(field), Some((open, ..))) = (field_init, literal) {
                let before = code[..open].trim_end();
                let name = &before[before.rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1)..];
                let field_ty = self
                    .structs
                    .get(name)
                    .and_then(|f| f.get(field))
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: {name}::{field} is not a field of type Api<…>",
                            self.place(at)
                        )
                    })
                    .clone();
                out.push((
                    field_ty,
                    Flow::Sink(Sink::Field(name.to_owned(), field.to_owned())),
                ));
                continue;
            }
            // A method called on it, or an argument.
            let flow = self.flow_or_panic(at, end, &format!("Api::{method}(…)"));
            let ty = match (&flow, ty) {
                (_, Some(t)) => t,
                (Flow::Sink(Sink::Param(f, i)), None) => {
                    let func = &self.fns[*f];
                    let arg = api_type_arg(&func.params[*i].ty).unwrap_or_default();
                    if func.generics.iter().any(|g| g == arg) {
                        unknown_resource(&place, method, "a generic parameter");
                    }
                    arg.to_owned()
                }
                (Flow::Ops(_), None) => unknown_resource(&place, method, "no type"),
                (Flow::Sink(Sink::Field(..)), None) => unreachable!(),
            };
            out.push((ty, flow));
        }
        out
    }
}

fn unknown_resource(place: &str, method: &str, why: &str) -> ! {
    panic!(
        "{place}: cannot tell the resource of this kube Api ({why}): write it as Api::<T>::{method}"
    )
}

/// The line of `code` around `pos`, trimmed, for messages.
fn code_line(code: &str, pos: usize) -> &str {
    let start = code[..pos].rfind('\n').map_or(0, |i| i + 1);
    let end = code[pos..].find('\n').map_or(code.len(), |i| pos + i);
    code[start..end].trim()
}

/// (API group, resource) of a type the controller builds an `Api` for: its
/// own custom resources (from the CRDs it generates), or a k8s-openapi type.
fn controller_resource_of(ty: &str) -> (String, String) {
    let kind = ty.rsplit("::").next().unwrap_or(ty);
    if let Some(crd) = sigil_k8s_controller::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
    {
        return (crd.spec.group, crd.spec.names.plural);
    }
    let (group, resource) = resource_of(ty);
    (group.to_owned(), resource.to_owned())
}

/// The API requests of the controller's sources (file name, text): every
/// `Api` value it builds, followed to the methods called on it and the
/// watchers it feeds, through `let` locals, struct fields and the
/// parameters of its own functions. Code it cannot follow is an error.
fn controller_calls(files: &[(String, String)]) -> GrantSet {
    let mut c = Controller::new(files);
    let code = c.code.clone();
    for escape in [
        ".request(",
        ".request::<",
        ".request_",
        "kube::core::Request",
        "http::Request",
        "Request::builder",
        "Controller::new",
        "Controller::for_stream",
        "runtime::Controller",
        "runtime::controller",
        "finalizer(",
        "Recorder",
        "await_condition",
        "watch_object",
        "kube::discovery",
        "Discovery",
        "apiserver_version",
        "list_api_group",
        "list_core_api",
    ] {
        let hit = if escape.starts_with(is_ident) {
            word_starts(&code, escape).first().copied()
        } else {
            code.find(escape)
        };
        if let Some(at) = hit {
            panic!(
                "{}: the controller uses {escape}, a request this test cannot map to RBAC",
                c.place(at)
            );
        }
    }
    let built = c.constructors();
    let mut memo = BTreeMap::new();
    let mut calls = GrantSet::new();
    let mut grant = |ty: &str, ops: &BTreeSet<Op>| {
        let (group, resource) = controller_resource_of(ty);
        for (verb, sub) in ops {
            let resource = match sub {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.clone(),
            };
            calls.insert((group.clone(), resource, (*verb).to_owned()));
        }
    };
    for (ty, flow) in &built {
        let ops = match flow {
            Flow::Ops(ops) => ops.clone(),
            Flow::Sink(s) => c.ops(s, &mut memo),
        };
        grant(ty, &ops);
    }
    // Every parameter and field of type Api<…> is followed, even one that
    // no value built here reaches (a concrete type then counts by itself).
    for (f, func) in c.fns.iter().enumerate() {
        for (i, p) in func.params.iter().enumerate() {
            let Some(arg) = api_type_arg(&p.ty) else {
                continue;
            };
            let ops = c.ops(&Sink::Param(f, i), &mut memo);
            if !func.generics.iter().any(|g| g == arg) {
                grant(arg, &ops);
            }
        }
    }
    for (name, fields) in &c.structs {
        c.struct_vars_are_followed(name);
        for (field, ty) in fields {
            let ops = c.ops(&Sink::Field(name.clone(), field.clone()), &mut memo);
            grant(ty, &ops);
        }
    }
    for at in word_starts(&code, "Api<") {
        assert!(
            c.typed.contains(&at),
            "{}: the controller uses the type Api<…> where this test cannot follow it ({:?}); \
             use it for parameters, struct fields and `let` locals only, or teach \
             tests/it/rbac.rs",
            c.place(at),
            code_line(&code, at)
        );
    }
    calls
}

/// The controller's sources: its crate's `src/**.rs`.
fn controller_sources() -> Vec<(String, String)> {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root.join(CONTROLLER_SOURCES), &mut files);
    let mut out: Vec<(String, String)> = files
        .iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, p)
        })
        .filter(|(rel, _)| rel.starts_with(CONTROLLER_SOURCES))
        .map(|(rel, p)| (rel, std::fs::read_to_string(p).unwrap()))
        .collect();
    out.sort();
    assert!(
        out.len() >= 2,
        "found only {} controller source files",
        out.len()
    );
    out
}

#[test]
fn the_controller_call_list_matches_the_controller_code() {
    let found = controller_calls(&controller_sources());
    assert_eq!(
        found,
        controller_all_calls(),
        "the Kubernetes API calls of the controller crate (left) differ from CONTROLLER_API_CALLS \
         (right): update the list and the ClusterRole sigil-controller in deploy/kubernetes and \
         the Helm chart"
    );
}

/// The controller scanner itself: it follows values through the shapes
/// `run.rs` uses (a generic helper feeding a watcher, a struct of Api fields
/// read by a generic helper), sees a request added to any of them, and
/// refuses code it cannot follow.
#[test]
fn the_controller_scanner_follows_values_and_refuses_what_it_cannot() {
    let sample = r#"
        //! Api::<Secret>::all(c).delete("in a comment")
        use kube::api::{Api, Patch, PatchParams};
        use kube::runtime::{reflector, watcher};

        fn reflect<K: Clone>(api: Api<K>, kind: &'static str) -> Store<K> {
            let (reader, writer) = reflector::store();
            let _ = reflector::reflector(writer, watcher(api, watcher::Config::default()));
            let _ = "Api::<Secret>::all(c) in a string"; let _ = '"';
            reader
        }

        struct StatusApi {
            spiffe_ids: Api<ClusterSPIFFEID>,
            pub(crate) nodes: Api<Node>,
        }

        struct Other { spiffe_ids: Store<ClusterSPIFFEID> }

        async fn patch<K, S>(api: &Api<K>, name: &str, status: &S) {
            let _ = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await;
        }

        async fn run(client: Client) {
            let s1 = reflect(Api::<Pod>::all(client.clone()), "Pod");
            let status_api = StatusApi {
                spiffe_ids: Api::all(client.clone()),
                nodes: Api::all(client.clone()),
            };
            once(&status_api, &other).await;
            let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
            let _ = pods.get("p").await;
            let _ = Api::<Namespace>::all(client).list(&Default::default()).await;
        }

        async fn once(status_api: &StatusApi, other: &Other) {
            other.spiffe_ids.state();
            patch(&status_api.spiffe_ids, "n", &1).await;
            let _ = status_api.nodes.get_status("n").await;
        }

        #[cfg(test)]
        mod tests { fn t(c: Client) { let x: Api<Secret> = Api::all(c); x.delete("s"); } }
    "#;
    let files = |code: &str| vec![("sample.rs".to_owned(), code.to_owned())];
    let want = |grants: &[Grant]| set(grants);
    assert_eq!(
        controller_calls(&files(sample)),
        want(&[
            ("", "pods", "list"),
            ("", "pods", "watch"),
            ("", "pods", "get"),
            ("", "namespaces", "list"),
            ("", "nodes/status", "get"),
            ("identity.sigil", "clusterspiffeids/status", "patch"),
        ])
    );
    // A new request anywhere shows.
    for (from, to, extra) in [
        (
            "let _ = api.patch_status(",
            "let _ = api.delete(name, &Default::default()); let _ = api.patch_status(",
            ("identity.sigil", "clusterspiffeids", "delete"),
        ),
        (
            "watcher(api, watcher::Config::default())",
            "watcher(api, watcher::Config::default())); let _ = api.replace(\"x\", &pp, &o",
            ("", "pods", "update"),
        ),
        (
            "let _ = pods.get(\"p\").await;",
            "let _ = pods.get(\"p\").await; let _ = pods.delete(\"p\", &dp).await;",
            ("", "pods", "delete"),
        ),
        (
            "let s1 = reflect(",
            "let s2 = reflect(Api::<ClusterStaticEntry>::all(client.clone()), \"x\"); let s1 = reflect(",
            ("identity.sigil", "clusterstaticentries", "watch"),
        ),
    ] {
        let code = sample.replacen(from, to, 1);
        assert_ne!(code, sample, "{from:?} is not in the sample");
        let found = controller_calls(&files(&code));
        assert!(
            found.contains(&(extra.0.to_owned(), extra.1.to_owned(), extra.2.to_owned())),
            "missed {extra:?} after {to:?}: {found:?}"
        );
    }
    // Struct values as references and literal arguments.
    assert_eq!(
        controller_calls(&files(
            "struct S { a: Api<Pod> } \
             fn f(c: Client) { let s = &S { a: Api::all(c.clone()) }; g(&S { a: Api::all(c) }); \
             s.a.get(\"x\"); } \
             fn g(s: &S) { s.a.delete(\"y\", &dp); }"
        )),
        want(&[("", "pods", "get"), ("", "pods", "delete")])
    );
    // Code it cannot follow.
    for unfollowable in [
        // An Api returned, stored, cloned, captured or moved elsewhere.
        "fn f(c: Client) -> Api<Pod> { Api::all(c) }",
        "fn f(c: Client) { let x = Api::<Pod>::all(c); v.push(x); }",
        "fn f(c: Client) { let x = Api::<Pod>::all(c); let y = x; y.delete(\"p\"); }",
        "fn f(c: Client) { let x = Api::<Pod>::all(c); x.clone(); }",
        "fn f(c: Client) { let g = |a: Api<Pod>| a.delete(\"p\"); }",
        "fn f(c: Client) { store(Api::<Pod>::all(c)); } fn store(a: Api<Pod>) { v.push(a); }",
        "fn f(c: Client) { unknown(Api::<Pod>::all(c)); }",
        "fn f(c: Client) { g(Api::all(c)); } fn g<K>(a: Api<K>) { a.list(&lp); }",
        "fn f(c: Client) { let x = Api::all(c); x.list(&lp); }",
        "fn f(c: Client) { let x: Api<CronJob> = Api::all(c); x.list(&lp); }",
        "fn f(c: Client) { let x = Api::<Pod>::all_with(c, &ar); }",
        // Structs it cannot see through.
        "struct S { a: Api<Pod> } impl S { fn g(&self) { self.a.delete(\"p\"); } } \
         fn f(c: Client) { let s = S { a: Api::all(c) }; }",
        "struct S { a: Api<Pod> } fn f(c: Client) { let s = S { a: Api::all(c) }; let t = s; \
         t.a.delete(\"p\"); }",
        "struct S { a: Api<Pod> } fn f(c: Client) { let s = S { a: Api::all(c) }; \
         keep(&s.a); }",
        "struct S { a: Api<Pod> } fn f(c: Client) -> S { S { a: Api::all(c) } }",
        "struct S { a: Api<Pod> } fn f(c: Client) { v.push(S { a: Api::all(c) }); }",
        "struct S { a: Api<Pod> } fn f(c: Client) { let v: Vec<S> = vec![]; }",
        // Requests other than through Api methods and watchers.
        "fn f(c: Client) { c.request::<Pod>(req); }",
        "fn f(c: Client) { Controller::new(Api::<Pod>::all(c), Default::default()); }",
        "fn f(c: Client) { let r = Recorder::new(c, reporter); }",
    ] {
        let result = std::panic::catch_unwind(|| controller_calls(&files(unfollowable)));
        assert!(result.is_err(), "accepted {unfollowable:?}");
    }
}

#[test]
fn bare_code_drops_comments_and_literals() {
    let src = "let a = \"x // y\"; // Api<Pod>\nlet b = r#\"Api::all(\"c\")\"#; /* Api<\n Node> */\n\
               let c = '\"'; let d = '\\''; fn f<'a>(x: &'a str) {}\n#[cfg(test)] mod t {}";
    assert_eq!(
        bare_code(src),
        "let a = \"\"; \nlet b = \"\";  \n\nlet c = ' '; let d = ' '; fn f<'a>(x: &'a str) {}\n"
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

/// What `have` grants beyond `want`, and lacks, for each key (a role or a
/// service account), one line each.
fn differences<K: std::fmt::Debug + Ord>(
    have: &BTreeMap<K, GrantSet>,
    want: &BTreeMap<K, GrantSet>,
) -> String {
    let empty = GrantSet::new();
    let keys: BTreeSet<&K> = have.keys().chain(want.keys()).collect();
    let mut out = String::new();
    for k in keys {
        let (h, w) = (have.get(k).unwrap_or(&empty), want.get(k).unwrap_or(&empty));
        if !have.contains_key(k) || !want.contains_key(k) || h != w {
            out.push_str(&format!(
                "  {k:?}{}{}: lacks {:?}, grants beyond the calls {:?}\n",
                if have.contains_key(k) {
                    ""
                } else {
                    " (absent)"
                },
                if want.contains_key(k) {
                    ""
                } else {
                    " (not expected)"
                },
                w.difference(h).collect::<Vec<_>>(),
                h.difference(w).collect::<Vec<_>>(),
            ));
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
        ["k8s", "controller", ..] => controller_all_calls(),
        ["agent", "run", ..] => set(AGENT_KUBELET_CALLS),
        // The CSI driver (crates/sigil-csi) talks to the kubelet over its
        // own socket and calls no Kubernetes API.
        ["csi", ..] => GrantSet::new(),
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

    // Each component has a role of its own with exactly its calls, so that
    // one whose role joins another's service account (the controller's, in
    // the server pod) is still held to least privilege.
    let cluster_role = |name: &str| ("ClusterRole".to_owned(), name.to_owned());
    let expected = BTreeMap::from([
        (cluster_role("sigil-agent"), set(AGENT_KUBELET_CALLS)),
        (cluster_role("sigil-controller"), set(CONTROLLER_API_CALLS)),
        (cluster_role("sigil-server"), set(SERVER_API_CALLS)),
        (
            ("Role".to_owned(), "sigil-controller-leader".to_owned()),
            set(CONTROLLER_LEASE_CALLS),
        ),
    ]);
    assert!(
        roles == expected,
        "the roles of deploy/kubernetes differ from what each component calls:\n{}",
        differences(&roles, &expected)
    );

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
            // The kubelet's node-driver-registrar beside the CSI driver
            // registers it through the kubelet's plugin socket, not the API.
            if c["name"] == "node-driver-registrar" {
                continue;
            }
            entry.extend(expected_for(&strings(&c["args"])));
        }
    }
    assert_eq!(
        needed.len(),
        2,
        "expected the server and the agent under their own service accounts: {needed:?}"
    );
    assert!(
        granted == needed,
        "what the bindings grant each service account differs from what its containers call:\n{}",
        differences(&granted, &needed)
    );
}

/// The Helm RBAC template as YAML, with each whole-line `if` block kept or
/// dropped as `condition` says for its condition; template values may
/// appear only inside double-quoted strings, so the rest is plain YAML.
fn helm_rbac(text: &str, condition: &dyn Fn(&str) -> bool) -> Vec<Value> {
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
            if let Some(cond) = action.strip_prefix("if ") {
                stack.push(condition(cond.trim()));
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
    for (legacy, controller) in [(false, false), (false, true), (true, false), (true, true)] {
        let docs = helm_rbac(&text, &|cond| match cond {
            ".Values.agent.legacyKubeletAuthorization" => legacy,
            ".Values.controller.enabled" => controller,
            other => panic!("templates/rbac.yaml: unknown condition {other:?}"),
        });
        let roles: BTreeMap<String, GrantSet> = docs
            .iter()
            .filter(|d| is_role(d))
            .map(|d| (str_at(d, &["metadata", "name"]).to_owned(), role_grants(d)))
            .collect();
        let mut agent = set(AGENT_KUBELET_CALLS);
        if legacy {
            agent.extend(set(&[AGENT_LEGACY_KUBELET]));
        }
        let mut expected = BTreeMap::from([
            ("sigil-agent".to_owned(), agent),
            ("sigil-server".to_owned(), set(SERVER_API_CALLS)),
        ]);
        if controller {
            expected.insert("sigil-controller".to_owned(), set(CONTROLLER_API_CALLS));
            expected.insert(
                "sigil-controller-leader".to_owned(),
                set(CONTROLLER_LEASE_CALLS),
            );
        }
        assert!(
            roles == expected,
            "the chart's ClusterRoles with legacyKubeletAuthorization={legacy}, \
             controller.enabled={controller}:\n{}",
            differences(&roles, &expected)
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
        let mut expected = BTreeMap::from([
            (
                "sigil-agent",
                (
                    "sigil-agent",
                    vec!["{{ .Values.agent.serviceAccountName }}".to_owned()],
                ),
            ),
            (
                "sigil-server",
                ("sigil-server", vec!["sigil-server".to_owned()]),
            ),
        ]);
        if controller {
            // The controller runs in the server pod: the server's account.
            expected.insert(
                "sigil-controller",
                ("sigil-controller", vec!["sigil-server".to_owned()]),
            );
            expected.insert(
                "sigil-controller-leader",
                ("sigil-controller-leader", vec!["sigil-server".to_owned()]),
            );
        }
        assert_eq!(bindings, expected);
    }
    // The workloads run under those service accounts: the server pod, with
    // the controller container exactly when controller.enabled, under
    // sigil-server; the agents under theirs.
    let server = read("deploy/helm/sigil/templates/server.yaml");
    assert!(server.contains("serviceAccountName: sigil-server"));
    assert_eq!(
        server.matches("serviceAccountName:").count(),
        1,
        "one pod in templates/server.yaml"
    );
    let (open, block) = helm_block(&server, "- name: sigil-controller");
    assert_eq!(
        open,
        [".Values.controller.enabled"],
        "templates/server.yaml: the controller container must depend on controller.enabled only"
    );
    let args = block_list(&block, "args:");
    assert_eq!(
        args.iter().take(2).map(String::as_str).collect::<Vec<_>>(),
        ["k8s", "controller"],
        "templates/server.yaml: the container sigil-controller runs `sigil k8s controller`"
    );
    let flag = |name: &str| flag_values(&args, name);
    assert_eq!(
        flag("--cluster-name"),
        ["{{ .Values.clusterName | quote }}"]
    );
    let socket = toml_in_helm(&server, "admin_socket");
    assert_eq!(flag("--admin-socket"), [socket.as_str()]);
    assert!(
        block.contains("- name: admin-socket\n              mountPath: /run/sigil\n")
            && socket.starts_with("/run/sigil/"),
        "templates/server.yaml: the controller mounts the admin socket's emptyDir as the server does"
    );
    assert!(
        block.contains(".Release.Namespace"),
        "templates/server.yaml: the controller ignores the release's own namespace"
    );
    assert!(
        !block.contains("runAsUser") && !block.contains("runAsGroup"),
        "templates/server.yaml: the controller runs as the pod's user, as the server does"
    );
    let agent = read("deploy/helm/sigil/templates/agent.yaml");
    assert!(agent.contains("serviceAccountName: {{ .Values.agent.serviceAccountName | quote }}"));
}

/// The `if` conditions open at the first line of a Helm template that
/// contains `needle`, and the lines of the list item that line starts (up
/// to the next line indented as far or less).
fn helm_block(text: &str, needle: &str) -> (Vec<String>, String) {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?}"));
    let mut open = Vec::new();
    for l in &lines[..at] {
        let t = l.trim();
        let Some(action) = t.strip_prefix("{{").and_then(|a| a.strip_suffix("}}")) else {
            continue;
        };
        let action = action.trim_matches('-').trim();
        if let Some(cond) = action.strip_prefix("if ") {
            open.push(cond.trim().to_owned());
        } else if action.starts_with("range ") || action.starts_with("with ") {
            open.push(action.to_owned());
        } else if action == "end" {
            open.pop();
        }
    }
    let indent = |l: &str| l.len() - l.trim_start().len();
    let own = indent(lines[at]);
    let mut block = String::from(lines[at]);
    block.push('\n');
    for l in &lines[at + 1..] {
        if !l.trim().is_empty() && indent(l) <= own && !l.trim_start().starts_with("{{") {
            break;
        }
        block.push_str(l);
        block.push('\n');
    }
    (open, block)
}

/// The items of the block list under the key `key` in `block`, unquoted.
fn block_list(block: &str, key: &str) -> Vec<String> {
    let mut lines = block.lines().skip_while(|l| l.trim() != key);
    let key_indent = lines.next().map_or(0, |l| l.len() - l.trim_start().len());
    lines
        .take_while(|l| l.len() - l.trim_start().len() > key_indent || l.trim().starts_with("{{"))
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|v| v.trim_matches('"').to_owned())
        .collect()
}

/// A string value of the server.toml that a Helm template holds.
fn toml_in_helm(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("no {key} in the template"))
}

/// The CRDs of the chart (`crds/`, which Helm installs before the templates
/// and never templates) are the generated ones of `deploy/crds/`, which
/// `controller::crds_are_current` keeps equal to the Rust types.
#[test]
fn the_chart_ships_the_generated_crds() {
    let yaml_files = |dir: &str| -> BTreeMap<String, String> {
        let path = workspace_root().join(dir);
        std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read_to_string(&p).unwrap(),
                )
            })
            .collect()
    };
    let generated = yaml_files("deploy/crds");
    let chart = yaml_files("deploy/helm/sigil/crds");
    assert!(
        generated.len() >= 2,
        "deploy/crds has {} CRDs",
        generated.len()
    );
    let fix = "copy them: cp deploy/crds/*.yaml deploy/helm/sigil/crds/";
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "the chart's crds/ (left) and deploy/crds (right) hold other files; {fix}"
    );
    for (name, text) in &generated {
        assert!(
            chart[name] == *text,
            "deploy/helm/sigil/crds/{name} differs from deploy/crds/{name}; {fix}"
        );
    }
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

/// The value after each occurrence of the flag `name` in `args`.
fn flag_values<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == name)
        .map(|w| w[1].as_str())
        .collect()
}

/// The volume, and the path inside it, that holds `path` in a container:
/// the mount with the longest mount path above it.
fn volume_path(container: &Value, path: &str) -> Option<(String, String)> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .filter_map(|m| {
            let dir = m["mountPath"].as_str()?.trim_end_matches('/');
            let rest = path.strip_prefix(dir)?.strip_prefix('/')?;
            let sub = m["subPath"].as_str().unwrap_or_default();
            Some((
                dir.len(),
                m["name"].as_str()?.to_owned(),
                format!("{sub}/{rest}"),
            ))
        })
        .max()
        .map(|(_, volume, inner)| (volume, inner))
}

#[test]
fn plain_manifests_wire_the_controller_to_the_server() {
    let docs = plain_manifests();
    let server = toml_of(&docs, "server.toml");
    let agent = toml_of(&docs, "agent.toml");
    let (server, agent) = (&server["server"], &agent["agent"]);
    let statefulset = find(&docs, "StatefulSet");
    let pod = &statefulset["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    let running = |cmd: &[&str]| {
        let found: Vec<&Value> = containers
            .iter()
            .filter(|c| {
                strings(&c["args"])
                    .starts_with(&cmd.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one container of the server pod runs `sigil {}`",
            cmd.join(" ")
        );
        found[0]
    };
    let server_c = running(&["server", "run"]);
    let controller = running(&["k8s", "controller"]);
    let args = strings(&controller["args"]);

    // The cluster: the agents' cluster profile on the server (the parents of
    // PerPod entries are those agents' IDs; node aliases select
    // k8s_psat:cluster:<it>).
    let cluster = agent["k8s_psat"]["cluster"].as_str().unwrap();
    assert!(server["k8s_psat"].get(cluster).is_some());
    assert_eq!(flag_values(&args, "--cluster-name"), [cluster]);

    // The admin socket: the server's, through the same volume (an emptyDir
    // of the pod) at the same place inside it.
    let socket = server["admin_socket"].as_str().unwrap();
    let main_rs = read("crates/sigil/src/main.rs");
    let default_socket = main_rs
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("const DEFAULT_ADMIN_SOCKET: &str = \"")
        })
        .and_then(|l| l.strip_suffix("\";"))
        .expect("DEFAULT_ADMIN_SOCKET in crates/sigil/src/main.rs");
    let controller_socket = match flag_values(&args, "--admin-socket").as_slice() {
        [] => default_socket,
        [one] => one,
        more => panic!("--admin-socket given {} times", more.len()),
    };
    let in_server =
        volume_path(server_c, socket).expect("the server's admin socket is on a volume");
    assert_eq!(
        volume_path(controller, controller_socket),
        Some(in_server.clone()),
        "the controller's --admin-socket {controller_socket} is not the server's {socket}"
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == in_server.0.as_str())
        .expect("the socket's volume");
    assert!(
        volume.get("emptyDir").is_some(),
        "the socket's volume is an emptyDir of the pod"
    );

    // The same user: the socket is 0600.
    let user = |c: &Value| {
        c["securityContext"]["runAsUser"]
            .as_i64()
            .or_else(|| pod["securityContext"]["runAsUser"].as_i64())
    };
    assert!(user(server_c).is_some(), "the server's user is fixed");
    assert_eq!(
        user(controller),
        user(server_c),
        "the controller runs as the server's user"
    );

    // sigil's own pods get no workload entries.
    let namespace = str_at(statefulset, &["metadata", "namespace"]);
    assert!(
        flag_values(&args, "--ignore-namespace").contains(&namespace),
        "the controller ignores the namespace {namespace}"
    );

    // The agents' bootstrap bundle: the ConfigMap the controller publishes
    // into the agents' namespace, mounted where agent.toml looks.
    let daemonset = find(&docs, "DaemonSet");
    let agent_ns = str_at(daemonset, &["metadata", "namespace"]);
    assert!(
        flag_values(&args, "--bundle-namespace").contains(&agent_ns),
        "the controller publishes the bundle into the agents' namespace {agent_ns}"
    );
    assert!(
        !args.iter().any(|a| a == "--publish-bundle=false"),
        "the controller publishes the bundle"
    );
    let configmap = match flag_values(&args, "--bundle-configmap").as_slice() {
        [] => sigil_k8s_controller::publish::DEFAULT_CONFIGMAP_NAME,
        [one] => one,
        more => panic!("--bundle-configmap given {} times", more.len()),
    };
    let agent_pod = &daemonset["spec"]["template"]["spec"];
    let mounted = agent_pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| {
            v["projected"]["sources"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .any(|s| s["configMap"]["name"] == configmap);
    assert!(mounted, "the agents mount the ConfigMap {configmap}");
    let bundle_path = agent["trust_bundle_path"].as_str().unwrap();
    assert!(
        bundle_path.ends_with(&format!("/{}", sigil_k8s_controller::publish::KEY_PEM)),
        "agent.toml's trust_bundle_path {bundle_path} is the ConfigMap's key"
    );
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
