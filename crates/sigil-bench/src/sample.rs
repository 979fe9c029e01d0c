//! The entries the load generator registers, shared by its scenarios and
//! its child processes.

use sigil_types::{Entry, Selectors, SpiffeId, TrustDomain};

/// An entry as the load generator registers them.
pub(crate) fn sample_entry(
    td: &TrustDomain,
    parent: &SpiffeId,
    tag: &str,
    i: usize,
) -> anyhow::Result<Entry> {
    Ok(Entry {
        id: sigil_server::registry::new_entry_id()?,
        spiffe_id: td.id_with_path(&format!("/bench/{tag}/w{i}"))?,
        parent_id: parent.clone(),
        selectors: Selectors::parse_all([format!("bench:id:{tag}-{i}")])?,
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec![],
        federates_with: vec![],
        attributes: vec![],
        admin: false,
        downstream: false,
        hint: String::new(),
        expires_at: None,
        revision: 0,
        created_at: 1_700_000_000,
    })
}
