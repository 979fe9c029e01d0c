//! Security invariants: who gets nothing, what is refused.

use std::time::Duration;

use sigil_proto::workload::X509svidRequest;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_testkit::Cluster;
use tokio::net::UnixStream;

use crate::{PROMPT, cluster_with_me, init};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_gets_permission_denied() {
    if !crate::need_root("another_uid_gets_permission_denied") {
        return;
    }
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    // The build directory may sit under a home only root can enter: run a
    // copy from the cluster's world-readable directory.
    let copy = cluster.dir.path().join("sigil");
    std::fs::copy(assert_cmd::cargo::cargo_bin("sigil"), &copy).unwrap();
    let out = std::process::Command::new(&copy)
        .args(["svid", "fetch"])
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.socket_uri())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no identity issued") && stderr.contains("PermissionDenied"),
        "{stderr}"
    );
    // The same command as this uid works.
    let ok = std::process::Command::new(assert_cmd::cargo::cargo_bin("sigil"))
        .args(["svid", "fetch"])
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.socket_uri())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    cluster.shutdown().await;
}

use std::os::unix::process::CommandExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_security_header_is_invalid_argument() {
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let channel = crate::unix_channel(cluster.agent_config.socket_path.clone()).await;
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let err = raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    cluster.shutdown().await;
}

