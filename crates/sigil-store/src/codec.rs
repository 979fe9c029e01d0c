//! Conversions between the sigil types and column values that do not depend on
//! the database, so a PostgreSQL store can share them.

use std::error::Error;

use sigil_types::{Attribute, Entry, Selectors, TrustDomain};

use crate::StoreError;

/// A decoding failure, turned into [`StoreError::Corrupt`] with the row's id.
pub(crate) type DecodeError = Box<dyn Error + Send + Sync + 'static>;

/// `changes.kind` of a created or updated entry.
pub(crate) const ENTRY_UPSERTED: &str = "entry_upserted";
/// `changes.kind` of a deleted entry.
pub(crate) const ENTRY_DELETED: &str = "entry_deleted";
/// `changes.kind` of a created, updated, banned or unbanned agent.
pub(crate) const AGENT_CHANGED: &str = "agent_changed";
/// `changes.kind` of a deleted agent.
pub(crate) const AGENT_DELETED: &str = "agent_deleted";

/// `changes.kind` of a stored bundle.
pub(crate) const BUNDLE_CHANGED: &str = "bundle_changed";
/// `changes.kind` of a deleted bundle.
pub(crate) const BUNDLE_DELETED: &str = "bundle_deleted";
/// `changes.kind` of a created or updated federation relationship.
pub(crate) const FEDERATION_CHANGED: &str = "federation_changed";
/// `changes.kind` of a deleted federation relationship.
pub(crate) const FEDERATION_DELETED: &str = "federation_deleted";

/// A u64 as the database's signed 64-bit integer; larger values would wrap,
/// so they are refused rather than stored wrong.
pub(crate) fn to_i64(what: &str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Unstorable(format!("{what} {value}: above {}", i64::MAX)))
}

/// A u64 bound in a range query: anything above i64::MAX compares as
/// i64::MAX, which no stored value exceeds.
pub(crate) fn clamp_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored integer that must not be negative.
pub(crate) fn to_u64(value: i64) -> Result<u64, DecodeError> {
    Ok(u64::try_from(value)?)
}

/// Selectors as a JSON array of strings in canonical order: equal sets give
/// equal text, which the unique index on entries relies on.
pub(crate) fn selectors_json(selectors: &Selectors) -> Result<String, StoreError> {
    json(&selectors.to_strings(), "selectors")
}

/// Parses selectors written by [`selectors_json`].
pub(crate) fn parse_selectors(text: &str) -> Result<Selectors, DecodeError> {
    let strings: Vec<String> = serde_json::from_str(text)?;
    Ok(Selectors::parse_all(strings)?)
}

/// DNS names as a JSON array.
pub(crate) fn dns_names_json(names: &[String]) -> Result<String, StoreError> {
    json(names, "dns_names")
}

/// Parses DNS names written by [`dns_names_json`].
pub(crate) fn parse_dns_names(text: &str) -> Result<Vec<String>, DecodeError> {
    Ok(serde_json::from_str(text)?)
}

/// Trust domains as a JSON array of names.
pub(crate) fn federates_with_json(tds: &[TrustDomain]) -> Result<String, StoreError> {
    json(tds, "federates_with")
}

/// Parses trust domains written by [`federates_with_json`].
pub(crate) fn parse_federates_with(text: &str) -> Result<Vec<TrustDomain>, DecodeError> {
    Ok(serde_json::from_str(text)?)
}

/// Attribute names as a JSON array.
pub(crate) fn attributes_json(attributes: &[Attribute]) -> Result<String, StoreError> {
    json(attributes, "attributes")
}

/// Parses attribute names written by [`attributes_json`].
pub(crate) fn parse_attributes(text: &str) -> Result<Vec<Attribute>, DecodeError> {
    Ok(serde_json::from_str(text)?)
}

/// The whole entry as JSON, the payload of entry changes.
pub(crate) fn entry_json(entry: &Entry) -> Result<String, StoreError> {
    json(entry, "entry")
}

/// Parses an entry change payload.
pub(crate) fn parse_entry_json(text: &str) -> Result<Entry, DecodeError> {
    Ok(serde_json::from_str(text)?)
}

fn json<T: serde::Serialize + ?Sized>(value: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Unstorable(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_canonical_text() {
        let a = Selectors::parse_all(["unix:uid:1000", "k8s:ns:a", "unix:gid:5"]).unwrap();
        let b =
            Selectors::parse_all(["unix:gid:5", "unix:uid:1000", "k8s:ns:a", "k8s:ns:a"]).unwrap();
        let text = selectors_json(&a).unwrap();
        assert_eq!(text, selectors_json(&b).unwrap());
        assert_eq!(text, r#"["k8s:ns:a","unix:gid:5","unix:uid:1000"]"#);
        assert_eq!(parse_selectors(&text).unwrap(), a);
    }

    #[test]
    fn bad_selector_text_is_an_error() {
        assert!(parse_selectors(r#"["nocolon"]"#).is_err());
        assert!(parse_selectors("not json").is_err());
    }

    #[test]
    fn integers() {
        assert_eq!(to_i64("ttl", 5).unwrap(), 5);
        assert!(matches!(
            to_i64("ttl", u64::MAX),
            Err(StoreError::Unstorable(_))
        ));
        assert_eq!(clamp_i64(u64::MAX), i64::MAX);
        assert!(to_u64(-1).is_err());
    }
}
