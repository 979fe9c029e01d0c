//! `sigil bundle`: the server's own trust bundle and the bundles of federated
//! trust domains, through the admin socket.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use sigil_svid::bundle::Bundle;
use sigil_types::TrustDomain;

use crate::admin::{AdminOpts, admin_err, connect_admin};
use crate::output::Output;

/// How a bundle is written or read.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum BundleFormat {
    /// PEM certificates of the X.509 authorities.
    Pem,
    /// The SPIFFE bundle JSON (JWKS with x509-svid and jwt-svid keys).
    Spiffe,
}

#[derive(Subcommand, Debug)]
pub(crate) enum BundleCommand {
    /// Print a trust bundle: this trust domain's (default) or a federated one.
    Show {
        /// A federated trust domain whose bundle to print instead of the own one.
        #[arg(long)]
        trust_domain: Option<String>,
        /// pem or spiffe.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// The server's admin socket.
        #[arg(long, env = "SIGIL_ADMIN_SOCKET", default_value = crate::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// List the own trust bundle and every federated bundle the server holds.
    List(AdminOpts),
    /// Set (create or replace) the bundle of a foreign trust domain.
    ///
    /// Use it to bootstrap an https_spiffe federation relationship (the
    /// foreign bundle endpoint's SVID is checked against this bundle until
    /// the first fetch succeeds), or to federate with a trust domain that has
    /// no bundle endpoint. Workloads whose entries federate with the trust
    /// domain receive the bundle. The input is checked before anything is
    /// sent: SPIFFE bundle JSON as `sigil bundle show --format spiffe` or
    /// SPIRE's `bundle show -format spiffe` print it, or PEM CA certificates
    /// with --format pem.
    Set(BundleSetArgs),
    /// Delete a federated bundle: workloads stop receiving it, and SVIDs of
    /// that trust domain are no longer trusted.
    Delete {
        /// The federated trust domain, e.g. partner.org.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

#[derive(Args, Debug)]
pub(crate) struct BundleSetArgs {
    /// The foreign trust domain the bundle belongs to, e.g. partner.org (a
    /// bundle does not name its trust domain, so this is always explicit).
    #[arg(long)]
    trust_domain: String,
    /// The bundle file, or - for standard input.
    #[arg(long, default_value = "-")]
    path: String,
    /// The file's format: spiffe (bundle JSON) or pem (CA certificates, which
    /// become the bundle's X.509 authorities; it then has no JWT authorities).
    #[arg(long, value_enum, default_value_t = BundleFormat::Spiffe)]
    format: BundleFormat,
    #[command(flatten)]
    opts: AdminOpts,
}

/// Parses a trust domain argument (`td` or `spiffe://td`).
pub(crate) fn trust_domain_arg(s: &str) -> anyhow::Result<TrustDomain> {
    TrustDomain::new(s).map_err(|e| {
        anyhow::anyhow!("--trust-domain {s:?}: {e} (a trust domain looks like partner.org)")
    })
}

/// Reads `path` (or standard input for `-`).
fn read_input(path: &str) -> anyhow::Result<String> {
    if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the bundle from standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(Path::new(path)).with_context(|| format!("cannot read {path}"))
    }
}

/// Parses and checks a bundle for `td` in `format`; the error says what is
/// wrong with the input.
pub(crate) fn parse_bundle(
    td: &TrustDomain,
    text: &str,
    format: BundleFormat,
    source: &str,
) -> anyhow::Result<Bundle> {
    if text.trim().is_empty() {
        bail!(
            "{source} is empty; expected a {} bundle",
            format_name(format)
        );
    }
    match format {
        BundleFormat::Spiffe => {
            if !text.trim_start().starts_with('{') {
                bail!("{source} is not SPIFFE bundle JSON; for PEM certificates add --format pem");
            }
            Bundle::from_json(td.clone(), text)
                .with_context(|| format!("{source} is not a valid SPIFFE bundle"))
        }
        BundleFormat::Pem => {
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                bail!(
                    "{source} holds no PEM certificate; for SPIFFE bundle JSON use --format spiffe"
                );
            }
            Bundle::from_pem(td.clone(), text)
                .with_context(|| format!("{source} is not a valid PEM bundle"))
        }
    }
}

fn format_name(f: BundleFormat) -> &'static str {
    match f {
        BundleFormat::Pem => "PEM",
        BundleFormat::Spiffe => "SPIFFE JSON",
    }
}

