//! Leader election on a `coordination.k8s.io/v1` Lease, so that the
//! controllers of several server replicas (one per pod, all next to an
//! admin socket of the same shared database) run at once and only one acts.
//!
//! The shape is client-go's: every [`LeaderConfig::retry_period`] (2 s) each
//! candidate reads the Lease. A candidate takes it when it does not exist
//! (create), has no holder, or has not changed for
//! [`LeaderConfig::lease_duration`] (15 s) as measured by the candidate's
//! own monotonic clock since it last saw it change (so clock skew between
//! nodes does not matter); the leader renews it (its `renewTime`) at every
//! period. Every write is a replace carrying the resource version just
//! read, so of two candidates only one wins (the other gets a conflict). A
//! leader that has not renewed for [`LeaderConfig::renew_deadline`] (10 s,
//! below the lease duration) steps down: its work is dropped at once,
//! before anyone else may take over. On shutdown the leader releases the
//! Lease (empty holder), so the next one takes over within a period.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ControllerError;

/// How leader election runs.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// The Lease's namespace (the controller's own).
    pub namespace: String,
    /// The Lease's name.
    pub lease_name: String,
    /// This candidate's identity (its pod name and a random suffix).
    pub identity: String,
    /// How long a Lease that does not change stays the holder's.
    pub lease_duration: Duration,
    /// How long a leader goes on without a successful renewal before it steps down.
    pub renew_deadline: Duration,
    /// How often candidates try to take the Lease, and the leader renews it.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Lease `sigil-controller-<cluster>` in `namespace`, 15 s lease, 10 s
    /// renew deadline, 2 s period (client-go's defaults).
    pub fn new(namespace: &str, cluster_name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            lease_name: format!("sigil-controller-{}", cluster_name.to_ascii_lowercase()),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Checks that the period is below the renew deadline, which is below the
    /// lease duration (so a leader steps down before another may take over),
    /// and that the identity is not empty.
    pub fn validate(&self) -> Result<(), ControllerError> {
        if self.identity.is_empty() {
            return Err(ControllerError::Leader(
                "the leader election identity is empty".into(),
            ));
        }
        if !(self.retry_period < self.renew_deadline && self.renew_deadline < self.lease_duration)
            || self.lease_duration.as_secs_f64() < 1.0
        {
            return Err(ControllerError::Leader(format!(
                "leader election needs retry period ({:?}) < renew deadline ({:?}) < lease duration ({:?}, at least 1 s)",
                self.retry_period, self.renew_deadline, self.lease_duration
            )));
        }
        Ok(())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// A unique identity for this process: `base` (the pod's name) and 8 random hex digits.
pub fn identity(base: &str) -> String {
    let mut bytes = [0u8; 4];
    // An all-zero suffix on the (impossible) failure still leaves the pod name unique.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{base}_{suffix}")
}

/// The Lease as last seen: its holder, renew time and version, and when
/// this candidate saw it change.
struct Observed {
    record: (String, Option<String>, Option<String>),
    at: Instant,
}

fn record_of(lease: &Lease) -> (String, Option<String>, Option<String>) {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.holder_identity.clone())
            .unwrap_or_default(),
        spec.and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.to_string()),
        lease.metadata.resource_version.clone(),
    )
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// One attempt: create, take over or renew the Lease. Whether this
/// candidate holds it afterwards.
async fn try_acquire_or_renew(
    leases: &Api<Lease>,
    cfg: &LeaderConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let Some(lease) = leases.get_opt(&cfg.lease_name).await? else {
        let t = now();
        let new = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.lease_name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(cfg.lease_seconds()),
                acquire_time: Some(t.clone()),
                renew_time: Some(t),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match leases.create(&PostParams::default(), &new).await {
            Ok(stored) => {
                *observed = Some(Observed {
                    record: record_of(&stored),
                    at: Instant::now(),
                });
                Ok(true)
            }
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let record = record_of(&lease);
    if observed.as_ref().is_none_or(|o| o.record != record) {
        *observed = Some(Observed {
            record: record.clone(),
            at: Instant::now(),
        });
    }
    let seen_at = observed.as_ref().map_or_else(Instant::now, |o| o.at);
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mine = holder == cfg.identity;
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(cfg.lease_duration, Duration::from_secs);
    let free = holder.is_empty() || seen_at.elapsed() >= duration;
    if !mine && !free {
        return Ok(false);
    }
    let t = now();
    let mut new = lease;
    let mut spec = spec;
    if !mine {
        spec.acquire_time = Some(t.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.holder_identity = Some(cfg.identity.clone());
    spec.lease_duration_seconds = Some(cfg.lease_seconds());
    spec.renew_time = Some(t);
    new.spec = Some(spec);
    new.metadata.managed_fields = None;
    match leases
        .replace(&cfg.lease_name, &PostParams::default(), &new)
        .await
    {
        Ok(stored) => {
            *observed = Some(Observed {
                record: record_of(&stored),
                at: Instant::now(),
            });
            Ok(true)
        }
        Err(e) if conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (empty holder) if this candidate holds it.
async fn release(leases: &Api<Lease>, cfg: &LeaderConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = leases.get_opt(&cfg.lease_name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = Some(now());
    lease.metadata.managed_fields = None;
    leases
        .replace(&cfg.lease_name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

/// The candidate: tries and renews every period and says in `leading`
/// whether it leads, until `shutdown`, when it releases the Lease.
async fn run_elector(
    client: Client,
    cfg: LeaderConfig,
    leading: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let leases: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed = None;
    let mut renewed: Option<Instant> = None;
    loop {
        let attempt = tokio::time::timeout(
            cfg.retry_period,
            try_acquire_or_renew(&leases, &cfg, &mut observed),
        )
        .await;
        match attempt {
            Ok(Ok(true)) => {
                renewed = Some(Instant::now());
                if !*leading.borrow() {
                    tracing::info!(lease = %cfg.lease_name, identity = %cfg.identity, "leading: this controller acts");
                    leading.send_replace(true);
                }
            }
            other => {
                if let Ok(Err(e)) = &other {
                    tracing::warn!(lease = %cfg.lease_name, error = %e, "leader election request failed");
                }
                if *leading.borrow() && renewed.is_none_or(|t| t.elapsed() >= cfg.renew_deadline) {
                    tracing::warn!(lease = %cfg.lease_name, "could not renew the lease in time; stepping down");
                    leading.send_replace(false);
                    renewed = None;
                } else if !*leading.borrow() {
                    renewed = None;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(cfg.retry_period) => {}
        }
    }
    if *leading.borrow() {
        leading.send_replace(false);
        match tokio::time::timeout(cfg.retry_period, release(&leases, &cfg)).await {
            Ok(Ok(())) => tracing::info!(lease = %cfg.lease_name, "lease released"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %cfg.lease_name, error = %e, "cannot release the lease")
            }
            Err(_) => tracing::warn!(lease = %cfg.lease_name, "releasing the lease timed out"),
        }
    }
}

/// Runs `work` whenever this candidate leads, until `shutdown`: `work` gets
/// a token cancelled at shutdown, and is dropped (stopped at its next
/// await) as soon as leadership is lost; it starts afresh when it is won
/// again. An error of `work` ends the whole (the process exits, the lease
/// expires or is released).
pub async fn while_leading<F, Fut>(
    client: Client,
    cfg: LeaderConfig,
    shutdown: CancellationToken,
    mut work: F,
) -> Result<(), ControllerError>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), ControllerError>>,
{
    cfg.validate()?;
    let (tx, mut rx) = watch::channel(false);
    let stop_elector = shutdown.child_token();
    let retry = cfg.retry_period;
    let mut elector = Elector(Some(tokio::spawn(run_elector(
        client,
        cfg,
        tx,
        stop_elector.clone(),
    ))));
    let result = async {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                r = rx.wait_for(|l| *l) => if r.is_err() { return Ok(()) },
            }
            let term = shutdown.child_token();
            let job = work(term.clone());
            tokio::pin!(job);
            tokio::select! {
                r = &mut job => return r,
                _ = rx.wait_for(|l| !*l) => {
                    term.cancel();
                    tracing::warn!("leadership lost; stopped reconciling");
                }
            }
        }
    }
    .await;
    stop_elector.cancel();
    // Give the elector the time to release the lease.
    if let Some(mut handle) = elector.0.take()
        && tokio::time::timeout(retry * 2, &mut handle).await.is_err()
    {
        handle.abort();
        tracing::warn!("the leader elector did not stop in time");
    }
    result
}

/// The elector task, aborted when [`while_leading`] is dropped (a killed
/// controller stops renewing at once).
struct Elector(Option<tokio::task::JoinHandle<()>>);

impl Drop for Elector {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}
