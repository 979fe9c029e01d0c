//! Admin commands: entries, join tokens, agents, healthcheck. They talk to
//! the server's admin socket (bundles and federation: `bundle.rs`,
//! `federation.rs`).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use sigil_client::{AdminClient, AdminError};
use sigil_proto::server::v1 as pb;
use sigil_types::{Attribute, SpiffeId, duration};

use crate::output::Output;

/// How to reach the admin API.
#[derive(Args, Debug, Clone)]
pub(crate) struct AdminOpts {
    /// The server's admin socket.
    #[arg(long, env = "SIGIL_ADMIN_SOCKET", default_value = crate::DEFAULT_ADMIN_SOCKET)]
    pub(crate) admin_socket: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
}

pub(crate) async fn connect_admin(path: &std::path::Path) -> anyhow::Result<AdminClient> {
    let client = AdminClient::connect(path).await.with_context(|| {
        format!(
            "cannot connect to the admin socket {}; is the server running? (set --admin-socket or SIGIL_ADMIN_SOCKET)",
            path.display()
        )
    })?;
    Ok(client.max_response_bytes(ADMIN_RESPONSE_BYTES))
}

/// The largest admin API answer the CLI reads (16 MiB). Entry pages are
/// bounded at 4 MiB by the server; the federated bundles, which `bundle
/// list` receives in one answer, at 8 MiB in all (a little more when two
/// HA servers each took one at once).
const ADMIN_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A failed admin call as the user sees it: the server's message alone.
pub(crate) fn admin_err(e: AdminError) -> anyhow::Error {
    match e.status() {
        Some(s) => anyhow::anyhow!("{}", s.message()),
        None => anyhow::Error::new(e),
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum EntryCommand {
    /// Create a registration entry.
    Create(EntryCreateArgs),
    /// Show entries: one by --entry-id, or all matching the filters.
    Show(EntryShowArgs),
    /// Change an entry: the flags given replace those fields, others stay.
    Update(EntryUpdateArgs),
    /// Delete entries.
    Delete(EntryDeleteArgs),
}

#[derive(Args, Debug)]
pub(crate) struct EntryFields {
    /// The SPIFFE ID matching workloads get, e.g. spiffe://example.org/web; not under /sigil/ (reserved for the server and agents).
    #[arg(long)]
    spiffe_id: Option<String>,
    /// The agent (or node alias, or other entry) this entry is under.
    #[arg(long)]
    parent_id: Option<String>,
    /// A selector type:value the workload must have, e.g. unix:uid:1000 (repeatable; all must match).
    #[arg(long = "selector", short = 's')]
    selectors: Vec<String>,
    /// X509-SVID lifetime, e.g. 30m (default: the server's).
    #[arg(long)]
    x509_svid_ttl: Option<String>,
    /// JWT-SVID lifetime, e.g. 5m (default: the server's).
    #[arg(long)]
    jwt_svid_ttl: Option<String>,
    /// A DNS name for the X509-SVID (repeatable).
    #[arg(long = "dns")]
    dns_names: Vec<String>,
    /// A trust domain whose bundle the workload receives (repeatable).
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
    /// An attested attribute to carry in the SVIDs (repeatable): cluster,
    /// region, zone, node_name (from the agent's node attestation), namespace,
    /// service_account (from the entry's k8s:ns / k8s:sa selectors). On
    /// update, the attributes given replace the entry's.
    #[arg(long = "attribute", value_name = "NAME")]
    attributes: Vec<Attribute>,
    /// Make this a node alias: parented to the server, matched against agents' node selectors.
    #[arg(long, conflicts_with = "parent_id")]
    node: bool,
    /// Not supported yet: refused (an entry cannot grant admin API access).
    #[arg(long)]
    admin: bool,
    /// Not supported yet: refused (an entry cannot make a downstream CA).
    #[arg(long)]
    downstream: bool,
    /// A label to tell several SVIDs of one workload apart.
    #[arg(long)]
    hint: Option<String>,
    /// When the entry is deleted: RFC 3339 time or Unix seconds.
    #[arg(long)]
    expires_at: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct EntryCreateArgs {
    #[command(flatten)]
    fields: EntryFields,
    /// Use this entry ID instead of a generated one.
    #[arg(long)]
    entry_id: Option<String>,
    #[command(flatten)]
    opts: AdminOpts,
}

#[derive(Args, Debug)]
pub(crate) struct EntryUpdateArgs {
    /// The entry to change.
    #[arg(long)]
    entry_id: String,
    #[command(flatten)]
    fields: EntryFields,
    #[command(flatten)]
    opts: AdminOpts,
}

#[derive(Args, Debug)]
pub(crate) struct EntryShowArgs {
    /// Show only this entry.
    #[arg(long)]
    entry_id: Option<String>,
    /// Only entries with this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Only entries with this parent ID.
    #[arg(long)]
    parent_id: Option<String>,
    /// Only entries matching these selectors (see --match).
    #[arg(long = "selector", short = 's')]
    selectors: Vec<String>,
    /// How --selector matches: superset (entry has all given), subset, exact, any.
    #[arg(
        long = "match",
        default_value = "superset",
        value_parser = ["superset", "subset", "exact", "any"],
        requires = "selectors"
    )]
    selector_match: String,
    #[command(flatten)]
    opts: AdminOpts,
}

#[derive(Args, Debug)]
pub(crate) struct EntryDeleteArgs {
    /// The entry to delete (repeatable).
    #[arg(long, required = true)]
    entry_id: Vec<String>,
    #[command(flatten)]
    opts: AdminOpts,
}

fn parse_ttl(v: &Option<String>, flag: &str) -> anyhow::Result<Option<i64>> {
    v.as_deref()
        .map(|s| {
            duration::parse(s)
                .map(|d| d.as_secs() as i64)
                .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
        })
        .transpose()
}

fn parse_time(v: &str) -> anyhow::Result<i64> {
    if let Ok(n) = v.parse::<i64>() {
        return Ok(n);
    }
    let t = humantime::parse_rfc3339_weak(v).map_err(|e| {
        anyhow::anyhow!(
            "--expires-at {v:?}: {e} (use RFC 3339, e.g. 2027-01-31T12:00:00Z, or Unix seconds)"
        )
    })?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0))
}

