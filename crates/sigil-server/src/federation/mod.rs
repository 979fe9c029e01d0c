//! Federation with other trust domains (spiffe.md §4.3, docs/federation.md).
//!
//! | module | role |
//! |---|---|
//! | [`config`] | `[server.federation]` |
//! | [`endpoint`] | the bundle endpoint this server serves |
//! | [`fetch`] | the client of other trust domains' bundle endpoints |
//!
//! [`Federation`] keeps one poller task per relationship (from the config
//! file, or from the store through the admin API). A poller fetches the
//! foreign bundle, stores it when it changed (never an older
//! `spiffe_sequence`), and waits the bundle's refresh hint. Federated bundles
//! live in the store, so they survive restarts and every server of a shared
//! store sees them; the change feed brings each change to
//! [`Federation::reload_bundle`], which publishes the set that sync streams
//! push to agents.

pub mod config;
pub mod endpoint;
pub mod fetch;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sigil_store::{Store, StoreError};
use sigil_svid::bundle::Bundle;
use sigil_types::config::ConfigError;
use sigil_types::{BundleEndpointProfile, FederationRelationship, TrustDomain};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::FederationConfig;
pub use fetch::FetchError;

use crate::ServerError;
use crate::ca::{CaManager, unix};
use fetch::EndpointAuth;

/// The refresh hint assumed when a bundle publishes none (spiffe.md §4.3).
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);
/// The longest wait between two fetches, whatever the hint says.
pub const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(3600);

/// Every federated bundle the server holds: trust domain → SPIFFE bundle JSON.
pub type FederatedBundles = BTreeMap<TrustDomain, String>;

/// What the admin API asks of federation, and why it was refused. The gRPC
/// code of each is chosen in [`crate::error`], with every other refusal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// The relationship breaks a rule of [`FederationRelationship::validate`].
    #[error(transparent)]
    Invalid(#[from] sigil_types::federation::FederationError),
    /// The bundle given with a relationship is not a SPIFFE bundle of its
    /// trust domain.
    #[error("the bundle of {trust_domain} is not a valid SPIFFE bundle: {source}")]
    RelationshipBundle {
        /// The foreign trust domain.
        trust_domain: TrustDomain,
        /// Why it was refused.
        #[source]
        source: sigil_svid::SvidError,
    },
    /// A bundle set through the admin API is not a SPIFFE bundle of its
    /// trust domain.
    #[error("not a valid SPIFFE bundle of {trust_domain}: {source}")]
    NotABundle {
        /// The foreign trust domain.
        trust_domain: TrustDomain,
        /// Why it was refused.
        #[source]
        source: sigil_svid::SvidError,
    },
    /// A bundle was given or asked for under the server's own trust domain.
    #[error(
        "{0} is this server's own trust domain; its bundle comes from its CA (sigil bundle show)"
    )]
    OwnTrustDomain(TrustDomain),
    /// Storing the bundle would exceed what agents read (see [`no_room`]).
    #[error("{0}")]
    NoRoom(String),
    /// No relationship with this trust domain.
    #[error("no federation relationship with {0}")]
    NoRelationship(TrustDomain),
    /// No bundle of this trust domain is held.
    #[error("no bundle of {0} is held")]
    NoBundle(TrustDomain),
    /// A relationship with that trust domain comes from the config file.
    #[error("a relationship with {0} is defined in the server's config file")]
    ExistsInConfig(TrustDomain),
    /// A relationship with that trust domain exists already.
    #[error("a relationship with {0} exists already; change it with update")]
    Exists(TrustDomain),
    /// The relationship comes from the config file, which is where it is
    /// changed (`what`: change or remove).
    #[error(
        "the relationship with {trust_domain} is defined in the server's config file \
         ([server.federation.federates_with.\"{trust_domain}\"]); {what} it there and restart the server"
    )]
    Configured {
        /// The foreign trust domain.
        trust_domain: TrustDomain,
        /// What the caller asked to do.
        what: &'static str,
    },
    /// The relationship changed or went away while a refresh waited.
    #[error("the relationship with {0} changed or was removed during the refresh")]
    ChangedDuringRefresh(TrustDomain),
    /// A refresh asked for through the admin API failed.
    #[error("{source}")]
    Refresh {
        /// The foreign trust domain.
        trust_domain: TrustDomain,
        /// Why.
        #[source]
        source: FetchError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl FederationError {
    /// Whether the caller must act before asking again (a refresh that
    /// cannot authenticate or that would go back in sequence, a
    /// relationship owned by the config file, one changed meanwhile).
    pub(crate) fn needs_operator(&self) -> bool {
        matches!(
            self,
            FederationError::Configured { .. }
                | FederationError::ChangedDuringRefresh(_)
                | FederationError::Refresh {
                    source: FetchError::NoEndpointBundle { .. }
                        | FetchError::NoWebRoots
                        | FetchError::StaleSequence { .. },
                    ..
                }
        )
    }
}

impl From<FederationError> for tonic::Status {
    fn from(e: FederationError) -> Self {
        ServerError::Federation(e).into()
    }
}

/// The state of one relationship's polling, kept in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshStatus {
    /// Unix time of the last fetch that succeeded.
    pub last_refresh: Option<i64>,
    /// Unix time of the next fetch.
    pub next_refresh: Option<i64>,
    /// Why the last fetch failed; `None` after a success.
    pub last_error: Option<String>,
}

