//! The `sigil` binary as users type it.

use assert_cmd::Command;
use predicates::prelude::*;
use sigil_testkit::Cluster;

use crate::init;

fn sigil() -> Command {
    Command::cargo_bin("sigil").unwrap()
}

#[test]
fn help_explains_the_commands() {
    sigil().arg("--help").assert().success().stdout(
        predicate::str::contains("dev")
            .and(predicate::str::contains("entry"))
            .and(predicate::str::contains("svid")),
    );
    sigil()
        .args(["entry", "create", "--help"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("--selector").and(predicate::str::contains("--x509-svid-ttl")),
        );
}

#[test]
fn bad_config_files_are_rejected_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("server.toml");
    std::fs::write(
        &f,
        "[server]\ntrust_domain = \"example.org\"\nfavourite_colour = \"blue\"\n",
    )
    .unwrap();
    sigil()
        .args(["server", "run", "--config"])
        .arg(&f)
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("favourite_colour")
                .and(predicate::str::contains("server.toml")),
        );
    std::fs::write(
        &f,
        "[server]\ntrust_domain = \"example.org\"\nca_ttl = \"forever\"\n",
    )
    .unwrap();
    sigil()
        .args(["server", "run", "--config"])
        .arg(&f)
        .assert()
        .failure()
        .stderr(predicate::str::contains("forever"));
    let a = dir.path().join("agent.toml");
    std::fs::write(
        &a,
        "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"nowhere\"\n",
    )
    .unwrap();
    sigil()
        .args(["agent", "run", "--config"])
        .arg(&a)
        .assert()
        .failure()
        .stderr(predicate::str::contains("server_address"));
}

