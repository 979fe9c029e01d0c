//! The DER encoding of leaf X509-SVIDs, written directly: everything that is
//! the same for every leaf of one authority (the issuer's name, the
//! authority key identifier, the fixed extensions) is encoded once per
//! [`LeafTemplate`], and each leaf adds its serial, validity, subject, key
//! and names.
//!
//! Only encoding lives here. What goes into a leaf, and every check on it
//! (the SPIFFE ID, the trust domain, the TTL clamp, the subject key's
//! type), is decided in [`crate::x509::LeafSigner`], which calls this. The
//! output is the certificate rcgen wrote for the same parameters, byte for
//! byte up to the signature (`x509::tests::leaf_encoding_matches_rcgen`).

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::EcdsaKeyPair;
use time::OffsetDateTime;

use crate::SvidError;
use crate::der::{
    self, TAG_BIT_STRING, TAG_INTEGER, TAG_OCTET_STRING, TAG_SEQUENCE, TAG_SET, TAG_UTF8_STRING,
};

/// AlgorithmIdentifier of ecdsa-with-SHA256 (RFC 5758: no parameters).
const ECDSA_WITH_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// `[0] EXPLICIT INTEGER 2`: an X.509 v3 certificate.
const VERSION_3: &[u8] = &[0xa0, 0x03, 0x02, 0x01, 0x02];
/// id-at-organizationName and id-at-commonName, DER.
const OID_ORGANIZATION: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x0a];
const OID_COMMON_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
/// Extension IDs, DER.
const OID_SUBJECT_KEY_ID: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x0e];
const OID_KEY_USAGE: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x0f];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11];
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x13];
const OID_AUTHORITY_KEY_ID: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x23];
const OID_EXT_KEY_USAGE: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x25];
/// `BOOLEAN TRUE`, the `critical` flag.
const CRITICAL: &[u8] = &[0x01, 0x01, 0xff];
/// keyUsage: digitalSignature, keyEncipherment, keyAgreement (bits 0, 2, 4).
const KEY_USAGE_VALUE: &[u8] = &[TAG_BIT_STRING, 0x02, 0x03, 0xa8];
/// extKeyUsage: serverAuth, clientAuth.
const EXT_KEY_USAGE_VALUE: &[u8] = &[
    0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06,
    0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
/// basicConstraints with cA absent (FALSE): an empty SEQUENCE.
const NOT_CA_VALUE: &[u8] = &[0x30, 0x00];
/// GeneralName tags (context-specific, implicit IA5String).
const SAN_DNS: u8 = 0x82;
const SAN_URI: u8 = 0x86;
/// `[3] EXPLICIT Extensions`.
const TAG_EXTENSIONS: u8 = 0xa3;
/// `[0] IMPLICIT` keyIdentifier in AuthorityKeyIdentifier.
const TAG_KEY_ID: u8 = 0x80;
/// Tags of the two certificate time types.
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;

/// One leaf's variable parts, all checked by the caller.
pub(crate) struct LeafParts<'a> {
    /// Positive serial, big-endian (leading zero bytes are dropped here).
    pub(crate) serial: &'a [u8],
    pub(crate) not_before: OffsetDateTime,
    pub(crate) not_after: OffsetDateTime,
    /// The subject's SubjectPublicKeyInfo, DER, copied as it is.
    pub(crate) spki: &'a [u8],
    /// The URI SAN: the SPIFFE ID.
    pub(crate) uri: &'a str,
    /// DNS SANs; the first is also the subject's CN.
    pub(crate) dns_names: &'a [String],
    /// The value of the attributes extension (its OID in the template), if any.
    pub(crate) attributes: Option<&'a [u8]>,
}

/// What every leaf of one authority shares, encoded once.
pub(crate) struct LeafTemplate {
    /// The issuer's Name, the authority certificate's subject as it is there.
    issuer: Vec<u8>,
    /// The whole authorityKeyIdentifier Extension.
    authority_key_id: Vec<u8>,
    /// The keyUsage, extKeyUsage extensions.
    usages: Vec<u8>,
    /// The basicConstraints extension.
    not_ca: Vec<u8>,
    /// The attributes extension's OID, DER.
    attributes_oid: Vec<u8>,
}

