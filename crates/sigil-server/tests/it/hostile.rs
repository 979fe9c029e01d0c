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

/// One edit of `sample`: flip (xor with a non-zero byte), insert or delete a
/// byte at `pos` (modulo the length).
fn mutate(sample: &[u8], op: u8, pos: usize, value: u8) -> Vec<u8> {
    let mut out = sample.to_vec();
    let pos = pos % out.len().max(1);
    match op % 3 {
        0 => {
            if let Some(b) = out.get_mut(pos) {
                *b ^= value.max(1);
            }
        }
        1 => out.insert(pos.min(out.len()), value),
        _ => {
            if pos < out.len() {
                out.remove(pos);
            }
        }
    }
    out
}

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

/// TOML values of every type, mostly ones a key might plausibly get wrong:
/// durations with odd units and signs, addresses, paths, huge numbers.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"example.org\"".to_owned()),
        Just("\"spiffe://example.org\"".to_owned()),
        Just("\"127.0.0.1:8081\"".to_owned()),
        Just("\"[::1]:0\"".to_owned()),
        Just("\"/tmp/x\"".to_owned()),
        Just("\"\"".to_owned()),
        "\"-?[0-9]{1,20}(ns|us|ms|s|m|h|d|w|y)?\"",
        "\"[ -~&&[^\"\\\\]]{0,16}\"",
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("[]".to_owned()),
        Just("[\"a\", 1]".to_owned()),
        Just("{}".to_owned()),
        Just("1e999".to_owned()),
        Just("nan".to_owned()),
        Just("1979-05-27T07:32:00Z".to_owned()),
    ]
}

/// A TOML document of the `[server]` table and maybe one sub-table, with
/// keys drawn from the real ones (and a few unknown ones).
fn config_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        8 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-z_]{1,10}",
    ];
    let lines = proptest::collection::vec((key.clone(), toml_value()), 0..10);
    let sub = proptest::option::of((
        proptest::sample::select(TABLES),
        proptest::collection::vec((key, toml_value()), 0..5),
    ));
    (lines, sub).prop_map(|(lines, sub)| {
        let mut text = String::from("[server]\n");
        for (k, v) in lines {
            text.push_str(&format!("{k} = {v}\n"));
        }
        if let Some((table, lines)) = sub {
            text.push_str(&format!("[server.{table}]\n"));
            for (k, v) in lines {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn arbitrary_text_is_refused_cleanly(text in any::<String>()) {
        parse_cleanly(&text);
    }

    #[test]
    fn config_like_toml_parses_or_is_refused_cleanly(text in config_like()) {
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
