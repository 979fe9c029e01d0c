//! The CA manager: X.509 and JWT signing authorities, their rotation
//! (prepare → activate → retire) and the trust bundle they make up.
//!
//! Rotation follows the peer's proven schedule: the next authority is
//! prepared (and published in the bundle) once the active one has used half of
//! its life, and activated at five sixths. Retired authorities stay in the
//! bundle until their own expiry, which is the latest moment anything they
//! signed can be valid, because leaves never outlive their CA.
//!
//! New JWT authorities are of the configured key type (`jwt_key_type`:
//! ES256 or RS256). Authorities of the other type that are already active or
//! retired keep working until they retire and expire, so a change of type
//! takes effect at the next rotation; a prepared authority of the other type,
//! which has signed nothing yet, is replaced while there is still time to
//! publish its successor before it would activate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use sigil_store::{AuthorityKind, AuthorityRecord, AuthorityState, Store};
use sigil_svid::bundle::Bundle;
use sigil_svid::jwt::{JwtAuthority, JwtKeyType};
use sigil_svid::keys::{PrivateKey, read_private_file, write_private_file};
use sigil_svid::x509::X509Authority;
use sigil_types::TrustDomain;
use tokio::sync::{Mutex, watch};

use crate::error::ServerError;

/// Seconds since the Unix epoch (negative times clamp to 0).
pub(crate) fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
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
            .ok_or_else(|| ServerError::Internal(format!("bad JWT authority id {}", record.id)))?;
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
}

struct CaState {
    x509: Vec<Slot<X509Authority>>,
    jwt: Vec<Slot<JwtAuthority>>,
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
    store: Arc<dyn Store>,
    keys_dir: PathBuf,
    ca_ttl: Duration,
    refresh_hint: Duration,
    jwt_key_type: JwtKeyType,
    state: Mutex<CaState>,
    active: ArcSwap<ActiveAuthorities>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
}

impl std::fmt::Debug for CaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaManager")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CaManager {
    /// Loads the authority journal and keys, creating the first authorities
    /// on a new server, and brings the rotation up to date with `now`. New
    /// JWT authorities are of `jwt_key_type`.
    pub async fn load(
        trust_domain: TrustDomain,
        store: Arc<dyn Store>,
        keys_dir: &Path,
        ca_ttl: Duration,
        refresh_hint: Duration,
        jwt_key_type: JwtKeyType,
        now: SystemTime,
    ) -> Result<Arc<Self>, ServerError> {
        sigil_svid::keys::ensure_private_dir(keys_dir)?;
        let mut x509 = Vec::new();
        let mut jwt = Vec::new();
        for record in store.list_authorities().await? {
            let key_path = keys_dir.join(format!("{}.key", record.id));
            let pem = read_private_file(&key_path).map_err(|e| {
                ServerError::Internal(format!(
                    "authority {} is in the journal but its key {} cannot be read: {e}",
                    record.id,
                    key_path.display()
                ))
            })?;
            let key = PrivateKey::from_pem(&String::from_utf8_lossy(&pem))?;
            match record.kind {
                AuthorityKind::X509 => x509.push(Slot {
                    authority: X509Authority::restore(&record, key)?,
                    record,
                }),
                AuthorityKind::Jwt => jwt.push(Slot {
                    authority: JwtAuthority::restore(&record, key)?,
                    record,
                }),
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
            sequence,
        };
        // Placeholders until the first rotation pass below fills them in.
        let placeholder = ActiveAuthorities {
            x509: Arc::new(X509Authority::generate(&trust_domain, ca_ttl, now)?),
            jwt: Arc::new(JwtAuthority::generate(ca_ttl, now)?),
        };
        let (bundle_tx, _) = watch::channel(Arc::new(Bundle::new(trust_domain.clone())));
        let manager = Arc::new(Self {
            trust_domain,
            store,
            keys_dir: keys_dir.to_owned(),
            ca_ttl,
            refresh_hint,
            jwt_key_type,
            state: Mutex::new(state),
            active: ArcSwap::from_pointee(placeholder),
            bundle_tx,
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

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// One rotation pass at time `now`: prepares, activates and prunes
    /// authorities as their ages require, then republishes the bundle (with a
    /// higher sequence) when its keys changed. Returns whether the active
    /// X.509 authority changed.
    pub async fn rotate(&self, now: SystemTime) -> Result<bool, ServerError> {
        let mut state = self.state.lock().await;
        let old_x509 = active_of(&state.x509).map(|s| s.record.id.clone());
        self.rotate_kind(&mut state.x509, now).await?;
        self.rotate_kind(&mut state.jwt, now).await?;
        let (Some(x), Some(j)) = (active_of(&state.x509), active_of(&state.jwt)) else {
            return Err(ServerError::Internal(
                "no active authority after rotation".into(),
            ));
        };
        let active_changed = old_x509.as_deref() != Some(x.record.id.as_str());
        self.active.store(Arc::new(ActiveAuthorities {
            x509: Arc::new(x.authority.clone()),
            jwt: Arc::new(j.authority.clone()),
        }));
        let mut bundle = Bundle::new(self.trust_domain.clone());
        bundle.x509_authorities = state
            .x509
            .iter()
            .map(|s| s.authority.cert_der().to_vec())
            .collect();
        bundle.jwt_authorities = state.jwt.iter().map(|s| s.authority.public_jwk()).collect();
        bundle.refresh_hint = Some(self.refresh_hint.as_secs());
        let current = self.bundle_tx.borrow().clone();
        let same_keys = current.x509_authorities == bundle.x509_authorities
            && current.jwt_authorities == bundle.jwt_authorities;
        if !same_keys || current.sequence == 0 {
            state.sequence += 1;
            bundle.sequence = state.sequence;
            self.store
                .put_bundle(&self.trust_domain, &bundle.to_json())
                .await?;
            self.bundle_tx.send_replace(Arc::new(bundle));
        }
        Ok(active_changed)
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
            let _ = std::fs::remove_file(self.key_path(&slot.record.id));
            tracing::info!(authority = %slot.record.id, "expired authority removed from the bundle");
            changed = true;
        }

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
            let _ = std::fs::remove_file(self.key_path(&slot.record.id));
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
            return Err(ServerError::Internal(
                "the active authority vanished".into(),
            ));
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
        let prepared = slots
            .iter()
            .position(|s| s.record.state == AuthorityState::Prepared);
        if let Some(p) = prepared
            && remaining <= lifetime / 6
        {
            self.set_state(&mut slots[active], AuthorityState::Retired)
                .await?;
            self.set_state(&mut slots[p], AuthorityState::Active)
                .await?;
            tracing::info!(authority = %slots[p].record.id, "authority activated");
            changed = true;
        }
        Ok(changed)
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
        };
        self.store.put_authority(record.clone()).await?;
        Ok(Slot { record, authority })
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

fn active_of<A>(slots: &[Slot<A>]) -> Option<&Slot<A>> {
    slots
        .iter()
        .find(|s| s.record.state == AuthorityState::Active)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_store::SqliteStore;

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
}
