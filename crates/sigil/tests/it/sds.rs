//! Envoy SDS v3 on the agent's socket, driven by a client generated from
//! Envoy's own proto definitions (the `envoy-types` crate), so the messages
//! are checked against Envoy's field numbers rather than ours. The
//! certificates are verified with sigil's verifier and with `openssl verify`,
//! and the private key is checked against the certificate with `openssl`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use sigil_svid::bundle::Bundle;
use sigil_testkit::{Cluster, ClusterOptions};
use sigil_types::TrustDomain;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::{PROMPT, cluster_with_me, init};

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// How long to watch for a response that must not come.
const QUIET: Duration = Duration::from_millis(1500);

/// An SDS client on the agent's Unix socket, without the Workload API's
/// security header (Envoy never sends it).
async fn sds_client(cluster: &Cluster) -> SecretDiscoveryServiceClient<Channel> {
    let channel = sigil_client::channel(&cluster.agent_config.socket_path)
        .await
        .unwrap();
    SecretDiscoveryServiceClient::new(channel)
}

/// The node an Envoy 1.31 sends.
fn envoy_node() -> core::Node {
    core::Node {
        id: "sidecar-1".into(),
        cluster: "web".into(),
        user_agent_name: "envoy".into(),
        user_agent_version_type: Some(core::node::UserAgentVersionType::UserAgentBuildVersion(
            core::BuildVersion {
                version: Some(envoy_types::pb::envoy::r#type::v3::SemanticVersion {
                    major_number: 1,
                    minor_number: 31,
                    patch: 2,
                }),
                metadata: None,
            },
        )),
        ..Default::default()
    }
}

fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: Some(envoy_node()),
        resource_names: names.iter().map(|s| (*s).to_owned()).collect(),
        type_url: SECRET_TYPE.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// A StreamSecrets stream: requests go in through `tx`.
struct SdsStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

impl SdsStream {
    async fn open(cluster: &Cluster, first: DiscoveryRequest) -> Result<Self, tonic::Status> {
        let mut client = sds_client(cluster).await;
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let responses = client
            .stream_secrets(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, responses })
    }

    async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The next response, which must come within `within`.
    async fn next(&mut self, within: Duration) -> DiscoveryResponse {
        tokio::time::timeout(within, self.responses.next())
            .await
            .expect("a response arrives")
            .expect("the stream is open")
            .expect("a response, not an error")
    }

    /// The stream's error, which must come promptly.
    async fn error(&mut self) -> tonic::Status {
        match tokio::time::timeout(PROMPT, self.responses.next()).await {
            Ok(Some(Err(status))) => status,
            other => panic!("expected an error status, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives for a while.
    async fn quiet(&mut self) {
        if let Ok(got) = tokio::time::timeout(QUIET, self.responses.next()).await {
            panic!("expected no response, got {got:?}");
        }
    }
}

/// The Secrets of a response, by name, decoded with Envoy's own types.
fn secrets(resp: &DiscoveryResponse) -> std::collections::BTreeMap<String, tls::Secret> {
    resp.resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, SECRET_TYPE);
            let s = tls::Secret::decode(any.value.as_slice()).unwrap();
            (s.name.clone(), s)
        })
        .collect()
}

fn inline(d: &Option<core::DataSource>) -> Vec<u8> {
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(core::data_source::Specifier::InlineBytes(b)) => b.clone(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// The certificate chain (DER) and key (PEM) of a `tls_certificate` Secret.
fn certificate(s: &tls::Secret) -> (Vec<Vec<u8>>, String) {
    let Some(tls::secret::Type::TlsCertificate(c)) = &s.r#type else {
        panic!("{} is not a tls_certificate: {s:?}", s.name);
    };
    let chain = String::from_utf8(inline(&c.certificate_chain)).unwrap();
    let key = String::from_utf8(inline(&c.private_key)).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM");
    (sigil_svid::pem::pem_to_certs(&chain).unwrap(), key)
}

/// The trust domains (bare name, PEM bundle) of a SPIFFE-validator
/// validation context.
fn spiffe_validator(s: &tls::Secret) -> Vec<(String, Vec<u8>)> {
    let Some(tls::secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{} is not a validation_context: {s:?}", s.name);
    };
    let ext = v
        .custom_validator_config
        .as_ref()
        .expect("a custom validator");
    assert_eq!(ext.name, "envoy.tls.cert_validator.spiffe");
    let any = ext.typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, SPIFFE_VALIDATOR_TYPE);
    tls::SpiffeCertValidatorConfig::decode(any.value.as_slice())
        .unwrap()
        .trust_domains
        .into_iter()
        .map(|t| (t.name, inline(&t.trust_bundle)))
        .collect()
}

