//! A keyed token-bucket rate limiter with bounded memory, shared by the
//! agent's Workload API (keyed by calling uid) and the server's agent API
//! (keyed by agent SPIFFE ID or source address).
//!
//! Each key has a bucket of up to `burst` tokens, refilled at `per_second`;
//! a call takes one token or is refused. At most `max_keys` buckets are kept:
//! when a new key arrives at the cap, buckets that have refilled completely
//! (idle callers, who lose nothing by being forgotten) are dropped first, then
//! the least recently used one. The clock is passed in ([`KeyedLimiter::check_at`]),
//! so the arithmetic is tested without waiting.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The gRPC metadata key of a rate-limit refusal's hint: milliseconds until
/// the limit admits a call again. The server sets it; agents wait at least
/// that long before trying again.
pub const RETRY_AFTER_KEY: &str = "retry-after-ms";

/// A sustained rate and the burst allowed above it. Both are at least 1
/// (configuration validates this; [`Rate::new`] clamps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: u32,
    /// Most tokens a bucket holds: how many calls may come at once.
    pub burst: u32,
}

impl Rate {
    /// A rate of `per_second` with bursts of up to `burst` calls (each at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: per_second.max(1),
            burst: burst.max(1),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/s, burst {}", self.per_second, self.burst)
    }
}

/// A refused call: the key's bucket is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// The limit that was exceeded.
    pub rate: Rate,
    /// How long until the bucket holds a token again.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// The tokens this bucket holds at `now` (not stored).
    fn level(&self, rate: Rate, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * f64::from(rate.per_second)).min(f64::from(rate.burst))
    }
}

/// Token buckets by key; see the [module](self) documentation.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A limiter giving every key `rate`, tracking at most `max_keys` keys
    /// (at least 1).
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The rate every key gets.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes a token for `key` now.
    pub fn check(&self, key: &K) -> Result<(), Exceeded> {
        self.check_at(key, Instant::now())
    }

    /// Takes a token for `key` at `now`, or says how long until one is there.
    pub fn check_at(&self, key: &K, now: Instant) -> Result<(), Exceeded> {
        let rate = self.rate;
        let mut buckets = self.lock();
        let level = match buckets.get(key) {
            Some(b) => b.level(rate, now),
            None => {
                if buckets.len() >= self.max_keys {
                    evict(&mut buckets, rate, self.max_keys, now);
                }
                f64::from(rate.burst)
            }
        };
        if level >= 1.0 {
            buckets.insert(
                key.clone(),
                Bucket {
                    tokens: level - 1.0,
                    updated: now,
                },
            );
            Ok(())
        } else {
            buckets.insert(
                key.clone(),
                Bucket {
                    tokens: level,
                    updated: now,
                },
            );
            let wait = (1.0 - level) / f64::from(rate.per_second);
            Err(Exceeded {
                rate,
                retry_after: Duration::try_from_secs_f64(wait).unwrap_or_default(),
            })
        }
    }

    /// How many keys are tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Bucket>> {
        // Buckets hold no invariant a panicking holder could break.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Makes room for one more key: drops every full bucket (an idle caller's
/// bucket carries no state), and if none was full, the least recently used.
fn evict<K: Hash + Eq + Clone>(
    buckets: &mut HashMap<K, Bucket>,
    rate: Rate,
    max_keys: usize,
    now: Instant,
) {
    let full = f64::from(rate.burst);
    buckets.retain(|_, b| b.level(rate, now) < full);
    while buckets.len() >= max_keys {
        let Some(oldest) = buckets
            .iter()
            .min_by_key(|(_, b)| b.updated)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        buckets.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn burst_then_refusal_then_refill() {
        let l = KeyedLimiter::new(Rate::new(10, 3), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check_at(&"a", t0).unwrap();
        }
        let e = l.check_at(&"a", t0).unwrap_err();
        assert_eq!(e.rate, Rate::new(10, 3));
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_millis(100));
        // Another key is not affected.
        l.check_at(&"b", t0).unwrap();
        // One token after 100 ms at 10/s, not two.
        let t1 = t0 + Duration::from_millis(100);
        l.check_at(&"a", t1).unwrap();
        assert!(l.check_at(&"a", t1).is_err());
        // Never more than the burst, however long the pause.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            l.check_at(&"a", t2).unwrap();
        }
        assert!(l.check_at(&"a", t2).is_err());
    }

    #[test]
    fn a_caller_under_the_rate_is_never_refused() {
        let l = KeyedLimiter::new(Rate::new(5, 1), 10);
        let t0 = Instant::now();
        for i in 0..1000u64 {
            l.check_at(&1u32, t0 + Duration::from_millis(200 * i))
                .unwrap();
        }
    }

    #[test]
    fn memory_is_bounded_and_idle_keys_go_first() {
        let l = KeyedLimiter::new(Rate::new(1, 2), 4);
        let t0 = Instant::now();
        // Key 0 is busy (bucket not full); keys 1..4 used once.
        l.check_at(&0u32, t0).unwrap();
        l.check_at(&0u32, t0).unwrap();
        for k in 1..4u32 {
            l.check_at(&k, t0).unwrap();
        }
        assert_eq!(l.tracked(), 4);
        // 1.5 s later keys 1..3 are full again (idle), key 0 is not: a new
        // key evicts the idle ones and keeps key 0's empty-ish bucket.
        let t1 = t0 + Duration::from_millis(1500);
        l.check_at(&100u32, t1).unwrap();
        assert_eq!(l.tracked(), 2);
        l.check_at(&0u32, t1).unwrap();
        assert!(l.check_at(&0u32, t1).is_err(), "key 0 kept its state");
        // With no idle key, the least recently used makes room.
        for k in 200..210u32 {
            l.check_at(&k, t1).unwrap();
            assert!(l.tracked() <= 4);
        }
    }

    #[test]
    fn rate_is_clamped_and_displayed() {
        assert_eq!(Rate::new(0, 0), Rate::new(1, 1));
        assert_eq!(Rate::new(5, 10).to_string(), "5/s, burst 10");
    }
}
