//! The CA manager: X.509 and JWT signing authorities, their rotation
//! (prepare → activate → retire) and the trust bundle they make up.
//!
//! Rotation follows the peer's proven schedule: the next authority is
//! prepared (and published in the bundle) once the active one has used half of
//! its life, and activated at five sixths, but never before it has been
//! published for a minimum time (`activation`), unless the active one is
//! about to expire: a server that was down (or whose passes failed) through
//! the whole window between the two points must not sign with an authority
//! no agent or peer holds yet. Retired authorities stay in the
//! bundle until their own expiry, which is the latest moment anything they
//! signed can be valid, because leaves never outlive their CA.
//!
//! New JWT authorities are of the configured key type (`jwt_key_type`:
//! ES256 or RS256). Authorities of the other type that are already active or
//! retired keep working until they retire and expire, so a change of type
//! takes effect at the next rotation; a prepared authority of the other type,
//! which has signed nothing yet, is replaced while there is still time to
//! publish its successor before it would activate.
//!
//! Several servers may share one store (high availability). Each keeps its
//! own private keys in its own data directory and signs only with its own
//! authorities, which the journal marks with the server's persistent
//! instance ID (`owner`). The trust bundle every server publishes is the
//! union of all servers' authorities: its own, and its peers' public parts
//! as read from the journal ([`CaManager::refresh_peers`]). Records written
//! before instance IDs existed (empty owner) are adopted by the server that
//! holds their key file.
//!
//! An operator can also force a rotation after a key compromise: prepare a
//! successor, activate it, taint the old authority (it stays trusted, but
//! agents replace everything it signed at once) and revoke it (it leaves
//! the bundle and the journal, and its key file is deleted).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use sigil_store::{AuthorityKind, AuthorityRecord, AuthorityState, Store};
use sigil_svid::bundle::Bundle;
use sigil_svid::jwt::{JwtAuthority, JwtKeyType};
use sigil_svid::keys::{PrivateKey, read_private_file, remove_private_file, write_private_file};
use sigil_svid::x509::{X509Authority, sha256_hex};
use sigil_types::{Jwk, TrustDomain};
use tokio::sync::{Mutex, watch};

use crate::error::{AuthorityRefusal, InternalError, ServerError};

/// Seconds since the Unix epoch (negative times clamp to 0).
pub(crate) fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// The file in the data directory that holds the server's instance ID.
pub const INSTANCE_ID_FILE: &str = "instance-id";

/// This server's persistent instance ID, which marks the authorities whose
/// keys it holds: read from `<data_dir>/instance-id`, or, on the first
/// start, 128 random bits in hex written there (mode 0600).
pub fn load_or_create_instance_id(data_dir: &Path) -> Result<String, ServerError> {
    let path = data_dir.join(INSTANCE_ID_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let id = String::from_utf8_lossy(&bytes).trim().to_owned();
            let valid = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if valid {
                Ok(id)
            } else {
                Err(ServerError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} does not hold an instance ID (1 to 64 characters of \
                         [A-Za-z0-9_-]); fix it, or delete it only if this server \
                         holds no authority keys",
                        path.display()
                    ),
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 16];
            aws_lc_rs::rand::fill(&mut raw).map_err(|_| InternalError::Random)?;
            let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            write_private_file(&path, format!("{id}\n").as_bytes())?;
            tracing::info!(instance_id = %id, "new server instance ID created");
            Ok(id)
        }
        Err(e) => Err(ServerError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot read {}: {e}", path.display()),
        ))),
    }
}

/// The tainted authorities of the trust domain (this server's and its
/// peers'): still trusted, but everything they signed is to be replaced at
/// once. Both lists are sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tainted {
    /// X.509 CAs, as the lowercase hex SHA-256 of the certificate DER.
    pub x509: Vec<String>,
    /// JWT signing keys, by key ID.
    pub jwt_kids: Vec<String>,
}

/// One authority as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityView {
    /// The journal record.
    pub record: AuthorityRecord,
    /// Whether this server holds the key (only those it can act on).
    pub local: bool,
}

impl AuthorityView {
    /// X.509: the lowercase hex SHA-256 of the certificate DER (what sync
    /// messages name tainted CAs by). JWT: the key ID.
    pub fn public_key_id(&self) -> String {
        public_key_id(&self.record)
    }
}

fn public_key_id(record: &AuthorityRecord) -> String {
    match record.kind {
        AuthorityKind::X509 => sha256_hex(&record.public),
        AuthorityKind::Jwt => record
            .id
            .strip_prefix("jwt-")
            .unwrap_or(&record.id)
            .to_owned(),
    }
}

/// What new authorities are made of.
struct Settings<'a> {
    trust_domain: &'a TrustDomain,
    jwt_key_type: JwtKeyType,
}