/// Applies the flags that were given onto `e`.
fn apply_fields(e: &mut pb::Entry, f: &EntryFields) -> anyhow::Result<()> {
    if let Some(s) = &f.spiffe_id {
        e.spiffe_id = s.clone();
    }
    if let Some(p) = &f.parent_id {
        e.parent_id = p.clone();
    }
    if f.node {
        let id: SpiffeId = e
            .spiffe_id
            .parse()
            .map_err(|err| anyhow::anyhow!("--spiffe-id {:?}: {err}", e.spiffe_id))?;
        e.parent_id = format!(
            "spiffe://{}{}",
            id.trust_domain_name(),
            sigil_types::SERVER_PATH
        );
    }
    if !f.selectors.is_empty() {
        e.selectors = f.selectors.clone();
    }
    if let Some(t) = parse_ttl(&f.x509_svid_ttl, "x509-svid-ttl")? {
        e.x509_svid_ttl = t;
    }
    if let Some(t) = parse_ttl(&f.jwt_svid_ttl, "jwt-svid-ttl")? {
        e.jwt_svid_ttl = t;
    }
    if !f.dns_names.is_empty() {
        e.dns_names = f.dns_names.clone();
    }
    if !f.federates_with.is_empty() {
        e.federates_with = f.federates_with.clone();
    }
    if !f.attributes.is_empty() {
        let mut attributes = f.attributes.clone();
        attributes.sort();
        attributes.dedup();
        e.attributes = attributes.iter().map(ToString::to_string).collect();
    }
    // Kept as flags so that scripts written for SPIRE fail loudly instead
    // of silently getting an identity without the power they asked for.
    if f.admin {
        anyhow::bail!("--admin is not supported yet: no entry can grant admin API access");
    }
    if f.downstream {
        anyhow::bail!("--downstream is not supported yet: sigil has no downstream CAs");
    }
    if let Some(h) = &f.hint {
        e.hint = h.clone();
    }
    if let Some(x) = &f.expires_at {
        e.expires_at = parse_time(x)?;
    }
    Ok(())
}

