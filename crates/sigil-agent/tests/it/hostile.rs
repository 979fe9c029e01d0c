//! Hostile agent configuration files (the proptest version of
//! `fuzz/fuzz_targets/config.rs`): arbitrary text, TOML assembled from the
//! real keys with values of every type, and one-byte edits of
//! `examples/agent.toml`. [`AgentConfig::parse`] never panics, and every
//! rejection is a [`ConfigError`] with a message.

use sigil_agent::AgentConfig;
use sigil_agent::config::ConfigError;
use sigil_testkit::hostile_config::{Suite, refused_cleanly};

/// The documented example configuration, a valid sample to edit.
const EXAMPLE: &str = include_str!("../../../../examples/agent.toml");

/// The keys of the `[agent]` table.
const KEYS: &[&str] = &[
    "trust_domain",
    "server_address",
    "data_dir",
    "socket_path",
    "join_token",
    "trust_bundle_path",
    "discover_workload_path",
    "health_address",
    "min_backoff",
    "max_backoff",
];

/// Sub-tables of `[agent]`.
const TABLES: &[&str] = &["k8s", "k8s_psat", "sds"];

/// Parses `text` as a whole file: the trust domain of an accepted one.
fn parse(text: &str) -> Option<String> {
    refused_cleanly(AgentConfig::parse(text, None), |e| {
        matches!(e, ConfigError::Parse { .. } | ConfigError::Invalid { .. })
    })
    .map(|config| config.trust_domain.name().to_owned())
}

#[test]
fn hostile_files_are_accepted_or_refused_cleanly() {
    Suite {
        section: "agent",
        keys: KEYS,
        tables: TABLES,
        example: EXAMPLE,
        parse,
    }
    .check();
}
