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
        // Issue #12 item 5: the /sigil space is sigil's own (server, agents).
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/sigil/server",
                "--parent-id",
                &agent,
                "--selector",
                "unix:uid:1",
            ],
            "spiffe_id spiffe://example.org/sigil/server is reserved",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/SIGIL/agent/join_token/0123456789abcdef",
                "--parent-id",
                &agent,
                "--selector",
                "unix:uid:1",
            ],
            "is reserved",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/sigil",
                "--parent-id",
                &agent,
                "--selector",
                "unix:uid:1",
            ],
            "is reserved",
        ),
        (
            vec![
                "--node",
                "--spiffe-id",
                "spiffe://example.org/sigil/agent/join_token/0123456789abcdef",
                "--selector",
                "unix:uid:1",
            ],
            "node alias spiffe_id spiffe://example.org/sigil/agent/join_token/0123456789abcdef is reserved",
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
    let out = run(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--spiffe-id",
        "spiffe://example.org/sigil/server",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("is reserved"),
        "update to a reserved ID: {stderr}"
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
    let channel = crate::unix_channel(cluster.admin_socket()).await;
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

/// Issue #12 item 4 through `sigil k8s selectors`: cgroup paths that name the
/// blog pod's container outside the kubelet's hierarchy (a user's delegated
/// subtree, another container's child cgroup, a foreign root), with both
/// drivers and cgroup v1/v2, get none of its selectors; the real path does.
#[test]
fn k8s_selectors_refuses_cgroups_shaped_like_a_pods() {
    let f = fixtures();
    let pods = f.join("kubelet/spire_pod_list.json");
    let dir = tempfile::tempdir().unwrap();
    let cgroup = dir.path().join("cgroup");
    let blog_uid = "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796";
    let cid = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    let other = "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6";
    let run = |text: &str, extra: &[&str]| {
        std::fs::write(&cgroup, text).unwrap();
        sigil()
            .args(["k8s", "selectors", "--pods"])
            .arg(&pods)
            .arg("--cgroup")
            .arg(&cgroup)
            .args(extra)
            .output()
            .unwrap()
    };
    for systemd in [false, true] {
        let (blog, attacker) = if systemd {
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/docker-{cid}.scope"
                ),
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda2830d0d_b0f0_4ff0_81b5_0ee4e299cf80.slice/cri-containerd-{other}.scope"
                ),
            )
        } else {
            (
                format!("/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/{cid}"),
                format!("/kubepods/besteffort/poda2830d0d-b0f0-4ff0-81b5-0ee4e299cf80/{other}"),
            )
        };
        for v1 in [false, true] {
            let file = |path: &str| {
                if v1 {
                    format!("12:pids:{path}\n5:memory:{path}\n3:rdma:/\n1:name=systemd:{path}\n")
                } else {
                    format!("0::{path}\n")
                }
            };
            let out = run(&file(&blog), &[]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.lines().any(|l| l == blog_uid),
                "{blog}: {stdout}"
            );
            for (what, forged, why) in [
                (
                    "user",
                    format!("/user.slice/user-1000.slice/user@1000.service/app.slice{blog}"),
                    "outside the kubelet's pod cgroups",
                ),
                (
                    "child",
                    format!("{attacker}{blog}"),
                    &format!("container {other}")[..],
                ),
                (
                    "foreign",
                    format!("/machine.slice/machine-qemu.scope{blog}"),
                    "outside the kubelet's pod cgroups",
                ),
            ] {
                let out = run(&file(&forged), &[]);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{what} {forged}: accepted");
                assert!(out.stdout.is_empty(), "{what} {forged}");
                assert!(
                    stderr.contains("no k8s selectors") && stderr.contains(why),
                    "{what} {forged}: {stderr}"
                );
            }
        }
    }
    // A custom kubelet cgroupRoot: refused by default, found once configured.
    let kind =
        format!("0::/kubelet/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/{cid}\n");
    assert!(!run(&kind, &[]).status.success());
    let out = run(&kind, &["--kubelet-cgroup-root", "/kubelet"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == blog_uid)
    );
    // mountinfo is not an input any more.
    let out = run("0::/\n", &["--mountinfo", "/dev/null"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mountinfo"));
}

/// Runs `sigil` with the cluster's admin socket, off the async runtime.
pub(crate) async fn run_admin(
    admin: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> std::process::Output {
    let admin = admin.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut c = sigil();
        c.env("SIGIL_ADMIN_SOCKET", admin).args(&args);
        if let Some(s) = stdin {
            c.write_stdin(s);
        }
        c.output().unwrap()
    })
    .await
    .unwrap()
}

