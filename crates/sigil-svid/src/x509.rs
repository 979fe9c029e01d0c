//! X509-SVIDs: minting CA and leaf certificates (spiffe.md §2.1, §2.2),
//! CSRs, the leaf rules and full SVID verification (§2.3), and the optional
//! identity-attributes extension ([`ATTRIBUTES_OID`]).
//!
//! CA certificates and CSRs are minted with rcgen; leaves are encoded
//! directly (`leaf.rs`, held byte for byte to what rcgen wrote), from a CSR
//! parsed once ([`CheckedCsr`]). Certificates are read with x509-parser and
//! path-validated with rustls-webpki on the aws-lc-rs algorithms; every
//! certificate time is converted in this module (`asn1_to_system_time`,
//! `to_offset`).

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls_pki_types::{CertificateDer, SubjectPublicKeyInfoDer, TrustAnchor, UnixTime};
use sigil_types::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::time::ASN1Time;

use crate::SvidError;
use crate::der::{self, TAG_CONTEXT_0, TAG_INTEGER, TAG_SEQUENCE, TAG_SET, TAG_UTF8_STRING};
use crate::hex;
use crate::keys::{PrivateKey, RcgenKey};
use crate::leaf::{LeafParts, LeafTemplate, key_identifier};

/// How far `notBefore` is backdated, to tolerate clock skew between hosts (as SPIRE does).
pub const BACKDATE: Duration = Duration::from_secs(10);

/// The longest chain SPIFFE clients accept (rust-spiffe refuses longer ones).
pub const MAX_CHAIN_LEN: usize = 16;

/// Object identifier of sigil's identity-attributes extension, as arcs.
///
/// Under Microsoft's GUID-to-OID arc 1.2.840.113556.1.8000.2554, generated
/// from GUID `f1b65114-5145-4815-a956-5cce019f766f` (its groups of 4, 4, 4,
/// 4, 4, 6 and 6 hex digits, each read as one decimal arc). A `2.25.<uuid>`
/// OID was not possible because rcgen takes only `u64` arcs. The extension
/// is never critical, so validators that do not know it (webpki, Go,
/// OpenSSL) ignore it. Its value is
///
/// ```text
/// SvidAttributes ::= SEQUENCE OF SEQUENCE {
///     name   UTF8String,   -- non-empty, unique, sorted by (byte) value
///     value  UTF8String }
/// ```
pub const ATTRIBUTES_OID: &[u64] = &[
    1, 2, 840, 113_556, 1, 8000, 2554, 61_878, 20_756, 20_805, 18_453, 43_350, 6_082_049,
    10_450_543,
];

/// [`ATTRIBUTES_OID`] in dotted-decimal form.
pub const ATTRIBUTES_OID_STR: &str =
    "1.2.840.113556.1.8000.2554.61878.20756.20805.18453.43350.6082049.10450543";

/// The organization written into every subject sigil mints.
pub(crate) const SUBJECT_ORG: &str = "sigil";

/// The signature algorithms of the aws-lc-rs rustls provider, used for every
/// chain and CSR check so there is one list of what sigil accepts.
pub(crate) static SUPPORTED_ALGS: LazyLock<WebPkiSupportedAlgorithms> = LazyLock::new(|| {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
});

/// What sigil needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The certificate's SPIFFE ID, if it has exactly one URI SAN and that is a SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// The serial number as lowercase hex, without leading zero bytes.
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether basicConstraints has cA=true.
    pub is_ca: bool,
    /// The subjectKeyIdentifier extension, if present.
    pub subject_key_id: Option<Vec<u8>>,
}

/// Reads the facts sigil tracks about a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, SvidError> {
    let cert = parse_cert(der)?;
    let spiffe_id = match uri_sans(&cert)?.as_slice() {
        [one] => one.parse().ok(),
        _ => None,
    };
    let subject_key_id = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(kid) => Some(kid.0.to_vec()),
            _ => None,
        });
    let validity = cert.validity();
    Ok(CertInfo {
        spiffe_id,
        serial_hex: serial_hex(cert.raw_serial()),
        not_before: asn1_to_system_time(validity.not_before),
        not_after: asn1_to_system_time(validity.not_after),
        is_ca: basic_constraints_ca(&cert)?,
        subject_key_id,
    })
}

/// What to put into a leaf X509-SVID.
#[derive(Debug, Clone, Copy)]
pub struct SvidRequest<'a> {
    /// The workload's SPIFFE ID; must have a path.
    pub spiffe_id: &'a SpiffeId,
    /// Extra DNS SANs; the first also becomes the subject CN.
    pub dns_names: &'a [String],
    /// Requested lifetime; capped at the authority's own expiry.
    pub ttl: Duration,
    /// Identity attributes (name, value) for the non-critical
    /// [`ATTRIBUTES_OID`] extension; written sorted by name, and left out
    /// when empty. Names must be non-empty and unique.
    pub attributes: &'a [(String, String)],
}

impl<'a> SvidRequest<'a> {
    /// A request with no DNS names and no attributes.
    pub fn new(spiffe_id: &'a SpiffeId, ttl: Duration) -> Self {
        Self {
            spiffe_id,
            dns_names: &[],
            ttl,
            attributes: &[],
        }
    }
}

/// A signing authority: a CA certificate and its private key.
#[derive(Clone)]
pub struct X509Authority {
    cert_der: Vec<u8>,
    key: PrivateKey,
    info: CertInfo,
}

