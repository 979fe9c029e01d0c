//! Private keys (ECDSA P-256 and RSA), and files that hold secrets.
//!
//! Key bytes live in [`Zeroizing`] buffers and never appear in `Debug`
//! output. Files holding keys are written atomically with mode 0600 inside a
//! 0700 directory, and are refused on read if group or others may access them.
//!
//! P-256 is the key type of everything sigil mints: CAs, X509-SVIDs, CSRs and
//! TLS. RSA keys exist only for JWT authorities, because some relying parties
//! (clouds such as Azure) accept only RS256; operations that need an EC key
//! refuse an RSA key with [`SvidError::WrongKeyAlgorithm`].

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::{Zeroize, Zeroizing};

use crate::SvidError;
use crate::der::{self, TAG_INTEGER, TAG_SEQUENCE};

/// PEM label of an unencrypted PKCS#8 private key.
const PEM_LABEL: &str = "PRIVATE KEY";

/// The algorithm (and size) of a [`PrivateKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// ECDSA on the NIST P-256 curve.
    EcP256,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
    /// RSA with another modulus size, in bits (aws-lc-rs accepts 2048 to 8192).
    RsaOther(u32),
}

impl KeyAlgorithm {
    /// Whether this is an RSA key (of any size).
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa2048 | Self::RsaOther(_))
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EcP256 => f.write_str("ECDSA P-256"),
            Self::Rsa2048 => f.write_str("RSA 2048"),
            Self::RsaOther(bits) => write!(f, "RSA {bits}"),
        }
    }
}

/// A private key, held as PKCS#8 DER: ECDSA P-256 or RSA.
#[derive(Clone)]
pub struct PrivateKey {
    der: Zeroizing<Vec<u8>>,
    // Parsed once so that public-key accessors cannot fail later.
    pair: Pair,
    spki: Arc<[u8]>,
}

#[derive(Clone)]
enum Pair {
    Ec(Arc<EcdsaKeyPair>),
    Rsa(Arc<RsaKey>),
}

struct RsaKey {
    pair: RsaKeyPair,
    bits: u32,
    // Big-endian, without leading zero bytes (as JWKs want them).
    n: Vec<u8>,
    e: Vec<u8>,
}