fn serial(chain: &[Vec<u8>]) -> String {
    sigil_svid::x509::cert_info(&chain[0]).unwrap().serial_hex
}

fn openssl(args: &[&str], dir: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_and_rootca_verify_and_an_ack_gets_no_duplicate() {
    let (cluster, me) = cluster_with_me(Default::default()).await;
    let mut stream = SdsStream::open(&cluster, request(&["default", "ROOTCA"], "", ""))
        .await
        .unwrap();
    let r1 = stream.next(PROMPT).await;
    assert_eq!(r1.type_url, SECRET_TYPE);
    assert!(!r1.version_info.is_empty() && !r1.nonce.is_empty());
    let got = secrets(&r1);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["ROOTCA", "default"]);

    // ROOTCA: the SPIFFE validator with the own trust domain's CAs, which
    // are the server's.
    let domains = spiffe_validator(&got["ROOTCA"]);
    assert_eq!(domains.len(), 1);
    assert_eq!(domains[0].0, "example.org");
    let roots = sigil_svid::pem::pem_to_certs(std::str::from_utf8(&domains[0].1).unwrap()).unwrap();
    let server_roots = cluster
        .server()
        .unwrap()
        .state()
        .ca()
        .bundle()
        .x509_authorities
        .clone();
    assert_eq!(roots, server_roots);

    // default: the caller's SVID, verified against ROOTCA.
    let (chain, key) = certificate(&got["default"]);
    let id = sigil_svid::x509::verify_svid(&chain, &roots, SystemTime::now()).unwrap();
    assert_eq!(id.as_str(), me.to_string());
    // The key belongs to the certificate.
    let key_spki = sigil_svid::keys::PrivateKey::from_pem(&key)
        .unwrap()
        .public_key_spki_der();
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(cert.tbs_certificate.subject_pki.raw, key_spki.as_slice());

    // The same with OpenSSL: the chain verifies against ROOTCA, and the key's
    // public half is the certificate's.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("roots.pem"), &domains[0].1).unwrap();
    std::fs::write(
        dir.path().join("leaf.pem"),
        sigil_svid::pem::certs_to_pem(&chain[..1]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("chain.pem"),
        sigil_svid::pem::certs_to_pem(&chain[1..]),
    )
    .unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    let mut verify = vec!["verify", "-CAfile", "roots.pem"];
    if chain.len() > 1 {
        verify.extend(["-untrusted", "chain.pem"]);
    }
    verify.push("leaf.pem");
    assert!(openssl(&verify, dir.path()).contains("leaf.pem: OK"));
    let cert_pub = openssl(
        &["x509", "-noout", "-pubkey", "-in", "leaf.pem"],
        dir.path(),
    );
    let key_pub = openssl(&["pkey", "-pubout", "-in", "key.pem"], dir.path());
    assert_eq!(cert_pub, key_pub);

    // ACK: no duplicate push.
    stream
        .send(request(&["default", "ROOTCA"], &r1.version_info, &r1.nonce))
        .await;
    stream.quiet().await;

    // Asking for more names answers at once, with a new version and nonce.
    stream
        .send(request(
            &["default", "ROOTCA", me.to_string().as_str()],
            &r1.version_info,
            &r1.nonce,
        ))
        .await;
    let r2 = stream.next(PROMPT).await;
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    let got2 = secrets(&r2);
    let (by_id, _) = certificate(&got2[&me.to_string()]);
    assert_eq!(by_id, chain);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_pushes_a_new_version_with_a_new_nonce() {
    let opts = ClusterOptions {
        x509_svid_ttl: Duration::from_secs(4),
        ca_ttl: Duration::from_secs(600),
        ..Default::default()
    };
    let (cluster, _me) = cluster_with_me(opts).await;
    let mut stream = SdsStream::open(&cluster, request(&["default"], "", ""))
        .await
        .unwrap();
    let first = stream.next(PROMPT).await;
    let mut last = first.clone();
    let mut serials =
        std::collections::BTreeSet::from([serial(&certificate(&secrets(&first)["default"]).0)]);
    let mut versions = std::collections::BTreeSet::from([first.version_info.clone()]);
    let mut nonces = std::collections::BTreeSet::from([first.nonce.clone()]);
    while serials.len() < 3 {
        // Envoy acknowledges every response it applies.
        stream
            .send(request(&["default"], &last.version_info, &last.nonce))
            .await;
        let next = stream.next(Duration::from_secs(20)).await;
        let (chain, _) = certificate(&secrets(&next)["default"]);
        let info = sigil_svid::x509::cert_info(&chain[0]).unwrap();
        assert!(info.not_after > SystemTime::now(), "pushed SVIDs are valid");
        assert!(
            serials.insert(info.serial_hex),
            "a push carries a new certificate"
        );
        assert!(versions.insert(next.version_info.clone()), "new version");
        assert!(nonces.insert(next.nonce.clone()), "new nonce");
        last = next;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_is_not_answered_until_the_secrets_change() {
    let (cluster, me) = cluster_with_me(Default::default()).await;
    // No names: every SVID and bundle of the caller.
    let mut stream = SdsStream::open(&cluster, request(&[], "", ""))
        .await
        .unwrap();
    let r1 = stream.next(PROMPT).await;
    let names: Vec<_> = secrets(&r1).into_keys().collect();
    assert_eq!(names, ["spiffe://example.org", me.to_string().as_str()]);

    // Envoy rejects it: the previous version ("") and the error.
    let mut nack = request(&[], "", &r1.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "failed to load certificate".into(),
        details: vec![],
    });
    stream.send(nack).await;
    stream.quiet().await;
    // A request with a stale nonce is ignored, whatever it asks for.
    stream.send(request(&["ROOTCA"], "", "not-a-nonce")).await;
    stream.quiet().await;
    let metrics = cluster.agent().unwrap().metrics.render();
    assert!(
        metrics.contains("sigil_agent_sds_nacks_total 1"),
        "{metrics}"
    );

    // New content (a second identity for the caller) is pushed.
    let uid = nix::unistd::getuid();
    let second = cluster
        .register("/second", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    let r2 = stream.next(Duration::from_secs(15)).await;
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    assert!(secrets(&r2).contains_key(second.spiffe_id.as_str()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_holds_the_own_and_federated_trust_domains() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    // A foreign trust domain's bundle, held by the server.
    let other_td = TrustDomain::new("other.org").unwrap();
    let other_ca = sigil_svid::x509::X509Authority::generate(
        &other_td,
        Duration::from_secs(3600),
        SystemTime::now(),
    )
    .unwrap();
    let mut other = Bundle::new(other_td.clone());
    other.x509_authorities.push(other_ca.cert_der().to_vec());
    cluster
        .server()
        .unwrap()
        .state()
        .federation()
        .set_bundle(&other_td, &other.to_json())
        .await
        .unwrap();
    let uid = nix::unistd::getuid();
    let entry = cluster
        .register_with("/fed", &[&format!("unix:uid:{uid}")], |e| {
            e.federates_with = vec![other_td.clone()];
        })
        .await
        .unwrap();
    cluster.wait_for_svid(&entry.spiffe_id).await.unwrap();
    let mut rx = cluster.agent().unwrap().snapshots.clone();
    tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|s| s.federated.contains_key(&other_td)),
    )
    .await
    .expect("the agent gets the federated bundle")
    .unwrap();

    let mut stream = SdsStream::open(&cluster, request(&["ALL", "spiffe://other.org"], "", ""))
        .await
        .unwrap();
    let got = secrets(&stream.next(PROMPT).await);
    let own_pem = sigil_svid::pem::certs_to_pem(
        &cluster
            .server()
            .unwrap()
            .state()
            .ca()
            .bundle()
            .x509_authorities,
    );
    assert_eq!(
        spiffe_validator(&got["ALL"]),
        [
            ("example.org".to_owned(), own_pem.into_bytes()),
            ("other.org".to_owned(), other.x509_pem().into_bytes())
        ]
    );
    assert_eq!(
        spiffe_validator(&got["spiffe://other.org"]),
        [("other.org".to_owned(), other.x509_pem().into_bytes())]
    );

    // An Envoy that asks for the legacy shape gets trusted_ca, and no ALL.
    let mut legacy = request(&["ROOTCA"], "", "");
    legacy.node.as_mut().unwrap().metadata = Some(envoy_types::pb::google::protobuf::Struct {
        fields: [(
            "disable_spiffe_cert_validation".to_owned(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::BoolValue(
                    true,
                )),
            },
        )]
        .into(),
    });
    let mut client = sds_client(&cluster).await;
    let resp = client
        .fetch_secrets(legacy.clone())
        .await
        .unwrap()
        .into_inner();
    let Some(tls::secret::Type::ValidationContext(v)) = &secrets(&resp)["ROOTCA"].r#type else {
        panic!("not a validation context");
    };
    assert!(v.custom_validator_config.is_none());
    assert_eq!(
        inline(&v.trusted_ca),
        cluster
            .server()
            .unwrap()
            .state()
            .ca()
            .bundle()
            .x509_pem()
            .into_bytes()
    );
    legacy.resource_names = vec!["ALL".into()];
    let err = client.fetch_secrets(legacy).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_get_only_their_own_identities() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    // Not registered: refused on both RPCs, as on the Workload API.
    let err = match SdsStream::open(&cluster, request(&["default"], "", "")).await {
        Ok(mut s) => s.error().await,
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert_eq!(err.message(), "no identity issued");
    let err = sds_client(&cluster)
        .await
        .fetch_secrets(request(&["ROOTCA"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // Registered: another workload's SVID and an unknown trust domain are
    // refused by name, and the stream ends.
    let uid = nix::unistd::getuid();
    let me = cluster
        .register("/me", &[&format!("unix:uid:{uid}")])
        .await
        .unwrap();
    cluster
        .register("/someone-else", &["unix:uid:999999"])
        .await
        .unwrap();
    cluster.wait_for_svid(&me.spiffe_id).await.unwrap();
    let mut stream = SdsStream::open(
        &cluster,
        request(
            &[
                "default",
                "spiffe://example.org/someone-else",
                "spiffe://nowhere.org",
            ],
            "",
            "",
        ),
    )
    .await
    .unwrap();
    let err = stream.error().await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert_eq!(
        err.message(),
        r#"workload is not authorized for the requested identities ["spiffe://example.org/someone-else", "spiffe://nowhere.org"]"#
    );
    // Bounded requests.
    let too_many: Vec<String> = (0..100).map(|i| format!("n{i}")).collect();
    let mut req = request(&[], "", "");
    req.resource_names = too_many;
    let err = sds_client(&cluster)
        .await
        .fetch_secrets(req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_secrets_answers_once_and_delta_is_unimplemented() {
    let (cluster, me) = cluster_with_me(Default::default()).await;
    let mut client = sds_client(&cluster).await;
    let resp = client
        .fetch_secrets(request(&["default", "ROOTCA"], "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.version_info.as_str(), resp.nonce.as_str()), ("", ""));
    let got = secrets(&resp);
    let roots = sigil_svid::pem::pem_to_certs(
        std::str::from_utf8(&spiffe_validator(&got["ROOTCA"])[0].1).unwrap(),
    )
    .unwrap();
    let (chain, _) = certificate(&got["default"]);
    let id = sigil_svid::x509::verify_svid(&chain, &roots, SystemTime::now()).unwrap();
    assert_eq!(id.as_str(), me.to_string());

    let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let err = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    cluster.shutdown().await;
}

/// The first ```yaml block of a Markdown file.
fn first_yaml_block(markdown: &str) -> String {
    let start = markdown.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let len = markdown[start..].find("\n```").expect("the block ends");
    markdown[start..start + len].to_owned()
}

/// The directory of Envoy's protos shipped in the `envoy-types` package,
/// wherever cargo unpacked it.
fn envoy_proto_dir() -> std::path::PathBuf {
    // Only this platform's packages: those of others (never built here) may
    // not have been downloaded, and --offline would fail on them.
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc names its host");
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &host,
            "--manifest-path",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types is a dependency")["manifest_path"]
        .as_str()
        .unwrap()
        .to_owned();
    Path::new(&manifest).parent().unwrap().join("proto")
}

/// Every `name` under the given keys, anywhere in `v`.
fn names_under(v: &serde_json::Value, keys: &[&str], out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m {
                if keys.contains(&k.as_str()) {
                    let items = child
                        .as_array()
                        .cloned()
                        .unwrap_or_else(|| vec![child.clone()]);
                    for item in items {
                        out.push(item["name"].as_str().unwrap().to_owned());
                    }
                }
                names_under(child, keys, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|c| names_under(c, keys, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_bootstrap_in_the_docs_is_envoys_and_is_served() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/envoy.md"))
            .unwrap();
    let yaml = first_yaml_block(&doc);
    let json: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();

    // Decoded strictly (unknown fields and unknown @types fail) as Envoy's
    // Bootstrap, with the extensions the config names.
    let dir = envoy_proto_dir();
    let includes = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .map(|d| dir.join(d));
    let mut compiler = protox::Compiler::new(includes).unwrap();
    compiler.include_imports(true);
    compiler
        .open_files([
            "envoy/config/bootstrap/v3/bootstrap.proto",
            "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
            "envoy/extensions/transport_sockets/tls/v3/tls.proto",
            "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
        ])
        .unwrap();
    let pool = compiler.descriptor_pool();
    let bootstrap = pool
        .get_message_by_name("envoy.config.bootstrap.v3.Bootstrap")
        .unwrap();
    let decoded = prost_reflect::DynamicMessage::deserialize(bootstrap, &json)
        .unwrap_or_else(|e| panic!("docs/envoy.md's bootstrap is not an Envoy Bootstrap: {e}"));
    // And Envoy's generated types read the same bytes.
    let typed = envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap::decode(
        decoded.encode_to_vec().as_slice(),
    )
    .unwrap();
    let resources = typed.static_resources.unwrap();
    let inbound = &resources.listeners[0].filter_chains[0];
    let socket = inbound.transport_socket.as_ref().unwrap();
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = &socket.config_type
    else {
        panic!("no typed config");
    };
    let downstream = tls::DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    assert_eq!(
        downstream.require_client_certificate.map(|b| b.value),
        Some(true)
    );

    // The agent cluster is the default socket, over HTTP/2.
    let agent = resources
        .clusters
        .iter()
        .find(|c| c.name == "sigil_agent")
        .unwrap();
    let endpoint = &agent.load_assignment.as_ref().unwrap().endpoints[0].lb_endpoints[0];
    let text = format!("{endpoint:?}");
    assert!(text.contains(sigil_agent::config::DEFAULT_SOCKET), "{text}");
    use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http;
    let options = &agent.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    let options = http::HttpProtocolOptions::decode(options.value.as_slice()).unwrap();
    let Some(http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) =
        options.upstream_protocol_options
    else {
        panic!("no explicit HTTP config: {options:?}");
    };
    assert!(matches!(
        explicit.protocol_config,
        Some(
            http::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                _
            )
        )
    ));

    // The peers it authorizes are SPIFFE IDs.
    let mut peers = Vec::new();
    fn exacts(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(e) = m.get("exact").and_then(|e| e.as_str()) {
                    out.push(e.to_owned());
                }
                m.values().for_each(|c| exacts(c, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| exacts(c, out)),
            _ => {}
        }
    }
    exacts(&json, &mut peers);
    assert_eq!(peers.len(), 2);
    for p in &peers {
        p.parse::<sigil_types::SpiffeId>().unwrap();
    }

    // Every secret it names is served by a real agent to a registered Envoy.
    let mut names = Vec::new();
    names_under(
        &json,
        &[
            "tls_certificate_sds_secret_configs",
            "validation_context_sds_secret_config",
        ],
        &mut names,
    );
    names.sort();
    names.dedup();
    assert_eq!(names, ["ALL", "default"]);
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let mut req = request(
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
        "",
        "",
    );
    req.node = Some(core::Node {
        id: typed.node.as_ref().unwrap().id.clone(),
        cluster: typed.node.as_ref().unwrap().cluster.clone(),
        ..envoy_node()
    });
    let resp = sds_client(&cluster)
        .await
        .fetch_secrets(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secrets(&resp).into_keys().collect::<Vec<_>>(), names);
    cluster.shutdown().await;
}

/// Hostile `FetchSecrets` requests on the agent's socket (issue #13):
/// arbitrary type URLs, resource names and node metadata never break the
/// agent; each is answered with only requested secrets, the caller's own
/// certificate among them, or refused with `InvalidArgument` (`Internal`
/// only for `ALL` when the node turned the SPIFFE validator off). The agent
/// still serves a well-formed request afterwards.
#[test]
fn hostile_fetch_requests_are_answered_or_refused() {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (cluster, me) = rt.block_on(cluster_with_me(Default::default()));
    let client = rt.block_on(sds_client(&cluster));

    let name = prop_oneof![
        Just("default".to_owned()),
        Just("ROOTCA".to_owned()),
        Just("ALL".to_owned()),
        Just(me.to_string()),
        Just("spiffe://example.org".to_owned()),
        Just("spiffe://example.org/someone-else".to_owned()),
        Just(String::new()),
        any::<String>(),
        "z{2040,2060}",
    ];
    let kind = prop_oneof![
        any::<bool>().prop_map(Kind::BoolValue),
        any::<String>().prop_map(Kind::StringValue),
        Just(Kind::StringValue("true".into())),
        any::<f64>().prop_map(Kind::NumberValue),
        Just(Kind::NullValue(0)),
    ];
    let metadata = proptest::collection::hash_map(
        prop_oneof![
            Just("disable_spiffe_cert_validation".to_owned()),
            any::<String>()
        ],
        kind,
        0..3,
    );
    let request = (
        prop_oneof![
            Just(SECRET_TYPE.to_owned()),
            Just(String::new()),
            any::<String>()
        ],
        proptest::collection::vec(name, 0..6),
        proptest::option::of((metadata, any::<(u32, u32)>())),
    )
        .prop_map(|(type_url, names, node)| {
            let node = node.map(|(fields, (major, minor))| {
                let mut n = envoy_node();
                n.metadata = Some(Struct {
                    fields: fields
                        .into_iter()
                        .map(|(k, v)| (k, Value { kind: Some(v) }))
                        .collect(),
                });
                n.user_agent_version_type = Some(
                    core::node::UserAgentVersionType::UserAgentBuildVersion(core::BuildVersion {
                        version: Some(envoy_types::pb::envoy::r#type::v3::SemanticVersion {
                            major_number: major % 3,
                            minor_number: minor % 40,
                            patch: 0,
                        }),
                        metadata: None,
                    }),
                );
                n
            });
            DiscoveryRequest {
                node,
                resource_names: names,
                type_url,
                ..Default::default()
            }
        });

    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(128)
    });
    let outcome = runner.run(&request, |req| {
        // Empty names are dropped; none left asks for everything.
        let names: Vec<String> = req
            .resource_names
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        let answer = rt.block_on(client.clone().fetch_secrets(req));
        match answer {
            Ok(resp) => {
                for (name, secret) in secrets(&resp.into_inner()) {
                    prop_assert!(
                        names.is_empty() || names.contains(&name),
                        "{name} was not asked for"
                    );
                    if let Some(tls::secret::Type::TlsCertificate(_)) = secret.r#type {
                        prop_assert!(
                            name == "default" || name == me.to_string(),
                            "certificate {name} is not the caller's"
                        );
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                prop_assert!(!s.message().is_empty() && s.message().len() <= 1024);
            }
            Err(s) if s.code() == tonic::Code::Internal => {
                prop_assert!(names.iter().any(|n| n == "ALL"), "{s:?}");
            }
            Err(s) => Err(TestCaseError::fail(format!("unexpected refusal {s:?}")))?,
        }
        Ok(())
    });
    assert!(outcome.is_ok(), "{outcome:?}");

    let resp = rt
        .block_on(client.clone().fetch_secrets(request_of(&["default"])))
        .unwrap()
        .into_inner();
    assert!(secrets(&resp).contains_key("default"));
    rt.block_on(cluster.shutdown());
}

fn request_of(names: &[&str]) -> DiscoveryRequest {
    request(names, "", "")
}