impl std::fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Authority")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl X509Authority {
    /// Self-signed root CA per spiffe.md §2.2: ECDSA P-256, cA=true (critical
    /// basicConstraints), keyUsage keyCertSign+cRLSign critical, NO EKU, NO name
    /// constraints, URI SAN `spiffe://<td>`, subject O=sigil, CN=`sigil <td> CA
    /// <first 8 hex of serial>` so successive authorities have distinct
    /// subjects, random positive 128-bit serial, SKI set, notBefore = now-10s,
    /// notAfter = now+ttl.
    pub fn generate(td: &TrustDomain, ttl: Duration, now: SystemTime) -> Result<Self, SvidError> {
        let serial = random_serial()?;
        let serial_hex = serial_hex(&serial);
        let mut params = CertificateParams::default();
        params.not_before = to_offset(checked_sub(now, BACKDATE)?)?;
        params.not_after = to_offset(checked_add(now, ttl)?)?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.subject_alt_names = vec![uri_san(&td.id_string())?];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, SUBJECT_ORG);
        let short = serial_hex.get(..8).unwrap_or(&serial_hex);
        dn.push(DnType::CommonName, format!("sigil {td} CA {short}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = PrivateKey::generate_p256()?;
        let cert = params
            .self_signed(&RcgenKey::new(&key, "an X.509 authority")?)
            .map_err(|e| SvidError::Mint(e.to_string()))?;
        Self::from_parts(cert.der().to_vec(), key)
    }

    /// Pairs a CA certificate with its key, checking the key matches the
    /// certificate and the certificate may sign (cA=true, keyCertSign). The
    /// key must be P-256 ([`SvidError::WrongKeyAlgorithm`] otherwise).
    pub fn from_parts(cert_der: Vec<u8>, key: PrivateKey) -> Result<Self, SvidError> {
        let info = cert_info(&cert_der)?;
        let cert = parse_cert(&cert_der)?;
        if !info.is_ca {
            return Err(SvidError::NotCa(
                "basicConstraints cA is not set".to_owned(),
            ));
        }
        // §2.2 requires keyCertSign; check_intermediate holds chains to the
        // same rule, so an authority without it could not be used as one.
        if !key_usage(&cert)?.is_some_and(|ku| ku.key_cert_sign()) {
            return Err(SvidError::NotCa("keyUsage lacks keyCertSign".to_owned()));
        }
        if cert.public_key().subject_public_key.data.as_ref()
            != key.ec_public_point("an X.509 authority")?
        {
            return Err(SvidError::KeyMismatch);
        }
        Ok(Self {
            cert_der,
            key,
            info,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA's private key.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// Facts about the CA certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Leaf X509-SVID per spiffe.md §2.1; see [`LeafSigner::sign_svid`],
    /// which this is for one leaf.
    pub fn sign_svid(
        &self,
        req: &SvidRequest<'_>,
        subject_spki_der: &[u8],
        now: SystemTime,
    ) -> Result<Vec<u8>, SvidError> {
        self.leaf_signer()?.sign_svid(req, subject_spki_der, now)
    }

    /// A signer of leaves for this authority that reads the CA certificate
    /// (issuer name, SKI) once and encodes what every leaf shares once: for
    /// signing many leaves in a row.
    pub fn leaf_signer(&self) -> Result<LeafSigner<'_>, SvidError> {
        let cert = parse_cert(&self.cert_der)?;
        // The leaf's issuer is the CA's subject byte for byte, and its AKI
        // the CA's SKI (or, without one, the key identifier rcgen would
        // have derived from the CA's key).
        let authority_key_id = match &self.info.subject_key_id {
            Some(ski) => ski.clone(),
            None => key_identifier(cert.public_key().raw).to_vec(),
        };
        let template =
            LeafTemplate::new(cert.subject().as_raw(), &authority_key_id, ATTRIBUTES_OID);
        Ok(LeafSigner {
            authority: self,
            key: self.key.ec_pair("an X.509 authority")?,
            template,
        })
    }
}

/// A workload's public key of a type sigil accepts: a well-formed
/// SubjectPublicKeyInfo whose algorithm one of the signature algorithms of
/// [`SUPPORTED_ALGS`] uses (ECDSA P-256, P-384, P-521, RSA, Ed25519). The
/// key type check, written once: every leaf is built from one of these.
#[derive(Debug, Clone, Copy)]
pub struct SubjectKey<'a> {
    spki: &'a [u8],
}

impl<'a> SubjectKey<'a> {
    /// Checks `spki_der` (SubjectPublicKeyInfo DER, nothing after it) is a
    /// key of an accepted type. [`SvidError::PublicKey`] otherwise.
    pub fn from_spki_der(spki_der: &'a [u8]) -> Result<Self, SvidError> {
        let (alg, _key) = spki_parts(spki_der)?;
        if !SUPPORTED_ALGS
            .all
            .iter()
            .any(|a| a.public_key_alg_id().as_ref() == alg)
        {
            return Err(SvidError::PublicKey(
                "unsupported public key algorithm".to_owned(),
            ));
        }
        Ok(Self { spki: spki_der })
    }

    /// The SubjectPublicKeyInfo, DER.
    pub fn spki_der(&self) -> &'a [u8] {
        self.spki
    }

    /// The key's AlgorithmIdentifier (its contents, as the constants of
    /// `rustls_pki_types::alg_id` hold them) and the subjectPublicKey bits.
    pub(crate) fn algorithm_and_key(&self) -> Result<(&'a [u8], &'a [u8]), SvidError> {
        spki_parts(self.spki)
    }
}

/// Splits a SubjectPublicKeyInfo (DER, nothing after it) into the contents
/// of its AlgorithmIdentifier and its key bits. [`SvidError::PublicKey`]
/// when it is malformed.
fn spki_parts(spki_der: &[u8]) -> Result<(&[u8], &[u8]), SvidError> {
    let bad = |e: SvidError| SvidError::PublicKey(e.to_string());
    let spki = der::expect_all(spki_der, TAG_SEQUENCE, "SubjectPublicKeyInfo").map_err(bad)?;
    let (alg, key) = der::algorithm_and_bits(spki.contents, "subjectPublicKey").map_err(bad)?;
    Ok((alg.contents, key))
}

/// A PKCS#10 CSR whose self-signature verified with the key it carries
/// (proof that the requester holds the private key), parsed once: the key
/// checked here is the key a leaf is built from
/// ([`LeafSigner::sign_csr`]). Only the key is taken from a CSR; its
/// subject and attributes (SANs, extensions) are never read.
#[derive(Debug, Clone, Copy)]
pub struct CheckedCsr<'a> {
    key: SubjectKey<'a>,
}

impl<'a> CheckedCsr<'a> {
    /// Parses `csr_der` (one CertificationRequest, nothing after it),
    /// checks its key type ([`SubjectKey`]) and verifies its signature with
    /// that key. [`SvidError::Csr`] for a malformed CSR or an unknown
    /// signature algorithm, [`SvidError::PublicKey`] for a key of another
    /// type or one that does not fit the algorithm, [`SvidError::CsrSignature`]
    /// when the signature does not verify.
    pub fn check(csr_der: &'a [u8]) -> Result<Self, SvidError> {
        let bad = |e: SvidError| SvidError::Csr(e.to_string());
        let outer = der::expect_all(csr_der, TAG_SEQUENCE, "CertificationRequest").map_err(bad)?;
        let (info, after_info) =
            der::expect(outer.contents, TAG_SEQUENCE, "CertificationRequestInfo").map_err(bad)?;
        let (alg, signature) = der::algorithm_and_bits(after_info, "signature").map_err(bad)?;
        // CertificationRequestInfo ::= SEQUENCE { version INTEGER (0),
        //   subject Name, subjectPKInfo, attributes [0] SET OF Attribute }
        let (version, rest) = der::expect(info.contents, TAG_INTEGER, "version").map_err(bad)?;
        if version.contents != [0] {
            return Err(SvidError::Csr("CSR version is not 1 (0)".to_owned()));
        }
        let (subject, rest) = der::expect(rest, TAG_SEQUENCE, "subject").map_err(bad)?;
        every_element(subject.contents, TAG_SET, "RelativeDistinguishedName").map_err(bad)?;
        let (spki, rest) = der::expect(rest, TAG_SEQUENCE, "subjectPKInfo").map_err(bad)?;
        let attributes = der::expect_all(rest, TAG_CONTEXT_0, "attributes").map_err(bad)?;
        every_element(attributes.contents, TAG_SEQUENCE, "Attribute").map_err(bad)?;
        let key = SubjectKey::from_spki_der(spki.whole)?;

        let spki_der = SubjectPublicKeyInfoDer::from(key.spki_der());
        let public_key = webpki::RawPublicKeyEntity::try_from(&spki_der)
            .map_err(|e| SvidError::PublicKey(format!("{e:?}")))?;
        let mut known_algorithm = false;
        for candidate in SUPPORTED_ALGS
            .all
            .iter()
            .filter(|a| a.signature_alg_id().as_ref() == alg.contents)
        {
            known_algorithm = true;
            match public_key.verify_signature(*candidate, info.whole, signature) {
                Ok(()) => return Ok(Self { key }),
                // Several algorithms share one signature OID (ECDSA-SHA256 on P-256
                // and on P-384); only the one fitting the key can succeed.
                Err(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => {}
                Err(_) => return Err(SvidError::CsrSignature),
            }
        }
        if known_algorithm {
            Err(SvidError::PublicKey(
                "the CSR's key does not fit its signature algorithm".to_owned(),
            ))
        } else {
            Err(SvidError::Csr("unsupported signature algorithm".to_owned()))
        }
    }

    /// The requester's key, checked and proven.
    pub fn key(&self) -> SubjectKey<'a> {
        self.key
    }
}