/// The public half of a key, in the members a JWK is built from.
pub(crate) enum PublicParts<'a> {
    /// An uncompressed SEC1 P-256 point (`04 || x || y`).
    EcP256(&'a [u8]),
    /// An RSA modulus and exponent, big-endian, without leading zero bytes.
    Rsa {
        /// The modulus.
        n: &'a [u8],
        /// The public exponent.
        e: &'a [u8],
    },
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// Generates a fresh random P-256 key.
    pub fn generate_p256() -> Result<Self, SvidError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map_err(|_| SvidError::Crypto("P-256 key generation failed"))?;
        let doc = pair
            .to_pkcs8v1()
            .map_err(|_| SvidError::Crypto("PKCS#8 serialization failed"))?;
        Self::from_ec(Zeroizing::new(doc.as_ref().to_vec()), pair)
    }

    /// Generates a fresh random 2048-bit RSA key (for RS256 JWT authorities).
    pub fn generate_rsa2048() -> Result<Self, SvidError> {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| SvidError::Crypto("RSA key generation failed"))?;
        let doc: Pkcs8V1Der<'static> = pair
            .as_der()
            .map_err(|_| SvidError::Crypto("PKCS#8 serialization failed"))?;
        Self::from_rsa(Zeroizing::new(doc.as_ref().to_vec()), pair)
    }

    /// Reads an unencrypted PKCS#8 DER key: ECDSA P-256, or RSA of 2048 to
    /// 8192 bits. Anything else (other curves, Ed25519, encrypted keys) is
    /// refused with [`SvidError::KeyRejected`].
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, SvidError> {
        let ec_err = match EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der) {
            Ok(pair) => return Self::from_ec(Zeroizing::new(der.to_vec()), pair),
            Err(e) => e,
        };
        match RsaKeyPair::from_pkcs8(der) {
            Ok(pair) => Self::from_rsa(Zeroizing::new(der.to_vec()), pair),
            Err(rsa_err) => Err(SvidError::KeyRejected(format!(
                "not a P-256 key ({ec_err}) nor an RSA key ({rsa_err})"
            ))),
        }
    }

    /// Reads the first `PRIVATE KEY` (PKCS#8) block of a PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, SvidError> {
        let mut key = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| SvidError::Pem(format!("no usable {PEM_LABEL} block: {e}")))?;
        let parsed = Self::from_pkcs8_der(key.secret_pkcs8_der());
        key.zeroize();
        parsed
    }

    fn from_ec(der: Zeroizing<Vec<u8>>, pair: EcdsaKeyPair) -> Result<Self, SvidError> {
        let spki: Result<PublicKeyX509Der<'static>, _> = pair.public_key().as_der();
        let spki = spki.map_err(|_| SvidError::Crypto("public key serialization failed"))?;
        Ok(Self {
            der,
            spki: Arc::from(spki.as_ref()),
            pair: Pair::Ec(Arc::new(pair)),
        })
    }

    fn from_rsa(der: Zeroizing<Vec<u8>>, pair: RsaKeyPair) -> Result<Self, SvidError> {
        let spki: Result<PublicKeyX509Der<'static>, _> = pair.public_key().as_der();
        let spki = spki.map_err(|_| SvidError::Crypto("public key serialization failed"))?;
        let (n, e) = rsa_public_components(pair.public_key().as_ref())?;
        let bits = u32::try_from(pair.public_modulus_len())
            .ok()
            .and_then(|bytes| bytes.checked_mul(8))
            .ok_or_else(|| SvidError::KeyRejected("RSA modulus too large".to_owned()))?;
        Ok(Self {
            der,
            spki: Arc::from(spki.as_ref()),
            pair: Pair::Rsa(Arc::new(RsaKey { pair, bits, n, e })),
        })
    }

    /// The key's algorithm and size.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match &self.pair {
            Pair::Ec(_) => KeyAlgorithm::EcP256,
            Pair::Rsa(rsa) if rsa.bits == 2048 => KeyAlgorithm::Rsa2048,
            Pair::Rsa(rsa) => KeyAlgorithm::RsaOther(rsa.bits),
        }
    }

    /// The PKCS#8 DER encoding (secret).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.der
    }

    /// The key as a `PRIVATE KEY` PEM block (secret).
    pub fn to_pem(&self) -> Zeroizing<String> {
        pem_encode_secret(PEM_LABEL, &self.der)
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        self.spki.to_vec()
    }

    /// The public key's members, for building a JWK.
    pub(crate) fn public_parts(&self) -> PublicParts<'_> {
        match &self.pair {
            Pair::Ec(pair) => PublicParts::EcP256(pair.public_key().as_ref()),
            Pair::Rsa(rsa) => PublicParts::Rsa {
                n: &rsa.n,
                e: &rsa.e,
            },
        }
    }

    /// The P-256 key pair, or [`SvidError::WrongKeyAlgorithm`] naming `operation`.
    pub(crate) fn ec_pair(&self, operation: &'static str) -> Result<&EcdsaKeyPair, SvidError> {
        match &self.pair {
            Pair::Ec(pair) => Ok(pair),
            Pair::Rsa(_) => Err(SvidError::WrongKeyAlgorithm {
                operation,
                needs: "ECDSA P-256",
                found: self.algorithm(),
            }),
        }
    }

    /// The public key as an uncompressed SEC1 point (`04 || x || y`); only
    /// P-256 keys have one.
    pub(crate) fn ec_public_point(&self, operation: &'static str) -> Result<&[u8], SvidError> {
        Ok(self.ec_pair(operation)?.public_key().as_ref())
    }

    /// A key pair producing fixed-width `r || s` signatures, as JWS needs.
    pub(crate) fn fixed_signing_pair(&self) -> Result<EcdsaKeyPair, SvidError> {
        self.ec_pair("an ES256 signer")?;
        parse_pair(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.der)
    }

    /// Signs `msg` with RSASSA-PKCS1-v1_5 SHA-256 (JWS RS256); only RSA keys can.
    pub(crate) fn sign_rsa_pkcs1_sha256(&self, msg: &[u8]) -> Result<Vec<u8>, SvidError> {
        let Pair::Rsa(rsa) = &self.pair else {
            return Err(SvidError::WrongKeyAlgorithm {
                operation: "an RS256 signature",
                needs: "RSA",
                found: self.algorithm(),
            });
        };
        let mut sig = vec![0u8; rsa.pair.public_modulus_len()];
        rsa.pair
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), msg, &mut sig)
            .map_err(|_| SvidError::Crypto("RSA signing failed"))?;
        Ok(sig)
    }

    /// The key as a rustls signing key (aws-lc-rs provider); P-256 keys only,
    /// since every certificate sigil mints carries a P-256 key.
    pub fn rustls_signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, SvidError> {
        self.ec_pair("a TLS signing key")?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.der.as_slice()));
        rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der)
            .map_err(|e| SvidError::Tls(e.to_string()))
    }
}

