//! The binary as an operator runs it: `sigil dev`, and `sigil server run` +
//! `sigil agent run` as separate processes with their health endpoints.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigil_testkit::free_addr;

fn bin() -> std::path::PathBuf {
    assert_cmd::cargo::cargo_bin("sigil")
}

/// Stops a child with SIGTERM and waits for it, killing it if it lingers.
struct Guard(Child);

impl Guard {
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                return self.0.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

/// Starts `sigil dev --data-dir <dir>` and reads its `export` lines up to
/// "Press Ctrl-C" (printed once the identity can be fetched).
fn start_dev(dir: &Path) -> (Guard, Vec<(String, String)>) {
    let mut cmd = Command::new(bin());
    cmd.stderr(Stdio::null());
    start_dev_with(cmd, dir)
}

/// Like [`start_dev`], with `cmd` (the sigil binary, or a wrapper that runs
/// it, with its stderr set up) instead of a plain `sigil`.
fn start_dev_with(mut cmd: Command, dir: &Path) -> (Guard, Vec<(String, String)>) {
    let mut child = Guard(
        cmd.args(["dev", "--data-dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut exports = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(kv) = line.trim().strip_prefix("export ") {
            let (k, v) = kv.split_once('=').unwrap();
            exports.push((k.to_owned(), v.to_owned()));
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    (child, exports)
}

/// `sigil svid fetch` with `exports`; asserts it succeeds, returns its output.
fn svid_fetch_ok(exports: &[(String, String)]) -> String {
    let out = Command::new(bin())
        .args(["svid", "fetch"])
        .envs(exports.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sigil_dev_quickstart_works_as_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, exports) = start_dev(dir.path());
    let names: Vec<_> = exports.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["SPIFFE_ENDPOINT_SOCKET", "SIGIL_ADMIN_SOCKET"]);

    let text = svid_fetch_ok(&exports);
    assert!(
        text.contains("SPIFFE ID         : spiffe://example.org/user/"),
        "{text}"
    );
    let out = Command::new(bin())
        .args(["entry", "show"])
        .envs(exports.clone())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Found 1 entry"));
    assert!(child.stop().success());

    // A second start on the same data keeps the identity and the registration.
    let (mut child, _) = start_dev(dir.path());
    let out = Command::new(bin())
        .args(["entry", "show"])
        .envs(exports.clone())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Found 1 entry"),
        "no duplicate registration"
    );
    svid_fetch_ok(&exports);
    assert!(child.stop().success());
}

/// The mode bits of a path (without the file type).
fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Issue #12 item 2: another local user reaches the Workload API socket of
/// `sigil dev` (and is told it has no identity), but not the admin socket,
/// the database or the keys.
#[test]
fn sigil_dev_serves_other_users_the_workload_api_and_nothing_else() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !crate::need_root("sigil_dev_serves_other_users_the_workload_api_and_nothing_else") {
        return;
    }
    // A parent others may search, as /tmp is for the default data dir.
    let base = tempfile::Builder::new()
        .prefix("sigil-dev-test-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = base.path().join("data");
    let (mut child, exports) = start_dev(&dir);
    let admin_socket = Path::new(&exports[1].1).to_owned();
    assert_eq!(
        exports[0].1,
        format!("unix://{}", dir.join("public/agent.sock").display())
    );
    assert_eq!(admin_socket, dir.join("admin/admin.sock"));
    assert_eq!(mode_of(&dir), 0o711);
    for private in ["server", "agent", "admin"] {
        assert_eq!(mode_of(&dir.join(private)), 0o700, "{private}/");
    }
    assert_eq!(mode_of(&dir.join("public")), 0o755);
    assert_eq!(mode_of(&admin_socket), 0o600);

    // The build directory may sit under a home only root can enter: run a
    // copy from the world-readable base directory.
    let copy = base.path().join("sigil");
    std::fs::copy(bin(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let out = Command::new(&copy)
            .args(args)
            .envs(exports.clone())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = as_nobody(&["svid", "fetch"]);
    assert!(!ok);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("no identity issued"),
        "{stderr}"
    );
    // The admin socket is out of its reach: it cannot even connect (the
    // server's own uid check would otherwise answer).
    let (ok, stderr) = as_nobody(&["entry", "show"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot connect to the admin socket") && !stderr.contains("may not use"),
        "{stderr}"
    );
    // And the database and keys are behind 0700 directories it cannot enter.
    for private in ["server", "agent"] {
        let listed = Command::new("ls")
            .arg(dir.join(private))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(!listed.status.success(), "nobody could list {private}/");
    }

    // The user who started it gets its identity from the same socket.
    svid_fetch_ok(&exports);
    assert!(child.stop().success());
}

#[test]
fn server_and_agent_processes_with_health_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let api = free_addr().unwrap();
    let server_health = free_addr().unwrap();
    let agent_health = free_addr().unwrap();
    let admin = d.join("admin.sock");
    std::fs::write(
        d.join("server.toml"),
        format!(
            "[server]\ntrust_domain = \"example.org\"\nbind_address = \"{api}\"\nadmin_socket = \"{}\"\ndata_dir = \"{}\"\nhealth_address = \"{server_health}\"\n",
            admin.display(),
            d.join("server").display()
        ),
    )
    .unwrap();
    let mut server = Guard(
        Command::new(bin())
            .args(["server", "run", "--config"])
            .arg(d.join("server.toml"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&admin);
    let (code, body) = http_get(server_health, "/healthz");
    assert_eq!(code, 200, "{body}");
    let (code, _) = http_get(server_health, "/readyz");
    assert_eq!(code, 200);

    let out = Command::new(bin())
        .args(["token", "generate", "-o", "json", "--admin-socket"])
        .arg(&admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let socket = d.join("agent.sock");
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"{api}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\nhealth_address = \"{agent_health}\"\n",
            d.join("agent").display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut agent = Guard(
        Command::new(bin())
            .args(["agent", "run", "--config"])
            .arg(d.join("agent.toml"))
            .arg("--join-token")
            .arg(tok["token"].as_str().unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&socket);
    let (code, _) = http_get(agent_health, "/readyz");
    assert_eq!(code, 200);

    let uid = nix::unistd::getuid();
    let out = Command::new(bin())
        .args([
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/proc",
            "--selector",
        ])
        .arg(format!("unix:uid:{uid}"))
        .arg("--parent-id")
        .arg(tok["agent_id"].as_str().unwrap())
        .arg("--admin-socket")
        .arg(&admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uri = format!("unix://{}", socket.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new(bin())
            .args(["svid", "fetch", "--socket", &uri])
            .output()
            .unwrap();
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/proc"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, metrics) = http_get(server_health, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("sigil_server_x509_svids_signed_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sigil_server_attestations_total 1"),
        "{metrics}"
    );
    let (_, metrics) = http_get(agent_health, "/metrics");
    assert!(
        metrics.contains("sigil_agent_svids_signed_total 1"),
        "{metrics}"
    );
    let out = Command::new(bin())
        .args(["healthcheck", "--socket", &uri])
        .output()
        .unwrap();
    assert!(out.status.success());

    assert!(agent.stop().success());
    assert!(server.stop().success());
    assert!(
        !admin.exists() && !socket.exists(),
        "sockets are removed on shutdown"
    );
}

/// Issue #21 item 5: each Workload API connection holds two open files
/// (socket and pidfd). Under an open-files limit of 600, one uid holding 300
/// idle connections used to exhaust the agent's files, so `accept()` failed
/// for everyone. The agent now fits its connection caps to the limit (here
/// (600 - 256) / 2 = 172 in all, 86 per uid), so another user is still
/// served.
#[test]
fn connection_caps_fit_the_open_files_limit_and_one_uid_cannot_exhaust_it() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !crate::need_root("connection_caps_fit_the_open_files_limit_and_one_uid_cannot_exhaust_it") {
        return;
    }
    // This test process holds 300 connections itself.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let base = tempfile::Builder::new()
        .prefix("sigil-dev-fds-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = base.path().join("dev.log");
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=600:600")
        .arg("--")
        .arg(bin())
        .stderr(std::fs::File::create(&log).unwrap());
    let (mut child, exports) = start_dev_with(cmd, &base.path().join("data"));
    let socket = exports[0].1.trim_start_matches("unix://").to_owned();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("open-files limit (600)") && said.contains("172 connections"),
        "{said}"
    );
    // One uid (root, this process) opens 300 connections and keeps them.
    let held: Vec<_> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    // Another user is still served, and told it has no identity.
    let copy = base.path().join("sigil");
    std::fs::copy(bin(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(&copy)
        .args(["svid", "fetch"])
        .envs(exports.clone())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("no identity issued"),
        "{stderr}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    drop(held);
    assert!(child.stop().success());
}

/// `sigil csi` as the DaemonSet runs it: flags from the command line, the
/// CSI socket, SIGTERM ends it and removes the socket. (The mounts are
/// tested in crates/sigil-csi, inside a private mount namespace.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigil_csi_serves_its_flags_and_stops_on_sigterm() {
    use sigil_proto::csi::v1 as csi;
    let dir = tempfile::tempdir().unwrap();
    let socket_dir = dir.path().join("run-sigil-agent");
    let pods = dir.path().join("kubelet/pods");
    std::fs::create_dir_all(&socket_dir).unwrap();
    std::fs::create_dir_all(&pods).unwrap();
    let sock = dir.path().join("plugins/csi.sock");

    // Refusals name the flag.
    let out = Command::new(bin())
        .args(["csi", "--node-id", "node-a", "--workload-api-socket-dir"])
        .arg(dir.path().join("missing"))
        .arg("--csi-socket")
        .arg(&sock)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--workload-api-socket-dir"),
        "{stderr}"
    );
    let out = Command::new(bin())
        .args(["csi", "--driver-name", "bad/name", "--node-id", "n"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("invalid driver name"),
        "{stderr}"
    );
    let out = Command::new(bin())
        .args(["csi"])
        .env_remove("SIGIL_CSI_NODE_ID")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node-id"));

    let mut child = Guard(
        Command::new(bin())
            .args([
                "csi",
                "--node-id",
                "node-a",
                "--driver-name",
                "csi.spiffe.io",
            ])
            .arg("--csi-socket")
            .arg(&sock)
            .arg("--workload-api-socket-dir")
            .arg(&socket_dir)
            .arg("--kubelet-pods-dir")
            .arg(&pods)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&sock);
    let path = sock.clone();
    let channel = tokio::time::timeout(
        Duration::from_secs(20),
        tonic::transport::Endpoint::from_static("http://localhost").connect_with_connector(
            tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let info = tokio::time::timeout(
        Duration::from_secs(20),
        csi::identity_client::IdentityClient::new(channel.clone())
            .get_plugin_info(csi::GetPluginInfoRequest {}),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(info.name, "csi.spiffe.io");
    let node = tokio::time::timeout(
        Duration::from_secs(20),
        csi::node_client::NodeClient::new(channel).node_get_info(csi::NodeGetInfoRequest {}),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(node.node_id, "node-a");
    let status = tokio::task::spawn_blocking(move || child.stop())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the socket is removed on SIGTERM");
}
