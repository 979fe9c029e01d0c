//! Selectors: `type:value` facts about a node or a workload, such as
//! `unix:uid:1000` or `k8s:ns:payments`.
//!
//! The type is everything before the first `:` and names the attestor that
//! produced the fact; the value is the rest and may itself contain colons
//! (`k8s:pod-label:app:web`), exactly as SPIRE writes them, so registrations
//! carry over unchanged.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

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
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its parts, validating both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        format!("{kind}:{value}").parse()
    }

    /// The selector type (the attestor's name), e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value after the first colon, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
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
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Selectors(BTreeSet<Selector>);

impl Selectors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
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
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Self)
    }

    /// Adds one selector.
    pub fn insert(&mut self, s: Selector) {
        self.0.insert(s);
    }

    /// Whether every selector of `self` is also in `other`: the rule by which
    /// an entry applies to a workload or a node alias to an agent.
    pub fn is_subset_of(&self, other: &Selectors) -> bool {
        self.0.is_subset(&other.0)
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
        self.0.contains(s)
    }

    /// The selectors as strings, in canonical order.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
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
        Self(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Selectors {
    type Item = &'a Selector;
    type IntoIter = std::collections::btree_set::Iter<'a, Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
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
        }
    }
}
