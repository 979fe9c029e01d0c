//! The server's persistent state: the [`Store`] trait, its SQLite
//! implementation [`SqliteStore`], its PostgreSQL implementation
//! `PostgresStore` (cargo feature `postgres`), and the change feed.
//!
//! Every write to entries or agents gets a revision from one counter, allocated
//! inside the writing transaction, and leaves a [`Change`] row with that
//! revision. Revisions therefore become visible in commit order, so a follower
//! that loads [`Store::list_entries`] and then polls [`Store::changes_since`]
//! from the snapshot's revision never misses a write.

mod backend;
mod codec;
mod error;
mod migrations;
mod rows;
mod sql;

use std::fmt;
use std::str::FromStr;

use sigil_types::{AgentRecord, Entry, EntryId, FederationRelationship, SpiffeId, TrustDomain};

#[cfg(feature = "postgres")]
pub use backend::postgres::{CHANGES_CHANNEL, PostgresStore};
pub use backend::sqlite::SqliteStore;
pub use error::StoreError;

/// Every entry, and the revision the set is consistent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySnapshot {
    /// The entries, ordered by id.
    pub entries: Vec<Entry>,
    /// The highest revision whose write the entries reflect; follow the feed
    /// with `changes_since(revision, ..)` from here.
    pub revision: u64,
}

/// One write in the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The revision the write was given.
    pub revision: u64,
    /// What changed.
    pub kind: ChangeKind,
}

/// What a [`Change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// An entry was created or updated; this is its new state.
    EntryUpserted(Entry),
    /// An entry was deleted; this is its last stored state.
    EntryDeleted(Entry),
    /// An agent was created, updated, banned or unbanned; read it with
    /// [`Store::get_agent`].
    AgentChanged(SpiffeId),
    /// An agent was deleted (evicted).
    AgentDeleted(SpiffeId),
    /// A trust domain's bundle was stored (the server's own or a federated
    /// one); read it with [`Store::get_bundle`].
    BundleChanged(TrustDomain),
    /// A trust domain's bundle was deleted.
    BundleDeleted(TrustDomain),
    /// A federation relationship was created or updated; read it with
    /// [`Store::get_federation_relationship`].
    FederationChanged(TrustDomain),
    /// A federation relationship was deleted.
    FederationDeleted(TrustDomain),
}

/// A join token as stored: only its hash, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The hash of the token (the server chooses the hash; the store compares it exactly).
    pub token_hash: String,
    /// Unix time at and after which the token is refused.
    pub expires_at: i64,
    /// Unix time the token was generated.
    pub created_at: i64,
}

/// Which credentials a signing authority issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityKind {
    /// An X.509 CA; its public part is the certificate DER.
    X509,
    /// A JWT signing key; its public part is the JWK JSON.
    Jwt,
}

impl AuthorityKind {
    /// The name stored in the database: `x509` or `jwt`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }
}

impl fmt::Display for AuthorityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuthorityKind {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x509" => Ok(Self::X509),
            "jwt" => Ok(Self::Jwt),
            other => Err(StoreError::Corrupt(format!(
                "unknown authority kind {other:?}"
            ))),
        }
    }
}

/// Where an authority is in its rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityState {
    /// Published in the bundle but not yet signing, so peers trust it before it is used.
    Prepared,
    /// Signing new credentials.
    Active,
    /// No longer signing; kept in the bundle until what it signed has expired.
    Retired,
}

impl AuthorityState {
    /// The name stored in the database: `prepared`, `active` or `retired`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Retired => "retired",
        }
    }
}

impl fmt::Display for AuthorityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuthorityState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prepared" => Ok(Self::Prepared),
            "active" => Ok(Self::Active),
            "retired" => Ok(Self::Retired),
            other => Err(StoreError::Corrupt(format!(
                "unknown authority state {other:?}"
            ))),
        }
    }
}

/// The public half of a signing authority and where it is in its rotation.
/// The private key never enters the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityRecord {
    /// A stable id, e.g. the key ID or the certificate's subject key ID.
    pub id: String,
    /// X.509 CA or JWT key.
    pub kind: AuthorityKind,
    /// Prepared, active or retired.
    pub state: AuthorityState,
    /// Certificate DER (X.509) or JWK JSON (JWT).
    pub public: Vec<u8>,
    /// Unix time from which the authority is valid.
    pub not_before: i64,
    /// Unix time after which the authority is no longer valid.
    pub not_after: i64,
    /// Unix time the authority was created.
    pub created_at: i64,
    /// The instance ID of the server that holds the private key; empty for
    /// records written before servers had instance IDs.
    pub owner: String,
    /// Whether the authority was tainted (its key is suspect): still trusted,
    /// but everything it signed is replaced at once.
    pub tainted: bool,
}

