//! Bad input through the command line and the admin API: a clear error,
//! the right exit code or status, and nothing changed.

use std::os::unix::fs::PermissionsExt;

use assert_cmd::Command;
use sigil_proto::server::v1 as pb;
use sigil_testkit::Cluster;

use crate::cli::run_admin;
use crate::init;

fn sigil() -> Command {
    Command::cargo_bin("sigil").unwrap()
}

fn refused(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(needle),
        "expected a refusal mentioning {needle:?}, got {:?}: {stderr}",
        out.status.code()
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Every entry field is bounded, control characters never reach a stored
/// hint, and times past what RFC 3339 can write are refused, so `entry
/// show` can always print what the server holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_fields_out_of_bounds_are_refused_and_nothing_is_stored() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let admin = cluster.admin_socket();
    let agent = cluster.agent_id().to_string();
    let base = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        &agent,
        "--selector",
        "unix:uid:1000",
    ];
    let many: Vec<String> = (0..65).map(|i| format!("td{i}.org")).collect();
    let mut too_many = vec![];
    for td in &many {
        too_many.extend(["--federates-with", td.as_str()]);
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--expires-at", "253402300800"], "out of range"),
        (vec!["--expires-at", "9223372036854775807"], "out of range"),
        (
            vec!["--hint", "a\nSPIFFE ID        : spiffe://x/y"],
            "control character",
        ),
        (vec!["--hint", "\u{1b}[2J"], "control character"),
        (too_many, "at most 64 trust domains"),
        (
            vec![
                "--federates-with",
                "other.org",
                "--federates-with",
                "other.org",
            ],
            "twice",
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter().copied());
        let out = run_admin(&admin, &args, None).await;
        refused(&out, needle);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
    // The same through the API directly, with a 260,000-name list (2 MB on
    // the wire) that is counted before anything is parsed.
    let mut client = crate::federation::admin(&cluster).await;
    let e = pb::Entry {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: agent.clone(),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    };
    let mut huge = e.clone();
    huge.federates_with = (0..260_000).map(|i| format!("t{i}.o")).collect();
    let mut forever = e.clone();
    forever.expires_at = i64::MAX;
    let mut hint = e.clone();
    hint.hint = "ok\u{0}".into();
    for (bad, needle) in [
        (huge, "at most 64 trust domains"),
        (forever, "out of range"),
        (hint, "control character"),
    ] {
        let results = client
            .batch_create_entry(pb::BatchCreateEntryRequest { entries: vec![bad] })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(results[0].entry.is_none());
        assert!(results[0].error.contains(needle), "{:?}", results[0].error);
    }

    let out = run_admin(&admin, &["entry", "show", "-o", "json"], None).await;
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");
    cluster.shutdown().await;
}

/// Federated bundles are bounded in all: every agent receives every one of
/// them in the first page of each sync update, so a set larger than what an
/// agent decodes (16 MiB) would cut every node off. `sigil bundle set` is
/// refused once they would exceed 8 MiB together, nothing of the refused
/// bundle is stored, and the agent keeps syncing with what is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_beyond_what_agents_read_are_refused_and_agents_keep_syncing() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let admin = cluster.admin_socket();
    let now = std::time::SystemTime::now();
    let jwt = sigil_svid::jwt::JwtAuthority::generate(std::time::Duration::from_secs(86_400), now)
        .unwrap();
    // One public key under many key IDs: about 0.95 MiB of JSON.
    let big = |name: &str| -> String {
        let mut b = sigil_svid::bundle::Bundle::new(sigil_types::TrustDomain::new(name).unwrap());
        while b.to_json().len() < 950 * 1024 {
            for _ in 0..500 {
                let mut k = jwt.public_jwk();
                k.kid = Some(format!("k{}", b.jwt_authorities.len()));
                b.jwt_authorities.push(k);
            }
        }
        b.to_json()
    };
    let mut stored = 0;
    let mut refusals = 0;
    for i in 0..18 {
        let td = format!("p{i}.org");
        let out = run_admin(
            &admin,
            &["bundle", "set", "--trust-domain", &td],
            Some(&big(&td)),
        )
        .await;
        if out.status.success() {
            assert_eq!(refusals, 0, "{td} stored after a refusal");
            stored += 1;
        } else {
            refused(&out, "at most 8388608 in all");
            refusals += 1;
        }
    }
    // 8 x 0.95 MiB fit in 8 MiB; the ninth does not.
    assert_eq!((stored, refusals), (8, 10));
    let out = run_admin(&admin, &["bundle", "list", "-o", "json"], None).await;
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["trust_domain"].as_str().map(str::to_owned))
        .filter(|t| t.starts_with('p'))
        .collect();
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(!names.contains(&"p8.org".to_owned()), "{names:?}");
    // The agent, which received the 7.6 MiB of bundles, still syncs: an
    // entry created now reaches it and is signed.
    let uid = nix::unistd::getuid();
    let entry = cluster
        .register_with("/after-bundles", &[&format!("unix:uid:{uid}")], |e| {
            e.federates_with = vec![sigil_types::TrustDomain::new("p3.org").unwrap()];
        })
        .await
        .unwrap();
    cluster.wait_for_svid(&entry.spiffe_id).await.unwrap();
    cluster.shutdown().await;
}