/// Checks `contents` is a run of whole elements, each tagged `tag`.
fn every_element(contents: &[u8], tag: u8, what: &str) -> Result<(), SvidError> {
    let mut rest = contents;
    while !rest.is_empty() {
        rest = der::expect(rest, tag, what)?.1;
    }
    Ok(())
}

/// Signs leaf X509-SVIDs with one [`X509Authority`], its certificate read
/// once and what every leaf shares encoded once
/// ([`X509Authority::leaf_signer`]).
pub struct LeafSigner<'a> {
    authority: &'a X509Authority,
    key: &'a aws_lc_rs::signature::EcdsaKeyPair,
    template: LeafTemplate,
}

impl std::fmt::Debug for LeafSigner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafSigner")
            .field("authority", self.authority)
            .finish_non_exhaustive()
    }
}

impl LeafSigner<'_> {
    /// Leaf X509-SVID per spiffe.md §2.1 for the key of a checked CSR; see
    /// [`Self::sign_key`].
    pub fn sign_csr(
        &self,
        req: &SvidRequest<'_>,
        csr: &CheckedCsr<'_>,
        now: SystemTime,
    ) -> Result<Vec<u8>, SvidError> {
        self.sign_key(req, csr.key(), now)
    }

    /// Leaf X509-SVID per spiffe.md §2.1 for `subject_spki_der` (the
    /// workload's SubjectPublicKeyInfo DER), checked to be a
    /// [`SubjectKey`]; see [`Self::sign_key`].
    pub fn sign_svid(
        &self,
        req: &SvidRequest<'_>,
        subject_spki_der: &[u8],
        now: SystemTime,
    ) -> Result<Vec<u8>, SvidError> {
        self.sign_key(req, SubjectKey::from_spki_der(subject_spki_der)?, now)
    }

    /// Leaf X509-SVID per spiffe.md §2.1: exactly one URI SAN (the SPIFFE ID)
    /// plus DNS SANs from dns_names; basicConstraints cA=false (present,
    /// critical); keyUsage critical digitalSignature, keyEncipherment and
    /// keyAgreement (as SPIRE sets them); EKU serverAuth+clientAuth; random
    /// positive 128-bit serial; notBefore = now - 10s; notAfter = min(now + ttl,
    /// CA notAfter); AKI = CA SKI, SKI set; subject O=sigil (+ CN = first DNS
    /// name if any); the non-critical [`ATTRIBUTES_OID`] extension when
    /// `req.attributes` is not empty. Signed with the CA key.
    pub fn sign_key(
        &self,
        req: &SvidRequest<'_>,
        subject: SubjectKey<'_>,
        now: SystemTime,
    ) -> Result<Vec<u8>, SvidError> {
        if req.spiffe_id.is_root() {
            return Err(SvidError::LeafRootId(req.spiffe_id.to_string()));
        }
        if let Some(ca_id) = &self.authority.info.spiffe_id
            && !req.spiffe_id.is_member_of(&ca_id.trust_domain())
        {
            // Validators check a leaf against its own trust domain's bundle
            // (§2.3 rule 1), so such a leaf could never be verified.
            return Err(SvidError::Mint(format!(
                "{} is not in the authority's trust domain {}",
                req.spiffe_id,
                ca_id.trust_domain()
            )));
        }
        if self.authority.info.not_after <= now {
            return Err(SvidError::Mint(
                "the signing authority has expired".to_owned(),
            ));
        }
        let not_before = to_offset(checked_sub(now, BACKDATE)?)?;
        let not_after = to_offset(checked_add(now, req.ttl)?.min(self.authority.info.not_after))?;
        let uri = req.spiffe_id.as_str();
        if !uri.is_ascii() {
            return Err(SvidError::Mint(format!("URI SAN {uri:?} is not ASCII")));
        }
        if let Some(name) = req.dns_names.iter().find(|n| !n.is_ascii()) {
            return Err(SvidError::Mint(format!("DNS name {name:?} is not ASCII")));
        }
        let attributes = if req.attributes.is_empty() {
            None
        } else {
            Some(encode_attributes(req.attributes)?)
        };
        self.encode(
            &random_serial()?,
            not_before,
            not_after,
            subject,
            req,
            attributes.as_deref(),
        )
    }

    /// The leaf of [`Self::sign_key`] once its parts are checked.
    fn encode(
        &self,
        serial: &[u8],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        subject: SubjectKey<'_>,
        req: &SvidRequest<'_>,
        attributes: Option<&[u8]>,
    ) -> Result<Vec<u8>, SvidError> {
        self.template.sign(
            &LeafParts {
                serial,
                not_before,
                not_after,
                spki: subject.spki_der(),
                uri: req.spiffe_id.as_str(),
                dns_names: req.dns_names,
                attributes,
            },
            self.key,
        )
    }
}

/// Builds a PKCS#10 CSR for `key`, signed by it. Subject and SANs are left
/// empty: the server decides the identity and only takes the public key.
/// The key must be P-256 ([`SvidError::WrongKeyAlgorithm`] otherwise).
pub fn make_csr(key: &PrivateKey) -> Result<Vec<u8>, SvidError> {
    let signer = RcgenKey::new(key, "a CSR")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&signer)
        .map_err(|e| SvidError::Mint(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// Parses a CSR, verifies its self-signature (proof that the requester holds
/// the private key) and returns its SubjectPublicKeyInfo DER: [`CheckedCsr::check`].
pub fn csr_public_key(csr_der: &[u8]) -> Result<Vec<u8>, SvidError> {
    CheckedCsr::check(csr_der).map(|csr| csr.key().spki_der().to_vec())
}

/// Checks the X509-SVID leaf rules (spiffe.md §2.3 rules 2 and 3, §2.1): not a
/// CA, no keyCertSign or cRLSign, digitalSignature set, exactly one URI SAN
/// that is a SPIFFE ID with a path. Returns that ID. Does not check the chain.
pub fn check_leaf_rules(leaf_der: &[u8]) -> Result<SpiffeId, SvidError> {
    let cert = parse_cert(leaf_der)?;
    if basic_constraints_ca(&cert)? {
        return Err(SvidError::LeafIsCa);
    }
    match key_usage(&cert)? {
        Some(ku) if ku.key_cert_sign() || ku.crl_sign() => return Err(SvidError::LeafCanSign),
        Some(ku) if ku.digital_signature() => {}
        _ => return Err(SvidError::LeafNoDigitalSignature),
    }
    leaf_spiffe_id(&cert)
}

/// Full validation of an X509-SVID: RFC 5280 path validation of `chain` (leaf
/// first, then intermediates) against `roots` (DER CA certificates of the
/// leaf's trust domain) at time `now`, with EKU clientAuth or serverAuth (or
/// none); every certificate after the leaf must be a CA with keyCertSign
/// (§2.2); then [`check_leaf_rules`]. Returns the leaf's SPIFFE ID.
pub fn verify_svid(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: SystemTime,
) -> Result<SpiffeId, SvidError> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(SvidError::EmptyChain);
    };
    if chain.len() > MAX_CHAIN_LEN {
        return Err(SvidError::ChainTooLong(chain.len()));
    }
    if roots.is_empty() {
        let td = cert_info(leaf)?.spiffe_id.map_or_else(
            || "of the leaf".to_owned(),
            |id| id.trust_domain().to_string(),
        );
        return Err(SvidError::NoRoots(td));
    }
    for (i, der) in intermediates.iter().enumerate() {
        check_intermediate(der, i + 1)?;
    }
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let anchors = trust_anchors(&root_ders)?;
    let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(map_webpki_error)?;
    ee.verify_for_usage(
        SUPPORTED_ALGS.all,
        &anchors,
        &intermediates,
        unix_time(now)?,
        SvidEku,
        None,
        None,
    )
    .map_err(map_webpki_error)?;
    check_leaf_rules(leaf)
}