/// What every signing authority offers the rotation logic.
trait Authority: Sized + Clone {
    const KIND: AuthorityKind;
    fn id(&self) -> String;
    /// The start of validity; `None` for JWT keys, whose life starts at creation.
    fn not_before(&self) -> Option<SystemTime>;
    fn not_after(&self) -> SystemTime;
    fn key(&self) -> &PrivateKey;
    fn public(&self) -> Vec<u8>;
    fn generate(
        settings: &Settings<'_>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, ServerError>;
    fn restore(record: &AuthorityRecord, key: PrivateKey) -> Result<Self, ServerError>;
    /// Whether the authority is what `settings` would create now.
    fn fits(&self, settings: &Settings<'_>) -> bool;
}

impl Authority for X509Authority {
    const KIND: AuthorityKind = AuthorityKind::X509;
    fn id(&self) -> String {
        format!("x509-{}", self.info().serial_hex)
    }
    fn not_before(&self) -> Option<SystemTime> {
        Some(self.info().not_before)
    }
    fn not_after(&self) -> SystemTime {
        self.info().not_after
    }
    fn key(&self) -> &PrivateKey {
        X509Authority::key(self)
    }
    fn public(&self) -> Vec<u8> {
        self.cert_der().to_vec()
    }
    fn generate(
        settings: &Settings<'_>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, ServerError> {
        Ok(X509Authority::generate(settings.trust_domain, ttl, now)?)
    }
    fn restore(record: &AuthorityRecord, key: PrivateKey) -> Result<Self, ServerError> {
        Ok(X509Authority::from_parts(record.public.clone(), key)?)
    }
    fn fits(&self, _settings: &Settings<'_>) -> bool {
        true
    }
}

impl Authority for JwtAuthority {
    const KIND: AuthorityKind = AuthorityKind::Jwt;
    fn id(&self) -> String {
        format!("jwt-{}", self.kid())
    }
    fn not_before(&self) -> Option<SystemTime> {
        None
    }
    fn not_after(&self) -> SystemTime {
        JwtAuthority::not_after(self)
    }
    fn key(&self) -> &PrivateKey {
        JwtAuthority::key(self)
    }
    fn public(&self) -> Vec<u8> {
        serde_json::to_vec(&self.public_jwk()).unwrap_or_default()
    }
    fn generate(
        settings: &Settings<'_>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, ServerError> {
        Ok(JwtAuthority::generate_with(
            settings.jwt_key_type,
            ttl,
            now,
        )?)
    }
    fn fits(&self, settings: &Settings<'_>) -> bool {
        self.key_type() == settings.jwt_key_type
    }
    fn restore(record: &AuthorityRecord, key: PrivateKey) -> Result<Self, ServerError> {
        let kid = record
            .id
            .strip_prefix("jwt-")
            .ok_or_else(|| InternalError::AuthorityId(record.id.clone()))?;
        Ok(JwtAuthority::from_parts(
            key,
            kid.to_owned(),
            from_unix(record.not_after),
        )?)
    }
}

#[derive(Clone)]
struct Slot<A> {
    record: AuthorityRecord,
    authority: A,
    /// Whether this process has already warned that the authority's
    /// activation is delayed (a log flag only: the decision itself comes
    /// from the journal).
    delay_warned: bool,
}

impl<A> Slot<A> {
    fn new(record: AuthorityRecord, authority: A) -> Self {
        Self {
            record,
            authority,
            delay_warned: false,
        }
    }
}

/// The longest an agent waits between two attempts to reach the server (the
/// agent's `max_backoff`); once connected it syncs the bundle at once.
const AGENT_MAX_BACKOFF: i64 = 30;

/// The most the last moment before the active authority's expiry, when the
/// prepared one is activated however recently it was published, is ever
/// set to: four of an agent's longest reconnection waits, so that agents
/// renew what the old authority signed (clamped to its expiry) under the new
/// one before it lapses, and a dozen rotation passes (10 s apart) to get the
/// activation written if the database stumbles.
const LAST_MOMENT_MAX: i64 = 4 * AGENT_MAX_BACKOFF;

/// What a rotation pass does with a prepared authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// Nothing: the active authority has more than a sixth of its life left.
    NotDue,
    /// Due by the schedule, but the prepared authority was published too
    /// recently; it activates at `at` (Unix seconds).
    Delayed { at: i64 },
    /// Activate it: due, and published long enough.
    Now,
    /// Activate it although it was published only `published_for` seconds
    /// ago: the active authority is about to expire.
    Forced { published_for: i64 },
}

/// How long a prepared authority must have been published before it
/// activates, for an active authority that lives `lifetime` seconds: long
/// enough for a federated peer to refresh once (`refresh_hint`) and for an
/// agent that lost the server to reconnect and sync (twice its longest
/// reconnection wait), but never more than a quarter of the lifetime, so
/// that the normal schedule (published at one half, activated at five
/// sixths: a third of the lifetime, give or take a rotation pass) is never
/// delayed by it.
fn min_publication(lifetime: i64, refresh_hint: Duration) -> i64 {
    let hint = i64::try_from(refresh_hint.as_secs()).unwrap_or(i64::MAX);
    hint.max(2 * AGENT_MAX_BACKOFF).min(lifetime / 4)
}

/// How close to the active authority's expiry the prepared one is activated
/// however recently it was published: a twelfth of the lifetime (half the
/// normal sixth, which keeps short test lifetimes workable), at most
/// [`LAST_MOMENT_MAX`].
fn last_moment(lifetime: i64) -> i64 {
    (lifetime / 12).min(LAST_MOMENT_MAX)
}

/// Whether the `prepared` authority replaces the `active` one at `now`
/// (Unix seconds). Decided from the journal records alone (the active one's
/// validity, the prepared one's `created_at`, when it entered the bundle),
/// so that a restarted server decides the same: due at five sixths of the
/// active life, once the prepared one has been published for
/// [`min_publication`]; before that only in the [`last_moment`] before the
/// active one expires. SVIDs signed by the active authority meanwhile end
/// with it (leaves never outlive their CA), so waiting is safe until then.
fn activation(
    active: &AuthorityRecord,
    prepared: &AuthorityRecord,
    now: i64,
    refresh_hint: Duration,
) -> Activation {
    let lifetime = (active.not_after - active.not_before).max(1);
    let remaining = active.not_after - now;
    if remaining > lifetime / 6 {
        return Activation::NotDue;
    }
    let published_for = (now - prepared.created_at).max(0);
    let min = min_publication(lifetime, refresh_hint);
    if published_for >= min {
        return Activation::Now;
    }
    let last = last_moment(lifetime);
    if remaining <= last {
        return Activation::Forced { published_for };
    }
    Activation::Delayed {
        at: (prepared.created_at + min).min(active.not_after - last),
    }
}

struct CaState {
    x509: Vec<Slot<X509Authority>>,
    jwt: Vec<Slot<JwtAuthority>>,
    /// Other servers' authorities (public parts), as last read from the journal.
    peers: Vec<AuthorityRecord>,
    sequence: u64,
}

/// The authorities that sign right now.
#[derive(Clone)]
pub struct ActiveAuthorities {
    /// Signs X509-SVIDs.
    pub x509: Arc<X509Authority>,
    /// Signs JWT-SVIDs.
    pub jwt: Arc<JwtAuthority>,
}

/// Owns the authorities; one instance per server.
pub struct CaManager {
    trust_domain: TrustDomain,
    instance_id: String,
    store: Arc<dyn Store>,
    keys_dir: PathBuf,
    ca_ttl: Duration,
    refresh_hint: Duration,
    jwt_key_type: JwtKeyType,
    state: Mutex<CaState>,
    active: ArcSwap<ActiveAuthorities>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
    tainted_tx: watch::Sender<Arc<Tainted>>,
}

impl std::fmt::Debug for CaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaManager")
            .field("trust_domain", &self.trust_domain)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl CaManager {
    /// Loads this server's authorities (those the journal marks with
    /// `instance_id`, and unowned ones whose key file is in `keys_dir`, which
    /// it adopts) and its peers' public parts, creating the first
    /// authorities on a new server, and brings the rotation up to date with
    /// `now`. New JWT authorities are of `jwt_key_type`.
    #[expect(clippy::too_many_arguments, reason = "one call site per server start")]
    pub async fn load(
        trust_domain: TrustDomain,
        store: Arc<dyn Store>,
        instance_id: &str,
        keys_dir: &Path,
        ca_ttl: Duration,
        refresh_hint: Duration,
        jwt_key_type: JwtKeyType,
        now: SystemTime,
    ) -> Result<Arc<Self>, ServerError> {
        sigil_svid::keys::ensure_private_dir(keys_dir)?;
        let mut x509 = Vec::new();
        let mut jwt = Vec::new();
        let mut peers = Vec::new();
        for mut record in store.list_authorities().await? {
            let key_path = keys_dir.join(format!("{}.key", record.id));
            if record.owner.is_empty() && key_path.exists() {
                // Written before servers had instance IDs: the server with
                // the key is the owner.
                record.owner = instance_id.to_owned();
                store.put_authority(record.clone()).await?;
                tracing::info!(authority = %record.id, "authority adopted by this server instance");
            }
            if record.owner != instance_id {
                peers.push(record);
                continue;
            }
            let pem =
                read_private_file(&key_path).map_err(|source| InternalError::AuthorityKey {
                    id: record.id.clone(),
                    path: key_path.clone(),
                    source,
                })?;
            let key = PrivateKey::from_pem(&String::from_utf8_lossy(&pem))?;
            match record.kind {
                AuthorityKind::X509 => {
                    let authority = X509Authority::restore(&record, key)?;
                    x509.push(Slot::new(record, authority));
                }
                AuthorityKind::Jwt => {
                    let authority = JwtAuthority::restore(&record, key)?;
                    jwt.push(Slot::new(record, authority));
                }
            }
        }
        let sequence = match store.get_bundle(&trust_domain).await? {
            Some(json) => Bundle::from_json(trust_domain.clone(), &json)
                .map(|b| b.sequence)
                .unwrap_or(0),
            None => 0,
        };
        let state = CaState {
            x509,
            jwt,
            peers,
            sequence,
        };
        // Placeholders until the first rotation pass below fills them in.
        let placeholder = ActiveAuthorities {
            x509: Arc::new(X509Authority::generate(&trust_domain, ca_ttl, now)?),
            jwt: Arc::new(JwtAuthority::generate(ca_ttl, now)?),
        };
        let (bundle_tx, _) = watch::channel(Arc::new(Bundle::new(trust_domain.clone())));
        let (tainted_tx, _) = watch::channel(Arc::new(Tainted::default()));
        let manager = Arc::new(Self {
            trust_domain,
            instance_id: instance_id.to_owned(),
            store,
            keys_dir: keys_dir.to_owned(),
            ca_ttl,
            refresh_hint,
            jwt_key_type,
            state: Mutex::new(state),
            active: ArcSwap::from_pointee(placeholder),
            bundle_tx,
            tainted_tx,
        });
        manager.rotate(now).await?;
        Ok(manager)
    }

    /// The authorities that sign now.
    pub fn active(&self) -> Arc<ActiveAuthorities> {
        self.active.load_full()
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle_tx.borrow().clone()
    }

    /// Notified whenever the bundle changes.
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle_tx.subscribe()
    }

    /// The tainted authorities of the trust domain.
    pub fn tainted(&self) -> Arc<Tainted> {
        self.tainted_tx.borrow().clone()
    }

    /// Notified whenever the set of tainted authorities changes.
    pub fn subscribe_tainted(&self) -> watch::Receiver<Arc<Tainted>> {
        self.tainted_tx.subscribe()
    }

    /// This server's instance ID (the owner of its authorities).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// One rotation pass at time `now`: prepares, activates and prunes
    /// authorities as their ages require, re-reads the peers' authorities,
    /// then republishes the bundle (with a higher sequence) when its keys
    /// changed. Returns whether the active X.509 authority changed.
    pub async fn rotate(&self, now: SystemTime) -> Result<bool, ServerError> {
        let mut state = self.state.lock().await;
        let old_x509 = active_of(&state.x509).map(|s| s.record.id.clone());
        self.rotate_kind(&mut state.x509, now).await?;
        self.rotate_kind(&mut state.jwt, now).await?;
        self.install_active(&state)?;
        let active_changed =
            old_x509.as_deref() != active_of(&state.x509).map(|s| s.record.id.as_str());
        // The store may be down: own authorities that need no write keep
        // working, and the peers stay as last read.
        if let Err(e) = self.reload_peers(&mut state, now).await {
            tracing::warn!(error = %e, "re-reading the peers' authorities failed; keeping the last known");
        }
        self.publish(&mut state, now, false).await?;
        Ok(active_changed)
    }

    /// Re-reads the peers' authorities from the journal (deleting those
    /// past their expiry) and republishes the bundle if its keys or the
    /// tainted set changed; returns whether anything did. Called when the
    /// change feed shows the own bundle was written (by this server or a
    /// peer) and at every rotation pass.
    pub async fn refresh_peers(&self, now: SystemTime) -> Result<bool, ServerError> {
        let mut state = self.state.lock().await;
        self.reload_peers(&mut state, now).await?;
        self.publish(&mut state, now, false).await
    }

