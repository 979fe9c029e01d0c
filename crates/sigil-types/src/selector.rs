//! Selectors: `type:value` facts about a node or a workload, such as
//! `unix:uid:1000` or `k8s:ns:payments`.
//!
//! The type is everything before the first `:` and names the attestor that
//! produced the fact; the value is the rest and may itself contain colons
//! (`k8s:pod-label:app:web`), exactly as SPIRE writes them, so registrations
//! carry over unchanged.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest selector accepted, in bytes (type, colon and value).
pub const MAX_SELECTOR_LEN: usize = 1024;

/// Why a selector was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// There is no `:` between type and value.
    #[error("selector {0:?} must have the form type:value (for example unix:uid:1000)")]
    MissingColon(String),
    /// The part before the first `:` is empty.
    #[error("selector {0:?} has an empty type")]
    EmptyType(String),
    /// The part after the first `:` is empty.
    #[error("selector {0:?} has an empty value")]
    EmptyValue(String),
    /// The type holds a character outside `a-z 0-9 _ -`.
    #[error("selector type {0:?} may only contain lowercase letters, digits, '_' and '-'")]
    BadType(String),
    /// The value holds a control character.
    #[error("selector {0:?} contains a control character")]
    ControlChar(String),
    /// The selector is longer than [`MAX_SELECTOR_LEN`].
    #[error("selector is {0} bytes long; the limit is 1024")]
    TooLong(usize),
}

/// One `type:value` selector.
///
/// Held as one shared string (`type:value`, split at its first colon when
/// asked), so that a clone costs a reference count and the index can keep
/// one copy of a selector that many entries carry (docs/benchmarks.md,
/// "Server memory per entry").
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Selector(Arc<str>);

impl Selector {
    /// The whole selector, `type:value`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Builds a selector from its parts, validating both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        format!("{kind}:{value}").parse()
    }

    /// The type and the value; the type never holds a colon.
    fn parts(&self) -> (&str, &str) {
        self.0.split_once(':').unwrap_or((&self.0, ""))
    }

    /// The selector type (the attestor's name), e.g. `unix`.
    pub fn kind(&self) -> &str {
        self.parts().0
    }

    /// The value after the first colon, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        self.parts().1
    }
}

/// By type, then by value: the order of the sets' canonical form (which the
/// stores keep), not the order of the `type:value` strings.
impl Ord for Selector {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        if Arc::ptr_eq(&self.0, &other.0) {
            return Ordering::Equal;
        }
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) else {
            // One is a prefix of the other: the same type, a shorter value.
            return a.len().cmp(&b.len());
        };
        // Equal up to `i`. A colon at `i` that is the first of its string
        // ends a type that is a prefix of the other's type: it sorts first,
        // whatever byte the other has there. Anywhere else the bytes decide.
        let ends_type = |s: &[u8]| s[i] == b':' && !s[..i].contains(&b':');
        if ends_type(a) {
            Ordering::Less
        } else if ends_type(b) {
            Ordering::Greater
        } else {
            a[i].cmp(&b[i])
        }
    }
}

impl PartialOrd for Selector {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong(s.len()));
        }
        let Some((kind, value)) = s.split_once(':') else {
            return Err(SelectorError::MissingColon(s.to_owned()));
        };
        if kind.is_empty() {
            return Err(SelectorError::EmptyType(s.to_owned()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(s.to_owned()));
        }
        if !kind
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
        {
            return Err(SelectorError::BadType(kind.to_owned()));
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar(s.to_owned()));
        }
        Ok(Self(Arc::from(s)))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A set of selectors, kept sorted and free of duplicates so that two sets
/// with the same members compare and store identically.
///
/// A boxed slice, sorted: 16 bytes and one allocation of 16 bytes per
/// selector, where a `BTreeSet` took a node of about 550 bytes for the
/// usual one or two (docs/benchmarks.md, "Server memory per entry").
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selectors(Box<[Selector]>);