fn fmt_ttl(secs: i64) -> String {
    match secs {
        0 => "default".into(),
        1.. => duration::format(Duration::from_secs(secs.unsigned_abs())),
        _ => format!("{secs} (invalid)"),
    }
}

/// Unix seconds as RFC 3339 text; a value no such text can hold (stored
/// before the server refused them) is shown as the raw number, never a panic.
pub(crate) fn fmt_time(secs: i64) -> String {
    if secs <= 0 {
        return "never".into();
    }
    if secs > sigil_types::entry::MAX_EXPIRES_AT {
        return format!("{secs} (Unix seconds, after the year 9999)");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()))
        .to_string()
}

/// Stored text as it may be printed on a terminal: control characters
/// (newlines that would forge a line, escape sequences) are escaped.
pub(crate) use sigil_types::text::escape_controls as shown;

fn print_entry(e: &pb::Entry) {
    println!("Entry ID         : {}", shown(&e.id));
    println!("SPIFFE ID        : {}", shown(&e.spiffe_id));
    println!("Parent ID        : {}", shown(&e.parent_id));
    println!("Revision         : {}", e.revision);
    println!("X509-SVID TTL    : {}", fmt_ttl(e.x509_svid_ttl));
    println!("JWT-SVID TTL     : {}", fmt_ttl(e.jwt_svid_ttl));
    for s in &e.selectors {
        println!("Selector         : {}", shown(s));
    }
    for d in &e.dns_names {
        println!("DNS name         : {}", shown(d));
    }
    for f in &e.federates_with {
        println!("FederatesWith    : {}", shown(f));
    }
    for a in &e.attributes {
        println!("Attribute        : {}", shown(a));
    }
    if e.admin {
        println!("Admin            : true");
    }
    if e.downstream {
        println!("Downstream       : true");
    }
    if !e.hint.is_empty() {
        println!("Hint             : {}", shown(&e.hint));
    }
    if e.expires_at > 0 {
        println!("Expires at       : {}", fmt_time(e.expires_at));
    }
    println!();
}

fn entry_json(e: &pb::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "federates_with": e.federates_with,
        "attributes": e.attributes,
        "admin": e.admin,
        "downstream": e.downstream,
        "hint": e.hint,
        "expires_at": e.expires_at,
        "revision": e.revision,
        "created_at": e.created_at,
    })
}

/// Prints `items` as one JSON array (each item by `json`), or as text: how
/// many were found (`noun`: singular and plural), then each item by `text`.
pub(crate) fn print_list<T>(
    out: Output,
    items: &[T],
    noun: (&str, &str),
    json: fn(&T) -> serde_json::Value,
    text: fn(&T),
) -> anyhow::Result<()> {
    match out {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&items.iter().map(json).collect::<Vec<_>>())?
        ),
        Output::Text => {
            let (one, many) = noun;
            println!(
                "Found {} {}",
                items.len(),
                if items.len() == 1 { one } else { many }
            );
            for item in items {
                text(item);
            }
        }
    }
    Ok(())
}

fn print_entries(out: Output, entries: &[pb::Entry]) -> anyhow::Result<()> {
    print_list(out, entries, ("entry", "entries"), entry_json, print_entry)
}

