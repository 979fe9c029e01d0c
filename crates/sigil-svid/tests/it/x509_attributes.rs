//! The identity-attributes extension of X509-SVIDs, read back by sigil and
//! by OpenSSL (an independent DER parser and chain verifier).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use sigil_svid::SvidError;
use sigil_svid::keys::PrivateKey;
use sigil_svid::pem::certs_to_pem;
use sigil_svid::x509::{
    ATTRIBUTES_OID, ATTRIBUTES_OID_STR, SvidRequest, X509Authority, check_leaf_rules,
    svid_attributes, verify_svid,
};
use sigil_types::SpiffeId;
use x509_parser::prelude::FromDer;

use crate::support::td;

const HOUR: Duration = Duration::from_secs(3600);

fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

fn id() -> SpiffeId {
    "spiffe://example.org/ns/web".parse().unwrap()
}

/// A CA and a leaf minted now (so OpenSSL, which uses the real clock, accepts them).
fn mint(attributes: &[(String, String)]) -> Result<(X509Authority, Vec<u8>), SvidError> {
    let now = SystemTime::now();
    let ca = X509Authority::generate(&td(), 24 * HOUR, now)?;
    let key = PrivateKey::generate_p256()?;
    let id = id();
    let req = SvidRequest {
        attributes,
        ..SvidRequest::new(&id, HOUR)
    };
    let leaf = ca.sign_svid(&req, &key.public_key_spki_der(), now)?;
    Ok((ca, leaf))
}

#[test]
fn oid_constants_agree_and_follow_the_guid() {
    let dotted: Vec<String> = ATTRIBUTES_OID.iter().map(u64::to_string).collect();
    assert_eq!(dotted.join("."), ATTRIBUTES_OID_STR);
    // GUID-to-OID: the GUID's hex digits in groups of 4,4,4,4,4,6,6 under
    // 1.2.840.113556.1.8000.2554.
    let guid = "f1b65114-5145-4815-a956-5cce019f766f".replace('-', "");
    let mut arcs = vec![1u64, 2, 840, 113_556, 1, 8000, 2554];
    let mut rest = guid.as_str();
    for width in [4, 4, 4, 4, 4, 6, 6] {
        let (group, tail) = rest.split_at(width);
        arcs.push(u64::from_str_radix(group, 16).unwrap());
        rest = tail;
    }
    assert!(rest.is_empty());
    assert_eq!(ATTRIBUTES_OID, arcs.as_slice());
}

#[test]
fn attributes_are_present_sorted_and_non_critical() {
    let given = attrs(&[("team", "payments"), ("env", "prod"), ("größe", "groß ✓")]);
    let (ca, leaf) = mint(&given).unwrap();
    assert_eq!(
        svid_attributes(&leaf).unwrap(),
        attrs(&[("env", "prod"), ("größe", "groß ✓"), ("team", "payments")])
    );

    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).unwrap();
    let ext: Vec<_> = cert
        .iter_extensions()
        .filter(|e| e.oid.to_id_string() == ATTRIBUTES_OID_STR)
        .collect();
    assert_eq!(ext.len(), 1);
    assert!(!ext[0].critical, "the extension must be non-critical");

    // Still a valid SVID for sigil's own checks.
    assert_eq!(check_leaf_rules(&leaf).unwrap(), id());
    assert_eq!(
        verify_svid(&[leaf], &[ca.cert_der().to_vec()], SystemTime::now()).unwrap(),
        id()
    );
}

#[test]
fn no_attributes_means_no_extension() {
    let (_, leaf) = mint(&[]).unwrap();
    assert_eq!(svid_attributes(&leaf).unwrap(), Vec::new());
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).unwrap();
    assert!(
        cert.iter_extensions()
            .all(|e| e.oid.to_id_string() != ATTRIBUTES_OID_STR)
    );
    // A CA certificate has none either.
    let (ca, _) = mint(&[]).unwrap();
    assert!(svid_attributes(ca.cert_der()).unwrap().is_empty());
}

#[test]
fn duplicate_or_empty_names_are_refused_at_minting() {
    let dup = attrs(&[("team", "a"), ("env", "prod"), ("team", "b")]);
    assert!(matches!(mint(&dup), Err(SvidError::SvidAttributes(m)) if m.contains("team")));
    let empty = attrs(&[("", "x")]);
    assert!(matches!(mint(&empty), Err(SvidError::SvidAttributes(_))));
    // An empty value is fine.
    let (_, leaf) = mint(&attrs(&[("flag", "")])).unwrap();
    assert_eq!(svid_attributes(&leaf).unwrap(), attrs(&[("flag", "")]));
}

/// A self-signed certificate carrying `value` as the attributes extension,
/// built with rcgen directly to get malformed contents past sigil's encoder.
fn cert_with_raw_extension(value: Vec<u8>) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            ATTRIBUTES_OID,
            value,
        ));
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