    /// Every authority of the trust domain: this server's, then its peers'
    /// (as last read from the journal), each ordered by creation.
    pub async fn list(&self) -> Vec<AuthorityView> {
        let state = self.state.lock().await;
        state
            .x509
            .iter()
            .map(|s| &s.record)
            .chain(state.jwt.iter().map(|s| &s.record))
            .map(|r| AuthorityView {
                record: r.clone(),
                local: true,
            })
            .chain(state.peers.iter().map(|r| AuthorityView {
                record: r.clone(),
                local: false,
            }))
            .collect()
    }

    /// Forced rotation, step one: creates a prepared authority of `kind`
    /// (published in the bundle, not signing yet). Refused when one is
    /// already prepared.
    pub async fn prepare_now(
        &self,
        kind: AuthorityKind,
        now: SystemTime,
    ) -> Result<AuthorityRecord, ServerError> {
        let mut state = self.state.lock().await;
        let record = match kind {
            AuthorityKind::X509 => self.prepare_kind(&mut state.x509, now).await?,
            AuthorityKind::Jwt => self.prepare_kind(&mut state.jwt, now).await?,
        };
        tracing::warn!(authority = %record.id, "authority prepared by an operator");
        self.publish(&mut state, now, false).await?;
        Ok(record)
    }

    /// Forced rotation, step two: the prepared authority of `kind` signs
    /// from now on; the active one is retired (still trusted). Refused when
    /// none is prepared.
    pub async fn activate_now(
        &self,
        kind: AuthorityKind,
        now: SystemTime,
    ) -> Result<AuthorityRecord, ServerError> {
        let mut state = self.state.lock().await;
        let record = match kind {
            AuthorityKind::X509 => self.activate_kind(&mut state.x509).await?,
            AuthorityKind::Jwt => self.activate_kind(&mut state.jwt).await?,
        };
        self.install_active(&state)?;
        tracing::warn!(authority = %record.id, "authority activated by an operator");
        self.publish(&mut state, now, false).await?;
        Ok(record)
    }

    /// Forced rotation, step three: marks the retired authority `id` of
    /// `kind` tainted. It stays in the bundle, but agents replace everything
    /// it signed at once. Refused for the active or a prepared authority,
    /// one already tainted, and one that is not this server's.
    pub async fn taint(
        &self,
        kind: AuthorityKind,
        id: &str,
        now: SystemTime,
    ) -> Result<AuthorityRecord, ServerError> {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let record = match kind {
            AuthorityKind::X509 => self.taint_kind(&mut state.x509, &state.peers, id).await?,
            AuthorityKind::Jwt => self.taint_kind(&mut state.jwt, &state.peers, id).await?,
        };
        tracing::warn!(authority = %record.id, "authority tainted by an operator");
        // Written even though the keys are the same, so that the peers
        // following the change feed learn of the taint at once.
        self.publish(state, now, true).await?;
        Ok(record)
    }

    /// Forced rotation, step four: removes the tainted authority `id` of
    /// `kind` from the bundle and the journal and deletes its key. Refused
    /// for an authority that is not tainted or not this server's.
    pub async fn revoke(
        &self,
        kind: AuthorityKind,
        id: &str,
        now: SystemTime,
    ) -> Result<AuthorityRecord, ServerError> {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let record = match kind {
            AuthorityKind::X509 => self.revoke_kind(&mut state.x509, &state.peers, id).await?,
            AuthorityKind::Jwt => self.revoke_kind(&mut state.jwt, &state.peers, id).await?,
        };
        tracing::warn!(authority = %record.id, "authority revoked by an operator");
        self.publish(state, now, false).await?;
        Ok(record)
    }

    async fn prepare_kind<A: Authority>(
        &self,
        slots: &mut Vec<Slot<A>>,
        now: SystemTime,
    ) -> Result<AuthorityRecord, ServerError> {
        if let Some(p) = slots
            .iter()
            .find(|s| s.record.state == AuthorityState::Prepared)
        {
            return Err(AuthorityRefusal::AlreadyPrepared {
                kind: A::KIND,
                id: p.record.id.clone(),
            }
            .into());
        }
        let slot = self.create::<A>(AuthorityState::Prepared, now).await?;
        let record = slot.record.clone();
        slots.push(slot);
        Ok(record)
    }

    async fn activate_kind<A: Authority>(
        &self,
        slots: &mut [Slot<A>],
    ) -> Result<AuthorityRecord, ServerError> {
        let Some(p) = slots
            .iter()
            .position(|s| s.record.state == AuthorityState::Prepared)
        else {
            return Err(AuthorityRefusal::NonePrepared(A::KIND).into());
        };
        if let Some(a) = slots
            .iter()
            .position(|s| s.record.state == AuthorityState::Active)
        {
            self.set_state(&mut slots[a], AuthorityState::Retired)
                .await?;
        }
        self.set_state(&mut slots[p], AuthorityState::Active)
            .await?;
        Ok(slots[p].record.clone())
    }

    /// The index of this server's authority `id` among `slots`, or the
    /// error that explains why there is none.
    fn find_own<A: Authority>(
        slots: &[Slot<A>],
        peers: &[AuthorityRecord],
        id: &str,
    ) -> Result<usize, ServerError> {
        if let Some(i) = slots.iter().position(|s| s.record.id == id) {
            return Ok(i);
        }
        match peers.iter().find(|r| r.id == id) {
            Some(r) if r.kind == A::KIND => Err(AuthorityRefusal::OwnedElsewhere {
                id: id.to_owned(),
                owner: if r.owner.is_empty() {
                    "(none)".to_owned()
                } else {
                    r.owner.clone()
                },
            }
            .into()),
            _ => Err(AuthorityRefusal::Unknown {
                kind: A::KIND,
                id: id.to_owned(),
            }
            .into()),
        }
    }

    async fn taint_kind<A: Authority>(
        &self,
        slots: &mut [Slot<A>],
        peers: &[AuthorityRecord],
        id: &str,
    ) -> Result<AuthorityRecord, ServerError> {
        let i = Self::find_own(slots, peers, id)?;
        let slot = &mut slots[i];
        match slot.record.state {
            AuthorityState::Active => {
                return Err(AuthorityRefusal::TaintActive {
                    id: id.to_owned(),
                    kind: A::KIND,
                }
                .into());
            }
            AuthorityState::Prepared => {
                return Err(AuthorityRefusal::TaintPrepared(id.to_owned()).into());
            }
            AuthorityState::Retired => {}
        }
        if slot.record.tainted {
            return Err(AuthorityRefusal::AlreadyTainted(id.to_owned()).into());
        }
        let mut record = slot.record.clone();
        record.tainted = true;
        self.store.put_authority(record.clone()).await?;
        slot.record = record.clone();
        Ok(record)
    }

    async fn revoke_kind<A: Authority>(
        &self,
        slots: &mut Vec<Slot<A>>,
        peers: &[AuthorityRecord],
        id: &str,
    ) -> Result<AuthorityRecord, ServerError> {
        let i = Self::find_own(slots, peers, id)?;
        if !slots[i].record.tainted {
            return Err(AuthorityRefusal::NotTainted(id.to_owned()).into());
        }
        self.store.delete_authority(id).await?;
        let slot = slots.remove(i);
        self.remove_key(id);
        Ok(slot.record)
    }

    /// Makes the active slots the ones that sign.
    fn install_active(&self, state: &CaState) -> Result<(), ServerError> {
        let (Some(x), Some(j)) = (active_of(&state.x509), active_of(&state.jwt)) else {
            return Err(InternalError::NoActiveAuthority.into());
        };
        self.active.store(Arc::new(ActiveAuthorities {
            x509: Arc::new(x.authority.clone()),
            jwt: Arc::new(j.authority.clone()),
        }));
        Ok(())
    }

    /// Replaces the peers' records with the journal's, deleting those past
    /// their expiry (any server may: deleting is idempotent).
    async fn reload_peers(&self, state: &mut CaState, now: SystemTime) -> Result<(), ServerError> {
        let mut peers = Vec::new();
        for record in self.store.list_authorities().await? {
            if record.owner == self.instance_id {
                continue;
            }
            if record.not_after <= unix(now) {
                self.store.delete_authority(&record.id).await?;
                tracing::info!(authority = %record.id, owner = %record.owner, "expired peer authority removed");
                continue;
            }
            peers.push(record);
        }
        state.peers = peers;
        Ok(())
    }

