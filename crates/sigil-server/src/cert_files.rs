//! Certificates an operator manages as PEM files (the `https_web` bundle
//! endpoint, OIDC discovery): loaded at start, where an error names the
//! config key, and reloaded when either file changes, so a renewed
//! certificate needs no restart. A changed pair that fails to load keeps the
//! previous one in service, with a warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_types::config::ConfigError;

use crate::error::ServerError;

/// How often the files are checked for a change.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// A certificate chain file and its key file, with the config keys that
/// name them (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub(crate) cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub(crate) key_file: PathBuf,
    /// The config key of `cert_file`, e.g. `server.oidc.cert_file`.
    pub(crate) cert_key: &'static str,
    /// The config key of `key_file`.
    pub(crate) key_key: &'static str,
}

fn invalid(key: &'static str, message: String) -> ServerError {
    ServerError::Config(ConfigError::Invalid {
        path: None,
        key,
        message,
    })
}

impl CertFiles {
    /// The certificate and key, checked to belong together.
    pub(crate) fn load(&self) -> Result<CertifiedKey, ServerError> {
        let chain = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| invalid(self.cert_key, format!("{}: {e}", self.cert_file.display())))?;
        if chain.is_empty() {
            return Err(invalid(
                self.cert_key,
                format!("{} holds no PEM certificate", self.cert_file.display()),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| invalid(self.key_key, format!("{}: {e}", self.key_file.display())))?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            invalid(
                self.key_key,
                format!(
                    "{} cannot serve {}: {e}",
                    self.key_file.display(),
                    self.cert_file.display()
                ),
            )
        })
    }

    fn stamp(&self) -> [Option<SystemTime>; 2] {
        let modified = |f: &Path| std::fs::metadata(f).and_then(|m| m.modified()).ok();
        [modified(&self.cert_file), modified(&self.key_file)]
    }
}

/// Serves the certificate of a [`CertFiles`], reloading it when either file
/// changes (checked at most every [`CHECK_INTERVAL`]).
pub(crate) struct FileCertResolver {
    files: CertFiles,
    current: Mutex<Loaded>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: [Option<SystemTime>; 2],
    checked: Instant,
}

impl std::fmt::Debug for FileCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCertResolver")
            .field("cert_file", &self.files.cert_file)
            .finish_non_exhaustive()
    }
}

impl FileCertResolver {
    /// Loads the pair now; an error names the config key.
    pub(crate) fn new(files: CertFiles) -> Result<Self, ServerError> {
        let stamp = files.stamp();
        let key = Arc::new(files.load()?);
        Ok(Self {
            files,
            current: Mutex::new(Loaded {
                key,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The pair in service, reloaded first if the files changed.
    pub(crate) fn current(&self) -> Option<Arc<CertifiedKey>> {
        let mut loaded = self.current.lock().ok()?;
        if loaded.checked.elapsed() >= CHECK_INTERVAL {
            loaded.checked = Instant::now();
            let now = self.files.stamp();
            if now != loaded.stamp {
                match self.files.load() {
                    Ok(key) => {
                        loaded.key = Arc::new(key);
                        loaded.stamp = now;
                        tracing::info!(cert_file = %self.files.cert_file.display(), "certificate reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the changed certificate files cannot be used; keeping the previous certificate");
                    }
                }
            }
        }
        Some(loaded.key.clone())
    }

    /// Pretends the last check was long ago (tests).
    #[cfg(test)]
    pub(crate) fn expire_check(&self) {
        if let Ok(mut l) = self.current.lock()
            && let Some(past) = Instant::now().checked_sub(CHECK_INTERVAL)
        {
            l.checked = past;
        }
    }
}

impl ResolvesServerCert for FileCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_svid::x509::X509Authority;
    use sigil_types::TrustDomain;

    fn files(dir: &Path) -> CertFiles {
        CertFiles {
            cert_file: dir.join("c.pem"),
            key_file: dir.join("k.pem"),
            cert_key: "test.cert_file",
            key_key: "test.key_file",
        }
    }

    fn authority() -> X509Authority {
        X509Authority::generate(
            &TrustDomain::new("example.org").unwrap(),
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap()
    }

    /// Writes the authority's certificate and key with modification times
    /// `age` seconds ago (distinct, whatever the file system's resolution).
    fn write(f: &CertFiles, a: &X509Authority, age: u64) {
        std::fs::write(
            &f.cert_file,
            sigil_svid::pem::certs_to_pem(&[a.cert_der().to_vec()]),
        )
        .unwrap();
        std::fs::write(&f.key_file, a.key().to_pem().as_bytes()).unwrap();
        let t = SystemTime::now() - Duration::from_secs(age);
        for p in [&f.cert_file, &f.key_file] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
    }

    #[test]
    fn unusable_files_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = files(dir.path());
        let a = authority();
        write(&good, &a, 0);
        let other = sigil_svid::keys::PrivateKey::generate_p256().unwrap();
        let mismatched = dir.path().join("other.pem");
        std::fs::write(&mismatched, other.to_pem().as_bytes()).unwrap();
        let with = |cert: &Path, key: &Path| CertFiles {
            cert_file: cert.to_owned(),
            key_file: key.to_owned(),
            ..good.clone()
        };
        for (f, want) in [
            (
                with(&dir.path().join("missing.pem"), &good.key_file),
                "test.cert_file",
            ),
            (with(&good.key_file, &good.key_file), "test.cert_file"),
            (with(&good.cert_file, &good.cert_file), "test.key_file"),
            (with(&good.cert_file, &mismatched), "test.key_file"),
        ] {
            let err = FileCertResolver::new(f).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should name {want}");
        }
        assert!(FileCertResolver::new(good).is_ok());
    }

    #[test]
    fn a_renewed_certificate_is_picked_up_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        let first = authority();
        write(&f, &first, 100);
        let resolver = FileCertResolver::new(f.clone()).unwrap();
        let served = |r: &FileCertResolver| r.current().unwrap().cert[0].as_ref().to_vec();
        assert_eq!(served(&resolver), first.cert_der());

        let second = authority();
        write(&f, &second, 50);
        // Not checked again before the interval passes.
        assert_eq!(served(&resolver), first.cert_der());
        resolver.expire_check();
        assert_eq!(served(&resolver), second.cert_der());

        // A half-written pair (new certificate, old key) keeps the last good one.
        let third = authority();
        write(&f, &third, 10);
        std::fs::write(&f.key_file, second.key().to_pem().as_bytes()).unwrap();
        resolver.expire_check();
        assert_eq!(served(&resolver), second.cert_der());
    }
}