type RefreshReply = oneshot::Sender<Result<(), FetchError>>;

/// A running poller.
struct Poller {
    relationship: FederationRelationship,
    status: Arc<Mutex<RefreshStatus>>,
    requests: mpsc::Sender<RefreshReply>,
    cancel: CancellationToken,
}

/// A relationship from the config file with what was read for it at start.
struct Configured {
    relationship: FederationRelationship,
    extra_roots: Arc<Vec<CertificateDer<'static>>>,
}

/// The most bytes the federated bundles may hold in all, as stored JSON
/// (8 MiB). The first page of every sync update carries every federated
/// bundle to every agent; with the server's own bundle and the tainted
/// authorities that page must stay far within what an agent decodes (16
/// MiB), or no agent could sync. Checked whenever a bundle is stored
/// (`sigil bundle set`, a relationship created or updated with a bundle, a
/// fetch, a bootstrap `bundle_file`), and again when the set is sent
/// ([`within_budget`]), since two HA servers can each accept a bundle the
/// other has not seen yet.
pub const MAX_FEDERATED_BYTES: usize = 8 * 1024 * 1024;

/// Why holding `len` bytes as the bundle of `td` would not fit beside the
/// others `held` (the server's own is not counted): the bundle alone is
/// over [`fetch::MAX_BUNDLE_BYTES`], or all together over
/// [`MAX_FEDERATED_BYTES`].
fn no_room<'a>(
    held: impl IntoIterator<Item = (&'a TrustDomain, usize)>,
    td: &TrustDomain,
    len: usize,
) -> Option<String> {
    if len > fetch::MAX_BUNDLE_BYTES {
        return Some(format!(
            "the bundle of {td} is {len} bytes; a bundle may hold at most {} bytes",
            fetch::MAX_BUNDLE_BYTES
        ));
    }
    let others: usize = held
        .into_iter()
        .filter(|(t, _)| *t != td)
        .map(|(_, n)| n)
        .sum();
    let total = others.saturating_add(len);
    (total > MAX_FEDERATED_BYTES).then(|| {
        format!(
            "with the bundle of {td} ({len} bytes) the federated bundles would hold {total} bytes; \
             at most {MAX_FEDERATED_BYTES} in all, since every agent receives all of them in one \
             message (delete bundles no longer needed with `sigil bundle delete`)"
        )
    })
}

