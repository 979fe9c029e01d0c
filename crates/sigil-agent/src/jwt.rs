//! JWT-SVIDs as the Workload API serves them: fetched from the server
//! through the core's server client ([`crate::server_api::ServerClient`]),
//! and cached per entry and audience, bounded in count and bytes, in all
//! and per caller uid.
//!
//! The cache is what stands in for the server while it is unreachable: a
//! cached token that has not expired is served instead of an error.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use sigil_proto::server::v1 as spb;
use sigil_types::{Attribute, Entry, EntryId, SpiffeId};
use tonic::Status;

use crate::core::Snapshot;
use crate::limits::CallerLimiter;
use crate::metrics::Metrics;
use crate::server_api::ServerClient;

/// Most JWT-SVIDs the agent caches (SPIRE's agent uses the same bound),
/// besides the byte budget; see `JwtCache` for what makes room.
pub const JWT_CACHE_LIMIT: usize = 1000;

/// What a cached JWT-SVID was minted for. Keyed by entry, not by SPIFFE ID
/// alone: two entries may share an ID but differ in what the token carries
/// (attributes become claims, TTLs differ), and a token minted for one must
/// never reach a caller entitled only to the other. The entry's revision
/// (and its identity-bearing fields) are in the key too, so a token minted
/// before any change to the entry (its selectors included: who may hold
/// the token) is not served after.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct JwtKey {
    entry_id: EntryId,
    /// The store revision of the entry's last write.
    revision: u64,
    spiffe_id: SpiffeId,
    attributes: Vec<Attribute>,
    ttl: u64,
    /// Sorted, without duplicates.
    audience: Vec<String>,
}

impl JwtKey {
    fn new(e: &Entry, audience: &[String]) -> Self {
        Self {
            entry_id: e.id.clone(),
            revision: e.revision,
            spiffe_id: e.spiffe_id.clone(),
            attributes: e.attributes.clone(),
            ttl: e.jwt_svid_ttl,
            audience: audience.to_vec(),
        }
    }
}

/// One cached JWT-SVID (no `Debug`: the token is a credential).
struct CachedJwt {
    token: String,
    expiry: SystemTime,
    refresh_at: SystemTime,
    /// The key ID in the token's header, to drop it if the key is tainted.
    kid: Option<String>,
    /// The uid whose request fetched it: its share of the cache pays for it.
    owner: u32,
    /// What it costs in the byte budget.
    bytes: usize,
    /// When it was cached, as the cache's insertion counter.
    seq: u64,
}

/// The `kid` in a JWT's header, if it has one; the token is not verified
/// (only for tokens this agent fetched itself).
fn jwt_kid(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
    value.get("kid")?.as_str().map(str::to_owned)
}

/// Bytes a cached token costs beyond its text and key strings: the map
/// slot, times and bookkeeping, rounded up.
const JWT_ENTRY_OVERHEAD: usize = 256;

/// Most JWT-SVIDs the requests of one uid may have in the cache: a quarter
/// of [`JWT_CACHE_LIMIT`], like the byte share by default.
pub const JWT_CACHE_LIMIT_PER_UID: usize = JWT_CACHE_LIMIT / 4;

/// What the cache holds of one uid's requests.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    tokens: usize,
    bytes: usize,
}

/// JWT-SVIDs by [`JwtKey`], bounded in count and bytes, in all and per uid
/// (the uid whose request fetched a token): a uid at its share makes room
/// among its own tokens, oldest first, so one uid cannot evict the tokens of
/// every other. When the whole cache is full, the oldest token of the uid
/// holding the most bytes goes.
struct JwtCache {
    tokens: HashMap<JwtKey, CachedJwt>,
    limit: usize,
    limit_per_uid: usize,
    max_bytes: usize,
    max_bytes_per_uid: usize,
    bytes: usize,
    held: HashMap<u32, Held>,
    /// Insertion counter: the age of a token.
    next_seq: u64,
    /// The snapshot the tokens were last checked against by
    /// [`JwtCache::drop_stale`], so that is done once per snapshot.
    checked: Weak<Snapshot>,
}

impl JwtCache {
    fn new(limit: usize) -> Self {
        let d = crate::limits::AgentLimits::default();
        Self::with_budget(
            limit,
            JWT_CACHE_LIMIT_PER_UID.min(limit),
            d.jwt_cache_bytes,
            d.jwt_cache_bytes_per_uid,
        )
    }

