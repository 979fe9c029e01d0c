//! The code generator: compiles `proto/**/*.proto` with protox (no `protoc`) and
//! tonic-prost-build into a temporary directory and compares the result with
//! the committed `src/gen/`. With `SIGIL_BLESS=1` it writes the result there.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The .proto files, relative to `proto/`.
const PROTOS: &[&str] = &[
    "workload.proto",
    "server.proto",
    // Envoy's Secret Discovery Service (one file per protobuf package).
    "google/rpc/status.proto",
    "envoy/type/v3/semantic_version.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/service/secret/v3/sds.proto",
    // The CSI node plugin (`sigil csi`).
    "csi/v1/csi.proto",
];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The generated `.rs` files of `dir`, by file name.
fn read_rs_files(dir: &Path) -> io::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".rs") && entry.file_type()?.is_file() {
            files.insert(name, fs::read_to_string(entry.path())?);
        }
    }
    Ok(files)
}

/// Runs the generator into `out_dir`.
fn generate(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = crate_dir().join("proto");
    // The google/protobuf/*.proto imports come from protox's bundled copies.
    let fds = protox::compile(PROTOS, [&proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_fds(fds)?;
    Ok(())
}

#[test]
fn generated_code_is_current() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    generate(tmp.path())?;
    let fresh = read_rs_files(tmp.path())?;
    assert!(!fresh.is_empty(), "the generator produced no files");

    let gen_dir = crate_dir().join("src").join("gen");
    fs::create_dir_all(&gen_dir)?;
    let committed = read_rs_files(&gen_dir)?;

    if std::env::var_os("SIGIL_BLESS").is_some_and(|v| v == "1") {
        for (name, text) in &fresh {
            if committed.get(name) != Some(text) {
                fs::write(gen_dir.join(name), text)?;
                eprintln!("wrote src/gen/{name}");
            }
        }
        for name in committed.keys().filter(|n| !fresh.contains_key(*n)) {
            fs::remove_file(gen_dir.join(name))?;
            eprintln!("removed stale src/gen/{name}");
        }
        return Ok(());
    }

    let mut problems = Vec::new();
    for (name, text) in &fresh {
        match committed.get(name) {
            None => problems.push(format!("src/gen/{name} is missing")),
            Some(old) if old != text => problems.push(format!("src/gen/{name} is out of date")),
            Some(_) => {}
        }
    }
    for name in committed.keys().filter(|n| !fresh.contains_key(*n)) {
        problems.push(format!("src/gen/{name} is no longer generated"));
    }
    assert!(
        problems.is_empty(),
        "the committed generated code does not match proto/*.proto:\n  {}\n\
         regenerate it with: SIGIL_BLESS=1 cargo test -p sigil-proto",
        problems.join("\n  ")
    );
    Ok(())
}
