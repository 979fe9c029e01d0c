//! Hostile server configuration files (the proptest version of
//! `fuzz/fuzz_targets/config.rs`): arbitrary text, TOML assembled from the
//! real keys with values of every type, and one-byte edits of
//! `examples/server.toml`. [`ServerConfig::parse`] never panics, and every
//! rejection is a [`ConfigError`] with a message.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use proptest::prelude::*;
use sigil_server::ServerConfig;
use sigil_server::config::ConfigError;
use sigil_testkit::hostile_config::{config_like, mutate};

/// Cases per property: bounded so that CI stays fast.
const CASES: u32 = 256;

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

/// Parses `text`; a rejection must be a config error that says something.
fn parse_cleanly(text: &str) -> Option<ServerConfig> {
    match ServerConfig::parse(text, None) {
        Ok(config) => Some(config),
        Err(e) => {
            assert!(
                matches!(e, ConfigError::Parse { .. } | ConfigError::Invalid { .. }),
                "unexpected error kind for inline text: {e:?}"
            );
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn arbitrary_text_is_refused_cleanly(text in any::<String>()) {
        parse_cleanly(&text);
    }

    #[test]
    fn config_like_toml_parses_or_is_refused_cleanly(text in config_like("server", KEYS, TABLES)) {
        if let Some(config) = parse_cleanly(&text) {
            // An accepted file names a valid trust domain.
            prop_assert!(!config.trust_domain.name().is_empty());
        }
    }

    #[test]
    fn edited_examples_parse_or_are_refused_cleanly(
        op in any::<u8>(),
        pos in any::<usize>(),
        value in any::<u8>(),
    ) {
        let edited = mutate(EXAMPLE.as_bytes(), op, pos, value);
        parse_cleanly(&String::from_utf8_lossy(&edited));
    }
}

#[test]
fn the_example_is_valid() {
    let config = parse_cleanly(EXAMPLE).unwrap();
    assert_eq!(config.trust_domain.name(), "example.org");
}
