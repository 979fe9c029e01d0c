//! Conversions between the wire messages of [`crate::server::v1`] and the
//! validated types of [`sigil_types`].
//!
//! Going to the wire cannot fail. Coming from the wire parses every field and
//! names the first bad one in the [`ConvertError`]; it does not run
//! [`sigil_types::Entry::validate`], which needs the server's trust domain.

use sigil_types::{
    AgentRecord, EntryError, EntryId, Selector, SelectorError, Selectors, SpiffeId, SpiffeIdError,
    TrustDomain,
};

use crate::server::v1 as pb;

/// Why a wire message could not be turned into a [`sigil_types`] value. Each
/// message names the offending field and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The entry ID is not 1 to 255 characters of `A-Za-z0-9._-`.
    #[error("invalid id: {reason}")]
    BadEntryId {
        /// What was given.
        value: String,
        /// Why it was refused.
        reason: EntryError,
    },
    /// A SPIFFE ID field does not hold a valid SPIFFE ID.
    #[error("invalid {field} {value:?}: {reason}")]
    BadSpiffeId {
        /// `spiffe_id` or `parent_id`.
        field: &'static str,
        /// What was given.
        value: String,
        /// Why it was refused.
        reason: SpiffeIdError,
    },
    /// A selector is not of the form `type:value`.
    #[error("invalid selector {value:?}: {reason}")]
    BadSelector {
        /// What was given.
        value: String,
        /// Why it was refused.
        reason: SelectorError,
    },
    /// A `federates_with` member is not a trust domain name.
    #[error("invalid federates_with {value:?}: {reason}")]
    BadFederatesWith {
        /// What was given.
        value: String,
        /// Why it was refused.
        reason: SpiffeIdError,
    },
    /// An `attributes` member is not a known attribute name.
    #[error("invalid attributes member: {0}")]
    BadAttribute(#[from] sigil_types::attribute::UnknownAttribute),
    /// A TTL or time field is negative.
    #[error("{field} must not be negative, got {value}")]
    Negative {
        /// `x509_svid_ttl`, `jwt_svid_ttl` or `expires_at`.
        field: &'static str,
        /// What was given.
        value: i64,
    },
    /// A rule of the entry that can be checked before parsing it whole.
    #[error("{0}")]
    Entry(#[from] EntryError),
}

impl From<&sigil_types::Entry> for pb::Entry {
    /// TTLs beyond `i64::MAX` (never valid) saturate; `expires_at: None`
    /// becomes 0.
    fn from(e: &sigil_types::Entry) -> Self {
        Self {
            id: e.id.to_string(),
            spiffe_id: e.spiffe_id.to_string(),
            parent_id: e.parent_id.to_string(),
            selectors: e.selectors.to_strings(),
            x509_svid_ttl: saturating_i64(e.x509_svid_ttl),
            jwt_svid_ttl: saturating_i64(e.jwt_svid_ttl),
            dns_names: e.dns_names.clone(),
            federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
            attributes: e.attributes.iter().map(ToString::to_string).collect(),
            admin: e.admin,
            downstream: e.downstream,
            hint: e.hint.clone(),
            expires_at: e.expires_at.unwrap_or(0),
            revision: e.revision,
            created_at: e.created_at,
        }
    }
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An entry's wire form encoded straight from the validated entry: the
/// bytes prost writes for `pb::Entry::from(e)`, field for field (test
/// `entry_wire_is_the_prost_encoding_of_the_converted_entry`), without
/// building the [`pb::Entry`] (four `to_string`s and the selector list: about
/// six allocations per entry). The server's sync pages use it, where a first
/// sync encodes every entry an agent holds; everything else converts with
/// `From` and lets prost encode.
pub mod entry_wire {
    use prost::bytes::BufMut;
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    use sigil_types::Entry;

    /// The encoded size of the entry's message body (without a field key
    /// or length prefix): `prost::Message::encoded_len(&pb::Entry::from(e))`.
    #[inline]
    pub fn encoded_len(e: &Entry) -> usize {
        let mut n = 0;
        fields(e, |tag, v| {
            n += match v {
                Value::Str(s) => str_len(tag, s),
                Value::Int(v) => key_len(tag) + encoded_len_varint(v),
            }
        });
        n
    }

    /// Appends the entry's message body to `buf`: what
    /// `prost::Message::encode_raw(&pb::Entry::from(e), buf)` appends.
    pub fn encode(e: &Entry, buf: &mut impl BufMut) {
        fields(e, |tag, v| match v {
            Value::Str(s) => {
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(s.len() as u64, buf);
                buf.put_slice(s.as_bytes());
            }
            Value::Int(v) => {
                encode_key(tag, WireType::Varint, buf);
                encode_varint(v, buf);
            }
        });
    }

    /// One field as it goes on the wire.
    enum Value<'a> {
        /// A length-delimited string.
        Str(&'a str),
        /// A varint: `int64` as its two's complement, `bool` as 0 or 1.
        Int(u64),
    }

    fn str_len(tag: u32, s: &str) -> usize {
        key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }

    /// Calls `f` with every field prost writes for `pb::Entry::from(e)`, in
    /// prost's order (by tag). As proto3 does, singular fields at their
    /// default (empty, 0, false) are left out; every member of a repeated
    /// field is written, even an empty string.
    fn fields<'a>(e: &'a Entry, mut f: impl FnMut(u32, Value<'a>)) {
        let f = &mut f;
        text(f, 1, e.id.as_str());
        text(f, 2, e.spiffe_id.as_str());
        text(f, 3, e.parent_id.as_str());
        for s in e.selectors.iter() {
            f(4, Value::Str(s.as_str()));
        }
        // `as u64`: protobuf's int64 varint is the two's complement.
        int(f, 5, super::saturating_i64(e.x509_svid_ttl) as u64);
        int(f, 6, super::saturating_i64(e.jwt_svid_ttl) as u64);
        for d in &e.dns_names {
            f(7, Value::Str(d));
        }
        for td in &e.federates_with {
            f(8, Value::Str(td.name()));
        }
        int(f, 9, u64::from(e.admin));
        int(f, 10, u64::from(e.downstream));
        text(f, 11, &e.hint);
        int(f, 12, e.expires_at.unwrap_or(0) as u64);
        int(f, 13, e.revision);
        int(f, 14, e.created_at as u64);
        for a in &e.attributes {
            f(15, Value::Str(a.as_str()));
        }
    }

    /// A singular string field: left out when empty.
    fn text<'a>(f: &mut impl FnMut(u32, Value<'a>), tag: u32, s: &'a str) {
        if !s.is_empty() {
            f(tag, Value::Str(s));
        }
    }

    /// A singular varint field: left out when 0.
    fn int<'a>(f: &mut impl FnMut(u32, Value<'a>), tag: u32, v: u64) {
        if v != 0 {
            f(tag, Value::Int(v));
        }
    }
}

