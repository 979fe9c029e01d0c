//! `sigil federation`: relationships with foreign trust domains, whose
//! bundles the server fetches from their bundle endpoints and hands to the
//! workloads whose entries federate with them.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use sigil_proto::server::v1 as pb;
use sigil_types::TrustDomain;
use sigil_types::federation::{BundleEndpointProfile, validate_endpoint_url};

use crate::admin::{AdminOpts, admin_err, connect_admin, fmt_time, print_list};
use crate::bundle::{BundleFormat, parse_bundle, server_bundle, trust_domain_arg};
use crate::output::Output;

/// How the foreign bundle endpoint authenticates itself.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Profile {
    /// A Web PKI certificate for the URL's host (as any HTTPS site has).
    #[value(name = "https_web")]
    HttpsWeb,
    /// An X509-SVID with the SPIFFE ID given by --endpoint-spiffe-id.
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::HttpsWeb => "https_web",
            Profile::HttpsSpiffe => "https_spiffe",
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum FederationCommand {
    /// Federate with a foreign trust domain: the server fetches its bundle
    /// from its bundle endpoint, keeps it current, and delivers it to
    /// workloads whose entries name it with --federates-with.
    ///
    /// Example, for an endpoint that serves its bundle with its server's SVID:
    ///
    ///   # on partner.org's server:
    ///   sigil bundle show --format spiffe > partner.json
    ///   # here:
    ///   sigil federation create --trust-domain partner.org \
    ///     --bundle-endpoint-url https://partner.example:8443/ \
    ///     --bundle-endpoint-profile https_spiffe \
    ///     --endpoint-spiffe-id spiffe://partner.org/sigil/server \
    ///     --trust-domain-bundle-path partner.json
    ///   sigil entry update --entry-id <ID> --federates-with partner.org
    #[command(verbatim_doc_comment)]
    Create(CreateArgs),
    /// List the federation relationships and when each bundle was last fetched.
    List(AdminOpts),
    /// Show one federation relationship.
    Show(TrustDomainArgs),
    /// Change a relationship: the flags given replace those settings, others stay.
    Update(UpdateArgs),
    /// Fetch the foreign bundle now instead of at the next scheduled refresh.
    Refresh(TrustDomainArgs),
    /// Delete a relationship: the server stops fetching the foreign bundle.
    Delete(TrustDomainArgs),
}

#[derive(Args, Debug)]
pub(crate) struct TrustDomainArgs {
    /// The foreign trust domain, e.g. partner.org.
    #[arg(long)]
    trust_domain: String,
    #[command(flatten)]
    opts: AdminOpts,
}

#[derive(Args, Debug)]
pub(crate) struct RelationshipFields {
    /// The foreign bundle endpoint, https://host[:port]/path.
    #[arg(long)]
    bundle_endpoint_url: Option<String>,
    /// How the endpoint authenticates itself: https_web (a Web PKI
    /// certificate) or https_spiffe (an X509-SVID; needs --endpoint-spiffe-id).
    #[arg(long, value_enum)]
    bundle_endpoint_profile: Option<Profile>,
    /// The SPIFFE ID the https_spiffe endpoint presents, e.g.
    /// spiffe://partner.org/sigil/server (SPIRE: spiffe://partner.org/spire/server).
    #[arg(long)]
    endpoint_spiffe_id: Option<String>,
    /// A bundle of the foreign trust domain to store now. An https_spiffe
    /// endpoint of that same trust domain is authenticated with it until the
    /// first fetch succeeds, so it is needed there.
    #[arg(long, value_name = "FILE")]
    trust_domain_bundle_path: Option<PathBuf>,
    /// The format of --trust-domain-bundle-path: spiffe (bundle JSON) or pem.
    #[arg(long, value_enum, default_value_t = BundleFormat::Spiffe)]
    trust_domain_bundle_format: BundleFormat,
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// The foreign trust domain, e.g. partner.org (never taken from the URL).
    #[arg(long)]
    trust_domain: String,
    #[command(flatten)]
    fields: RelationshipFields,
    #[command(flatten)]
    opts: AdminOpts,
}

#[derive(Args, Debug)]
pub(crate) struct UpdateArgs {
    /// The foreign trust domain whose relationship to change.
    #[arg(long)]
    trust_domain: String,
    #[command(flatten)]
    fields: RelationshipFields,
    #[command(flatten)]
    opts: AdminOpts,
}

/// Applies the given flags onto `r` and checks the result.
fn apply_fields(
    r: &mut pb::FederationRelationship,
    td: &TrustDomain,
    f: &RelationshipFields,
) -> anyhow::Result<()> {
    if let Some(url) = &f.bundle_endpoint_url {
        validate_endpoint_url(url).map_err(|e| anyhow::anyhow!("--bundle-endpoint-url: {e}"))?;
        r.bundle_endpoint_url = url.clone();
    }
    if let Some(p) = f.bundle_endpoint_profile {
        r.bundle_endpoint_profile = p.name().to_owned();
        if p == Profile::HttpsWeb && f.endpoint_spiffe_id.is_none() {
            r.endpoint_spiffe_id.clear();
        }
    }
    if let Some(id) = &f.endpoint_spiffe_id {
        r.endpoint_spiffe_id = id.clone();
    }
    BundleEndpointProfile::from_parts(&r.bundle_endpoint_profile, Some(&r.endpoint_spiffe_id))
        .map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.to_string()
                    .replace("endpoint_spiffe_id", "--endpoint-spiffe-id")
            )
        })?;
    if let Some(path) = &f.trust_domain_bundle_path {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let source = path.display().to_string();
        let b = parse_bundle(td, &text, f.trust_domain_bundle_format, &source)?;
        r.trust_domain_bundle_json = b.to_json();
    }
    Ok(())
}

