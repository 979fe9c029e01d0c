//! Workload API commands: `svid fetch`, `jwt fetch`, `jwt validate`, and the
//! agent healthcheck. They speak the standard SPIFFE Workload API, exactly
//! as any SPIFFE client does.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use sigil_client::{UnixConnector, WorkloadClient};
use sigil_proto::workload as pb;

use crate::output::Output;

/// How to reach the Workload API.
#[derive(Args, Debug, Clone)]
pub(crate) struct SocketOpts {
    /// The agent's Workload API socket, unix:///path (or a plain path).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = crate::DEFAULT_AGENT_SOCKET)]
    socket: String,
}

async fn connect(addr: &str) -> anyhow::Result<WorkloadClient> {
    let connector = UnixConnector::from_address(addr)?;
    WorkloadClient::connect_with(&connector)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the Workload API at {}; is the agent running? (set --socket or SPIFFE_ENDPOINT_SOCKET)",
                connector.path().display()
            )
        })
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

#[derive(Subcommand, Debug)]
pub(crate) enum SvidCommand {
    /// Fetch this process's X509-SVIDs and print them (or write them as PEM files).
    Fetch {
        /// Write svid.N.pem, svid.N.key (0600) and bundle.N.pem into this directory
        /// (created 0700 when missing; its parent must exist).
        #[arg(long)]
        write: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketOpts,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

fn write_file(path: &Path, data: &[u8], private: bool) -> anyhow::Result<()> {
    if private {
        sigil_svid::keys::write_secret_file(path, data)
    } else {
        std::fs::write(path, data)
    }
    .with_context(|| format!("writing {}", path.display()))
}

/// The `--write` directory: used as it is when it exists (its mode is the
/// user's), created 0700 when only it is missing; missing parents are an
/// error, since they usually mean a typo.
fn create_output_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("--write {}: cannot create the directory", dir.display()))
}

