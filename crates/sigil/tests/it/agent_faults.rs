//! Agent-side claims proven over the network (issue #13): what one agent's
//! SVID opens on the server's agent API over real mutual TLS, workloads
//! doing mutual TLS while their agent is SIGKILLed and restarted, and an
//! agent that starts with neither a server nor a cache.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use sigil_proto::server::v1 as pb;
use sigil_proto::workload as wl;
use sigil_testkit::{Cluster, ReservedAddr};
use tokio::time::Instant;

use crate::faults::{Pair, register_pairs};
use crate::procs::{
    AgentBin, ServerBin, create_entry_for_me, fetch_svid, server_and_agent, wait_until,
};
use crate::security::{agent_calls, agent_client_with, renew_through};
use crate::{PROMPT, init};

/// A new key's CSR.
fn csr() -> Vec<u8> {
    sigil_svid::x509::make_csr(&sigil_svid::keys::PrivateKey::generate_p256().unwrap()).unwrap()
}

/// Agent B, attested to the same server as agent A with a join token of its
/// own, holds a valid agent SVID and a working connection; over that
/// connection (its SVID as the client certificate, real TLS to the server's
/// TCP listener) it asks for an SVID of entry E, which is parented to A.
/// Both the X.509 and the JWT request are refused and nothing is signed or
/// minted, while in the same batch B's own entry is signed, and A's calls
/// for E succeed. Then A's own SVID from two renewals ago (each renewal made
/// with the SVID before it, as the agent does) is refused on every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_nothing_for_another_agents_entry_over_mtls() {
    init();
    let mut cluster = Cluster::start(Default::default()).await.unwrap();
    let state = cluster.server().unwrap().state().clone();
    let roots = state.ca().bundle().x509_authorities.clone();

    let token = state.generate_join_token(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut b_cfg = cluster.agent_config.clone();
    b_cfg.data_dir = dir.path().join("agent-b");
    b_cfg.socket_path = dir.path().join("agent-b.sock");
    b_cfg.join_token = Some(token.token);
    let b = sigil_agent::start(b_cfg.clone()).await.unwrap();
    assert_ne!(&b.agent_id, cluster.agent_id());

    let e = cluster
        .register("/only-a", &["unix:uid:4270"])
        .await
        .unwrap();
    let f = cluster
        .register_with("/only-b", &["unix:uid:4271"], |x| {
            x.parent_id = b.agent_id.clone();
        })
        .await
        .unwrap();
    cluster.wait_for_svid(&e.spiffe_id).await.unwrap();
    let mut b_snaps = b.snapshots.clone();
    tokio::time::timeout(
        Duration::from_secs(15),
        b_snaps.wait_for(|s| s.svids.values().any(|v| v.spiffe_id == f.spiffe_id)),
    )
    .await
    .expect("agent B gets its own entry's SVID")
    .unwrap();
    // Each agent was sent only its own entry.
    let a_snap = cluster.agent().unwrap().snapshots.borrow().clone();
    assert!(a_snap.entries.iter().all(|x| x.id != f.id));
    assert!(b.snapshots.borrow().entries.iter().all(|x| x.id != e.id));

    let b_identity = sigil_agent::persist::Persist::open(&b_cfg.data_dir)
        .unwrap()
        .load_identity()
        .unwrap()
        .unwrap();
    assert_eq!(b_identity.id, b.agent_id);
    let mut as_b = agent_client_with(&cluster, b_identity.chain.clone(), &b_identity.key).await;

    // X.509: one batch with A's entry and B's own. B's is signed, A's is
    // refused in its result, and the server signed exactly one SVID.
    let signed_before = state.metrics().x509_svids_signed.get();
    let batch = as_b
        .batch_new_x509svid(pb::BatchNewX509svidRequest {
            params: vec![
                pb::X509svidParams {
                    entry_id: e.id.to_string(),
                    csr: csr(),
                },
                pb::X509svidParams {
                    entry_id: f.id.to_string(),
                    csr: csr(),
                },
            ],
        })
        .await
        .expect("B's batch call itself is accepted")
        .into_inner()
        .results;
    assert_eq!(batch.len(), 2);
    assert!(
        batch[0].cert_chain.is_empty(),
        "B was issued an SVID of A's entry"
    );
    assert_eq!(
        batch[0].error,
        format!("entry {} is not authorized for this agent", e.id)
    );
    assert!(batch[1].error.is_empty(), "{}", batch[1].error);
    assert_eq!(
        sigil_svid::x509::verify_svid(&batch[1].cert_chain, &roots, SystemTime::now()).unwrap(),
        f.spiffe_id
    );
    assert_eq!(state.metrics().x509_svids_signed.get(), signed_before + 1);

    // JWT: refused with PermissionDenied, nothing minted; B's own works.
    let minted_before = state.metrics().jwt_svids_minted.get();
    let refused = as_b
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: e.id.to_string(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("not authorized"), "{refused:?}");
    assert_eq!(state.metrics().jwt_svids_minted.get(), minted_before);
    let own = as_b
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: f.id.to_string(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(
        sigil_svid::jwt::parse_jwt_unverified(&own)
            .unwrap()
            .spiffe_id,
        f.spiffe_id
    );

    // A, over its own connection, gets both for E.
    let mut as_a = crate::agent_api_as_the_agent(&cluster).await;
    let a_batch = as_a
        .batch_new_x509svid(pb::BatchNewX509svidRequest {
            params: vec![pb::X509svidParams {
                entry_id: e.id.to_string(),
                csr: csr(),
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(a_batch[0].error.is_empty(), "{}", a_batch[0].error);
    assert_eq!(
        sigil_svid::x509::verify_svid(&a_batch[0].cert_chain, &roots, SystemTime::now()).unwrap(),
        e.spiffe_id
    );
    let a_jwt = as_a
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: e.id.to_string(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(
        sigil_svid::jwt::parse_jwt_unverified(&a_jwt)
            .unwrap()
            .spiffe_id,
        e.spiffe_id
    );
    b.shutdown().await;

    // A's SVID two renewals old. The test plays agent A from here (its
    // process stopped, so that only the test renews): A0 renews into A1,
    // A1 (now in use) into A2, and A2 is used.
    let e_id = e.id.to_string();
    cluster.stop_agent().await;
    let a0 = sigil_agent::persist::Persist::open(&cluster.agent_config.data_dir)
        .unwrap()
        .load_identity()
        .unwrap()
        .unwrap();
    let mut with_a0 = agent_client_with(&cluster, a0.chain.clone(), &a0.key).await;
    let (a1_chain, a1_key) = renew_through(&mut with_a0).await.unwrap();
    let mut with_a1 = agent_client_with(&cluster, a1_chain, &a1_key).await;
    let (a2_chain, a2_key) = renew_through(&mut with_a1).await.unwrap();
    let mut with_a2 = agent_client_with(&cluster, a2_chain, &a2_key).await;
    agent_calls(&mut with_a2, &e_id).await.unwrap();
    // A fresh connection with A0 (a replay from a copy), and the old one.
    let mut replay = agent_client_with(&cluster, a0.chain.clone(), &a0.key).await;
    for client in [&mut replay, &mut with_a0, &mut with_a1] {
        let refused = agent_calls(client, &e_id).await.unwrap_err();
        assert!(
            refused.message().contains("no longer current"),
            "{}",
            refused.message()
        );
        let renew = renew_through(client).await.unwrap_err();
        assert_eq!(renew.code(), tonic::Code::PermissionDenied, "{renew:?}");
    }
    // The current one still works after the refusals.
    agent_calls(&mut with_a2, &e_id).await.unwrap();
    cluster.shutdown().await;
}

/// Two frontend/backend pairs of workloads do mutual TLS (`spiffe-rustls`
/// over `X509Source`) without pause while their agent is SIGKILLed three
/// times and restarted on the same data directory. Every exchange succeeds
/// (the SVIDs the workloads hold keep working while the agent is away), and
/// after each restart each pair's client presents, within 40 s, an SVID it
/// received from the restarted agent (a serial not seen before the
/// restart): the sources reconnected and rotation went on. The agent is the
/// same one throughout (restored from disk, not attested again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_keeps_working_while_the_agent_is_sigkilled_and_restarted() {
    const PAIRS: usize = 2;
    const KILLS: usize = 3;
    /// From a restart to a new SVID in use: the 16 s SVIDs are renewed at
    /// half-life (at most 8 s after the restart), plus a source's reconnect
    /// backoff (the `spiffe` crate's cap is 10 s) and slack for a loaded
    /// machine.
    const NEW_SVID_WITHIN: Duration = Duration::from_secs(40);
    let mut rng = crate::durability::Rng::from_env(
        "mtls_keeps_working_while_the_agent_is_sigkilled_and_restarted",
    );
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agent, agent_id) =
        server_and_agent(dir.path(), "default_x509_svid_ttl = \"16s\"").await;
    register_pairs(&server, &agent, &agent_id, PAIRS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut pairs = Vec::new();
    for i in 0..PAIRS {
        pairs.push(Pair::start(&agent.uri(), i, stop.clone()).await);
    }
    for k in 0..KILLS {
        tokio::time::sleep(rng.millis(2000, 4000)).await;
        agent.kill9();
        tokio::time::sleep(rng.millis(200, 1500)).await;
        agent.start(None).await;
        let restarted = Instant::now();
        // Taken once the restarted agent serves: an SVID the old agent
        // pushed just before it died has been used by then (the clients
        // handshake every ~50 ms), so a serial first seen later came from
        // the restarted agent.
        let before: Vec<BTreeSet<Vec<u8>>> = pairs.iter().map(Pair::serials).collect();
        for (i, p) in pairs.iter().enumerate() {
            wait_until(
                NEW_SVID_WITHIN,
                &format!("pair {i} to use an SVID from the restarted agent"),
                || async { (!p.serials().is_subset(&before[i])).then_some(()) },
            )
            .await;
        }
        println!(
            "SIGKILL {}/{KILLS}: every pair uses an SVID from the restarted agent {:?} after the restart",
            k + 1,
            restarted.elapsed()
        );
        for (i, p) in pairs.iter().enumerate() {
            let (_, failed) = p.counts();
            assert_eq!(failed, 0, "pair {i} failed an exchange\n{}", agent.log());
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for (i, p) in pairs.into_iter().enumerate() {
        let (ok, failed, serials, errors) = p.finish().await;
        println!("pair {i}: {ok} exchanges, {failed} failures, {serials} client SVIDs");
        assert_eq!(failed, 0, "pair {i}: {errors:?}\n{}", agent.log());
        assert!(ok > 0, "pair {i} completed no exchange");
        assert!(
            serials > KILLS,
            "pair {i}: only {serials} client SVIDs seen"
        );
    }
    let agents = server.agents().await.expect("the server lists its agents");
    assert_eq!(agents.len(), 1, "the same agent, not a new one: {agents:?}");
    assert_eq!(agents[0].spiffe_id, agent_id);
}

/// Issues FetchX509SVID on the agent socket at `path` with a raw gRPC client
/// (security header set), returning the status of a refusal.
async fn raw_fetch_x509(path: std::path::PathBuf) -> Result<(), tonic::Status> {
    let channel = crate::unix_channel(path).await;
    let mut client = wl::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(wl::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(req).await?.into_inner();
    stream.message().await?;
    Ok(())
}

/// An agent started with a join token, a fresh data directory and its
/// server down: it does not exit, and a workload calling FetchX509SVID is
/// answered within [`PROMPT`] with `Unavailable` and a message saying the
/// agent has not attested (not a missing socket, a hang, or
/// PermissionDenied). Once the server is up the agent attests by itself,
/// and workloads that kept retrying (a plain loop and the `spiffe` crate's
/// `X509Source`) get their SVID within 30 s of the server being ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_server_or_cache_answers_unavailable_then_attests() {
    init();
    /// From the server being ready to the workload holding its SVID: the
    /// agent's longest wait between attempts (`ATTEST_RETRY_MAX`, 5 s), an
    /// attestation, a sync and a signing, with slack for a loaded machine.
    const SVID_WITHIN: Duration = Duration::from_secs(30);
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerBin::new(dir.path(), "");
    server.start().await;
    let (token, agent_id) = server.join_token().await;
    let mut admin = server.admin().await;
    create_entry_for_me(&mut admin, "spiffe://example.org/early", &agent_id).await;
    drop(admin);
    assert!(server.stop(), "the server stops cleanly:\n{}", server.log());

    let health = ReservedAddr::new().unwrap();
    let mut agent =
        AgentBin::new(dir.path(), &server.api.to_string(), health.addr()).holding(health);
    agent.start(Some(&token)).await;

    // Prompt and clear, for a raw client and for the `spiffe` crate's.
    let asked = Instant::now();
    let refused = tokio::time::timeout(PROMPT, raw_fetch_x509(agent.socket.clone()))
        .await
        .expect("the agent answers promptly")
        .unwrap_err();
    let took = asked.elapsed();
    println!("FetchX509SVID refused in {took:?}: {refused:?}");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(refused.message(), sigil_agent::pending::NOT_ATTESTED);
    let uri = agent.uri();
    let client = spiffe::WorkloadApiClient::connect_to(&uri).await.unwrap();
    let err = tokio::time::timeout(PROMPT, client.fetch_x509_svid())
        .await
        .expect("the agent answers promptly")
        .unwrap_err();
    assert!(err.to_string().contains("not attested"), "{err}");
    // Still refused the same way after the agent's retries have begun.
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.assert_running();
    let again = raw_fetch_x509(agent.socket.clone()).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unavailable, "{again:?}");
    assert!(
        agent.log().contains("cannot attest: no server reachable"),
        "the operator is told why:\n{}",
        agent.log()
    );

    // A workload that started meanwhile and retries by itself.
    let source = tokio::spawn({
        let uri = uri.clone();
        async move {
            spiffe::X509Source::builder()
                .endpoint(&uri)
                .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(2))
                .build()
                .await
        }
    });

    server.start().await;
    let up = Instant::now();
    let svid = wait_until(
        SVID_WITHIN,
        "the workload's SVID after the server came up",
        || fetch_svid(&uri),
    )
    .await;
    println!("SVID served {:?} after the server was ready", up.elapsed());
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/early");
    let source = tokio::time::timeout(SVID_WITHIN, source)
        .await
        .expect("the X509Source got its SVID")
        .unwrap()
        .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/early"
    );
    println!(
        "X509Source ready {:?} after the server was ready",
        up.elapsed()
    );
    // Attested with the token it was started with: the server knows it.
    let rec = wait_until(PROMPT, "the agent in the server's list", || async {
        server.agent(&agent_id).await
    })
    .await;
    assert!(!rec.banned);
    agent.assert_running();
}