/// The federated bundles that go to agents: all of them, in trust-domain
/// order, as long as they fit [`MAX_FEDERATED_BYTES`] together; any beyond
/// are left out (and logged where the set changes), so that no set the
/// servers hold can make a sync message too large for an agent.
pub fn within_budget(set: &FederatedBundles) -> impl Iterator<Item = (&TrustDomain, &String)> {
    let mut total = 0usize;
    set.iter().filter(move |(_, json)| {
        let next = total.saturating_add(json.len());
        let fits = next <= MAX_FEDERATED_BYTES;
        if fits {
            total = next;
        }
        fits
    })
}

/// What pollers share with the manager.
struct Shared {
    own: TrustDomain,
    store: Arc<dyn Store>,
    ca: Arc<CaManager>,
    min_refresh: Duration,
}

/// Federation relationships, their pollers, and the federated bundle set.
pub struct Federation {
    shared: Arc<Shared>,
    configured: BTreeMap<TrustDomain, Configured>,
    pollers: Mutex<BTreeMap<TrustDomain, Poller>>,
    bundles: watch::Sender<Arc<FederatedBundles>>,
    /// Serializes the admin API's read-check-write of relationships.
    writes: tokio::sync::Mutex<()>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("trust_domain", &self.shared.own)
            .field("configured", &self.configured.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn config_error(key: &'static str, td: &TrustDomain, message: String) -> ServerError {
    ServerError::Config(ConfigError::Invalid {
        path: None,
        key,
        message: format!("{message} (in [server.federation.federates_with.\"{td}\"])"),
    })
}

/// Parses a foreign bundle strictly (spiffe.md §4.1).
fn parse_bundle(td: &TrustDomain, json: &str) -> Result<Bundle, sigil_svid::SvidError> {
    Bundle::from_json(td.clone(), json)
}

impl Federation {
    /// Reads the files of the configured relationships (a bad one stops the
    /// start, naming the key), stores their bootstrap bundles where none is
    /// held, and loads the federated bundles. Pollers start with [`Self::start`].
    pub async fn new(
        own: TrustDomain,
        store: Arc<dyn Store>,
        ca: Arc<CaManager>,
        config: &FederationConfig,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Self>, ServerError> {
        let mut configured = BTreeMap::new();
        for (td, c) in &config.federates_with {
            let mut extra_roots = Vec::new();
            if let Some(path) = &c.ca_file {
                const KEY: &str = "server.federation.federates_with.ca_file";
                let pem = std::fs::read(path).map_err(|e| {
                    config_error(KEY, td, format!("cannot read {}: {e}", path.display()))
                })?;
                extra_roots = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        config_error(KEY, td, format!("{}: not PEM: {e}", path.display()))
                    })?;
                if extra_roots.is_empty() {
                    return Err(config_error(
                        KEY,
                        td,
                        format!("{} holds no CERTIFICATE block", path.display()),
                    ));
                }
            }
            if let Some(path) = &c.bundle_file {
                const KEY: &str = "server.federation.federates_with.bundle_file";
                let json = std::fs::read_to_string(path).map_err(|e| {
                    config_error(KEY, td, format!("cannot read {}: {e}", path.display()))
                })?;
                let bundle = parse_bundle(td, &json).map_err(|e| {
                    config_error(
                        KEY,
                        td,
                        format!("{} is not a SPIFFE bundle: {e}", path.display()),
                    )
                })?;
                if store.get_bundle(td).await?.is_none() {
                    let json = bundle.to_json();
                    let held = store.list_bundles().await?;
                    let held = held
                        .iter()
                        .filter(|(t, _)| *t != own)
                        .map(|(t, j)| (t, j.len()));
                    if let Some(why) = no_room(held, td, json.len()) {
                        return Err(config_error(KEY, td, why));
                    }
                    store.put_bundle(td, &json).await?;
                    tracing::info!(trust_domain = %td, file = %path.display(), "bootstrap bundle stored");
                }
            }
            configured.insert(
                td.clone(),
                Configured {
                    relationship: c.relationship.clone(),
                    extra_roots: Arc::new(extra_roots),
                },
            );
        }
        let held: FederatedBundles = store
            .list_bundles()
            .await?
            .into_iter()
            .filter(|(td, _)| *td != own)
            .collect();
        let (bundles, _) = watch::channel(Arc::new(held));
        Ok(Arc::new(Self {
            shared: Arc::new(Shared {
                own,
                store,
                ca,
                min_refresh: config.min_refresh_interval,
            }),
            configured,
            pollers: Mutex::new(BTreeMap::new()),
            bundles,
            writes: tokio::sync::Mutex::new(()),
            cancel,
            tracker,
        }))
    }

    /// Starts a poller for every relationship, from the config and the store.
    pub async fn start(&self) -> Result<(), ServerError> {
        let mut tds: Vec<TrustDomain> = self.configured.keys().cloned().collect();
        for r in self.shared.store.list_federation_relationships().await? {
            if self.configured.contains_key(&r.trust_domain) {
                tracing::warn!(
                    trust_domain = %r.trust_domain,
                    "a relationship created through the admin API is shadowed by the config file's"
                );
            } else {
                tds.push(r.trust_domain);
            }
        }
        for td in tds {
            self.reconcile(&td).await;
        }
        Ok(())
    }

    /// The federated bundles, updated on every change.
    pub fn subscribe_bundles(&self) -> watch::Receiver<Arc<FederatedBundles>> {
        self.bundles.subscribe()
    }

    /// The federated bundles now.
    pub fn bundles(&self) -> Arc<FederatedBundles> {
        self.bundles.borrow().clone()
    }

    /// Re-reads one trust domain's bundle from the store into the federated
    /// set (the change feed calls this); the server's own is not federated.
    pub async fn reload_bundle(&self, td: &TrustDomain) {
        if *td == self.shared.own {
            return;
        }
        let json = match self.shared.store.get_bundle(td).await {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(trust_domain = %td, error = %e, "reading a federated bundle failed");
                return;
            }
        };
        self.bundles.send_if_modified(|set| {
            if set.get(td) == json.as_ref() {
                return false;
            }
            let mut next = FederatedBundles::clone(set);
            match json {
                Some(j) => next.insert(td.clone(), j),
                None => next.remove(td),
            };
            let sent = within_budget(&next).count();
            if sent < next.len() {
                tracing::error!(
                    held = next.len(),
                    sent,
                    max_bytes = MAX_FEDERATED_BYTES,
                    "the federated bundles exceed what agents are sent; the last in trust-domain order are left out until bundles are deleted"
                );
            }
            *set = Arc::new(next);
            true
        });
    }