pub(crate) async fn svid(cmd: SvidCommand) -> anyhow::Result<()> {
    let SvidCommand::Fetch {
        write,
        socket,
        output,
    } = cmd;
    let mut client = connect(&socket.socket).await?;
    let mut stream = client.fetch_x509svid().await.map_err(status_err)?;
    let resp = stream
        .message()
        .await
        .map_err(status_err)?
        .context("the Workload API closed the stream without an answer")?;
    let mut json = Vec::new();
    for (i, s) in resp.svids.iter().enumerate() {
        let chain = sigil_svid::x509::split_der_certs(&s.x509_svid)?;
        let bundle = sigil_svid::x509::split_der_certs(&s.bundle)?;
        let info = chain
            .first()
            .map(|c| sigil_svid::x509::cert_info(c))
            .transpose()?
            .context("empty SVID chain")?;
        if let Some(dir) = &write {
            create_output_dir(dir)?;
            write_file(
                &dir.join(format!("svid.{i}.pem")),
                sigil_svid::pem::certs_to_pem(&chain).as_bytes(),
                false,
            )?;
            let key = sigil_svid::keys::PrivateKey::from_pkcs8_der(&s.x509_svid_key)?;
            write_file(
                &dir.join(format!("svid.{i}.key")),
                key.to_pem().as_bytes(),
                true,
            )?;
            write_file(
                &dir.join(format!("bundle.{i}.pem")),
                sigil_svid::pem::certs_to_pem(&bundle).as_bytes(),
                false,
            )?;
        }
        let not_after = humantime::format_rfc3339_seconds(info.not_after).to_string();
        match output {
            Output::Text => {
                println!("SPIFFE ID         : {}", s.spiffe_id);
                println!("SVID valid until  : {not_after}");
                println!("Intermediates     : {}", chain.len() - 1);
                println!("CA certificates   : {}", bundle.len());
                if !s.hint.is_empty() {
                    println!("Hint              : {}", s.hint);
                }
                if let Some(dir) = &write {
                    println!(
                        "Written to        : {}",
                        dir.join(format!("svid.{i}.pem")).display()
                    );
                }
                println!();
            }
            Output::Json => json.push(serde_json::json!({
                "spiffe_id": s.spiffe_id,
                "not_after": not_after,
                "hint": s.hint,
                "svid_pem": sigil_svid::pem::certs_to_pem(&chain),
                "bundle_pem": sigil_svid::pem::certs_to_pem(&bundle),
            })),
        }
    }
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub(crate) enum JwtCommand {
    /// Fetch JWT-SVIDs for an audience.
    Fetch {
        /// The audience (repeatable; all go into `aud`).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID (default: every identity of the caller).
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        socket: SocketOpts,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Validate a JWT-SVID through the agent's ValidateJWTSVID: against the
    /// agent's cached bundles, including those of trust domains your entries
    /// federate with, so it works while the server is down. Prints the
    /// token's SPIFFE ID and claims; exits non-zero if the token is not valid.
    Validate {
        /// The audience the token must carry (your service's name).
        #[arg(long)]
        audience: String,
        /// The token, with or without "Bearer " (default: read from standard input).
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        socket: SocketOpts,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

pub(crate) async fn jwt(cmd: JwtCommand) -> anyhow::Result<()> {
    match cmd {
        JwtCommand::Fetch {
            audience,
            spiffe_id,
            socket,
            output,
        } => {
            let mut client = connect(&socket.socket).await?;
            let r = client
                .fetch_jwtsvid(pb::JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?;
            match output {
                Output::Text => {
                    for s in &r.svids {
                        println!("SPIFFE ID : {}", s.spiffe_id);
                        println!("Token     : {}", s.svid);
                        println!();
                    }
                }
                Output::Json => {
                    let v: Vec<_> = r
                        .svids
                        .iter()
                        .map(|s| serde_json::json!({"spiffe_id": s.spiffe_id, "token": s.svid, "hint": s.hint}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
            Ok(())
        }
        JwtCommand::Validate {
            audience,
            token,
            socket,
            output,
        } => {
            let token = match token {
                Some(t) => t,
                None => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .context("reading the token from standard input")?;
                    s
                }
            };
            let token = bare_token(&token);
            if token.is_empty() {
                bail!("no token given: pass --token or pipe the JWT-SVID on standard input");
            }
            if audience.is_empty() {
                bail!("--audience must not be empty");
            }
            let mut client = connect(&socket.socket).await?;
            let r = client
                .validate_jwtsvid(pb::ValidateJwtsvidRequest {
                    audience,
                    svid: token.to_owned(),
                })
                .await
                .map_err(|s| {
                    if s.code() == tonic::Code::InvalidArgument {
                        anyhow::anyhow!(
                            "the JWT-SVID is not valid: {} ({:?})",
                            s.message(),
                            s.code()
                        )
                    } else {
                        status_err(s)
                    }
                })?;
            let claims = r.claims.unwrap_or_default();
            match output {
                Output::Text => {
                    println!("SPIFFE ID : {}", r.spiffe_id);
                    let mut keys: Vec<_> = claims.fields.keys().collect();
                    keys.sort();
                    for k in keys {
                        println!("Claim     : {k} = {}", fmt_value(&claims.fields[k]));
                    }
                }
                Output::Json => {
                    let claims: serde_json::Map<_, _> = claims
                        .fields
                        .iter()
                        .map(|(k, v)| (k.clone(), value_json(v)))
                        .collect();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &serde_json::json!({"spiffe_id": r.spiffe_id, "claims": claims})
                        )?
                    );
                }
            }
            Ok(())
        }
    }
}

/// The token without surrounding whitespace or an `Authorization` header's
/// `Bearer ` prefix.
fn bare_token(t: &str) -> &str {
    let t = t.trim();
    t.strip_prefix("Bearer ")
        .or_else(|| t.strip_prefix("bearer "))
        .unwrap_or(t)
        .trim()
}

/// A protobuf Value as JSON; whole numbers (exp, iat) as integers.
fn value_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => (*n as i64).into(),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_json).collect(),
        Some(Kind::StructValue(s)) => s
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
    }
}

fn fmt_value(v: &prost_types::Value) -> String {
    use prost_types::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::NumberValue(n)) => format!("{n}"),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::ListValue(l)) => format!(
            "[{}]",
            l.values
                .iter()
                .map(fmt_value)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(Kind::StructValue(_)) => "{…}".into(),
        Some(Kind::NullValue(_)) | None => "null".into(),
    }
}

/// The agent is healthy if its Workload API answers, with or without an
/// identity for the caller.
pub(crate) async fn agent_healthcheck(socket: &str) -> anyhow::Result<()> {
    let mut client = connect(socket).await?;
    match client.fetch_jwt_bundles().await {
        Ok(mut s) => {
            s.message().await.map_err(status_err)?;
            Ok(())
        }
        Err(s) if s.code() == tonic::Code::PermissionDenied => Ok(()),
        Err(s) => Err(status_err(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_taken_as_pasted() {
        assert_eq!(bare_token("  a.b.c\n"), "a.b.c");
        assert_eq!(bare_token("Bearer a.b.c"), "a.b.c");
        assert_eq!(bare_token("\n"), "");
    }

    #[test]
    fn claims_become_json_with_integer_times() {
        use prost_types::value::Kind;
        let n = prost_types::Value {
            kind: Some(Kind::NumberValue(1_750_000_000.0)),
        };
        assert_eq!(value_json(&n), serde_json::json!(1_750_000_000));
        let l = prost_types::Value {
            kind: Some(Kind::ListValue(prost_types::ListValue {
                values: vec![prost_types::Value {
                    kind: Some(Kind::StringValue("api".into())),
                }],
            })),
        };
        assert_eq!(value_json(&l), serde_json::json!(["api"]));
    }
}
