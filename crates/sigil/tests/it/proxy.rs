//! `sigil proxy run` as an operator runs it, against a real server and
//! agent: frontend app → frontend proxy (outbound) → mutual TLS → backend
//! proxy (inbound) → backend app, with the policy allowing the frontend
//! and denying another workload; and `sigil policy check|graph`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigil_testkit::free_addr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cluster_with_me;

/// Kills a child process when dropped.
struct Guard(Child, std::path::PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Guard {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

fn spawn_proxy(dir: &Path, name: &str, config: &str) -> Guard {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(assert_cmd::cargo::cargo_bin("sigil"))
        .args(["proxy", "run", "--config"])
        .arg(&cfg)
        .env("SIGIL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Guard(child, log)
}

/// Waits until the proxy says it listens on `addr` (without connecting,
/// which would open an upstream connection through an outbound listener).
async fn wait_listening(addr: std::net::SocketAddr, who: &Guard) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !who.log().contains(&format!("listening on {addr}")) {
        assert!(
            Instant::now() < deadline,
            "{addr} never listened:\n{}",
            who.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tiny HTTP/1.1 app: answers each request with the `x-spiffe-id` values it received.
async fn whoami_app() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let ids: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(k, _)| k.eq_ignore_ascii_case("x-spiffe-id"))
                    .map(|(_, v)| v.trim())
                    .collect();
                let body = format!("hello {}\n", ids.join(" + "));
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn get(addr: std::net::SocketAddr, extra: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nhost: backend\r\n{extra}connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

const POLICY: &str = r#"
[[allow]]
name = "frontend-to-backend"
from = { spiffe_id = "spiffe://example.org/frontend" }
to   = { spiffe_id = "spiffe://example.org/backend" }

[[deny]]
name = "no-batch-jobs"
from = { id_prefix = "spiffe://example.org/batch" }
to   = { trust_domain = "example.org" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_reaches_backend_through_two_proxies_and_others_are_denied() {
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let sel = format!("unix:uid:{}", nix::unistd::getuid());
    for path in ["/frontend", "/backend", "/batch/report"] {
        let e = cluster.register(path, &[&sel]).await.unwrap();
        cluster.wait_for_svid(&e.spiffe_id).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.toml"), POLICY).unwrap();
    let socket = cluster.socket_uri();
    let app = whoami_app().await;
    let (inbound, fe_out, batch_out) = (
        free_addr().unwrap(),
        free_addr().unwrap(),
        free_addr().unwrap(),
    );

    let backend = spawn_proxy(
        dir.path(),
        "backend",
        &format!(
            r#"workload_api_socket = "{socket}"
spiffe_id = "spiffe://example.org/backend"
policy_file = "policy.toml"

[[inbound]]
name = "backend"
listen = "{inbound}"
forward_to = "{app}"
protocol = "http"
caller_header = "x-spiffe-id"
"#
        ),
    );
    let outbound = |id: &str, listen: std::net::SocketAddr| {
        format!(
            r#"workload_api_socket = "{socket}"
spiffe_id = "spiffe://example.org/{id}"

[[outbound]]
name = "to-backend"
listen = "{listen}"
upstream = "{inbound}"
upstream_spiffe_id = "spiffe://example.org/backend"
protocol = "http"
"#
        )
    };
    let frontend = spawn_proxy(dir.path(), "frontend", &outbound("frontend", fe_out));
    let batch = spawn_proxy(dir.path(), "batch", &outbound("batch/report", batch_out));
    wait_listening(inbound, &backend).await;
    wait_listening(fe_out, &frontend).await;
    wait_listening(batch_out, &batch).await;

    // The frontend's request arrives with its authenticated ID; the copy it
    // tried to set itself is gone.
    let resp = get(fe_out, "x-spiffe-id: spiffe://example.org/admin\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 200 OK"),
        "{resp}\n{}",
        backend.log()
    );
    assert!(
        resp.ends_with("hello spiffe://example.org/frontend\n"),
        "{resp}"
    );

    // The batch job's call is denied by the backend's proxy with a 403.
    let resp = get(batch_out, "").await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden"), "{resp}");
    assert!(
        resp.contains(
            "spiffe://example.org/batch/report is not allowed to call spiffe://example.org/backend"
        ),
        "{resp}"
    );

    // Both decisions are logged with their fields.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = backend.log();
        // (The log may be coloured; match the values, not the punctuation.)
        if log.contains("connection denied")
            && log.contains("\"no-batch-jobs\"")
            && log.contains("connection authorized")
            && log.contains("\"frontend-to-backend\"")
        {
            break;
        }
        assert!(Instant::now() < deadline, "decisions not logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((frontend, batch, backend));
    cluster.shutdown().await;
}

fn sigil() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("sigil").unwrap()
}

#[test]
fn policy_check_explains_and_sets_the_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let p = policy.to_str().unwrap();

    let out = sigil()
        .args(["policy", "check", "--policy", p])
        .args([
            "--from",
            "spiffe://example.org/frontend",
            "--to",
            "spiffe://example.org/backend",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("allowed by rule [[allow]] #1 \"frontend-to-backend\" (line 2)\n"),
        "{text}"
    );

    let out = sigil()
        .args(["policy", "check", "--policy", p])
        .args([
            "--from",
            "spiffe://example.org/batch/x",
            "--to",
            "spiffe://example.org/backend",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("denied by rule [[deny]] #1 \"no-batch-jobs\" (line 7)\n"),
        "{text}"
    );

    let out = sigil()
        .args(["policy", "check", "--policy", p])
        .args([
            "--from",
            "spiffe://example.org/backend",
            "--to",
            "spiffe://example.org/frontend",
        ])
        .args(["--attr", "region=us-east-1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("denied: no rule allows it (denied by default)\n")
    );

    for bad in [
        vec!["--from", "frontend", "--to", "spiffe://example.org/backend"],
        vec![
            "--from",
            "spiffe://example.org/a",
            "--to",
            "spiffe://example.org/b",
            "--attr",
            "colour=red",
        ],
    ] {
        let out = sigil()
            .args(["policy", "check", "--policy", p])
            .args(&bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    }
    let out = sigil()
        .args(["policy", "check", "--policy", "/nonexistent/policy.toml"])
        .args([
            "--from",
            "spiffe://example.org/a",
            "--to",
            "spiffe://example.org/b",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let dot = sigil()
        .args(["policy", "graph", "--policy", p])
        .output()
        .unwrap();
    assert!(dot.status.success());
    assert!(String::from_utf8_lossy(&dot.stdout).starts_with("digraph policy {"));
    let mermaid = sigil()
        .args(["policy", "graph", "--policy", p, "--format", "mermaid"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&mermaid.stdout);
    assert!(
        text.contains("n0 -->|\"frontend-to-backend\"| n1"),
        "{text}"
    );
}

#[test]
fn proxy_run_rejects_a_bad_config_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        "[[outbound]]\nlisten = \"0.0.0.0:9000\"\nupstream = \"backend:8443\"\nupstream_spiffe_id = \"spiffe://example.org/backend\"\n",
    )
    .unwrap();
    let out = sigil()
        .args(["proxy", "run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outbound[0].listen: 0.0.0.0:9000 is not a loopback address"),
        "{err}"
    );
}
