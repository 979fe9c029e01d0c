//! Selectors and selector sets from arbitrary text: parsing never panics,
//! accepted selectors print and re-parse to themselves, and a set built from
//! several lines is sorted, free of duplicates and a subset of itself.

use sigil_types::{Selector, Selectors};

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = text.parse::<Selector>() {
        assert!(!sel.kind().is_empty());
        assert!(!sel.value().is_empty());
        let printed = sel.to_string();
        assert_eq!(printed.parse::<Selector>().as_ref(), Ok(&sel));
    }
    if let Ok(set) = Selectors::parse_all(text.lines()) {
        let strings = set.to_strings();
        let mut sorted = strings.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(strings.len(), set.len());
        assert!(set.is_subset_of(&set));
        assert_eq!(Selectors::parse_all(&strings).as_ref(), Ok(&set));
        for s in set.iter() {
            assert!(set.contains(s));
        }
    }
}
