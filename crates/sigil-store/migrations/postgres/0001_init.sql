-- The sigil schema on PostgreSQL: migrations/sqlite/0001_init.sql and
-- 0002_federation_attributes.sql in one, with the types PostgreSQL needs.
--
-- Differences from SQLite: the authority's public part is BYTEA, and the
-- unique index on entries hashes the selectors (md5(selectors)), because a
-- btree index row cannot hold the text of many long selectors.
-- Times are Unix seconds; JSON columns hold compact serde_json text, the same
-- text SQLite stores, so the two databases share one codec.

-- One row holding the revision counter. Every write recorded in the change
-- feed increments it first, inside its own transaction: the row lock queues
-- writers, so revisions commit in the order they are handed out.
CREATE TABLE meta (
    id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    revision BIGINT NOT NULL
);
INSERT INTO meta (id, revision) VALUES (1, 0);

CREATE TABLE entries (
    id TEXT PRIMARY KEY NOT NULL,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    -- JSON array of selector strings in canonical (sorted, deduplicated)
    -- order, so equal sets are equal text and the unique index below works.
    selectors TEXT NOT NULL,
    x509_svid_ttl BIGINT NOT NULL,
    jwt_svid_ttl BIGINT NOT NULL,
    dns_names TEXT NOT NULL,
    federates_with TEXT NOT NULL,
    admin BOOLEAN NOT NULL,
    downstream BOOLEAN NOT NULL,
    hint TEXT NOT NULL,
    expires_at BIGINT,
    revision BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    -- JSON array of attribute names (sigil_types::Attribute), e.g. ["region"].
    attributes TEXT NOT NULL DEFAULT '[]'
);
CREATE UNIQUE INDEX entries_parent_spiffe_selectors
    ON entries (parent_id, spiffe_id, md5(selectors));
CREATE INDEX entries_spiffe_id ON entries (spiffe_id);

CREATE TABLE agents (
    spiffe_id TEXT PRIMARY KEY NOT NULL,
    attestation_type TEXT NOT NULL,
    selectors TEXT NOT NULL,
    serial TEXT NOT NULL,
    previous_serial TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    banned BOOLEAN NOT NULL,
    can_reattest BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at);

CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    bundle_json TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE authorities (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('x509', 'jwt')),
    state TEXT NOT NULL CHECK (state IN ('prepared', 'active', 'retired')),
    -- Certificate DER for X.509 authorities, JWK JSON for JWT ones.
    public BYTEA NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE federation_relationships (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    bundle_endpoint_url TEXT NOT NULL,
    profile TEXT NOT NULL CHECK (profile IN ('https_web', 'https_spiffe')),
    -- The SPIFFE ID the endpoint presents; empty for https_web.
    endpoint_spiffe_id TEXT NOT NULL,
    from_config BOOLEAN NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The change feed followers read by revision. Bounded by prune_changes.
CREATE TABLE changes (
    revision BIGINT PRIMARY KEY NOT NULL,
    -- entry_upserted | entry_deleted | agent_changed | agent_deleted |
    -- bundle_changed | bundle_deleted | federation_changed | federation_deleted
    kind TEXT NOT NULL,
    -- The entry id, agent SPIFFE ID or trust domain.
    subject TEXT NOT NULL,
    -- The entry as JSON for entry changes (its last state for deletions);
    -- NULL otherwise, whose followers re-read the subject.
    payload TEXT
);