/// A private key checked by [`PrivateKey`] and then held as its PKCS#8 DER
/// alone, without the parsed key pair (which costs several times the DER):
/// what a store of many keys that only hands them out keeps, such as the
/// agent's cache of workload SVIDs. [`CompactKey::parse`] gives the full key
/// back when one is needed.
#[derive(Clone)]
pub struct CompactKey(Zeroizing<Box<[u8]>>);

impl fmt::Debug for CompactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CompactKey(<redacted>)")
    }
}

impl From<&PrivateKey> for CompactKey {
    fn from(key: &PrivateKey) -> Self {
        Self(Zeroizing::new(Box::from(key.pkcs8_der())))
    }
}

impl CompactKey {
    /// The PKCS#8 DER encoding (secret).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }

    /// The key as a `PRIVATE KEY` PEM block (secret).
    pub fn to_pem(&self) -> Zeroizing<String> {
        pem_encode_secret(PEM_LABEL, &self.0)
    }

    /// The full key, parsed again from the DER.
    pub fn parse(&self) -> Result<PrivateKey, SvidError> {
        PrivateKey::from_pkcs8_der(&self.0)
    }
}

fn parse_pair(alg: &'static EcdsaSigningAlgorithm, der: &[u8]) -> Result<EcdsaKeyPair, SvidError> {
    EcdsaKeyPair::from_pkcs8(alg, der).map_err(|e| SvidError::KeyRejected(e.to_string()))
}

/// The modulus and exponent of a PKCS#1 `RSAPublicKey` (RFC 8017 §A.1.1),
/// without the leading zero bytes DER INTEGERs carry and JWKs must not.
fn rsa_public_components(pkcs1: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SvidError> {
    let (seq, rest) = der::expect(pkcs1, TAG_SEQUENCE, "RSAPublicKey")?;
    let (n, after_n) = der::expect(seq.contents, TAG_INTEGER, "modulus")?;
    let (e, after_e) = der::expect(after_n, TAG_INTEGER, "publicExponent")?;
    if !rest.is_empty() || !after_e.is_empty() {
        return Err(SvidError::Der("trailing data in RSAPublicKey".to_owned()));
    }
    let strip = |b: &[u8]| -> Vec<u8> {
        let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
        b[start..].to_vec()
    };
    Ok((strip(n.contents), strip(e.contents)))
}

/// rcgen's view of a P-256 [`PrivateKey`], so certificates and CSRs are
/// signed by aws-lc-rs directly without copying the secret into rcgen's own
/// key type. Built only through [`RcgenKey::new`], which refuses RSA keys.
pub(crate) struct RcgenKey<'a>(&'a EcdsaKeyPair);

impl<'a> RcgenKey<'a> {
    /// Wraps a P-256 key; `operation` names what needed it in the error for an RSA key.
    pub(crate) fn new(key: &'a PrivateKey, operation: &'static str) -> Result<Self, SvidError> {
        key.ec_pair(operation).map(Self)
    }
}

