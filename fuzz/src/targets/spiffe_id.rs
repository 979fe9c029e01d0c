//! SPIFFE IDs and trust domains from arbitrary text: parsing never panics and
//! every accepted value is canonical (re-parses to itself, lowercase scheme
//! and trust domain, no empty segments, at most 2048 bytes).

use sigil_types::spiffe_id::{MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN, validate_path};
use sigil_types::{SpiffeId, TrustDomain};

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<SpiffeId>() {
        assert_eq!(id.as_str(), text);
        assert!(id.as_str().len() <= MAX_ID_LEN);
        assert!(id.as_str().starts_with("spiffe://"));
        let td = id.trust_domain_name();
        assert!(!td.is_empty());
        assert_eq!(td, td.to_ascii_lowercase());
        assert!(!id.path().ends_with('/'));
        assert!(!id.path().contains("//"));
        assert!(validate_path(id.path()).is_ok());
        assert_eq!(id.as_str().parse::<SpiffeId>().as_ref(), Ok(&id));
        assert!(id.is_member_of(&id.trust_domain()));
    }
    if let Ok(td) = TrustDomain::new(text) {
        assert!(!td.name().is_empty());
        assert!(td.name().len() <= MAX_TRUST_DOMAIN_LEN);
        assert_eq!(td.name(), td.name().to_ascii_lowercase());
        assert_eq!(TrustDomain::new(td.name()).as_ref(), Ok(&td));
        assert_eq!(
            td.id_string().parse::<SpiffeId>().map(|i| i.trust_domain()),
            Ok(td.clone())
        );
    }
    let _ = validate_path(text);
}
