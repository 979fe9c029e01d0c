//! Prometheus metrics of the server, served at `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The server's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// X509-SVIDs signed for workloads.
    pub x509_svids_signed: Counter,
    /// JWT-SVIDs minted.
    pub jwt_svids_minted: Counter,
    /// Successful node attestations.
    pub attestations: Counter,
    /// Refused node attestations.
    pub attestation_failures: Counter,
    /// Agent SVID renewals.
    pub agent_renewals: Counter,
    /// Open agent sync streams.
    pub sync_streams: Gauge,
    /// Sync updates pushed to agents (each one or more pages).
    pub sync_messages: Counter,
    /// Sync pages sent: an update larger than a page spans several.
    pub sync_pages: Counter,
    /// Entries in the index.
    pub entries: Gauge,
    /// Active X.509 authority changes.
    pub ca_activations: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sigil_server");
        let m = Self {
            x509_svids_signed: Counter::default(),
            jwt_svids_minted: Counter::default(),
            attestations: Counter::default(),
            attestation_failures: Counter::default(),
            agent_renewals: Counter::default(),
            sync_streams: Gauge::default(),
            sync_messages: Counter::default(),
            sync_pages: Counter::default(),
            entries: Gauge::default(),
            ca_activations: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "x509_svids_signed",
            "X509-SVIDs signed for workloads",
            m.x509_svids_signed.clone(),
        );
        registry.register(
            "jwt_svids_minted",
            "JWT-SVIDs minted",
            m.jwt_svids_minted.clone(),
        );
        registry.register(
            "attestations",
            "Successful node attestations",
            m.attestations.clone(),
        );
        registry.register(
            "attestation_failures",
            "Refused node attestations",
            m.attestation_failures.clone(),
        );
        registry.register(
            "agent_renewals",
            "Agent SVID renewals",
            m.agent_renewals.clone(),
        );
        registry.register(
            "sync_streams",
            "Open agent sync streams",
            m.sync_streams.clone(),
        );
        registry.register(
            "sync_messages",
            "Sync updates pushed to agents (each one or more pages)",
            m.sync_messages.clone(),
        );
        registry.register(
            "sync_pages",
            "Sync pages sent to agents (an update larger than a page spans several)",
            m.sync_pages.clone(),
        );
        registry.register(
            "entries",
            "Registration entries in the index",
            m.entries.clone(),
        );
        registry.register(
            "ca_activations",
            "Activations of a new X.509 authority",
            m.ca_activations.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        sigil_metrics::render(&self.registry)
    }
}
