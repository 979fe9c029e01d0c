//! A private Web PKI for tests that need an `https_web` server (a bundle
//! endpoint, a discovery document): a CA and a server certificate for
//! `localhost` and `127.0.0.1`, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The files of a test Web PKI.
#[derive(Debug, Clone)]
pub struct WebPki {
    /// The CA certificate (PEM): what clients trust.
    pub ca_file: PathBuf,
    /// The server certificate (PEM), for `localhost` and `127.0.0.1`.
    pub cert_file: PathBuf,
    /// The server certificate's private key (PKCS#8 PEM).
    pub key_file: PathBuf,
}

impl WebPki {
    /// Mints a CA and a server certificate into `dir` (`web-ca.pem`,
    /// `web-server.pem`, `web-server.key`).
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sigil test web CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &ca)?;

        let pki = Self {
            ca_file: dir.join("web-ca.pem"),
            cert_file: dir.join("web-server.pem"),
            key_file: dir.join("web-server.key"),
        };
        std::fs::write(&pki.ca_file, ca.pem())?;
        std::fs::write(&pki.cert_file, cert.pem())?;
        std::fs::write(&pki.key_file, key.serialize_pem())?;
        Ok(pki)
    }
}
