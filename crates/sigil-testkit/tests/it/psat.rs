//! PSAT node attestation end to end: a sigil server with a cluster profile
//! `eks-dev` whose API server is the fake (through a kubeconfig file), agents
//! calling `AttestPsat` over the real TLS agent API as a new agent does
//! (server authenticated, no client certificate).

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::agent_api_client::AgentApiClient;
use sigil_server::config::{PsatCluster, PsatVerification};
use sigil_server::{ServerConfig, ServerHandle};
use sigil_svid::keys::PrivateKey;
use sigil_svid::tls::RotatingCert;
use sigil_testkit::fake_k8s::{self, FakeApiServer, TOKEN_SELECTORS, TokenOptions};
use sigil_types::{AgentRecord, Selectors, TrustDomain};
use tonic::Code;
use tonic::transport::Channel;

const CLUSTER: &str = "eks-dev";
const AGENT_ID: &str =
    "spiffe://example.org/sigil/agent/k8s_psat/eks-dev/d06a4e91-b2e9-4907-a60a-66fd3932aaea";

/// Added from the pod and node the API server returned.
const API_SELECTORS: [&str; 5] = [
    "k8s_psat:agent_node_ip:10.0.10.170",
    "k8s_psat:agent_node_label:topology.k8s.aws/zone-id:use1-az1",
    "k8s_psat:agent_pod_label:k8s-app:aws-node",
    "k8s_psat:region:us-east-1",
    "k8s_psat:zone:us-east-1a",
];

fn selectors(groups: &[&[&str]]) -> Selectors {
    Selectors::parse_all(groups.iter().flat_map(|g| g.iter())).unwrap()
}

/// The EKS cluster profile, with the fake as its API server.
fn eks_cluster(
    api: &FakeApiServer,
    dir: &std::path::Path,
    verification: PsatVerification,
) -> PsatCluster {
    let mut c = PsatCluster::new(
        vec![format!(
            "{}:{}",
            fake_k8s::NAMESPACE,
            fake_k8s::SERVICE_ACCOUNT
        )],
        verification,
    );
    c.allowed_node_label_keys = vec!["topology.k8s.aws/zone-id".into()];
    c.allowed_pod_label_keys = vec!["k8s-app".into()];
    c.kube_config_file = Some(api.kubeconfig(dir).unwrap());
    c
}

fn offline(api: &FakeApiServer, dir: &std::path::Path) -> PsatVerification {
    PsatVerification::OfflineJwks {
        jwks_file: api.write_jwks(dir).unwrap(),
        issuer: fake_k8s::ISSUER.into(),
    }
}

struct Server {
    _dir: tempfile::TempDir,
    handle: Option<ServerHandle>,
}