/// Prints batch results; fails if any item failed.
fn report(out: Output, results: Vec<pb::EntryResult>, verb: &str) -> anyhow::Result<()> {
    let failed: Vec<_> = results.iter().filter(|r| !r.error.is_empty()).collect();
    let done: Vec<pb::Entry> = results.iter().filter_map(|r| r.entry.clone()).collect();
    match out {
        Output::Json => {
            let items: Vec<_> = results
                .iter()
                .map(|r| match &r.entry {
                    Some(e) if r.error.is_empty() => {
                        serde_json::json!({"status": "ok", "entry": entry_json(e)})
                    }
                    _ => serde_json::json!({"status": "error", "id": r.id, "error": r.error}),
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&items)?);
        }
        Output::Text => {
            for e in &done {
                println!("{verb} entry {}", e.id);
                print_entry(e);
            }
        }
    }
    if let Some(first) = failed.first() {
        if failed.len() == 1 {
            bail!(
                "{}{}",
                if first.id.is_empty() {
                    String::new()
                } else {
                    format!("entry {}: ", first.id)
                },
                first.error
            );
        }
        bail!(
            "{} of {} entries failed; first: {}",
            failed.len(),
            results.len(),
            first.error
        );
    }
    Ok(())
}

pub(crate) async fn entry(cmd: EntryCommand) -> anyhow::Result<()> {
    match cmd {
        EntryCommand::Create(a) => {
            if a.fields.spiffe_id.is_none() {
                bail!("--spiffe-id is required");
            }
            if a.fields.parent_id.is_none() && !a.fields.node {
                bail!("--parent-id is required (or --node for a node alias)");
            }
            if a.fields.selectors.is_empty() {
                bail!("at least one --selector is required, e.g. --selector unix:uid:1000");
            }
            let mut e = pb::Entry {
                id: a.entry_id.clone().unwrap_or_default(),
                ..Default::default()
            };
            apply_fields(&mut e, &a.fields)?;
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            let r = c.create_entries(vec![e]).await.map_err(admin_err)?;
            report(a.opts.output, r, "Created")
        }
        EntryCommand::Update(a) => {
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            let mut e = c.get_entry(a.entry_id.clone()).await.map_err(admin_err)?;
            apply_fields(&mut e, &a.fields)?;
            let r = c.update_entries(vec![e]).await.map_err(admin_err)?;
            report(a.opts.output, r, "Updated")
        }
        EntryCommand::Delete(a) => {
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            // One call, as given: more IDs than the server's batch limit
            // are refused whole rather than deleted in parts.
            let r = c
                .delete_entries_in_one_call(a.entry_id)
                .await
                .map_err(admin_err)?;
            report(a.opts.output, r, "Deleted")
        }
        EntryCommand::Show(a) => {
            let mut c = connect_admin(&a.opts.admin_socket).await?;
            if let Some(id) = a.entry_id {
                let e = c.get_entry(id).await.map_err(admin_err)?;
                return print_entries(a.opts.output, &[e]);
            }
            let all = c
                .list_entries(pb::ListEntriesRequest {
                    spiffe_id: a.spiffe_id.clone().unwrap_or_default(),
                    parent_id: a.parent_id.clone().unwrap_or_default(),
                    selectors: a.selectors.clone(),
                    selector_match: a.selector_match.clone(),
                    page_size: 1000,
                    page_token: String::new(),
                    id_prefix: String::new(),
                })
                .await
                .map_err(admin_err)?;
            print_entries(a.opts.output, &all)
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Create a single-use join token for a new agent.
    Generate {
        /// How long the token stays valid, e.g. 10m.
        #[arg(long, default_value = "10m")]
        ttl: String,
        #[command(flatten)]
        opts: AdminOpts,
    },
}

pub(crate) async fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Generate { ttl, opts } = cmd;
    let ttl = duration::parse(&ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    let mut c = connect_admin(&opts.admin_socket).await?;
    let r = c.create_join_token(ttl).await.map_err(admin_err)?;
    match opts.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"token": r.token, "agent_id": r.agent_id, "expires_at": r.expires_at})
            )?
        ),
        Output::Text => {
            println!("Token    : {}", r.token);
            println!("Agent ID : {}", r.agent_id);
            println!("Expires  : {}", fmt_time(r.expires_at));
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct AgentIdArgs {
    /// The agent's SPIFFE ID.
    #[arg(long)]
    spiffe_id: String,
    #[command(flatten)]
    opts: AdminOpts,
}

fn agent_json(a: &pb::Agent) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "selectors": a.selectors,
        "serial": a.serial,
        "expires_at": a.expires_at,
        "banned": a.banned,
        "can_reattest": a.can_reattest,
        "created_at": a.created_at,
        "updated_at": a.updated_at,
        "connected": a.connected,
    })
}

