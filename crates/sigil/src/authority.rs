//! `sigil authority`: the trust domain's signing authorities, and the forced
//! rotation of the server's own after a key compromise (docs/ca-rotation.md).

use clap::{Args, Subcommand, ValueEnum};
use sigil_proto::server::v1 as pb;

use crate::admin::{AdminOpts, admin_err, connect_admin, fmt_time, print_list};
use crate::output::Output;

/// Which credentials an authority signs.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The X.509 CA that signs X509-SVIDs.
    X509,
    /// The key that signs JWT-SVIDs.
    Jwt,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::X509 => "x509",
            Kind::Jwt => "jwt",
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum AuthorityCommand {
    /// List the authorities of this server and of the servers sharing its database.
    List(AdminOpts),
    /// Step 1: create a new authority, published in the bundle but not signing yet.
    ///
    /// Refused if an authority of --kind is already prepared (activate that one).
    Prepare(KindArgs),
    /// Step 2: the prepared authority signs from now on; the active one is retired.
    ///
    /// The retired authority stays trusted. Wait between prepare and activate
    /// until every workload holds the new bundle (agents get it within
    /// seconds; workloads that fetch bundles themselves, by its refresh hint).
    Activate(KindArgs),
    /// Step 3: taint a retired authority: agents replace what it signed at once.
    ///
    /// The tainted authority stays trusted, but every agent renews the
    /// SVIDs it signed (and its own) at once, and cached JWT-SVIDs it
    /// signed are no longer served. The active authority cannot be tainted.
    Taint(IdArgs),
    /// Step 4: revoke a tainted authority: it leaves the bundle, its key is deleted
    ///
    /// What it signed no longer verifies. Only a tainted authority can be
    /// revoked; wait until the agents have replaced what it signed.
    ///
    /// Example, after a suspected compromise of the X.509 CA:
    ///
    ///   sigil authority prepare --kind x509
    ///   sigil authority activate --kind x509
    ///   sigil authority list        # note the old (retired) CA's ID
    ///   sigil authority taint --kind x509 --id x509-<serial>
    ///   sigil authority revoke --kind x509 --id x509-<serial>
    #[command(verbatim_doc_comment)]
    Revoke(IdArgs),
}

#[derive(Args, Debug)]
pub(crate) struct KindArgs {
    /// The authority kind: x509 (the CA of X509-SVIDs) or jwt (the key of JWT-SVIDs).
    #[arg(long, value_enum)]
    kind: Kind,
    #[command(flatten)]
    opts: AdminOpts,
}

#[derive(Args, Debug)]
pub(crate) struct IdArgs {
    /// The authority kind: x509 (the CA of X509-SVIDs) or jwt (the key of JWT-SVIDs).
    #[arg(long, value_enum)]
    kind: Kind,
    /// The authority's ID as `sigil authority list` shows it, e.g. x509-5f3a….
    #[arg(long)]
    id: String,
    #[command(flatten)]
    opts: AdminOpts,
}

fn authority_json(a: &pb::Authority) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "kind": a.kind,
        "state": a.state,
        "tainted": a.tainted,
        "not_before": a.not_before,
        "not_after": a.not_after,
        "created_at": a.created_at,
        "owner": a.owner,
        "local": a.local,
        "public_key_id": a.public_key_id,
    })
}

fn print_authority(a: &pb::Authority) {
    println!("ID            : {}", a.id);
    println!("Kind          : {}", a.kind);
    println!(
        "State         : {}{}",
        a.state,
        if a.tainted { " (tainted)" } else { "" }
    );
    let key_label = if a.kind == "jwt" {
        "Key ID        "
    } else {
        "SHA-256       "
    };
    println!("{key_label}: {}", a.public_key_id);
    println!("Not before    : {}", fmt_time(a.not_before));
    println!("Not after     : {}", fmt_time(a.not_after));
    println!(
        "Server        : {}{}",
        if a.owner.is_empty() {
            "-"
        } else {
            a.owner.as_str()
        },
        if a.local { " (this server)" } else { "" }
    );
    println!();
}

fn print(out: Output, verb: &str, a: &pb::Authority) -> anyhow::Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&authority_json(a))?),
        Output::Text => {
            println!("{verb} {} authority {}", a.kind, a.id);
            print_authority(a);
        }
    }
    Ok(())
}

/// A step of a forced rotation, as the admin API names it.
#[derive(Debug, Clone, Copy)]
enum Step {
    Prepare,
    Activate,
    Taint,
    Revoke,
}

impl Step {
    /// What the text output says was done.
    fn done(self) -> &'static str {
        match self {
            Step::Prepare => "Prepared",
            Step::Activate => "Activated",
            Step::Taint => "Tainted",
            Step::Revoke => "Revoked",
        }
    }
}

pub(crate) async fn run(cmd: AuthorityCommand) -> anyhow::Result<()> {
    let (step, kind, id, opts) = match cmd {
        AuthorityCommand::List(opts) => {
            let mut c = connect_admin(&opts.admin_socket).await?;
            let authorities = c.list_authorities().await.map_err(admin_err)?;
            return print_list(
                opts.output,
                &authorities,
                ("authority", "authorities"),
                authority_json,
                print_authority,
            );
        }
        AuthorityCommand::Prepare(a) => (Step::Prepare, a.kind, String::new(), a.opts),
        AuthorityCommand::Activate(a) => (Step::Activate, a.kind, String::new(), a.opts),
        AuthorityCommand::Taint(a) => (Step::Taint, a.kind, a.id, a.opts),
        AuthorityCommand::Revoke(a) => (Step::Revoke, a.kind, a.id, a.opts),
    };
    let mut c = connect_admin(&opts.admin_socket).await?;
    let kind = kind.name();
    let r = match step {
        Step::Prepare => c.prepare_authority(kind).await,
        Step::Activate => c.activate_authority(kind).await,
        Step::Taint => c.taint_authority(kind, id).await,
        Step::Revoke => c.revoke_authority(kind, id).await,
    }
    .map_err(admin_err)?;
    print(opts.output, step.done(), &r)
}
