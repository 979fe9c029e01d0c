//! Hostile configuration files for the agent's and the server's property
//! tests (the proptest version of `fuzz/fuzz_targets/config.rs`): TOML
//! assembled from a binary's real keys with values of every type, and
//! one-byte edits of its documented example. Each binary's test supplies its
//! keys, sub-tables and parser ([`Suite`]); what a hostile file looks like,
//! and the properties every parser must keep, are here once.

use std::fmt::{Debug, Display};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Cases per property: bounded so that CI stays fast.
const CASES: u32 = 256;

/// One binary's configuration parser under hostile input.
pub struct Suite {
    /// The top-level table, e.g. `agent`.
    pub section: &'static str,
    /// The keys of that table.
    pub keys: &'static [&'static str],
    /// Its sub-tables.
    pub tables: &'static [&'static str],
    /// The documented example configuration, a valid sample to edit.
    pub example: &'static str,
    /// Parses a whole file: the trust domain of an accepted configuration,
    /// `None` for a rejection (checked with [`refused_cleanly`]).
    pub parse: fn(&str) -> Option<String>,
}

/// The outcome of a parse, checked: an accepted configuration is returned;
/// a rejection must be of the kind `is_config_error` expects (not an I/O or
/// internal error for inline text) and must say something.
pub fn refused_cleanly<C, E: Debug + Display>(
    result: Result<C, E>,
    is_config_error: impl Fn(&E) -> bool,
) -> Option<C> {
    match result {
        Ok(config) => Some(config),
        Err(e) => {
            assert!(
                is_config_error(&e),
                "unexpected error kind for inline text: {e:?}"
            );
            assert!(!e.to_string().is_empty(), "a rejection with no message");
            None
        }
    }
}

impl Suite {
    /// Every property, in turn: the example is valid; arbitrary text, TOML
    /// assembled from the real keys and one-byte edits of the example are
    /// each accepted or refused cleanly, never a panic. Runs on the seed of
    /// `PROPTEST_RNG_SEED` when set, like the `proptest!` macro.
    pub fn check(&self) {
        let parse = self.parse;
        assert_eq!(
            parse(self.example).as_deref(),
            Some("example.org"),
            "the documented example of [{}] is not valid",
            self.section
        );
        run("arbitrary text", any::<String>(), |text| {
            parse(&text);
            Ok(())
        });
        run(
            "config-like TOML",
            config_like(self.section, self.keys, self.tables),
            |text| {
                if let Some(trust_domain) = parse(&text) {
                    // An accepted file names a valid trust domain.
                    prop_assert!(!trust_domain.is_empty());
                }
                Ok(())
            },
        );
        let example = self.example.as_bytes();
        run(
            "edited example",
            (any::<u8>(), any::<usize>(), any::<u8>()),
            |(op, pos, value)| {
                let edited = mutate(example, op, pos, value);
                parse(&String::from_utf8_lossy(&edited));
                Ok(())
            },
        );
    }
}

/// Runs one property for [`CASES`] cases; a failure panics with the
/// minimal input proptest found.
#[expect(
    clippy::panic,
    reason = "a test helper: the failure is reported by the panic"
)]
fn run<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("property \"{name}\" failed: {e}");
    }
}

/// One edit of `sample`: flip (xor with a non-zero byte), insert or delete a
/// byte at `pos` (modulo the length).
pub fn mutate(sample: &[u8], op: u8, pos: usize, value: u8) -> Vec<u8> {
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

/// TOML values of every type, mostly ones a key might plausibly get wrong:
/// durations with odd units and signs, addresses, paths, huge numbers.
pub fn toml_value() -> impl Strategy<Value = String> {
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

/// A TOML document of the `[section]` table and maybe one of its
/// `tables`, with keys drawn from `keys` (and a few unknown ones).
pub fn config_like(
    section: &'static str,
    keys: &'static [&'static str],
    tables: &'static [&'static str],
) -> impl Strategy<Value = String> {
    let key = prop_oneof![
        8 => proptest::sample::select(keys).prop_map(str::to_owned),
        1 => "[a-z_]{1,10}",
    ];
    let lines = proptest::collection::vec((key.clone(), toml_value()), 0..10);
    let sub = proptest::option::of((
        proptest::sample::select(tables),
        proptest::collection::vec((key, toml_value()), 0..5),
    ));
    (lines, sub).prop_map(move |(lines, sub)| {
        let mut text = format!("[{section}]\n");
        for (k, v) in lines {
            text.push_str(&format!("{k} = {v}\n"));
        }
        if let Some((table, lines)) = sub {
            text.push_str(&format!("[{section}.{table}]\n"));
            for (k, v) in lines {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_flip_insert_and_delete_one_byte() {
        let s = b"abc";
        assert_eq!(mutate(s, 0, 1, 1), b"acc");
        assert_eq!(mutate(s, 1, 1, b'x'), b"axbc");
        assert_eq!(mutate(s, 2, 4, 0), b"ac");
        assert_eq!(mutate(b"", 2, 9, 0), b"");
    }

    const SAMPLE: &str = "[x]\ntrust_domain = \"example.org\"\n";

    /// Accepts the sample; panics on an edit of it that keeps its first
    /// line and the key (a parser bug only edits reach).
    fn fragile(text: &str) -> Option<String> {
        if text == SAMPLE {
            return Some("example.org".to_owned());
        }
        assert!(!text.contains("trust_domain = \"ex"), "parser bug");
        None
    }

    #[test]
    #[should_panic(expected = "property \"edited example\" failed")]
    fn a_parser_that_panics_on_edits_fails_the_suite() {
        Suite {
            section: "x",
            keys: &["a"],
            tables: &["t"],
            example: SAMPLE,
            parse: fragile,
        }
        .check();
    }
}
