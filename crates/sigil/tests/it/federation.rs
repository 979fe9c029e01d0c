//! Two trust domains in one test: two servers and two agents, federating
//! over both bundle endpoint profiles. `a.test` serves its bundle endpoint
//! with its SVID (https_spiffe) and `b.test` with a Web PKI certificate
//! (https_web); `a.test` federates with `b.test` from its config file,
//! `b.test` with `a.test` through the admin API. The workloads are checked
//! with the `spiffe` and `spiffe-rustls` crates, which nobody here wrote.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::admin_api_client::AdminApiClient;
use sigil_server::config::FederationConfig;
use sigil_server::federation::config::{
    BundleEndpointConfig, ConfiguredRelationship, ServeProfile,
};
use sigil_svid::bundle::Bundle;
use sigil_testkit::web_pki::WebPki;
use sigil_testkit::{Cluster, ClusterOptions, free_addr};
use sigil_types::{BundleEndpointProfile, FederationRelationship, TrustDomain};
use spiffe::{WorkloadApiClient, X509Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::init;

/// How long a change may take to cross from one trust domain to the other's
/// workloads: a 1 s refresh hint, a poll, the store, the sync push.
const CROSSING: Duration = Duration::from_secs(20);

pub(crate) async fn admin(cluster: &Cluster) -> AdminApiClient<Channel> {
    let channel = sigil_client::channel(&cluster.admin_socket())
        .await
        .unwrap();
    AdminApiClient::new(channel)
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// The X.509 authorities of a trust domain's current bundle.
fn authorities(cluster: &Cluster) -> BTreeSet<Vec<u8>> {
    let state = &cluster.server().unwrap().state();
    state
        .ca()
        .bundle()
        .x509_authorities
        .iter()
        .cloned()
        .collect()
}

/// The X.509 authorities a workload gets for `td`, through the Workload API.
async fn workload_view(cluster: &Cluster, trust_domain: &str) -> Option<BTreeSet<Vec<u8>>> {
    let client = WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .ok()?;
    let bundles = client.fetch_x509_bundles().await.ok()?;
    let bundle = bundles.get(&spiffe::TrustDomain::new(trust_domain).unwrap())?;
    Some(
        bundle
            .authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
    )
}

/// Waits until the workload of `cluster` sees `want` as the bundle of `td`
/// (`None`: no bundle of `td` at all).
async fn wait_workload_view(
    cluster: &Cluster,
    trust_domain: &str,
    want: Option<&BTreeSet<Vec<u8>>>,
) {
    let deadline = tokio::time::Instant::now() + CROSSING;
    loop {
        let seen = workload_view(cluster, trust_domain).await;
        if seen.as_ref() == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the workload of {} sees {} authorities of {trust_domain}, expected {:?}",
            cluster.trust_domain(),
            seen.map(|s| s.len()).map_or("no".into(), |n| n.to_string()),
            want.map(BTreeSet::len),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The two federated trust domains and the files they share.
struct Pair {
    a: Cluster,
    b: Cluster,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// Starts `b.test` (https_web endpoint) and `a.test` (https_spiffe
    /// endpoint, configured relationship with `b.test`), creates `b.test`'s
    /// relationship with `a.test` through the admin API with `a.test`'s
    /// bundle as bootstrap, and registers one workload in each that
    /// federates with the other.
    async fn start() -> Self {
        init();
        let dir = tempfile::tempdir().unwrap();
        let web = WebPki::generate(dir.path()).unwrap();
        let a_endpoint = free_addr().unwrap();
        let b_endpoint = free_addr().unwrap();
        let fast = |federation: FederationConfig| ClusterOptions {
            bundle_refresh_hint: Duration::from_secs(1),
            federation: FederationConfig {
                min_refresh_interval: Duration::from_secs(1),
                ..federation
            },
            ..Default::default()
        };

        let b = Cluster::start(ClusterOptions {
            trust_domain: "b.test".into(),
            ..fast(FederationConfig {
                bundle_endpoint: Some(BundleEndpointConfig {
                    address: b_endpoint,
                    profile: ServeProfile::HttpsWeb {
                        cert_file: web.cert_file.clone(),
                        key_file: web.key_file.clone(),
                    },
                }),
                ..Default::default()
            })
        })
        .await
        .unwrap();

        let a = Cluster::start(ClusterOptions {
            trust_domain: "a.test".into(),
            ..fast(FederationConfig {
                bundle_endpoint: Some(BundleEndpointConfig {
                    address: a_endpoint,
                    profile: ServeProfile::HttpsSpiffe,
                }),
                federates_with: [(
                    td("b.test"),
                    ConfiguredRelationship {
                        relationship: FederationRelationship {
                            trust_domain: td("b.test"),
                            bundle_endpoint_url: format!(
                                "https://localhost:{}/",
                                b_endpoint.port()
                            ),
                            profile: BundleEndpointProfile::HttpsWeb,
                            from_config: true,
                        },
                        bundle_file: None,
                        ca_file: Some(web.ca_file.clone()),
                    },
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            })
        })
        .await
        .unwrap();

        // What an operator of b.test does with a.test's bundle, obtained out
        // of band (`sigil bundle show --format spiffe` at a.test).
        let a_bundle = admin(&a)
            .await
            .get_bundle(pb::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner()
            .bundle_json;
        let created = admin(&b)
            .await
            .create_federation_relationship(pb::FederationRelationship {
                trust_domain: "a.test".into(),
                bundle_endpoint_url: format!("https://127.0.0.1:{}/", a_endpoint.port()),
                bundle_endpoint_profile: "https_spiffe".into(),
                endpoint_spiffe_id: "spiffe://a.test/sigil/server".into(),
                trust_domain_bundle_json: a_bundle,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!created.from_config);

        let uid = nix::unistd::getuid();
        let sel = format!("unix:uid:{uid}");
        for (cluster, other) in [(&a, "b.test"), (&b, "a.test")] {
            let e = cluster
                .register_with("/workload", &[&sel], |e| {
                    e.federates_with = vec![td(other)];
                })
                .await
                .unwrap();
            cluster.wait_for_svid(&e.spiffe_id).await.unwrap();
        }
        Self { a, b, _dir: dir }
    }

    async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

async fn source(cluster: &Cluster) -> X509Source {
    X509Source::builder()
        .endpoint(cluster.socket_uri())
        .build()
        .await
        .unwrap()
}

/// A `b.test` workload serves mutual TLS; an `a.test` workload connects.
/// Each authenticates the other with the other trust domain's federated
/// bundle, as its own agent delivered it.
async fn cross_domain_mtls(pair: &Pair) {
    let server_src = source(&pair.b).await;
    let client_src = source(&pair.a).await;
    let server_cfg = spiffe_rustls::mtls_server(server_src.clone())
        .authorize(spiffe_rustls::authorizer::exact(["spiffe://a.test/workload"]).unwrap())
        .build()
        .unwrap();
    let client_cfg = spiffe_rustls::mtls_client(client_src.clone())
        .authorize(spiffe_rustls::authorizer::exact(["spiffe://b.test/workload"]).unwrap())
        .build()
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let id = sigil_svid::x509::cert_info(peer.as_ref())
            .unwrap()
            .spiffe_id
            .unwrap();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(format!("hello {id}").as_bytes())
            .await
            .unwrap();
        tls.shutdown().await.unwrap();
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("workload.b.test").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let server_id =
        sigil_svid::x509::cert_info(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref())
            .unwrap()
            .spiffe_id
            .unwrap();
    assert_eq!(server_id.as_str(), "spiffe://b.test/workload");
    tls.write_all(b"hello").await.unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "hello spiffe://a.test/workload");
    server.await.unwrap();
    server_src.shutdown().await;
    client_src.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federate_over_both_profiles() {
    let pair = Pair::start().await;
    let (a, b) = (&pair.a, &pair.b);

    // Each workload gets the other trust domain's bundle.
    wait_workload_view(a, "b.test", Some(&authorities(b))).await;
    wait_workload_view(b, "a.test", Some(&authorities(a))).await;

    // Relationship status, as `sigil federation list` shows it.
    let listed = admin(a)
        .await
        .list_federation_relationships(pb::ListFederationRelationshipsRequest {})
        .await
        .unwrap()
        .into_inner()
        .relationships;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].from_config && listed[0].bundle_endpoint_profile == "https_web");
    assert!(
        listed[0].last_refresh > 0 && listed[0].last_error.is_empty(),
        "{listed:?}"
    );

    cross_domain_mtls(&pair).await;

    // A JWT-SVID of a.test is validated by b.test's agent with the
    // federated JWT authorities.
    let a_client = WorkloadApiClient::connect_to(a.socket_uri()).await.unwrap();
    let jwt = a_client.fetch_jwt_svid(["b-service"], None).await.unwrap();
    let b_client = WorkloadApiClient::connect_to(b.socket_uri()).await.unwrap();
    let jwt_bundles = b_client.fetch_jwt_bundles().await.unwrap();
    assert!(
        jwt_bundles
            .get(&spiffe::TrustDomain::new("a.test").unwrap())
            .is_some_and(|jb| jb.find_jwt_authority(jwt.key_id()).is_some()),
        "b.test's workload holds a.test's JWT authorities"
    );
    let validated = b_client
        .validate_jwt_token("b-service", jwt.token())
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://a.test/workload"
    );

    // A rotation in either trust domain reaches the other's workloads by
    // polling alone: the next CA is published, fetched and pushed.
    for (rotating, watching, name) in [(b, a, "b.test"), (a, b, "a.test")] {
        let state = &rotating.server().unwrap().state();
        let before = authorities(rotating);
        state
            .ca()
            .rotate(SystemTime::now() + rotating.server_config.ca_ttl * 3 / 5)
            .await
            .unwrap();
        let after = authorities(rotating);
        assert_eq!(after.len(), before.len() + 1, "the next CA is published");
        wait_workload_view(watching, name, Some(&after)).await;
    }

    // Deleting b.test's relationship keeps the bundle; deleting the bundle
    // takes it away from the workload.
    let mut b_admin = admin(b).await;
    b_admin
        .delete_federation_relationship(pb::TrustDomainRequest {
            trust_domain: "a.test".into(),
        })
        .await
        .unwrap();
    let kept = b_admin
        .get_federated_bundle(pb::TrustDomainRequest {
            trust_domain: "a.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        Bundle::from_json(td("a.test"), &kept.bundle_json)
            .unwrap()
            .x509_authorities
            .into_iter()
            .collect::<BTreeSet<_>>(),
        authorities(a)
    );
    b_admin
        .delete_federated_bundle(pb::TrustDomainRequest {
            trust_domain: "a.test".into(),
        })
        .await
        .unwrap();
    wait_workload_view(b, "a.test", None).await;
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_survive_restarts_and_bad_endpoints_store_nothing() {
    let pair = Pair::start().await;
    let Pair { mut a, mut b, _dir } = pair;
    wait_workload_view(&a, "b.test", Some(&authorities(&b))).await;
    let b_bundle = authorities(&b);

    // A relationship whose endpoint presents another SPIFFE ID than the one
    // configured: the fetch fails, says why, and nothing is stored.
    let mut b_admin = admin(&b).await;
    let a_port = a.bundle_endpoint_addr().unwrap().port();
    b_admin
        .create_federation_relationship(pb::FederationRelationship {
            trust_domain: "c.test".into(),
            bundle_endpoint_url: format!("https://127.0.0.1:{a_port}/"),
            bundle_endpoint_profile: "https_spiffe".into(),
            endpoint_spiffe_id: "spiffe://a.test/impostor".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = b_admin
        .refresh_bundle(pb::TrustDomainRequest {
            trust_domain: "c.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let shown = b_admin
        .get_federation_relationship(pb::TrustDomainRequest {
            trust_domain: "c.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        shown
            .last_error
            .contains("presented spiffe://a.test/sigil/server, but the relationship expects spiffe://a.test/impostor"),
        "{}",
        shown.last_error
    );
    assert_eq!(shown.last_refresh, 0);
    let held: Vec<String> = b_admin
        .list_federated_bundles(pb::ListFederatedBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .bundles
        .into_iter()
        .map(|b| b.trust_domain)
        .collect();
    assert_eq!(held, vec!["a.test"]);
    // Config relationships are not the admin API's to change.
    let err = admin(&a)
        .await
        .delete_federation_relationship(pb::TrustDomainRequest {
            trust_domain: "b.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    // With b.test's endpoint gone, a.test restarts from its store: the
    // federated bundle is still there and still reaches the workload.
    b.stop_server().await;
    a.stop_server().await;
    a.start_server().await.unwrap();
    a.wait_connected(true).await.unwrap();
    let state = a.server().unwrap().state().clone();
    let held = state.federation().bundles();
    let held = Bundle::from_json(td("b.test"), &held[&td("b.test")]).unwrap();
    assert_eq!(
        held.x509_authorities.into_iter().collect::<BTreeSet<_>>(),
        b_bundle
    );
    wait_workload_view(&a, "b.test", Some(&b_bundle)).await;
    let status = admin(&a)
        .await
        .get_federation_relationship(pb::TrustDomainRequest {
            trust_domain: "b.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + CROSSING;
    let mut status = status;
    while status.last_error.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fetch failure reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = admin(&a)
            .await
            .get_federation_relationship(pb::TrustDomainRequest {
                trust_domain: "b.test".into(),
            })
            .await
            .unwrap()
            .into_inner();
    }
    assert!(
        status.last_error.contains("localhost"),
        "{}",
        status.last_error
    );

    // b.test comes back with its admin-made relationships, which poll again.
    b.start_server().await.unwrap();
    let relationships = admin(&b)
        .await
        .list_federation_relationships(pb::ListFederationRelationshipsRequest {})
        .await
        .unwrap()
        .into_inner()
        .relationships;
    let names: Vec<_> = relationships
        .iter()
        .map(|r| r.trust_domain.as_str())
        .collect();
    assert_eq!(names, vec!["a.test", "c.test"]);
    let refreshed = admin(&b)
        .await
        .refresh_bundle(pb::TrustDomainRequest {
            trust_domain: "a.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        Bundle::from_json(td("a.test"), &refreshed.bundle_json)
            .unwrap()
            .x509_authorities
            .into_iter()
            .collect::<BTreeSet<_>>(),
        authorities(&a)
    );
    a.shutdown().await;
    b.shutdown().await;
}