/// The identity attributes of an X509-SVID, from its [`ATTRIBUTES_OID`]
/// extension, sorted by name; empty when the extension is absent. Fails with
/// [`SvidError::SvidAttributes`] when the extension is malformed (bad DER,
/// unsorted or duplicate names, an empty name, invalid UTF-8) or repeated.
/// Does not verify the certificate.
pub fn svid_attributes(cert_der: &[u8]) -> Result<Vec<(String, String)>, SvidError> {
    let cert = parse_cert(cert_der)?;
    let mut found = cert
        .iter_extensions()
        .filter(|ext| ext.oid.to_id_string() == ATTRIBUTES_OID_STR);
    let Some(ext) = found.next() else {
        return Ok(Vec::new());
    };
    if found.next().is_some() {
        return Err(SvidError::SvidAttributes(
            "the extension appears more than once".to_owned(),
        ));
    }
    decode_attributes(ext.value)
}

/// DER of the attributes extension's value: sorted by name, names non-empty and unique.
fn encode_attributes(attributes: &[(String, String)]) -> Result<Vec<u8>, SvidError> {
    let mut sorted: Vec<&(String, String)> = attributes.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut items = Vec::new();
    for (i, (name, value)) in sorted.iter().map(|a| (&a.0, &a.1)).enumerate() {
        if name.is_empty() {
            return Err(SvidError::SvidAttributes(
                "an attribute name is empty".to_owned(),
            ));
        }
        if i > 0 && sorted[i - 1].0 == *name {
            return Err(SvidError::SvidAttributes(format!(
                "attribute {name:?} is given more than once"
            )));
        }
        let mut pair = Vec::new();
        der::write_tlv(TAG_UTF8_STRING, name.as_bytes(), &mut pair);
        der::write_tlv(TAG_UTF8_STRING, value.as_bytes(), &mut pair);
        der::write_tlv(TAG_SEQUENCE, &pair, &mut items);
    }
    let mut out = Vec::new();
    der::write_tlv(TAG_SEQUENCE, &items, &mut out);
    Ok(out)
}

/// Parses the attributes extension's value, holding it to what
/// [`encode_attributes`] writes.
fn decode_attributes(value: &[u8]) -> Result<Vec<(String, String)>, SvidError> {
    let bad = |e: SvidError| SvidError::SvidAttributes(e.to_string());
    let (outer, trailing) = der::expect(value, TAG_SEQUENCE, "SEQUENCE OF").map_err(bad)?;
    if !trailing.is_empty() {
        return Err(SvidError::SvidAttributes(
            "trailing bytes after the value".to_owned(),
        ));
    }
    let utf8 = |input| -> Result<(String, &[u8]), SvidError> {
        let (tlv, rest) = der::expect(input, TAG_UTF8_STRING, "UTF8String").map_err(bad)?;
        let s = std::str::from_utf8(tlv.contents)
            .map_err(|e| SvidError::SvidAttributes(format!("invalid UTF-8: {e}")))?;
        Ok((s.to_owned(), rest))
    };
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = outer.contents;
    while !rest.is_empty() {
        let (item, tail) = der::expect(rest, TAG_SEQUENCE, "attribute").map_err(bad)?;
        rest = tail;
        let (name, after_name) = utf8(item.contents)?;
        let (value, after_value) = utf8(after_name)?;
        if !after_value.is_empty() {
            return Err(SvidError::SvidAttributes(format!(
                "attribute {name:?} has more than a name and a value"
            )));
        }
        if name.is_empty() {
            return Err(SvidError::SvidAttributes(
                "an attribute name is empty".to_owned(),
            ));
        }
        if let Some((prev, _)) = out.last()
            && *prev >= name
        {
            return Err(SvidError::SvidAttributes(format!(
                "attribute {name:?} is out of order or repeated"
            )));
        }
        out.push((name, value));
    }
    Ok(out)
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and
/// `bundle` format) into single certificates, each checked to parse.
pub fn split_der_certs(concat: &[u8]) -> Result<Vec<Vec<u8>>, SvidError> {
    let mut rest = concat;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (tlv, tail) = der::expect(rest, TAG_SEQUENCE, "Certificate")?;
        parse_cert(tlv.whole)?;
        out.push(tlv.whole.to_vec());
        rest = tail;
    }
    if out.is_empty() {
        return Err(SvidError::Der("no certificates".to_owned()));
    }
    Ok(out)
}

/// SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

// --- helpers shared with the other modules ---------------------------------

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SvidError::CertParse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::CertParse(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

/// The URI SANs of a certificate, in order.
pub(crate) fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::CertParse(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The single SPIFFE ID of a leaf: exactly one URI SAN, a SPIFFE ID with a path.
pub(crate) fn leaf_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris = uri_sans(cert)?;
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    let id: SpiffeId = uri.parse().map_err(|reason| SvidError::BadUriSan {
        uri: (*uri).to_owned(),
        reason,
    })?;
    if id.is_root() {
        return Err(SvidError::LeafRootId(id.to_string()));
    }
    Ok(id)
}

/// Trust anchors for webpki from DER root certificates.
pub(crate) fn trust_anchors<'a>(
    roots: &'a [CertificateDer<'a>],
) -> Result<Vec<TrustAnchor<'a>>, SvidError> {
    roots
        .iter()
        .enumerate()
        .map(|(i, r)| {
            webpki::anchor_from_trusted_cert(r)
                .map_err(|e| SvidError::CertParse(format!("trusted root {i}: {e:?}")))
        })
        .collect()
}

/// Converts a certificate time.
pub(crate) fn asn1_to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// Converts a `SystemTime` for webpki and rustls.
pub(crate) fn unix_time(t: SystemTime) -> Result<UnixTime, SvidError> {
    t.duration_since(UNIX_EPOCH)
        .map(UnixTime::since_unix_epoch)
        .map_err(|_| SvidError::Mint("time before 1970".to_owned()))
}

/// Converts a `SystemTime` for rcgen.
fn to_offset(t: SystemTime) -> Result<OffsetDateTime, SvidError> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()),
        Err(e) => i64::try_from(e.duration().as_secs()).map(|s| -s),
    }
    .map_err(|_| SvidError::Mint("time out of range".to_owned()))?;
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| SvidError::Mint(e.to_string()))
}

fn checked_add(t: SystemTime, d: Duration) -> Result<SystemTime, SvidError> {
    t.checked_add(d)
        .ok_or_else(|| SvidError::Mint("time out of range".to_owned()))
}

fn checked_sub(t: SystemTime, d: Duration) -> Result<SystemTime, SvidError> {
    t.checked_sub(d)
        .ok_or_else(|| SvidError::Mint("time out of range".to_owned()))
}

fn uri_san(uri: &str) -> Result<SanType, SvidError> {
    uri.try_into()
        .map(SanType::URI)
        .map_err(|e: rcgen::Error| SvidError::Mint(format!("URI SAN {uri:?}: {e}")))
}

