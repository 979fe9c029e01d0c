//! A cache in front of ValidateJWTSVID's check.
//!
//! Validating a JWT-SVID costs one ECDSA (or RSA) verify; a workload that
//! validates every request it receives tends to see the same few tokens
//! again and again. The cache remembers tokens that passed, so a repeat
//! costs one SHA-256 and a map lookup. It never decides anything itself:
//! the check is [`sigil_svid::jwt::validate_jwt`] (through
//! [`crate::workload`]'s `validate_for`), and an answer from the cache is one
//! that check gave for the same bytes under the same bundles, still inside
//! the token's lifetime. In detail:
//!
//! - the key is the SHA-256 of the requested audience and of the whole token
//!   (header, claims and signature), so a token with the same claims and
//!   another signature is not a hit, and a token valid for one audience
//!   never answers a request for another;
//! - only successes are cached; an entry is served while `now` is before
//!   the token's `exp` (without the clock-skew leeway the full check allows)
//!   and not before the time it was validated (a clock that went back gets
//!   the full check, which also covers `nbf` and `iat`);
//! - the whole cache is dropped when the agent's own bundle or any federated
//!   bundle differs from the ones the entries were validated against, so a
//!   token signed by a removed key is checked again, and refused;
//! - a token of a foreign trust domain is answered from the cache only to a
//!   caller entitled to that domain's bundle, as the full check requires;
//! - at most [`JWT_VALIDATION_CACHE_LIMIT`] entries; a token (with its
//!   audience) longer than [`JWT_VALIDATION_CACHE_MAX_TOKEN_BYTES`] is
//!   checked every time and not cached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use aws_lc_rs::digest;
use sigil_svid::SvidError;
use sigil_svid::bundle::Bundle;
use sigil_types::{Entry, SpiffeId};

use crate::core::{FederatedBundles, Snapshot};

/// Most validated tokens the agent keeps.
pub const JWT_VALIDATION_CACHE_LIMIT: usize = 1000;

/// Longest token plus audience, in bytes, that is cached: JWT-SVIDs are well
/// under 2 KiB, and this bounds the cache's memory to a few MiB whatever
/// callers send.
pub const JWT_VALIDATION_CACHE_MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims ValidateJWTSVID returns.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// SHA-256 of the audience (length-prefixed) and the whole token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key([u8; 32]);

impl Key {
    fn new(token: &str, audience: &str) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&(audience.len() as u64).to_be_bytes());
        ctx.update(audience.as_bytes());
        ctx.update(token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Self(out)
    }
}

/// One token that passed the full check.
struct Validated {
    spiffe_id: SpiffeId,
    claims: Arc<Claims>,
    /// The token's `exp`.
    expiry: SystemTime,
    /// When the full check passed.
    validated_at: SystemTime,
    /// Insertion counter: the age of the entry.
    seq: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Validated>,
    /// The bundles every entry was validated against.
    own: Option<Arc<Bundle>>,
    federated: Option<Arc<FederatedBundles>>,
    next_seq: u64,
}

impl Inner {
    /// Drops every entry unless `snap` holds the bundles they were
    /// validated against; the cache then belongs to `snap`'s bundles.
    fn follow(&mut self, snap: &Snapshot) {
        let same_own = self
            .own
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, &snap.bundle) || **b == *snap.bundle);
        let same_federated = self
            .federated
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(f, &snap.federated) || **f == *snap.federated);
        if same_own && same_federated {
            return;
        }
        self.entries.clear();
        self.own = Some(snap.bundle.clone());
        self.federated = Some(snap.federated.clone());
    }
}

/// Validated JWT-SVIDs, bounded; see the module docs.
pub struct JwtValidationCache {
    inner: Mutex<Inner>,
    limit: usize,
    hits: AtomicU64,
}

impl std::fmt::Debug for JwtValidationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtValidationCache")
            .field("limit", &self.limit)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for JwtValidationCache {
    fn default() -> Self {
        Self::new(JWT_VALIDATION_CACHE_LIMIT)
    }
}

