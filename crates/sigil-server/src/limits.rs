//! Bounds on what clients of the server can make it do (`[server.limits]`):
//! message sizes, per-caller rate limits, connection caps and timeouts. The
//! defaults and what a client sees when it hits each limit are listed in
//! docs/security.md ("Limits").

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use sigil_types::SpiffeId;
use sigil_types::config::{ConfigError, require_positive};
use sigil_types::duration::serde_human;
use sigil_types::ratelimit::{KeyedLimiter, Rate};

use crate::error::{RateScope, ServerError};

/// Most callers each rate limiter remembers; idle ones are forgotten first.
pub const MAX_TRACKED_CALLERS: usize = 10_000;
/// HTTP/2 keepalive ping interval on the agent API (finds dead agents).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an agent may take to answer a keepalive ping.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Keys of `[server.limits]`, as written by users; every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest agent API request message, bytes.
    pub max_request_bytes: usize,
    /// Largest admin API request message, bytes.
    pub admin_max_request_bytes: usize,
    /// Most open agent API connections (TLS handshakes included).
    pub max_connections: usize,
    /// Most open agent API connections from one source address (IPv6 by /64).
    pub max_connections_per_source: usize,
    /// Most open agent API connections without a client certificate.
    pub max_anonymous_connections: usize,
    /// How long a client may take to finish the TLS handshake.
    #[serde(with = "serde_human")]
    pub handshake_timeout: Duration,
    /// How long a connection may stay open after its handshake without a call.
    #[serde(with = "serde_human")]
    pub first_request_timeout: Duration,
    /// How long a call may take to answer (the first message of a stream).
    #[serde(with = "serde_human")]
    pub request_timeout: Duration,
    /// Most concurrent HTTP/2 streams on one agent connection.
    pub max_streams_per_connection: u32,
    /// Calls per second of one agent (RenewAgent, Sync, BatchNewX509SVID, NewJWTSVID).
    pub agent_calls_per_second: u32,
    /// Burst of those calls.
    pub agent_call_burst: u32,
    /// Unauthenticated calls per second from one address (GetBundle, Attest*).
    pub attest_per_second: u32,
    /// Burst of those calls.
    pub attest_burst: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let d = ServerLimits::default();
        Self {
            max_request_bytes: d.max_request_bytes,
            admin_max_request_bytes: d.admin_max_request_bytes,
            max_connections: d.max_connections,
            max_connections_per_source: d.max_connections_per_source,
            max_anonymous_connections: d.max_anonymous_connections,
            handshake_timeout: d.handshake_timeout,
            first_request_timeout: d.first_request_timeout,
            request_timeout: d.request_timeout,
            max_streams_per_connection: d.max_streams_per_connection,
            agent_calls_per_second: d.agent_calls.per_second,
            agent_call_burst: d.agent_calls.burst,
            attest_per_second: d.attest.per_second,
            attest_burst: d.attest.burst,
        }
    }
}

