//! A registration entry built from arbitrary wire fields: decoding an
//! `Entry` message and converting it never panics, and a converted entry that
//! passes validation converts back to a wire entry that converts to itself.

use prost::Message as _;
use sigil_proto::server::v1 as pb;
use sigil_types::{EntryId, TrustDomain};

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let Ok(wire) = pb::Entry::decode(data) else {
        return;
    };
    let Ok(default_id) = "fuzz-default".parse::<EntryId>() else {
        return;
    };
    let fallback_id = || default_id.clone();
    let Ok(entry) = sigil_proto::entry_from_proto(&wire, fallback_id) else {
        return;
    };
    let Ok(td) = TrustDomain::new("example.org") else {
        return;
    };
    let _ = entry.validate(&td);
    let _ = entry.validate(&entry.spiffe_id.trust_domain());
    let back = pb::Entry::from(&entry);
    let again = sigil_proto::entry_from_proto(&back, fallback_id);
    assert_eq!(again.as_ref().ok(), Some(&entry));
}
