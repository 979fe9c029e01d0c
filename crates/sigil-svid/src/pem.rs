//! PEM encoding of certificates (RFC 7468).

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::SvidError;

/// Encodes DER certificates as consecutive `CERTIFICATE` PEM blocks.
pub fn certs_to_pem(ders: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for der in ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        wrap_into("CERTIFICATE", &b64, &mut out);
    }
    out
}

/// Decodes every `CERTIFICATE` block of a PEM text; other blocks are skipped.
///
/// Fails if the text holds no certificate at all, so an empty or mistyped
/// file is reported rather than read as "trust nothing".
pub fn pem_to_certs(pem: &str) -> Result<Vec<Vec<u8>>, SvidError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(SvidError::Pem("no CERTIFICATE block found".to_owned()));
    }
    Ok(certs)
}

/// Appends one PEM block, base64 body wrapped at 64 columns.
pub(crate) fn wrap_into(label: &str, b64: &str, out: &mut String) {
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    let mut rest = b64;
    while !rest.is_empty() {
        // Base64 is ASCII, so any byte index is a char boundary.
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_line_length() {
        let ders = vec![vec![1u8; 100], vec![2u8; 3]];
        let pem = certs_to_pem(&ders);
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert_eq!(pem_to_certs(&pem).unwrap(), ders);
    }

    #[test]
    fn skips_other_blocks_and_fails_when_none() {
        let mut pem = String::new();
        wrap_into("PRIVATE KEY", "AAAA", &mut pem);
        assert!(matches!(pem_to_certs(&pem), Err(SvidError::Pem(_))));
        assert!(pem_to_certs("").is_err());
        pem.push_str(&certs_to_pem(&[vec![9u8; 10]]));
        assert_eq!(pem_to_certs(&pem).unwrap(), vec![vec![9u8; 10]]);
    }
}
