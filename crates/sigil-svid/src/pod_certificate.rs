//! The key of a Kubernetes PodCertificateRequest (`certificates.k8s.io`
//! `v1beta1`, KEP-4317), checked once before anything is signed for it.
//!
//! The kubelet generates a key for a pod and proves it holds it, in one of
//! two forms:
//!
//! - Kubernetes 1.35: `spec.pkixPublicKey` (SubjectPublicKeyInfo DER) and
//!   `spec.proofOfPossession`, a signature of the ASCII bytes of
//!   `spec.podUID` by that key: Ed25519 over the bytes themselves; ECDSA (any
//!   curve) as an ASN.1 DER signature of their SHA-256 digest; RSA as
//!   RSASSA-PSS with SHA-256.
//! - Kubernetes 1.36: `spec.stubPKCS10Request`, a PKCS#10 CSR (DER) whose
//!   own signature is the proof; only its key is used ([`CheckedCsr`]).
//!
//! Either way the key must be of a type pod certificates allow: ECDSA P-256,
//! P-384 or P-521, Ed25519, or RSA with a 3072- or 4096-bit modulus (what
//! kube-apiserver admits; an RSA-2048 or X25519 key is refused here too, so
//! that the signer never depends on the API server's checks).

use aws_lc_rs::signature::{self, RsaParameters, RsaPssSaltLength, UnparsedPublicKey};
use rustls_pki_types::alg_id;

use crate::SvidError;
use crate::x509::{CheckedCsr, SubjectKey};

/// How a PodCertificateRequest proves possession of its key.
#[derive(Debug, Clone, Copy)]
pub enum PodKeyProof<'a> {
    /// Kubernetes 1.35: `spec.pkixPublicKey` and `spec.proofOfPossession`.
    Signature {
        /// The SubjectPublicKeyInfo, DER.
        public_key: &'a [u8],
        /// The signature of the pod UID by that key.
        proof: &'a [u8],
    },
    /// Kubernetes 1.36: `spec.stubPKCS10Request`, a PKCS#10 CSR in DER.
    StubCsr(&'a [u8]),
}

impl<'a> PodKeyProof<'a> {
    /// The form a request's spec fields hold: the stub CSR when it is set,
    /// the key and proof otherwise. Both forms at once, or neither, is
    /// [`SvidError::PodKeyRequest`].
    pub fn from_fields(
        public_key: &'a [u8],
        proof: &'a [u8],
        stub_csr: &'a [u8],
    ) -> Result<Self, SvidError> {
        let signature_form = !public_key.is_empty() || !proof.is_empty();
        match (signature_form, stub_csr.is_empty()) {
            (true, false) => Err(SvidError::PodKeyRequest(
                "both a public key and a stub PKCS#10 request",
            )),
            (false, false) => Ok(Self::StubCsr(stub_csr)),
            (true, true) if public_key.is_empty() => Err(SvidError::PodKeyRequest(
                "a proof of possession without a public key",
            )),
            (true, true) => Ok(Self::Signature { public_key, proof }),
            (false, true) => Err(SvidError::PodKeyRequest(
                "neither a public key nor a stub PKCS#10 request",
            )),
        }
    }
}

/// The key types a pod certificate may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodKeyType {
    EcP256,
    EcP384,
    EcP521,
    Ed25519,
    Rsa,
}

/// Checks a PodCertificateRequest's key and its proof of possession for the
/// pod `pod_uid`, and returns the key a certificate is to be issued for.
///
/// Errors: [`SvidError::PublicKey`] or [`SvidError::Csr`] for malformed
/// input, [`SvidError::PodKeyType`] for a key of a type pod certificates do
/// not allow, [`SvidError::ProofOfPossession`] when the proof is not the
/// pod UID signed by the key, [`SvidError::CsrSignature`] when a stub CSR's
/// signature does not verify, [`SvidError::PodKeyRequest`] for an empty
/// pod UID.
pub fn check_pod_key<'a>(
    proof: PodKeyProof<'a>,
    pod_uid: &str,
) -> Result<SubjectKey<'a>, SvidError> {
    if pod_uid.is_empty() {
        return Err(SvidError::PodKeyRequest("the pod UID is empty"));
    }
    match proof {
        PodKeyProof::StubCsr(csr) => {
            let key = CheckedCsr::check(csr)?.key();
            pod_key_type(&key)?;
            Ok(key)
        }
        PodKeyProof::Signature { public_key, proof } => {
            let key = SubjectKey::from_spki_der(public_key).map_err(|e| match e {
                // Well formed, but of an algorithm sigil knows nothing of
                // (X25519, Ed448, DSA...): a key type question.
                SvidError::PublicKey(m) if m == "unsupported public key algorithm" => {
                    SvidError::PodKeyType("unknown public key algorithm".to_owned())
                }
                other => other,
            })?;
            let kind = pod_key_type(&key)?;
            let (_, bits) = key.algorithm_and_key()?;
            verify_proof(kind, bits, pod_uid.as_bytes(), proof)?;
            Ok(key)
        }
    }
}