fn relationship_json(r: &pb::FederationRelationship) -> serde_json::Value {
    serde_json::json!({
        "trust_domain": r.trust_domain,
        "bundle_endpoint_url": r.bundle_endpoint_url,
        "bundle_endpoint_profile": r.bundle_endpoint_profile,
        "endpoint_spiffe_id": r.endpoint_spiffe_id,
        "from_config": r.from_config,
        "last_refresh": r.last_refresh,
        "next_refresh": r.next_refresh,
        "last_error": r.last_error,
    })
}

fn print_relationship(r: &pb::FederationRelationship) {
    println!("Trust domain       : {}", r.trust_domain);
    println!("Bundle endpoint    : {}", r.bundle_endpoint_url);
    println!("Profile            : {}", r.bundle_endpoint_profile);
    if !r.endpoint_spiffe_id.is_empty() {
        println!("Endpoint SPIFFE ID : {}", r.endpoint_spiffe_id);
    }
    if r.from_config {
        println!("From config        : true (change it in the server's config file)");
    }
    println!("Last refresh       : {}", fmt_time(r.last_refresh));
    if r.next_refresh > 0 {
        println!("Next refresh       : {}", fmt_time(r.next_refresh));
    }
    if !r.last_error.is_empty() {
        println!("Last error         : {}", r.last_error);
    }
    println!();
}

fn print_relationships(out: Output, rs: &[pb::FederationRelationship]) -> anyhow::Result<()> {
    print_list(
        out,
        rs,
        ("federation relationship", "federation relationships"),
        relationship_json,
        print_relationship,
    )
}

pub(crate) async fn run(cmd: FederationCommand) -> anyhow::Result<()> {
    match cmd {
        FederationCommand::Create(a) => {
            let td = trust_domain_arg(&a.trust_domain)?;
            if a.fields.bundle_endpoint_url.is_none() {
                bail!("--bundle-endpoint-url is required, e.g. https://partner.example:8443/");
            }
            if a.fields.bundle_endpoint_profile.is_none() {
                bail!(
                    "--bundle-endpoint-profile is required: https_web (a Web PKI certificate) or https_spiffe (an X509-SVID, with --endpoint-spiffe-id)"
                );
            }
            let mut r = pb::FederationRelationship {
                trust_domain: td.to_string(),
                ..Default::default()
            };
            apply_fields(&mut r, &td, &a.fields)?;
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            let created = c
                .create_federation_relationship(r)
                .await
                .map_err(admin_err)?;
            if a.opts.output == Output::Text {
                println!("Created the federation relationship with {}", td);
            }
            print_one(a.opts.output, &created)
        }
        FederationCommand::Update(a) => {
            let td = trust_domain_arg(&a.trust_domain)?;
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            let mut r = c.federation_relationship(&td).await.map_err(admin_err)?;
            r.trust_domain_bundle_json.clear();
            apply_fields(&mut r, &td, &a.fields)?;
            let updated = c
                .update_federation_relationship(r)
                .await
                .map_err(admin_err)?;
            if a.opts.output == Output::Text {
                println!("Updated the federation relationship with {}", td);
            }
            print_one(a.opts.output, &updated)
        }
        FederationCommand::List(opts) => {
            let mut c = connect_admin(&opts.admin_socket).await?;
            let relationships = c.list_federation_relationships().await.map_err(admin_err)?;
            print_relationships(opts.output, &relationships)
        }
        FederationCommand::Show(a) => {
            let td = trust_domain_arg(&a.trust_domain)?;
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            let r = c.federation_relationship(&td).await.map_err(admin_err)?;
            print_one(a.opts.output, &r)
        }
        FederationCommand::Refresh(a) => {
            let td = trust_domain_arg(&a.trust_domain)?;
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            let r = c.refresh_bundle(&td).await.map_err(|e| {
                anyhow::anyhow!(
                    "refreshing the bundle of {td} failed: {} (the previous bundle is kept)",
                    admin_err(e)
                )
            })?;
            let b = server_bundle(&r.trust_domain, &r.bundle_json)?;
            match a.opts.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "trust_domain": r.trust_domain,
                        "bundle": serde_json::to_value(b.to_document())?,
                    }))?
                ),
                Output::Text => println!(
                    "Refreshed the bundle of {}: {} X.509 authorit{}, {} JWT authorit{}, sequence {}",
                    b.trust_domain,
                    b.x509_authorities.len(),
                    if b.x509_authorities.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    b.jwt_authorities.len(),
                    if b.jwt_authorities.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    b.sequence
                ),
            }
            Ok(())
        }
        FederationCommand::Delete(a) => {
            let td = trust_domain_arg(&a.trust_domain)?;
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            let r = c
                .delete_federation_relationship(&td)
                .await
                .map_err(admin_err)?;
            match a.opts.output {
                Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&relationship_json(&r))?)
                }
                Output::Text => println!(
                    "Deleted the federation relationship with {} (its bundle stays until `sigil bundle delete --trust-domain {}`)",
                    r.trust_domain, r.trust_domain
                ),
            }
            Ok(())
        }
    }
}

fn print_one(out: Output, r: &pb::FederationRelationship) -> anyhow::Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&relationship_json(r))?),
        Output::Text => print_relationship(r),
    }
    Ok(())
}