/// Parses a wire entry. An empty `id` takes the value of `default_id` (the
/// server assigns IDs to new entries); `expires_at` 0 means no expiry.
/// Selectors are put in canonical order and duplicates dropped.
pub fn entry_from_proto(
    e: &pb::Entry,
    default_id: impl FnOnce() -> EntryId,
) -> Result<sigil_types::Entry, ConvertError> {
    let id = if e.id.is_empty() {
        default_id()
    } else {
        e.id.parse().map_err(|reason| ConvertError::BadEntryId {
            value: e.id.clone(),
            reason,
        })?
    };
    entry_with_id_from_proto(e, id)
}

/// Parses a wire entry whose ID the caller has parsed already: `id` stands
/// for `e.id`, which is not read (the agent parses each ID the server sends
/// first, to name a refused entry; parsing it again cost an allocation per
/// entry of a first sync). Otherwise as [`entry_from_proto`].
pub fn entry_with_id_from_proto(
    e: &pb::Entry,
    id: EntryId,
) -> Result<sigil_types::Entry, ConvertError> {
    let selectors = e
        .selectors
        .iter()
        .map(|s| {
            s.parse::<Selector>()
                .map_err(|reason| ConvertError::BadSelector {
                    value: s.clone(),
                    reason,
                })
        })
        .collect::<Result<Selectors, _>>()?;
    // Count before parsing, so an oversized list costs nothing to refuse;
    // `Entry::validate` states the rule for every source of entries.
    if e.federates_with.len() > sigil_types::entry::MAX_FEDERATES_WITH {
        return Err(ConvertError::Entry(
            sigil_types::EntryError::TooManyFederatesWith(e.federates_with.len()),
        ));
    }
    let federates_with = e
        .federates_with
        .iter()
        .map(|td| {
            TrustDomain::new(td).map_err(|reason| ConvertError::BadFederatesWith {
                value: td.clone(),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut attributes = e
        .attributes
        .iter()
        .map(|a| a.parse::<sigil_types::Attribute>())
        .collect::<Result<Vec<_>, _>>()?;
    attributes.sort();
    attributes.dedup();
    Ok(sigil_types::Entry {
        id,
        spiffe_id: spiffe_id("spiffe_id", &e.spiffe_id)?,
        parent_id: spiffe_id("parent_id", &e.parent_id)?,
        selectors,
        x509_svid_ttl: non_negative("x509_svid_ttl", e.x509_svid_ttl)?,
        jwt_svid_ttl: non_negative("jwt_svid_ttl", e.jwt_svid_ttl)?,
        dns_names: e.dns_names.clone(),
        federates_with,
        attributes,
        admin: e.admin,
        downstream: e.downstream,
        hint: e.hint.clone(),
        expires_at: match non_negative("expires_at", e.expires_at)? {
            0 => None,
            _ => Some(e.expires_at),
        },
        revision: e.revision,
        created_at: e.created_at,
    })
}

fn spiffe_id(field: &'static str, value: &str) -> Result<SpiffeId, ConvertError> {
    value.parse().map_err(|reason| ConvertError::BadSpiffeId {
        field,
        value: value.to_owned(),
        reason,
    })
}

fn non_negative(field: &'static str, value: i64) -> Result<u64, ConvertError> {
    u64::try_from(value).map_err(|_| ConvertError::Negative { field, value })
}

impl From<&AgentRecord> for pb::Agent {
    /// `connected` is false: whether the agent holds a sync stream is known
    /// only to the server process, which sets it. `previous_serial` has no
    /// wire field and is left out.
    fn from(a: &AgentRecord) -> Self {
        Self {
            spiffe_id: a.spiffe_id.to_string(),
            attestation_type: a.attestation_type.clone(),
            selectors: a.selectors.to_strings(),
            serial: a.serial.clone(),
            expires_at: a.expires_at,
            banned: a.banned,
            can_reattest: a.can_reattest,
            created_at: a.created_at,
            updated_at: a.updated_at,
            connected: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> sigil_types::Entry {
        sigil_types::Entry {
            id: "e1".parse().unwrap(),
            spiffe_id: "spiffe://example.org/web".parse().unwrap(),
            parent_id: "spiffe://example.org/sigil/agent/join_token/abc"
                .parse()
                .unwrap(),
            selectors: Selectors::parse_all(["unix:uid:1000", "k8s:pod-label:app:web"]).unwrap(),
            x509_svid_ttl: 3600,
            jwt_svid_ttl: 300,
            dns_names: vec!["web.example.org".into()],
            federates_with: vec![TrustDomain::new("other.org").unwrap()],
            attributes: vec![
                sigil_types::Attribute::Cluster,
                sigil_types::Attribute::Zone,
            ],
            admin: true,
            downstream: false,
            hint: "web".into(),
            expires_at: Some(1_900_000_000),
            revision: 42,
            created_at: 1_700_000_000,
        }
    }

    fn no_id() -> EntryId {
        panic!("the default ID must not be used when the entry has one")
    }

    #[test]
    fn entry_round_trips() {
        let e = entry();
        let wire = pb::Entry::from(&e);
        assert_eq!(wire.id, "e1");
        assert_eq!(wire.spiffe_id, "spiffe://example.org/web");
        assert_eq!(
            wire.selectors,
            vec!["k8s:pod-label:app:web", "unix:uid:1000"]
        );
        assert_eq!(wire.federates_with, vec!["other.org"]);
        assert_eq!((wire.x509_svid_ttl, wire.jwt_svid_ttl), (3600, 300));
        assert_eq!(wire.expires_at, 1_900_000_000);
        assert_eq!(entry_from_proto(&wire, no_id).unwrap(), e);

        let mut e = entry();
        e.expires_at = None;
        e.federates_with.clear();
        e.dns_names.clear();
        let wire = pb::Entry::from(&e);
        assert_eq!(wire.expires_at, 0);
        assert_eq!(entry_from_proto(&wire, no_id).unwrap(), e);
    }

    #[test]
    fn wire_form_is_canonicalised() {
        let mut wire = pb::Entry::from(&entry());
        wire.selectors = vec![
            "unix:uid:1000".into(),
            "k8s:pod-label:app:web".into(),
            "unix:uid:1000".into(),
        ];
        wire.federates_with = vec!["spiffe://other.org".into()];
        assert_eq!(entry_from_proto(&wire, no_id).unwrap(), entry());
    }

    #[test]
    fn empty_id_takes_the_default() {
        let mut wire = pb::Entry::from(&entry());
        wire.id.clear();
        let e = entry_from_proto(&wire, || "assigned".parse().unwrap()).unwrap();
        assert_eq!(e.id.as_str(), "assigned");
    }

    /// Any entry the types allow: IDs, selectors and trust domains as
    /// parsed, every other field anything, numbers at their extremes too.
    fn any_entry() -> impl Strategy<Value = sigil_types::Entry> {
        let td = "[a-z0-9]{1,8}(\\.[a-z0-9-]{1,8}){0,2}";
        let id = move || {
            (td, proptest::collection::vec("[A-Za-z0-9_-]{1,12}", 1..4))
                .prop_map(|(td, path)| format!("spiffe://{td}/{}", path.join("/")))
        };
        let names = (
            "[A-Za-z0-9._-]{1,40}",
            id(),
            id(),
            proptest::collection::vec("[a-z0-9_]{1,8}:[a-z0-9:._-]{1,20}", 0..4),
            proptest::collection::vec("\\PC{0,12}", 0..3),
            proptest::collection::vec(td, 0..3),
            proptest::sample::subsequence(sigil_types::Attribute::ALL.to_vec(), 0..=6),
            "\\PC{0,12}",
        );
        let numbers = (
            any::<u64>(),
            prop_oneof![Just(0u64), 1..100_000u64],
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(prop_oneof![Just(0i64), any::<i64>()]),
            any::<u64>(),
            prop_oneof![Just(0i64), any::<i64>()],
        );
        (names, numbers).prop_map(
            |(
                (id, spiffe_id, parent_id, selectors, dns_names, federates_with, attributes, hint),
                (x509_svid_ttl, jwt_svid_ttl, admin, downstream, expires_at, revision, created_at),
            )| sigil_types::Entry {
                id: id.parse().unwrap(),
                spiffe_id: spiffe_id.parse().unwrap(),
                parent_id: parent_id.parse().unwrap(),
                selectors: Selectors::parse_all(selectors).unwrap(),
                x509_svid_ttl,
                jwt_svid_ttl,
                dns_names,
                federates_with: federates_with
                    .iter()
                    .map(|td| TrustDomain::new(td).unwrap())
                    .collect(),
                attributes,
                admin,
                downstream,
                hint,
                expires_at,
                revision,
                created_at,
            },
        )
    }

    proptest! {
        /// The hand-written encoder writes exactly prost's bytes for the
        /// converted entry, so anything that decodes a `pb::Entry` reads it
        /// back as the same wire entry.
        #[test]
        fn entry_wire_is_the_prost_encoding_of_the_converted_entry(e in any_entry()) {
            let wire = pb::Entry::from(&e);
            let mut buf = Vec::new();
            entry_wire::encode(&e, &mut buf);
            prop_assert_eq!(&buf, &prost::Message::encode_to_vec(&wire));
            prop_assert_eq!(entry_wire::encoded_len(&e), buf.len());
            let back = <pb::Entry as prost::Message>::decode(buf.as_slice()).unwrap();
            prop_assert_eq!(&back, &wire);
        }
    }

    #[test]
    fn entry_wire_of_a_fixed_entry() {
        for e in [
            entry(),
            sigil_types::Entry::new(
                "e2".parse().unwrap(),
                "spiffe://example.org/w".parse().unwrap(),
                "spiffe://example.org/p".parse().unwrap(),
                Selectors::new(),
            ),
        ] {
            let mut buf = Vec::new();
            entry_wire::encode(&e, &mut buf);
            assert_eq!(buf, prost::Message::encode_to_vec(&pb::Entry::from(&e)));
        }
    }

    #[test]
    fn huge_ttl_saturates() {
        let mut e = entry();
        e.x509_svid_ttl = u64::MAX;
        assert_eq!(pb::Entry::from(&e).x509_svid_ttl, i64::MAX);
    }

    /// A change that breaks one field of a valid wire entry.
    type Breakage = fn(&mut pb::Entry);

    #[test]
    fn each_bad_field_is_named() {
        let cases: [(Breakage, &str); 9] = [
            (
                |e| e.id = "a b".into(),
                "invalid id: entry ID \"a b\" must be",
            ),
            (
                |e| e.spiffe_id = "x".into(),
                "invalid spiffe_id \"x\": scheme is missing or invalid",
            ),
            (
                |e| e.spiffe_id = String::new(),
                "invalid spiffe_id \"\": SPIFFE ID is empty",
            ),
            (
                |e| e.parent_id = "spiffe://Example.org/a".into(),
                "invalid parent_id \"spiffe://Example.org/a\": trust domain characters",
            ),
            (
                |e| e.selectors.push("unix".into()),
                "invalid selector \"unix\": selector \"unix\" must have the form type:value",
            ),
            (
                |e| e.federates_with.push("bad domain".into()),
                "invalid federates_with \"bad domain\": trust domain characters",
            ),
            (
                |e| e.x509_svid_ttl = -1,
                "x509_svid_ttl must not be negative, got -1",
            ),
            (
                |e| e.jwt_svid_ttl = -5,
                "jwt_svid_ttl must not be negative, got -5",
            ),
            (
                |e| e.expires_at = -1,
                "expires_at must not be negative, got -1",
            ),
        ];
        for (mutate, want) in cases {
            let mut wire = pb::Entry::from(&entry());
            mutate(&mut wire);
            let err = entry_from_proto(&wire, no_id).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
    }

    #[test]
    fn error_variants_carry_the_reason() {
        let mut wire = pb::Entry::from(&entry());
        wire.spiffe_id = "x".into();
        assert_eq!(
            entry_from_proto(&wire, no_id),
            Err(ConvertError::BadSpiffeId {
                field: "spiffe_id",
                value: "x".into(),
                reason: SpiffeIdError::WrongScheme,
            })
        );
    }

    #[test]
    fn agent_converts() {
        let a = AgentRecord {
            spiffe_id: "spiffe://example.org/sigil/agent/join_token/abc"
                .parse()
                .unwrap(),
            attestation_type: "join_token".into(),
            selectors: Selectors::parse_all(["join_token:abc"]).unwrap(),
            serial: "0a1b".into(),
            previous_serial: "09ff".into(),
            serial_used: false,
            expires_at: 1_800_000_000,
            banned: true,
            can_reattest: false,
            created_at: 1_700_000_000,
            updated_at: 1_750_000_000,
        };
        let wire = pb::Agent::from(&a);
        assert_eq!(
            wire,
            pb::Agent {
                spiffe_id: "spiffe://example.org/sigil/agent/join_token/abc".into(),
                attestation_type: "join_token".into(),
                selectors: vec!["join_token:abc".into()],
                serial: "0a1b".into(),
                expires_at: 1_800_000_000,
                banned: true,
                can_reattest: false,
                created_at: 1_700_000_000,
                updated_at: 1_750_000_000,
                connected: false,
            }
        );
    }
}