/// The server's persistent state. Implementations must hand out revisions in
/// commit order (see the crate docs).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new entry; the store assigns `revision` (keeps the given id and created_at).
    ///
    /// [`StoreError::AlreadyExists`] if the id is taken or another entry has
    /// the same parent ID, SPIFFE ID and selectors.
    async fn create_entry(&self, entry: Entry) -> Result<Entry, StoreError>;
    /// Inserts new entries in one transaction, with the outcome of calling
    /// [`create_entry`](Self::create_entry) for each in turn: one result per
    /// entry, in order. Each entry created gets the next revision and its
    /// own change (revisions contiguous, in the order given); an entry
    /// refused ([`StoreError::AlreadyExists`], against the stored entries
    /// or an entry created earlier in the batch, with the same message; or
    /// [`StoreError::Unstorable`]) gets its error in its place and does not
    /// stop the others.
    ///
    /// `Err` when the database fails: then nothing of the batch is written.
    async fn create_entries(
        &self,
        entries: Vec<Entry>,
    ) -> Result<Vec<Result<Entry, StoreError>>, StoreError>;
    /// Replaces an existing entry (NotFound otherwise); keeps the stored created_at; assigns a new revision.
    async fn update_entry(&self, entry: Entry) -> Result<Entry, StoreError>;
    /// Replaces existing entries in one transaction, with the outcome of
    /// calling [`update_entry`](Self::update_entry) for each in turn: one
    /// result per entry, in order, revisions contiguous in that order. An
    /// entry refused (not found, a duplicate of a stored entry or of one
    /// updated earlier in the batch, unstorable) gets its error in its
    /// place and does not stop the others.
    ///
    /// `Err` when the database fails: then nothing of the batch is written.
    /// On PostgreSQL that includes an update the unique index refuses
    /// although the duplicate check passed (a hash collision of two
    /// different selector sets): the failed statement ends the transaction.
    async fn update_entries(
        &self,
        entries: Vec<Entry>,
    ) -> Result<Vec<Result<Entry, StoreError>>, StoreError>;
    /// Deletes and returns the entry; NotFound if absent.
    async fn delete_entry(&self, id: &EntryId) -> Result<Entry, StoreError>;
    /// Deletes entries in one transaction, with the outcome of calling
    /// [`delete_entry`](Self::delete_entry) for each in turn: one result
    /// per ID, in order, a change each (revisions contiguous in that
    /// order); an ID not found (or given twice) is [`StoreError::NotFound`]
    /// in its place.
    ///
    /// `Err` when the database fails: then nothing of the batch is written.
    async fn delete_entries(
        &self,
        ids: &[EntryId],
    ) -> Result<Vec<Result<Entry, StoreError>>, StoreError>;
    /// The entry with this id, if any.
    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError>;
    /// Every entry plus the revision they are consistent with (read in one transaction).
    async fn list_entries(&self) -> Result<EntrySnapshot, StoreError>;
    /// Changes with revision > `after`, ascending, at most `limit`.
    async fn changes_since(&self, after: u64, limit: u32) -> Result<Vec<Change>, StoreError>;
    /// The highest revision allocated so far.
    async fn revision(&self) -> Result<u64, StoreError>;
    /// Deletes change rows with revision <= `up_to` (the feed is bounded); returns how many.
    async fn prune_changes(&self, up_to: u64) -> Result<u64, StoreError>;

    /// Stores the agent record as given, replacing any with the same SPIFFE
    /// ID; records [`ChangeKind::AgentChanged`]. A ban is never lifted this
    /// way: if the stored record is banned, so is the result, so a ban made
    /// by another server between a read and this write holds.
    async fn upsert_agent(&self, agent: AgentRecord) -> Result<(), StoreError>;
    /// Records a renewed agent SVID, only if the agent still exists, is not
    /// banned and `presented_serial` (the serial of the SVID the renewal was
    /// authenticated with) is still accepted: the current serial, or the
    /// previous one while the current one is unused (the agent retrying a
    /// renewal whose answer was lost). The presented serial becomes
    /// `previous_serial`, `serial` the new one, unused. Returns the new
    /// record, or `None` (changing nothing) when the condition failed, as
    /// when another server banned or evicted the agent, or saw the current
    /// serial used, meanwhile. Records [`ChangeKind::AgentChanged`] when it
    /// writes.
    async fn renew_agent_serial(
        &self,
        id: &SpiffeId,
        presented_serial: &str,
        serial: &str,
        expires_at: i64,
        updated_at: i64,
    ) -> Result<Option<AgentRecord>, StoreError>;
    /// Records that a call presented the agent's current `serial`, from
    /// then on its previous serial is refused; only if `serial` is still the
    /// current one and not yet marked. Returns the new record, or `None`
    /// (changing nothing) otherwise. Records [`ChangeKind::AgentChanged`]
    /// when it writes, so every server sharing the store learns it.
    async fn mark_agent_serial_used(
        &self,
        id: &SpiffeId,
        serial: &str,
    ) -> Result<Option<AgentRecord>, StoreError>;
    /// The agent with this SPIFFE ID, if any.
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError>;
    /// Every agent, ordered by SPIFFE ID.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Deletes and returns the agent (NotFound if absent); records [`ChangeKind::AgentDeleted`].
    async fn delete_agent(&self, id: &SpiffeId) -> Result<AgentRecord, StoreError>;
    /// Sets the agent's banned flag and returns the new record (NotFound if
    /// absent); records [`ChangeKind::AgentChanged`].
    async fn set_agent_banned(
        &self,
        id: &SpiffeId,
        banned: bool,
    ) -> Result<AgentRecord, StoreError>;

    /// Stores a join token by its hash (the server never hands the store the token itself).
    ///
    /// [`StoreError::AlreadyExists`] if a token with this hash is stored.
    async fn create_join_token(&self, token: JoinToken) -> Result<(), StoreError>;
    /// Single use: atomically deletes and returns the token; NotFound if absent; TokenExpired if expires_at <= now (deleted too).
    async fn consume_join_token(&self, token_hash: &str, now: i64)
    -> Result<JoinToken, StoreError>;
    /// Deletes expired tokens (expires_at <= now); returns how many.
    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError>;

    /// Stores (or replaces) the bundle JSON of a trust domain; records
    /// [`ChangeKind::BundleChanged`].
    async fn put_bundle(
        &self,
        trust_domain: &TrustDomain,
        bundle_json: &str,
    ) -> Result<(), StoreError>;
    /// The bundle JSON of a trust domain, if stored.
    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<String>, StoreError>;
    /// Every stored bundle, ordered by trust domain.
    async fn list_bundles(&self) -> Result<Vec<(TrustDomain, String)>, StoreError>;
    /// Deletes a trust domain's bundle; NotFound if absent; records
    /// [`ChangeKind::BundleDeleted`].
    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<(), StoreError>;

    /// Stores a federation relationship, replacing any for the same trust
    /// domain; records [`ChangeKind::FederationChanged`].
    async fn put_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<(), StoreError>;
    /// The relationship with this trust domain, if any.
    async fn get_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StoreError>;
    /// Every relationship, ordered by trust domain.
    async fn list_federation_relationships(
        &self,
    ) -> Result<Vec<FederationRelationship>, StoreError>;
    /// Deletes and returns the relationship (NotFound if absent); records
    /// [`ChangeKind::FederationDeleted`]. The trust domain's bundle stays.
    async fn delete_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederationRelationship, StoreError>;

    /// Stores the authority, replacing any with the same id (owner and
    /// tainted flag included).
    async fn put_authority(&self, authority: AuthorityRecord) -> Result<(), StoreError>;
    /// Every authority, ordered by created_at, then id.
    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError>;
    /// Deletes the authority with this id. Deleting one that is already gone
    /// succeeds, so a rotation interrupted after the delete can simply retry.
    async fn delete_authority(&self, id: &str) -> Result<(), StoreError>;

    /// A wake-up for writes made by *other* processes sharing the database:
    /// the value changes (at least) after each such write commits and after
    /// the notification channel reconnects, when some may have been missed.
    /// It carries no data: a follower reads [`Store::changes_since`] in
    /// revision order whenever it fires, and still polls now and then.
    ///
    /// `None` (the default) when the store has one writer process, as with
    /// SQLite, so local wake-ups suffice.
    fn subscribe_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}