fn second_agent_config(
    cluster: &Cluster,
    dir: &std::path::Path,
    token: String,
) -> sigil_agent::AgentConfig {
    let mut cfg = cluster.agent_config.clone();
    cfg.data_dir = dir.join("agent2");
    cfg.socket_path = dir.join("agent2.sock");
    cfg.join_token = Some(token);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_once() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let token = cluster
        .server()
        .unwrap()
        .state()
        .generate_join_token(None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = sigil_agent::start(second_agent_config(
        &cluster,
        dir.path(),
        token.token.clone(),
    ))
    .await
    .unwrap();
    assert_eq!(first.agent_id, token.agent_id);
    first.shutdown().await;

    let other = tempfile::tempdir().unwrap();
    let err = sigil_agent::start(second_agent_config(&cluster, other.path(), token.token))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already used"), "{err}");
    // A made-up token is refused the same way and records nothing.
    let agents_before = cluster
        .server()
        .unwrap()
        .state()
        .store()
        .list_agents()
        .await
        .unwrap()
        .len();
    let third = tempfile::tempdir().unwrap();
    let fake = "0123456789abcdef.notasecret".to_owned();
    let mut cfg = second_agent_config(&cluster, third.path(), fake);
    cfg.trust_bundle_path = Some(third.path().join("bundle.json"));
    std::fs::write(
        third.path().join("bundle.json"),
        cluster.server().unwrap().state().ca().bundle().to_json(),
    )
    .unwrap();
    let err = sigil_agent::start(cfg).await.unwrap_err().to_string();
    assert!(err.contains("unknown or was already used"), "{err}");
    let agents_after = cluster
        .server()
        .unwrap()
        .state()
        .store()
        .list_agents()
        .await
        .unwrap()
        .len();
    assert_eq!(agents_before, agents_after);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_agent_is_cut_off() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    let e1 = cluster
        .register("/before-ban", &["unix:uid:4242"])
        .await
        .unwrap();
    cluster.wait_for_svid(&e1.spiffe_id).await.unwrap();
    assert!(state.is_connected(cluster.agent_id()));

    // Before the ban, the agent's own SVID may make every agent call.
    let mut client = crate::agent_api_as_the_agent(&cluster).await;
    agent_calls(&mut client, e1.id.as_str()).await.unwrap();

    state.ban_agent(cluster.agent_id()).await.unwrap();
    cluster.wait_connected(false).await.unwrap();
    let e2 = cluster
        .register("/after-ban", &["unix:uid:4243"])
        .await
        .unwrap();
    // Its SVID, over real mutual TLS, no longer opens anything on the
    // server: Sync, BatchNewX509SVID and NewJWTSVID (even for an entry it
    // held), and RenewAgent.
    let mut client = crate::agent_api_as_the_agent(&cluster).await;
    let err = agent_calls(&mut client, e1.id.as_str()).await.unwrap_err();
    assert!(err.message().contains("banned"), "{}", err.message());
    let err = renew_through(&mut client).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("banned"), "{}", err.message());
    // The banned agent never learned of the entry registered after the ban:
    // every way to it is refused (above), and it is not connected.
    let snap = cluster.agent().unwrap().snapshots.borrow().clone();
    assert!(snap.entries.iter().all(|e| e.id != e2.id));
    assert!(!state.is_connected(cluster.agent_id()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_agent_is_cut_off() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    state.evict_agent(cluster.agent_id()).await.unwrap();
    cluster.wait_connected(false).await.unwrap();
    assert!(
        state
            .store()
            .get_agent(cluster.agent_id())
            .await
            .unwrap()
            .is_none()
    );
    let e = cluster
        .register("/after-evict", &["unix:uid:4244"])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        cluster
            .agent()
            .unwrap()
            .snapshots
            .borrow()
            .entries
            .iter()
            .all(|x| x.id != e.id)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_only_its_own_entries() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    // An entry under another (unknown) agent never reaches this one, and
    // this agent cannot have it signed.
    let foreign = cluster
        .register_with("/foreign", &["unix:uid:1"], |e| {
            e.parent_id = "spiffe://example.org/sigil/agent/join_token/ffffffffffffffff"
                .parse()
                .unwrap();
        })
        .await
        .unwrap();
    let mine = cluster.register("/mine", &["unix:uid:2"]).await.unwrap();
    cluster.wait_for_svid(&mine.spiffe_id).await.unwrap();
    let snap = cluster.agent().unwrap().snapshots.borrow().clone();
    assert!(snap.entries.iter().any(|e| e.id == mine.id));
    assert!(snap.entries.iter().all(|e| e.id != foreign.id));
    let record = state
        .store()
        .get_agent(cluster.agent_id())
        .await
        .unwrap()
        .unwrap();
    let key = sigil_svid::keys::PrivateKey::generate_p256().unwrap();
    let csr = sigil_svid::x509::make_csr(&key).unwrap();
    let results = state
        .sign_x509_svids(
            &record,
            vec![
                (foreign.id.to_string(), csr.clone()),
                (mine.id.to_string(), csr),
            ],
        )
        .unwrap();
    assert!(
        results[0]
            .1
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("not authorized")
    );
    assert!(results[1].1.is_ok());
    assert!(
        state
            .mint_jwt_svid(&record, foreign.id.as_str(), &["a".into()])
            .is_err()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_answers_promptly_when_nothing_matches() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(cluster.socket_uri())
        .await
        .unwrap();
    let err = tokio::time::timeout(PROMPT, client.fetch_x509_svid())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("no identity issued"), "{err}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_bootstraps_from_a_bundle_file_and_refuses_a_wrong_one() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    let dir = tempfile::tempdir().unwrap();

    // A token without the fingerprint, and the bundle given as PEM.
    let token = state.generate_join_token(None).await.unwrap();
    let bare: String = token.token.split('.').take(2).collect::<Vec<_>>().join(".");
    let pem = dir.path().join("bundle.pem");
    std::fs::write(&pem, state.ca().bundle().x509_pem()).unwrap();
    let mut cfg = second_agent_config(&cluster, dir.path(), bare.clone());
    cfg.trust_bundle_path = Some(pem);
    let agent = sigil_agent::start(cfg).await.unwrap();
    assert_eq!(agent.agent_id, token.agent_id);
    agent.shutdown().await;

    // A bundle of some other CA: the server cannot be authenticated, the token is not spent.
    let token = state.generate_join_token(None).await.unwrap();
    let other = sigil_svid::x509::X509Authority::generate(
        &sigil_types::TrustDomain::new("example.org").unwrap(),
        Duration::from_secs(3600),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(
        &wrong,
        sigil_svid::pem::certs_to_pem(&[other.cert_der().to_vec()]),
    )
    .unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let bare: String = token.token.split('.').take(2).collect::<Vec<_>>().join(".");
    let mut cfg = second_agent_config(&cluster, d2.path(), bare);
    cfg.trust_bundle_path = Some(wrong);
    assert!(sigil_agent::start(cfg).await.is_err());
    // A fingerprint that does not match is refused before attesting.
    let d3 = tempfile::tempdir().unwrap();
    let forged = format!(
        "{}.{}",
        token.token.rsplit_once('.').unwrap().0,
        "00".repeat(32)
    );
    let err = sigil_agent::start(second_agent_config(&cluster, d3.path(), forged))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("fingerprint"), "{err}");
    // The token survived both failures and still works.
    let d4 = tempfile::tempdir().unwrap();
    let agent = sigil_agent::start(second_agent_config(&cluster, d4.path(), token.token))
        .await
        .unwrap();
    agent.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_aliases_group_agents_by_node_selectors() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    let record = state
        .store()
        .get_agent(cluster.agent_id())
        .await
        .unwrap()
        .unwrap();
    let node_selector = record.selectors.iter().next().unwrap().to_string();
    assert!(node_selector.starts_with("join_token:"), "{node_selector}");

    let server_id = "spiffe://example.org/sigil/server";
    cluster
        .register_with("/nodes/group-a", &[&node_selector], |e| {
            e.parent_id = server_id.parse().unwrap()
        })
        .await
        .unwrap();
    cluster
        .register_with("/nodes/group-b", &["join_token:someone-else"], |e| {
            e.parent_id = server_id.parse().unwrap()
        })
        .await
        .unwrap();
    let via_a = cluster
        .register_with("/db", &["unix:uid:3306"], |e| {
            e.parent_id = "spiffe://example.org/nodes/group-a".parse().unwrap()
        })
        .await
        .unwrap();
    let via_b = cluster
        .register_with("/cache", &["unix:uid:6379"], |e| {
            e.parent_id = "spiffe://example.org/nodes/group-b".parse().unwrap()
        })
        .await
        .unwrap();
    cluster.wait_for_svid(&via_a.spiffe_id).await.unwrap();
    let snap = cluster.agent().unwrap().snapshots.borrow().clone();
    assert!(
        snap.entries.iter().any(|e| e.id == via_a.id),
        "entry under a matching alias arrives"
    );
    assert!(
        snap.entries.iter().all(|e| e.id != via_b.id),
        "entry under another alias does not"
    );
    assert!(
        snap.entries.iter().all(|e| !e.is_node_alias()),
        "aliases themselves are not workload entries"
    );
    cluster.shutdown().await;
}

/// One local user flooding the Workload API socket stops at its own cap;
/// another user still gets through (and is refused only for having no
/// identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_of_one_uid_leaves_room_for_others() {
    if !crate::need_root("a_connection_flood_of_one_uid_leaves_room_for_others") {
        return;
    }
    const PER_UID: usize = 3;
    let (cluster, _me) = cluster_with_me(sigil_testkit::ClusterOptions {
        agent_limits: sigil_agent::limits::AgentLimits {
            max_connections: 8,
            max_connections_per_uid: PER_UID,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let path = cluster.agent_config.socket_path.clone();
    let mut held = Vec::new();
    for _ in 0..PER_UID {
        held.push(UnixStream::connect(&path).await.unwrap());
    }
    let mut over = UnixStream::connect(&path).await.unwrap();
    assert!(
        sigil_testkit::wire::closed_by_peer(&mut over, PROMPT).await,
        "a connection over this uid's cap was kept"
    );

    let copy = cluster.dir.path().join("sigil");
    std::fs::copy(assert_cmd::cargo::cargo_bin("sigil"), &copy).unwrap();
    let fetch_as = |uid: Option<u32>| {
        let mut cmd = std::process::Command::new(&copy);
        cmd.args(["svid", "fetch"])
            .env("SPIFFE_ENDPOINT_SOCKET", cluster.socket_uri());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // This uid is at its cap: its new client does not get through.
    let (ok, stderr) = fetch_as(None);
    assert!(!ok, "a client over this uid's cap was served");
    assert!(!stderr.contains("no identity issued"), "{stderr}");
    // Another uid is served: refused for having no identity, not for room.
    let (ok, stderr) = fetch_as(Some(65534));
    assert!(!ok);
    assert!(
        stderr.contains("no identity issued") && stderr.contains("PermissionDenied"),
        "{stderr}"
    );
    // Once the flood closes, this uid is served again.
    drop(held);
    drop(over);
    let deadline = tokio::time::Instant::now() + PROMPT;
    while !fetch_as(None).0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "this uid's slots were never given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}

/// Issue #12 item 7: in a mount namespace of its own a caller can make
/// `/proc/<pid>/exe` name any path (here: the sigil binary bind-mounted over
/// a file that, for the agent, is empty). Such a caller gets no `unix:path`
/// selector, so an entry for that path does not match it; a caller in the
/// agent's namespace still gets the path of its binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_path_is_withheld_from_a_caller_in_another_mount_namespace() {
    if !crate::need_root("unix_path_is_withheld_from_a_caller_in_another_mount_namespace") {
        return;
    }
    init();
    let mut cluster = Cluster::start(Default::default()).await.unwrap();
    cluster.stop_agent().await;
    cluster.agent_config.discover_workload_path = true;
    cluster.start_agent().await.unwrap();
    cluster.wait_connected(true).await.unwrap();

    let copy = cluster.dir.path().join("sigil");
    std::fs::copy(assert_cmd::cargo::cargo_bin("sigil"), &copy).unwrap();
    let fake = cluster.dir.path().join("trusted-daemon");
    std::fs::write(&fake, b"").unwrap();
    let impostor = cluster
        .register("/impostor", &[&format!("unix:path:{}", fake.display())])
        .await
        .unwrap();
    let real = cluster
        .register("/real", &[&format!("unix:path:{}", copy.display())])
        .await
        .unwrap();
    cluster.wait_for_svid(&impostor.spiffe_id).await.unwrap();
    cluster.wait_for_svid(&real.spiffe_id).await.unwrap();

    let socket = cluster.socket_uri();
    let run = move |cmd: &mut std::process::Command| {
        let out = cmd.env("SPIFFE_ENDPOINT_SOCKET", &socket).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(std::process::Command::new(&copy).args(["svid", "fetch"]));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("spiffe://example.org/real"), "{stdout}");
    assert!(!stdout.contains("impostor"), "{stdout}");

    let (ok, stdout, stderr) = run(std::process::Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$1\" \"$2\" && exec \"$2\" svid fetch",
        "sh",
        copy.to_str().unwrap(),
        fake.to_str().unwrap(),
    ]));
    assert!(!ok, "a caller in its own mount namespace got {stdout}");
    assert!(
        stderr.contains("no identity issued"),
        "expected PermissionDenied, got: {stderr}"
    );
    cluster.shutdown().await;
}

/// Issue #12 item 7: `admin` and `downstream` entries would claim powers
/// nothing grants; the admin API and the CLI refuse them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_downstream_entries_are_refused_as_not_supported() {
    use sigil_proto::server::v1 as pb;
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let channel = crate::unix_channel(cluster.admin_socket()).await;
    let mut admin = pb::admin_api_client::AdminApiClient::new(channel);
    let agent = cluster.agent_id().to_string();
    let entry = |path: &str| pb::Entry {
        spiffe_id: format!("spiffe://example.org/{path}"),
        parent_id: agent.clone(),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    };
    let plain = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![entry("plain")],
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0)
        .entry
        .unwrap();
    let r = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![
                pb::Entry {
                    admin: true,
                    ..entry("admin")
                },
                pb::Entry {
                    downstream: true,
                    ..entry("downstream")
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].error, "admin is not supported yet");
    assert_eq!(r.results[1].error, "downstream is not supported yet");
    // Nor can an existing entry be switched to either.
    let r = admin
        .batch_update_entry(pb::BatchUpdateEntryRequest {
            entries: vec![pb::Entry {
                admin: true,
                ..plain.clone()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].error, "admin is not supported yet");
    let listed = admin
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].admin && !listed[0].downstream);

    for flag in ["--admin", "--downstream"] {
        let out = tokio::task::spawn_blocking({
            let admin_socket = cluster.admin_socket();
            let agent = agent.clone();
            move || {
                std::process::Command::new(assert_cmd::cargo::cargo_bin("sigil"))
                    .args([
                        "entry",
                        "create",
                        "--spiffe-id",
                        "spiffe://example.org/flag",
                    ])
                    .args(["--parent-id", &agent, "--selector", "unix:uid:7", flag])
                    .env("SIGIL_ADMIN_SOCKET", admin_socket)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&format!("{flag} is not supported yet")),
            "{stderr}"
        );
    }
    cluster.shutdown().await;
}

/// An agent-API client presenting `chain`/`key` (any agent SVID, current or not).
pub(crate) async fn agent_client_with(
    cluster: &Cluster,
    chain: Vec<Vec<u8>>,
    key: &sigil_svid::keys::PrivateKey,
) -> sigil_proto::server::v1::agent_api_client::AgentApiClient<tonic::transport::Channel> {
    let bundle = cluster.server().unwrap().state().ca().bundle();
    let trust = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee((*bundle).clone()));
    let cert = std::sync::Arc::new(sigil_svid::tls::RotatingCert::new(chain, key).unwrap());
    sigil_agent::client::connect(
        &cluster.agent_config.server_address,
        trust,
        "spiffe://example.org/sigil/server".parse().unwrap(),
        Some(cert),
    )
    .await
    .unwrap()
}

/// A fresh key and the agent SVID the server renews it into, through `client`.
pub(crate) async fn renew_through(
    client: &mut sigil_proto::server::v1::agent_api_client::AgentApiClient<
        tonic::transport::Channel,
    >,
) -> Result<(Vec<Vec<u8>>, sigil_svid::keys::PrivateKey), tonic::Status> {
    let key = sigil_svid::keys::PrivateKey::generate_p256().unwrap();
    let csr = sigil_svid::x509::make_csr(&key).unwrap();
    let chain = client
        .renew_agent(sigil_proto::server::v1::RenewAgentRequest { csr })
        .await?
        .into_inner()
        .cert_chain;
    Ok((chain, key))
}

/// Every authenticated agent call with `client`: Ok(()) if all are accepted,
/// else the first refusal (each must be PermissionDenied).
pub(crate) async fn agent_calls(
    client: &mut sigil_proto::server::v1::agent_api_client::AgentApiClient<
        tonic::transport::Channel,
    >,
    entry_id: &str,
) -> Result<(), tonic::Status> {
    use sigil_proto::server::v1 as pb;
    let csr = sigil_svid::x509::make_csr(&sigil_svid::keys::PrivateKey::generate_p256().unwrap())
        .unwrap();
    let results = [
        client.sync(pb::SyncRequest::default()).await.map(|_| ()),
        client
            .batch_new_x509svid(pb::BatchNewX509svidRequest {
                params: vec![pb::X509svidParams {
                    entry_id: entry_id.to_owned(),
                    csr,
                }],
            })
            .await
            .map(|r| assert!(r.into_inner().results[0].error.is_empty())),
        client
            .new_jwtsvid(pb::NewJwtsvidRequest {
                entry_id: entry_id.to_owned(),
                audience: vec!["db".into()],
            })
            .await
            .map(|_| ()),
    ];
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        accepted == 0 || accepted == results.len(),
        "the calls disagree: {results:?}"
    );
    for r in results {
        if let Err(s) = r {
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
            return Err(s);
        }
    }
    Ok(())
}

/// Issue #12 item 7: a copy of the agent SVID from before a renewal works
/// only until the renewed SVID is used (a renewal whose answer was lost can
/// be retried with it); after that every call with it is refused, an open
/// sync stream of it is cut, and the refusal survives a server restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_agent_svid_stops_working_once_the_renewed_one_is_used() {
    init();
    let mut cluster = Cluster::start(Default::default()).await.unwrap();
    let entry = cluster.register("/db", &["unix:uid:4250"]).await.unwrap();
    let entry_id = entry.id.to_string();
    cluster.wait_for_svid(&entry.spiffe_id).await.unwrap();
    // The test plays the agent from here, with copies of its SVIDs.
    cluster.stop_agent().await;
    let stolen = sigil_agent::persist::Persist::open(&cluster.agent_config.data_dir)
        .unwrap()
        .load_identity()
        .unwrap()
        .unwrap();
    let mut old = agent_client_with(&cluster, stolen.chain.clone(), &stolen.key).await;
    agent_calls(&mut old, &entry_id).await.unwrap();

    // Renewed, but the answer "lost": the old SVID still works, and retries.
    let (lost_chain, lost_key) = renew_through(&mut old).await.unwrap();
    agent_calls(&mut old, &entry_id).await.unwrap();
    let mut old_stream = old
        .sync(sigil_proto::server::v1::SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(old_stream.message().await.unwrap().is_some());
    let (chain, key) = renew_through(&mut old).await.unwrap();
    // The SVID of the lost answer was replaced by the retry's.
    let mut lost = agent_client_with(&cluster, lost_chain, &lost_key).await;
    assert!(agent_calls(&mut lost, &entry_id).await.is_err());

    // The renewed SVID is used: from now on the old one is refused
    // everywhere, and its open stream ends.
    let mut new = agent_client_with(&cluster, chain.clone(), &key).await;
    agent_calls(&mut new, &entry_id).await.unwrap();
    let refused = agent_calls(&mut old, &entry_id).await.unwrap_err();
    assert!(
        refused.message().contains("no longer current"),
        "{}",
        refused.message()
    );
    let renew = renew_through(&mut old).await.unwrap_err();
    assert_eq!(renew.code(), tonic::Code::PermissionDenied, "{renew:?}");
    let cut = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match old_stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the old SVID's sync stream is cut");
    assert_eq!(
        cut.unwrap_err().code(),
        tonic::Code::PermissionDenied,
        "the stream ends refused"
    );

    // Persisted: a restarted server refuses it too, and takes the renewed one.
    drop((old, new, lost));
    cluster.stop_server().await;
    cluster.start_server().await.unwrap();
    let mut old = agent_client_with(&cluster, stolen.chain.clone(), &stolen.key).await;
    assert!(agent_calls(&mut old, &entry_id).await.is_err());
    let mut new = agent_client_with(&cluster, chain.clone(), &key).await;
    agent_calls(&mut new, &entry_id).await.unwrap();

    // One more renewal: the SVID two renewals old stays refused even before
    // the newest is used, while the one just before it still works.
    let (chain3, key3) = renew_through(&mut new).await.unwrap();
    assert!(agent_calls(&mut old, &entry_id).await.is_err());
    agent_calls(&mut new, &entry_id).await.unwrap();
    let mut newest = agent_client_with(&cluster, chain3, &key3).await;
    agent_calls(&mut newest, &entry_id).await.unwrap();
    assert!(agent_calls(&mut new, &entry_id).await.is_err());
    assert!(agent_calls(&mut old, &entry_id).await.is_err());
    cluster.shutdown().await;
}

/// Issue #12 item 5: a batch through the admin API refuses the entries
/// with a reserved SPIFFE ID (and only those), and an entry with a reserved
/// ID already in the store (written before the rule, or by an older server
/// on the same database) is listed but never reaches an agent or gets signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_ids_are_refused_and_stored_ones_never_served() {
    use sigil_proto::server::v1 as pb;
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let agent = cluster.agent_id().to_string();
    let mut admin = crate::procs::admin_client(&cluster.admin_socket())
        .await
        .unwrap();
    let item = |spiffe_id: &str, parent_id: &str| pb::Entry {
        spiffe_id: spiffe_id.to_owned(),
        parent_id: parent_id.to_owned(),
        selectors: vec!["unix:uid:4260".into()],
        ..Default::default()
    };
    let server_id = "spiffe://example.org/sigil/server";
    let results = admin
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![
                item("spiffe://example.org/fine", &agent),
                item(server_id, &agent),
                item("spiffe://example.org/sigil/k8s/c/nodes", server_id),
                item(&format!("{agent}-twin"), server_id),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let errors: Vec<&str> = results.iter().map(|r| r.error.as_str()).collect();
    assert!(errors[0].is_empty() && errors[2].is_empty(), "{errors:?}");
    assert!(errors[1].contains("is reserved"), "{errors:?}");
    assert!(
        errors[3].contains("names the sigil server or an agent"),
        "{errors:?}"
    );

    // Written straight into the store, as an older version could have.
    let state = cluster.server().unwrap().state().clone();
    let posing = state
        .store()
        .create_entry(sigil_types::Entry::new(
            "posing-as-server".parse().unwrap(),
            server_id.parse().unwrap(),
            cluster.agent_id().clone(),
            sigil_types::Selectors::parse_all(["unix:uid:4261"]).unwrap(),
        ))
        .await
        .unwrap();
    // An entry written after it reaches the agent; the reserved one never.
    let after = cluster
        .register("/after", &["unix:uid:4262"])
        .await
        .unwrap();
    cluster.wait_for_svid(&after.spiffe_id).await.unwrap();
    let snap = cluster.agent().unwrap().snapshots.borrow().clone();
    assert!(snap.entries.iter().all(|e| e.id != posing.id));
    assert!(
        snap.svids
            .values()
            .all(|s| s.spiffe_id.as_str() != server_id)
    );
    // Asked for by ID with the agent's own SVID, it is not signed either.
    let identity = sigil_agent::persist::Persist::open(&cluster.agent_config.data_dir)
        .unwrap()
        .load_identity()
        .unwrap()
        .unwrap();
    let mut client = agent_client_with(&cluster, identity.chain, &identity.key).await;
    let csr = sigil_svid::x509::make_csr(&sigil_svid::keys::PrivateKey::generate_p256().unwrap())
        .unwrap();
    let signed = client
        .batch_new_x509svid(pb::BatchNewX509svidRequest {
            params: vec![pb::X509svidParams {
                entry_id: posing.id.to_string(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(signed.results[0].cert_chain.is_empty());
    assert!(signed.results[0].error.contains("not authorized"));
    let jwt = client
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: posing.id.to_string(),
            audience: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(jwt.code(), tonic::Code::PermissionDenied);
    // The operator sees it and can delete it.
    let listed = admin
        .get_entry(pb::GetEntryRequest {
            id: posing.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.spiffe_id, server_id);
    let deleted = admin
        .batch_delete_entry(pb::BatchDeleteEntryRequest {
            ids: vec![posing.id.to_string()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.results[0].error.is_empty());
    cluster.shutdown().await;
}

/// A fake agent API on 127.0.0.1 playing a man in the middle of a join: its
/// own CA (same trust domain), an SVID for `spiffe://<td>/sigil/server` from
/// that CA, a `GetBundle` answer of its choosing, and every join token it is
/// sent recorded.
struct RogueServer {
    addr: std::net::SocketAddr,
    ca: sigil_svid::x509::X509Authority,
    tokens: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    cancel: tokio_util::sync::CancellationToken,
}

#[derive(Clone)]
struct RogueApi {
    td: sigil_types::TrustDomain,
    ca: std::sync::Arc<sigil_svid::x509::X509Authority>,
    served_bundle: String,
    tokens: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

type RogueResult<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl sigil_proto::server::v1::agent_api_server::AgentApi for RogueApi {
    async fn get_bundle(
        &self,
        _: tonic::Request<sigil_proto::server::v1::GetBundleRequest>,
    ) -> RogueResult<sigil_proto::server::v1::GetBundleResponse> {
        Ok(tonic::Response::new(
            sigil_proto::server::v1::GetBundleResponse {
                bundle_json: self.served_bundle.clone(),
                trust_domain: self.td.to_string(),
            },
        ))
    }

    async fn attest_join_token(
        &self,
        req: tonic::Request<sigil_proto::server::v1::AttestJoinTokenRequest>,
    ) -> RogueResult<sigil_proto::server::v1::AttestResponse> {
        let req = req.into_inner();
        self.tokens.lock().unwrap().push(req.token.clone());
        // Answer as a real server would, with an SVID and bundle of its own CA.
        let id = self
            .td
            .id_with_path(&format!(
                "/sigil/agent/join_token/{}",
                req.token.split('.').next().unwrap()
            ))
            .unwrap();
        let spki = sigil_svid::x509::csr_public_key(&req.csr).unwrap();
        let leaf = self
            .ca
            .sign_svid(
                &sigil_svid::x509::SvidRequest::new(&id, Duration::from_secs(3600)),
                &spki,
                std::time::SystemTime::now(),
            )
            .unwrap();
        let mut own = sigil_svid::bundle::Bundle::new(self.td.clone());
        own.x509_authorities.push(self.ca.cert_der().to_vec());
        Ok(tonic::Response::new(
            sigil_proto::server::v1::AttestResponse {
                spiffe_id: id.to_string(),
                cert_chain: vec![leaf],
                bundle_json: own.to_json(),
            },
        ))
    }

    async fn attest_psat(
        &self,
        _: tonic::Request<sigil_proto::server::v1::AttestPsatRequest>,
    ) -> RogueResult<sigil_proto::server::v1::AttestResponse> {
        Err(tonic::Status::unimplemented("rogue"))
    }

    async fn renew_agent(
        &self,
        _: tonic::Request<sigil_proto::server::v1::RenewAgentRequest>,
    ) -> RogueResult<sigil_proto::server::v1::AttestResponse> {
        Err(tonic::Status::unimplemented("rogue"))
    }

    type SyncStream =
        tokio_stream::Empty<Result<sigil_proto::server::v1::SyncMessage, tonic::Status>>;

    async fn sync(
        &self,
        _: tonic::Request<sigil_proto::server::v1::SyncRequest>,
    ) -> RogueResult<Self::SyncStream> {
        Err(tonic::Status::unimplemented("rogue"))
    }

    async fn batch_new_x509svid(
        &self,
        _: tonic::Request<sigil_proto::server::v1::BatchNewX509svidRequest>,
    ) -> RogueResult<sigil_proto::server::v1::BatchNewX509svidResponse> {
        Err(tonic::Status::unimplemented("rogue"))
    }

    async fn new_jwtsvid(
        &self,
        _: tonic::Request<sigil_proto::server::v1::NewJwtsvidRequest>,
    ) -> RogueResult<sigil_proto::server::v1::NewJwtsvidResponse> {
        Err(tonic::Status::unimplemented("rogue"))
    }
}

impl RogueServer {
    /// Starts the rogue server; `served` builds its `GetBundle` answer from
    /// its own CA certificate.
    async fn start(td: &sigil_types::TrustDomain, served: impl FnOnce(&[u8]) -> String) -> Self {
        use std::sync::Arc;
        let ca = sigil_svid::x509::X509Authority::generate(
            td,
            Duration::from_secs(3600),
            std::time::SystemTime::now(),
        )
        .unwrap();
        let key = sigil_svid::keys::PrivateKey::generate_p256().unwrap();
        let server_id = td.id_with_path(sigil_types::SERVER_PATH).unwrap();
        let leaf = ca
            .sign_svid(
                &sigil_svid::x509::SvidRequest::new(&server_id, Duration::from_secs(3600)),
                &key.public_key_spki_der(),
                std::time::SystemTime::now(),
            )
            .unwrap();
        let cert = Arc::new(sigil_svid::tls::RotatingCert::new(vec![leaf], &key).unwrap());
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(cert);
        config.alpn_protocols = vec![b"h2".to_vec()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let incoming = sigil_server::tls::incoming(
            listener,
            Arc::new(config),
            cancel.clone(),
            &Default::default(),
        );
        let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
        let api = RogueApi {
            td: td.clone(),
            served_bundle: served(ca.cert_der()),
            ca: Arc::new(ca.clone()),
            tokens: tokens.clone(),
        };
        let shutdown = cancel.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(sigil_proto::server::v1::agent_api_server::AgentApiServer::new(api))
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()),
        );
        Self {
            addr,
            ca,
            tokens,
            cancel,
        }
    }
}

impl Drop for RogueServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The SPIFFE bundle JSON of `td` with these X.509 authorities.
fn bundle_json_of(td: &sigil_types::TrustDomain, authorities: &[&[u8]]) -> String {
    let mut b = sigil_svid::bundle::Bundle::new(td.clone());
    b.x509_authorities = authorities.iter().map(|a| a.to_vec()).collect();
    b.to_json()
}

/// Issue #12 item 3: a man in the middle serves the real CA (which has the
/// join token's fingerprint) next to its own, and presents
/// `spiffe://<td>/sigil/server` from its own CA. Only the pinned authority
/// may anchor the attestation handshake, so the agent refuses to talk to it:
/// the rogue never sees the token and none of its authorities is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_fingerprint_pins_only_its_authority() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    let td = cluster.trust_domain().clone();
    let real_ca = state.ca().active().x509.cert_der().to_vec();
    let token = state.generate_join_token(None).await.unwrap();
    assert_eq!(
        token.token.rsplit('.').next().unwrap(),
        sigil_svid::x509::sha256_hex(&real_ca)
    );

    let rogue = RogueServer::start(&td, |own| bundle_json_of(&td, &[&real_ca, own])).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = second_agent_config(&cluster, dir.path(), token.token.clone());
    cfg.server_address = sigil_agent::config::ServerAddresses::one(rogue.addr.to_string());
    let data_dir = cfg.data_dir.clone();
    let err = sigil_agent::start(cfg).await.unwrap_err().to_string();
    assert!(
        rogue.tokens.lock().unwrap().is_empty(),
        "the rogue server was sent the join token ({err})"
    );
    assert!(err.contains("cannot reach a server"), "{err}");
    let rogue_b64 = base64_of(rogue.ca.cert_der());
    for file in std::fs::read_dir(&data_dir).into_iter().flatten() {
        let file = file.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
        assert!(
            !text.contains(&rogue_b64),
            "{} holds the rogue authority",
            file.display()
        );
    }

    // The same token then joins the real server, and the bundle the agent
    // keeps is the real server's (from the authenticated attestation answer).
    let dir = tempfile::tempdir().unwrap();
    let cfg = second_agent_config(&cluster, dir.path(), token.token.clone());
    let data_dir = cfg.data_dir.clone();
    let agent = sigil_agent::start(cfg).await.unwrap();
    assert_eq!(agent.agent_id, token.agent_id);
    agent.shutdown().await;
    let kept = sigil_agent::persist::Persist::open(&data_dir)
        .unwrap()
        .load_bundle(&td)
        .unwrap()
        .unwrap();
    assert_eq!(kept.x509_authorities, state.ca().bundle().x509_authorities);
    cluster.shutdown().await;
}

/// A bootstrap bundle without the token's fingerprint, or a fingerprint that
/// is not a SHA-256, is refused with an error that says so, before any token
/// is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_fingerprint_that_matches_nothing_is_refused() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    let td = cluster.trust_domain().clone();
    let token = state.generate_join_token(None).await.unwrap();
    // The rogue serves only its own CA.
    let rogue = RogueServer::start(&td, |own| bundle_json_of(&td, &[own])).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = second_agent_config(&cluster, dir.path(), token.token.clone());
    cfg.server_address = sigil_agent::config::ServerAddresses::one(rogue.addr.to_string());
    let err = sigil_agent::start(cfg).await.unwrap_err().to_string();
    let fingerprint = token.token.rsplit('.').next().unwrap();
    assert!(
        err.contains("without the CA fingerprint") && err.contains(fingerprint),
        "{err}"
    );
    assert!(rogue.tokens.lock().unwrap().is_empty());

    let (id_secret, _) = token.token.rsplit_once('.').unwrap();
    let mut cfg = second_agent_config(&cluster, dir.path(), format!("{id_secret}.abc"));
    cfg.server_address = sigil_agent::config::ServerAddresses::one(rogue.addr.to_string());
    let err = sigil_agent::start(cfg).await.unwrap_err().to_string();
    assert!(err.contains("is not a SHA-256"), "{err}");
    assert!(rogue.tokens.lock().unwrap().is_empty());
    cluster.shutdown().await;
}

fn base64_of(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// Issue #12 item 8: the agent reads its bootstrap bundle with the same
/// strict parser as `sigil bundle set`, so a PEM file holding an SVID (not
/// a CA) is refused as such, before any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_pem_bundle_holding_a_leaf() {
    init();
    let cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    let token = state.generate_join_token(None).await.unwrap();
    let ca = state.ca().active().x509.clone();
    let key = sigil_svid::keys::PrivateKey::generate_p256().unwrap();
    let leaf = ca
        .sign_svid(
            &sigil_svid::x509::SvidRequest::new(cluster.agent_id(), Duration::from_secs(600)),
            &key.public_key_spki_der(),
            std::time::SystemTime::now(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("bundle.pem");
    std::fs::write(
        &pem,
        sigil_svid::pem::certs_to_pem(&[ca.cert_der().to_vec(), leaf]),
    )
    .unwrap();
    let bare: String = token.token.split('.').take(2).collect::<Vec<_>>().join(".");
    let mut cfg = second_agent_config(&cluster, dir.path(), bare);
    cfg.trust_bundle_path = Some(pem);
    let err = sigil_agent::start(cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("bundle.pem") && err.contains("bundle key 1: not a CA certificate"),
        "{err}"
    );
    cluster.shutdown().await;
}
