//! Issue #12: py-spiffe, the Python SPIFFE library (over grpcio, gRPC
//! C-core, which sends the percent-encoded socket path as `:authority`),
//! against a real `sigil dev`: X509 fetch and stream, bundles, JWT fetch,
//! JWT bundles (fetch and stream), ValidateJWTSVID, and the error for a call
//! without the `workload.spiffe.io` header. The Python side is
//! `tests/py/pyspiffe_client.py`; it prints one JSON object, asserted on here.
//!
//! `SIGIL_TEST_PYTHON` names a Python with `spiffe` (py-spiffe) installed;
//! `.ci/run` makes that venv. Without it the test fails under `CI=true` and
//! is skipped, with a message, otherwise.

use std::process::Command;

use serde_json::Value;

use crate::procs::{Proc, START, bin, fetch_svid, log_tail, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_drives_every_workload_api_call_of_sigil_dev() {
    let python = std::env::var_os("SIGIL_TEST_PYTHON");
    if !sigil_testkit::runnable(
        "py_spiffe_drives_every_workload_api_call_of_sigil_dev",
        python.is_some(),
        "SIGIL_TEST_PYTHON is unset (a python with `pip install spiffe`; .ci/run makes one)",
    ) {
        return;
    }
    let Some(python) = python else { return };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dev.log");
    let data = dir.path().join("dev");
    let mut cmd = Command::new(bin());
    cmd.args(["dev", "--data-dir"]).arg(&data);
    let mut dev = Proc::spawn(cmd, &log);
    let socket = data.join("public").join("agent.sock");
    let uri = format!("unix://{}", socket.display());
    // The Rust client (grpc-go's `localhost`) sees the SVID first, so the
    // script runs against a ready agent.
    let svid = wait_until(START, "sigil dev serving an SVID", || fetch_svid(&uri)).await;
    let me = svid.spiffe_id().to_string();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pyspiffe_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(&socket)
            .env("PYTHONWARNINGS", "ignore")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    dev.assert_running();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "script failed: {stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&log)
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let td = "example.org";
    assert_eq!(r["x509_svid"]["spiffe_id"], me.as_str(), "{r:#}");
    assert!(r["x509_svid"]["chain_len"].as_u64() >= Some(1), "{r:#}");
    assert_eq!(r["x509_stream"]["spiffe_id"], me.as_str(), "{r:#}");
    assert_eq!(
        r["x509_stream"]["bundle_trust_domains"],
        serde_json::json!([td]),
        "{r:#}"
    );
    assert!(r["x509_bundles"][td].as_u64() >= Some(1), "{r:#}");
    assert_eq!(r["jwt_svid"]["spiffe_id"], me.as_str(), "{r:#}");
    assert_eq!(
        r["jwt_svid"]["audience"],
        serde_json::json!(["pyspiffe-test"]),
        "{r:#}"
    );
    assert!(r["jwt_bundles"][td].as_u64() >= Some(1), "{r:#}");
    assert_eq!(r["jwt_bundles_stream"], serde_json::json!([td]), "{r:#}");
    assert_eq!(r["validate_jwt_svid"]["spiffe_id"], me.as_str(), "{r:#}");
    assert_eq!(
        r["validate_wrong_audience"]["refused"], "ValidateJwtSvidError",
        "{r:#}"
    );
    assert_eq!(r["missing_header"]["code"], "INVALID_ARGUMENT", "{r:#}");
    assert!(dev.stop().success(), "{}", log_tail(&log));
}