fn print_bundle(b: &Bundle, format: BundleFormat) -> anyhow::Result<()> {
    match format {
        BundleFormat::Spiffe => println!("{}", serde_json::to_string_pretty(&b.to_document())?),
        BundleFormat::Pem => print!("{}", b.x509_pem()),
    }
    Ok(())
}

fn bundle_json(b: &Bundle, own: bool) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({
        "trust_domain": b.trust_domain.to_string(),
        "own": own,
        "bundle": serde_json::to_value(b.to_document())?,
    }))
}

fn print_summary(b: &Bundle, own: bool) {
    println!(
        "Trust domain      : {} ({})",
        b.trust_domain,
        if own { "own" } else { "federated" }
    );
    println!("X.509 authorities : {}", b.x509_authorities.len());
    for der in &b.x509_authorities {
        match sigil_svid::x509::cert_info(der) {
            Ok(i) => println!(
                "  CA serial {} valid until {}",
                i.serial_hex,
                humantime::format_rfc3339_seconds(i.not_after)
            ),
            Err(e) => println!("  unreadable certificate: {e}"),
        }
    }
    println!("JWT authorities   : {}", b.jwt_authorities.len());
    for k in &b.jwt_authorities {
        println!(
            "  key ID {} ({}{})",
            k.kid.as_deref().unwrap_or("-"),
            k.kty,
            k.crv
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        );
    }
    println!("Sequence          : {}", b.sequence);
    if let Some(h) = b.refresh_hint {
        println!("Refresh hint      : {h}s");
    }
    println!();
}

/// Parses a bundle the server sent.
pub(crate) fn server_bundle(trust_domain: &str, json: &str) -> anyhow::Result<Bundle> {
    let td = TrustDomain::new(trust_domain)
        .with_context(|| format!("the server sent an invalid trust domain {trust_domain:?}"))?;
    Bundle::from_json(td, json)
        .with_context(|| format!("the server sent an unreadable bundle for {trust_domain}"))
}

