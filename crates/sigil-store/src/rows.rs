//! Reading rows the same way on every backend: typed column access that hides
//! the driver ([`Columns`]), the functions that turn a row into a value (each
//! naming the row in a [`StoreError::Corrupt`]), and errors built the same way.

use std::time::{SystemTime, UNIX_EPOCH};

use sigil_types::{AgentRecord, BundleEndpointProfile, Entry, FederationRelationship, TrustDomain};
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::codec::{self, DecodeError};
use crate::{AuthorityRecord, Change, ChangeKind, JoinToken, StoreError};

/// A row's columns by name, in the few column types the schema uses.
///
/// Implemented for the row type of every driver that decodes them, so the
/// decoders below need no per-driver trait bounds.
pub(crate) trait Columns {
    /// A text column.
    fn text(&self, column: &str) -> Result<&str, sqlx::Error>;
    /// A nullable text column.
    fn opt_text(&self, column: &str) -> Result<Option<&str>, sqlx::Error>;
    /// A 64-bit integer column.
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    /// A nullable 64-bit integer column.
    fn opt_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error>;
    /// A boolean column.
    fn flag(&self, column: &str) -> Result<bool, sqlx::Error>;
    /// A binary column.
    fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error>;
}

impl<R: Row> Columns for R
where
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database> + ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<&str, sqlx::Error> {
        self.try_get(column)
    }
    fn opt_text(&self, column: &str) -> Result<Option<&str>, sqlx::Error> {
        self.try_get(column)
    }
    fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(column)
    }
    fn flag(&self, column: &str) -> Result<bool, sqlx::Error> {
        self.try_get(column)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error> {
        self.try_get(column)
    }
}

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

/// The `revision` column of the `meta` row.
pub(crate) fn meta_revision(row: &impl Columns) -> Result<u64, StoreError> {
    codec::to_u64(row.int("revision")?)
        .map_err(|e| StoreError::Corrupt(format!("meta revision: {e}")))
}

pub(crate) fn entry_from_row(row: &impl Columns) -> Result<Entry, StoreError> {
    let id = row.text("id")?;
    decode_entry(row).map_err(|e| StoreError::Corrupt(format!("entry {id}: {e}")))
}

fn decode_entry(row: &impl Columns) -> Result<Entry, DecodeError> {
    Ok(Entry {
        id: row.text("id")?.parse()?,
        spiffe_id: row.text("spiffe_id")?.parse()?,
        parent_id: row.text("parent_id")?.parse()?,
        selectors: codec::parse_selectors(row.text("selectors")?)?,
        x509_svid_ttl: codec::to_u64(row.int("x509_svid_ttl")?)?,
        jwt_svid_ttl: codec::to_u64(row.int("jwt_svid_ttl")?)?,
        dns_names: codec::parse_dns_names(row.text("dns_names")?)?,
        federates_with: codec::parse_federates_with(row.text("federates_with")?)?,
        attributes: codec::parse_attributes(row.text("attributes")?)?,
        admin: row.flag("admin")?,
        downstream: row.flag("downstream")?,
        hint: row.text("hint")?.to_owned(),
        expires_at: row.opt_int("expires_at")?,
        revision: codec::to_u64(row.int("revision")?)?,
        created_at: row.int("created_at")?,
    })
}

pub(crate) fn agent_from_row(row: &impl Columns) -> Result<AgentRecord, StoreError> {
    let id = row.text("spiffe_id")?;
    decode_agent(row).map_err(|e| StoreError::Corrupt(format!("agent {id}: {e}")))
}

fn decode_agent(row: &impl Columns) -> Result<AgentRecord, DecodeError> {
    Ok(AgentRecord {
        spiffe_id: row.text("spiffe_id")?.parse()?,
        attestation_type: row.text("attestation_type")?.to_owned(),
        selectors: codec::parse_selectors(row.text("selectors")?)?,
        serial: row.text("serial")?.to_owned(),
        previous_serial: row.text("previous_serial")?.to_owned(),
        serial_used: row.flag("serial_used")?,
        expires_at: row.int("expires_at")?,
        banned: row.flag("banned")?,
        can_reattest: row.flag("can_reattest")?,
        created_at: row.int("created_at")?,
        updated_at: row.int("updated_at")?,
    })
}

