//! Pod lookup and selectors against every case of
//! `fixtures/k8s/expected/*.json`, and the kubelet client against a fake
//! kubelet on 127.0.0.1 (plain HTTP and TLS) serving the fixture pod lists.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use sigil_k8s::cgroup::{ContainerInfo, KubeletCgroups, from_cgroup};
use sigil_k8s::kubelet::{
    KubeletClient, KubeletError, KubeletSource, Lookup, LookupOptions, PodList, RetryPolicy,
    explain, parse_pod_list, selectors_for, selectors_with,
};
use sigil_types::Selectors;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::cgroup::fixture;

fn pods(rel: &str) -> PodList {
    parse_pod_list(fixture(&format!("kubelet/{rel}")).as_bytes())
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn strings(s: &Selectors) -> Vec<String> {
    s.to_strings()
}

fn expected(case: &Value) -> Vec<String> {
    let mut v: Vec<String> = case["expected_selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// A cgroup fixture as the agent reads it: kind's kubepods tree sits under
/// the node container's cgroup, which the agent is configured with
/// (`kubelet_cgroup_root`); the location is handed on as default-root text.
fn cgroup_fixture(file: &str) -> String {
    let text = fixture(file);
    if !file.ends_with("spire_cgroups_pid_in_kind_pod.txt") {
        return text;
    }
    KubeletCgroups::new("/docker/93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26")
        .unwrap()
        .locate(&text)
        .unwrap()
        .into_info()
        .to_cgroup_file()
}

fn cgroups_of(case: &Value) -> Vec<String> {
    match &case["cgroup"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_owned()).collect(),
        other => panic!("cgroup field {other}"),
    }
}

/// Every case of expected/spire_k8s_workload_attestor_selector_cases.json,
/// byte for byte, through `selectors_with` and through `explain`.
#[test]
fn spire_workload_attestor_selector_cases() {
    let table: Value = serde_json::from_str(&fixture(
        "expected/spire_k8s_workload_attestor_selector_cases.json",
    ))
    .unwrap();
    let cases = table["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    let mut checked = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let pod_list_file = case["pod_list"].as_str().unwrap();
        let pod_list = fixture(pod_list_file);
        let list = parse_pod_list(pod_list.as_bytes()).unwrap();
        let options = LookupOptions {
            node_name: None,
            disable_container_selectors: case["config"]["disable_container_selectors"]
                .as_bool()
                .unwrap_or(false),
        };
        for cgroup_file in cgroups_of(case) {
            let cgroup = cgroup_fixture(&cgroup_file);
            let info = from_cgroup(&cgroup).unwrap();
            let got = selectors_with(&list, &info, &options);
            if let Some(err) = case.get("expected_error") {
                assert_eq!(err["grpc_code"], "Internal");
                let message = err["message"].as_str().unwrap();
                let e = got.unwrap_err();
                assert!(
                    matches!(e, KubeletError::DuplicateContainer { .. }),
                    "{name}: {e}"
                );
                assert!(e.to_string().contains(message), "{name}: {e}");
                let why = explain(&cgroup, None, pod_list.as_bytes(), None).unwrap_err();
                assert!(why.contains(message), "{name}: {why}");
            } else if expected(case).is_empty() {
                assert_eq!(got.unwrap(), Lookup::NotInPod, "{name}");
                let why = explain(&cgroup, None, pod_list.as_bytes(), None).unwrap_err();
                assert_eq!(
                    why,
                    "the process is not in a pod (no pod UID or container ID in its cgroup file)"
                );
            } else {
                let Lookup::Found(sel) = got.unwrap() else {
                    panic!("{name} / {cgroup_file}: not found")
                };
                assert_eq!(strings(&sel), expected(case), "{name} / {cgroup_file}");
                if !options.disable_container_selectors {
                    let sel = explain(&cgroup, None, pod_list.as_bytes(), None).unwrap();
                    assert_eq!(strings(&sel), expected(case), "{name} / {cgroup_file}");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}

/// expected/DERIVED_eks131_selector_cases.json: pod UID and container ID from
/// the cgroup file, then the selectors, byte for byte.
#[test]
fn eks131_selector_cases() {
    let table: Value =
        serde_json::from_str(&fixture("expected/DERIVED_eks131_selector_cases.json")).unwrap();
    let cases = table["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let cgroup_file = case["cgroup"].as_str().unwrap();
        let info = from_cgroup(&fixture(cgroup_file)).unwrap();
        assert_eq!(info.pod_uid.as_deref(), case["expect_pod_uid"].as_str());
        assert_eq!(
            info.container_id.as_deref(),
            case["expect_container_id"].as_str()
        );
        let list = parse_pod_list(fixture(case["pod_list"].as_str().unwrap()).as_bytes()).unwrap();
        let Lookup::Found(sel) =
            selectors_for(&list, &info, Some("ip-10-0-10-170.ec2.internal")).unwrap()
        else {
            panic!("{cgroup_file}: not found")
        };
        assert_eq!(strings(&sel), expected(case), "{cgroup_file}");
    }
}

#[test]
fn pod_list_shapes() {
    // kind "PodList" and kind "List" both parse.
    assert_eq!(pods("spire_pod_list.json").len(), 4);
    assert_eq!(pods("spire_kind_pod_list.json").len(), 1);
    assert_eq!(pods("eks131_pods_on_node_ip-10-0-10-170.json").len(), 4);
    assert_eq!(pods("eks131_kube_system_podlist_all_nodes.json").len(), 6);
    // Go marshals a nil slice as null.
    assert!(
        parse_pod_list(br#"{"kind":"PodList","items":null}"#)
            .unwrap()
            .is_empty()
    );
    for bad in [
        &br#"{"kind":"PodList"}"#[..],
        br#"{"kind":"Status","items":[]}"#,
        br#"[]"#,
        b"not json",
    ] {
        assert!(
            matches!(parse_pod_list(bad), Err(KubeletError::BadPodList { .. })),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // A single pod (an API-server GET) is not a pod list.
    assert!(
        parse_pod_list(fixture("kubelet/eks131_pod_kube-system_aws-node-9t64t.json").as_bytes())
            .is_err()
    );
}

fn aws_node() -> ContainerInfo {
    from_cgroup(&fixture(
        "cgroup/SYNTH_eks131_v2_systemd_containerd_aws-node.txt",
    ))
    .unwrap()
}

fn blog() -> ContainerInfo {
    from_cgroup(&fixture("cgroup/spire_cgroups_pid_in_pod.txt")).unwrap()
}

#[test]
fn node_name_restricts_the_list() {
    let all = pods("eks131_kube_system_podlist_all_nodes.json");
    assert!(matches!(
        selectors_for(&all, &aws_node(), Some("ip-10-0-10-170.ec2.internal")).unwrap(),
        Lookup::Found(_)
    ));
    assert_eq!(
        selectors_for(&all, &aws_node(), Some("ip-10-0-20-143.ec2.internal")).unwrap(),
        Lookup::ContainerNotListed {
            pod_uid: Some("26ad33eb-1244-4226-a6e8-e8ec77195044".into()),
            container_id: "6b4ed6d1b7259aeef27750cf1016fd6dd687ab54f3516ed3064ce0c225e63abf".into(),
        }
    );
    let why = explain(
        &fixture("cgroup/SYNTH_eks131_v2_systemd_containerd_aws-node.txt"),
        None,
        fixture("kubelet/eks131_kube_system_podlist_all_nodes.json").as_bytes(),
        Some("ip-10-0-20-143.ec2.internal"),
    )
    .unwrap_err();
    assert!(
        why.contains("on another node than ip-10-0-20-143.ec2.internal"),
        "{why}"
    );
}

#[test]
fn container_not_started_is_not_listed_yet() {
    let list = pods("spire_pod_list_not_running.json");
    assert_eq!(
        selectors_for(&list, &blog(), None).unwrap(),
        Lookup::ContainerNotListed {
            pod_uid: Some(crate::cgroup::BLOG_POD.into()),
            container_id: crate::cgroup::BLOG_CID.into(),
        }
    );
    let why = explain(
        &fixture("cgroup/spire_cgroups_pid_in_pod.txt"),
        None,
        fixture("kubelet/spire_pod_list_not_running.json").as_bytes(),
        None,
    )
    .unwrap_err();
    assert_eq!(
        why,
        format!(
            "container {} of pod {} is not in the pod list (is the pod list from the right node? is the container started?)",
            crate::cgroup::BLOG_CID,
            crate::cgroup::BLOG_POD
        )
    );
    // By container ID alone, a missing container is not listed either.
    let kubeedge = from_cgroup(&fixture("cgroup/spire_cgroups_pid_in_crio_pod.txt")).unwrap();
    assert!(matches!(
        selectors_for(&list, &kubeedge, None).unwrap(),
        Lookup::ContainerNotListed { pod_uid: None, .. }
    ));
}

#[test]
fn cgroup_and_kubelet_disagreeing_on_the_pod_is_an_error() {
    let info = ContainerInfo {
        pod_uid: Some("d488cae9-b2a0-11e7-9350-020968147796".into()),
        container_id: Some(crate::cgroup::BLOG_CID.into()),
    };
    let err = selectors_for(&pods("spire_pod_list.json"), &info, None).unwrap_err();
    assert!(matches!(err, KubeletError::PodMismatch { .. }), "{err}");
}

#[test]
fn not_in_a_pod_needs_no_pod_list() {
    let info = ContainerInfo::default();
    assert_eq!(
        selectors_for(&PodList::default(), &info, None).unwrap(),
        Lookup::NotInPod
    );
}

#[test]
fn explain_names_the_reason() {
    let list = fixture("kubelet/spire_pod_list.json");
    let conmon = explain(
        &fixture("cgroup/issue4088_v1_crio_conmon_not_a_workload.txt"),
        None,
        list.as_bytes(),
        None,
    )
    .unwrap_err();
    assert!(
        conmon.contains("conmon") && conmon.contains("20d8ec29"),
        "{conmon}"
    );
    let docker = explain(
        &format!(
            "0::/system.slice/docker-{}.scope\n",
            crate::cgroup::BLOG_CID
        ),
        None,
        list.as_bytes(),
        None,
    )
    .unwrap_err();
    assert!(docker.contains("not in a Kubernetes pod"), "{docker}");
    let two = format!(
        "2:cpu:/kubepods/pod{pod}/{a}\n1:cpu:/kubepods/pod{pod}/{b}\n",
        pod = crate::cgroup::BLOG_POD,
        a = crate::cgroup::BLOG_CID,
        b = crate::cgroup::KIND_CID,
    );
    let why = explain(&two, None, list.as_bytes(), None).unwrap_err();
    assert!(
        why.starts_with("the cgroup file names two container IDs: "),
        "{why}"
    );
    let why = explain(
        &fixture("cgroup/spire_mountinfo_fallback_pair.cgroup"),
        Some(""),
        list.as_bytes(),
        None,
    )
    .unwrap_err();
    assert!(
        why.contains("nor in the cgroup mounts of its mountinfo"),
        "{why}"
    );
    let why = explain(
        &fixture("cgroup/spire_cgroups_pid_in_pod.txt"),
        None,
        b"{}",
        None,
    )
    .unwrap_err();
    assert!(why.contains("not a pod list"), "{why}");
}

// ---------------------------------------------------------------------------
// The fake kubelet.

#[derive(Clone)]
enum Reply {
    /// 200 with Content-Length.
    Json(Arc<Vec<u8>>),
    /// 200, chunked, no Content-Length.
    Chunked(Arc<Vec<u8>>),
    /// 200 declaring a length, then closing without a body.
    Declares(u64),
    /// Another status.
    Status(u16, &'static str),
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
}

struct FakeKubelet {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeKubelet {
    /// Serves `replies[i]` to the i-th request (the last one from then on),
    /// each after `delay`.
    async fn start(
        replies: Vec<Reply>,
        delay: Duration,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let replies = Arc::new(replies);
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (seen, replies, tls) = (Arc::clone(&seen2), Arc::clone(&replies), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve(tcp, &seen, &replies, delay).await,
                        Some(config) => {
                            // A client that rejects our certificate ends here.
                            if let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                            {
                                serve(stream, &seen, &replies, delay).await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, seen }
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    seen: &Mutex<Vec<Seen>>,
    replies: &[Reply],
    delay: Duration,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_owned());
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(Seen {
            path,
            authorization,
        });
        seen.len() - 1
    };
    tokio::time::sleep(delay).await;
    let reply = replies[index.min(replies.len() - 1)].clone();
    let out = match reply {
        Reply::Json(body) => {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(&body);
            out
        }
        Reply::Chunked(body) => {
            let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
            for piece in body.chunks(1000) {
                out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
        Reply::Declares(n) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
        Reply::Status(code, body) => format!(
            "HTTP/1.1 {code} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    };
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

fn json(rel: &str) -> Reply {
    Reply::Json(Arc::new(fixture(&format!("kubelet/{rel}")).into_bytes()))
}

fn fast(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        interval: Duration::from_millis(20),
        min_refresh: Duration::from_millis(20),
    }
}

fn read_only(fake: &FakeKubelet) -> KubeletSource {
    KubeletSource::ReadOnly {
        url: format!("http://{}", fake.addr),
    }
}

/// A CA and a kubelet serving certificate it signed for `names`.
struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki(names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test cluster CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "kubelet");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone()];
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn secure(url: String, token: &Path, ca: Option<&Path>, skip_verify: bool) -> KubeletSource {
    KubeletSource::Secure {
        url,
        token_path: token.to_owned(),
        ca_path: ca.map(Path::to_owned),
        skip_verify,
    }
}

#[tokio::test]
async fn read_only_port_serves_selectors_without_a_token() {
    let fake = FakeKubelet::start(
        vec![json("eks131_pods_on_node_ip-10-0-10-170.json")],
        Duration::ZERO,
        None,
    )
    .await;
    let client = KubeletClient::new(
        read_only(&fake),
        Some("ip-10-0-10-170.ec2.internal".into()),
        fast(1),
    )
    .unwrap();
    let sel = client.attest(&aws_node()).await.unwrap().unwrap();
    assert!(strings(&sel).contains(&"k8s:container-name:aws-node".to_owned()));
    assert!(strings(&sel).contains(&"k8s:pod-uid:26ad33eb-1244-4226-a6e8-e8ec77195044".to_owned()));
    let seen = fake.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/pods");
    assert_eq!(seen[0].authorization, None);
    // Not in a pod: no request at all.
    assert_eq!(
        client.attest(&ContainerInfo::default()).await.unwrap(),
        None
    );
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn secure_port_verifies_the_ca_and_sends_the_current_token() {
    let pki = pki(&["127.0.0.1"]);
    let fake = FakeKubelet::start(
        vec![json("spire_pod_list.json")],
        Duration::ZERO,
        Some(Arc::clone(&pki.server)),
    )
    .await;
    let files = Files::new();
    let token = files.write("token", "first-token\n");
    let ca = files.write("ca.crt", &pki.ca_pem);
    let client = KubeletClient::new(
        secure(format!("https://{}", fake.addr), &token, Some(&ca), false),
        None,
        fast(1),
    )
    .unwrap();
    let sel = client.attest(&blog()).await.unwrap().unwrap();
    assert!(strings(&sel).contains(&"k8s:container-name:blog".to_owned()));
    // The kubelet rotates projected tokens: the file is read for each request.
    std::fs::write(&token, "second-token").unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.attest(&blog()).await.unwrap().unwrap();
    let auth: Vec<Option<String>> = fake
        .requests()
        .into_iter()
        .map(|s| s.authorization)
        .collect();
    assert_eq!(
        auth,
        vec![
            Some("Bearer first-token".to_owned()),
            Some("Bearer second-token".to_owned())
        ]
    );
}

#[tokio::test]
async fn an_untrusted_kubelet_certificate_fails_unless_skip_verify() {
    let real = pki(&["127.0.0.1"]);
    let other = pki(&["127.0.0.1"]);
    let fake = FakeKubelet::start(
        vec![json("spire_pod_list.json")],
        Duration::ZERO,
        Some(Arc::clone(&real.server)),
    )
    .await;
    let files = Files::new();
    let token = files.write("token", "t");
    let wrong_ca = files.write("other-ca.crt", &other.ca_pem);
    let url = format!("https://{}", fake.addr);
    let client = KubeletClient::new(
        secure(url.clone(), &token, Some(&wrong_ca), false),
        None,
        fast(1),
    )
    .unwrap();
    let err = client.attest(&blog()).await.unwrap_err();
    assert!(
        matches!(&err, KubeletError::Unreachable { reason, .. } if reason.contains("certificate")),
        "{err}"
    );
    // The token never reached the impostor.
    assert_eq!(fake.count(), 0);

    let missing_ca = files.dir.path().join("absent.crt");
    let client =
        KubeletClient::new(secure(url, &token, Some(&missing_ca), true), None, fast(1)).unwrap();
    assert!(client.attest(&blog()).await.unwrap().is_some());
    assert_eq!(fake.count(), 1);
}

/// Kubelet serving certificates name the node, not 127.0.0.1: at a loopback
/// address only the chain is checked; elsewhere the name is checked too.
#[tokio::test]
async fn loopback_address_skips_only_the_name_check() {
    let pki = pki(&["node-1.example"]);
    let fake = FakeKubelet::start(
        vec![json("spire_pod_list.json")],
        Duration::ZERO,
        Some(Arc::clone(&pki.server)),
    )
    .await;
    let files = Files::new();
    let token = files.write("token", "t");
    let ca = files.write("ca.crt", &pki.ca_pem);
    let at_ip = KubeletClient::new(
        secure(format!("https://{}", fake.addr), &token, Some(&ca), false),
        None,
        fast(1),
    )
    .unwrap();
    assert!(at_ip.attest(&blog()).await.unwrap().is_some());

    let by_name = KubeletClient::new(
        secure(
            format!("https://localhost:{}", fake.addr.port()),
            &token,
            Some(&ca),
            false,
        ),
        None,
        fast(1),
    )
    .unwrap();
    let err = by_name.attest(&blog()).await.unwrap_err();
    assert!(
        matches!(&err, KubeletError::Unreachable { reason, .. } if reason.contains("certificate")),
        "{err}"
    );
}

#[tokio::test]
async fn concurrent_attestations_share_one_fetch() {
    let fake = FakeKubelet::start(
        vec![json("spire_pod_list.json")],
        Duration::from_millis(200),
        None,
    )
    .await;
    let policy = RetryPolicy {
        attempts: 3,
        interval: Duration::from_millis(20),
        min_refresh: Duration::from_secs(30),
    };
    let client = Arc::new(KubeletClient::new(read_only(&fake), None, policy).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let client = Arc::clone(&client);
        // Two different workloads of the same list.
        let info = if i % 2 == 0 {
            blog()
        } else {
            from_cgroup(&fixture("cgroup/spire_cgroups_init_pid_in_pod.txt")).unwrap()
        };
        tasks.spawn(async move { client.attest(&info).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap().unwrap().is_some());
    }
    assert_eq!(fake.count(), 1);
    // A later lookup that finds its container is answered from the cache.
    assert!(client.attest(&blog()).await.unwrap().is_some());
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn a_fetch_error_is_shared_too() {
    let fake = FakeKubelet::start(
        vec![Reply::Status(500, "boom")],
        Duration::from_millis(500),
        None,
    )
    .await;
    let client = Arc::new(KubeletClient::new(read_only(&fake), None, fast(1)).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = Arc::clone(&client);
        tasks.spawn(async move { client.attest(&blog()).await });
    }
    while let Some(r) = tasks.join_next().await {
        let err = r.unwrap().unwrap_err();
        assert!(
            matches!(err, KubeletError::Status { status: 500, .. }),
            "{err}"
        );
    }
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn a_new_container_is_found_after_a_retry() {
    // The first list has the pod but not the started container; the second has it.
    let fake = FakeKubelet::start(
        vec![
            json("spire_pod_list_not_running.json"),
            json("spire_pod_list.json"),
        ],
        Duration::ZERO,
        None,
    )
    .await;
    let client = KubeletClient::new(read_only(&fake), None, fast(10)).unwrap();
    let sel = client.attest(&blog()).await.unwrap().unwrap();
    assert!(strings(&sel).contains(&"k8s:container-name:blog".to_owned()));
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn a_container_never_listed_fails_after_the_attempts() {
    let fake = FakeKubelet::start(
        vec![json("spire_pod_list_not_running.json")],
        Duration::ZERO,
        None,
    )
    .await;
    let client = KubeletClient::new(read_only(&fake), None, fast(3)).unwrap();
    let err = client.attest(&blog()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            KubeletError::NotListed {
                attempts: 3,
                pod_uid: Some(_),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(fake.count(), 3);

    // With container selectors disabled, the listed pod answers (SPIRE #3092).
    let client = KubeletClient::new(read_only(&fake), None, fast(3))
        .unwrap()
        .with_disable_container_selectors(true);
    let sel = client.attest(&blog()).await.unwrap().unwrap();
    assert!(strings(&sel).contains(&"k8s:pod-name:blog-24ck7".to_owned()));
    assert!(
        !strings(&sel)
            .iter()
            .any(|s| s.starts_with("k8s:container-"))
    );
}

#[tokio::test]
async fn a_kubelet_that_recovers_is_retried() {
    let fake = FakeKubelet::start(
        vec![Reply::Status(503, "starting"), json("spire_pod_list.json")],
        Duration::ZERO,
        None,
    )
    .await;
    let client = KubeletClient::new(read_only(&fake), None, fast(5)).unwrap();
    assert!(client.attest(&blog()).await.unwrap().is_some());
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn oversized_answers_are_refused() {
    let body = Arc::new(fixture("kubelet/spire_pod_list.json").into_bytes());
    assert!(body.len() > 20_000);
    for reply in [
        Reply::Json(Arc::clone(&body)),
        Reply::Chunked(Arc::clone(&body)),
        Reply::Declares(1 << 40),
    ] {
        let fake = FakeKubelet::start(vec![reply], Duration::ZERO, None).await;
        let client = KubeletClient::new(read_only(&fake), None, fast(1))
            .unwrap()
            .with_max_response_bytes(10_000);
        let err = client.attest(&blog()).await.unwrap_err();
        assert!(
            matches!(err, KubeletError::TooLarge { limit: 10_000, .. }),
            "{err}"
        );
    }
    // The same chunked body under a sufficient limit is fine.
    let fake = FakeKubelet::start(vec![Reply::Chunked(body)], Duration::ZERO, None).await;
    let client = KubeletClient::new(read_only(&fake), None, fast(1)).unwrap();
    assert!(client.attest(&blog()).await.unwrap().is_some());
}

#[tokio::test]
async fn http_errors_timeouts_and_unreachable_kubelets() {
    let fake = FakeKubelet::start(
        vec![Reply::Status(401, "Unauthorized")],
        Duration::ZERO,
        None,
    )
    .await;
    let err = KubeletClient::new(read_only(&fake), None, fast(1))
        .unwrap()
        .attest(&blog())
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeletError::Status { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Unauthorized"), "{err}");

    let slow = FakeKubelet::start(
        vec![json("spire_pod_list.json")],
        Duration::from_secs(5),
        None,
    )
    .await;
    let err = KubeletClient::new(read_only(&slow), None, fast(1))
        .unwrap()
        .with_timeout(Duration::from_millis(200))
        .attest(&blog())
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::Timeout { .. }), "{err}");

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let client = KubeletClient::new(
        KubeletSource::ReadOnly {
            url: format!("http://{addr}"),
        },
        None,
        fast(2),
    )
    .unwrap();
    let err = client.attest(&blog()).await.unwrap_err();
    assert!(matches!(err, KubeletError::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn fetch_pods_json_feeds_explain() {
    let fake =
        FakeKubelet::start(vec![json("spire_kind_pod_list.json")], Duration::ZERO, None).await;
    let client = KubeletClient::new(read_only(&fake), None, fast(1)).unwrap();
    let body = client.fetch_pods_json().await.unwrap();
    let sel = explain(
        &cgroup_fixture("cgroup/spire_cgroups_pid_in_kind_pod.txt"),
        None,
        &body,
        Some("kind-control-plane"),
    )
    .unwrap();
    assert!(strings(&sel).contains(&"k8s:node-name:kind-control-plane".to_owned()));
}

#[test]
fn configuration_errors_show_at_construction() {
    let files = Files::new();
    let token = files.write("token", "t");
    let err = KubeletClient::new(
        secure(
            "https://127.0.0.1:10250".into(),
            &token,
            Some(&files.dir.path().join("no-ca")),
            false,
        ),
        None,
        RetryPolicy::default(),
    )
    .unwrap_err();
    assert!(matches!(err, KubeletError::CaFile { .. }), "{err}");
    let not_pem = files.write("ca.crt", "hello");
    let err = KubeletClient::new(
        secure(
            "https://127.0.0.1:10250".into(),
            &token,
            Some(&not_pem),
            false,
        ),
        None,
        RetryPolicy::default(),
    )
    .unwrap_err();
    assert!(matches!(err, KubeletError::BadCa { .. }), "{err}");
    for (source, what) in [
        (
            secure("http://127.0.0.1:10250".into(), &token, None, true),
            "https",
        ),
        (
            KubeletSource::ReadOnly {
                url: "https://127.0.0.1:10255".into(),
            },
            "http",
        ),
        (
            KubeletSource::ReadOnly {
                url: "127.0.0.1:10255".into(),
            },
            "scheme",
        ),
    ] {
        let err = KubeletClient::new(source, None, RetryPolicy::default()).unwrap_err();
        assert!(
            matches!(&err, KubeletError::BadUrl { reason, .. } if reason.contains(what)),
            "{err}"
        );
    }
    let p = RetryPolicy::default();
    assert_eq!(
        (p.attempts, p.interval, p.min_refresh),
        (60, Duration::from_millis(500), Duration::from_millis(500))
    );
}

#[tokio::test]
async fn an_empty_token_file_is_an_error() {
    let pki = pki(&["127.0.0.1"]);
    let fake = FakeKubelet::start(
        vec![json("spire_pod_list.json")],
        Duration::ZERO,
        Some(pki.server),
    )
    .await;
    let files = Files::new();
    let token = files.write("token", "\n");
    let ca = files.write("ca.crt", &pki.ca_pem);
    let client = KubeletClient::new(
        secure(format!("https://{}", fake.addr), &token, Some(&ca), false),
        None,
        fast(1),
    )
    .unwrap();
    let err = client.attest(&blog()).await.unwrap_err();
    assert!(matches!(err, KubeletError::BadToken { .. }), "{err}");
    assert_eq!(fake.count(), 0);
}