/// The validated `[server.limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest agent API request message (4 MiB): a batch of CSRs.
    pub max_request_bytes: usize,
    /// Largest admin API request message (4 MiB): a batch of entries.
    pub admin_max_request_bytes: usize,
    /// Most open agent API connections, handshakes included (10000); a
    /// connection beyond it is closed at once.
    pub max_connections: usize,
    /// Most open agent API connections from one source address, IPv6 by /64
    /// (5000), handshakes included; one beyond it is closed at once. Half of
    /// `max_connections`, so that one address (a NAT, a load balancer)
    /// cannot take every slot, yet a fleet of 5000 agents fits behind it.
    pub max_connections_per_source: usize,
    /// Most open connections whose client presented no certificate
    /// (attesting agents, bundle fetches) once their handshake is done
    /// (1024); one beyond it is closed at once. They also hold a slot of
    /// `max_connections`, so a flood without certificates leaves the other
    /// slots to agents that have one.
    pub max_anonymous_connections: usize,
    /// TLS handshake deadline (10s); a client that connects and stays silent
    /// is disconnected after it.
    pub handshake_timeout: Duration,
    /// After the handshake, the first call must arrive within this (10s), or
    /// the connection is closed: a client that finishes TLS and then stays
    /// silent does not keep its slot.
    pub first_request_timeout: Duration,
    /// Deadline of a call's answer (30s); a stream, once answered, is not cut.
    pub request_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` on the agent API (100).
    pub max_streams_per_connection: u32,
    /// Per agent SPIFFE ID (100/s, burst 1000).
    pub agent_calls: Rate,
    /// Per source address, IPv6 by /64 (50/s, burst 500): 1000 agents
    /// behind one address attest within about 10 s, 10000 within about
    /// 3.5 min (agents retry with backoff when refused).
    pub attest: Rate,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: crate::MAX_MESSAGE_BYTES,
            admin_max_request_bytes: crate::MAX_MESSAGE_BYTES,
            max_connections: 10_000,
            max_connections_per_source: 5000,
            max_anonymous_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_streams_per_connection: 100,
            agent_calls: Rate::new(100, 1000),
            attest: Rate::new(50, 500),
        }
    }
}

/// Validates `[server.limits]`: every value must be positive.
pub(crate) fn parse(
    s: LimitsSection,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<ServerLimits, ConfigError> {
    require_positive(
        &[
            (
                "server.limits.max_request_bytes",
                s.max_request_bytes as u128,
            ),
            (
                "server.limits.admin_max_request_bytes",
                s.admin_max_request_bytes as u128,
            ),
            ("server.limits.max_connections", s.max_connections as u128),
            (
                "server.limits.max_connections_per_source",
                s.max_connections_per_source as u128,
            ),
            (
                "server.limits.max_anonymous_connections",
                s.max_anonymous_connections as u128,
            ),
            (
                "server.limits.max_streams_per_connection",
                u128::from(s.max_streams_per_connection),
            ),
            (
                "server.limits.agent_calls_per_second",
                u128::from(s.agent_calls_per_second),
            ),
            (
                "server.limits.agent_call_burst",
                u128::from(s.agent_call_burst),
            ),
            (
                "server.limits.attest_per_second",
                u128::from(s.attest_per_second),
            ),
            ("server.limits.attest_burst", u128::from(s.attest_burst)),
            (
                "server.limits.handshake_timeout",
                s.handshake_timeout.as_nanos(),
            ),
            (
                "server.limits.first_request_timeout",
                s.first_request_timeout.as_nanos(),
            ),
            (
                "server.limits.request_timeout",
                s.request_timeout.as_nanos(),
            ),
        ],
        invalid,
    )?;
    Ok(ServerLimits {
        max_request_bytes: s.max_request_bytes,
        admin_max_request_bytes: s.admin_max_request_bytes,
        max_connections: s.max_connections,
        max_connections_per_source: s.max_connections_per_source,
        max_anonymous_connections: s.max_anonymous_connections,
        handshake_timeout: s.handshake_timeout,
        first_request_timeout: s.first_request_timeout,
        request_timeout: s.request_timeout,
        max_streams_per_connection: s.max_streams_per_connection,
        agent_calls: Rate::new(s.agent_calls_per_second, s.agent_call_burst),
        attest: Rate::new(s.attest_per_second, s.attest_burst),
    })
}

/// The agent API's rate limiters.
#[derive(Debug)]
pub(crate) struct AgentApiLimiter {
    agents: KeyedLimiter<SpiffeId>,
    sources: KeyedLimiter<IpAddr>,
}

impl AgentApiLimiter {
    /// Limiters with the configured rates.
    pub(crate) fn new(limits: &ServerLimits) -> Self {
        Self {
            agents: KeyedLimiter::new(limits.agent_calls, MAX_TRACKED_CALLERS),
            sources: KeyedLimiter::new(limits.attest, MAX_TRACKED_CALLERS),
        }
    }

    /// A call of an authenticated agent: limited per SPIFFE ID.
    pub(crate) fn agent(&self, id: &SpiffeId) -> Result<(), ServerError> {
        self.agents
            .check(id)
            .map_err(|exceeded| ServerError::RateLimited {
                scope: RateScope::Agent(id.clone()),
                exceeded,
            })
    }

    /// An unauthenticated call: limited per source address (an IPv6 address
    /// by its /64, which one host usually holds whole).
    pub(crate) fn source(&self, remote: Option<SocketAddr>) -> Result<(), ServerError> {
        let Some(remote) = remote else {
            return Ok(());
        };
        let key = source_key(remote.ip());
        self.sources
            .check(&key)
            .map_err(|exceeded| ServerError::RateLimited {
                scope: RateScope::Source(key),
                exceeded,
            })
    }
}

/// The key of a source address for per-source limits: an IPv4 address (an
/// IPv4-mapped IPv6 one as IPv4), an IPv6 address by its /64.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::ServerConfig;

    const HEAD: &str = "[server]\ntrust_domain = \"example.org\"\n";

    #[test]
    fn defaults_and_every_key() {
        let c = ServerConfig::parse(HEAD, None).unwrap();
        assert_eq!(c.limits, ServerLimits::default());
        let c = ServerConfig::parse(
            &format!(
                "{HEAD}[server.limits]\nmax_request_bytes = 1024\nadmin_max_request_bytes = 2048\n\
                 max_connections = 8\nmax_connections_per_source = 7\nmax_anonymous_connections = 6\n\
                 handshake_timeout = \"2s\"\nfirst_request_timeout = \"3s\"\nrequest_timeout = \"5s\"\n\
                 max_streams_per_connection = 10\nagent_calls_per_second = 3\n\
                 agent_call_burst = 4\nattest_per_second = 5\nattest_burst = 6\n"
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            c.limits,
            ServerLimits {
                max_request_bytes: 1024,
                admin_max_request_bytes: 2048,
                max_connections: 8,
                max_connections_per_source: 7,
                max_anonymous_connections: 6,
                handshake_timeout: Duration::from_secs(2),
                first_request_timeout: Duration::from_secs(3),
                request_timeout: Duration::from_secs(5),
                max_streams_per_connection: 10,
                agent_calls: Rate::new(3, 4),
                attest: Rate::new(5, 6),
            }
        );
    }

    #[test]
    fn zero_and_unknown_keys_are_named() {
        for key in [
            "max_request_bytes = 0",
            "admin_max_request_bytes = 0",
            "max_connections = 0",
            "handshake_timeout = \"0s\"",
            "first_request_timeout = \"0s\"",
            "max_connections_per_source = 0",
            "max_anonymous_connections = 0",
            "request_timeout = \"0s\"",
            "max_streams_per_connection = 0",
            "agent_calls_per_second = 0",
            "agent_call_burst = 0",
            "attest_per_second = 0",
            "attest_burst = 0",
            "max_conections = 5",
        ] {
            let name = key.split(' ').next().unwrap();
            let err = ServerConfig::parse(
                &format!("{HEAD}[server.limits]\n{key}\n"),
                Some(std::path::Path::new("s.toml")),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(name) && err.contains("s.toml"),
                "{err} should name {name}"
            );
        }
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