fn print_agent(a: &pb::Agent) {
    println!("SPIFFE ID        : {}", shown(&a.spiffe_id));
    println!("Attestation type : {}", shown(&a.attestation_type));
    println!("SVID expires     : {}", fmt_time(a.expires_at));
    println!("SVID serial      : {}", a.serial);
    println!("Banned           : {}", a.banned);
    println!("Connected        : {}", a.connected);
    for s in &a.selectors {
        println!("Selector         : {}", shown(s));
    }
    println!();
}

fn print_agents(out: Output, agents: &[pb::Agent]) -> anyhow::Result<()> {
    print_list(out, agents, ("agent", "agents"), agent_json, print_agent)
}

pub(crate) async fn agent_list(o: AdminOpts) -> anyhow::Result<()> {
    let mut c = connect_admin(&o.admin_socket).await?;
    let agents = c.list_agents().await.map_err(admin_err)?;
    print_agents(o.output, &agents)
}

pub(crate) async fn agent_show(a: AgentIdArgs) -> anyhow::Result<()> {
    let mut c = connect_admin(&a.opts.admin_socket).await?;
    let r = c.get_agent(a.spiffe_id).await.map_err(admin_err)?;
    print_agents(a.opts.output, &[r])
}

pub(crate) async fn agent_evict(a: AgentIdArgs) -> anyhow::Result<()> {
    let mut c = connect_admin(&a.opts.admin_socket).await?;
    let r = c.evict_agent(a.spiffe_id).await.map_err(admin_err)?;
    println!("Evicted agent {}", r.spiffe_id);
    Ok(())
}

pub(crate) async fn agent_ban(a: AgentIdArgs) -> anyhow::Result<()> {
    let mut c = connect_admin(&a.opts.admin_socket).await?;
    let r = c.ban_agent(a.spiffe_id).await.map_err(admin_err)?;
    println!("Banned agent {}", r.spiffe_id);
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct HealthcheckArgs {
    /// Check the server through this admin socket.
    #[arg(long, conflicts_with = "socket")]
    admin_socket: Option<PathBuf>,
    /// Check the agent through this Workload API socket (unix:///path or a path).
    #[arg(long)]
    socket: Option<String>,
}

pub(crate) async fn healthcheck(a: HealthcheckArgs) -> anyhow::Result<()> {
    let started = SystemTime::now();
    if let Some(path) = a.admin_socket {
        let mut c = connect_admin(&path).await?;
        c.bundle().await.map_err(admin_err)?;
        println!(
            "server is healthy ({} ms)",
            started.elapsed().map(|d| d.as_millis()).unwrap_or(0)
        );
        return Ok(());
    }
    let socket = match a.socket {
        Some(s) => s,
        None => std::env::var("SPIFFE_ENDPOINT_SOCKET")
            .unwrap_or_else(|_| crate::DEFAULT_AGENT_SOCKET.to_owned()),
    };
    crate::workload::agent_healthcheck(&socket).await?;
    println!(
        "agent is healthy ({} ms)",
        started.elapsed().map(|d| d.as_millis()).unwrap_or(0)
    );
    Ok(())
}