    /// Publishes the bundle of this server's and its peers' authorities and
    /// the tainted set. The bundle is written to the store only when its keys
    /// differ from the stored one's (or when `force`), with a sequence above
    /// both the stored and the last published one, so that servers sharing
    /// the store neither go backwards nor answer each other's writes.
    /// Returns whether the local bundle or the tainted set changed.
    async fn publish(
        &self,
        state: &mut CaState,
        now: SystemTime,
        force: bool,
    ) -> Result<bool, ServerError> {
        let mut records: Vec<&AuthorityRecord> = state
            .x509
            .iter()
            .map(|s| &s.record)
            .chain(state.jwt.iter().map(|s| &s.record))
            .chain(state.peers.iter().filter(|r| r.not_after > unix(now)))
            .collect();
        // One order for every server, so that equal journals give equal bundles.
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut bundle = Bundle::new(self.trust_domain.clone());
        let mut tainted = Tainted::default();
        for r in &records {
            match r.kind {
                AuthorityKind::X509 => bundle.x509_authorities.push(r.public.clone()),
                AuthorityKind::Jwt => match serde_json::from_slice::<Jwk>(&r.public) {
                    Ok(jwk) => bundle.jwt_authorities.push(jwk),
                    Err(e) => {
                        tracing::warn!(authority = %r.id, error = %e, "leaving an unreadable JWT key out of the bundle");
                        continue;
                    }
                },
            }
            if r.tainted {
                match r.kind {
                    AuthorityKind::X509 => tainted.x509.push(public_key_id(r)),
                    AuthorityKind::Jwt => tainted.jwt_kids.push(public_key_id(r)),
                }
            }
        }
        tainted.x509.sort();
        tainted.jwt_kids.sort();
        bundle.refresh_hint = Some(self.refresh_hint.as_secs());

        let tainted_changed = **self.tainted_tx.borrow() != tainted;
        if tainted_changed {
            self.tainted_tx.send_replace(Arc::new(tainted));
        }
        let current = self.bundle_tx.borrow().clone();
        let keys = key_set(&bundle);
        let stored = match self.store.get_bundle(&self.trust_domain).await {
            Ok(json) => json.and_then(|j| Bundle::from_json(self.trust_domain.clone(), &j).ok()),
            // With nothing to write, an unreachable store must not fail the
            // rotation pass (the server's own SVID is renewed after it).
            Err(e) if !force && current.sequence > 0 && key_set(&current) == keys => {
                tracing::debug!(error = %e, "cannot read the stored bundle; the published one stands");
                return Ok(tainted_changed);
            }
            Err(e) => return Err(e.into()),
        };
        let stored_sequence = stored.as_ref().map_or(0, |b| b.sequence);
        if !force && stored.as_ref().is_some_and(|b| key_set(b) == keys) {
            // The store holds these keys already (written by this server or a peer).
            state.sequence = state.sequence.max(stored_sequence);
            if key_set(&current) != keys || current.sequence < stored_sequence {
                bundle.sequence = stored_sequence.max(current.sequence).max(1);
                self.bundle_tx.send_replace(Arc::new(bundle));
                return Ok(true);
            }
            return Ok(tainted_changed);
        }
        state.sequence = state.sequence.max(stored_sequence) + 1;
        bundle.sequence = state.sequence;
        self.store
            .put_bundle(&self.trust_domain, &bundle.to_json())
            .await?;
        self.bundle_tx.send_replace(Arc::new(bundle));
        Ok(true)
    }

    async fn rotate_kind<A: Authority>(
        &self,
        slots: &mut Vec<Slot<A>>,
        now: SystemTime,
    ) -> Result<bool, ServerError> {
        let mut changed = false;
        // Drop retired (or never used) authorities whose life is over: nothing
        // they signed can still be valid.
        let expired: Vec<usize> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.record.not_after <= unix(now) && s.record.state != AuthorityState::Active
            })
            .map(|(i, _)| i)
            .collect();
        for i in expired.into_iter().rev() {
            let slot = slots.remove(i);
            self.store.delete_authority(&slot.record.id).await?;
            self.remove_key(&slot.record.id);
            tracing::info!(authority = %slot.record.id, "expired authority removed from the bundle");
            changed = true;
        }

        // The journal records a state change one record at a time, so a
        // crash between two writes leaves a half-done step: two active
        // authorities (a replacement written before its predecessor was
        // retired) or none (the old one retired, the prepared one not yet
        // activated). Finish the step rather than start another.
        changed |= self.repair_active(slots).await?;
        let active = slots
            .iter()
            .position(|s| s.record.state == AuthorityState::Active);
        let Some(active) = active else {
            // A new server, or one whose active authority was lost: start one now.
            let slot = self.create::<A>(AuthorityState::Active, now).await?;
            tracing::info!(authority = %slot.record.id, "authority created and activated");
            slots.push(slot);
            return Ok(true);
        };
        let a = &slots[active].record;
        let lifetime = (a.not_after - a.not_before).max(1);
        let remaining = a.not_after - unix(now);
        // A prepared authority of a key type no longer configured has signed
        // nothing: replace it, as long as its successor can still be
        // published for a sixth of a lifetime before it activates.
        if let Some(p) = slots.iter().position(|s| {
            s.record.state == AuthorityState::Prepared && !s.authority.fits(&self.settings())
        }) && remaining > lifetime / 3
        {
            let slot = slots.remove(p);
            self.store.delete_authority(&slot.record.id).await?;
            self.remove_key(&slot.record.id);
            tracing::info!(
                authority = %slot.record.id,
                "prepared authority of a key type no longer configured removed"
            );
            changed = true;
        }
        let Some(active) = slots
            .iter()
            .position(|s| s.record.state == AuthorityState::Active)
        else {
            return Err(InternalError::ActiveAuthorityVanished.into());
        };
        let prepared = slots
            .iter()
            .position(|s| s.record.state == AuthorityState::Prepared);
        if remaining <= 0 && prepared.is_none() {
            // Down past the whole life of the authority: nothing it signed is
            // valid any more, so replace it at once.
            let slot = self.create::<A>(AuthorityState::Active, now).await?;
            self.set_state(&mut slots[active], AuthorityState::Retired)
                .await?;
            tracing::warn!(authority = %slot.record.id, "active authority had expired; replaced");
            slots.push(slot);
            return Ok(true);
        }
        if prepared.is_none() && remaining <= lifetime / 2 {
            let slot = self.create::<A>(AuthorityState::Prepared, now).await?;
            tracing::info!(authority = %slot.record.id, "next authority prepared and published");
            slots.push(slot);
            changed = true;
        }
        let Some(p) = slots
            .iter()
            .position(|s| s.record.state == AuthorityState::Prepared)
        else {
            return Ok(changed);
        };
        let decision = activation(
            &slots[active].record,
            &slots[p].record,
            unix(now),
            self.refresh_hint,
        );
        match decision {
            Activation::NotDue => return Ok(changed),
            Activation::Delayed { at } => {
                if !slots[p].delay_warned {
                    slots[p].delay_warned = true;
                    tracing::warn!(
                        authority = %slots[p].record.id,
                        published_at = slots[p].record.created_at,
                        activate_at = at,
                        active_expires_at = slots[active].record.not_after,
                        "activation of the next authority delayed past its normal point: it was \
                         published only recently (the server was down, or its rotation passes \
                         failed), and agents and federated peers need time to fetch it; the \
                         active authority signs until then"
                    );
                }
                return Ok(changed);
            }
            Activation::Forced { published_for } => tracing::warn!(
                authority = %slots[p].record.id,
                published_for_secs = published_for,
                active_expires_at = slots[active].record.not_after,
                "next authority activated before its minimum publication time because the \
                 active one is about to expire: agents that have not synced the bundle since \
                 it was published will refuse the server (UnknownIssuer) until re-attested, \
                 and federated peers that have not refreshed reject its SVIDs until they do"
            ),
            Activation::Now => {}
        }
        self.set_state(&mut slots[active], AuthorityState::Retired)
            .await?;
        self.set_state(&mut slots[p], AuthorityState::Active)
            .await?;
        tracing::info!(authority = %slots[p].record.id, "authority activated");
        Ok(true)
    }

    /// Brings `slots` back to at most one active authority after a crash in
    /// the middle of a state change: of several active ones the newest stays
    /// active and the others are retired (still trusted, so what they signed
    /// stays valid); with none active, a prepared one, already published in
    /// the bundle, is activated, instead of a new unpublished one being
    /// created (whose SVIDs peers with the older bundle could not verify).
    /// Returns whether anything changed.
    async fn repair_active<A: Authority>(
        &self,
        slots: &mut [Slot<A>],
    ) -> Result<bool, ServerError> {
        let newest_active = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.record.state == AuthorityState::Active)
            .max_by_key(|(_, s)| (s.record.not_after, s.record.created_at))
            .map(|(i, _)| i);
        match newest_active {
            Some(keep) => {
                let mut changed = false;
                for (i, slot) in slots.iter_mut().enumerate() {
                    if i != keep && slot.record.state == AuthorityState::Active {
                        self.set_state(slot, AuthorityState::Retired).await?;
                        tracing::warn!(
                            authority = %slot.record.id,
                            "retired an authority left active beside a newer one by an interrupted rotation"
                        );
                        changed = true;
                    }
                }
                Ok(changed)
            }
            None => {
                let Some(p) = slots
                    .iter()
                    .position(|s| s.record.state == AuthorityState::Prepared)
                else {
                    return Ok(false);
                };
                self.set_state(&mut slots[p], AuthorityState::Active)
                    .await?;
                tracing::warn!(
                    authority = %slots[p].record.id,
                    "activated the prepared authority of an interrupted rotation"
                );
                Ok(true)
            }
        }
    }

    async fn create<A: Authority>(
        &self,
        state: AuthorityState,
        now: SystemTime,
    ) -> Result<Slot<A>, ServerError> {
        let authority = A::generate(&self.settings(), self.ca_ttl, now)?;
        let id = authority.id();
        // Key first, journal second: a journal record never points at a key
        // that was not written.
        write_private_file(&self.key_path(&id), authority.key().to_pem().as_bytes())?;
        let not_before = unix(authority.not_before().unwrap_or(now));
        let record = AuthorityRecord {
            id,
            kind: A::KIND,
            state,
            public: authority.public(),
            not_before,
            not_after: unix(authority.not_after()),
            created_at: unix(now),
            owner: self.instance_id.clone(),
            tainted: false,
        };
        self.store.put_authority(record.clone()).await?;
        Ok(Slot::new(record, authority))
    }

    async fn set_state<A>(
        &self,
        slot: &mut Slot<A>,
        state: AuthorityState,
    ) -> Result<(), ServerError> {
        slot.record.state = state;
        self.store.put_authority(slot.record.clone()).await?;
        Ok(())
    }

    fn settings(&self) -> Settings<'_> {
        Settings {
            trust_domain: &self.trust_domain,
            jwt_key_type: self.jwt_key_type,
        }
    }

    fn key_path(&self, id: &str) -> PathBuf {
        self.keys_dir.join(format!("{id}.key"))
    }

    /// Deletes an authority's key after its journal record is gone, with the
    /// keys directory synced: a revoked key must not come back after a
    /// power cut. A failure leaves only an orphan file (no record points at
    /// it), so it is logged rather than undoing the acknowledged change.
    fn remove_key(&self, id: &str) {
        let path = self.key_path(id);
        if let Err(e) = remove_private_file(&path) {
            tracing::warn!(authority = %id, path = %path.display(), error = %e, "cannot delete the authority's key file; delete it by hand");
        }
    }

    /// The journal as (id, kind, state, not_after), for status output and tests.
    pub async fn authorities(&self) -> Vec<(String, AuthorityKind, AuthorityState, i64)> {
        let state = self.state.lock().await;
        state
            .x509
            .iter()
            .map(|s| &s.record)
            .chain(state.jwt.iter().map(|s| &s.record))
            .map(|r| (r.id.clone(), r.kind, r.state, r.not_after))
            .collect()
    }
}