pub(crate) async fn run(cmd: BundleCommand) -> anyhow::Result<()> {
    match cmd {
        BundleCommand::Show {
            trust_domain,
            format,
            admin_socket,
        } => {
            let td = trust_domain.as_deref().map(trust_domain_arg).transpose()?;
            let mut c = connect_admin(&admin_socket).await?;
            let b = match td {
                None => {
                    let r = c.bundle().await.map_err(admin_err)?;
                    server_bundle(&r.trust_domain, &r.bundle_json)?
                }
                Some(td) => {
                    let r = c.federated_bundle(&td).await.map_err(admin_err)?;
                    server_bundle(&r.trust_domain, &r.bundle_json)?
                }
            };
            print_bundle(&b, format)
        }
        BundleCommand::List(opts) => {
            let mut c = connect_admin(&opts.admin_socket).await?;
            let own = c.bundle().await.map_err(admin_err)?;
            let own = server_bundle(&own.trust_domain, &own.bundle_json)?;
            let federated = c
                .list_federated_bundles()
                .await
                .map_err(admin_err)?
                .iter()
                .map(|b| server_bundle(&b.trust_domain, &b.bundle_json))
                .collect::<anyhow::Result<Vec<_>>>()?;
            match opts.output {
                Output::Json => {
                    let mut all = vec![bundle_json(&own, true)?];
                    for b in &federated {
                        all.push(bundle_json(b, false)?);
                    }
                    println!("{}", serde_json::to_string_pretty(&all)?);
                }
                Output::Text => {
                    print_summary(&own, true);
                    for b in &federated {
                        print_summary(b, false);
                    }
                }
            }
            Ok(())
        }
        BundleCommand::Set(a) => {
            let td = trust_domain_arg(&a.trust_domain)?;
            let source = if a.path == "-" {
                "standard input".to_owned()
            } else {
                a.path.clone()
            };
            let text = read_input(&a.path)?;
            let b = parse_bundle(&td, &text, a.format, &source)?;
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            let r = c
                .set_federated_bundle(&td, b.to_json())
                .await
                .map_err(admin_err)?;
            let stored = server_bundle(&r.trust_domain, &r.bundle_json)?;
            match a.opts.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&bundle_json(&stored, false)?)?
                ),
                Output::Text => {
                    println!("Set the bundle of {}", stored.trust_domain);
                    print_summary(&stored, false);
                }
            }
            if stored.x509_authorities.is_empty() && stored.jwt_authorities.is_empty() {
                eprintln!(
                    "warning: the bundle of {} has no authorities; no SVID of that trust domain will be trusted",
                    stored.trust_domain
                );
            }
            Ok(())
        }
        BundleCommand::Delete { trust_domain, opts } => {
            let td = trust_domain_arg(&trust_domain)?;
            let mut c = connect_admin(&opts.admin_socket).await?;
            let r = c.delete_federated_bundle(&td).await.map_err(admin_err)?;
            match opts.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"deleted": r.trust_domain}))?
                ),
                Output::Text => println!("Deleted the bundle of {}", r.trust_domain),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use sigil_svid::x509::X509Authority;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("partner.org").unwrap()
    }

    #[test]
    fn pem_ca_certificates_become_x509_authorities() {
        let ca =
            X509Authority::generate(&td(), Duration::from_secs(3600), SystemTime::now()).unwrap();
        let pem = sigil_svid::pem::certs_to_pem(&[ca.cert_der().to_vec()]);
        let b = parse_bundle(&td(), &pem, BundleFormat::Pem, "f").unwrap();
        assert_eq!(b.x509_authorities, vec![ca.cert_der().to_vec()]);
        // The same bundle as JSON parses back to the same authorities.
        let again = parse_bundle(&td(), &b.to_json(), BundleFormat::Spiffe, "f").unwrap();
        assert_eq!(again.x509_authorities, b.x509_authorities);
    }

    #[test]
    fn bad_bundle_input_is_refused_with_the_reason() {
        let ca =
            X509Authority::generate(&td(), Duration::from_secs(3600), SystemTime::now()).unwrap();
        let pem = sigil_svid::pem::certs_to_pem(&[ca.cert_der().to_vec()]);
        let id = "spiffe://partner.org/web".parse().unwrap();
        let key = sigil_svid::keys::PrivateKey::generate_p256().unwrap();
        let leaf = ca
            .sign_svid(
                &sigil_svid::x509::SvidRequest::new(&id, Duration::from_secs(60)),
                &key.public_key_spki_der(),
                SystemTime::now(),
            )
            .unwrap();
        let leaf_pem = sigil_svid::pem::certs_to_pem(&[leaf]);
        for (text, format, needle) in [
            (leaf_pem.as_str(), BundleFormat::Pem, "not a CA certificate"),
            ("", BundleFormat::Spiffe, "empty"),
            (pem.as_str(), BundleFormat::Spiffe, "--format pem"),
            (
                "{\"keys\": 3}",
                BundleFormat::Spiffe,
                "not a valid SPIFFE bundle",
            ),
            ("{}", BundleFormat::Spiffe, "not a valid SPIFFE bundle"),
            ("{\"keys\": []}", BundleFormat::Pem, "no PEM certificate"),
        ] {
            let err = parse_bundle(&td(), text, format, "f").unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{text}: {err:#}");
        }
    }
}
