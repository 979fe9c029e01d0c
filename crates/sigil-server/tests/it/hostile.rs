//! Hostile server configuration files (the proptest version of
//! `fuzz/fuzz_targets/config.rs`): arbitrary text, TOML assembled from the
//! real keys with values of every type, and one-byte edits of
//! `examples/server.toml`. [`ServerConfig::parse`] never panics, and every
//! rejection is a [`ConfigError`] with a message.

use sigil_server::ServerConfig;
use sigil_server::config::ConfigError;
use sigil_testkit::hostile_config::{Suite, refused_cleanly};

/// The documented example configuration, a valid sample to edit.
const EXAMPLE: &str = include_str!("../../../../examples/server.toml");

/// The keys of the `[server]` table.
const KEYS: &[&str] = &[
    "trust_domain",
    "bind_address",
    "admin_socket",
    "data_dir",
    "ca_ttl",
    "default_x509_svid_ttl",
    "default_jwt_svid_ttl",
    "agent_svid_ttl",
    "join_token_ttl",
    "health_address",
    "bundle_refresh_hint",
    "jwt_key_type",
    "jwt_issuer",
];

/// Sub-tables of `[server]`.
const TABLES: &[&str] = &["k8s_psat.c1", "oidc", "federation"];

/// Parses `text` as a whole file: the trust domain of an accepted one.
fn parse(text: &str) -> Option<String> {
    refused_cleanly(ServerConfig::parse(text, None), |e| {
        matches!(e, ConfigError::Parse { .. } | ConfigError::Invalid { .. })
    })
    .map(|config| config.trust_domain.name().to_owned())
}

#[test]
fn hostile_files_are_accepted_or_refused_cleanly() {
    Suite {
        section: "server",
        keys: KEYS,
        tables: TABLES,
        example: EXAMPLE,
        parse,
    }
    .check();
}