/// The key's type, if pod certificates allow it.
fn pod_key_type(key: &SubjectKey<'_>) -> Result<PodKeyType, SvidError> {
    let (alg, bits) = key.algorithm_and_key()?;
    let kind = if alg == alg_id::ECDSA_P256.as_ref() {
        PodKeyType::EcP256
    } else if alg == alg_id::ECDSA_P384.as_ref() {
        PodKeyType::EcP384
    } else if alg == alg_id::ECDSA_P521.as_ref() {
        PodKeyType::EcP521
    } else if alg == alg_id::ED25519.as_ref() {
        PodKeyType::Ed25519
    } else if alg == alg_id::RSA_ENCRYPTION.as_ref() {
        let modulus = RsaParameters::public_modulus_len(bits)
            .map_err(|_| SvidError::PublicKey("malformed RSA public key".to_owned()))?;
        if modulus != 3072 && modulus != 4096 {
            return Err(SvidError::PodKeyType(format!(
                "RSA {modulus} (only RSA 3072 and 4096 are allowed)"
            )));
        }
        PodKeyType::Rsa
    } else {
        return Err(SvidError::PodKeyType(
            "only ECDSA P-256, P-384, P-521, Ed25519, RSA 3072 and RSA 4096 keys are allowed"
                .to_owned(),
        ));
    };
    Ok(kind)
}

/// RSASSA-PSS SHA-256 with the salt as long as the digest.
static PSS_DIGEST_SALT: RsaParameters = signature::RSA_PSS_2048_8192_SHA256;
/// RSASSA-PSS SHA-256 with the longest salt the key allows (what Go's
/// `rsa.SignPSS` writes with `PSSSaltLengthAuto`).
static PSS_MAX_SALT: RsaParameters =
    signature::RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);

