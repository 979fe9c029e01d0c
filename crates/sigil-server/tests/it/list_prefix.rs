//! ListEntries with an ID prefix over the admin socket: the Kubernetes
//! controller lists only its own entries (`k8s-<cluster>-…`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use hyper_util::rt::TokioIo;
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::admin_api_client::AdminApiClient;
use sigil_server::{ServerConfig, ServerHandle};
use sigil_types::{Entry, Selectors, TrustDomain};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

async fn server(dir: &tempfile::TempDir) -> ServerHandle {
    sigil_svid::install_crypto_provider();
    let td = TrustDomain::new("example.org").unwrap();
    let mut config = ServerConfig::with_defaults(td, dir.path().join("server"));
    config.bind_address = "127.0.0.1:0".parse().unwrap();
    config.admin_socket = dir.path().join("admin.sock");
    sigil_server::start(config).await.expect("server starts")
}

async fn admin(server: &ServerHandle) -> AdminApiClient<Channel> {
    let path = server.admin_socket().to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .unwrap();
    AdminApiClient::new(channel)
}

#[tokio::test]
async fn list_entries_filters_by_id_prefix_across_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir).await;
    let ids = [
        "k8s-demo-01",
        "k8s-demo-02",
        "k8s-demo-03",
        "k8s-demo-04",
        "k8s-demo-05",
        "k8s-demo",
        "k8s-demo2-01",
        "k8s-other-01",
        "by-hand",
        "zzz",
    ];
    for (i, id) in ids.iter().enumerate() {
        server
            .create_entry(Entry::new(
                id.parse().unwrap(),
                format!("spiffe://example.org/w{i}").parse().unwrap(),
                "spiffe://example.org/sigil/agent/join_token/abc"
                    .parse()
                    .unwrap(),
                Selectors::parse_all([format!("unix:uid:{i}")]).unwrap(),
            ))
            .await
            .unwrap();
    }
    let mut api = admin(&server).await;
    let list = |api: &mut AdminApiClient<Channel>, prefix: &str, token: String| {
        let req = pb::ListEntriesRequest {
            id_prefix: prefix.to_owned(),
            page_size: 2,
            page_token: token,
            ..Default::default()
        };
        let mut api = api.clone();
        async move { api.list_entries(req).await }
    };
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(&mut api, "k8s-demo-", token)
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        got.extend(page.entries.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        got,
        [
            "k8s-demo-01",
            "k8s-demo-02",
            "k8s-demo-03",
            "k8s-demo-04",
            "k8s-demo-05"
        ]
    );
    // No prefix: everything, as before.
    let all = api
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), ids.len());
    // A prefix no entry has: nothing. One that is no ID: refused.
    let none = list(&mut api, "k8s-nothing-", String::new()).await.unwrap();
    assert!(none.into_inner().entries.is_empty());
    for bad in ["k8s/demo", "k8s demo", &"x".repeat(300)] {
        let err = list(&mut api, bad, String::new()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    server.shutdown().await;
}
