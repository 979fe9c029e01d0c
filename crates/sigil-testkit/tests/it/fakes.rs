//! The fakes answer like the real endpoints, from the recorded fixtures.

use serde_json::Value;
use sigil_testkit::fake_k8s::{self, FakeApiServer, FakeKubelet, TokenOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One plain HTTP/1.1 request (`Connection: close`); returns status and body.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

async fn review(api: &FakeApiServer, token: &str, audiences: &[&str]) -> Value {
    let request = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": { "token": token, "audiences": audiences },
    });
    let (status, body) = http(
        api.addr(),
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        &request.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn api_server_reviews_the_tokens_it_minted() {
    let api = FakeApiServer::start().await.unwrap();
    let token = api.token().unwrap();

    let ok = review(&api, &token, &["sigil-server"]).await;
    let status = &ok["status"];
    assert_eq!(status["authenticated"], true);
    assert_eq!(status["audiences"], serde_json::json!(["sigil-server"]));
    assert_eq!(
        status["user"]["username"],
        "system:serviceaccount:kube-system:aws-node"
    );
    let extra = &status["user"]["extra"];
    assert_eq!(
        extra["authentication.kubernetes.io/pod-uid"][0],
        fake_k8s::POD_UID
    );
    assert_eq!(
        extra["authentication.kubernetes.io/node-uid"][0],
        fake_k8s::NODE_UID
    );

    // Another audience, an unknown token, a revoked one: not authenticated.
    let other = review(&api, &token, &["vault"]).await;
    assert_ne!(other["status"]["authenticated"], true);
    assert!(
        other["status"]["error"]
            .as_str()
            .unwrap()
            .contains("audiences")
    );
    let forged = review(&api, "a.b.c", &["sigil-server"]).await;
    assert_ne!(forged["status"]["authenticated"], true);
    api.revoke(&token);
    let revoked = review(&api, &token, &["sigil-server"]).await;
    assert_ne!(revoked["status"]["authenticated"], true);

    // A token minted as unknown to the API server, and a pre-1.30 one.
    let unknown = api
        .mint_token(&TokenOptions {
            accepted: false,
            ..TokenOptions::default()
        })
        .unwrap();
    assert_ne!(
        review(&api, &unknown, &["sigil-server"]).await["status"]["authenticated"],
        true
    );
    let old = api
        .mint_token(&TokenOptions {
            node: None,
            ..TokenOptions::default()
        })
        .unwrap();
    let old = review(&api, &old, &["sigil-server"]).await;
    assert!(
        old["status"]["user"]["extra"]
            .get("authentication.kubernetes.io/node-uid")
            .is_none()
    );
    assert_eq!(api.requests().len(), 6);
}

#[tokio::test]
async fn api_server_serves_the_recorded_pod_and_node() {
    let mut api = FakeApiServer::start().await.unwrap();
    let (status, body) = http(
        api.addr(),
        "GET",
        "/api/v1/namespaces/kube-system/pods/aws-node-9t64t",
        "",
    )
    .await;
    assert_eq!(status, 200);
    let pod: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pod["metadata"]["uid"], fake_k8s::POD_UID);
    assert_eq!(pod["spec"]["nodeName"], fake_k8s::NODE);
    assert_eq!(pod["status"]["hostIP"], fake_k8s::NODE_IP);

    let (status, body) = http(
        api.addr(),
        "GET",
        "/api/v1/nodes/ip-10-0-10-170.ec2.internal",
        "",
    )
    .await;
    assert_eq!(status, 200);
    let node: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(node["metadata"]["uid"], fake_k8s::NODE_UID);

    api.delete_pod(fake_k8s::NAMESPACE, fake_k8s::POD);
    let (status, body) = http(
        api.addr(),
        "GET",
        "/api/v1/namespaces/kube-system/pods/aws-node-9t64t",
        "",
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("NotFound"));
    assert_eq!(
        api.requests(),
        [
            "GET pod kube-system/aws-node-9t64t",
            "GET node ip-10-0-10-170.ec2.internal",
            "GET pod kube-system/aws-node-9t64t",
        ]
    );

    // The JWKS and kubeconfig describe this server; once stopped, its port is closed.
    let jwks: Value = serde_json::from_str(&api.jwks_json()).unwrap();
    assert_eq!(jwks["keys"][0]["crv"], "P-256");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = std::fs::read_to_string(api.kubeconfig(dir.path()).unwrap()).unwrap();
    assert!(kubeconfig.contains(&api.url()));
    let addr = api.addr();
    api.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn kubelet_serves_its_pod_list_and_counts_requests() {
    let pods = fake_k8s::fixture_bytes("kubelet/eks131_pods_on_node_ip-10-0-10-170.json").unwrap();
    let kubelet = FakeKubelet::start(pods.clone()).await.unwrap();
    assert_eq!(kubelet.requests(), 0);
    let (status, body) = http(kubelet.addr(), "GET", "/pods", "").await;
    assert_eq!(status, 200);
    assert_eq!(body.as_bytes(), pods.as_slice());
    assert_eq!(kubelet.requests(), 1);

    kubelet.set_pods(br#"{"kind":"PodList","items":[]}"#.to_vec());
    let (_, body) = http(kubelet.addr(), "GET", "/pods", "").await;
    assert_eq!(body, r#"{"kind":"PodList","items":[]}"#);
    assert_eq!(kubelet.requests(), 2);
    assert!(kubelet.url().starts_with("http://127.0.0.1:"));
}