    fn with_budget(
        limit: usize,
        limit_per_uid: usize,
        max_bytes: usize,
        max_bytes_per_uid: usize,
    ) -> Self {
        Self {
            tokens: HashMap::new(),
            limit: limit.max(1),
            limit_per_uid: limit_per_uid.max(1),
            max_bytes: max_bytes.max(1),
            max_bytes_per_uid: max_bytes_per_uid.max(1),
            bytes: 0,
            held: HashMap::new(),
            next_seq: 0,
            checked: Weak::new(),
        }
    }

    /// The token for `key` if it is not yet due for refresh (half its life).
    fn fresh(&self, key: &JwtKey, now: SystemTime) -> Option<String> {
        self.tokens
            .get(key)
            .filter(|c| now < c.refresh_at && now < c.expiry)
            .map(|c| c.token.clone())
    }

    /// The token for `key` if it has not expired, due for refresh or not.
    fn valid(&self, key: &JwtKey, now: SystemTime) -> Option<&CachedJwt> {
        self.tokens.get(key).filter(|c| now < c.expiry)
    }

    /// What `token` under `key` costs in the byte budget.
    fn cost(key: &JwtKey, token: &str) -> usize {
        let attributes = key.attributes.len() * std::mem::size_of::<Attribute>();
        token.len()
            + key.audience.iter().map(String::len).sum::<usize>()
            + key.spiffe_id.as_str().len()
            + key.entry_id.as_str().len()
            + attributes
            + JWT_ENTRY_OVERHEAD
    }

    /// Caches a token fetched for a request of `owner`; drops expired ones,
    /// then makes room as the type's docs say. A token larger than a uid's
    /// whole share is not cached.
    fn insert(
        &mut self,
        key: JwtKey,
        token: String,
        expiry: SystemTime,
        now: SystemTime,
        owner: u32,
    ) {
        let life = expiry.duration_since(now).unwrap_or_default();
        self.remove(&key);
        self.retain(|c| c.expiry > now);
        let cost = Self::cost(&key, &token);
        if cost > self.max_bytes_per_uid {
            return;
        }
        loop {
            let mine = self.held.get(&owner).copied().unwrap_or_default();
            if mine.tokens < self.limit_per_uid && mine.bytes + cost <= self.max_bytes_per_uid {
                break;
            }
            if !self.evict_oldest_of(owner) {
                break;
            }
        }
        while self.tokens.len() >= self.limit || self.bytes + cost > self.max_bytes {
            let Some(largest) = self
                .held
                .iter()
                .max_by_key(|(uid, h)| (h.bytes, **uid))
                .map(|(uid, _)| *uid)
            else {
                break;
            };
            if !self.evict_oldest_of(largest) {
                break;
            }
        }
        self.next_seq += 1;
        let held = self.held.entry(owner).or_default();
        held.tokens += 1;
        held.bytes += cost;
        self.bytes += cost;
        self.tokens.insert(
            key,
            CachedJwt {
                kid: jwt_kid(&token),
                token,
                expiry,
                refresh_at: now + life / 2,
                owner,
                bytes: cost,
                seq: self.next_seq,
            },
        );
    }