pub(crate) fn authority_from_row(row: &impl Columns) -> Result<AuthorityRecord, StoreError> {
    let id = row.text("id")?;
    decode_authority(row).map_err(|e| StoreError::Corrupt(format!("authority {id}: {e}")))
}

fn decode_authority(row: &impl Columns) -> Result<AuthorityRecord, DecodeError> {
    Ok(AuthorityRecord {
        id: row.text("id")?.to_owned(),
        kind: row.text("kind")?.parse()?,
        state: row.text("state")?.parse()?,
        public: row.bytes("public")?,
        not_before: row.int("not_before")?,
        not_after: row.int("not_after")?,
        created_at: row.int("created_at")?,
        owner: row.text("owner")?.to_owned(),
        tainted: row.flag("tainted")?,
    })
}

pub(crate) fn federation_from_row(
    row: &impl Columns,
) -> Result<FederationRelationship, StoreError> {
    let td = row.text("trust_domain")?;
    decode_federation(row)
        .map_err(|e| StoreError::Corrupt(format!("federation relationship {td}: {e}")))
}

fn decode_federation(row: &impl Columns) -> Result<FederationRelationship, DecodeError> {
    Ok(FederationRelationship {
        trust_domain: TrustDomain::new(row.text("trust_domain")?)?,
        bundle_endpoint_url: row.text("bundle_endpoint_url")?.to_owned(),
        profile: BundleEndpointProfile::from_parts(
            row.text("profile")?,
            Some(row.text("endpoint_spiffe_id")?),
        )?,
        from_config: row.flag("from_config")?,
    })
}

pub(crate) fn bundle_from_row(row: &impl Columns) -> Result<(TrustDomain, String), StoreError> {
    let td = row.text("trust_domain")?;
    let json = row.text("bundle_json")?.to_owned();
    match TrustDomain::new(td) {
        Ok(td) => Ok((td, json)),
        Err(e) => Err(StoreError::Corrupt(format!("bundle {td}: {e}"))),
    }
}

pub(crate) fn join_token_from_row(row: &impl Columns) -> Result<JoinToken, StoreError> {
    Ok(JoinToken {
        token_hash: row.text("token_hash")?.to_owned(),
        expires_at: row.int("expires_at")?,
        created_at: row.int("created_at")?,
    })
}

pub(crate) fn change_from_row(row: &impl Columns) -> Result<Change, StoreError> {
    let revision = row.int("revision")?;
    decode_change(row).map_err(|e| StoreError::Corrupt(format!("change {revision}: {e}")))
}

fn decode_change(row: &impl Columns) -> Result<Change, DecodeError> {
    let kind = row.text("kind")?;
    let subject = row.text("subject")?;
    let payload = || -> Result<Entry, DecodeError> {
        let text = row.opt_text("payload")?;
        codec::parse_entry_json(text.ok_or("entry change without payload")?)
    };
    let kind = match kind {
        codec::ENTRY_UPSERTED => ChangeKind::EntryUpserted(payload()?),
        codec::ENTRY_DELETED => ChangeKind::EntryDeleted(payload()?),
        codec::AGENT_CHANGED => ChangeKind::AgentChanged(subject.parse()?),
        codec::AGENT_DELETED => ChangeKind::AgentDeleted(subject.parse()?),
        codec::BUNDLE_CHANGED => ChangeKind::BundleChanged(TrustDomain::new(subject)?),
        codec::BUNDLE_DELETED => ChangeKind::BundleDeleted(TrustDomain::new(subject)?),
        codec::FEDERATION_CHANGED => ChangeKind::FederationChanged(TrustDomain::new(subject)?),
        codec::FEDERATION_DELETED => ChangeKind::FederationDeleted(TrustDomain::new(subject)?),
        other => return Err(format!("unknown change kind {other:?}").into()),
    };
    Ok(Change {
        revision: codec::to_u64(row.int("revision")?)?,
        kind,
    })
}