/// 16 random bytes with the top bit cleared (a positive INTEGER) and never
/// zero, as SPIRE does: serials in [1, 2^127).
fn random_serial() -> Result<[u8; 16], SvidError> {
    loop {
        let mut serial = [0u8; 16];
        aws_lc_rs::rand::fill(&mut serial)
            .map_err(|_| SvidError::Crypto("random number generator failed"))?;
        serial[0] &= 0x7f;
        if serial.iter().any(|&b| b != 0) {
            return Ok(serial);
        }
    }
}

/// Hex of a serial's magnitude, without the leading zero bytes DER may add.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    hex::encode(&raw[start..])
}

fn basic_constraints_ca(cert: &X509Certificate<'_>) -> Result<bool, SvidError> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| SvidError::CertParse(format!("basicConstraints: {e}")))?;
    Ok(bc.is_some_and(|b| b.value.ca))
}

fn key_usage<'a>(
    cert: &'a X509Certificate<'_>,
) -> Result<Option<&'a x509_parser::extensions::KeyUsage>, SvidError> {
    Ok(cert
        .key_usage()
        .map_err(|e| SvidError::CertParse(format!("keyUsage: {e}")))?
        .map(|ext| ext.value))
}

/// Every certificate after the leaf must be a CA allowed to sign (§2.2).
pub(crate) fn check_intermediate(der: &[u8], index: usize) -> Result<(), SvidError> {
    let cert = parse_cert(der)?;
    let can_sign = key_usage(&cert)?.is_some_and(|ku| ku.key_cert_sign());
    if basic_constraints_ca(&cert)? && can_sign {
        Ok(())
    } else {
        Err(SvidError::IntermediateNotCa(index))
    }
}

pub(crate) fn map_webpki_error(e: webpki::Error) -> SvidError {
    match e {
        webpki::Error::CertExpired { .. } => SvidError::Expired,
        webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid,
        webpki::Error::UnknownIssuer => SvidError::UntrustedIssuer,
        webpki::Error::CaUsedAsEndEntity => SvidError::LeafIsCa,
        other => SvidError::ChainInvalid(format!("{other:?}")),
    }
}

/// EKU policy for SVIDs: absent, or containing serverAuth or clientAuth.
///
/// webpki applies it to every certificate of the path; CAs carry no EKU
/// (spiffe.md §2.2), so they pass as "absent".
pub(crate) struct SvidEku;

const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

impl webpki::ExtendedKeyUsageValidator for SvidEku {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let server = webpki::KeyPurposeId::new(EKU_SERVER_AUTH);
        let client = webpki::KeyPurposeId::new(EKU_CLIENT_AUTH);
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if id == server || id == client {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: webpki::KeyUsage::client_auth(),
                present,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CustomExtension, ExtendedKeyUsagePurpose, Issuer};

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn now() -> SystemTime {
        // A fixed instant keeps times reproducible; whole seconds avoid rounding.
        UNIX_EPOCH + Duration::from_secs(1_750_000_000)
    }

    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR: Duration = Duration::from_secs(3_600);

    fn ca() -> X509Authority {
        X509Authority::generate(&td(), DAY, now()).unwrap()
    }

    fn mint(ca: &X509Authority, spiffe_id: &SpiffeId, dns: &[String], ttl: Duration) -> Vec<u8> {
        let key = PrivateKey::generate_p256().unwrap();
        let req = SvidRequest {
            spiffe_id,
            dns_names: dns,
            ttl,
            attributes: &[],
        };
        ca.sign_svid(&req, &key.public_key_spki_der(), now())
            .unwrap()
    }

    /// A hand-built leaf signed by `ca`, for breaking one rule at a time.
    fn hand_built(
        ca: &X509Authority,
        is_ca: IsCa,
        usages: Vec<KeyUsagePurpose>,
        uris: &[&str],
    ) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.not_before = to_offset(now() - HOUR).unwrap();
        params.not_after = to_offset(now() + HOUR).unwrap();
        params.is_ca = is_ca;
        params.key_usages = usages;
        params.subject_alt_names = uris.iter().map(|u| uri_san(u).unwrap()).collect();
        params.use_authority_key_identifier_extension = true;
        let key = PrivateKey::generate_p256().unwrap();
        let issuer = Issuer::from_ca_cert_der(
            &CertificateDer::from(ca.cert_der()),
            RcgenKey::new(ca.key(), "test").unwrap(),
        )
        .unwrap();
        params
            .signed_by(&RcgenKey::new(&key, "test").unwrap(), &issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        parse_cert(der).unwrap()
    }

    #[test]
    fn ca_follows_section_2_2() {
        let ca = ca();
        let cert = parse(ca.cert_der());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        assert!(cert.extended_key_usage().unwrap().is_none());
        assert!(cert.name_constraints().unwrap().is_none());
        assert_eq!(uri_sans(&cert).unwrap(), vec!["spiffe://example.org"]);
        let info = ca.info();
        assert_eq!(info.spiffe_id, Some(id("spiffe://example.org")));
        assert!(info.subject_key_id.as_ref().is_some_and(|k| !k.is_empty()));
        assert_eq!(info.not_before, now() - BACKDATE);
        assert_eq!(info.not_after, now() + DAY);
        assert_eq!(cert.raw_serial()[0] & 0x80, 0, "serial is positive");
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(
            cn,
            format!("sigil example.org CA {}", &info.serial_hex[..8])
        );
        let org = cert
            .subject()
            .iter_organization()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(org, "sigil");
        assert_ne!(
            ca.cert_der(),
            self::ca().cert_der(),
            "subjects/serials differ"
        );
        assert!(!format!("{ca:?}").contains("PrivateKey"));
    }

    #[test]
    fn from_parts_checks_key_and_ca() {
        let ca = ca();
        assert!(X509Authority::from_parts(ca.cert_der().to_vec(), ca.key().clone()).is_ok());
        let other = PrivateKey::generate_p256().unwrap();
        assert_eq!(
            X509Authority::from_parts(ca.cert_der().to_vec(), other).unwrap_err(),
            SvidError::KeyMismatch
        );
        let leaf = mint(&ca, &id("spiffe://example.org/w"), &[], HOUR);
        assert!(matches!(
            X509Authority::from_parts(leaf, ca.key().clone()),
            Err(SvidError::NotCa(_))
        ));
    }

    #[test]
    fn minted_leaf_verifies_against_its_root_only() {
        let ca = ca();
        let wid = id("spiffe://example.org/ns/web");
        let leaf = mint(&ca, &wid, &[], HOUR);
        let got = verify_svid(
            std::slice::from_ref(&leaf),
            &[ca.cert_der().to_vec()],
            now(),
        )
        .unwrap();
        assert_eq!(got, wid);

        let stranger = self::ca();
        assert_eq!(
            verify_svid(
                std::slice::from_ref(&leaf),
                &[stranger.cert_der().to_vec()],
                now()
            )
            .unwrap_err(),
            SvidError::UntrustedIssuer
        );
        assert_eq!(
            verify_svid(std::slice::from_ref(&leaf), &[], now()).unwrap_err(),
            SvidError::NoRoots("example.org".to_owned())
        );
        assert_eq!(
            verify_svid(&[], &[], now()).unwrap_err(),
            SvidError::EmptyChain
        );
        // Trusting both authorities still finds the right one.
        let roots = [stranger.cert_der().to_vec(), ca.cert_der().to_vec()];
        assert_eq!(verify_svid(&[leaf], &roots, now()).unwrap(), wid);
    }