impl LeafTemplate {
    /// A template for leaves issued by the authority whose subject Name is
    /// `issuer_name` (DER) and whose key identifier is `authority_key_id`;
    /// `attributes_oid` are the arcs of the attributes extension.
    pub(crate) fn new(issuer_name: &[u8], authority_key_id: &[u8], attributes_oid: &[u64]) -> Self {
        let mut aki = Vec::new();
        der::write_tlv(TAG_KEY_ID, authority_key_id, &mut aki);
        let mut aki_seq = Vec::new();
        der::write_tlv(TAG_SEQUENCE, &aki, &mut aki_seq);
        let mut authority_key_id = Vec::new();
        extension(OID_AUTHORITY_KEY_ID, false, &aki_seq, &mut authority_key_id);
        let mut usages = Vec::new();
        extension(OID_KEY_USAGE, true, KEY_USAGE_VALUE, &mut usages);
        extension(OID_EXT_KEY_USAGE, false, EXT_KEY_USAGE_VALUE, &mut usages);
        let mut not_ca = Vec::new();
        extension(OID_BASIC_CONSTRAINTS, true, NOT_CA_VALUE, &mut not_ca);
        let mut attributes_oid_der = Vec::new();
        der::write_oid(attributes_oid, &mut attributes_oid_der);
        Self {
            issuer: issuer_name.to_vec(),
            authority_key_id,
            usages,
            not_ca,
            attributes_oid: attributes_oid_der,
        }
    }

    /// The DER certificate for `leaf`, signed by `key` (ECDSA P-256, SHA-256).
    pub(crate) fn sign(
        &self,
        leaf: &LeafParts<'_>,
        key: &EcdsaKeyPair,
    ) -> Result<Vec<u8>, SvidError> {
        let mut body = Vec::with_capacity(512 + leaf.spki.len() + self.issuer.len());
        body.extend_from_slice(VERSION_3);
        write_serial(leaf.serial, &mut body);
        body.extend_from_slice(ECDSA_WITH_SHA256);
        body.extend_from_slice(&self.issuer);
        let mut validity = Vec::with_capacity(34);
        write_time(leaf.not_before, &mut validity)?;
        write_time(leaf.not_after, &mut validity)?;
        der::write_tlv(TAG_SEQUENCE, &validity, &mut body);
        write_subject(leaf.dns_names.first().map(String::as_str), &mut body);
        body.extend_from_slice(leaf.spki);

        let mut exts = Vec::with_capacity(256);
        exts.extend_from_slice(&self.authority_key_id);
        let mut names = Vec::with_capacity(leaf.uri.len() + 2);
        der::write_tlv(SAN_URI, leaf.uri.as_bytes(), &mut names);
        for name in leaf.dns_names {
            der::write_tlv(SAN_DNS, name.as_bytes(), &mut names);
        }
        let mut sans = Vec::with_capacity(names.len() + 4);
        der::write_tlv(TAG_SEQUENCE, &names, &mut sans);
        // The subject always has O, so the SAN extension is not critical.
        extension(OID_SUBJECT_ALT_NAME, false, &sans, &mut exts);
        exts.extend_from_slice(&self.usages);
        let mut ski = Vec::with_capacity(22);
        der::write_tlv(TAG_OCTET_STRING, &key_identifier(leaf.spki), &mut ski);
        extension(OID_SUBJECT_KEY_ID, false, &ski, &mut exts);
        exts.extend_from_slice(&self.not_ca);
        if let Some(value) = leaf.attributes {
            extension(&self.attributes_oid, false, value, &mut exts);
        }
        let mut exts_seq = Vec::with_capacity(exts.len() + 4);
        der::write_tlv(TAG_SEQUENCE, &exts, &mut exts_seq);
        der::write_tlv(TAG_EXTENSIONS, &exts_seq, &mut body);

        let mut tbs = Vec::with_capacity(body.len() + 4);
        der::write_tlv(TAG_SEQUENCE, &body, &mut tbs);
        let signature = key
            .sign(&SystemRandom::new(), &tbs)
            .map_err(|_| SvidError::Crypto("ECDSA signing failed"))?;
        let signature = signature.as_ref();
        let mut cert_body = tbs;
        cert_body.extend_from_slice(ECDSA_WITH_SHA256);
        der::write_header(TAG_BIT_STRING, signature.len() + 1, &mut cert_body);
        cert_body.push(0);
        cert_body.extend_from_slice(signature);
        let mut cert = Vec::with_capacity(cert_body.len() + 4);
        der::write_tlv(TAG_SEQUENCE, &cert_body, &mut cert);
        Ok(cert)
    }
}

