//! Leader election: of two controllers against one fake API server exactly
//! one acts; when it is killed the other takes over within the lease
//! duration; a leader that cannot renew steps down and stops its work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use sigil_k8s_controller::leader::{LeaderConfig, while_leading};
use sigil_k8s_controller::publish::PublishConfig;
use sigil_k8s_controller::{ControllerConfig, kube_client, run};
use sigil_testkit::{Cluster, ClusterOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fake_kube::FakeKube;

const T: Duration = Duration::from_secs(30);

fn leader(identity: &str) -> LeaderConfig {
    let mut l = LeaderConfig::new("sigil", "demo", identity);
    l.lease_duration = Duration::from_secs(3);
    l.renew_deadline = Duration::from_secs(2);
    l.retry_period = Duration::from_millis(300);
    l
}

async fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn holder(fake: &FakeKube) -> Option<String> {
    fake.get("leases", "sigil", "sigil-controller-demo")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

/// The requests of one controller (by its token) other than leader election.
fn work_requests(fake: &FakeKube, token: &str) -> Vec<String> {
    fake.requests_by(token)
        .into_iter()
        .filter(|(_, path)| !path.contains("/leases"))
        .map(|(m, p)| format!("{m} {p}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_controllers_acts_and_the_other_takes_over_when_it_dies() {
    let fake = FakeKube::start().await;
    fake.put("namespaces", json!({"metadata": {"name": "sigil"}}));
    let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let config = |identity: &str| {
        let mut c = ControllerConfig::new(cluster.admin_socket(), "demo");
        c.manage_federation = false;
        c.debounce = Duration::from_millis(50);
        c.resync = Duration::from_secs(1);
        c.retry = Duration::from_millis(200);
        let mut p = PublishConfig::default();
        p.namespaces.insert("sigil".into());
        p.poll = Duration::from_millis(100);
        c.publish = Some(p);
        c.leader = Some(leader(identity));
        c
    };
    let client_a = kube_client(Some(&fake.kubeconfig_for(cluster.dir.path(), "a")))
        .await
        .unwrap();
    let client_b = kube_client(Some(&fake.kubeconfig_for(cluster.dir.path(), "b")))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let a = tokio::spawn(run(client_a, config("a"), shutdown.clone()));
    wait_for("a to lead and publish", T, || {
        holder(&fake).as_deref() == Some("a")
            && fake.get("configmaps", "sigil", "sigil-bundle").is_some()
    })
    .await;
    let b = tokio::spawn(run(client_b, config("b"), shutdown.clone()));
    // b has looked at the lease several times: it is running, and waits.
    wait_for("b to watch the lease", T, || {
        fake.requests_by("b")
            .iter()
            .filter(|(m, _)| m == "GET")
            .count()
            >= 4
    })
    .await;
    assert_eq!(holder(&fake).as_deref(), Some("a"));
    assert!(
        work_requests(&fake, "b").is_empty(),
        "the follower made requests: {:?}",
        work_requests(&fake, "b")
    );
    assert!(
        work_requests(&fake, "a")
            .iter()
            .any(|r| r.contains("/pods")),
        "the leader reconciles"
    );

    // The leader dies without releasing the lease.
    a.abort();
    let _ = a.await;
    let killed = Instant::now();
    let bound = leader("b").lease_duration + 3 * leader("b").retry_period + Duration::from_secs(1);
    wait_for("b to take over within the lease duration", bound, || {
        holder(&fake).as_deref() == Some("b")
    })
    .await;
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "b took over before a's lease could have expired ({:?})",
        killed.elapsed()
    );
    wait_for("b to reconcile and publish", T, || {
        let r = work_requests(&fake, "b");
        r.iter().any(|r| r.contains("/pods")) && r.iter().any(|r| r.contains("/configmaps"))
    })
    .await;
    let lease = fake
        .get("leases", "sigil", "sigil-controller-demo")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    shutdown.cancel();
    tokio::time::timeout(T, b).await.unwrap().unwrap().unwrap();
    // A graceful stop releases the lease.
    assert_eq!(holder(&fake), None);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_steps_down_and_stops_its_work() {
    let fake = FakeKube::start().await;
    fake.put("namespaces", json!({"metadata": {"name": "sigil"}}));
    let dir = tempfile::tempdir().unwrap();
    let client = kube_client(Some(&fake.kubeconfig_for(dir.path(), "a")))
        .await
        .unwrap();
    let cfg = leader("a");
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    struct OnDrop(Arc<AtomicBool>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let shutdown = CancellationToken::new();
    let task = {
        let (started, dropped) = (started.clone(), dropped.clone());
        tokio::spawn(while_leading(
            client,
            cfg.clone(),
            shutdown.clone(),
            move |_term| {
                let guard = OnDrop(dropped.clone());
                started.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _guard = guard;
                    std::future::pending::<()>().await;
                    Ok(())
                }
            },
        ))
    };
    wait_for("the work to start", T, || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(!dropped.load(Ordering::SeqCst));

    // The API server fails every lease request from now on.
    fake.fail_next("leases", usize::MAX);
    let failing = Instant::now();
    wait_for(
        "the work to stop",
        cfg.renew_deadline + 3 * cfg.retry_period,
        || dropped.load(Ordering::SeqCst),
    )
    .await;
    assert!(
        failing.elapsed() + cfg.retry_period >= cfg.renew_deadline,
        "stepped down before the renew deadline ({:?})",
        failing.elapsed()
    );
    assert!(
        failing.elapsed() < cfg.lease_duration,
        "stepped down after another could take over ({:?})",
        failing.elapsed()
    );
    // The API comes back: leadership and the work come back too.
    fake.fail_next("leases", 0);
    wait_for("the work to start again", T, || {
        started.load(Ordering::SeqCst) == 2
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[test]
fn durations_must_nest() {
    let mut l = LeaderConfig::new("sigil", "demo", "a");
    l.validate().unwrap();
    l.renew_deadline = l.lease_duration;
    assert!(l.validate().is_err());
    let mut l = LeaderConfig::new("sigil", "demo", "a");
    l.retry_period = l.renew_deadline;
    assert!(l.validate().is_err());
    let l = LeaderConfig::new("sigil", "demo", "");
    assert!(l.validate().is_err());
    let id = sigil_k8s_controller::leader::identity("sigil-server-0");
    assert!(id.starts_with("sigil-server-0_") && id.len() == "sigil-server-0_".len() + 8);
}