impl Selectors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The set of `items`, sorted, each once.
    fn from_vec(mut items: Vec<Selector>) -> Self {
        items.sort_unstable();
        items.dedup();
        Self(items.into_boxed_slice())
    }

    /// Parses each string as a selector; the first bad one is the error.
    pub fn parse_all<I, S>(items: I) -> Result<Self, SelectorError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        items
            .into_iter()
            .map(|s| s.as_ref().parse::<Selector>())
            .collect::<Result<Vec<_>, _>>()
            .map(Self::from_vec)
    }

    /// Adds one selector.
    pub fn insert(&mut self, s: Selector) {
        if let Err(at) = self.0.binary_search(&s) {
            let mut v = std::mem::take(&mut self.0).into_vec();
            v.insert(at, s);
            self.0 = v.into_boxed_slice();
        }
    }

    /// Whether every selector of `self` is also in `other`: the rule by which
    /// an entry applies to a workload or a node alias to an agent.
    pub fn is_subset_of(&self, other: &Selectors) -> bool {
        if self.0.len() > other.0.len() {
            return false;
        }
        // Both sorted: each selector is searched for only past the last found.
        let mut rest: &[Selector] = &other.0;
        for s in self.0.iter() {
            match rest.binary_search(s) {
                Ok(at) => rest = &rest[at + 1..],
                Err(_) => return false,
            }
        }
        true
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many selectors the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The selectors in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }

    /// Whether the set holds this selector.
    pub fn contains(&self, s: &Selector) -> bool {
        self.0.binary_search(s).is_ok()
    }

    /// The selectors as strings, in canonical order.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// Replaces each selector with the equal one `shared` returns, so that
    /// many sets hold one copy of a selector (the server's index does). A
    /// returned selector that is not equal to the one it was asked for is
    /// ignored: the set never changes.
    pub fn share(&mut self, mut shared: impl FnMut(&Selector) -> Selector) {
        for s in self.0.iter_mut() {
            let other = shared(s);
            if other == *s {
                *s = other;
            }
        }
    }
}

impl fmt::Debug for Selectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|s| s.to_string()))
            .finish()
    }
}