impl JwtValidationCache {
    /// A cache of at most `limit` tokens (at least one).
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            limit: limit.max(1),
            hits: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent whatever panicked while it was held.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many tokens are cached.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many validations the cache answered.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// ValidateJWTSVID's answer for `token` and `audience` to a caller whose
    /// entries are `matched`, at `now`: from the cache when it may answer,
    /// else from the full check (whose success is then cached).
    pub fn validate(
        &self,
        snap: &Snapshot,
        matched: &[Arc<Entry>],
        token: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<(SpiffeId, Arc<Claims>), SvidError> {
        let cacheable = token.len() + audience.len() <= JWT_VALIDATION_CACHE_MAX_TOKEN_BYTES;
        let key = cacheable.then(|| Key::new(token, audience));
        if let Some(key) = &key
            && let Some(hit) = self.lookup(snap, matched, key, now)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        let (spiffe_id, claims, expiry) =
            crate::workload::validate_for(snap, matched, token, audience, now)?;
        let claims = Arc::new(claims);
        if let Some(key) = key {
            self.insert(snap, key, &spiffe_id, &claims, expiry, now);
        }
        Ok((spiffe_id, claims))
    }

    fn lookup(
        &self,
        snap: &Snapshot,
        matched: &[Arc<Entry>],
        key: &Key,
        now: SystemTime,
    ) -> Option<(SpiffeId, Arc<Claims>)> {
        let mut inner = self.lock();
        inner.follow(snap);
        let v = inner.entries.get(key)?;
        if now >= v.expiry || now < v.validated_at {
            if now >= v.expiry {
                inner.entries.remove(key);
            }
            return None;
        }
        // The full check looks a token's key up in the own bundle and the
        // federated bundles this caller is entitled to, by the token's
        // trust domain: the same rule here.
        let td = v.spiffe_id.trust_domain();
        let entitled = td == snap.bundle.trust_domain
            || crate::workload::federated_for(snap, matched)
                .iter()
                .any(|b| b.trust_domain == td);
        entitled.then(|| (v.spiffe_id.clone(), v.claims.clone()))
    }

    fn insert(
        &self,
        snap: &Snapshot,
        key: Key,
        spiffe_id: &SpiffeId,
        claims: &Arc<Claims>,
        expiry: SystemTime,
        now: SystemTime,
    ) {
        if expiry <= now {
            return;
        }
        let mut inner = self.lock();
        // The token was checked against `snap`'s bundles: entries checked
        // against others go.
        inner.follow(snap);
        if !inner.entries.contains_key(&key) && inner.entries.len() >= self.limit {
            inner.entries.retain(|_, v| v.expiry > now);
            while inner.entries.len() >= self.limit {
                let Some(oldest) = inner
                    .entries
                    .iter()
                    .min_by_key(|(_, v)| v.seq)
                    .map(|(k, _)| *k)
                else {
                    break;
                };
                inner.entries.remove(&oldest);
            }
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.entries.insert(
            key,
            Validated {
                spiffe_id: spiffe_id.clone(),
                claims: claims.clone(),
                expiry,
                validated_at: now,
                seq,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sigil_svid::jwt::JwtClaims;

    use super::*;
    use crate::workload::tests::{Domain, domain, entry, snapshot};

    const HOUR: Duration = Duration::from_secs(3600);

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn auds(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A JWT-SVID signed by `own`'s authority for `sub` and `audiences`,
    /// good for `ttl` from `now`.
    fn sign(own: &Domain, sub: &str, audiences: &[&str], ttl: Duration, now: SystemTime) -> String {
        own.jwt.sign(&id(sub), &auds(audiences), ttl, now).unwrap()
    }

    /// What most tests start from: example.org, a snapshot holding only its
    /// bundle, the time now, and a token of example.org for
    /// `spiffe://example.org/a` with audience `api`, good for `ttl`.
    fn setup(ttl: Duration) -> (Domain, Snapshot, SystemTime, String) {
        let own = domain("example.org");
        let snap = snapshot(&own, &[], &[]);
        let now = SystemTime::now();
        let token = sign(&own, "spiffe://example.org/a", &["api"], ttl, now);
        (own, snap, now, token)
    }

    #[test]
    fn a_repeat_is_answered_from_the_cache_with_the_same_claims() {
        let (_, snap, now, token) = setup(HOUR);
        let cache = JwtValidationCache::default();
        let first = cache.validate(&snap, &[], &token, "api", now).unwrap();
        assert_eq!((cache.hits(), cache.len()), (0, 1));
        let second = cache
            .validate(&snap, &[], &token, "api", now + Duration::from_secs(1))
            .unwrap();
        assert_eq!(cache.hits(), 1);
        assert_eq!(first.0, second.0);
        assert_eq!(first.1, second.1);
        assert_eq!(second.1["sub"], "spiffe://example.org/a");
        // The same answer the check alone gives.
        let (_, claims, _) = crate::workload::validate_for(&snap, &[], &token, "api", now).unwrap();
        assert_eq!(*second.1, claims);
    }

    #[test]
    fn another_audience_gets_the_full_check() {
        let (own, snap, now, _) = setup(HOUR);
        let cache = JwtValidationCache::default();
        let only_a = sign(&own, "spiffe://example.org/a", &["a"], HOUR, now);
        cache.validate(&snap, &[], &only_a, "a", now).unwrap();
        let err = cache.validate(&snap, &[], &only_a, "b", now).unwrap_err();
        assert!(matches!(err, SvidError::JwtAudience(_)), "{err}");
        assert_eq!(cache.hits(), 0);

        let both = sign(&own, "spiffe://example.org/a", &["a", "b"], HOUR, now);
        cache.validate(&snap, &[], &both, "a", now).unwrap();
        cache.validate(&snap, &[], &both, "b", now).unwrap();
        assert_eq!((cache.hits(), cache.len()), (0, 3));
        cache.validate(&snap, &[], &both, "b", now).unwrap();
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn a_cached_token_is_refused_once_it_expires() {
        let ttl = Duration::from_secs(60);
        let (_, snap, now, token) = setup(ttl);
        let cache = JwtValidationCache::default();
        cache.validate(&snap, &[], &token, "api", now).unwrap();
        cache.validate(&snap, &[], &token, "api", now).unwrap();
        assert_eq!(cache.hits(), 1);
        // Past `exp` the cache no longer answers: within the clock-skew
        // leeway only the full check does (and nothing is cached again) ...
        let just_after = now + ttl + Duration::from_secs(1);
        cache
            .validate(&snap, &[], &token, "api", just_after)
            .unwrap();
        assert_eq!((cache.hits(), cache.len()), (1, 0));
        // ... and past the leeway the token is refused.
        let later = now + ttl + sigil_svid::jwt::CLOCK_SKEW + Duration::from_secs(1);
        let err = cache
            .validate(&snap, &[], &token, "api", later)
            .unwrap_err();
        assert!(matches!(err, SvidError::JwtExpired), "{err}");
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn a_clock_that_went_back_gets_the_full_check() {
        let (_, snap, now, token) = setup(HOUR);
        let cache = JwtValidationCache::default();
        cache.validate(&snap, &[], &token, "api", now).unwrap();
        // Before the token's `iat` (beyond the leeway): not yet valid.
        let before = now - sigil_svid::jwt::CLOCK_SKEW - Duration::from_secs(5);
        let err = cache
            .validate(&snap, &[], &token, "api", before)
            .unwrap_err();
        assert!(matches!(err, SvidError::JwtNotYetValid), "{err}");
        assert_eq!(cache.hits(), 0);
    }

    #[test]
    fn a_bundle_change_drops_the_cache_and_a_removed_key_refuses_the_token() {
        let (own, snap, now, token) = setup(HOUR);
        let cache = JwtValidationCache::default();
        cache.validate(&snap, &[], &token, "api", now).unwrap();
        cache.validate(&snap, &[], &token, "api", now).unwrap();
        assert_eq!(cache.hits(), 1);

        // The same bundle content under a new Arc: still a hit.
        let mut same = snapshot(&own, &[], &[]);
        same.bundle = Arc::new((*snap.bundle).clone());
        cache.validate(&same, &[], &token, "api", now).unwrap();
        assert_eq!(cache.hits(), 2);

        // The JWT key is removed from the own bundle.
        let mut removed = snapshot(&own, &[], &[]);
        let mut bundle = (*snap.bundle).clone();
        bundle.jwt_authorities.clear();
        removed.bundle = Arc::new(bundle);
        let err = cache
            .validate(&removed, &[], &token, "api", now)
            .unwrap_err();
        assert!(matches!(err, SvidError::JwtUnknownKey { .. }), "{err}");
        assert_eq!((cache.hits(), cache.len()), (2, 0));
    }

    #[test]
    fn a_federated_bundle_change_or_entitlement_is_honoured() {
        let own = domain("example.org");
        let other = domain("other.org");
        let fed = entry("fed", &["other.org"]);
        let plain = entry("plain", &[]);
        let now = SystemTime::now();
        let foreign = other
            .jwt
            .sign_with(
                &id("spiffe://other.org/db"),
                &auds(&["api"]),
                HOUR,
                now,
                &JwtClaims::default(),
            )
            .unwrap();
        let snap = snapshot(&own, &[fed.clone(), plain.clone()], &[&other]);
        let cache = JwtValidationCache::default();
        cache
            .validate(&snap, std::slice::from_ref(&fed), &foreign, "api", now)
            .unwrap();
        // A caller not entitled to other.org's bundle is not answered from
        // the cache: the full check refuses it.
        let err = cache
            .validate(&snap, std::slice::from_ref(&plain), &foreign, "api", now)
            .unwrap_err();
        assert!(err.to_string().contains("other.org"), "{err}");
        cache
            .validate(&snap, std::slice::from_ref(&fed), &foreign, "api", now)
            .unwrap();
        assert_eq!(cache.hits(), 1);

        // other.org's bundle is no longer held: refused.
        let gone = snapshot(&own, &[fed.clone(), plain], &[]);
        let err = cache
            .validate(&gone, std::slice::from_ref(&fed), &foreign, "api", now)
            .unwrap_err();
        assert!(matches!(err, SvidError::JwtUnknownKey { .. }), "{err}");
        assert_eq!((cache.hits(), cache.len()), (1, 0));
    }

    #[test]
    fn a_token_with_the_same_claims_and_another_signature_is_not_a_hit() {
        let (own, snap, now, token) = setup(HOUR);
        let cache = JwtValidationCache::default();
        cache.validate(&snap, &[], &token, "api", now).unwrap();
        // Header and claims of the cached token, the signature of another.
        let other = sign(&own, "spiffe://example.org/a", &["other"], HOUR, now);
        let (signed, _) = token.rsplit_once('.').unwrap();
        let (_, signature) = other.rsplit_once('.').unwrap();
        let forged = format!("{signed}.{signature}");
        let err = cache.validate(&snap, &[], &forged, "api", now).unwrap_err();
        assert!(matches!(err, SvidError::JwtSignature), "{err}");
        assert_eq!((cache.hits(), cache.len()), (0, 1));
    }

    #[test]
    fn the_cache_holds_at_most_its_limit() {
        let (own, snap, now, _) = setup(HOUR);
        let limit = 3;
        let cache = JwtValidationCache::new(limit);
        let tokens: Vec<String> = (0..=limit)
            .map(|i| {
                sign(
                    &own,
                    &format!("spiffe://example.org/w{i}"),
                    &["api"],
                    HOUR,
                    now,
                )
            })
            .collect();
        for t in &tokens {
            cache.validate(&snap, &[], t, "api", now).unwrap();
            assert!(cache.len() <= limit);
        }
        assert_eq!(cache.len(), limit);
        // The oldest went; the newest is a hit.
        cache
            .validate(&snap, &[], &tokens[limit], "api", now)
            .unwrap();
        assert_eq!(cache.hits(), 1);
        cache.validate(&snap, &[], &tokens[0], "api", now).unwrap();
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn an_oversized_token_is_checked_every_time() {
        let (own, snap, now, _) = setup(HOUR);
        let mut extra = serde_json::Map::new();
        extra.insert(
            "pad".to_owned(),
            "x".repeat(JWT_VALIDATION_CACHE_MAX_TOKEN_BYTES).into(),
        );
        let claims = JwtClaims {
            issuer: None,
            extra,
        };
        let token = own
            .jwt
            .sign_with(
                &id("spiffe://example.org/a"),
                &auds(&["api"]),
                HOUR,
                now,
                &claims,
            )
            .unwrap();
        let cache = JwtValidationCache::default();
        cache.validate(&snap, &[], &token, "api", now).unwrap();
        cache.validate(&snap, &[], &token, "api", now).unwrap();
        assert_eq!((cache.hits(), cache.len()), (0, 0));
    }
}