    /// Brings the poller of `td` in line with its relationship (config
    /// first, then store): starts, restarts or stops it.
    pub async fn reconcile(&self, td: &TrustDomain) {
        let desired = match self.configured.get(td) {
            Some(c) => Some((c.relationship.clone(), c.extra_roots.clone())),
            None => match self.shared.store.get_federation_relationship(td).await {
                Ok(r) => r.map(|r| (r, Arc::new(Vec::new()))),
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "reading a federation relationship failed");
                    return;
                }
            },
        };
        let mut pollers = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        match desired {
            None => {
                if let Some(old) = pollers.remove(td) {
                    old.cancel.cancel();
                    tracing::info!(trust_domain = %td, "federation relationship removed; polling stopped");
                }
            }
            Some((r, _)) if pollers.get(td).is_some_and(|p| p.relationship == r) => {}
            Some((r, extra_roots)) => {
                if let Some(old) = pollers.remove(td) {
                    old.cancel.cancel();
                }
                tracing::info!(
                    trust_domain = %td,
                    url = %r.bundle_endpoint_url,
                    profile = %r.profile,
                    "polling the bundle endpoint"
                );
                let poller = self.spawn_poller(r, extra_roots);
                pollers.insert(td.clone(), poller);
            }
        }
    }

    fn spawn_poller(
        &self,
        relationship: FederationRelationship,
        extra_roots: Arc<Vec<CertificateDer<'static>>>,
    ) -> Poller {
        let status = Arc::new(Mutex::new(RefreshStatus::default()));
        let (requests, rx) = mpsc::channel(8);
        let cancel = self.cancel.child_token();
        self.tracker.spawn(poll(
            self.shared.clone(),
            relationship.clone(),
            extra_roots,
            status.clone(),
            rx,
            cancel.clone(),
        ));
        Poller {
            relationship,
            status,
            requests,
            cancel,
        }
    }

    fn status_of(&self, td: &TrustDomain) -> RefreshStatus {
        let status = self
            .pollers
            .lock()
            .ok()
            .and_then(|p| p.get(td).map(|p| p.status.clone()));
        status
            .and_then(|s| s.lock().ok().map(|s| s.clone()))
            .unwrap_or_default()
    }

    /// Every relationship (the config file's shadow the store's of the same
    /// trust domain) with its refresh status, ordered by trust domain.
    pub async fn list_relationships(
        &self,
    ) -> Result<Vec<(FederationRelationship, RefreshStatus)>, FederationError> {
        let mut all: BTreeMap<TrustDomain, FederationRelationship> = self
            .shared
            .store
            .list_federation_relationships()
            .await?
            .into_iter()
            .map(|r| (r.trust_domain.clone(), r))
            .collect();
        for (td, c) in &self.configured {
            all.insert(td.clone(), c.relationship.clone());
        }
        Ok(all
            .into_values()
            .map(|r| {
                let s = self.status_of(&r.trust_domain);
                (r, s)
            })
            .collect())
    }

    /// One relationship with its refresh status.
    pub async fn get_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<(FederationRelationship, RefreshStatus), FederationError> {
        let r = match self.configured.get(td) {
            Some(c) => c.relationship.clone(),
            None => self
                .shared
                .store
                .get_federation_relationship(td)
                .await?
                .ok_or_else(|| no_relationship(td))?,
        };
        Ok((r, self.status_of(td)))
    }

    fn check_new(
        &self,
        r: &mut FederationRelationship,
        bundle_json: Option<&str>,
    ) -> Result<Option<Bundle>, FederationError> {
        r.from_config = false;
        r.validate(&self.shared.own)?;
        bundle_json
            .filter(|j| !j.trim().is_empty())
            .map(|j| {
                parse_bundle(&r.trust_domain, j).map_err(|source| {
                    FederationError::RelationshipBundle {
                        trust_domain: r.trust_domain.clone(),
                        source,
                    }
                })
            })
            .transpose()
    }

    fn refuse_configured(
        &self,
        td: &TrustDomain,
        what: &'static str,
    ) -> Result<(), FederationError> {
        if self.configured.contains_key(td) {
            return Err(FederationError::Configured {
                trust_domain: td.clone(),
                what,
            });
        }
        Ok(())
    }

    /// Creates a relationship; `bundle_json` (optional) is stored as the
    /// trust domain's bundle first, e.g. the bootstrap bundle of `https_spiffe`.
    pub async fn create_relationship(
        &self,
        mut r: FederationRelationship,
        bundle_json: Option<&str>,
    ) -> Result<FederationRelationship, FederationError> {
        let bundle = self.check_new(&mut r, bundle_json)?;
        let td = r.trust_domain.clone();
        {
            let _w = self.writes.lock().await;
            if self.configured.contains_key(&td) {
                return Err(FederationError::ExistsInConfig(td));
            }
            if self
                .shared
                .store
                .get_federation_relationship(&td)
                .await?
                .is_some()
            {
                return Err(FederationError::Exists(td));
            }
            if let Some(b) = bundle {
                let json = b.to_json();
                if let Some(why) = self.shared.no_room(&td, json.len()).await? {
                    return Err(FederationError::NoRoom(why));
                }
                self.shared.store.put_bundle(&td, &json).await?;
            }
            self.shared
                .store
                .put_federation_relationship(r.clone())
                .await?;
        }
        self.reconcile(&td).await;
        Ok(r)
    }

    /// Replaces a relationship created through the admin API.
    pub async fn update_relationship(
        &self,
        mut r: FederationRelationship,
        bundle_json: Option<&str>,
    ) -> Result<FederationRelationship, FederationError> {
        self.refuse_configured(&r.trust_domain, "change")?;
        let bundle = self.check_new(&mut r, bundle_json)?;
        let td = r.trust_domain.clone();
        {
            let _w = self.writes.lock().await;
            if self
                .shared
                .store
                .get_federation_relationship(&td)
                .await?
                .is_none()
            {
                return Err(no_relationship(&td));
            }
            if let Some(b) = bundle {
                let json = b.to_json();
                if let Some(why) = self.shared.no_room(&td, json.len()).await? {
                    return Err(FederationError::NoRoom(why));
                }
                self.shared.store.put_bundle(&td, &json).await?;
            }
            self.shared
                .store
                .put_federation_relationship(r.clone())
                .await?;
        }
        self.reconcile(&td).await;
        Ok(r)
    }

    /// Deletes a relationship created through the admin API; the trust
    /// domain's bundle stays (delete it with [`Self::delete_bundle`]).
    pub async fn delete_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<FederationRelationship, FederationError> {
        self.refuse_configured(td, "remove")?;
        let r = {
            let _w = self.writes.lock().await;
            match self.shared.store.delete_federation_relationship(td).await {
                Ok(r) => r,
                Err(StoreError::NotFound(_)) => return Err(no_relationship(td)),
                Err(e) => return Err(e.into()),
            }
        };
        self.reconcile(td).await;
        Ok(r)
    }

    /// Fetches the bundle of `td` now; returns the bundle held afterwards.
    pub async fn refresh(&self, td: &TrustDomain) -> Result<String, FederationError> {
        let requests = self
            .pollers
            .lock()
            .ok()
            .and_then(|p| p.get(td).map(|p| p.requests.clone()))
            .ok_or_else(|| no_relationship(td))?;
        let (tx, rx) = oneshot::channel();
        let gone = || FederationError::ChangedDuringRefresh(td.clone());
        requests.send(tx).await.map_err(|_| gone())?;
        rx.await
            .map_err(|_| gone())?
            .map_err(|source| FederationError::Refresh {
                trust_domain: td.clone(),
                source,
            })?;
        self.get_bundle(td).await
    }

    fn check_foreign(&self, td: &TrustDomain) -> Result<(), FederationError> {
        if *td == self.shared.own {
            return Err(FederationError::OwnTrustDomain(td.clone()));
        }
        Ok(())
    }

    /// Every federated bundle held, ordered by trust domain.
    pub async fn list_bundles(&self) -> Result<Vec<(TrustDomain, String)>, FederationError> {
        let own = &self.shared.own;
        Ok(self
            .shared
            .store
            .list_bundles()
            .await?
            .into_iter()
            .filter(|(td, _)| td != own)
            .collect())
    }

    /// The federated bundle of `td`.
    pub async fn get_bundle(&self, td: &TrustDomain) -> Result<String, FederationError> {
        self.check_foreign(td)?;
        self.shared
            .store
            .get_bundle(td)
            .await?
            .ok_or_else(|| FederationError::NoBundle(td.clone()))
    }

    /// Stores `json` as the bundle of `td` after checking it strictly;
    /// returns the stored form.
    pub async fn set_bundle(
        &self,
        td: &TrustDomain,
        json: &str,
    ) -> Result<String, FederationError> {
        self.check_foreign(td)?;
        let bundle = parse_bundle(td, json).map_err(|source| FederationError::NotABundle {
            trust_domain: td.clone(),
            source,
        })?;
        let stored = bundle.to_json();
        let _w = self.writes.lock().await;
        if let Some(why) = self.shared.no_room(td, stored.len()).await? {
            return Err(FederationError::NoRoom(why));
        }
        self.shared.store.put_bundle(td, &stored).await?;
        Ok(stored)
    }

    /// Deletes the bundle of `td`; returns what was held.
    pub async fn delete_bundle(&self, td: &TrustDomain) -> Result<String, FederationError> {
        let held = self.get_bundle(td).await?;
        match self.shared.store.delete_bundle(td).await {
            Ok(()) => Ok(held),
            Err(StoreError::NotFound(_)) => Err(FederationError::NoBundle(td.clone())),
            Err(e) => Err(e.into()),
        }
    }
}

