-- Identity attributes on entries, and federation relationships.

-- JSON array of attribute names (sigil_types::Attribute), e.g. ["region"].
ALTER TABLE entries ADD COLUMN attributes TEXT NOT NULL DEFAULT '[]';

CREATE TABLE federation_relationships (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    bundle_endpoint_url TEXT NOT NULL,
    -- https_web | https_spiffe
    profile TEXT NOT NULL CHECK (profile IN ('https_web', 'https_spiffe')),
    -- The SPIFFE ID the endpoint presents; empty for https_web.
    endpoint_spiffe_id TEXT NOT NULL,
    from_config BOOLEAN NOT NULL,
    updated_at BIGINT NOT NULL
);