#[test]
fn the_shipped_examples_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    sigil_server::ServerConfig::load(&root.join("server.toml")).unwrap();
    sigil_agent::AgentConfig::load(&root.join("agent.toml")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_round_trip_and_refuse_bad_input() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let admin = cluster.admin_socket();
    let agent = cluster.agent_id().to_string();
    let run = |args: &[&str]| {
        let admin = admin.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                sigil()
                    .env("SIGIL_ADMIN_SOCKET", admin)
                    .args(&args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };

    let out = run(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        &agent,
        "--selector",
        "unix:uid:1000",
        "--dns",
        "web.example.org",
        "--x509-svid-ttl",
        "30m",
        "-o",
        "json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created[0]["entry"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created[0]["entry"]["x509_svid_ttl"], 1800);

    // Bad input: clear error, nothing created.
    for (args, needle) in [
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                &agent,
                "--selector",
                "unix",
            ],
            "type:value",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://Example.org/x",
                "--parent-id",
                &agent,
                "--selector",
                "unix:uid:1",
            ],
            "trust domain",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                &agent,
                "--selector",
                "unix:uid:1",
                "--x509-svid-ttl",
                "10",
            ],
            "x509-svid-ttl",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://other.org/x",
                "--parent-id",
                &agent,
                "--selector",
                "unix:uid:1",
            ],
            "not in the trust domain",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                &agent,
                "--selector",
                "unix:uid:1000",
            ],
            "already",
        ),
    ] {
        let mut full = vec!["entry", "create"];
        full.extend(args);
        let out = run(&full).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "{full:?}: {stderr}"
        );
    }
    let out = run(&["entry", "show", "-o", "json"]).await;
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        all.as_array().unwrap().len(),
        1,
        "failed creates changed nothing"
    );

    let out = run(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--hint",
        "web",
        "-o",
        "json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["entry", "show", "--entry-id", &id]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Hint             : web")
            && text.contains("DNS name         : web.example.org"),
        "{text}"
    );
    let out = run(&["entry", "show", "--selector", "unix:uid:1000", "-o", "json"]).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let out = run(&["entry", "show", "--selector", "unix:uid:9", "-o", "json"]).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let out = run(&["token", "generate", "--ttl", "5m", "-o", "json"]).await;
    let tok: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        tok["agent_id"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://example.org/sigil/agent/join_token/")
    );
    assert_eq!(tok["token"].as_str().unwrap().split('.').count(), 3);

    let out = run(&["agent", "list", "-o", "json"]).await;
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(agents[0]["spiffe_id"].as_str().unwrap(), agent);
    assert_eq!(agents[0]["connected"], true);

    let out = run(&["bundle", "show"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("-----BEGIN CERTIFICATE-----"));
    let out = run(&["bundle", "show", "--format", "spiffe"]).await;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["use"] == "x509-svid")
    );
    assert!(
        doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["use"] == "jwt-svid")
    );

    let out = run(&["entry", "delete", "--entry-id", &id]).await;
    assert!(out.status.success());
    let out = run(&["entry", "delete", "--entry-id", &id]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"));

    let out = run(&["healthcheck", "--admin-socket", admin.to_str().unwrap()]).await;
    assert!(out.status.success());
    let sock = cluster.socket_uri();
    let out = run(&["healthcheck", "--socket", &sock]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.shutdown().await;
}

#[test]
fn admin_commands_without_a_server_say_what_to_do() {
    sigil()
        .env("SIGIL_ADMIN_SOCKET", "/nonexistent/admin.sock")
        .args(["entry", "show"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("is the server running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_fetch_and_validate_from_the_command_line() {
    let (cluster, _me) = crate::cluster_with_me(Default::default()).await;
    let sock = cluster.socket_uri();
    let out = tokio::task::spawn_blocking({
        let sock = sock.clone();
        move || {
            sigil()
                .args([
                    "jwt",
                    "fetch",
                    "--audience",
                    "api",
                    "-o",
                    "json",
                    "--socket",
                    &sock,
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v[0]["token"].as_str().unwrap().to_owned();
    let t = token.clone();
    let s = sock.clone();
    let ok = tokio::task::spawn_blocking(move || {
        sigil()
            .args(["jwt", "validate", "--audience", "api", "--socket", &s])
            .write_stdin(t)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && text.contains("SPIFFE ID : spiffe://example.org/test"),
        "{text}"
    );
    assert!(text.contains("Claim     : aud = api"), "{text}");
    let bad = tokio::task::spawn_blocking(move || {
        sigil()
            .args([
                "jwt",
                "validate",
                "--audience",
                "other",
                "--token",
                &token,
                "--socket",
                &sock,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("InvalidArgument"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_admin_requests_are_refused() {
    use sigil_proto::server::v1 as pb;
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let path = cluster.admin_socket();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut admin = pb::admin_api_client::AdminApiClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024);
    let agent = cluster.agent_id().to_string();
    let entry = |i: usize| pb::Entry {
        spiffe_id: format!("spiffe://example.org/w{i}"),
        parent_id: agent.clone(),
        selectors: vec![format!("unix:uid:{i}")],
        ..Default::default()
    };
    // More than one batch may carry.
    let err = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: (0..501).map(entry).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("at most 500"), "{}", err.message());
    // Larger than the message limit.
    let mut huge = entry(1);
    huge.hint = "x".repeat(5 * 1024 * 1024);
    let err = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![huge],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    // Malformed fields, each with a message naming the field; nothing stored.
    let mut bad_ttl = entry(2);
    bad_ttl.x509_svid_ttl = -5;
    let mut bad_id = entry(3);
    bad_id.parent_id = "spiffe://example.org/".into();
    let r = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![bad_ttl, bad_id, entry(4)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.results[0].error.contains("x509_svid_ttl"),
        "{}",
        r.results[0].error
    );
    assert!(
        r.results[1].error.contains("parent_id"),
        "{}",
        r.results[1].error
    );
    assert!(r.results[2].error.is_empty() && r.results[2].entry.is_some());
    let list = admin
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
    let err = admin
        .list_entries(pb::ListEntriesRequest {
            selector_match: "sometimes".into(),
            selectors: vec!["a:b".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("exact, subset, superset, any"));
    cluster.shutdown().await;
}

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/k8s")
}

#[test]
fn k8s_selectors_explains_a_pod_and_a_non_pod() {
    let f = fixtures();
    let out = sigil()
        .args(["k8s", "selectors", "--cgroup"])
        .arg(f.join("cgroup/spire_cgroups_pid_in_pod.txt"))
        .arg("--pods")
        .arg(f.join("kubelet/spire_pod_list.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    for want in [
        "k8s:ns:default",
        "k8s:sa:default",
        "k8s:pod-name:blog-24ck7",
        "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796",
        "k8s:container-name:blog",
        "k8s:node-name:k8s-node-1",
        "k8s:pod-label:k8s-app:blog",
    ] {
        assert!(
            lines.iter().any(|l| l == want),
            "missing {want} in {lines:?}"
        );
    }
    sigil()
        .args(["k8s", "selectors", "--cgroup"])
        .arg(f.join("cgroup/spire_cgroups_pid_not_in_pod.txt"))
        .arg("--pods")
        .arg(f.join("kubelet/spire_pod_list.json"))
        .assert()
        .failure()
        .stderr(predicate::str::contains("not in a pod"));
    // A pod list from another node: the container is not found there.
    sigil()
        .args([
            "k8s",
            "selectors",
            "--node-name",
            "some-other-node",
            "--cgroup",
        ])
        .arg(f.join("cgroup/spire_cgroups_pid_in_pod.txt"))
        .arg("--pods")
        .arg(f.join("kubelet/spire_pod_list.json"))
        .assert()
        .failure()
        .stderr(predicate::str::contains("no k8s selectors"));
}