impl Server {
    async fn start(
        dir: tempfile::TempDir,
        clusters: impl IntoIterator<Item = (&'static str, PsatCluster)>,
    ) -> Self {
        sigil_svid::install_crypto_provider();
        let td = TrustDomain::new("example.org").unwrap();
        let mut config = ServerConfig::with_defaults(td, dir.path().join("server"));
        config.bind_address = "127.0.0.1:0".parse().unwrap();
        config.admin_socket = dir.path().join("admin.sock");
        config.k8s_psat = clusters
            .into_iter()
            .map(|(name, c)| (name.to_owned(), c))
            .collect::<BTreeMap<_, _>>();
        let handle = sigil_server::start(config).await.unwrap();
        Self {
            _dir: dir,
            handle: Some(handle),
        }
    }

    fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    /// A TLS client authenticating the server; `cert`: the agent's SVID.
    async fn client(&self, cert: Option<Arc<RotatingCert>>) -> AgentApiClient<Channel> {
        let state = &self.handle().state();
        let trust = Arc::new(ArcSwap::new(state.ca().bundle()));
        sigil_agent::client::connect(
            &sigil_agent::config::ServerAddresses::one(self.handle().agent_api_addr().to_string()),
            trust,
            state.server_id().clone(),
            cert,
        )
        .await
        .unwrap()
    }

    async fn agents(&self) -> Vec<AgentRecord> {
        self.handle().state().store().list_agents().await.unwrap()
    }

    async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// An agent's attestation request: a fresh key and its CSR.
struct Attempt {
    key: PrivateKey,
    request: pb::AttestPsatRequest,
}

fn attempt(cluster: &str, token: String) -> Attempt {
    let key = PrivateKey::generate_p256().unwrap();
    let csr = sigil_svid::x509::make_csr(&key).unwrap();
    Attempt {
        key,
        request: pb::AttestPsatRequest {
            cluster: cluster.to_owned(),
            token,
            csr,
        },
    }
}

async fn attest(
    client: &mut AgentApiClient<Channel>,
    a: &Attempt,
) -> Result<pb::AttestResponse, tonic::Status> {
    client
        .attest_psat(a.request.clone())
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn token_review_attests_the_eks_agent_which_then_renews() {
    let api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = eks_cluster(&api, dir.path(), PsatVerification::TokenReview);
    let server = Server::start(dir, [(CLUSTER, cluster)]).await;
    let mut client = server.client(None).await;

    let a = attempt(CLUSTER, api.token().unwrap());
    let answer = attest(&mut client, &a).await.unwrap();
    assert_eq!(answer.spiffe_id, AGENT_ID);
    assert!(!answer.bundle_json.is_empty());
    let leaf = sigil_svid::x509::cert_info(&answer.cert_chain[0]).unwrap();
    assert_eq!(leaf.spiffe_id.unwrap().to_string(), AGENT_ID);
    assert_eq!(
        api.requests(),
        [
            "POST tokenreviews",
            "GET pod kube-system/aws-node-9t64t",
            "GET node ip-10-0-10-170.ec2.internal",
        ]
    );

    let agents = server.agents().await;
    assert_eq!(agents.len(), 1);
    let record = &agents[0];
    assert_eq!(record.spiffe_id.to_string(), AGENT_ID);
    assert_eq!(record.attestation_type, "k8s_psat");
    assert!(record.can_reattest && !record.banned);
    assert_eq!(record.serial, leaf.serial_hex);
    assert_eq!(
        record.selectors,
        selectors(&[&TOKEN_SELECTORS, &API_SELECTORS])
    );

    // The PSAT agent renews with its SVID like any agent.
    let cert = Arc::new(RotatingCert::new(answer.cert_chain.clone(), &a.key).unwrap());
    let mut mtls = server.client(Some(cert)).await;
    let key = PrivateKey::generate_p256().unwrap();
    let renewed = mtls
        .renew_agent(pb::RenewAgentRequest {
            csr: sigil_svid::x509::make_csr(&key).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.spiffe_id, AGENT_ID);
    let record = &server.agents().await[0];
    assert_eq!(record.previous_serial, leaf.serial_hex);
    assert_ne!(record.serial, leaf.serial_hex);
    server.shutdown().await;
}

#[tokio::test]
async fn refused_tokens_are_permission_denied_and_record_nothing() {
    let api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = eks_cluster(&api, dir.path(), PsatVerification::TokenReview);
    let server = Server::start(dir, [(CLUSTER, cluster)]).await;
    let mut client = server.client(None).await;

    let expired = TokenOptions {
        ttl_secs: -600,
        ..TokenOptions::default()
    };
    let other_sa = TokenOptions {
        service_account: "default".into(),
        ..TokenOptions::default()
    };
    let unknown = TokenOptions {
        accepted: false,
        ..TokenOptions::default()
    };
    let cases = [
        (
            CLUSTER,
            api.mint_token(&TokenOptions::audience("kubernetes"))
                .unwrap(),
            "the token's audience does not include \"sigil-server\"",
        ),
        (
            CLUSTER,
            api.mint_token(&expired).unwrap(),
            "the token expired at",
        ),
        (
            CLUSTER,
            api.mint_token(&other_sa).unwrap(),
            "service account kube-system:default may not attest agents in cluster \"eks-dev\"",
        ),
        (
            CLUSTER,
            api.mint_token(&unknown).unwrap(),
            "invalid service account token: the Kubernetes API server did not authenticate it",
        ),
        (
            "gke-prod",
            api.token().unwrap(),
            "no Kubernetes cluster profile \"gke-prod\" is configured on this server",
        ),
        (CLUSTER, String::new(), "invalid service account token"),
    ];
    for (cluster, token, message) in cases {
        let err = attest(&mut client, &attempt(cluster, token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains(message),
            "{:?} should say {message:?}",
            err.message()
        );
    }

    // A pod deleted since the token was issued.
    let token = api.token().unwrap();
    api.delete_pod(fake_k8s::NAMESPACE, fake_k8s::POD);
    let err = attest(&mut client, &attempt(CLUSTER, token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("pod kube-system/aws-node-9t64t named by the token does not exist"),
        "{}",
        err.message()
    );

    // A malformed CSR is an argument error, whatever the token.
    let mut bad = attempt(CLUSTER, api.token().unwrap());
    bad.request.csr = b"not a CSR".to_vec();
    let err = attest(&mut client, &bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    assert!(server.agents().await.is_empty());
    let metrics = server.handle().health().metrics_text();
    assert!(
        metrics.contains("sigil_server_attestation_failures_total 8"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn reattestation_with_a_fresh_token_updates_the_same_record() {
    let api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = eks_cluster(&api, dir.path(), PsatVerification::TokenReview);
    let server = Server::start(dir, [(CLUSTER, cluster)]).await;
    let mut client = server.client(None).await;

    let first = attest(&mut client, &attempt(CLUSTER, api.token().unwrap()))
        .await
        .unwrap();
    let store = &server.handle().state().store();
    // Move the first attestation into the past so that keeping created_at shows.
    let mut record = server.agents().await.remove(0);
    record.created_at -= 3600;
    store.upsert_agent(record.clone()).await.unwrap();

    // The agent pod was replaced (new pod, same node) and attests again.
    let mut pod =
        fake_k8s::fixture_json("kubelet/eks131_pod_kube-system_aws-node-9t64t.json").unwrap();
    pod["metadata"]["name"] = "aws-node-x7k2p".into();
    pod["metadata"]["uid"] = "5b1d7c4e-0f3a-4c8e-9d2b-7a6e5f4c3b2a".into();
    api.put_pod(pod).unwrap();
    let token = api
        .mint_token(&TokenOptions {
            pod: "aws-node-x7k2p".into(),
            pod_uid: "5b1d7c4e-0f3a-4c8e-9d2b-7a6e5f4c3b2a".into(),
            ..TokenOptions::default()
        })
        .unwrap();
    let second = attest(&mut client, &attempt(CLUSTER, token)).await.unwrap();
    assert_eq!(second.spiffe_id, first.spiffe_id);
    assert_ne!(second.cert_chain, first.cert_chain);

    let agents = server.agents().await;
    assert_eq!(agents.len(), 1);
    let updated = &agents[0];
    assert_eq!(updated.created_at, record.created_at);
    assert!(updated.updated_at > record.created_at);
    assert_eq!(updated.previous_serial, record.serial);
    assert!(
        updated
            .selectors
            .iter()
            .any(|s| s.to_string() == "k8s_psat:agent_pod_name:aws-node-x7k2p")
    );
    assert!(
        !updated
            .selectors
            .iter()
            .any(|s| s.to_string() == "k8s_psat:agent_pod_name:aws-node-9t64t")
    );

    // Banned, it may not come back.
    let id = updated.spiffe_id.clone();
    server.handle().state().ban_agent(&id).await.unwrap();
    let err = attest(&mut client, &attempt(CLUSTER, api.token().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("is banned"), "{}", err.message());
    server.shutdown().await;
}

#[tokio::test]
async fn with_the_api_server_down_token_review_is_unavailable_and_offline_still_attests() {
    let mut api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let review = eks_cluster(&api, dir.path(), PsatVerification::TokenReview);
    let offline_cluster = eks_cluster(&api, dir.path(), offline(&api, dir.path()));
    let server = Server::start(dir, [("eks-review", review), (CLUSTER, offline_cluster)]).await;
    let mut client = server.client(None).await;

    // Offline with the API server up: the pod and node are checked and add selectors.
    let up = attest(&mut client, &attempt(CLUSTER, api.token().unwrap()))
        .await
        .unwrap();
    assert_eq!(up.spiffe_id, AGENT_ID);
    assert_eq!(
        api.requests(),
        [
            "GET pod kube-system/aws-node-9t64t",
            "GET node ip-10-0-10-170.ec2.internal",
        ]
    );
    assert_eq!(
        server.agents().await[0].selectors,
        selectors(&[&TOKEN_SELECTORS, &API_SELECTORS])
    );

    let token = api.token().unwrap();
    api.stop().await;

    let err = attest(&mut client, &attempt("eks-review", token.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("the Kubernetes API server of cluster \"eks-review\" is unreachable"),
        "{}",
        err.message()
    );

    let down = attest(&mut client, &attempt(CLUSTER, token)).await.unwrap();
    assert_eq!(down.spiffe_id, AGENT_ID);
    let agents = server.agents().await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].selectors, selectors(&[&TOKEN_SELECTORS]));
    server.shutdown().await;
}