fn no_relationship(td: &TrustDomain) -> FederationError {
    FederationError::NoRelationship(td.clone())
}

/// The wait after a successful fetch: the bundle's hint (5 minutes when it
/// has none), at least `min`, at most [`MAX_REFRESH_INTERVAL`].
fn interval(min: Duration, hint: Option<u64>) -> Duration {
    hint.map(Duration::from_secs)
        .unwrap_or(DEFAULT_REFRESH_HINT)
        .min(MAX_REFRESH_INTERVAL)
        .max(min)
}

/// The wait after `failures` failed fetches in a row: doubling from `min`,
/// never longer than the normal interval.
fn backoff(min: Duration, failures: u32, hint: Option<u64>) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    min.saturating_mul(factor).min(interval(min, hint))
}

impl Shared {
    /// Why `len` bytes as the bundle of `td` would not fit beside the
    /// federated bundles stored now, if they would not.
    async fn no_room(&self, td: &TrustDomain, len: usize) -> Result<Option<String>, StoreError> {
        let held = self.store.list_bundles().await?;
        Ok(no_room(
            held.iter()
                .filter(|(t, _)| *t != self.own)
                .map(|(t, j)| (t, j.len())),
            td,
            len,
        ))
    }

    fn interval(&self, hint: Option<u64>) -> Duration {
        interval(self.min_refresh, hint)
    }