fn ok_json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fails_with(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(needle),
        "expected a failure mentioning {needle:?}: {stderr}"
    );
}

/// A CA and a JWT key of a foreign trust domain.
fn foreign_domain(
    name: &str,
) -> (
    sigil_svid::x509::X509Authority,
    sigil_svid::jwt::JwtAuthority,
    sigil_svid::bundle::Bundle,
) {
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let td = sigil_types::TrustDomain::new(name).unwrap();
    let ca = sigil_svid::x509::X509Authority::generate(&td, day, now).unwrap();
    let jwt = sigil_svid::jwt::JwtAuthority::generate(day, now).unwrap();
    let mut b = sigil_svid::bundle::Bundle::new(td);
    b.x509_authorities.push(ca.cert_der().to_vec());
    b.jwt_authorities.push(jwt.public_jwk());
    (ca, jwt, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_and_federation_commands_round_trip_and_refuse_bad_input() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let admin = cluster.admin_socket();
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, partner) = foreign_domain("partner.org");
    let pem_path = dir.path().join("partner.pem");
    std::fs::write(&pem_path, partner.x509_pem()).unwrap();
    let pem = pem_path.to_str().unwrap();
    let json_path = dir.path().join("partner.json");
    std::fs::write(&json_path, partner.to_json()).unwrap();
    let json = json_path.to_str().unwrap();
    let bad_path = dir.path().join("bad.json");
    std::fs::write(&bad_path, r#"{"keys": [{"kty": "EC", "use": "jwt-svid"}]}"#).unwrap();
    let bad = bad_path.to_str().unwrap();

    // Bad bundle input: a clear error, nothing stored.
    for (args, needle) in [
        (
            vec![
                "--trust-domain",
                "partner.org",
                "--path",
                "/nonexistent/b.json",
            ],
            "cannot read",
        ),
        (
            vec!["--trust-domain", "partner.org", "--path", bad],
            "not a valid SPIFFE bundle",
        ),
        (
            vec!["--trust-domain", "partner.org", "--path", pem],
            "--format pem",
        ),
        (
            vec!["--trust-domain", "Not A Domain", "--path", json],
            "--trust-domain",
        ),
        (
            vec!["--trust-domain", "example.org", "--path", json],
            "own trust domain",
        ),
    ] {
        let mut full = vec!["bundle", "set"];
        full.extend(args);
        fails_with(&run_admin(&admin, &full, None).await, needle);
    }
    let list = ok_json(&run_admin(&admin, &["bundle", "list", "-o", "json"], None).await);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["trust_domain"], "example.org");
    assert_eq!(list[0]["own"], true);

    // PEM from a file, then SPIFFE JSON from standard input.
    let set = ok_json(
        &run_admin(
            &admin,
            &[
                "bundle",
                "set",
                "--trust-domain",
                "partner.org",
                "--format",
                "pem",
                "--path",
                pem,
                "-o",
                "json",
            ],
            None,
        )
        .await,
    );
    assert_eq!(set["trust_domain"], "partner.org");
    assert_eq!(
        set["bundle"]["keys"].as_array().unwrap().len(),
        1,
        "X.509 only"
    );
    let out = run_admin(
        &admin,
        &["bundle", "set", "--trust-domain", "spiffe://partner.org"],
        Some(&partner.to_json()),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("JWT authorities   : 1"));
    let list = ok_json(&run_admin(&admin, &["bundle", "list", "-o", "json"], None).await);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[1]["trust_domain"], "partner.org");
    assert_eq!(list[1]["own"], false);
    assert_eq!(list[1]["bundle"]["keys"].as_array().unwrap().len(), 2);
    let text = run_admin(&admin, &["bundle", "list"], None).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Trust domain      : example.org (own)")
            && text.contains("Trust domain      : partner.org (federated)"),
        "{text}"
    );
    let shown = run_admin(
        &admin,
        &["bundle", "show", "--trust-domain", "partner.org"],
        None,
    )
    .await;
    assert_eq!(
        sigil_svid::pem::pem_to_certs(&String::from_utf8_lossy(&shown.stdout)).unwrap(),
        vec![ca.cert_der().to_vec()]
    );

    // Federation relationships: argument checks before anything is sent.
    let base = ["federation", "create", "--trust-domain", "other.org"];
    for (extra, needle) in [
        (
            vec!["--bundle-endpoint-profile", "https_web"],
            "--bundle-endpoint-url is required",
        ),
        (
            vec!["--bundle-endpoint-url", "https://127.0.0.1:1/"],
            "--bundle-endpoint-profile is required",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                "http://127.0.0.1:1/",
                "--bundle-endpoint-profile",
                "https_web",
            ],
            "must start with https://",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                "https://127.0.0.1:1/",
                "--bundle-endpoint-profile",
                "https_spiffe",
            ],
            "--endpoint-spiffe-id",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                "https://127.0.0.1:1/",
                "--bundle-endpoint-profile",
                "https_web",
                "--endpoint-spiffe-id",
                "spiffe://other.org/sigil/server",
            ],
            "only to the https_spiffe profile",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                "https://127.0.0.1:1/",
                "--bundle-endpoint-profile",
                "spiffe",
            ],
            "invalid value",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                "https://127.0.0.1:1/",
                "--bundle-endpoint-profile",
                "https_web",
                "--trust-domain-bundle-path",
                bad,
            ],
            "not a valid SPIFFE bundle",
        ),
    ] {
        let mut full = base.to_vec();
        full.extend(extra);
        fails_with(&run_admin(&admin, &full, None).await, needle);
    }
    let none = ok_json(&run_admin(&admin, &["federation", "list", "-o", "json"], None).await);
    assert_eq!(none, serde_json::json!([]));

    // Create (with a bootstrap bundle), show, update, refresh, delete.
    let created = ok_json(
        &run_admin(
            &admin,
            &[
                "federation",
                "create",
                "--trust-domain",
                "other.org",
                "--bundle-endpoint-url",
                "https://127.0.0.1:1/bundle",
                "--bundle-endpoint-profile",
                "https_spiffe",
                "--endpoint-spiffe-id",
                "spiffe://other.org/sigil/server",
                "--trust-domain-bundle-path",
                pem,
                "--trust-domain-bundle-format",
                "pem",
                "-o",
                "json",
            ],
            None,
        )
        .await,
    );
    assert_eq!(created["bundle_endpoint_profile"], "https_spiffe");
    assert_eq!(
        created["endpoint_spiffe_id"],
        "spiffe://other.org/sigil/server"
    );
    fails_with(
        &run_admin(
            &admin,
            &[
                "federation",
                "create",
                "--trust-domain",
                "other.org",
                "--bundle-endpoint-url",
                "https://127.0.0.1:1/",
                "--bundle-endpoint-profile",
                "https_web",
            ],
            None,
        )
        .await,
        "other.org",
    );
    let list = ok_json(&run_admin(&admin, &["federation", "list", "-o", "json"], None).await);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["bundle_endpoint_url"], "https://127.0.0.1:1/bundle");
    // The bootstrap bundle was stored.
    let b = ok_json(
        &run_admin(
            &admin,
            &[
                "bundle",
                "show",
                "--trust-domain",
                "other.org",
                "--format",
                "spiffe",
            ],
            None,
        )
        .await,
    );
    assert_eq!(b["keys"].as_array().unwrap().len(), 1);

    let updated = ok_json(
        &run_admin(
            &admin,
            &[
                "federation",
                "update",
                "--trust-domain",
                "other.org",
                "--bundle-endpoint-profile",
                "https_web",
                "-o",
                "json",
            ],
            None,
        )
        .await,
    );
    assert_eq!(updated["bundle_endpoint_profile"], "https_web");
    assert_eq!(updated["endpoint_spiffe_id"], "");
    assert_eq!(
        updated["bundle_endpoint_url"], "https://127.0.0.1:1/bundle",
        "unchanged"
    );
    let shown = run_admin(
        &admin,
        &["federation", "show", "--trust-domain", "other.org"],
        None,
    )
    .await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("Trust domain       : other.org")
            && text.contains("Profile            : https_web"),
        "{text}"
    );
    // Nothing listens on port 1: the refresh fails and says so.
    fails_with(
        &run_admin(
            &admin,
            &["federation", "refresh", "--trust-domain", "other.org"],
            None,
        )
        .await,
        "refreshing the bundle of other.org failed",
    );
    fails_with(
        &run_admin(
            &admin,
            &["federation", "show", "--trust-domain", "nobody.org"],
            None,
        )
        .await,
        "nobody.org",
    );

    let out = run_admin(
        &admin,
        &["federation", "delete", "--trust-domain", "other.org"],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let none = ok_json(&run_admin(&admin, &["federation", "list", "-o", "json"], None).await);
    assert_eq!(none, serde_json::json!([]));
    fails_with(
        &run_admin(
            &admin,
            &["federation", "delete", "--trust-domain", "other.org"],
            None,
        )
        .await,
        "other.org",
    );

    // Bundles are deleted explicitly.
    let out = run_admin(
        &admin,
        &["bundle", "delete", "--trust-domain", "partner.org"],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fails_with(
        &run_admin(
            &admin,
            &["bundle", "delete", "--trust-domain", "partner.org"],
            None,
        )
        .await,
        "partner.org",
    );
    let list = ok_json(&run_admin(&admin, &["bundle", "list", "-o", "json"], None).await);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|b| b["trust_domain"] != "partner.org"),
        "{list}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_attributes_are_set_shown_and_checked() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let admin = cluster.admin_socket();
    let agent = cluster.agent_id().to_string();
    let base = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/api",
        "--parent-id",
        &agent,
        "--selector",
        "k8s:ns:shop",
    ];
    let mut bad = base.to_vec();
    bad.extend(["--attribute", "colour"]);
    fails_with(&run_admin(&admin, &bad, None).await, "unknown attribute");
    let mut good = base.to_vec();
    good.extend([
        "--attribute",
        "region",
        "--attribute",
        "namespace",
        "--attribute",
        "region",
        "-o",
        "json",
    ]);
    let created = ok_json(&run_admin(&admin, &good, None).await);
    let id = created[0]["entry"]["id"].as_str().unwrap().to_owned();
    // Deduplicated, in the documented order.
    assert_eq!(
        created[0]["entry"]["attributes"],
        serde_json::json!(["region", "namespace"])
    );
    let shown = run_admin(&admin, &["entry", "show", "--entry-id", &id], None).await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("Attribute        : namespace") && text.contains("Attribute        : region"),
        "{text}"
    );
    let updated = ok_json(
        &run_admin(
            &admin,
            &[
                "entry",
                "update",
                "--entry-id",
                &id,
                "--attribute",
                "zone",
                "-o",
                "json",
            ],
            None,
        )
        .await,
    );
    assert_eq!(
        updated[0]["entry"]["attributes"],
        serde_json::json!(["zone"])
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_reach_entitled_workloads_and_validate_jwts_offline() {
    use futures_util::StreamExt;
    init();
    let mut cluster = Cluster::start(Default::default()).await.unwrap();
    let admin = cluster.admin_socket();
    let sock = cluster.socket_uri();
    let partner_td = spiffe::TrustDomain::new("partner.org").unwrap();
    let (ca, jwt, partner) = foreign_domain("partner.org");
    let out = run_admin(
        &admin,
        &["bundle", "set", "--trust-domain", "partner.org"],
        Some(&partner.to_json()),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // This process is entitled to partner.org's bundle through its entry.
    let uid = nix::unistd::getuid();
    let entry = cluster
        .register_with("/fed", &[&format!("unix:uid:{uid}")], |e| {
            e.federates_with = vec![sigil_types::TrustDomain::new("partner.org").unwrap()];
        })
        .await
        .unwrap();
    cluster.wait_for_svid(&entry.spiffe_id).await.unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(sock.clone())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the partner bundle arrives")
            .unwrap()
            .unwrap();
        if let Some(b) = ctx.bundle_set().get(&partner_td) {
            let ders: Vec<Vec<u8>> = b
                .authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect();
            assert_eq!(ders, vec![ca.cert_der().to_vec()]);
            break;
        }
    }
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(
        jwt_bundles
            .get(&partner_td)
            .unwrap()
            .find_jwt_authority(jwt.kid())
            .is_some()
    );
    let x509_bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(x509_bundles.get(&partner_td).is_some());

    // A rotated partner bundle is pushed to the open stream.
    let (ca2, _, _) = foreign_domain("partner.org");
    let mut rotated = partner.clone();
    rotated.x509_authorities.push(ca2.cert_der().to_vec());
    rotated.sequence += 1;
    let out = run_admin(
        &admin,
        &["bundle", "set", "--trust-domain", "partner.org"],
        Some(&rotated.to_json()),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ctx = tokio::time::timeout(crate::PROMPT, stream.next())
        .await
        .expect("the rotated bundle is pushed")
        .unwrap()
        .unwrap();
    assert_eq!(
        ctx.bundle_set()
            .get(&partner_td)
            .unwrap()
            .authorities()
            .len(),
        2
    );

    // A partner.org JWT-SVID validates through the agent, with the foreign
    // token's private claims stripped, also while the server is down.
    let now = std::time::SystemTime::now();
    let mut extra = serde_json::Map::new();
    extra.insert("cluster".into(), "east".into());
    let token = jwt
        .sign_with(
            &"spiffe://partner.org/db".parse().unwrap(),
            &["api".to_owned()],
            std::time::Duration::from_secs(600),
            now,
            &sigil_svid::jwt::JwtClaims {
                issuer: None,
                extra,
            },
        )
        .unwrap();
    cluster.stop_server().await;
    cluster.wait_connected(false).await.unwrap();
    let validate = |token: String, sock: String| async move {
        tokio::task::spawn_blocking(move || {
            sigil()
                .args([
                    "jwt",
                    "validate",
                    "--audience",
                    "api",
                    "-o",
                    "json",
                    "--socket",
                    &sock,
                ])
                .write_stdin(format!("Bearer {token}\n"))
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let v = ok_json(&validate(token.clone(), sock.clone()).await);
    assert_eq!(v["spiffe_id"], "spiffe://partner.org/db");
    assert_eq!(v["claims"]["aud"], "api");
    assert!(v["claims"]["exp"].is_i64(), "{v}");
    assert!(
        v["claims"].get("cluster").is_none(),
        "foreign claims are stripped: {v}"
    );

    // A trust domain nobody federates with is refused, clearly.
    let (_, stranger, _) = foreign_domain("stranger.org");
    let bad = stranger
        .sign(
            &"spiffe://stranger.org/x".parse().unwrap(),
            &["api".to_owned()],
            std::time::Duration::from_secs(600),
            now,
        )
        .unwrap();
    fails_with(
        &validate(bad, sock.clone()).await,
        "the JWT-SVID is not valid",
    );
    cluster.start_server().await.unwrap();
    cluster.wait_connected(true).await.unwrap();

    // Deleting the bundle removes it from what the workload receives.
    let out = run_admin(
        &admin,
        &["bundle", "delete", "--trust-domain", "partner.org"],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the deletion is pushed")
            .unwrap()
            .unwrap();
        if ctx.bundle_set().get(&partner_td).is_none() {
            break;
        }
    }
    cluster.shutdown().await;
}
