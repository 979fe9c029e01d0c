//! The Prometheus text exposition that the server, the agent and the proxy
//! serve at `/metrics`: one content type and one way to render a registry,
//! so that the three endpoints answer alike.

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// The `Content-Type` of a `/metrics` answer: OpenMetrics text, which is
/// what [`render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The text exposition of every metric in `registry`.
///
/// Writing into a `String` fails only if a metric's own encoder does; the
/// answer is then empty rather than a half-written exposition, which a
/// scraper would misread.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::registry::Registry;

    #[test]
    fn renders_the_registered_metrics_with_their_prefix() {
        let mut registry = Registry::with_prefix("sigil_test");
        let counter = Counter::<u64>::default();
        registry.register("calls", "Calls answered", counter.clone());
        counter.inc();
        let text = super::render(&registry);
        assert!(
            text.contains("# HELP sigil_test_calls Calls answered."),
            "{text}"
        );
        assert!(text.contains("sigil_test_calls_total 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
