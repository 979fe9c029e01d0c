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