    #[test]
    fn one_leaf_signer_signs_many_leaves_under_the_same_rules() {
        let ca = ca();
        let signer = ca.leaf_signer().unwrap();
        let mut serials = std::collections::HashSet::new();
        for i in 0..3 {
            let wid = id(&format!("spiffe://example.org/w{i}"));
            let key = PrivateKey::generate_p256().unwrap();
            let leaf = signer
                .sign_svid(
                    &SvidRequest::new(&wid, HOUR),
                    &key.public_key_spki_der(),
                    now(),
                )
                .unwrap();
            let roots = [ca.cert_der().to_vec()];
            assert_eq!(
                verify_svid(std::slice::from_ref(&leaf), &roots, now()).unwrap(),
                wid
            );
            assert!(serials.insert(cert_info(&leaf).unwrap().serial_hex));
        }
        // The checks of sign_svid hold for every leaf of the signer.
        let key = PrivateKey::generate_p256().unwrap();
        let spki = key.public_key_spki_der();
        let root = id("spiffe://example.org");
        assert!(matches!(
            signer.sign_svid(&SvidRequest::new(&root, HOUR), &spki, now()),
            Err(SvidError::LeafRootId(_))
        ));
        let foreign = id("spiffe://other.org/w");
        assert!(matches!(
            signer.sign_svid(&SvidRequest::new(&foreign, HOUR), &spki, now()),
            Err(SvidError::Mint(_))
        ));
        assert!(matches!(
            signer.sign_svid(
                &SvidRequest::new(&id("spiffe://example.org/w"), HOUR),
                &spki,
                now() + DAY
            ),
            Err(SvidError::Mint(_))
        ));
    }

