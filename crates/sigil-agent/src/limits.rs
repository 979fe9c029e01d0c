//! Bounds on what callers of the agent's socket can make it do
//! (`[agent.limits]`): request size, per-caller rate limits, connection and
//! stream caps, idle and request timeouts, each uid's share of the agent's
//! allowance at the server and of the JWT-SVID cache. The defaults and what a caller sees when it hits
//! each limit are listed in docs/security.md ("Limits").
//!
//! Rate limits are kept per calling uid, from the kernel's peer credentials.
//! A uid is what a process cannot multiply: a per-PID limit would be evaded
//! by forking. The price is that processes of one uid share a budget, which
//! is why the defaults are generous; the limits are there to stop a caller
//! from monopolizing the agent, not to ration normal use.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Deserialize;
use sigil_types::config::{ConfigError, require_positive};
use sigil_types::duration::serde_human;
use sigil_types::ratelimit::{Exceeded, KeyedLimiter, Rate};
use sigil_types::slots::{KeyedSlots, Slot};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::{Request, Status};

use crate::peer::peer_of;

/// Most callers (uids) each rate limiter remembers; idle ones are forgotten first.
pub const MAX_TRACKED_CALLERS: usize = 10_000;

/// Most open connections whose caller's uid the kernel would not give: a
/// small bucket of their own, outside `max_connections`, so that they can
/// never take the slots identified callers need. The kernel records the
/// uid of every Unix-socket connection, so this is for the unexpected only.
pub const MAX_UNIDENTIFIED_CONNECTIONS: usize = 16;

/// Keys of `[agent.limits]`, as written by users; every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct LimitsSection {
    max_request_bytes: usize,
    max_connections: usize,
    max_connections_per_uid: usize,
    #[serde(with = "serde_human")]
    request_timeout: Duration,
    max_streams_per_connection: u32,
    calls_per_second: u32,
    call_burst: u32,
    streams_per_second: u32,
    stream_burst: u32,
    #[serde(with = "serde_human")]
    idle_timeout: Duration,
    max_streams_per_uid: Option<usize>,
    server_calls_per_second: u32,
    server_call_burst: u32,
    jwt_cache_bytes: usize,
    jwt_cache_bytes_per_uid: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let d = AgentLimits::default();
        Self {
            max_request_bytes: d.max_request_bytes,
            max_connections: d.max_connections,
            max_connections_per_uid: d.max_connections_per_uid,
            request_timeout: d.request_timeout,
            max_streams_per_connection: d.max_streams_per_connection,
            calls_per_second: d.calls.per_second,
            call_burst: d.calls.burst,
            streams_per_second: d.streams.per_second,
            stream_burst: d.streams.burst,
            idle_timeout: d.idle_timeout,
            max_streams_per_uid: d.max_streams_per_uid,
            server_calls_per_second: d.server_calls.per_second,
            server_call_burst: d.server_calls.burst,
            jwt_cache_bytes: d.jwt_cache_bytes,
            jwt_cache_bytes_per_uid: d.jwt_cache_bytes_per_uid,
        }
    }
}