/// Flags that contradict each other, or that would be ignored, are refused
/// by the command line before anything is sent.
#[test]
fn contradictory_or_ignored_flags_are_refused() {
    let out = sigil()
        .env("SIGIL_ADMIN_SOCKET", "/nonexistent/admin.sock")
        .args([
            "entry",
            "create",
            "--node",
            "--parent-id",
            "spiffe://example.org/sigil/agent/x",
            "--spiffe-id",
            "spiffe://example.org/node",
            "--selector",
            "k8s_psat:cluster:c",
        ])
        .output()
        .unwrap();
    refused(&out, "--parent-id");
    assert_eq!(out.status.code(), Some(2));
    let out = sigil()
        .env("SIGIL_ADMIN_SOCKET", "/nonexistent/admin.sock")
        .args(["entry", "show", "--match", "exact"])
        .output()
        .unwrap();
    refused(&out, "--selector");
    assert_eq!(out.status.code(), Some(2));
    let out = sigil()
        .env("SIGIL_ADMIN_SOCKET", "/nonexistent/admin.sock")
        .args([
            "entry",
            "show",
            "--selector",
            "unix:uid:0",
            "--match",
            "most",
        ])
        .output()
        .unwrap();
    refused(&out, "superset");
    assert_eq!(out.status.code(), Some(2));
}

/// ListEntries: a page token that no page gave is an error, not an empty
/// page; updating an entry that does not exist says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_page_tokens_and_missing_entries_get_clear_errors() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let a = cluster.register("/a", &["unix:uid:1"]).await.unwrap();
    cluster.register("/b", &["unix:uid:2"]).await.unwrap();
    let mut client = crate::federation::admin(&cluster).await;
    let err = client
        .list_entries(pb::ListEntriesRequest {
            page_token: "junk".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // Real tokens page through everything.
    let mut seen = vec![];
    let mut token = String::new();
    loop {
        let page = client
            .list_entries(pb::ListEntriesRequest {
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.entries.into_iter().map(|e| e.spiffe_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    seen.sort();
    assert_eq!(seen, ["spiffe://example.org/a", "spiffe://example.org/b"]);

    // An update of a missing entry that would also clash with /a: "not
    // found" is what the caller needs to hear.
    let mut ghost = pb::Entry::from(&a);
    ghost.id = "does-not-exist".into();
    let results = client
        .batch_update_entry(pb::BatchUpdateEntryRequest {
            entries: vec![ghost],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        results[0].error.contains("does-not-exist") && results[0].error.contains("not found"),
        "{:?}",
        results[0].error
    );
    cluster.shutdown().await;
}

/// `svid fetch --write` makes the directory it is given (0700) but not its
/// missing parents, and never changes the mode of an existing directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_fetch_write_creates_only_the_directory_it_is_given() {
    let (cluster, _me) = crate::cluster_with_me(Default::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let socket = cluster.socket_uri();
    let fetch = |dir: std::path::PathBuf| {
        let socket = socket.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                sigil()
                    .env("SPIFFE_ENDPOINT_SOCKET", socket)
                    .args(["svid", "fetch", "--write"])
                    .arg(dir)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let deep = tmp.path().join("missing/parent/out");
    let out = fetch(deep.clone()).await;
    refused(&out, "cannot create the directory");
    assert!(!tmp.path().join("missing").exists());

    let fresh = tmp.path().join("out");
    let out = fetch(fresh.clone()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("svid.0.key")), 0o600);

    // An existing shared directory keeps its mode.
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = fetch(shared.clone()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    assert_eq!(mode(&shared.join("svid.0.key")), 0o600);
    cluster.shutdown().await;
}

/// `policy check` and `policy graph` agree on bad input (exit 2), and one
/// attribute given twice is refused instead of one value silently winning.
#[test]
fn policy_commands_refuse_bad_input_alike() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("[[allow]]\nfrom = \"{}\n", "x".repeat(100_000)),
    )
    .unwrap();
    let check = sigil()
        .args(["policy", "check", "--policy"])
        .arg(&bad)
        .args([
            "--from",
            "spiffe://example.org/a",
            "--to",
            "spiffe://example.org/b",
        ])
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2));
    // The error quotes the bad line, but not all 100 KB of it.
    assert!(check.stderr.len() < 8192, "{} bytes", check.stderr.len());
    let graph = sigil()
        .args(["policy", "graph", "--policy"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(graph.status.code(), Some(2));
    assert!(graph.stderr.len() < 8192, "{} bytes", graph.stderr.len());

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[allow]]\nname = \"a-to-b\"\nfrom = { spiffe_id = \"spiffe://example.org/a\" }\nto = { spiffe_id = \"spiffe://example.org/b\" }\n",
    )
    .unwrap();
    let out = sigil()
        .args(["policy", "check", "--policy"])
        .arg(&good)
        .args([
            "--from",
            "spiffe://example.org/a",
            "--to",
            "spiffe://example.org/b",
        ])
        .args(["--attr", "region=a", "--attr", "region=b"])
        .output()
        .unwrap();
    refused(&out, "given twice");
    assert_eq!(out.status.code(), Some(2));
}

/// A JWT-SVID request the server refuses as malformed (more audiences than
/// it signs for) reaches the workload as `InvalidArgument`, which clients do
/// not retry, not as `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_jwt_request_is_invalid_argument_not_unavailable() {
    use sigil_proto::workload::JwtsvidRequest;
    use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let (cluster, me) = crate::cluster_with_me(Default::default()).await;
    let channel = crate::unix_channel(cluster.agent_config.socket_path.clone()).await;
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(JwtsvidRequest {
        audience: (0..33).map(|i| format!("aud-{i}")).collect(),
        spiffe_id: me.to_string(),
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let err = raw.fetch_jwtsvid(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("32"), "{err:?}");
    // A 60 KB audience is refused too, and its text is not echoed whole.
    let mut req = tonic::Request::new(JwtsvidRequest {
        audience: vec!["a".repeat(60_000)],
        spiffe_id: me.to_string(),
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let err = raw.fetch_jwtsvid(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() < 1024, "{}", err.message().len());
    cluster.shutdown().await;
}
