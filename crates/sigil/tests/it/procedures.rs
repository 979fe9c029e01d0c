//! The operator procedures of docs/operations.md, run as written against a
//! real server and real agents: the SQLite backup and restore (with the
//! `sqlite3` tool and `cp`), what a restore to an earlier point does to each
//! kind of agent, and the recovery of a join-token agent that was refused or
//! whose own SVID expired.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use crate::procs::{
    AgentBin, START, ServerBin, create_entry, list_entry_ids, wait_for_svid_of, wait_until,
};

/// The agent SVID lifetime of this test: agents renew at 40–60 % of it.
/// Long enough that an agent stopped just before the backup still holds a
/// valid SVID when the restored server starts, short enough that a running
/// agent renews within the test.
const AGENT_TTL: Duration = Duration::from_secs(60);

fn sh(script: &str) {
    let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sqlite3_available() -> bool {
    Command::new("sqlite3")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The SVIDs the Workload API at `uri` serves now, by SPIFFE ID.
async fn served(uri: &str) -> Option<Vec<String>> {
    let c = spiffe::WorkloadApiClient::connect_to(uri).await.ok()?;
    let svids = c.fetch_all_x509_svids().await.ok()?;
    Some(svids.iter().map(|s| s.spiffe_id().to_string()).collect())
}

async fn wait_for_log(agent: &AgentBin, what: &str, needle: &str) {
    wait_until(START, what, || async {
        agent.log().contains(needle).then_some(())
    })
    .await;
}

fn agent_in(dir: &Path, name: &str, server: &ServerBin) -> AgentBin {
    let d = dir.join(name);
    std::fs::create_dir(&d).unwrap();
    AgentBin::new(
        &d,
        &server.api.to_string(),
        sigil_testkit::free_addr().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_backup_restored_as_documented_behaves_as_documented() {
    if !sigil_testkit::runnable(
        "backup::a_sqlite_backup_restored_as_documented_behaves_as_documented",
        sqlite3_available(),
        "the sqlite3 command (Debian package sqlite3)",
    ) {
        return;
    }
    crate::init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let me = format!("unix:uid:{}", nix::unistd::getuid());
    let mut server = ServerBin::new(
        dir,
        &format!("agent_svid_ttl = \"{}s\"\n", AGENT_TTL.as_secs()),
    );
    server.start().await;

    // Agent A keeps running (and renews after the backup); agent C is
    // stopped right after it saw an entry created after the backup.
    let (token_a, id_a) = server.join_token().await;
    let (token_c, id_c) = server.join_token().await;
    let mut a = agent_in(dir, "a", &server);
    let mut c = agent_in(dir, "c", &server);
    a.start(Some(&token_a)).await;
    c.start(Some(&token_c)).await;
    let mut admin = server.admin().await;
    let old_a = wait_until(START, "agent A attested", || async {
        server.agent(&id_a).await.filter(|r| !r.serial.is_empty())
    })
    .await;
    create_entry(
        &mut admin,
        "spiffe://example.org/on-a",
        &id_a,
        std::slice::from_ref(&me),
        "",
    )
    .await
    .unwrap();
    let e1 = create_entry(
        &mut admin,
        "spiffe://example.org/e1",
        &id_c,
        std::slice::from_ref(&me),
        "",
    )
    .await
    .unwrap();
    wait_for_svid_of(&a.uri(), "spiffe://example.org/on-a", "A's entry at A").await;
    wait_for_svid_of(&c.uri(), "spiffe://example.org/e1", "e1 at C").await;

    // The online backup, as operations.md writes it.
    let backup = dir.join("backup");
    let data = dir.join("server");
    sh(&format!(
        "install -d -m 0700 {b}\n\
         sqlite3 {d}/sigil.db \".backup '{b}/sigil.db'\"\n\
         cp -a {d}/keys {d}/instance-id {b}/\n\
         test \"$(sqlite3 {b}/sigil.db 'PRAGMA integrity_check;')\" = ok",
        b = backup.display(),
        d = data.display()
    ));
    let mode = std::fs::metadata(backup.join("keys"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "cp -a keeps keys/ private: {mode:o}");

    // After the backup: an entry (which C receives, then C stops), and a
    // new agent B.
    let e2 = create_entry(
        &mut admin,
        "spiffe://example.org/e2",
        &id_c,
        std::slice::from_ref(&me),
        "",
    )
    .await
    .unwrap();
    wait_for_svid_of(&c.uri(), "spiffe://example.org/e2", "e2 at C").await;
    c.kill9();
    let (token_b, id_b) = server.join_token().await;
    let mut b = agent_in(dir, "b", &server);
    b.start(Some(&token_b)).await;
    wait_until(START, "agent B attested", || async {
        server.agent(&id_b).await.map(|_| ())
    })
    .await;
    // A renews its SVID (at 40-60 % of AGENT_TTL).
    wait_until(AGENT_TTL, "agent A renewed after the backup", || async {
        server
            .agent(&id_a)
            .await
            .filter(|r| !r.serial.is_empty() && r.serial != old_a.serial)
            .map(|_| ())
    })
    .await;

    // The restore, as operations.md writes it (the server stopped).
    assert!(server.stop(), "the server stops cleanly:\n{}", server.log());
    sh(&format!(
        "cd {d}\n\
         rm -f sigil.db sigil.db-wal sigil.db-shm\n\
         cp {b}/sigil.db sigil.db\n\
         cp -an {b}/keys/. keys/",
        b = backup.display(),
        d = data.display()
    ));
    server.start().await;
    let mut admin = server.admin().await;

    // "Entries created after the backup are gone."
    let ids = list_entry_ids(&mut admin).await;
    assert!(ids.contains(&e1), "e1 (before the backup) is back: {ids:?}");
    assert!(!ids.contains(&e2), "e2 (after the backup) is gone: {ids:?}");

    // An agent attested before the backup and not renewed since is accepted,
    // and drops at its next sync the entry created after the backup.
    c.start(None).await;
    wait_until(START, "C drops e2 and keeps e1", || async {
        let ids = served(&c.uri()).await?;
        (ids.iter().any(|i| i == "spiffe://example.org/e1")
            && !ids.iter().any(|i| i == "spiffe://example.org/e2"))
        .then_some(())
    })
    .await;

    // "Agents that renewed their SVID after the backup are refused."
    wait_for_log(
        &a,
        "A refused",
        "presented an SVID that is no longer current",
    )
    .await;
    // "Agents attested after the backup are unknown to the restored server."
    wait_for_log(
        &b,
        "B refused",
        "is not attested (it may have been evicted)",
    )
    .await;
    assert!(
        server.agent(&id_b).await.is_none(),
        "the restored server does not know B"
    );

    // The documented recovery of a join-token agent: a new token, the
    // agent's files deleted, a start with the token; a new agent ID whose
    // entries are the ones re-parented to it.
    a.kill9();
    let out =
        crate::cli::run_admin(&server.admin, &["token", "generate", "-o", "json"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (token, new_a) = (
        t["token"].as_str().unwrap().to_owned(),
        t["agent_id"].as_str().unwrap().to_owned(),
    );
    assert_ne!(new_a, id_a, "a join token yields a new agent ID");
    for f in [
        "identity.json",
        "agent.json",
        "agent.key",
        "cache.json",
        "cache.journal",
    ] {
        let _ = std::fs::remove_file(a.data_dir.join(f));
    }
    a.start(Some(&token)).await;
    wait_until(START, "A attested again and syncing", || async {
        crate::procs::agent_connected(a.health).await.filter(|c| *c)
    })
    .await;
    // Entries parented to the old ID are not for the new agent.
    let before = served(&a.uri()).await.unwrap_or_default();
    assert!(
        !before.iter().any(|i| i == "spiffe://example.org/on-a"),
        "the old agent ID's entry is not served to the new one: {before:?}"
    );
    let on_a = {
        let out = crate::cli::run_admin(
            &server.admin,
            &["entry", "show", "--parent-id", &id_a, "-o", "json"],
            None,
        )
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .and_then(|a| a.first())
            .and_then(|e| e["id"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no entry under {id_a}: {v}"))
    };
    let out = crate::cli::run_admin(
        &server.admin,
        &[
            "entry",
            "update",
            "--entry-id",
            &on_a,
            "--parent-id",
            &new_a,
        ],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_svid_of(
        &a.uri(),
        "spiffe://example.org/on-a",
        "A's entry at the new A",
    )
    .await;
}

/// docs/operations.md, "outage longer than `agent_svid_ttl`": a join-token
/// agent whose own SVID expired while the server was down keeps retrying
/// and does not recover by itself; restarted, it stops with the documented
/// error; a new join token brings it back under a new agent ID.
#[tokio::test(flavor = "multi_thread")]
async fn a_join_token_agent_does_not_outlive_its_own_svid_and_a_new_token_recovers_it() {
    crate::init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut server = ServerBin::new(
        dir,
        "agent_svid_ttl = \"6s\"\ndefault_x509_svid_ttl = \"4s\"\n",
    );
    server.start().await;
    let (token, id) = server.join_token().await;
    let mut agent = agent_in(dir, "a", &server);
    agent.start(Some(&token)).await;
    let rec = wait_until(START, "the agent attested", || async {
        server.agent(&id).await.filter(|r| r.connected)
    })
    .await;

    // Down past the agent SVID's expiry (the record says when; the agent
    // renews at about half of it, so take the latest record).
    let rec = server.agent(&id).await.unwrap_or(rec);
    server.kill9();
    let expiry = std::time::UNIX_EPOCH + Duration::from_secs(rec.expires_at as u64);
    while std::time::SystemTime::now() < expiry + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.start().await;
    let seen = agent
        .log()
        .matches("server unreachable; serving cached SVIDs")
        .count();

    // The server is back, the agent is not: it keeps retrying, refused.
    let watch = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < watch {
        assert_ne!(
            crate::procs::agent_connected(agent.health).await,
            Some(true),
            "an agent with an expired SVID reconnected:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until(START, "the agent logs its retries", || async {
        (agent
            .log()
            .matches("server unreachable; serving cached SVIDs")
            .count()
            > seen)
            .then_some(())
    })
    .await;

    // Restarted, it stops with the documented error.
    agent.kill9();
    let config = dir.join("a").join("agent.toml");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(crate::procs::bin())
            .args(["agent", "run", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent started: {err}");
    assert!(
        err.contains("the agent has no valid SVID in")
            && err.contains("start it once with a join token"),
        "{err}"
    );

    // The documented recovery: a new token, a new agent ID.
    let (token, new_id) = server.join_token().await;
    assert_ne!(new_id, id);
    agent.start(Some(&token)).await;
    wait_until(START, "the agent attested again", || async {
        server
            .agent(&new_id)
            .await
            .filter(|r| r.connected)
            .map(|_| ())
    })
    .await;
}

/// The PostgreSQL procedure of docs/operations.md ("Backup and restore",
/// PostgreSQL), run as written: `pg_dump --format=custom` and `cp -a` of the
/// keys while the server runs, more writes, then with the server stopped
/// `pg_restore --clean --if-exists --single-transaction` and `cp -an`; the
/// restored server starts, holds what the dump held and not what came after,
/// and an agent attested before the backup (not renewed since) is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_backup_restored_as_documented_behaves_as_documented() {
    let Some(pg) = sigil_testkit::postgres::PrivatePostgres::start_or_skip(
        "procedures::a_postgresql_backup_restored_as_documented_behaves_as_documented",
    )
    .unwrap() else {
        return;
    };
    let bin = sigil_testkit::postgres::PrivatePostgres::bin_dir().unwrap();
    crate::init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let me = format!("unix:uid:{}", nix::unistd::getuid());
    let mut server = ServerBin::new(
        dir,
        &format!(
            // Long enough that the agent does not renew during the test.
            "agent_svid_ttl = \"10m\"\n[server.store]\ndriver = \"postgres\"\nurl = \"{}\"\n",
            pg.url()
        ),
    );
    server.start().await;
    let (token, id) = server.join_token().await;
    let mut agent = agent_in(dir, "a", &server);
    agent.start(Some(&token)).await;
    let mut admin = server.admin().await;
    let e1 = create_entry(
        &mut admin,
        "spiffe://example.org/e1",
        &id,
        std::slice::from_ref(&me),
        "",
    )
    .await
    .unwrap();
    wait_for_svid_of(&agent.uri(), "spiffe://example.org/e1", "e1 at the agent").await;

    // The backup, as documented.
    let backup = dir.join("backup");
    std::fs::create_dir(&backup).unwrap();
    let data = dir.join("server");
    sh(&format!(
        "{pg}/pg_dump --format=custom --file={b}/sigil.dump '{url}'\n\
         mkdir {b}/host && cp -a {d}/keys {d}/instance-id {b}/host/",
        pg = bin.display(),
        b = backup.display(),
        d = data.display(),
        url = pg.url()
    ));
    let e2 = create_entry(
        &mut admin,
        "spiffe://example.org/e2",
        &id,
        std::slice::from_ref(&me),
        "",
    )
    .await
    .unwrap();
    wait_for_svid_of(&agent.uri(), "spiffe://example.org/e2", "e2 at the agent").await;

    // The restore, with the server stopped.
    assert!(server.stop(), "the server stops cleanly:\n{}", server.log());
    sh(&format!(
        "{pg}/pg_restore --clean --if-exists --single-transaction --dbname='{url}' {b}/sigil.dump\n\
         cp -an {b}/host/keys/. {d}/keys/",
        pg = bin.display(),
        b = backup.display(),
        d = data.display(),
        url = pg.url()
    ));
    server.start().await;
    let mut admin = server.admin().await;
    let ids = list_entry_ids(&mut admin).await;
    assert!(ids.contains(&e1), "e1 (before the backup) is back: {ids:?}");
    assert!(!ids.contains(&e2), "e2 (after the backup) is gone: {ids:?}");
    // The agent (attested before the dump, not renewed since) is accepted
    // and drops e2 at its next sync.
    wait_until(START, "the agent drops e2 and keeps e1", || async {
        let ids = served(&agent.uri()).await?;
        (ids.iter().any(|i| i == "spiffe://example.org/e1")
            && !ids.iter().any(|i| i == "spiffe://example.org/e2"))
        .then_some(())
    })
    .await;
    assert!(
        server.agent(&id).await.is_some_and(|a| !a.banned),
        "the agent is known to the restored server"
    );
}