    /// Drops the oldest token of `owner`; `false` if it holds none.
    fn evict_oldest_of(&mut self, owner: u32) -> bool {
        let oldest = self
            .tokens
            .iter()
            .filter(|(_, c)| c.owner == owner)
            .min_by_key(|(_, c)| c.seq)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => {
                self.remove(&k);
                true
            }
            None => {
                // The counts disagree with the tokens: nothing of this uid
                // is held, so forget its count rather than loop on it.
                self.held.remove(&owner);
                false
            }
        }
    }

    /// Keeps the tokens `keep` accepts, with the byte and uid counts.
    fn retain(&mut self, mut keep: impl FnMut(&CachedJwt) -> bool) {
        let gone: Vec<JwtKey> = self
            .tokens
            .iter()
            .filter(|(_, c)| !keep(c))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// Bytes the cache holds, as counted against its budget.
    fn bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, key: &JwtKey) {
        let Some(c) = self.tokens.remove(key) else {
            return;
        };
        self.bytes = self.bytes.saturating_sub(c.bytes);
        if let Some(h) = self.held.get_mut(&c.owner) {
            h.tokens = h.tokens.saturating_sub(1);
            h.bytes = h.bytes.saturating_sub(c.bytes);
            if h.tokens == 0 {
                self.held.remove(&c.owner);
            }
        }
    }

    /// Drops the tokens signed with a tainted key, so they are never served
    /// again (not even while the server is unreachable).
    fn drop_tainted(&mut self, tainted_kids: &std::collections::BTreeSet<String>) {
        if tainted_kids.is_empty() {
            return;
        }
        self.retain(|c| c.kid.as_ref().is_none_or(|k| !tainted_kids.contains(k)));
    }

    /// Drops the tokens of entries that `snap` no longer holds as they were
    /// when the token was minted (deleted, or changed since), so that no
    /// path, not even the unreachable-server fallback, can serve them again.
    fn drop_stale(&mut self, snap: &Arc<Snapshot>) {
        // The weak reference keeps the allocation, so an address seen here
        // is never reused by a later snapshot.
        if std::ptr::eq(self.checked.as_ptr(), Arc::as_ptr(snap)) {
            return;
        }
        self.checked = Arc::downgrade(snap);
        if self.tokens.is_empty() {
            return;
        }
        let current: HashSet<(&EntryId, u64)> =
            snap.entries.iter().map(|e| (&e.id, e.revision)).collect();
        let gone: Vec<JwtKey> = self
            .tokens
            .keys()
            .filter(|k| !current.contains(&(&k.entry_id, k.revision)))
            .cloned()
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// Why a JWT-SVID could not be obtained from the server.
#[derive(Debug)]
enum JwtFetchError {
    /// The server could not be reached (or is not answering); a cached
    /// token that is still valid may be served instead.
    Unreachable(String),
    /// The server answered and refused, with its status code; nothing
    /// cached is served.
    Refused(tonic::Code, String),
    /// The server was not asked: the caller's uid used up its share of the
    /// agent's calls to the server. A cached token that is still valid is
    /// served instead; otherwise the caller gets this status.
    OverShare(Status),
}

impl JwtFetchError {
    fn from_status(s: &tonic::Status) -> Self {
        use tonic::Code;
        match s.code() {
            // ResourceExhausted: the server's rate limit; not a verdict on the token.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::ResourceExhausted => Self::Unreachable(s.message().to_owned()),
            code => Self::Refused(code, s.message().to_owned()),
        }
    }
}

fn lock(cache: &Mutex<JwtCache>) -> MutexGuard<'_, JwtCache> {
    // The cache holds no invariant a panicking holder could break.
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cached token for `key` while it is fresh; otherwise one from `fetch`,
/// cached until half its life. If the server is unreachable, a cached token
/// that has not expired yet is served instead of an error.
async fn cached_or_fetch<F, Fut>(
    cache: &Mutex<JwtCache>,
    key: JwtKey,
    now: SystemTime,
    owner: u32,
    fetch: F,
) -> Result<String, Status>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<String, JwtFetchError>>,
{
    if let Some(token) = lock(cache).fresh(&key, now) {
        return Ok(token);
    }
    match fetch().await {
        Ok(token) => {
            if let Ok(info) = sigil_svid::jwt::parse_jwt_unverified(&token) {
                lock(cache).insert(key, token.clone(), info.expiry, now, owner);
            }
            Ok(token)
        }
        Err(JwtFetchError::Unreachable(why)) => {
            if let Some(c) = lock(cache).valid(&key, now) {
                tracing::info!(
                    spiffe_id = %key.spiffe_id,
                    entry = %key.entry_id,
                    error = %why,
                    expires = %humantime::format_rfc3339_seconds(c.expiry),
                    "server unreachable; serving the cached JWT-SVID until it expires"
                );
                return Ok(c.token.clone());
            }
            Err(Status::unavailable(format!(
                "could not fetch JWT-SVID: {why}"
            )))
        }
        Err(JwtFetchError::OverShare(status)) => match lock(cache).valid(&key, now) {
            Some(c) => Ok(c.token.clone()),
            None => Err(status),
        },
        Err(JwtFetchError::Refused(code, why)) => {
            lock(cache).remove(&key);
            // A request the server found wrong (too many audiences, say) or
            // not allowed stays so however often it is retried: the caller
            // gets that code, not `Unavailable`, which clients retry.
            let code = match code {
                tonic::Code::InvalidArgument
                | tonic::Code::OutOfRange
                | tonic::Code::PermissionDenied => code,
                _ => tonic::Code::Unavailable,
            };
            let why = sigil_types::text::clip(&why, sigil_types::text::MAX_ECHO_BYTES);
            Err(Status::new(
                code,
                format!("could not fetch JWT-SVID: {why}"),
            ))
        }
    }
}

/// Asks the server for a JWT-SVID.
type FetchJwt = Arc<
    dyn Fn(spb::NewJwtsvidRequest) -> Pin<Box<dyn Future<Output = Result<String, Status>> + Send>>
        + Send
        + Sync,
>;

/// The agent's JWT-SVIDs: the cache, and the server client it fetches
/// through. One per agent, shared by the Workload API's calls.
pub struct JwtSvids {
    cache: Mutex<JwtCache>,
    fetch: FetchJwt,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for JwtSvids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvids").finish_non_exhaustive()
    }
}