impl FromIterator<Selector> for Selectors {
    fn from_iter<T: IntoIterator<Item = Selector>>(iter: T) -> Self {
        Self::from_vec(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Selectors {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Serialize for Selectors {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

/// Any order and repeats are accepted, as a set reads them.
impl<'de> Deserialize<'de> for Selectors {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Selector>::deserialize(d).map(Self::from_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_type_and_value_with_colons() {
        let s: Selector = "k8s:pod-label:app:web".parse().unwrap();
        assert_eq!(s.kind(), "k8s");
        assert_eq!(s.value(), "pod-label:app:web");
        assert_eq!(s.to_string(), "k8s:pod-label:app:web");
        let u: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!((u.kind(), u.value()), ("unix", "uid:1000"));
    }

    #[test]
    fn rejects_malformed() {
        use SelectorError::*;
        for (input, want) in [
            ("unix", MissingColon("unix".into())),
            (":uid:1", EmptyType(":uid:1".into())),
            ("unix:", EmptyValue("unix:".into())),
            ("Unix:uid:1", BadType("Unix".into())),
            ("un ix:uid:1", BadType("un ix".into())),
            ("unix:uid:\n1", ControlChar("unix:uid:\n1".into())),
        ] {
            assert_eq!(input.parse::<Selector>(), Err(want), "{input:?}");
        }
        let long = format!("unix:{}", "a".repeat(MAX_SELECTOR_LEN));
        assert!(matches!(long.parse::<Selector>(), Err(TooLong(_))));
    }

    #[test]
    fn sets_are_canonical_and_match_by_subset() {
        let a = Selectors::parse_all(["unix:uid:1000", "unix:gid:1000", "unix:uid:1000"]).unwrap();
        let b = Selectors::parse_all(["unix:gid:1000", "unix:uid:1000"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert_eq!(a.to_strings(), vec!["unix:gid:1000", "unix:uid:1000"]);
        let workload =
            Selectors::parse_all(["unix:uid:1000", "unix:gid:1000", "unix:user:alice"]).unwrap();
        assert!(a.is_subset_of(&workload));
        let other = Selectors::parse_all(["unix:uid:1001"]).unwrap();
        assert!(!other.is_subset_of(&workload));
        assert!(Selectors::new().is_subset_of(&workload));
    }

    #[test]
    fn sharing_keeps_the_set() {
        let mut a = Selectors::parse_all(["unix:uid:1", "k8s:ns:x"]).unwrap();
        let before = a.clone();
        let ns: Selector = "k8s:ns:x".parse().unwrap();
        let other: Selector = "k8s:ns:y".parse().unwrap();
        // An equal selector is taken; an unequal one is ignored.
        a.share(|s| if *s == ns { ns.clone() } else { other.clone() });
        assert_eq!(a, before);
        assert!(a.iter().any(|s| Arc::ptr_eq(&s.0, &ns.0)));
        assert!(!a.contains(&other));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn round_trip(kind in "[a-z0-9_-]{1,12}", value in "[ -~]{1,40}") {
                let s = format!("{kind}:{value}");
                let parsed: Selector = s.parse().unwrap();
                prop_assert_eq!(parsed.to_string(), s);
                prop_assert_eq!(parsed.kind(), kind.as_str());
            }

            #[test]
            fn never_panics(s in ".{0,60}") {
                let _ = s.parse::<Selector>();
            }

            /// The set behaves as the `BTreeSet` of (type, value) it
            /// replaced: the same canonical order (by type, then value,
            /// which is not the order of the strings: `a:z` before `a-b:c`
            /// and `a0:c`), subsets and membership. A small alphabet, so
            /// that types that are prefixes of one another meet often.
            #[test]
            fn sets_match_a_btree_set_of_type_and_value(
                a in proptest::collection::vec(("[a0_-]{1,3}", "[a:0-]{1,3}"), 0..10),
                b in proptest::collection::vec(("[a0_-]{1,3}", "[a:0-]{1,3}"), 0..10),
            ) {
                use std::collections::BTreeSet;
                let model = |v: &[(String, String)]| v.iter().cloned().collect::<BTreeSet<_>>();
                let set = |v: &[(String, String)]| {
                    Selectors::parse_all(v.iter().map(|(k, v)| format!("{k}:{v}"))).unwrap()
                };
                for (ka, va) in &a {
                    for (kb, vb) in &b {
                        let x: Selector = format!("{ka}:{va}").parse().unwrap();
                        let y: Selector = format!("{kb}:{vb}").parse().unwrap();
                        prop_assert_eq!(x.cmp(&y), (ka, va).cmp(&(kb, vb)), "{} {}", x, y);
                    }
                }
                let (ma, mb) = (model(&a), model(&b));
                let (sa, sb) = (set(&a), set(&b));
                let want: Vec<String> = ma.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                prop_assert_eq!(sa.to_strings(), want);
                prop_assert_eq!(sa.is_subset_of(&sb), ma.is_subset(&mb));
                prop_assert_eq!(sa.cmp(&sb), ma.cmp(&mb));
                for (k, v) in mb.iter() {
                    let s: Selector = format!("{k}:{v}").parse().unwrap();
                    prop_assert_eq!(sa.contains(&s), ma.contains(&(k.clone(), v.clone())));
                }
                // Built one at a time, the same set.
                let mut one_by_one = Selectors::new();
                for s in sa.0.iter().rev() {
                    one_by_one.insert(s.clone());
                }
                prop_assert_eq!(&one_by_one, &sa);
                // Serialized and read back in any order, the same set.
                let json = serde_json::to_string(&sa).unwrap();
                let back: Selectors = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(&back, &sa);
            }
        }
    }
}