#[test]
fn malformed_values_are_errors() {
    let utf8 = |s: &[u8]| [&[0x0c, u8::try_from(s.len()).unwrap()][..], s].concat();
    let pair = |n: &[u8], v: &[u8]| {
        let body = [utf8(n), utf8(v)].concat();
        [&[0x30, u8::try_from(body.len()).unwrap()][..], &body].concat()
    };
    let seq = |items: &[Vec<u8>]| {
        let body = items.concat();
        [&[0x30, u8::try_from(body.len()).unwrap()][..], &body].concat()
    };
    // Sanity: the hand-built encoding of a good value is accepted.
    let good = seq(&[pair(b"a", b"1"), pair(b"b", b"2")]);
    assert_eq!(
        svid_attributes(&cert_with_raw_extension(good.clone())).unwrap(),
        attrs(&[("a", "1"), ("b", "2")])
    );
    let ia5 = {
        let body = [vec![0x16, 1, b'a'], utf8(b"1")].concat();
        [&[0x30, u8::try_from(body.len()).unwrap()][..], &body].concat()
    };
    let three = {
        let body = [utf8(b"a"), utf8(b"1"), utf8(b"x")].concat();
        [&[0x30, u8::try_from(body.len()).unwrap()][..], &body].concat()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not a SEQUENCE", utf8(b"a")),
        ("truncated", good[..good.len() - 1].to_vec()),
        ("trailing bytes", [good.clone(), vec![0x05, 0x00]].concat()),
        ("unsorted", seq(&[pair(b"b", b"2"), pair(b"a", b"1")])),
        ("duplicate", seq(&[pair(b"a", b"1"), pair(b"a", b"2")])),
        ("empty name", seq(&[pair(b"", b"1")])),
        ("invalid UTF-8", seq(&[pair(b"a", &[0xff, 0xfe])])),
        ("IA5String name", seq(&[ia5])),
        ("three strings", seq(&[three])),
        ("indefinite length", vec![0x30, 0x80, 0x00, 0x00]),
    ];
    for (name, value) in cases {
        let cert = cert_with_raw_extension(value);
        assert!(
            matches!(svid_attributes(&cert), Err(SvidError::SvidAttributes(_))),
            "{name}: {:?}",
            svid_attributes(&cert)
        );
    }
    assert!(matches!(
        svid_attributes(b"not a certificate"),
        Err(SvidError::CertParse(_))
    ));
}

fn openssl(args: &[&str], dir: &Path) -> Option<String> {
    let out = match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping: cannot run openssl ({e}); CI installs it");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// OpenSSL sees the OID, the non-critical flag and the UTF8String values, and
/// still verifies the chain.
#[test]
fn openssl_parses_the_extension_and_verifies_the_chain() {
    let given = attrs(&[("team", "payments"), ("env", "prod")]);
    let (ca, leaf) = mint(&given).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ca.pem"),
        certs_to_pem(&[ca.cert_der().to_vec()]),
    )
    .unwrap();
    std::fs::write(dir.path().join("leaf.pem"), certs_to_pem(&[leaf])).unwrap();

    let Some(text) = openssl(&["x509", "-noout", "-text", "-in", "leaf.pem"], dir.path()) else {
        return;
    };
    let line = text
        .lines()
        .find(|l| l.contains(ATTRIBUTES_OID_STR))
        .unwrap_or_else(|| panic!("OID not in openssl output:\n{text}"));
    assert!(!line.contains("critical"), "{line}");

    // Walk the DER: the OID, then directly the OCTET STRING (no critical
    // BOOLEAN in between), whose contents OpenSSL parses on its own.
    let Some(dump) = openssl(&["asn1parse", "-in", "leaf.pem"], dir.path()) else {
        return;
    };
    let lines: Vec<&str> = dump.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("OBJECT") && l.contains(ATTRIBUTES_OID_STR))
        .unwrap_or_else(|| panic!("OID not in asn1parse output:\n{dump}"));
    let octets = lines[at + 1];
    assert!(octets.contains("OCTET STRING"), "{octets}");
    let offset = octets.split(':').next().unwrap().trim();
    let Some(value) = openssl(
        &["asn1parse", "-in", "leaf.pem", "-strparse", offset],
        dir.path(),
    ) else {
        return;
    };
    let strings: Vec<&str> = value
        .lines()
        .filter(|l| l.contains("UTF8STRING"))
        .map(|l| l.rsplit(':').next().unwrap())
        .collect();
    assert_eq!(strings, ["env", "prod", "team", "payments"], "{value}");
    assert_eq!(
        value.lines().filter(|l| l.contains("SEQUENCE")).count(),
        3,
        "{value}"
    );

    let Some(verdict) = openssl(&["verify", "-CAfile", "ca.pem", "leaf.pem"], dir.path()) else {
        return;
    };
    assert_eq!(verdict.trim(), "leaf.pem: OK");
}
