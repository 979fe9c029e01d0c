//! The policy in force, and its reloading: the file is re-read every second
//! and on SIGHUP; a new version replaces the policy only when it is valid,
//! otherwise the last good policy stays in force and the error is logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyError};

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The policy in force, shared by every listener; cheap to read on each connection.
#[derive(Debug)]
pub struct PolicyStore {
    path: Option<PathBuf>,
    current: ArcSwap<Policy>,
    /// The text last tried (good or bad), so a bad file is reported once, not every second.
    last_text: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The file did not change since the last attempt.
    Unchanged,
    /// A new, valid policy is in force.
    Replaced,
}

impl PolicyStore {
    /// Loads the file; fails if the first version is not valid.
    pub fn load(path: &Path, metrics: Arc<Metrics>) -> Result<Self, PolicyError> {
        let text = read(path)?;
        let policy = Policy::parse(&text, &path.display().to_string())?;
        metrics.set_policy_rules(policy.rules().len());
        Ok(Self {
            path: Some(path.to_owned()),
            current: ArcSwap::from_pointee(policy),
            last_text: Mutex::new(Some(text)),
            metrics,
        })
    }

    /// A store holding `policy` for good (no file behind it).
    pub fn fixed(policy: Policy, metrics: Arc<Metrics>) -> Self {
        metrics.set_policy_rules(policy.rules().len());
        Self {
            path: None,
            current: ArcSwap::from_pointee(policy),
            last_text: Mutex::new(None),
            metrics,
        }
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// The file behind the policy, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the file. With `force`, a file whose text did not change is
    /// parsed again as well (SIGHUP). On error the policy in force stays.
    pub fn reload(&self, force: bool) -> Result<Reload, PolicyError> {
        let Some(path) = &self.path else {
            return Ok(Reload::Unchanged);
        };
        let text = match read(path) {
            Ok(t) => t,
            Err(e) => {
                let mut last = self.lock_last();
                // A missing file is reported once per disappearance.
                if force || last.is_some() {
                    *last = None;
                    drop(last);
                    self.metrics.policy_reload(false);
                    return Err(e);
                }
                return Ok(Reload::Unchanged);
            }
        };
        {
            let mut last = self.lock_last();
            if !force && last.as_deref() == Some(text.as_str()) {
                return Ok(Reload::Unchanged);
            }
            *last = Some(text.clone());
        }
        match Policy::parse(&text, &path.display().to_string()) {
            Ok(policy) => {
                self.metrics.policy_reload(true);
                self.metrics.set_policy_rules(policy.rules().len());
                self.current.store(Arc::new(policy));
                Ok(Reload::Replaced)
            }
            Err(e) => {
                self.metrics.policy_reload(false);
                Err(e)
            }
        }
    }

    fn lock_last(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // The guarded value is a plain cache; a panic elsewhere cannot leave it half-written.
        self.last_text
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Watches the file (every [`POLL_INTERVAL`] and on SIGHUP) until `cancel`.
    pub fn watch(self: Arc<Self>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if self.path.is_none() {
                return;
            }
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let force = tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
                };
                self.reload_and_log(force);
            }
        })
    }

    /// [`reload`](Self::reload), logging the outcome.
    pub fn reload_and_log(&self, force: bool) {
        match self.reload(force) {
            Ok(Reload::Replaced) => {
                let p = self.current();
                tracing::info!(
                    policy = p.origin(),
                    rules = p.rules().len(),
                    "policy reloaded"
                );
            }
            Ok(Reload::Unchanged) => {
                if force {
                    tracing::info!("policy reload requested: the file is unchanged");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "policy file rejected; the last good policy stays in force");
            }
        }
    }
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.display().to_string(),
        source,
    })
}
