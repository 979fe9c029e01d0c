//! What the SQLite and PostgreSQL stores share beyond the column codecs of
//! [`crate::codec`]: errors built the same way, and the functions that turn
//! a row into a value, generated for each backend's row type by
//! [`row_decoders!`] (sqlx rows of different databases share no trait that
//! would let one generic function read every column type).

use std::time::{SystemTime, UNIX_EPOCH};

use sigil_types::Entry;

use crate::StoreError;

/// The refusal of an entry with the parent ID, SPIFFE ID and selectors of
/// entry `other`.
pub(crate) fn duplicate_error(entry: &Entry, other: &str) -> StoreError {
    StoreError::AlreadyExists(format!(
        "entry {other} already has parent_id {}, spiffe_id {} and the same selectors",
        entry.parent_id, entry.spiffe_id
    ))
}

/// Turns a unique-index violation the checks missed into AlreadyExists.
pub(crate) fn unique_violation(err: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    let unique = err
        .as_database_error()
        .is_some_and(|db| db.is_unique_violation());
    if unique {
        StoreError::AlreadyExists(message())
    } else {
        StoreError::Backend(err)
    }
}

/// Unix seconds now, for `updated_at` columns, which are informational only.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or(0)
}

/// Defines `entry_from_row`, `agent_from_row`, `authority_from_row`,
/// `federation_from_row` and `change_from_row` (each naming the row in a
/// [`StoreError::Corrupt`]) for the row type `$row`.
macro_rules! row_decoders {
    ($row:ty) => {
        fn entry_from_row(row: &$row) -> Result<Entry, StoreError> {
            let id: String = row.try_get("id")?;
            decode_entry(row).map_err(|e| StoreError::Corrupt(format!("entry {id}: {e}")))
        }

        fn decode_entry(row: &$row) -> Result<Entry, DecodeError> {
            Ok(Entry {
                id: row.try_get::<String, _>("id")?.parse()?,
                spiffe_id: row.try_get::<String, _>("spiffe_id")?.parse()?,
                parent_id: row.try_get::<String, _>("parent_id")?.parse()?,
                selectors: codec::parse_selectors(row.try_get("selectors")?)?,
                x509_svid_ttl: codec::to_u64(row.try_get("x509_svid_ttl")?)?,
                jwt_svid_ttl: codec::to_u64(row.try_get("jwt_svid_ttl")?)?,
                dns_names: codec::parse_dns_names(row.try_get("dns_names")?)?,
                federates_with: codec::parse_federates_with(row.try_get("federates_with")?)?,
                attributes: codec::parse_attributes(row.try_get("attributes")?)?,
                admin: row.try_get("admin")?,
                downstream: row.try_get("downstream")?,
                hint: row.try_get("hint")?,
                expires_at: row.try_get("expires_at")?,
                revision: codec::to_u64(row.try_get("revision")?)?,
                created_at: row.try_get("created_at")?,
            })
        }

        fn agent_from_row(row: &$row) -> Result<AgentRecord, StoreError> {
            let id: String = row.try_get("spiffe_id")?;
            decode_agent(row).map_err(|e| StoreError::Corrupt(format!("agent {id}: {e}")))
        }

        fn decode_agent(row: &$row) -> Result<AgentRecord, DecodeError> {
            Ok(AgentRecord {
                spiffe_id: row.try_get::<String, _>("spiffe_id")?.parse()?,
                attestation_type: row.try_get("attestation_type")?,
                selectors: codec::parse_selectors(row.try_get("selectors")?)?,
                serial: row.try_get("serial")?,
                previous_serial: row.try_get("previous_serial")?,
                serial_used: row.try_get("serial_used")?,
                expires_at: row.try_get("expires_at")?,
                banned: row.try_get("banned")?,
                can_reattest: row.try_get("can_reattest")?,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
            })
        }

        fn authority_from_row(row: &$row) -> Result<AuthorityRecord, StoreError> {
            let id: String = row.try_get("id")?;
            decode_authority(row).map_err(|e| StoreError::Corrupt(format!("authority {id}: {e}")))
        }

        fn decode_authority(row: &$row) -> Result<AuthorityRecord, DecodeError> {
            Ok(AuthorityRecord {
                id: row.try_get("id")?,
                kind: row.try_get::<&str, _>("kind")?.parse()?,
                state: row.try_get::<&str, _>("state")?.parse()?,
                public: row.try_get("public")?,
                not_before: row.try_get("not_before")?,
                not_after: row.try_get("not_after")?,
                created_at: row.try_get("created_at")?,
                owner: row.try_get("owner")?,
                tainted: row.try_get("tainted")?,
            })
        }

        fn federation_from_row(row: &$row) -> Result<FederationRelationship, StoreError> {
            let td: String = row.try_get("trust_domain")?;
            decode_federation(row)
                .map_err(|e| StoreError::Corrupt(format!("federation relationship {td}: {e}")))
        }

        fn decode_federation(row: &$row) -> Result<FederationRelationship, DecodeError> {
            let endpoint_id: &str = row.try_get("endpoint_spiffe_id")?;
            Ok(FederationRelationship {
                trust_domain: TrustDomain::new(row.try_get::<&str, _>("trust_domain")?)?,
                bundle_endpoint_url: row.try_get("bundle_endpoint_url")?,
                profile: BundleEndpointProfile::from_parts(
                    row.try_get::<&str, _>("profile")?,
                    Some(endpoint_id),
                )?,
                from_config: row.try_get("from_config")?,
            })
        }

        fn change_from_row(row: &$row) -> Result<Change, StoreError> {
            let revision: i64 = row.try_get("revision")?;
            decode_change(row).map_err(|e| StoreError::Corrupt(format!("change {revision}: {e}")))
        }

        fn decode_change(row: &$row) -> Result<Change, DecodeError> {
            let kind: &str = row.try_get("kind")?;
            let subject: &str = row.try_get("subject")?;
            let payload = || -> Result<Entry, DecodeError> {
                let text: Option<&str> = row.try_get("payload")?;
                codec::parse_entry_json(text.ok_or("entry change without payload")?)
            };
            let kind = match kind {
                codec::ENTRY_UPSERTED => ChangeKind::EntryUpserted(payload()?),
                codec::ENTRY_DELETED => ChangeKind::EntryDeleted(payload()?),
                codec::AGENT_CHANGED => ChangeKind::AgentChanged(subject.parse()?),
                codec::AGENT_DELETED => ChangeKind::AgentDeleted(subject.parse()?),
                codec::BUNDLE_CHANGED => ChangeKind::BundleChanged(TrustDomain::new(subject)?),
                codec::BUNDLE_DELETED => ChangeKind::BundleDeleted(TrustDomain::new(subject)?),
                codec::FEDERATION_CHANGED => {
                    ChangeKind::FederationChanged(TrustDomain::new(subject)?)
                }
                codec::FEDERATION_DELETED => {
                    ChangeKind::FederationDeleted(TrustDomain::new(subject)?)
                }
                other => return Err(format!("unknown change kind {other:?}").into()),
            };
            Ok(Change {
                revision: codec::to_u64(row.try_get("revision")?)?,
                kind,
            })
        }
    };
}
pub(crate) use row_decoders;