impl rcgen::PublicKeyData for RcgenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key().as_ref()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for RcgenKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0
            .sign(&SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

/// A private key's PKCS#8 DER as a `PRIVATE KEY` PEM block (secret),
/// leaving no unzeroized copy behind: for a holder that keeps the DER of a
/// key checked by [`PrivateKey`] in a block of its own (the agent keeps an
/// SVID's chain and key in one).
pub fn pkcs8_pem(der: &[u8]) -> Zeroizing<String> {
    pem_encode_secret(PEM_LABEL, der)
}

/// PEM-encodes secret bytes without leaving unzeroized copies behind.
fn pem_encode_secret(label: &str, der: &[u8]) -> Zeroizing<String> {
    use base64::Engine as _;
    let b64_len = der.len().div_ceil(3) * 4;
    // Capacity is reserved up front so no reallocation leaves a stale copy.
    let mut b64 = Zeroizing::new(String::with_capacity(b64_len));
    base64::engine::general_purpose::STANDARD.encode_string(der, &mut b64);
    let lines = b64_len.div_ceil(64);
    let mut out = Zeroizing::new(String::with_capacity(
        2 * (label.len() + 17) + b64_len + lines + 2,
    ));
    crate::pem::wrap_into(label, &b64, &mut out);
    out
}

/// Creates `path` (and its parents) and sets its mode to 0700.
///
/// Each directory created here is made durable: its parent is fsynced, so
/// that a file later written and synced inside it (a CA key) cannot be lost
/// after a power cut along with the directory's own entry.
pub fn ensure_private_dir(path: &Path) -> io::Result<()> {
    create_dir_all_synced(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

fn create_dir_all_synced(path: &Path) -> io::Result<()> {
    if path.as_os_str().is_empty() || path.is_dir() {
        return Ok(());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir_all_synced(parent)?;
    match fs::create_dir(path) {
        Ok(()) => File::open(parent)?.sync_all(),
        // Made by someone else meanwhile: theirs to sync.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes a secret file durably: once this returns, the file does not come
/// back after a power cut (its directory is fsynced). A file already gone
/// is not an error.
pub fn remove_private_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Writes a secret file atomically and durably: mode 0600, in a 0700 directory.
///
/// The data goes to a temporary file created with mode 0600 in the same
/// directory, is fsynced, and is renamed over `path`; the directory is then
/// fsynced so the rename survives a crash. Readers see the old or the new
/// content, never a mix, and the secret is never readable by others.
pub fn write_private_file(path: &Path, data: &[u8]) -> io::Result<()> {
    if let Some(p) = path.parent()
        && !p.as_os_str().is_empty()
    {
        ensure_private_dir(p)?;
    }
    write_secret_file(path, data)
}

/// Writes a secret file like [`write_private_file`] (mode 0600, atomic,
/// durable) into a directory that must exist and whose mode is left as it is:
/// for directories a user names, such as `sigil svid fetch --write /tmp`.
pub fn write_secret_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        // A bare file name lives in the working directory.
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let mut suffix = [0u8; 8];
    aws_lc_rs::rand::fill(&mut suffix)
        .map_err(|_| io::Error::other("random number generator failed"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        crate::hex::encode(&suffix)
    ));
    let result = write_synced(&tmp, data).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        // Best effort: the temporary file holds a secret and must not linger.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    File::open(&dir)?.sync_all()
}

fn write_synced(tmp: &Path, data: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)?;
    file.write_all(data)?;
    file.sync_all()
}

/// Reads a secret file, refusing it if group or others have any access.
///
/// A key file readable by others is treated as compromised configuration, so
/// the error (kind `PermissionDenied`) names the path, its mode and the fix.
pub fn read_private_file(path: &Path) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut file = File::open(path)?;
    let meta = file.metadata()?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} has mode {mode:04o}, which lets group or others access it; \
                 private files must be 0600 (chmod 600 {})",
                path.display(),
                path.display()
            ),
        ));
    }
    // Sized up front so the buffer is not reallocated, which would leave an
    // unzeroized copy of the secret in freed memory.
    let cap = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    file.read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {

    use x509_parser::prelude::FromDer;

    use super::*;

    #[test]
    fn compact_key_keeps_the_der_and_parses_back() {
        let key = PrivateKey::generate_p256().unwrap();
        let compact = CompactKey::from(&key);
        assert_eq!(compact.pkcs8_der(), key.pkcs8_der());
        assert_eq!(compact.to_pem().as_str(), key.to_pem().as_str());
        assert_eq!(
            compact.parse().unwrap().public_key_spki_der(),
            key.public_key_spki_der()
        );
        assert_eq!(format!("{compact:?}"), "CompactKey(<redacted>)");
    }

    #[test]
    fn private_dirs_are_made_with_their_parents_and_removal_tolerates_absence() {
        // What survives a power cut is tested on a disk that can lose power
        // (sigil/tests/it/powercut.rs); this checks the plain behaviour.
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/keys");
        ensure_private_dir(&deep).unwrap();
        ensure_private_dir(&deep).unwrap();
        let mode = fs::metadata(&deep).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let key = deep.join("x509-01.key");
        write_private_file(&key, b"secret").unwrap();
        remove_private_file(&key).unwrap();
        assert!(!key.exists());
        remove_private_file(&key).unwrap();
        // A file where a directory is asked for is an error, not a success.
        fs::write(dir.path().join("file"), b"").unwrap();
        assert!(ensure_private_dir(&dir.path().join("file")).is_err());
        assert!(ensure_private_dir(&dir.path().join("file/sub")).is_err());
    }

    #[test]
    fn generate_round_trips_through_der_and_pem() {
        let key = PrivateKey::generate_p256().unwrap();
        let again = PrivateKey::from_pkcs8_der(key.pkcs8_der()).unwrap();
        assert_eq!(again.public_key_spki_der(), key.public_key_spki_der());
        let pem = key.to_pem();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
            "{}",
            &*pem
        );
        assert!(pem.ends_with("-----END PRIVATE KEY-----\n"));
        let from_pem = PrivateKey::from_pem(&pem).unwrap();
        assert_eq!(from_pem.pkcs8_der(), key.pkcs8_der());
        assert!(key.rustls_signing_key().is_ok());
    }

    /// SubjectPublicKeyInfo of a P-256 point: the fixed algorithm header, then the point.
    fn spki_from_point(point: &[u8]) -> Vec<u8> {
        // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes + pad) }
        const HEADER: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let mut out = HEADER.to_vec();
        out.extend_from_slice(point);
        out
    }

    #[test]
    fn spki_matches_hand_built_encoding() {
        let key = PrivateKey::generate_p256().unwrap();
        assert_eq!(
            key.public_key_spki_der(),
            spki_from_point(key.ec_public_point("test").unwrap())
        );
        assert_eq!(key.public_key_spki_der().len(), 91);
        assert_eq!(key.algorithm(), KeyAlgorithm::EcP256);
    }

    #[test]
    fn rsa_generate_round_trips_and_reports_its_algorithm() {
        let key = PrivateKey::generate_rsa2048().unwrap();
        assert_eq!(key.algorithm(), KeyAlgorithm::Rsa2048);
        assert!(key.algorithm().is_rsa() && !KeyAlgorithm::EcP256.is_rsa());
        let again = PrivateKey::from_pkcs8_der(key.pkcs8_der()).unwrap();
        assert_eq!(again.algorithm(), KeyAlgorithm::Rsa2048);
        assert_eq!(again.public_key_spki_der(), key.public_key_spki_der());
        let from_pem = PrivateKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(from_pem.pkcs8_der(), key.pkcs8_der());
        assert_eq!(format!("{key:?}"), "PrivateKey(<redacted>)");

        // n and e are those of the SPKI, minus DER's leading zero byte.
        let spki = key.public_key_spki_der();
        let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
        let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = parsed.parsed() else {
            panic!("not an RSA SPKI");
        };
        let PublicParts::Rsa { n, e } = key.public_parts() else {
            panic!("RSA key without RSA parts");
        };
        assert_eq!(n.len(), 256);
        assert_ne!(n[0], 0);
        assert_eq!(rsa.modulus.iter().skip_while(|&&b| b == 0).count(), 256);
        assert!(rsa.modulus.ends_with(n));
        assert_eq!(e, [1, 0, 1]);
    }

    #[test]
    fn larger_rsa_keys_are_rsa_other() {
        let pair = RsaKeyPair::generate(KeySize::Rsa3072).unwrap();
        let der: Pkcs8V1Der<'static> = pair.as_der().unwrap();
        let key = PrivateKey::from_pkcs8_der(der.as_ref()).unwrap();
        assert_eq!(key.algorithm(), KeyAlgorithm::RsaOther(3072));
        assert_eq!(key.algorithm().to_string(), "RSA 3072");
    }

    #[test]
    fn ec_only_operations_refuse_rsa_keys() {
        let key = PrivateKey::generate_rsa2048().unwrap();
        let want = |operation| SvidError::WrongKeyAlgorithm {
            operation,
            needs: "ECDSA P-256",
            found: KeyAlgorithm::Rsa2048,
        };
        assert_eq!(
            key.rustls_signing_key().map(|_| ()).unwrap_err(),
            want("a TLS signing key")
        );
        assert_eq!(
            key.fixed_signing_pair().map(|_| ()).unwrap_err(),
            want("an ES256 signer")
        );
        assert_eq!(key.ec_public_point("x").unwrap_err(), want("x"));
        assert_eq!(
            RcgenKey::new(&key, "a certificate")
                .map(|_| ())
                .unwrap_err(),
            want("a certificate")
        );
        let msg = want("a certificate").to_string();
        assert_eq!(
            msg,
            "a certificate needs an ECDSA P-256 key; this key is RSA 2048"
        );

        // And the other way round: P-256 keys cannot sign RS256.
        let ec = PrivateKey::generate_p256().unwrap();
        assert!(matches!(
            ec.sign_rsa_pkcs1_sha256(b"x"),
            Err(SvidError::WrongKeyAlgorithm {
                needs: "RSA",
                found: KeyAlgorithm::EcP256,
                ..
            })
        ));
    }

    #[test]
    fn rsa_signature_verifies_with_the_spki() {
        let key = PrivateKey::generate_rsa2048().unwrap();
        let sig = key.sign_rsa_pkcs1_sha256(b"message").unwrap();
        assert_eq!(sig.len(), 256);
        let spki = key.public_key_spki_der();
        let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
        let pkcs1 = parsed.subject_public_key.data.as_ref();
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            pkcs1,
        );
        public.verify(b"message", &sig).unwrap();
        assert!(public.verify(b"massage", &sig).is_err());
    }

    #[test]
    fn debug_is_redacted() {
        let key = PrivateKey::generate_p256().unwrap();
        assert_eq!(format!("{key:?}"), "PrivateKey(<redacted>)");
    }

    #[test]
    fn rejects_other_keys() {
        assert!(matches!(
            PrivateKey::from_pkcs8_der(b"not a key"),
            Err(SvidError::KeyRejected(_))
        ));
        let p384 = EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING)
            .unwrap()
            .to_pkcs8v1()
            .unwrap();
        assert!(matches!(
            PrivateKey::from_pkcs8_der(p384.as_ref()),
            Err(SvidError::KeyRejected(_))
        ));
        let ed =
            aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        assert!(PrivateKey::from_pkcs8_der(ed.as_ref()).is_err());
        assert!(matches!(
            PrivateKey::from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(SvidError::Pem(_))
        ));
    }

    #[test]
    fn private_file_is_0600_in_0700_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let path = dir.join("key.pem");
        write_private_file(&path, b"secret").unwrap();
        let file_mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let dir_mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!((file_mode, dir_mode), (0o600, 0o700));
        assert_eq!(&*read_private_file(&path).unwrap(), b"secret");

        // Overwrite in place; no temporary file is left behind.
        write_private_file(&path, b"second").unwrap();
        assert_eq!(&*read_private_file(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
    }

    #[test]
    fn read_refuses_group_or_world_readable_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key.pem");
        fs::write(&path, b"secret").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private_file(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("0644"), "{msg}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_private_file(&path).is_err());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_private_file(&path).is_ok());
    }
}