/// The validated `[agent.limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLimits {
    /// Largest Workload API request message (64 KiB); SDS requests have
    /// their own cap, [`crate::sds::MAX_REQUEST_BYTES`].
    pub max_request_bytes: usize,
    /// Most open connections on the socket (4096); a connection beyond it is
    /// closed at once.
    pub max_connections: usize,
    /// Most open connections of one uid (2048, half of `max_connections`),
    /// so that one local user cannot take every slot from the others. Kept
    /// generous because many workloads often share a uid (sidecars, pods
    /// running as root).
    pub max_connections_per_uid: usize,
    /// Deadline of a call's answer (30s); a stream, once answered, is not cut.
    pub request_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` per connection (1000).
    pub max_streams_per_connection: u32,
    /// Unary calls per uid: FetchJWTSVID, ValidateJWTSVID, SDS FetchSecrets
    /// (200/s, burst 2000).
    pub calls: Rate,
    /// Streams opened per uid: FetchX509SVID, FetchX509Bundles,
    /// FetchJWTBundles, SDS StreamSecrets (100/s, burst 2000).
    pub streams: Rate,
    /// A connection with no open stream for this long is closed (5 min), so
    /// that silent sockets do not pin open files and connection slots.
    /// Streams are never closed for being quiet.
    pub idle_timeout: Duration,
    /// Most streams one uid holds open at once, Workload API and SDS
    /// together; `None`: twice `max_connections_per_uid` (see
    /// [`AgentLimits::streams_per_uid`]).
    pub max_streams_per_uid: Option<usize>,
    /// Calls one uid's requests may make to the server (a JWT-SVID minted
    /// for a request the cache cannot answer): 20/s, burst 200, a fifth of
    /// the server's default per-agent allowance, so that one uid is refused
    /// long before it uses up the allowance every uid shares.
    pub server_calls: Rate,
    /// Bytes of JWT-SVIDs (with their keys) the cache holds (16 MiB).
    pub jwt_cache_bytes: usize,
    /// Bytes of that cache one uid's requests may fill (4 MiB), so that one
    /// uid cannot evict the tokens of every other.
    pub jwt_cache_bytes_per_uid: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: 64 * 1024,
            max_connections: 4096,
            max_connections_per_uid: 2048,
            request_timeout: Duration::from_secs(30),
            max_streams_per_connection: 1000,
            calls: Rate::new(200, 2000),
            streams: Rate::new(100, 2000),
            idle_timeout: Duration::from_secs(300),
            max_streams_per_uid: None,
            server_calls: Rate::new(20, 200),
            jwt_cache_bytes: 16 * 1024 * 1024,
            jwt_cache_bytes_per_uid: 4 * 1024 * 1024,
        }
    }
}

/// Open files one Workload API connection holds: the socket and the
/// caller's pidfd.
const FDS_PER_CONNECTION: u64 = 2;
/// Open files kept free for everything else: the agent's own files and
/// server connection, the 16 slots of callers without a uid, a burst of
/// connections accepted and closed at once.
const FD_RESERVE: u64 = 256;

/// Raises this process's soft limit on open files to its hard limit (any
/// process may) and returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(soft.max(hard))
}

impl AgentLimits {
    /// The cap on one uid's open streams: `max_streams_per_uid`, or twice
    /// `max_connections_per_uid` (a workload commonly holds an X509-SVID
    /// and a bundle stream on its connection), so that it follows the
    /// connection caps when [`Self::fit_to_open_files`] lowers them.
    pub fn streams_per_uid(&self) -> usize {
        self.max_streams_per_uid
            .unwrap_or_else(|| self.max_connections_per_uid.saturating_mul(2))
            .max(1)
    }

    /// Lowers the connection caps, if need be, so that connections at the
    /// caps cannot use up `open_files` (then `accept()` would fail for every
    /// caller, not just the one flooding): `max_connections` to what the
    /// limit holds after a reserve, and `max_connections_per_uid` to at most
    /// half of that, so other uids keep room. Says what changed, if anything.
    pub fn fit_to_open_files(&mut self, open_files: u64) -> Option<String> {
        let room = open_files.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION;
        let room = usize::try_from(room).unwrap_or(usize::MAX).max(2);
        if self.max_connections <= room {
            return None;
        }
        let before = (self.max_connections, self.max_connections_per_uid);
        self.max_connections = room;
        self.max_connections_per_uid = self.max_connections_per_uid.min(room / 2);
        Some(format!(
            "the open-files limit ({open_files}) cannot hold max_connections = {} \
             (two files each, plus {FD_RESERVE} in reserve): serving at most {} connections, \
             {} per uid (was {}); raise the limit (LimitNOFILE=, ulimit -n) to serve more",
            before.0, self.max_connections, self.max_connections_per_uid, before.1
        ))
    }
}

/// Validates `[agent.limits]`: every value must be positive, and one uid's
/// share of the JWT cache no larger than the cache.
pub(crate) fn parse(
    s: LimitsSection,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<AgentLimits, ConfigError> {
    require_positive(
        &[
            (
                "agent.limits.max_request_bytes",
                s.max_request_bytes as u128,
            ),
            ("agent.limits.max_connections", s.max_connections as u128),
            (
                "agent.limits.max_connections_per_uid",
                s.max_connections_per_uid as u128,
            ),
            (
                "agent.limits.max_streams_per_connection",
                u128::from(s.max_streams_per_connection),
            ),
            (
                "agent.limits.calls_per_second",
                u128::from(s.calls_per_second),
            ),
            ("agent.limits.call_burst", u128::from(s.call_burst)),
            (
                "agent.limits.streams_per_second",
                u128::from(s.streams_per_second),
            ),
            ("agent.limits.stream_burst", u128::from(s.stream_burst)),
            ("agent.limits.request_timeout", s.request_timeout.as_nanos()),
            ("agent.limits.idle_timeout", s.idle_timeout.as_nanos()),
            (
                "agent.limits.max_streams_per_uid",
                s.max_streams_per_uid.map_or(1, |n| n as u128),
            ),
            (
                "agent.limits.server_calls_per_second",
                u128::from(s.server_calls_per_second),
            ),
            (
                "agent.limits.server_call_burst",
                u128::from(s.server_call_burst),
            ),
            ("agent.limits.jwt_cache_bytes", s.jwt_cache_bytes as u128),
            (
                "agent.limits.jwt_cache_bytes_per_uid",
                s.jwt_cache_bytes_per_uid as u128,
            ),
        ],
        invalid,
    )?;
    if s.jwt_cache_bytes_per_uid > s.jwt_cache_bytes {
        return Err(invalid(
            "agent.limits.jwt_cache_bytes_per_uid",
            format!(
                "{} is more than the whole cache (jwt_cache_bytes = {})",
                s.jwt_cache_bytes_per_uid, s.jwt_cache_bytes
            ),
        ));
    }
    Ok(AgentLimits {
        max_request_bytes: s.max_request_bytes,
        max_connections: s.max_connections,
        max_connections_per_uid: s.max_connections_per_uid,
        request_timeout: s.request_timeout,
        max_streams_per_connection: s.max_streams_per_connection,
        calls: Rate::new(s.calls_per_second, s.call_burst),
        streams: Rate::new(s.streams_per_second, s.stream_burst),
        idle_timeout: s.idle_timeout,
        max_streams_per_uid: s.max_streams_per_uid,
        server_calls: Rate::new(s.server_calls_per_second, s.server_call_burst),
        jwt_cache_bytes: s.jwt_cache_bytes,
        jwt_cache_bytes_per_uid: s.jwt_cache_bytes_per_uid,
    })
}

/// The per-uid limits of the Workload API and SDS, shared by both: call
/// and stream rates, open streams, and calls that reach the server.
#[derive(Debug)]
pub struct CallerLimiter {
    calls: KeyedLimiter<u32>,
    streams: KeyedLimiter<u32>,
    server_calls: KeyedLimiter<u32>,
    open_streams: Arc<KeyedSlots<u32>>,
    max_open_streams: usize,
}

impl Default for CallerLimiter {
    fn default() -> Self {
        Self::new(&AgentLimits::default())
    }
}

impl CallerLimiter {
    /// Limiters with the configured rates.
    pub fn new(limits: &AgentLimits) -> Self {
        Self {
            calls: KeyedLimiter::new(limits.calls, MAX_TRACKED_CALLERS),
            streams: KeyedLimiter::new(limits.streams, MAX_TRACKED_CALLERS),
            server_calls: KeyedLimiter::new(limits.server_calls, MAX_TRACKED_CALLERS),
            open_streams: KeyedSlots::new(limits.streams_per_uid()),
            max_open_streams: limits.streams_per_uid(),
        }
    }

    /// Takes a unary-call token of the caller's uid, or `ResourceExhausted`.
    pub fn call<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.take(&self.calls, "calls", req)
    }

    /// Takes a stream-opening token and an open-stream slot of the
    /// caller's uid, or `ResourceExhausted` naming the limit hit. The slot
    /// is held by the returned guard: keep it for the stream's life.
    pub fn stream<T>(&self, req: &Request<T>) -> Result<StreamSlot, Status> {
        self.take(&self.streams, "streams opened", req)?;
        let Ok(peer) = peer_of(req) else {
            return Ok(StreamSlot { _slot: None });
        };
        match self.open_streams.try_acquire(peer.uid) {
            Some(slot) => Ok(StreamSlot { _slot: Some(slot) }),
            None => Err(Status::resource_exhausted(format!(
                "too many open streams: uid {} holds {} Workload API and SDS streams \
                 (max_streams_per_uid in [agent.limits]); close one to open another",
                peer.uid, self.max_open_streams
            ))),
        }
    }

    /// Takes a token of `uid`'s share of the agent's allowance at the
    /// server, or `ResourceExhausted`: one uid is refused here before its
    /// calls use up the allowance the server gives the whole agent.
    pub fn server_call(&self, uid: u32) -> Result<(), Status> {
        self.server_calls.check(&uid).map_err(|e| {
            Status::resource_exhausted(format!(
                "rate limit exceeded: uid {uid} used its share of the agent's calls to the \
                 server (server_calls_per_second, server_call_burst in [agent.limits]: {}); \
                 retry in {} ms",
                e.rate,
                e.retry_after.as_millis().max(1)
            ))
        })
    }

    fn take<T>(
        &self,
        limiter: &KeyedLimiter<u32>,
        what: &str,
        req: &Request<T>,
    ) -> Result<(), Status> {
        // A caller without credentials is refused by attestation right after.
        let Ok(peer) = peer_of(req) else {
            return Ok(());
        };
        limiter
            .check(&peer.uid)
            .map_err(|e| exhausted(what, peer.uid, e))
    }
}

/// One open stream of a uid, counted against `max_streams_per_uid` until
/// dropped; empty for a caller without credentials (refused right after).
#[derive(Debug)]
#[must_use = "the stream's slot is given back when this is dropped"]
pub struct StreamSlot {
    _slot: Option<Slot<u32>>,
}

/// `ResourceExhausted` naming the limit that was hit.
fn exhausted(what: &str, uid: u32, e: Exceeded) -> Status {
    Status::resource_exhausted(format!(
        "rate limit exceeded: {what} by uid {uid} (limit {}); retry in {} ms",
        e.rate,
        e.retry_after.as_millis().max(1)
    ))
}

/// Who opened a connection, for the per-caller cap of [`incoming`].
pub trait Caller {
    /// The uid of the process that connected, as the kernel recorded it;
    /// `None` when the kernel would not say (such connections share the
    /// small [`MAX_UNIDENTIFIED_CONNECTIONS`] bucket).
    fn caller_uid(&self) -> Option<u32>;
}

impl Caller for crate::peer::PeerStream {
    fn caller_uid(&self) -> Option<u32> {
        // Not the attested peer: a caller that exited right after
        // connecting cannot be attested, but its uid is still known, and
        // counting it elsewhere would let one user take more than its share.
        self.kernel_uid()
    }
}

/// Caps the open connections of an accept stream, in all and per caller
/// (uid): each connection holds its slots until it is dropped, and one
/// accepted beyond either cap is closed at once, so open connections are
/// never disturbed by a flood, and a flood by one user leaves room for the
/// others. Connections without a uid only share
/// [`MAX_UNIDENTIFIED_CONNECTIONS`] slots of their own.
pub fn incoming<S, C>(inner: S, max_connections: usize, max_per_caller: usize) -> LimitedIncoming<S>
where
    S: Stream<Item = io::Result<C>>,
{
    LimitedIncoming {
        inner,
        slots: Arc::new(Semaphore::new(
            max_connections.clamp(1, Semaphore::MAX_PERMITS),
        )),
        per_caller: KeyedSlots::new(max_per_caller),
        unidentified: Arc::new(Semaphore::new(MAX_UNIDENTIFIED_CONNECTIONS)),
    }
}

/// See [`incoming`].
#[derive(Debug)]
pub struct LimitedIncoming<S> {
    inner: S,
    slots: Arc<Semaphore>,
    per_caller: Arc<KeyedSlots<u32>>,
    unidentified: Arc<Semaphore>,
}

impl<S> LimitedIncoming<S> {
    /// The slots a new connection of `uid` needs, or `None` (close it).
    fn admit(&self, uid: Option<u32>) -> Option<ConnSlots> {
        let Some(uid) = uid else {
            let permit = self.unidentified.clone().try_acquire_owned().ok();
            if permit.is_none() {
                tracing::debug!(
                    "limit of connections without a uid reached; closing the new connection"
                );
            }
            return permit.map(|p| ConnSlots::Unidentified { _permit: p });
        };
        let Some(caller) = self.per_caller.try_acquire(uid) else {
            tracing::debug!(
                uid,
                "per-uid connection limit reached; closing the new connection"
            );
            return None;
        };
        match self.slots.clone().try_acquire_owned() {
            Ok(total) => Some(ConnSlots::Caller {
                _total: total,
                _caller: caller,
            }),
            Err(_) => {
                tracing::debug!("connection limit reached; closing the new connection");
                None
            }
        }
    }
}

/// What an admitted connection holds until it is dropped.
#[derive(Debug)]
enum ConnSlots {
    /// A slot of `max_connections` and one of its uid.
    Caller {
        _total: OwnedSemaphorePermit,
        _caller: Slot<u32>,
    },
    /// A slot of the unidentified bucket.
    Unidentified { _permit: OwnedSemaphorePermit },
}

impl<S, C> Stream for LimitedIncoming<S>
where
    S: Stream<Item = io::Result<C>> + Unpin,
    C: Caller,
{
    type Item = io::Result<Limited<C>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(conn))) => {
                    if let Some(slots) = this.admit(conn.caller_uid()) {
                        return Poll::Ready(Some(Ok(Limited {
                            inner: conn,
                            _slots: slots,
                        })));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A connection holding its slots of [`incoming`]'s caps until it is dropped.
#[derive(Debug)]
pub struct Limited<C> {
    inner: C,
    _slots: ConnSlots,
}

impl<C: Connected> Connected for Limited<C> {
    type ConnectInfo = C::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

crate::peer::delegate_io!(
    [C] Limited<C>;
    read: [C: AsyncRead + Unpin];
    write: [C: AsyncWrite + Unpin]
);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::AgentConfig;

    #[test]
    fn connection_caps_fit_the_open_files_limit() {
        // Plenty of files: nothing changes.
        let mut l = AgentLimits::default();
        assert_eq!(l.fit_to_open_files(1 << 20), None);
        assert_eq!((l.max_connections, l.max_connections_per_uid), (4096, 2048));
        // The common 1024: (1024 - 256) / 2 connections, half of them per uid.
        let mut l = AgentLimits::default();
        let said = l.fit_to_open_files(1024).unwrap();
        assert_eq!((l.max_connections, l.max_connections_per_uid), (384, 192));
        assert!(said.contains("1024") && said.contains("384"), "{said}");
        // A per-uid cap already below half stays.
        let mut l = AgentLimits {
            max_connections_per_uid: 10,
            ..Default::default()
        };
        l.fit_to_open_files(1024).unwrap();
        assert_eq!(l.max_connections_per_uid, 10);
        // Absurdly low limits still leave a connection or two.
        let mut l = AgentLimits::default();
        l.fit_to_open_files(10).unwrap();
        assert_eq!((l.max_connections, l.max_connections_per_uid), (2, 1));
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit};
        let now = raise_open_files_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert_eq!(now, hard);
    }

    const HEAD: &str =
        "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"localhost:8081\"\n";

    #[test]
    fn defaults_and_every_key() {
        let c = AgentConfig::parse(HEAD, None).unwrap();
        assert_eq!(c.limits, AgentLimits::default());
        let c = AgentConfig::parse(
            &format!(
                "{HEAD}[agent.limits]\nmax_request_bytes = 1024\nmax_connections = 8\n\
                 max_connections_per_uid = 7\nrequest_timeout = \"2s\"\nmax_streams_per_connection = 10\n\
                 calls_per_second = 3\ncall_burst = 4\nstreams_per_second = 5\nstream_burst = 6\n\
                 idle_timeout = \"1m\"\nmax_streams_per_uid = 9\nserver_calls_per_second = 11\n\
                 server_call_burst = 12\njwt_cache_bytes = 4096\njwt_cache_bytes_per_uid = 4096\n"
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            c.limits,
            AgentLimits {
                max_request_bytes: 1024,
                max_connections: 8,
                max_connections_per_uid: 7,
                request_timeout: Duration::from_secs(2),
                max_streams_per_connection: 10,
                calls: Rate::new(3, 4),
                streams: Rate::new(5, 6),
                idle_timeout: Duration::from_secs(60),
                max_streams_per_uid: Some(9),
                server_calls: Rate::new(11, 12),
                jwt_cache_bytes: 4096,
                jwt_cache_bytes_per_uid: 4096,
            }
        );
        assert_eq!(c.limits.streams_per_uid(), 9);
        // Unset, the stream cap follows the per-uid connection cap, also
        // when that is lowered to fit the open-files limit.
        let mut d = AgentLimits::default();
        assert_eq!(d.streams_per_uid(), 4096);
        d.fit_to_open_files(1024);
        assert_eq!(d.streams_per_uid(), 2 * 192);
    }

    /// A connection of the test's stream, with the uid it claims.
    struct Fake(Option<u32>);

    impl Caller for Fake {
        fn caller_uid(&self) -> Option<u32> {
            self.0
        }
    }

    #[tokio::test]
    async fn connections_without_a_uid_take_no_slot_of_the_others() {
        use tokio_stream::StreamExt;
        let unknown = (0..MAX_UNIDENTIFIED_CONNECTIONS + 5).map(|_| Ok(Fake(None)));
        let known = (0..3).map(|_| Ok(Fake(Some(0))));
        let mut admitted = Vec::new();
        let mut conns = incoming(tokio_stream::iter(unknown.chain(known)), 2, 2);
        while let Some(c) = conns.next().await {
            admitted.push(c.unwrap());
        }
        let without_uid = admitted.iter().filter(|c| c.inner.0.is_none()).count();
        assert_eq!(without_uid, MAX_UNIDENTIFIED_CONNECTIONS);
        // uid 0 still gets its full share of max_connections.
        assert_eq!(admitted.len() - without_uid, 2);
    }

    #[test]
    fn zero_and_unknown_keys_are_named() {
        for key in [
            "max_request_bytes = 0",
            "max_connections = 0",
            "max_connections_per_uid = 0",
            "request_timeout = \"0s\"",
            "max_streams_per_connection = 0",
            "calls_per_second = 0",
            "call_burst = 0",
            "streams_per_second = 0",
            "stream_burst = 0",
            "idle_timeout = \"0s\"",
            "max_streams_per_uid = 0",
            "server_calls_per_second = 0",
            "server_call_burst = 0",
            "jwt_cache_bytes = 0",
            "jwt_cache_bytes_per_uid = 0",
            "jwt_cache_bytes_per_uid = 99999999999",
            "max_conections = 5",
        ] {
            let name = key.split(' ').next().unwrap();
            let err = AgentConfig::parse(
                &format!("{HEAD}[agent.limits]\n{key}\n"),
                Some(std::path::Path::new("a.toml")),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(name) && err.contains("a.toml"),
                "{err} should name {name}"
            );
        }
    }
}
