//! Prometheus metrics of the agent, served at `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The agent's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Workload SVIDs signed by the server for this agent.
    pub svids_signed: Counter,
    /// Workload SVIDs dropped by the bound on SVIDs held
    /// (`x509_svid_cache_max_size`).
    pub svids_evicted: Counter,
    /// Workload SVIDs held in the cache.
    pub cached_svids: Gauge,
    /// 1 while the agent holds a sync stream to a server, 0 while it serves
    /// from its cache alone.
    pub connected: Gauge,
    /// Workload API calls answered with an identity.
    pub workload_requests: Counter,
    /// Workload API calls refused (no identity, bad request, attestation failure).
    pub workload_refusals: Counter,
    /// Open Workload API streams.
    pub workload_streams: Gauge,
    /// JWT-SVIDs held in the cache.
    pub cached_jwt_svids: Gauge,
    /// Bytes the JWT-SVID cache holds, as counted against its budget.
    pub jwt_cache_bytes: Gauge,
    /// Federated bundles (foreign trust domains) held.
    pub federated_bundles: Gauge,
    /// Open Envoy SDS streams.
    pub sds_streams: Gauge,
    /// Envoy SDS responses sent (stream pushes and FetchSecrets answers).
    pub sds_responses: Counter,
    /// Envoy SDS responses the client rejected (NACKs).
    pub sds_nacks: Counter,
    /// Envoy SDS calls refused (no identity, bad request, attestation failure).
    pub sds_refusals: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sigil_agent");
        let m = Self {
            svids_signed: Counter::default(),
            svids_evicted: Counter::default(),
            cached_svids: Gauge::default(),
            connected: Gauge::default(),
            workload_requests: Counter::default(),
            workload_refusals: Counter::default(),
            workload_streams: Gauge::default(),
            cached_jwt_svids: Gauge::default(),
            jwt_cache_bytes: Gauge::default(),
            federated_bundles: Gauge::default(),
            sds_streams: Gauge::default(),
            sds_responses: Counter::default(),
            sds_nacks: Counter::default(),
            sds_refusals: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "svids_signed",
            "Workload SVIDs signed for this agent",
            m.svids_signed.clone(),
        );
        registry.register(
            "svids_evicted",
            "Workload SVIDs dropped by x509_svid_cache_max_size",
            m.svids_evicted.clone(),
        );
        registry.register(
            "cached_svids",
            "Workload SVIDs in the cache",
            m.cached_svids.clone(),
        );
        registry.register(
            "connected",
            "1 while connected to a server, 0 while serving from the cache",
            m.connected.clone(),
        );
        registry.register(
            "workload_requests",
            "Workload API calls answered",
            m.workload_requests.clone(),
        );
        registry.register(
            "workload_refusals",
            "Workload API calls refused",
            m.workload_refusals.clone(),
        );
        registry.register(
            "workload_streams",
            "Open Workload API streams",
            m.workload_streams.clone(),
        );
        registry.register(
            "cached_jwt_svids",
            "JWT-SVIDs in the cache",
            m.cached_jwt_svids.clone(),
        );
        registry.register(
            "jwt_cache_bytes",
            "Bytes held by the JWT-SVID cache, as counted against jwt_cache_bytes",
            m.jwt_cache_bytes.clone(),
        );
        registry.register(
            "federated_bundles",
            "Federated bundles of foreign trust domains held",
            m.federated_bundles.clone(),
        );
        registry.register(
            "sds_streams",
            "Open Envoy SDS streams",
            m.sds_streams.clone(),
        );
        registry.register(
            "sds_responses",
            "Envoy SDS responses sent",
            m.sds_responses.clone(),
        );
        registry.register(
            "sds_nacks",
            "Envoy SDS responses rejected by the client",
            m.sds_nacks.clone(),
        );
        registry.register(
            "sds_refusals",
            "Envoy SDS calls refused",
            m.sds_refusals.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        sigil_metrics::render(&self.registry)
    }
}