impl JwtSvids {
    /// JWT-SVIDs fetched through `server`, with the default cache budget.
    pub(crate) fn new<S: ServerClient + Clone>(server: S, metrics: Arc<Metrics>) -> Self {
        Self {
            cache: Mutex::new(JwtCache::new(JWT_CACHE_LIMIT)),
            fetch: Arc::new(move |req| {
                let server = server.clone();
                Box::pin(async move { server.new_jwtsvid(req).await })
            }),
            metrics,
        }
    }

    /// Bounds the cache to `bytes`, of which the requests of one uid may
    /// fill `bytes_per_uid` (`[agent.limits] jwt_cache_bytes`,
    /// `jwt_cache_bytes_per_uid`).
    pub fn with_budget(mut self, bytes: usize, bytes_per_uid: usize) -> Self {
        self.cache = Mutex::new(JwtCache::with_budget(
            JWT_CACHE_LIMIT,
            JWT_CACHE_LIMIT_PER_UID,
            bytes,
            bytes_per_uid,
        ));
        self
    }

    /// A cached JWT-SVID for this entry (as it is now in `snap`) and
    /// audiences when it is not past half its life; otherwise a new one
    /// from the server (or, while the server is unreachable, the cached one
    /// until it expires). A call that must reach the server takes a token
    /// of `uid`'s share of the agent's allowance there (`limiter`) first.
    pub(crate) async fn get(
        &self,
        snap: &Arc<Snapshot>,
        e: &Entry,
        audience: &[String],
        uid: u32,
        limiter: &CallerLimiter,
    ) -> Result<String, Status> {
        let key = JwtKey::new(e, audience);
        {
            let mut cache = lock(&self.cache);
            cache.drop_tainted(&snap.tainted.jwt_kids);
            cache.drop_stale(snap);
        }
        let request = spb::NewJwtsvidRequest {
            entry_id: e.id.to_string(),
            audience: audience.to_vec(),
        };
        let fetch = self.fetch.clone();
        let token = cached_or_fetch(&self.cache, key, SystemTime::now(), uid, || async move {
            limiter.server_call(uid).map_err(JwtFetchError::OverShare)?;
            fetch(request)
                .await
                .map_err(|s| JwtFetchError::from_status(&s))
        })
        .await;
        {
            let cache = lock(&self.cache);
            self.metrics.cached_jwt_svids.set(cache.len() as i64);
            self.metrics.jwt_cache_bytes.set(cache.bytes() as i64);
        }
        token
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use sigil_types::Selectors;

    use super::*;
    use crate::workload::tests::{domain, entry, snapshot};

    const HOUR: Duration = Duration::from_secs(3600);

    fn key(id: &str) -> JwtKey {
        let entry = Entry::new(
            id.parse().unwrap(),
            format!("spiffe://example.org/{id}").parse().unwrap(),
            "spiffe://example.org/agent".parse().unwrap(),
            Selectors::parse_all(["unix:uid:1"]).unwrap(),
        );
        JwtKey::new(&entry, &["api".to_owned()])
    }

    #[test]
    fn jwt_cache_keys_tell_apart_entries_sharing_a_spiffe_id() {
        let aud = ["api".to_owned()];
        let a = Entry::new(
            "a".parse().unwrap(),
            "spiffe://example.org/shared".parse().unwrap(),
            "spiffe://example.org/agent".parse().unwrap(),
            Selectors::parse_all(["unix:uid:1"]).unwrap(),
        );
        let base = JwtKey::new(&a, &aud);
        assert_eq!(base, JwtKey::new(&a.clone(), &aud));
        let mut other_entry = a.clone();
        other_entry.id = "b".parse().unwrap();
        let mut with_attributes = a.clone();
        with_attributes.attributes = vec![Attribute::Cluster];
        let mut renamed = a.clone();
        renamed.spiffe_id = "spiffe://example.org/renamed".parse().unwrap();
        let mut longer = a.clone();
        longer.jwt_svid_ttl = 600;
        // Any other write to the entry, such as new selectors.
        let mut rewritten = a.clone();
        rewritten.revision += 1;
        for changed in [other_entry, with_attributes, renamed, longer, rewritten] {
            assert_ne!(base, JwtKey::new(&changed, &aud), "{changed:?}");
        }
        assert_ne!(base, JwtKey::new(&a, &["other".to_owned()]));
    }

    #[test]
    fn cached_jwt_svids_of_a_tainted_key_are_dropped() {
        use sigil_svid::jwt::JwtAuthority;
        let now = SystemTime::now();
        let (old, new) = (
            JwtAuthority::generate(HOUR, now).unwrap(),
            JwtAuthority::generate(HOUR, now).unwrap(),
        );
        let sub = "spiffe://example.org/w".parse().unwrap();
        let aud = ["api".to_owned()];
        let mut c = JwtCache::new(10);
        for (k, ca) in [("old", &old), ("new", &new)] {
            let token = ca.sign(&sub, &aud, HOUR, now).unwrap();
            assert_eq!(jwt_kid(&token).as_deref(), Some(ca.kid()));
            c.insert(key(k), token, now + HOUR, now, 1);
        }
        c.drop_tainted(&std::collections::BTreeSet::new());
        assert_eq!(c.len(), 2);
        c.drop_tainted(&std::collections::BTreeSet::from([old.kid().to_owned()]));
        assert!(c.valid(&key("old"), now).is_none());
        assert!(c.fresh(&key("new"), now).is_some());
    }

    #[test]
    fn cached_jwt_svids_of_deleted_or_changed_entries_are_dropped() {
        let now = SystemTime::now();
        let own = domain("example.org");
        let kept = entry("kept", &[]);
        let changed = entry("changed", &[]);
        let mut c = JwtCache::new(10);
        for e in [&kept, &changed, &entry("deleted", &[])] {
            c.insert(
                JwtKey::new(e, &["api".to_owned()]),
                "t".into(),
                now + HOUR,
                now,
                1,
            );
        }
        let mut rewritten = (*changed).clone();
        rewritten.revision += 1;
        let snap = Arc::new(snapshot(&own, &[kept.clone(), Arc::new(rewritten)], &[]));
        c.drop_stale(&snap);
        assert_eq!(c.len(), 1);
        assert!(
            c.fresh(&JwtKey::new(&kept, &["api".to_owned()]), now)
                .is_some()
        );
        // Checked once per snapshot: a token cached since is kept until the next.
        c.insert(
            JwtKey::new(&changed, &["api".to_owned()]),
            "t".into(),
            now + HOUR,
            now,
            1,
        );
        c.drop_stale(&snap);
        assert_eq!(c.len(), 2);
        let next = Arc::new((*snap).clone());
        c.drop_stale(&next);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn jwt_cache_is_bounded_and_evicts_the_oldest() {
        let now = SystemTime::now();
        let mut c = JwtCache::new(3);
        c.insert(key("a"), "a".into(), now + 3 * HOUR, now, 1);
        c.insert(key("b"), "b".into(), now + HOUR, now, 1);
        c.insert(key("c"), "c".into(), now + 2 * HOUR, now, 1);
        c.insert(key("d"), "d".into(), now + 4 * HOUR, now, 1);
        assert_eq!(c.len(), 3);
        assert!(c.valid(&key("a"), now).is_none(), "oldest evicted");
        for k in ["b", "c", "d"] {
            assert!(c.fresh(&key(k), now).is_some(), "{k}");
        }
        // Replacing a held key evicts nothing, and makes it the newest.
        c.insert(key("b"), "b2".into(), now + HOUR, now, 1);
        assert_eq!(c.len(), 3);
        assert_eq!(c.fresh(&key("b"), now).unwrap(), "b2");
        c.insert(key("e"), "e".into(), now + 4 * HOUR, now, 1);
        assert!(c.valid(&key("c"), now).is_none(), "c was the oldest");
        // Expired tokens go first, without evicting valid ones.
        let later = now + HOUR + Duration::from_secs(1);
        c.insert(key("f"), "f".into(), later + HOUR, later, 1);
        assert_eq!(c.len(), 3, "b expired");
        assert!(c.valid(&key("d"), later).is_some());
        assert!(c.valid(&key("e"), later).is_some());
        // Fresh until half the life, valid until expiry.
        assert!(c.fresh(&key("f"), later + HOUR / 2).is_none());
        assert!(c.valid(&key("f"), later + HOUR / 2).is_some());
        assert!(c.valid(&key("f"), later + HOUR).is_none());
        assert_eq!(JwtCache::new(JWT_CACHE_LIMIT).limit, 1000);
    }

    /// A key whose audience makes its token `n` bytes larger.
    fn big_key(id: &str, aud: usize) -> JwtKey {
        let mut k = key(id);
        k.audience = vec!["x".repeat(aud)];
        k
    }

    #[test]
    fn one_uid_fills_only_its_share_of_the_jwt_cache() {
        let now = SystemTime::now();
        let exp = now + HOUR;
        // 10 KiB in all, 4 KiB per uid; each token costs about 1.3 KiB.
        let mut c = JwtCache::with_budget(100, 100, 10 * 1024, 4 * 1024);
        c.insert(key("victim"), "v".into(), exp, now, 2);
        for i in 0..50 {
            c.insert(big_key(&format!("k{i}"), 1000), "t".into(), exp, now, 1);
            assert!(c.held[&1].bytes <= 4 * 1024, "{i}");
            assert!(c.bytes() <= 10 * 1024, "{i}");
        }
        // uid 1 kept its newest tokens; uid 2's token was never touched.
        assert!(c.fresh(&big_key("k49", 1000), now).is_some());
        assert!(c.fresh(&big_key("k0", 1000), now).is_none());
        assert_eq!(c.fresh(&key("victim"), now).unwrap(), "v");
        // The count share too.
        let mut c = JwtCache::with_budget(100, 3, 1 << 20, 1 << 20);
        c.insert(key("victim"), "v".into(), exp, now, 2);
        for i in 0..10 {
            c.insert(key(&format!("k{i}")), "t".into(), exp, now, 1);
        }
        assert_eq!(c.held[&1].tokens, 3);
        assert!(c.fresh(&key("victim"), now).is_some());
        // A token larger than a uid's whole share is not cached.
        let mut c = JwtCache::with_budget(100, 100, 10 * 1024, 1024);
        c.insert(big_key("huge", 2000), "t".into(), exp, now, 1);
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn a_full_jwt_cache_evicts_from_the_largest_holder() {
        let now = SystemTime::now();
        let exp = now + HOUR;
        // Every key below has a two-letter ID, so all cost the same.
        let cost = JwtCache::cost(&big_key("a0", 1000), "t");
        // Room for 5 tokens, 3 per uid.
        let mut c = JwtCache::with_budget(100, 100, 5 * cost, 3 * cost);
        c.insert(big_key("a0", 1000), "t".into(), exp, now, 1);
        for i in 0..3 {
            c.insert(big_key(&format!("b{i}"), 1000), "t".into(), exp, now, 2);
        }
        c.insert(big_key("c0", 1000), "t".into(), exp, now, 3);
        assert_eq!(c.len(), 5);
        // Full: uid 3's next token takes room from uid 2 (the largest),
        // oldest first; uid 1's older token stays.
        c.insert(big_key("c1", 1000), "t".into(), exp, now, 3);
        assert!(c.fresh(&big_key("b0", 1000), now).is_none());
        assert!(c.fresh(&big_key("a0", 1000), now).is_some());
        assert_eq!(c.bytes(), 5 * cost);
        // Every removal path keeps the counts.
        c.drop_stale(&Arc::new(snapshot(&domain("example.org"), &[], &[])));
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert!(c.held.is_empty());
    }

    /// A 100 s token for `key("w")` signed now, and an empty cache.
    fn token_for_w() -> (SystemTime, Duration, String, Mutex<JwtCache>) {
        let own = domain("example.org");
        let now = SystemTime::now();
        let ttl = Duration::from_secs(100);
        let token = own
            .jwt
            .sign(&key("w").spiffe_id, &key("w").audience, ttl, now)
            .unwrap();
        (now, ttl, token, Mutex::new(JwtCache::new(10)))
    }

    #[tokio::test]
    async fn cached_jwt_svids_are_served_while_the_server_is_unreachable() {
        let (now, ttl, token, cache) = token_for_w();
        let calls = AtomicUsize::new(0);
        let fetch = |r: Result<String, JwtFetchError>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { r }
        };

        let got = cached_or_fetch(&cache, key("w"), now, 1, || fetch(Ok(token.clone())))
            .await
            .unwrap();
        assert_eq!(got, token);
        // Before half-life: from the cache, the server is not asked.
        let got = cached_or_fetch(&cache, key("w"), now + ttl / 4, 1, || {
            fetch(Err(JwtFetchError::Unreachable("down".into())))
        })
        .await
        .unwrap();
        assert_eq!(
            (got.as_str(), calls.load(Ordering::SeqCst)),
            (token.as_str(), 1)
        );
        // Due for refresh but the server is unreachable: the cached token,
        // still valid, is served.
        let got = cached_or_fetch(&cache, key("w"), now + ttl * 3 / 4, 1, || {
            fetch(Err(JwtFetchError::Unreachable("down".into())))
        })
        .await
        .unwrap();
        assert_eq!(
            (got.as_str(), calls.load(Ordering::SeqCst)),
            (token.as_str(), 2)
        );
        // Once it expired, the failure is the caller's.
        let err = cached_or_fetch(
            &cache,
            key("w"),
            now + ttl + Duration::from_secs(1),
            1,
            || fetch(Err(JwtFetchError::Unreachable("down".into()))),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("could not fetch JWT-SVID: down"));
        // A server that refuses (say, the entry is gone) is not overridden by
        // the cache, and the cached token is dropped.
        let err = cached_or_fetch(&cache, key("w"), now + ttl / 2, 1, || {
            fetch(Err(JwtFetchError::Refused(
                tonic::Code::PermissionDenied,
                "entry not authorized".into(),
            )))
        })
        .await
        .unwrap_err();
        assert!(err.message().contains("entry not authorized"));
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(lock(&cache).valid(&key("w"), now).is_none());
        // A bad request keeps its code, so clients do not retry it.
        let err = cached_or_fetch(&cache, key("w"), now, 1, || {
            fetch(Err(JwtFetchError::Refused(
                tonic::Code::InvalidArgument,
                "at most 32 audiences".into(),
            )))
        })
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // Anything else the server says is the server's trouble.
        let err = cached_or_fetch(&cache, key("w"), now, 1, || {
            fetch(Err(JwtFetchError::Refused(
                tonic::Code::Internal,
                "x".into(),
            )))
        })
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_uid_over_its_server_share_gets_a_valid_cached_token_or_its_refusal() {
        let (now, ttl, token, cache) = token_for_w();
        let over = || async {
            Err(JwtFetchError::OverShare(Status::resource_exhausted(
                "share used",
            )))
        };
        let err = cached_or_fetch(&cache, key("w"), now, 1, over)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.message(), "share used");
        let t = token.clone();
        cached_or_fetch(&cache, key("w"), now, 1, || async move { Ok(t) })
            .await
            .unwrap();
        // Due for refresh, but the uid may not ask the server: the token,
        // still valid, is served.
        let got = cached_or_fetch(&cache, key("w"), now + ttl * 3 / 4, 1, over)
            .await
            .unwrap();
        assert_eq!(got, token);
    }

    #[test]
    fn transport_failures_count_as_unreachable_and_refusals_do_not() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Unknown,
        ] {
            assert!(matches!(
                JwtFetchError::from_status(&Status::new(code, "x")),
                JwtFetchError::Unreachable(_)
            ));
        }
        for code in [
            tonic::Code::PermissionDenied,
            tonic::Code::NotFound,
            tonic::Code::InvalidArgument,
        ] {
            assert!(matches!(
                JwtFetchError::from_status(&Status::new(code, "x")),
                JwtFetchError::Refused(c, _) if c == code
            ));
        }
    }
}