/// The key identifier of a SubjectPublicKeyInfo: the first 20 bytes of its
/// SHA-256, as rcgen derives it (and so as the authority's own SKI is).
pub(crate) fn key_identifier(spki: &[u8]) -> [u8; 20] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki);
    let mut id = [0u8; 20];
    id.copy_from_slice(&digest.as_ref()[..20]);
    id
}

/// One Extension: `SEQUENCE { extnID, critical (if TRUE), OCTET STRING value }`.
fn extension(oid: &[u8], critical: bool, value: &[u8], out: &mut Vec<u8>) {
    let value_len = der::tlv_len(value.len());
    let len = oid.len() + if critical { CRITICAL.len() } else { 0 } + value_len;
    der::write_header(TAG_SEQUENCE, len, out);
    out.extend_from_slice(oid);
    if critical {
        out.extend_from_slice(CRITICAL);
    }
    der::write_tlv(TAG_OCTET_STRING, value, out);
}

/// A positive INTEGER from big-endian magnitude bytes: leading zeros dropped,
/// a zero byte added when the top bit is set.
fn write_serial(serial: &[u8], out: &mut Vec<u8>) {
    let start = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
    let magnitude = &serial[start..];
    match magnitude.first() {
        None => out.extend_from_slice(&[TAG_INTEGER, 0x01, 0x00]),
        Some(&first) if first >= 0x80 => {
            der::write_header(TAG_INTEGER, magnitude.len() + 1, out);
            out.push(0);
            out.extend_from_slice(magnitude);
        }
        Some(_) => der::write_tlv(TAG_INTEGER, magnitude, out),
    }
}

/// The subject Name: O=sigil, and CN=`common_name` when given.
fn write_subject(common_name: Option<&str>, out: &mut Vec<u8>) {
    let mut rdns = Vec::with_capacity(64);
    for (oid, value) in [
        (OID_ORGANIZATION, Some(crate::x509::SUBJECT_ORG)),
        (OID_COMMON_NAME, common_name),
    ] {
        let Some(value) = value else { continue };
        let mut atv = Vec::with_capacity(oid.len() + value.len() + 4);
        atv.extend_from_slice(oid);
        der::write_tlv(TAG_UTF8_STRING, value.as_bytes(), &mut atv);
        der::write_header(TAG_SET, der::tlv_len(atv.len()), &mut rdns);
        der::write_tlv(TAG_SEQUENCE, &atv, &mut rdns);
    }
    der::write_tlv(TAG_SEQUENCE, &rdns, out);
}

/// A certificate time (RFC 5280 §4.1.2.5): UTCTime from 1950 to 2049,
/// GeneralizedTime otherwise, whole seconds, `Z`.
fn write_time(t: OffsetDateTime, out: &mut Vec<u8>) -> Result<(), SvidError> {
    let year = u16::try_from(t.year())
        .ok()
        .filter(|y| *y <= 9999)
        .ok_or_else(|| SvidError::Mint(format!("year {} out of range", t.year())))?;
    let mut text = Vec::with_capacity(15);
    let mut two = |n: u16| {
        // n < 100, so both digits are ASCII digits.
        text.extend([b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]);
    };
    let tag = if (1950..2050).contains(&year) {
        two(year % 100);
        TAG_UTC_TIME
    } else {
        two(year / 100);
        two(year % 100);
        TAG_GENERALIZED_TIME
    };
    for n in [
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
    ] {
        two(u16::from(n));
    }
    text.push(b'Z');
    der::write_tlv(tag, &text, out);
    Ok(())
}