/// What makes two bundles trust the same keys: the CA certificates and the
/// JWT key IDs, each sorted.
fn key_set(bundle: &Bundle) -> (Vec<&[u8]>, Vec<Option<&str>>) {
    let mut x509: Vec<&[u8]> = bundle.x509_authorities.iter().map(Vec::as_slice).collect();
    x509.sort();
    let mut jwt: Vec<Option<&str>> = bundle
        .jwt_authorities
        .iter()
        .map(|k| k.kid.as_deref())
        .collect();
    jwt.sort();
    (x509, jwt)
}

fn active_of<A>(slots: &[Slot<A>]) -> Option<&Slot<A>> {
    slots
        .iter()
        .find(|s| s.record.state == AuthorityState::Active)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_store::SqliteStore;
    use std::collections::BTreeSet;

    async fn manager(dir: &Path, ttl: Duration, now: SystemTime) -> Arc<CaManager> {
        manager_with(dir, ttl, JwtKeyType::Es256, now).await
    }

    async fn manager_with(
        dir: &Path,
        ttl: Duration,
        jwt_key_type: JwtKeyType,
        now: SystemTime,
    ) -> Arc<CaManager> {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.join("db.sqlite")).await.unwrap());
        CaManager::load(
            TrustDomain::new("example.org").unwrap(),
            store,
            "test-instance",
            &dir.join("keys"),
            ttl,
            Duration::from_secs(300),
            jwt_key_type,
            now,
        )
        .await
        .unwrap()
    }

    fn jwt_ktys(ca: &CaManager) -> Vec<String> {
        ca.bundle()
            .jwt_authorities
            .iter()
            .map(|k| k.kty.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_fresh_server_signs_with_the_configured_jwt_key_type() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let ca = manager_with(dir.path(), Duration::from_secs(600), JwtKeyType::Rs256, t0).await;
        assert_eq!(ca.active().jwt.alg(), "RS256");
        let bundle = ca.bundle();
        let jwk = &bundle.jwt_authorities[0];
        assert_eq!(jwk.kty, "RSA");
        assert!(jwk.n.is_some() && jwk.e.is_some() && jwk.x.is_none());
        assert_eq!(jwk.key_use.as_deref(), Some("jwt-svid"));
        assert_eq!(jwk.kid.as_deref(), Some(ca.active().jwt.kid()));
        // The RSA key comes back after a restart.
        drop(ca);
        let ca = manager_with(dir.path(), Duration::from_secs(600), JwtKeyType::Rs256, t0).await;
        assert_eq!(ca.active().jwt.alg(), "RS256");
        assert_eq!(jwt_ktys(&ca), vec!["RSA"]);
    }

    #[tokio::test]
    async fn a_key_type_switch_takes_effect_at_the_next_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let ttl = Duration::from_secs(600);
        let ec_kid = {
            let ca = manager_with(dir.path(), ttl, JwtKeyType::Es256, t0).await;
            // Half-life: an EC successor is prepared.
            ca.rotate(t0 + Duration::from_secs(310)).await.unwrap();
            assert_eq!(jwt_ktys(&ca), vec!["EC", "EC"]);
            ca.active().jwt.kid().to_owned()
        };
        // Restarted with rsa-2048 while there is still time before the
        // activation: the EC successor, which signed nothing, is replaced by
        // an RSA one, published beside the EC key that still signs.
        let t1 = t0 + Duration::from_secs(320);
        let ca = manager_with(dir.path(), ttl, JwtKeyType::Rs256, t1).await;
        assert_eq!(ca.active().jwt.kid(), ec_kid);
        assert_eq!(ca.active().jwt.alg(), "ES256");
        let mut ktys = jwt_ktys(&ca);
        ktys.sort();
        assert_eq!(ktys, vec!["EC", "RSA"]);
        // At five sixths the RSA key signs; the EC one verifies until it expires.
        ca.rotate(t0 + Duration::from_secs(505)).await.unwrap();
        assert_eq!(ca.active().jwt.alg(), "RS256");
        assert!(
            ca.bundle()
                .jwt_authorities
                .iter()
                .any(|k| k.kid.as_deref() == Some(ec_kid.as_str()))
        );
        ca.rotate(t0 + Duration::from_secs(601)).await.unwrap();
        assert!(jwt_ktys(&ca).iter().all(|k| k == "RSA"));
    }

    #[tokio::test]
    async fn a_prepared_key_of_the_old_type_stays_when_too_close_to_activation() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let ttl = Duration::from_secs(600);
        {
            let ca = manager_with(dir.path(), ttl, JwtKeyType::Es256, t0).await;
            ca.rotate(t0 + Duration::from_secs(310)).await.unwrap();
        }
        // 420 s: less than a third of the life remains, so replacing the
        // prepared key would leave its successor too little time in the
        // bundle before it signs; it activates as prepared.
        let ca = manager_with(
            dir.path(),
            ttl,
            JwtKeyType::Rs256,
            t0 + Duration::from_secs(420),
        )
        .await;
        assert_eq!(jwt_ktys(&ca), vec!["EC", "EC"]);
        ca.rotate(t0 + Duration::from_secs(505)).await.unwrap();
        assert_eq!(ca.active().jwt.alg(), "ES256");
    }

    fn count(
        list: &[(String, AuthorityKind, AuthorityState, i64)],
        kind: AuthorityKind,
        state: AuthorityState,
    ) -> usize {
        list.iter().filter(|a| a.1 == kind && a.2 == state).count()
    }

    #[tokio::test]
    async fn prepare_at_half_activate_at_five_sixths_retire_at_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let ttl = Duration::from_secs(600);
        let ca = manager(dir.path(), ttl, t0).await;
        let first = ca.active().x509.cert_der().to_vec();
        assert_eq!(ca.bundle().x509_authorities, vec![first.clone()]);
        assert_eq!(ca.bundle().jwt_authorities.len(), 1);
        let seq0 = ca.bundle().sequence;

        // Before half-life: nothing happens.
        ca.rotate(t0 + Duration::from_secs(200)).await.unwrap();
        assert_eq!(ca.bundle().x509_authorities.len(), 1);

        // Half-life: the next authority is published but does not sign yet.
        ca.rotate(t0 + Duration::from_secs(310)).await.unwrap();
        let list = ca.authorities().await;
        assert_eq!(
            count(&list, AuthorityKind::X509, AuthorityState::Prepared),
            1
        );
        assert_eq!(
            count(&list, AuthorityKind::Jwt, AuthorityState::Prepared),
            1
        );
        assert_eq!(ca.bundle().x509_authorities.len(), 2);
        assert_eq!(ca.bundle().jwt_authorities.len(), 2);
        assert!(ca.bundle().sequence > seq0);
        assert_eq!(ca.active().x509.cert_der(), first.as_slice());

        // Five sixths: the prepared one signs; the old one stays in the bundle.
        let changed = ca.rotate(t0 + Duration::from_secs(505)).await.unwrap();
        assert!(changed);
        assert_ne!(ca.active().x509.cert_der(), first.as_slice());
        let list = ca.authorities().await;
        assert_eq!(
            count(&list, AuthorityKind::X509, AuthorityState::Retired),
            1
        );
        assert!(ca.bundle().x509_authorities.contains(&first));

        // After the old one's expiry it leaves the bundle; the active one
        // (created at 310 s) is itself past half its life by then, so its
        // successor is already published beside it.
        ca.rotate(t0 + Duration::from_secs(615)).await.unwrap();
        let bundle = ca.bundle();
        assert!(!bundle.x509_authorities.contains(&first));
        assert!(
            bundle
                .x509_authorities
                .iter()
                .any(|c| c.as_slice() == ca.active().x509.cert_der())
        );
        assert_eq!(bundle.x509_authorities.len(), 2);
        let list = ca.authorities().await;
        assert_eq!(
            count(&list, AuthorityKind::X509, AuthorityState::Retired),
            0
        );
    }

    #[tokio::test]
    async fn restart_keeps_authorities_and_key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let first = {
            let ca = manager(dir.path(), Duration::from_secs(3600), t0).await;
            ca.active().x509.cert_der().to_vec()
        };
        let ca = manager(dir.path(), Duration::from_secs(3600), t0).await;
        assert_eq!(ca.active().x509.cert_der(), first.as_slice());
        let keys = dir.path().join("keys");
        assert_eq!(
            std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for f in std::fs::read_dir(&keys).unwrap() {
            let mode = f.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    async fn shared_store(dir: &Path) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open(&dir.join("db.sqlite")).await.unwrap())
    }

    /// A server with its own instance ID and keys directory on `store`.
    async fn server(
        store: &Arc<dyn Store>,
        dir: &Path,
        instance: &str,
        now: SystemTime,
    ) -> Result<Arc<CaManager>, ServerError> {
        CaManager::load(
            TrustDomain::new("example.org").unwrap(),
            store.clone(),
            instance,
            &dir.join(format!("keys-{instance}")),
            HOUR,
            Duration::from_secs(300),
            JwtKeyType::Es256,
            now,
        )
        .await
    }

    fn kids(bundle: &Bundle) -> BTreeSet<String> {
        bundle
            .jwt_authorities
            .iter()
            .filter_map(|k| k.kid.clone())
            .collect()
    }

    fn leaf_from(ca: &CaManager, now: SystemTime) -> Vec<Vec<u8>> {
        let id: sigil_types::SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let key = PrivateKey::generate_p256().unwrap();
        let leaf = ca
            .active()
            .x509
            .sign_svid(
                &sigil_svid::x509::SvidRequest::new(&id, Duration::from_secs(60)),
                &key.public_key_spki_der(),
                now,
            )
            .unwrap();
        vec![leaf]
    }

    fn verifies(chain: &[Vec<u8>], ca: &CaManager, now: SystemTime) -> bool {
        sigil_svid::x509::verify_svid(chain, &ca.bundle().x509_authorities, now).is_ok()
    }

    #[tokio::test]
    async fn two_servers_on_one_store_sign_with_their_own_keys_and_trust_both() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let store = shared_store(dir.path()).await;
        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        let b = server(&store, dir.path(), "b", t0).await.unwrap();
        assert_ne!(a.active().x509.cert_der(), b.active().x509.cert_der());
        assert_ne!(a.active().jwt.kid(), b.active().jwt.kid());

        // B read A's authorities when it started; A learns of B's now.
        assert!(a.refresh_peers(t0).await.unwrap());
        assert!(
            !a.refresh_peers(t0).await.unwrap(),
            "nothing new the second time"
        );
        let both_cas: BTreeSet<Vec<u8>> = [a.active(), b.active()]
            .iter()
            .map(|x| x.x509.cert_der().to_vec())
            .collect();
        let both_kids: BTreeSet<String> = [a.active(), b.active()]
            .iter()
            .map(|x| x.jwt.kid().to_owned())
            .collect();
        for ca in [&a, &b] {
            let bundle = ca.bundle();
            let cas: BTreeSet<Vec<u8>> = bundle.x509_authorities.iter().cloned().collect();
            assert_eq!(cas, both_cas);
            assert_eq!(kids(&bundle), both_kids);
        }
        // Both publish the same keys: the stored bundle is not rewritten
        // back and forth, and neither goes below the stored sequence.
        let stored = Bundle::from_json(
            a.trust_domain().clone(),
            &store.get_bundle(a.trust_domain()).await.unwrap().unwrap(),
        )
        .unwrap();
        assert_eq!(a.bundle().sequence, stored.sequence);
        assert_eq!(b.bundle().sequence, stored.sequence);

        // What either signs verifies against the other's bundle.
        assert!(verifies(&leaf_from(&a, t0), &b, t0));
        assert!(verifies(&leaf_from(&b, t0), &a, t0));
        let sub: sigil_types::SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let token = a
            .active()
            .jwt
            .sign(&sub, &["aud".to_owned()], Duration::from_secs(60), t0)
            .unwrap();
        sigil_svid::jwt::validate_jwt(&token, "aud", b.bundle().as_ref(), t0).unwrap();

        // The journal says whose each authority is.
        for r in store.list_authorities().await.unwrap() {
            let owner = if a
                .list()
                .await
                .iter()
                .any(|v| v.local && v.record.id == r.id)
            {
                "a"
            } else {
                "b"
            };
            assert_eq!(r.owner, owner, "{}", r.id);
        }

        // A restarted keeps its own authorities and still trusts B's.
        let a_active = a.active().x509.cert_der().to_vec();
        drop(a);
        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        assert_eq!(a.active().x509.cert_der(), a_active.as_slice());
        assert!(verifies(&leaf_from(&b, t0), &a, t0));
    }

    #[tokio::test]
    async fn expired_peer_authorities_leave_the_bundle_and_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let store = shared_store(dir.path()).await;
        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        let b = server(&store, dir.path(), "b", t0).await.unwrap();
        let a_ca = a.active().x509.cert_der().to_vec();
        assert!(b.bundle().x509_authorities.contains(&a_ca));
        // A is gone for good; past its authorities' expiry B drops them.
        drop(a);
        let later = t0 + HOUR + Duration::from_secs(1);
        b.rotate(later).await.unwrap();
        assert!(!b.bundle().x509_authorities.contains(&a_ca));
        assert!(
            store
                .list_authorities()
                .await
                .unwrap()
                .iter()
                .all(|r| r.owner == "b")
        );
    }

    #[tokio::test]
    async fn records_from_before_instance_ids_are_adopted_by_the_key_holder() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let store = shared_store(dir.path()).await;
        let old = server(&store, dir.path(), "old", t0).await.unwrap();
        let active = old.active().x509.cert_der().to_vec();
        drop(old);
        // As the migration leaves them: no owner.
        for mut r in store.list_authorities().await.unwrap() {
            r.owner.clear();
            store.put_authority(r).await.unwrap();
        }
        // Another server, without the keys, sees them as a peer's...
        let other = server(&store, dir.path(), "other", t0).await.unwrap();
        assert!(other.bundle().x509_authorities.contains(&active));
        // ...and the server with the key files (same keys directory, a new
        // instance ID) adopts them and keeps signing with the same CA.
        std::fs::rename(dir.path().join("keys-old"), dir.path().join("keys-new")).unwrap();
        let new = server(&store, dir.path(), "new", t0).await.unwrap();
        assert_eq!(new.active().x509.cert_der(), active.as_slice());
        let adopted: Vec<_> = store
            .list_authorities()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.owner != "other")
            .collect();
        assert_eq!(adopted.len(), 2);
        assert!(adopted.iter().all(|r| r.owner == "new"));
    }

    #[tokio::test]
    async fn an_own_record_without_its_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let store = shared_store(dir.path()).await;
        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        let id = a.active().x509.id();
        drop(a);
        std::fs::remove_file(dir.path().join(format!("keys-a/{id}.key"))).unwrap();
        let err = server(&store, dir.path(), "a", t0).await.unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
        assert!(err.to_string().contains(&id), "{err}");
    }

    #[test]
    fn the_instance_id_is_created_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create_instance_id(dir.path()).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(load_or_create_instance_id(dir.path()).unwrap(), id);
        let path = dir.path().join(INSTANCE_ID_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create_instance_id(other.path()).unwrap(), id);
        std::fs::write(&path, "not an id!").unwrap();
        let err = load_or_create_instance_id(dir.path()).unwrap_err();
        assert!(err.to_string().contains("instance ID"), "{err}");
    }

    /// Everything a refused operation could have changed.
    async fn observable(ca: &CaManager) -> (Vec<AuthorityView>, Arc<Bundle>, Arc<Tainted>) {
        (ca.list().await, ca.bundle(), ca.tainted())
    }

    #[tokio::test]
    async fn forced_rotation_prepare_activate_taint_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let store = shared_store(dir.path()).await;
        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        let b = server(&store, dir.path(), "b", t0).await.unwrap();
        a.refresh_peers(t0).await.unwrap();
        let old = a.active().x509.id();
        let old_der = a.active().x509.cert_der().to_vec();
        let old_leaf = leaf_from(&a, t0);

        // Nothing to activate yet; the active one cannot be tainted;
        // unknown ids and peers' authorities are refused. Nothing changes.
        let before = observable(&a).await;
        let refusals = [
            a.activate_now(AuthorityKind::X509, t0).await.unwrap_err(),
            a.taint(AuthorityKind::X509, &old, t0).await.unwrap_err(),
            a.revoke(AuthorityKind::X509, &old, t0).await.unwrap_err(),
            a.taint(AuthorityKind::X509, "x509-nope", t0)
                .await
                .unwrap_err(),
            a.taint(AuthorityKind::Jwt, &old, t0).await.unwrap_err(),
            a.taint(AuthorityKind::X509, &b.active().x509.id(), t0)
                .await
                .unwrap_err(),
        ];
        assert_eq!(refusals[0].to_status().code(), tonic::Code::InvalidArgument);
        assert!(
            refusals[1].to_string().contains("active"),
            "{}",
            refusals[1]
        );
        assert!(
            refusals[2].to_string().contains("not tainted"),
            "{}",
            refusals[2]
        );
        assert_eq!(refusals[3].to_status().code(), tonic::Code::NotFound);
        assert_eq!(refusals[4].to_status().code(), tonic::Code::NotFound);
        assert!(
            refusals[5].to_string().contains("instance ID b"),
            "{}",
            refusals[5]
        );
        assert!(observable(&a).await == before);

        // Prepare: published, not signing; a second prepare is refused.
        let prepared = a.prepare_now(AuthorityKind::X509, t0).await.unwrap();
        assert_eq!(prepared.state, AuthorityState::Prepared);
        assert!(a.bundle().x509_authorities.contains(&prepared.public));
        assert_eq!(a.active().x509.id(), old);
        a.prepare_now(AuthorityKind::X509, t0).await.unwrap_err();
        let prepared_while_prepared = a.list().await;
        assert_eq!(
            prepared_while_prepared.iter().filter(|v| v.local).count(),
            3
        );
        // The prepared one cannot be tainted either.
        a.taint(AuthorityKind::X509, &prepared.id, t0)
            .await
            .unwrap_err();

        // Activate: the new one signs; the old one is retired, still trusted.
        let active = a.activate_now(AuthorityKind::X509, t0).await.unwrap();
        assert_eq!(active.id, prepared.id);
        assert_eq!(a.active().x509.id(), prepared.id);
        assert!(verifies(&old_leaf, &a, t0));

        // Taint: still trusted, and named in the tainted set, which the peer
        // learns when it re-reads the journal.
        let tainted = a.taint(AuthorityKind::X509, &old, t0).await.unwrap();
        assert!(tainted.tainted);
        assert_eq!(a.tainted().x509, vec![sha256_hex(&old_der)]);
        assert!(verifies(&old_leaf, &a, t0));
        a.taint(AuthorityKind::X509, &old, t0).await.unwrap_err();
        b.refresh_peers(t0).await.unwrap();
        assert_eq!(b.tainted().x509, vec![sha256_hex(&old_der)]);
        assert!(
            b.list()
                .await
                .iter()
                .any(|v| !v.local && v.record.id == old && v.record.tainted)
        );

        // Revoke: out of the bundle, the journal and the keys directory;
        // the peer drops it too.
        let seq = a.bundle().sequence;
        a.revoke(AuthorityKind::X509, &old, t0).await.unwrap();
        assert!(!a.bundle().x509_authorities.contains(&old_der));
        assert!(a.bundle().sequence > seq);
        assert!(!verifies(&old_leaf, &a, t0));
        assert!(a.tainted().x509.is_empty());
        assert!(!dir.path().join(format!("keys-a/{old}.key")).exists());
        assert!(
            store
                .list_authorities()
                .await
                .unwrap()
                .iter()
                .all(|r| r.id != old)
        );
        assert!(b.refresh_peers(t0).await.unwrap());
        assert!(!b.bundle().x509_authorities.contains(&old_der));
        a.revoke(AuthorityKind::X509, &old, t0).await.unwrap_err();

        // The same for the JWT key.
        let old_kid = a.active().jwt.kid().to_owned();
        let old_jwt = format!("jwt-{old_kid}");
        a.prepare_now(AuthorityKind::Jwt, t0).await.unwrap();
        a.activate_now(AuthorityKind::Jwt, t0).await.unwrap();
        assert_ne!(a.active().jwt.kid(), old_kid);
        a.taint(AuthorityKind::Jwt, &old_jwt, t0).await.unwrap();
        assert_eq!(a.tainted().jwt_kids, vec![old_kid.clone()]);
        assert!(kids(&a.bundle()).contains(&old_kid));
        a.revoke(AuthorityKind::Jwt, &old_jwt, t0).await.unwrap();
        assert!(!kids(&a.bundle()).contains(&old_kid));

        // A restart remembers what was done.
        let active_now = a.active().x509.id();
        drop(a);
        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        assert_eq!(a.active().x509.id(), active_now);
        assert!(!a.bundle().x509_authorities.contains(&old_der));
    }

    /// The journal's records of `kind` as (ID, state), sorted.
    async fn states(store: &Arc<dyn Store>, kind: AuthorityKind) -> Vec<(String, AuthorityState)> {
        let mut v: Vec<_> = store
            .list_authorities()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == kind)
            .map(|r| (r.id, r.state))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[tokio::test]
    async fn a_crash_between_retiring_and_activating_activates_the_published_successor() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let store = shared_store(dir.path()).await;
        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        let old = a.active().x509.id();
        let prepared = a.prepare_now(AuthorityKind::X509, t0).await.unwrap();
        let published = a.bundle().x509_authorities.clone();
        drop(a);
        // The first of activation's two journal writes landed, then the
        // process died: the old authority is retired and none is active.
        let mut rec = store
            .list_authorities()
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.id == old)
            .unwrap();
        rec.state = AuthorityState::Retired;
        store.put_authority(rec).await.unwrap();

        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        // The successor everyone already trusts signs; no new, unpublished
        // authority was made.
        assert_eq!(a.active().x509.id(), prepared.id);
        assert_eq!(a.bundle().x509_authorities, published);
        let mut want = vec![
            (old.clone(), AuthorityState::Retired),
            (prepared.id.clone(), AuthorityState::Active),
        ];
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(states(&store, AuthorityKind::X509).await, want);
    }

    #[tokio::test]
    async fn a_crash_that_left_two_active_authorities_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now();
        let store = shared_store(dir.path()).await;
        let a = server(&store, dir.path(), "a", t0).await.unwrap();
        let old = a.active().x509.id();
        let old_leaf = leaf_from(&a, t0);
        // A successor created a minute later, written as active before the
        // old one was retired (as the replacement of an expired authority is).
        let next = a
            .prepare_now(AuthorityKind::X509, t0 + Duration::from_secs(60))
            .await
            .unwrap();
        drop(a);
        let mut rec = next.clone();
        rec.state = AuthorityState::Active;
        store.put_authority(rec).await.unwrap();

        let a = server(&store, dir.path(), "a", t0 + Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(a.active().x509.id(), next.id);
        let mut want = vec![
            (old.clone(), AuthorityState::Retired),
            (next.id.clone(), AuthorityState::Active),
        ];
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(states(&store, AuthorityKind::X509).await, want);
        // The one retired is still trusted: what it signed stays valid.
        assert!(verifies(&old_leaf, &a, t0 + Duration::from_secs(60)));
    }

    /// What the code under test logs, for the WARNs operators depend on.
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
        type Writer = Logs;
        fn make_writer(&'a self) -> Logs {
            self.clone()
        }
    }

    impl Logs {
        /// Captures this thread's log (the tests run on one thread) until
        /// the guard is dropped.
        fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
            let logs = Logs::default();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(logs.clone())
                .with_ansi(false)
                .finish();
            (logs, tracing::subscriber::set_default(subscriber))
        }

        /// The WARN lines written since the last call.
        fn take_warnings(&self) -> Vec<String> {
            let bytes = std::mem::take(&mut *self.0.lock().unwrap());
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| l.contains(" WARN "))
                .map(str::to_owned)
                .collect()
        }
    }

    const DELAYED: &str = "activation of the next authority delayed past its normal point";
    const FORCED: &str = "next authority activated before its minimum publication time";

    fn active_ids(ca: &CaManager) -> (String, String) {
        let a = ca.active();
        (a.x509.id(), a.jwt.id())
    }

    fn sorted_active_ids(ca: &CaManager) -> Vec<String> {
        let (x509, jwt) = active_ids(ca);
        let mut v = vec![x509, jwt];
        v.sort();
        v
    }

    /// A server with hour-long authorities created at `t0`, whose log is
    /// captured from then on.
    struct Watched {
        logs: Logs,
        _guard: tracing::subscriber::DefaultGuard,
        dir: tempfile::TempDir,
        t0: SystemTime,
        ca: Arc<CaManager>,
        /// The active (X.509, JWT) authority IDs at `t0`.
        first: (String, String),
    }

    impl Watched {
        async fn start() -> Self {
            let (logs, _guard) = Logs::capture();
            let dir = tempfile::tempdir().unwrap();
            let t0 = SystemTime::now();
            let ca = manager(dir.path(), HOUR, t0).await;
            let first = active_ids(&ca);
            let _ = logs.take_warnings();
            Self {
                logs,
                _guard,
                dir,
                t0,
                ca,
                first,
            }
        }
    }

    async fn prepared_ids(ca: &CaManager) -> Vec<String> {
        let mut v: Vec<String> = ca
            .authorities()
            .await
            .into_iter()
            .filter(|a| a.2 == AuthorityState::Prepared)
            .map(|a| a.0)
            .collect();
        v.sort();
        v
    }

    fn in_bundle(ca: &CaManager, ids: &[String]) -> bool {
        let list = ca.bundle();
        ids.iter().all(|id| match id.strip_prefix("jwt-") {
            Some(kid) => kids(&list).contains(kid),
            None => list.x509_authorities.iter().any(|der| {
                sigil_svid::x509::cert_info(der)
                    .is_ok_and(|i| format!("x509-{}", i.serial_hex) == *id)
            }),
        })
    }

    fn record(not_before: i64, not_after: i64, created_at: i64) -> AuthorityRecord {
        AuthorityRecord {
            id: "x509-01".into(),
            kind: AuthorityKind::X509,
            state: AuthorityState::Active,
            public: Vec::new(),
            not_before,
            not_after,
            created_at,
            owner: "test-instance".into(),
            tainted: false,
        }
    }

    #[test]
    fn activation_waits_for_the_minimum_publication_until_the_last_moment() {
        let hint = Duration::from_secs(300);
        // A day-long authority: 5 min publication (the refresh hint), the
        // last 2 min force.
        let day = 86_400;
        let active = record(0, day, 0);
        let due = day - day / 6;
        // Prepared on schedule, at half of the life: activates at five sixths.
        let on_time = record(0, 0, day / 2);
        assert_eq!(
            activation(&active, &on_time, due - 1, hint),
            Activation::NotDue
        );
        assert_eq!(activation(&active, &on_time, due, hint), Activation::Now);
        // Prepared late (the server was down through the window): waits
        // five minutes after its publication, then activates.
        let late = record(0, 0, due + 3600);
        assert_eq!(
            activation(&active, &late, due + 3600, hint),
            Activation::Delayed { at: due + 3900 }
        );
        assert_eq!(
            activation(&active, &late, due + 3899, hint),
            Activation::Delayed { at: due + 3900 }
        );
        assert_eq!(
            activation(&active, &late, due + 3900, hint),
            Activation::Now
        );
        // Prepared in the last minutes: activates in the last two, forced.
        let last = record(0, 0, day - 200);
        assert_eq!(
            activation(&active, &last, day - 121, hint),
            Activation::Delayed { at: day - 120 }
        );
        assert_eq!(
            activation(&active, &last, day - 120, hint),
            Activation::Forced { published_for: 80 }
        );
        // Past the active one's expiry: at once.
        assert_eq!(
            activation(&active, &record(0, 0, day + 5), day + 5, hint),
            Activation::Forced { published_for: 0 }
        );
        // A longer refresh hint asks for a longer publication, a shorter one
        // never less than two agent reconnection waits.
        assert_eq!(
            activation(&active, &late, due + 3600 + 900, Duration::from_secs(1800)),
            Activation::Delayed {
                at: due + 3600 + 1800
            }
        );
        assert_eq!(
            activation(&active, &late, due + 3600 + 59, Duration::from_secs(5)),
            Activation::Delayed {
                at: due + 3600 + 60
            }
        );
        // A two-minute authority (tests): at most a quarter of its life is
        // asked (30 s), the last 10 s force.
        let short = record(0, 120, 0);
        let late = record(0, 0, 100);
        assert_eq!(
            activation(&short, &late, 100, hint),
            Activation::Delayed { at: 110 }
        );
        assert_eq!(
            activation(&short, &late, 110, hint),
            Activation::Forced { published_for: 10 }
        );
        let on_time = record(0, 0, 60);
        assert_eq!(activation(&short, &on_time, 100, hint), Activation::Now);
    }

    #[tokio::test]
    async fn a_pass_that_first_sees_five_sixths_prepares_and_activates_only_after_publication() {
        let w = Watched::start().await;
        let (logs, t0, first) = (&w.logs, w.t0, &w.first);
        let ca = &w.ca;

        // Down (or failing) from before half of the life until past five
        // sixths: the first pass prepares both kinds and publishes them, but
        // the old authorities go on signing.
        let back = t0 + Duration::from_secs(3100);
        assert!(!ca.rotate(back).await.unwrap());
        assert_eq!(active_ids(ca), *first);
        let prepared = prepared_ids(ca).await;
        assert_eq!(prepared.len(), 2, "{prepared:?}");
        assert!(in_bundle(ca, &prepared));
        let warnings = logs.take_warnings();
        assert_eq!(
            warnings.iter().filter(|l| l.contains(DELAYED)).count(),
            2,
            "one WARN per kind: {warnings:#?}"
        );

        // Still within the minimum publication (the 5 min refresh hint):
        // nothing changes, and the WARN is not repeated.
        ca.rotate(t0 + Duration::from_secs(3399)).await.unwrap();
        assert_eq!(active_ids(ca), *first);
        assert!(logs.take_warnings().is_empty());

        // A restart decides the same from the journal (the first manager
        // stays idle from now on).
        let restarted = manager(w.dir.path(), HOUR, t0 + Duration::from_secs(3399)).await;
        let ca = &restarted;
        assert_eq!(active_ids(ca), *first);
        assert_eq!(prepared_ids(ca).await, prepared);

        // Published for the minimum time: both activate, without a forced WARN.
        assert!(ca.rotate(t0 + Duration::from_secs(3400)).await.unwrap());
        assert_eq!(sorted_active_ids(ca), prepared);
        assert!(prepared_ids(ca).await.is_empty());
        let list = ca.authorities().await;
        assert!(
            list.iter()
                .any(|a| a.0 == first.0 && a.2 == AuthorityState::Retired)
        );
        assert!(
            list.iter()
                .any(|a| a.0 == first.1 && a.2 == AuthorityState::Retired)
        );
        assert!(!logs.take_warnings().iter().any(|l| l.contains(FORCED)));
    }

    #[tokio::test]
    async fn an_active_authority_about_to_expire_is_replaced_at_once_with_a_warning() {
        let w = Watched::start().await;

        // Back 100 s before the end (inside the last 2 min): waiting for the
        // publication would let the active authorities expire, so the
        // successors are prepared and activated in the same pass.
        assert!(w.ca.rotate(w.t0 + Duration::from_secs(3500)).await.unwrap());
        let (x509, jwt) = active_ids(&w.ca);
        assert_ne!(x509, w.first.0);
        assert_ne!(jwt, w.first.1);
        assert!(in_bundle(
            &w.ca,
            &[x509, jwt, w.first.0.clone(), w.first.1.clone()]
        ));
        let warnings = w.logs.take_warnings();
        let forced: Vec<_> = warnings.iter().filter(|l| l.contains(FORCED)).collect();
        assert_eq!(forced.len(), 2, "one WARN per kind: {warnings:#?}");
        assert!(
            forced.iter().all(|l| l.contains("UnknownIssuer")),
            "{forced:#?}"
        );
    }

    #[tokio::test]
    async fn a_delayed_activation_is_forced_in_the_last_moment() {
        let w = Watched::start().await;
        // Prepared 250 s before the end: the 5 min publication would end
        // after the last moment (120 s before the end), so it waits until then.
        w.ca.rotate(w.t0 + Duration::from_secs(3350)).await.unwrap();
        let prepared = prepared_ids(&w.ca).await;
        assert_eq!(prepared.len(), 2);
        w.ca.rotate(w.t0 + Duration::from_secs(3479)).await.unwrap();
        assert_eq!(active_ids(&w.ca), w.first);
        assert!(w.logs.take_warnings().iter().all(|l| l.contains(DELAYED)));
        assert!(w.ca.rotate(w.t0 + Duration::from_secs(3480)).await.unwrap());
        assert_eq!(sorted_active_ids(&w.ca), prepared);
        assert_eq!(
            w.logs
                .take_warnings()
                .iter()
                .filter(|l| l.contains(FORCED))
                .count(),
            2
        );
    }
}
