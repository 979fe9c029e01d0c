//! Hostile input to the parsers of SPIFFE IDs, trust domains and selectors
//! (the proptest versions of `fuzz/fuzz_targets/{spiffe_id,selector}.rs`):
//! arbitrary text, text close to valid, and one-byte edits of valid samples.
//! Parsing never panics, errors are clean, and every accepted value is
//! canonical and round-trips.

use proptest::prelude::*;
use sigil_types::spiffe_id::{MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN, validate_path};
use sigil_types::{Selector, SelectorError, Selectors, SpiffeId, SpiffeIdError, TrustDomain};

/// Cases per property: bounded so that CI stays fast.
const CASES: u32 = 256;

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

/// Strings built from the characters that matter to a SPIFFE ID parser
/// (valid ones, separators, URI syntax, case, percent, non-ASCII), so that
/// near-valid inputs are common and shrink to short examples.
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "spiffe://[a-zA-Z0-9._:/%@?#é -]{0,40}",
        "[sSpPiIfFeE:/]{0,12}[a-z0-9./-]{0,20}",
        any::<String>(),
    ]
}

/// Checks everything an accepted SPIFFE ID must be.
fn assert_canonical_id(text: &str, id: &SpiffeId) {
    assert_eq!(id.as_str(), text, "an accepted ID is kept verbatim");
    assert!(id.as_str().len() <= MAX_ID_LEN);
    assert!(id.as_str().starts_with("spiffe://"));
    let td = id.trust_domain_name();
    assert!(!td.is_empty() && td.len() <= MAX_TRUST_DOMAIN_LEN);
    assert_eq!(td, td.to_ascii_lowercase(), "trust domain is lowercase");
    let path = id.path();
    assert!(path.is_empty() || path.starts_with('/'));
    assert!(
        !path.ends_with('/') && !path.contains("//"),
        "no empty segment in {path:?}"
    );
    assert!(
        path.split('/').skip(1).all(|s| s != "." && s != ".."),
        "no dot segment in {path:?}"
    );
    assert!(validate_path(path).is_ok());
    assert_eq!(id.to_string().parse::<SpiffeId>().as_ref(), Ok(id));
    assert!(id.is_member_of(&id.trust_domain()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn spiffe_id_parser_accepts_only_canonical_ids(text in id_like()) {
        match text.parse::<SpiffeId>() {
            Ok(id) => assert_canonical_id(&text, &id),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn edited_ids_are_canonical_or_rejected(
        sample in "spiffe://[a-z0-9.-]{1,20}(/[a-zA-Z0-9_-]{1,8}){0,4}",
        op in any::<u8>(),
        pos in any::<usize>(),
        value in any::<u8>(),
    ) {
        let edited = mutate(sample.as_bytes(), op, pos, value);
        if let Ok(text) = String::from_utf8(edited)
            && let Ok(id) = text.parse::<SpiffeId>()
        {
            assert_canonical_id(&text, &id);
        }
    }

    #[test]
    fn trust_domain_parser_accepts_only_canonical_names(text in id_like()) {
        if let Ok(td) = TrustDomain::new(&text) {
            prop_assert!(!td.name().is_empty() && td.name().len() <= MAX_TRUST_DOMAIN_LEN);
            prop_assert_eq!(td.name(), td.name().to_ascii_lowercase());
            prop_assert_eq!(TrustDomain::new(td.name()).ok(), Some(td.clone()));
            let own = td.id_string().parse::<SpiffeId>().unwrap();
            prop_assert_eq!(own.trust_domain(), td.clone());
            prop_assert!(own.is_root());
        }
    }

    #[test]
    fn paths_are_checked_without_panicking(path in "[a-zA-Z0-9./%-]{0,30}") {
        if validate_path(&path).is_ok() {
            let id = TrustDomain::new("example.org").unwrap().id_with_path(&path);
            let id = id.unwrap();
            prop_assert_eq!(id.path(), path.as_str());
        }
    }

    #[test]
    fn selector_parser_round_trips(text in prop_oneof![
        "[a-z0-9_:A-Z-]{0,10}:[ -~\\t\\n\\u{0}é]{0,30}",
        any::<String>(),
    ]) {
        match text.parse::<Selector>() {
            Ok(sel) => {
                prop_assert!(!sel.kind().is_empty() && !sel.value().is_empty());
                prop_assert!(!sel.value().chars().any(char::is_control));
                prop_assert_eq!(sel.to_string(), text.clone());
                prop_assert_eq!(text.parse::<Selector>().ok(), Some(sel.clone()));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn selector_sets_are_sorted_and_deduplicated(
        items in proptest::collection::vec("[a-z]{1,4}:[a-z0-9:]{1,6}|[ -~]{0,8}", 0..12),
    ) {
        match Selectors::parse_all(&items) {
            Ok(set) => {
                let strings = set.to_strings();
                let mut expected: Vec<String> = items.clone();
                expected.sort();
                expected.dedup();
                prop_assert_eq!(&strings, &expected);
                prop_assert!(set.is_subset_of(&set));
                prop_assert_eq!(Selectors::parse_all(&strings).ok(), Some(set.clone()));
            }
            Err(e) => {
                let bad: Result<Vec<Selector>, SelectorError> =
                    items.iter().map(|s| s.parse::<Selector>()).collect();
                prop_assert!(bad.is_err(), "parse_all rejected valid selectors: {e}");
            }
        }
    }
}

#[test]
fn oversized_ids_are_rejected_cleanly() {
    let long = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
    assert!(matches!(
        long.parse::<SpiffeId>(),
        Err(SpiffeIdError::TooLong(n)) if n == long.len()
    ));
    let long_td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
    assert!(matches!(
        TrustDomain::new(&long_td),
        Err(SpiffeIdError::TrustDomainTooLong(_))
    ));
}