    fn backoff(&self, failures: u32, hint: Option<u64>) -> Duration {
        backoff(self.min_refresh, failures, hint)
    }

    /// The held bundle of `td`, if any parses.
    async fn held(&self, td: &TrustDomain) -> Result<Option<Bundle>, FetchError> {
        let json = self
            .store
            .get_bundle(td)
            .await
            .map_err(|e| FetchError::Store(e.to_string()))?;
        Ok(json.and_then(|j| parse_bundle(td, &j).ok()))
    }

    /// How the endpoint of `r` must authenticate itself, from what is held now.
    async fn endpoint_auth(
        &self,
        r: &FederationRelationship,
        extra_roots: &Arc<Vec<CertificateDer<'static>>>,
    ) -> Result<EndpointAuth, FetchError> {
        match &r.profile {
            BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                let etd = endpoint_spiffe_id.trust_domain();
                let roots = if etd == self.own {
                    self.ca.bundle().x509_authorities.clone()
                } else {
                    self.held(&etd)
                        .await?
                        .map(|b| b.x509_authorities)
                        .unwrap_or_default()
                };
                if roots.is_empty() {
                    return Err(FetchError::NoEndpointBundle {
                        endpoint_trust_domain: etd,
                    });
                }
                Ok(EndpointAuth::Spiffe {
                    expected: endpoint_spiffe_id.clone(),
                    roots,
                })
            }
            BundleEndpointProfile::HttpsWeb => {
                let extra = extra_roots.clone();
                // The system store is read from disk once per process.
                let roots = tokio::task::spawn_blocking(move || fetch::web_roots(&extra, true))
                    .await
                    .map_err(|e| FetchError::Store(format!("loading CA certificates: {e}")))??;
                Ok(EndpointAuth::Web { roots })
            }
        }
    }

    /// One fetch: stores the bundle when it is new; returns its refresh hint.
    async fn refresh_once(
        &self,
        r: &FederationRelationship,
        extra_roots: &Arc<Vec<CertificateDer<'static>>>,
    ) -> Result<Option<u64>, FetchError> {
        let td = &r.trust_domain;
        let auth = self.endpoint_auth(r, extra_roots).await?;
        let body = fetch::fetch(&r.bundle_endpoint_url, &auth).await?;
        let bad = |reason: String| FetchError::BadBundle {
            url: r.bundle_endpoint_url.clone(),
            reason,
        };
        let text = std::str::from_utf8(&body).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        let fetched = parse_bundle(td, text).map_err(|e| bad(e.to_string()))?;
        let held = self.held(td).await?;
        if let Some(h) = &held {
            // Without a sequence, the newest fetch wins (spiffe.md §4.3).
            if fetched.sequence > 0 && h.sequence > fetched.sequence {
                return Err(FetchError::StaleSequence {
                    trust_domain: td.clone(),
                    served: fetched.sequence,
                    held: h.sequence,
                });
            }
        }
        if held.as_ref() != Some(&fetched) {
            let json = fetched.to_json();
            if let Some(why) = self
                .no_room(td, json.len())
                .await
                .map_err(|e| FetchError::Store(e.to_string()))?
            {
                return Err(FetchError::NoRoom(why));
            }
            self.store
                .put_bundle(td, &json)
                .await
                .map_err(|e| FetchError::Store(e.to_string()))?;
            tracing::info!(
                trust_domain = %td,
                sequence = fetched.sequence,
                x509_authorities = fetched.x509_authorities.len(),
                jwt_authorities = fetched.jwt_authorities.len(),
                "federated bundle updated"
            );
        }
        Ok(fetched.refresh_hint)
    }
}

