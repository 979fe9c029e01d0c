//! ECDSA P-256 private keys, and files that hold secrets.
//!
//! Key bytes live in [`Zeroizing`] buffers and never appear in `Debug`
//! output. Files holding keys are written atomically with mode 0600 inside a
//! 0700 directory, and are refused on read if group or others may access them.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, KeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::{Zeroize, Zeroizing};

use crate::SvidError;

/// PEM label of an unencrypted PKCS#8 private key.
const PEM_LABEL: &str = "PRIVATE KEY";

/// An ECDSA P-256 private key, held as PKCS#8 DER.
#[derive(Clone)]
pub struct PrivateKey {
    der: Zeroizing<Vec<u8>>,
    // Parsed once so that public-key accessors cannot fail later.
    pair: Arc<EcdsaKeyPair>,
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
        Ok(Self {
            der: Zeroizing::new(doc.as_ref().to_vec()),
            pair: Arc::new(pair),
        })
    }

    /// Reads an unencrypted PKCS#8 DER key; anything but ECDSA P-256 is refused.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, SvidError> {
        let pair = parse_pair(&ECDSA_P256_SHA256_ASN1_SIGNING, der)?;
        Ok(Self {
            der: Zeroizing::new(der.to_vec()),
            pair: Arc::new(pair),
        })
    }

    /// Reads the first `PRIVATE KEY` (PKCS#8) block of a PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, SvidError> {
        let mut key = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| SvidError::Pem(format!("no usable {PEM_LABEL} block: {e}")))?;
        let parsed = Self::from_pkcs8_der(key.secret_pkcs8_der());
        key.zeroize();
        parsed
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
        let der: Result<PublicKeyX509Der<'static>, _> = self.pair.public_key().as_der();
        match der {
            Ok(der) => der.as_ref().to_vec(),
            // aws-lc-rs only fails here on allocation failure; build the
            // fixed P-256 SPKI header by hand rather than panic.
            Err(_) => spki_from_point(self.public_point()),
        }
    }

    /// The public key as an uncompressed SEC1 point (`04 || x || y`).
    pub(crate) fn public_point(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// Signs `msg` with ECDSA P-256 SHA-256, DER (ASN.1) signature encoding.
    pub(crate) fn sign_asn1(&self, msg: &[u8]) -> Result<Vec<u8>, SvidError> {
        self.pair
            .sign(&SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| SvidError::Crypto("ECDSA signing failed"))
    }

    /// A key pair producing fixed-width `r || s` signatures, as JWS needs.
    pub(crate) fn fixed_signing_pair(&self) -> Result<EcdsaKeyPair, SvidError> {
        parse_pair(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.der)
    }

    /// The key as a rustls signing key (aws-lc-rs provider).
    pub fn rustls_signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, SvidError> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.der.as_slice()));
        rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der)
            .map_err(|e| SvidError::Tls(e.to_string()))
    }
}

fn parse_pair(alg: &'static EcdsaSigningAlgorithm, der: &[u8]) -> Result<EcdsaKeyPair, SvidError> {
    EcdsaKeyPair::from_pkcs8(alg, der).map_err(|e| SvidError::KeyRejected(e.to_string()))
}

/// SubjectPublicKeyInfo of a P-256 point: the fixed algorithm header, then the point.
fn spki_from_point(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes + pad) }
    const HEADER: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut out = HEADER.to_vec();
    out.extend_from_slice(point);
    out
}

/// rcgen's view of a [`PrivateKey`], so certificates and CSRs are signed by
/// aws-lc-rs directly without copying the secret into rcgen's own key type.
pub(crate) struct RcgenKey<'a>(pub(crate) &'a PrivateKey);

impl rcgen::PublicKeyData for RcgenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_point()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for RcgenKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0
            .sign_asn1(msg)
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
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
pub fn ensure_private_dir(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

/// Writes a secret file atomically and durably: mode 0600, in a 0700 directory.
///
/// The data goes to a temporary file created with mode 0600 in the same
/// directory, is fsynced, and is renamed over `path`; the directory is then
/// fsynced so the rename survives a crash. Readers see the old or the new
/// content, never a mix, and the secret is never readable by others.
pub fn write_private_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            ensure_private_dir(p)?;
            p.to_path_buf()
        }
        // A bare file name lives in the working directory, whose mode is
        // the caller's business.
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
        crate::x509::hex(&suffix)
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
    use super::*;

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

    #[test]
    fn spki_matches_hand_built_encoding() {
        let key = PrivateKey::generate_p256().unwrap();
        assert_eq!(
            key.public_key_spki_der(),
            spki_from_point(key.public_point())
        );
        assert_eq!(key.public_key_spki_der().len(), 91);
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
