//! Hostile configuration files for the agent's and the server's property
//! tests (the proptest version of `fuzz/fuzz_targets/config.rs`): TOML
//! assembled from a binary's real keys with values of every type, and
//! one-byte edits of its documented example. Each binary's test supplies its
//! keys, sub-tables and parser; what a hostile file looks like is here once.

use proptest::prelude::*;

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
}
