//! Shared pieces of sigil's fuzz targets: the byte mutation used to derive
//! hostile variants of valid samples, and the valid samples themselves (an
//! X.509 CA with one leaf X509-SVID, a JWT authority with one JWT-SVID, and
//! the bundle publishing both); and in [`targets`] the body of every fuzz
//! target, which the libFuzzer binaries and the stable corpus replay share.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil_svid::bundle::{Bundle, BundleSet};
use sigil_svid::jwt::JwtAuthority;
use sigil_svid::keys::PrivateKey;
use sigil_svid::x509::{SvidRequest, X509Authority, make_csr};
use sigil_types::{SpiffeId, TrustDomain};

pub mod targets;

/// The fixed instant every sample is minted and checked at.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

/// Applies one edit to `sample`, chosen by the first four bytes of `data`:
/// byte 0 picks flip (xor), insert or delete, bytes 1–2 the position (modulo
/// the length) and byte 3 the value. Returns `None` when `data` is too short.
pub fn mutate(sample: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let [op, hi, lo, value, ..] = *data else {
        return None;
    };
    let mut out = sample.to_vec();
    let len = out.len().max(1);
    let pos = usize::from(u16::from_be_bytes([hi, lo])) % len;
    match op % 3 {
        0 => {
            let b = out.get_mut(pos)?;
            *b ^= value.max(1);
        }
        1 => out.insert(pos.min(out.len()), value),
        _ => {
            if pos < out.len() {
                out.remove(pos);
            }
        }
    }
    Some(out)
}

/// Valid samples minted once per process.
pub struct Samples {
    /// The trust domain of every sample.
    pub td: TrustDomain,
    /// The workload ID in the leaf and the JWT.
    pub id: SpiffeId,
    /// The CA certificate (DER) that anchors `leaf`.
    pub ca_der: Vec<u8>,
    /// A leaf X509-SVID (DER) signed by the CA.
    pub leaf_der: Vec<u8>,
    /// A CSR (DER) for a fresh P-256 key.
    pub csr_der: Vec<u8>,
    /// A JWT-SVID for audience `db`.
    pub jwt: String,
    /// A bundle set holding the JWT authority's key.
    pub jwt_keys: BundleSet,
    /// The trust domain's bundle (X.509 CA and JWT key) as JSON.
    pub bundle_json: String,
}

fn build() -> Result<Samples, sigil_svid::SvidError> {
    sigil_svid::install_crypto_provider();
    let td =
        TrustDomain::new("example.org").map_err(|e| sigil_svid::SvidError::Mint(e.to_string()))?;
    let id = td
        .id_with_path("/ns/web")
        .map_err(|e| sigil_svid::SvidError::Mint(e.to_string()))?;
    let day = Duration::from_secs(86_400);
    let ca = X509Authority::generate(&td, day, now())?;
    let key = PrivateKey::generate_p256()?;
    let leaf_der = ca.sign_svid(
        &SvidRequest::new(&id, Duration::from_secs(3600)),
        &key.public_key_spki_der(),
        now(),
    )?;
    let csr_der = make_csr(&key)?;
    let jwt_auth = JwtAuthority::generate(day, now())?;
    let jwt = jwt_auth.sign(&id, &["db".to_owned()], Duration::from_secs(300), now())?;
    let mut bundle = Bundle::new(td.clone());
    bundle.x509_authorities.push(ca.cert_der().to_vec());
    bundle.jwt_authorities.push(jwt_auth.public_jwk());
    bundle.sequence = 7;
    let bundle_json = bundle.to_json();
    let mut jwt_keys = BundleSet::default();
    jwt_keys.insert(bundle);
    Ok(Samples {
        td,
        id,
        ca_der: ca.cert_der().to_vec(),
        leaf_der,
        csr_der,
        jwt,
        jwt_keys,
        bundle_json,
    })
}

/// The samples; minting them cannot fail on a working crypto provider, so a
/// failure aborts the fuzz run at its first input.
pub static SAMPLES: LazyLock<Samples> = LazyLock::new(|| match build() {
    Ok(s) => s,
    Err(e) => panic!("cannot mint the fuzz samples: {e}"),
});