/// One relationship's poller: fetch, then wait the refresh hint (or a
/// backoff after a failure), or fetch at once when the admin API asks.
async fn poll(
    shared: Arc<Shared>,
    r: FederationRelationship,
    extra_roots: Arc<Vec<CertificateDer<'static>>>,
    status: Arc<Mutex<RefreshStatus>>,
    mut requests: mpsc::Receiver<RefreshReply>,
    cancel: CancellationToken,
) {
    let td = r.trust_domain.clone();
    let mut hint = match shared.held(&td).await {
        Ok(b) => b.and_then(|b| b.refresh_hint),
        Err(_) => None,
    };
    let mut failures = 0u32;
    let mut pending: Option<RefreshReply> = None;
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = shared.refresh_once(&r, &extra_roots) => r,
        };
        let wait = match &result {
            Ok(h) => {
                failures = 0;
                hint = *h;
                shared.interval(hint)
            }
            Err(FetchError::StaleSequence { .. }) => {
                failures = 0;
                shared.interval(hint)
            }
            Err(_) => {
                failures = failures.saturating_add(1);
                shared.backoff(failures, hint)
            }
        };
        let now = SystemTime::now();
        if let Ok(mut s) = status.lock() {
            match &result {
                Ok(_) => {
                    s.last_refresh = Some(unix(now));
                    s.last_error = None;
                }
                Err(e) => s.last_error = Some(e.to_string()),
            }
            s.next_refresh = Some(unix(now + wait));
        }
        if let Err(e) = &result {
            tracing::warn!(
                trust_domain = %td,
                error = %e,
                retry_in = %sigil_types::duration::format(wait),
                "fetching a federated bundle failed"
            );
        }
        if let Some(reply) = pending.take() {
            let _ = reply.send(result.map(|_| ()));
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            req = requests.recv() => match req {
                Some(reply) => pending = Some(reply),
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests;