    #[test]
    fn expired_and_not_yet_valid_leaves_are_rejected() {
        let ca = ca();
        let leaf = mint(&ca, &id("spiffe://example.org/w"), &[], HOUR);
        let roots = [ca.cert_der().to_vec()];
        assert_eq!(
            verify_svid(std::slice::from_ref(&leaf), &roots, now() + 2 * HOUR).unwrap_err(),
            SvidError::Expired
        );
        assert_eq!(
            verify_svid(std::slice::from_ref(&leaf), &roots, now() - HOUR).unwrap_err(),
            SvidError::NotYetValid
        );
        // Within the backdating window it is already valid.
        assert!(verify_svid(&[leaf], &roots, now() - Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn leaf_follows_section_2_1() {
        let ca = ca();
        let dns = vec!["web.example.org".to_owned(), "web".to_owned()];
        let leaf = mint(&ca, &id("spiffe://example.org/ns/web"), &dns, HOUR);
        let cert = parse(&leaf);

        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca, "cA=false present and critical");
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);

        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        let dns_sans: Vec<_> = names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(dns_sans, vec!["web.example.org", "web"]);
        assert_eq!(
            uri_sans(&cert).unwrap(),
            vec!["spiffe://example.org/ns/web"]
        );
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "web.example.org");

        let info = cert_info(&leaf).unwrap();
        assert_eq!(info.not_before, now() - BACKDATE);
        assert_eq!(info.not_after, now() + HOUR);
        assert!(!info.is_ca);
        let aki = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
                _ => None,
            })
            .unwrap();
        assert_eq!(Some(aki.0.to_vec()), ca.info().subject_key_id);
        assert!(info.subject_key_id.is_some());
        assert_eq!(
            cert.issuer().as_raw(),
            parse(ca.cert_der()).subject().as_raw()
        );
    }

    #[test]
    fn leaf_without_dns_has_no_cn() {
        let ca = ca();
        let leaf = mint(&ca, &id("spiffe://example.org/w"), &[], HOUR);
        let cert = parse(&leaf);
        assert!(cert.subject().iter_common_name().next().is_none());
        assert_eq!(uri_sans(&cert).unwrap().len(), 1);
    }

    #[test]
    fn not_after_is_capped_at_the_ca() {
        let ca = ca();
        let leaf = mint(&ca, &id("spiffe://example.org/w"), &[], 30 * DAY);
        assert_eq!(cert_info(&leaf).unwrap().not_after, ca.info().not_after);
    }

    #[test]
    fn serials_are_positive_and_distinct() {
        let ca = ca();
        let wid = id("spiffe://example.org/w");
        let a = mint(&ca, &wid, &[], HOUR);
        let b = mint(&ca, &wid, &[], HOUR);
        for der in [&a, &b] {
            let raw = parse(der).raw_serial().to_vec();
            assert!(raw.len() <= 20);
            assert_eq!(raw[0] & 0x80, 0, "positive");
            assert!(raw.iter().any(|&x| x != 0), "nonzero");
        }
        assert_ne!(
            cert_info(&a).unwrap().serial_hex,
            cert_info(&b).unwrap().serial_hex
        );
    }

    #[test]
    fn refuses_to_mint_root_or_foreign_ids() {
        let ca = ca();
        let key = PrivateKey::generate_p256().unwrap();
        let spki = key.public_key_spki_der();
        let root = id("spiffe://example.org");
        let req = SvidRequest {
            spiffe_id: &root,
            dns_names: &[],
            ttl: HOUR,
            attributes: &[],
        };
        assert!(matches!(
            ca.sign_svid(&req, &spki, now()),
            Err(SvidError::LeafRootId(_))
        ));
        let foreign = id("spiffe://other.org/w");
        let req = SvidRequest {
            spiffe_id: &foreign,
            ..req
        };
        assert!(matches!(
            ca.sign_svid(&req, &spki, now()),
            Err(SvidError::Mint(_))
        ));
        assert!(matches!(
            ca.sign_svid(
                &SvidRequest {
                    spiffe_id: &id("spiffe://example.org/w"),
                    dns_names: &[],
                    ttl: HOUR,
                    attributes: &[],
                },
                b"garbage",
                now()
            ),
            Err(SvidError::PublicKey(_))
        ));
    }

    /// One negative fixture per leaf rule (spiffe.md §2.3 rules 2 and 3, §2.1).
    #[test]
    fn leaf_rules_each_violation_is_rejected() {
        use KeyUsagePurpose::*;
        let ca = ca();
        let good = ["spiffe://example.org/w"];
        let roots = [ca.cert_der().to_vec()];

        let ok = hand_built(&ca, IsCa::ExplicitNoCa, vec![DigitalSignature], &good);
        assert_eq!(check_leaf_rules(&ok).unwrap(), id("spiffe://example.org/w"));
        assert!(verify_svid(&[ok], &roots, now()).is_ok());

        let cases: Vec<(&str, Vec<u8>, SvidError)> = vec![
            (
                "cA=true",
                hand_built(
                    &ca,
                    IsCa::Ca(BasicConstraints::Unconstrained),
                    vec![DigitalSignature],
                    &good,
                ),
                SvidError::LeafIsCa,
            ),
            (
                "keyCertSign",
                hand_built(
                    &ca,
                    IsCa::ExplicitNoCa,
                    vec![DigitalSignature, KeyCertSign],
                    &good,
                ),
                SvidError::LeafCanSign,
            ),
            (
                "cRLSign",
                hand_built(
                    &ca,
                    IsCa::ExplicitNoCa,
                    vec![DigitalSignature, CrlSign],
                    &good,
                ),
                SvidError::LeafCanSign,
            ),
            (
                "no digitalSignature",
                hand_built(&ca, IsCa::ExplicitNoCa, vec![KeyAgreement], &good),
                SvidError::LeafNoDigitalSignature,
            ),
            (
                "no keyUsage",
                hand_built(&ca, IsCa::ExplicitNoCa, vec![], &good),
                SvidError::LeafNoDigitalSignature,
            ),
            (
                "no URI SAN",
                hand_built(&ca, IsCa::ExplicitNoCa, vec![DigitalSignature], &[]),
                SvidError::UriSanCount(0),
            ),
            (
                "two URI SANs",
                hand_built(
                    &ca,
                    IsCa::ExplicitNoCa,
                    vec![DigitalSignature],
                    &["spiffe://example.org/a", "spiffe://example.org/b"],
                ),
                SvidError::UriSanCount(2),
            ),
            (
                "root SPIFFE ID",
                hand_built(
                    &ca,
                    IsCa::ExplicitNoCa,
                    vec![DigitalSignature],
                    &["spiffe://example.org"],
                ),
                SvidError::LeafRootId("spiffe://example.org".to_owned()),
            ),
        ];
        for (name, der, want) in cases {
            assert_eq!(check_leaf_rules(&der).unwrap_err(), want, "{name}");
            // The full verifier applies the same rules after the chain check.
            assert_eq!(
                verify_svid(&[der], &roots, now()).unwrap_err(),
                want,
                "{name} (verify)"
            );
        }

        let https = hand_built(
            &ca,
            IsCa::ExplicitNoCa,
            vec![DigitalSignature],
            &["https://example.org/w"],
        );
        assert!(matches!(
            check_leaf_rules(&https),
            Err(SvidError::BadUriSan { .. })
        ));
    }

    #[test]
    fn chain_through_an_intermediate() {
        let root = ca();
        // An intermediate CA signed by the root.
        let int_key = PrivateKey::generate_p256().unwrap();
        let mut params = CertificateParams::default();
        params.not_before = to_offset(now() - HOUR).unwrap();
        params.not_after = to_offset(now() + DAY).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri_san("spiffe://example.org").unwrap()];
        params.use_authority_key_identifier_extension = true;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "intermediate");
        params.distinguished_name = dn;
        let issuer = Issuer::from_ca_cert_der(
            &CertificateDer::from(root.cert_der()),
            RcgenKey::new(root.key(), "test").unwrap(),
        )
        .unwrap();
        let int_der = params
            .signed_by(&RcgenKey::new(&int_key, "test").unwrap(), &issuer)
            .unwrap()
            .der()
            .to_vec();
        let int = X509Authority::from_parts(int_der.clone(), int_key).unwrap();

        let wid = id("spiffe://example.org/w");
        let leaf = mint(&int, &wid, &[], HOUR);
        let roots = [root.cert_der().to_vec()];
        assert_eq!(
            verify_svid(&[leaf.clone(), int_der], &roots, now()).unwrap(),
            wid
        );
        assert_eq!(
            verify_svid(std::slice::from_ref(&leaf), &roots, now()).unwrap_err(),
            SvidError::UntrustedIssuer
        );
        // A leaf in the intermediate position is refused (§2.2).
        let other_leaf = mint(&root, &wid, &[], HOUR);
        assert_eq!(
            verify_svid(&[leaf, other_leaf], &roots, now()).unwrap_err(),
            SvidError::IntermediateNotCa(1)
        );
    }

    /// The leaf rcgen built for the same parameters, as `sign_svid` did
    /// before `leaf.rs`: the reference the direct encoding is held to.
    fn rcgen_leaf(
        ca: &X509Authority,
        req: &SvidRequest<'_>,
        spki: &[u8],
        serial: &[u8],
        now: SystemTime,
    ) -> Vec<u8> {
        let subject_key = rcgen::SubjectPublicKeyInfo::from_der(spki).unwrap();
        let mut params = CertificateParams::default();
        params.not_before = to_offset(now - BACKDATE).unwrap();
        params.not_after = to_offset((now + req.ttl).min(ca.info().not_after)).unwrap();
        params.serial_number = Some(SerialNumber::from_slice(serial));
        let mut sans = vec![uri_san(req.spiffe_id.as_str()).unwrap()];
        for name in req.dns_names {
            sans.push(SanType::DnsName(name.as_str().try_into().unwrap()));
        }
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, SUBJECT_ORG);
        if let Some(first) = req.dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if !req.attributes.is_empty() {
            let mut ext = CustomExtension::from_oid_content(
                ATTRIBUTES_OID,
                encode_attributes(req.attributes).unwrap(),
            );
            ext.set_criticality(false);
            params.custom_extensions.push(ext);
        }
        let issuer = Issuer::from_ca_cert_der(
            &CertificateDer::from(ca.cert_der()),
            RcgenKey::new(ca.key(), "test").unwrap(),
        )
        .unwrap();
        params
            .signed_by(&subject_key, &issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn leaf_encoding_matches_rcgen() {
        // Valid past 2050, so notAfter can be a GeneralizedTime.
        let ca = X509Authority::generate(&td(), 40 * 365 * DAY, now()).unwrap();
        let signer = ca.leaf_signer().unwrap();
        let wid = id("spiffe://example.org/ns/web");
        let dns = vec!["web.example.org".to_owned(), "web".to_owned()];
        let attributes = vec![
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "x".repeat(300)),
        ];
        let ec = PrivateKey::generate_p256().unwrap().public_key_spki_der();
        let rsa = PrivateKey::generate_rsa2048()
            .unwrap()
            .public_key_spki_der();
        let mut high = [0x85; 16];
        high[..2].copy_from_slice(&[0, 0]);
        /// DNS names, attributes, TTL, subject SPKI, serial.
        type Case<'a> = (
            &'a [String],
            &'a [(String, String)],
            Duration,
            &'a [u8],
            &'a [u8],
        );
        let cases: [Case<'_>; 5] = [
            (&[], &[], HOUR, &ec, &[0x01; 16]),
            (&dns, &[], HOUR, &ec, &high),
            (&dns[1..], &attributes, DAY, &rsa, &[0x7f; 16]),
            (&[], &attributes, 30 * 365 * DAY, &ec, &[0, 0, 0, 1]),
            (&dns, &attributes, 100 * 365 * DAY, &rsa, &[0x40; 16]),
        ];
        for (i, (dns_names, attributes, ttl, spki, serial)) in cases.into_iter().enumerate() {
            let req = SvidRequest {
                spiffe_id: &wid,
                dns_names,
                ttl,
                attributes,
            };
            let ours = signer
                .encode(
                    serial,
                    to_offset(now() - BACKDATE).unwrap(),
                    to_offset((now() + ttl).min(ca.info().not_after)).unwrap(),
                    SubjectKey::from_spki_der(spki).unwrap(),
                    &req,
                    (!attributes.is_empty())
                        .then(|| encode_attributes(attributes).unwrap())
                        .as_deref(),
                )
                .unwrap();
            let reference = rcgen_leaf(&ca, &req, spki, serial, now());
            let (a, b) = (parse(&ours), parse(&reference));
            assert_eq!(
                a.tbs_certificate.as_ref(),
                b.tbs_certificate.as_ref(),
                "case {i}"
            );
            assert_eq!(
                a.signature_algorithm.algorithm, b.signature_algorithm.algorithm,
                "case {i}"
            );
            let roots = [ca.cert_der().to_vec()];
            assert_eq!(
                verify_svid(&[ours], &roots, now()).unwrap(),
                wid,
                "case {i}"
            );
        }
    }

    #[test]
    fn subject_keys_of_other_types_are_refused() {
        let ec = PrivateKey::generate_p256().unwrap().public_key_spki_der();
        assert!(SubjectKey::from_spki_der(&ec).is_ok());
        let rsa = PrivateKey::generate_rsa2048().unwrap();
        assert!(SubjectKey::from_spki_der(&rsa.public_key_spki_der()).is_ok());
        // An SPKI with an algorithm no verifier knows (1.2.3.4).
        let mut unknown = Vec::new();
        der::write_tlv(TAG_SEQUENCE, &[0x06, 0x03, 0x2a, 0x03, 0x04], &mut unknown);
        der::write_tlv(der::TAG_BIT_STRING, &[0, 4, 1, 2], &mut unknown);
        let mut spki = Vec::new();
        der::write_tlv(TAG_SEQUENCE, &unknown, &mut spki);
        assert!(matches!(
            SubjectKey::from_spki_der(&spki),
            Err(SvidError::PublicKey(_))
        ));
        let mut trailing = ec.clone();
        trailing.push(0);
        for bad in [&trailing[..], &ec[..ec.len() - 1], b"", b"garbage"] {
            assert!(matches!(
                SubjectKey::from_spki_der(bad),
                Err(SvidError::PublicKey(_))
            ));
        }
        let ca = ca();
        let wid = id("spiffe://example.org/w");
        let req = SvidRequest::new(&wid, HOUR);
        assert!(matches!(
            ca.sign_svid(&req, &spki, now()),
            Err(SvidError::PublicKey(_))
        ));
    }

    #[test]
    fn a_checked_csr_carries_the_key_it_proved() {
        let key = PrivateKey::generate_p256().unwrap();
        let csr = make_csr(&key).unwrap();
        let checked = CheckedCsr::check(&csr).unwrap();
        assert_eq!(checked.key().spki_der(), key.public_key_spki_der());
        let ca = ca();
        let wid = id("spiffe://example.org/w");
        let leaf = ca
            .leaf_signer()
            .unwrap()
            .sign_csr(&SvidRequest::new(&wid, HOUR), &checked, now())
            .unwrap();
        let cert = parse(&leaf);
        assert_eq!(cert.public_key().raw, key.public_key_spki_der());
        // A CSR whose version is not v1 (0) is refused, signed or not: the
        // version is the first element of the signed part.
        let pos = csr
            .windows(3)
            .position(|w| w == [0x02, 0x01, 0x00])
            .unwrap();
        let mut v2 = csr.clone();
        v2[pos + 2] = 1;
        assert!(matches!(CheckedCsr::check(&v2), Err(SvidError::Csr(_))));
    }

    #[test]
    fn csr_round_trip_and_tamper() {
        let key = PrivateKey::generate_p256().unwrap();
        let csr = make_csr(&key).unwrap();
        assert_eq!(csr_public_key(&csr).unwrap(), key.public_key_spki_der());

        // Flip one byte inside the signature (the last byte of the DER).
        let mut bad = csr.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert!(csr_public_key(&bad).is_err());

        // Tampering with the signed part (the public key) must fail too.
        let spki = key.public_key_spki_der();
        let pos = csr
            .windows(spki.len())
            .position(|w| w == spki.as_slice())
            .unwrap();
        let mut swapped = csr.clone();
        swapped[pos + spki.len() - 1] ^= 0x01;
        assert!(csr_public_key(&swapped).is_err());

        assert!(csr_public_key(b"").is_err());
        let mut trailing = csr;
        trailing.push(0);
        assert!(csr_public_key(&trailing).is_err());
    }

    #[test]
    fn csr_signature_flip_is_a_signature_error() {
        let key = PrivateKey::generate_p256().unwrap();
        let csr = make_csr(&key).unwrap();
        // The ECDSA signature is a DER SEQUENCE of two INTEGERs at the end;
        // flip a byte of the last INTEGER's value, keeping the encoding valid.
        let mut bad = csr.clone();
        let idx = bad.len() - 2;
        bad[idx] ^= 0x40;
        assert_eq!(csr_public_key(&bad).unwrap_err(), SvidError::CsrSignature);
    }

    #[test]
    fn split_concatenated_der() {
        let ca = ca();
        let a = ca.cert_der().to_vec();
        let b = mint(&ca, &id("spiffe://example.org/w"), &[], HOUR);
        let concat = [a.clone(), b.clone()].concat();
        assert_eq!(split_der_certs(&concat).unwrap(), vec![a.clone(), b]);
        assert!(split_der_certs(&[]).is_err());
        assert!(split_der_certs(&a[..a.len() - 1]).is_err());
        let mut junk = a;
        junk.push(0x30);
        assert!(split_der_certs(&junk).is_err());
    }

    #[test]
    fn attributes_encode_sorted_and_decode_back() {
        let given = vec![
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "x".repeat(200)),
        ];
        let der = encode_attributes(&given).unwrap();
        assert_eq!(der[0], 0x30);
        let mut want = given.clone();
        want.sort();
        assert_eq!(decode_attributes(&der).unwrap(), want);
        assert_eq!(
            encode_attributes(&[]).unwrap(),
            [0x30, 0x00],
            "an empty list is still valid DER (but is never written)"
        );
        assert!(decode_attributes(&[0x30, 0x00]).unwrap().is_empty());
        // Exact bytes for one short pair.
        assert_eq!(
            encode_attributes(&[("k".to_owned(), "v".to_owned())]).unwrap(),
            [0x30, 0x08, 0x30, 0x06, 0x0c, 0x01, b'k', 0x0c, 0x01, b'v']
        );
    }

    #[test]
    fn minted_attributes_are_read_back_and_absent_by_default() {
        let ca = ca();
        let wid = id("spiffe://example.org/w");
        let attributes = vec![
            ("z".to_owned(), "1".to_owned()),
            ("a".to_owned(), "2".to_owned()),
        ];
        let key = PrivateKey::generate_p256().unwrap();
        let req = SvidRequest {
            attributes: &attributes,
            ..SvidRequest::new(&wid, HOUR)
        };
        let leaf = ca
            .sign_svid(&req, &key.public_key_spki_der(), now())
            .unwrap();
        assert_eq!(
            svid_attributes(&leaf).unwrap(),
            vec![
                ("a".to_owned(), "2".to_owned()),
                ("z".to_owned(), "1".to_owned())
            ]
        );
        assert_eq!(check_leaf_rules(&leaf).unwrap(), wid);
        let plain = mint(&ca, &wid, &[], HOUR);
        assert!(svid_attributes(&plain).unwrap().is_empty());
        // The attributes are the only extension added.
        assert_eq!(
            parse(&leaf).extensions().len(),
            parse(&plain).extensions().len() + 1
        );
        assert_eq!(
            verify_svid(&[leaf], &[ca.cert_der().to_vec()], now()).unwrap(),
            wid
        );
    }

    #[test]
    fn rsa_keys_cannot_mint_certificates_or_csrs() {
        let rsa = PrivateKey::generate_rsa2048().unwrap();
        let ca = ca();
        let err = X509Authority::from_parts(ca.cert_der().to_vec(), rsa.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                SvidError::WrongKeyAlgorithm {
                    found: crate::keys::KeyAlgorithm::Rsa2048,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            make_csr(&rsa),
            Err(SvidError::WrongKeyAlgorithm {
                operation: "a CSR",
                ..
            })
        ));
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