/// Verifies `proof` as the signature of `message` by the key `bits` of type `kind`.
fn verify_proof(
    kind: PodKeyType,
    bits: &[u8],
    message: &[u8],
    proof: &[u8],
) -> Result<(), SvidError> {
    let verify = |alg: &'static dyn signature::VerificationAlgorithm| {
        UnparsedPublicKey::new(alg, bits).verify(message, proof)
    };
    let ok = match kind {
        PodKeyType::Ed25519 => verify(&signature::ED25519).is_ok(),
        // Go's ecdsa.VerifyASN1(pub, sha256(uid), sig): SHA-256 on every curve.
        PodKeyType::EcP256 => verify(&signature::ECDSA_P256_SHA256_ASN1).is_ok(),
        PodKeyType::EcP384 => verify(&signature::ECDSA_P384_SHA256_ASN1).is_ok(),
        PodKeyType::EcP521 => verify(&signature::ECDSA_P521_SHA256_ASN1).is_ok(),
        // Kubernetes accepts any salt length; aws-lc-rs verifies one length
        // at a time, so the two that signers write are tried (see
        // docs/design-notes.md, "Pod certificates").
        PodKeyType::Rsa => verify(&PSS_DIGEST_SALT).is_ok() || verify(&PSS_MAX_SALT).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(SvidError::ProofOfPossession)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
        ECDSA_P521_SHA256_ASN1_SIGNING, EcdsaKeyPair, EcdsaSigningAlgorithm, Ed25519KeyPair,
        KeyPair, RSA_PSS_SHA256, RsaKeyPair,
    };

    use super::*;
    use crate::keys::PrivateKey;

    const UID: &str = "0b5e8b7e-9d0c-4a8e-8f2b-4f1d3c2a1b00";

    fn ec(alg: &'static EcdsaSigningAlgorithm, msg: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let pair = EcdsaKeyPair::generate(alg).unwrap();
        let spki: PublicKeyX509Der<'static> = pair.public_key().as_der().unwrap();
        let sig = pair.sign(&SystemRandom::new(), msg).unwrap();
        (spki.as_ref().to_vec(), sig.as_ref().to_vec())
    }

    /// A P-384 key and its signature of SHA-256(msg), as Go's
    /// `ecdsa.SignASN1(rand, key, sha256(msg))` makes it: aws-lc-rs signs
    /// P-384 only over SHA-384, so openssl signs the digest. `None` (the
    /// caller skips) without openssl.
    fn p384_over_sha256(msg: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING).unwrap();
        let pkcs8 = pair.to_pkcs8v1().unwrap();
        let spki: PublicKeyX509Der<'static> = pair.public_key().as_der().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("key.pem"),
            crate::keys::pkcs8_pem(pkcs8.as_ref()).as_bytes(),
        )
        .unwrap();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
        std::fs::write(dir.path().join("digest"), digest.as_ref()).unwrap();
        let out = std::process::Command::new("openssl")
            .args([
                "pkeyutl", "-sign", "-inkey", "key.pem", "-in", "digest", "-out", "sig",
            ])
            .current_dir(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!("openssl pkeyutl: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => {
                eprintln!("skipping P-384: cannot run openssl ({e}); CI installs it");
                return None;
            }
        }
        let sig = std::fs::read(dir.path().join("sig")).unwrap();
        Some((spki.as_ref().to_vec(), sig))
    }

    fn ed25519(msg: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let spki: PublicKeyX509Der<'static> = pair.public_key().as_der().unwrap();
        (spki.as_ref().to_vec(), pair.sign(msg).as_ref().to_vec())
    }

    fn rsa(size: KeySize, salt: RsaPssSaltLength, msg: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let pair = RsaKeyPair::generate(size).unwrap();
        let spki: PublicKeyX509Der<'static> = pair.public_key().as_der().unwrap();
        let mut sig = vec![0; pair.public_modulus_len()];
        let alg: &'static signature::RsaSignatureEncoding = match salt {
            RsaPssSaltLength::Max => {
                &const { RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Max) }
            }
            _ => &RSA_PSS_SHA256,
        };
        pair.sign(alg, &SystemRandom::new(), msg, &mut sig).unwrap();
        (spki.as_ref().to_vec(), sig)
    }

    fn check(spki: &[u8], proof: &[u8]) -> Result<Vec<u8>, SvidError> {
        check_pod_key(
            PodKeyProof::Signature {
                public_key: spki,
                proof,
            },
            UID,
        )
        .map(|k| k.spki_der().to_vec())
    }

    #[test]
    fn every_key_type_kubelets_generate_is_accepted_with_its_proof() {
        let uid = UID.as_bytes();
        if let Some((spki, sig)) = p384_over_sha256(uid) {
            assert_eq!(check(&spki, &sig).unwrap(), spki, "P-384");
            let other = p384_over_sha256(b"another-uid").unwrap();
            assert_eq!(
                check(&other.0, &sig).unwrap_err(),
                SvidError::ProofOfPossession
            );
        }
        for (name, (spki, sig)) in [
            ("P-256", ec(&ECDSA_P256_SHA256_ASN1_SIGNING, uid)),
            ("P-521", ec(&ECDSA_P521_SHA256_ASN1_SIGNING, uid)),
            ("Ed25519", ed25519(uid)),
            (
                "RSA 3072, digest-long salt",
                rsa(KeySize::Rsa3072, RsaPssSaltLength::Digest, uid),
            ),
            (
                "RSA 3072, longest salt",
                rsa(KeySize::Rsa3072, RsaPssSaltLength::Max, uid),
            ),
        ] {
            assert_eq!(check(&spki, &sig).unwrap(), spki, "{name}");
        }
    }

    #[test]
    fn a_proof_of_another_uid_or_damaged_is_refused() {
        let other = b"11111111-2222-3333-4444-555555555555";
        for (name, (spki, sig)) in [
            ("P-256", ec(&ECDSA_P256_SHA256_ASN1_SIGNING, other)),
            ("P-521", ec(&ECDSA_P521_SHA256_ASN1_SIGNING, other)),
            ("Ed25519", ed25519(other)),
            (
                "RSA 3072",
                rsa(KeySize::Rsa3072, RsaPssSaltLength::Digest, other),
            ),
        ] {
            assert_eq!(
                check(&spki, &sig).unwrap_err(),
                SvidError::ProofOfPossession,
                "{name}"
            );
        }
        let uid = UID.as_bytes();
        let (spki, sig) = ec(&ECDSA_P256_SHA256_ASN1_SIGNING, uid);
        // Truncated, emptied, one bit flipped, or the signature of another key.
        assert_eq!(
            check(&spki, &sig[..sig.len() - 1]).unwrap_err(),
            SvidError::ProofOfPossession
        );
        assert_eq!(check(&spki, &[]).unwrap_err(), SvidError::ProofOfPossession);
        let mut flipped = sig.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            check(&spki, &flipped).unwrap_err(),
            SvidError::ProofOfPossession
        );
        let (_, foreign) = ec(&ECDSA_P256_SHA256_ASN1_SIGNING, uid);
        assert_eq!(
            check(&spki, &foreign).unwrap_err(),
            SvidError::ProofOfPossession
        );
        // P-384 signed over SHA-384: not what Kubernetes computes.
        let (spki, sig) = ec(&ECDSA_P384_SHA384_ASN1_SIGNING, uid);
        assert_eq!(
            check(&spki, &sig).unwrap_err(),
            SvidError::ProofOfPossession
        );
    }

    #[test]
    fn key_types_pod_certificates_do_not_allow_are_refused() {
        let uid = UID.as_bytes();
        let (spki, sig) = rsa(KeySize::Rsa2048, RsaPssSaltLength::Digest, uid);
        assert!(
            matches!(check(&spki, &sig), Err(SvidError::PodKeyType(m)) if m.contains("RSA 2048")),
        );
        // X25519 (a key-agreement key): OID 1.3.101.110 and 32 bytes.
        let mut x25519 = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
        ];
        x25519.extend_from_slice(&[7; 32]);
        assert!(matches!(
            check(&x25519, &[1; 64]),
            Err(SvidError::PodKeyType(_))
        ));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let (spki, sig) = ec(&ECDSA_P256_SHA256_ASN1_SIGNING, UID.as_bytes());
        for bad in [
            &b""[..],
            b"garbage",
            &spki[..spki.len() - 1],
            &[spki.as_slice(), &[0]].concat(),
        ] {
            assert!(
                matches!(check(bad, &sig), Err(SvidError::PublicKey(_))),
                "{bad:?}: {:?}",
                check(bad, &sig)
            );
        }
        // A P-256 header with a point that is not on the curve.
        let mut off_curve = spki.clone();
        let n = off_curve.len();
        off_curve[n - 1] ^= 0x55;
        assert_eq!(
            check(&off_curve, &sig).unwrap_err(),
            SvidError::ProofOfPossession
        );
        // An RSA header whose key bits are not an RSAPublicKey.
        let mut rsa_bad = vec![
            0x30, 0x19, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01,
            0x01, 0x05, 0x00, 0x03, 0x08, 0x00,
        ];
        rsa_bad.extend_from_slice(b"notrsa!");
        assert!(matches!(
            check(&rsa_bad, &sig),
            Err(SvidError::PublicKey(_))
        ));
    }

    #[test]
    fn a_stub_csr_is_its_own_proof() {
        let key = PrivateKey::generate_p256().unwrap();
        let csr = crate::x509::make_csr(&key).unwrap();
        let checked = check_pod_key(PodKeyProof::StubCsr(&csr), UID).unwrap();
        assert_eq!(checked.spki_der(), key.public_key_spki_der());

        // A CSR whose signature does not verify.
        let mut forged = csr.clone();
        let n = forged.len();
        forged[n - 2] ^= 1;
        assert!(matches!(
            check_pod_key(PodKeyProof::StubCsr(&forged), UID),
            Err(SvidError::CsrSignature | SvidError::Csr(_))
        ));
        assert!(matches!(
            check_pod_key(PodKeyProof::StubCsr(b"\x30\x03junk"), UID),
            Err(SvidError::Csr(_))
        ));
        // An empty pod UID is refused whatever the proof.
        assert!(matches!(
            check_pod_key(PodKeyProof::StubCsr(&csr), ""),
            Err(SvidError::PodKeyRequest(_))
        ));
    }

    #[test]
    fn the_spec_fields_pick_one_form() {
        assert!(matches!(
            PodKeyProof::from_fields(b"k", b"p", b""),
            Ok(PodKeyProof::Signature { .. })
        ));
        assert!(matches!(
            PodKeyProof::from_fields(b"", b"", b"csr"),
            Ok(PodKeyProof::StubCsr(_))
        ));
        for (k, p, c) in [
            (&b""[..], &b""[..], &b""[..]),
            (b"k", b"p", b"csr"),
            (b"k", b"", b"csr"),
            (b"", b"p", b""),
            (b"", b"p", b"csr"),
        ] {
            assert!(
                matches!(
                    PodKeyProof::from_fields(k, p, c),
                    Err(SvidError::PodKeyRequest(_))
                ),
                "{k:?} {p:?} {c:?}"
            );
        }
    }
}
