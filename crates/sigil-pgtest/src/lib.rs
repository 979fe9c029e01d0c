//! A private PostgreSQL server for tests that stop, restart or break the
//! database: its own cluster (`initdb`) in a temporary directory, listening
//! on 127.0.0.1 on a free port and on a Unix socket in that directory,
//! stopped and deleted when dropped. It runs the installed binaries
//! (`SIGIL_TEST_PG_BIN`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/<version>/bin`); as root it runs them as the
//! `postgres` user, since PostgreSQL refuses to run as root.
//!
//! Nothing is shared with another test or with a PostgreSQL already running
//! on the machine, so a test may do anything to it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};

/// How long `pg_ctl` may wait for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "30";

/// A PostgreSQL server of one test. Dropping it stops the server
/// (immediately, as a crash would) and deletes its files.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// The user the binaries run as (`postgres` when this process is root).
    run_as: Option<String>,
}

impl PrivatePostgres {
    /// The directory holding `initdb`, `pg_ctl` and `psql`, if any.
    pub fn bin_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("SIGIL_TEST_PG_BIN") {
            return Some(PathBuf::from(d));
        }
        let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_tools(&d) {
                return Some(d);
            }
        }
        // Debian and Ubuntu keep the server binaries off PATH.
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| {
                let e = e.ok()?;
                let v = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                has_tools(&bin).then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, d)| d)
    }

    /// Like [`PrivatePostgres::start`], but `Ok(None)` (after printing why)
    /// when no PostgreSQL binaries are installed and `CI` is not set; in CI
    /// missing binaries are an error, so the test cannot pass by skipping.
    pub fn start_or_skip(test: &str) -> anyhow::Result<Option<Self>> {
        if Self::bin_dir().is_none() {
            let in_ci =
                std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
            if in_ci {
                bail!("no PostgreSQL server binaries found (set SIGIL_TEST_PG_BIN)");
            }
            println!(
                "SKIP {test}: no PostgreSQL server binaries found (install postgresql or set SIGIL_TEST_PG_BIN)"
            );
            return Ok(None);
        }
        Self::start().map(Some)
    }

    /// Creates a cluster and starts it; waits until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let bin = Self::bin_dir().context("no PostgreSQL server binaries found")?;
        let dir = tempfile::Builder::new().prefix("sigil-pg-").tempdir()?;
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")?
                .context("running as root, and there is no `postgres` user to run PostgreSQL as")?;
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
            Some(user.name)
        } else {
            None
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let pg = Self {
            dir,
            bin,
            port,
            run_as,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        pg.start_again()?;
        Ok(pg)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log (`postgres.log` in the cluster's directory).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// `pg_ctl restart -m fast`: disconnects every client, stops, starts
    /// again on the same port and data; returns once it accepts connections.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["restart", "-m", "fast", "-o", &self.server_options()])
    }

    /// `pg_ctl stop -m fast`: the database is down until
    /// [`PrivatePostgres::start_again`].
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-m", "fast"])
    }

    /// Starts the stopped server again on the same port and data.
    pub fn start_again(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["start", "-o", &self.server_options()])
    }

    /// Runs SQL with `psql` over TCP; returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let out = self.run(
            "psql",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-d".as_ref(),
                "postgres".as_ref(),
                "-X".as_ref(),
                "-A".as_ref(),
                "-t".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Options of the server process: loopback only, the Unix socket in the
    /// private directory, no fsync (nothing here tests power loss).
    fn server_options(&self) -> String {
        format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.log_path();
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        all.extend([
            "-D".as_ref(),
            data.as_os_str(),
            "-l".as_ref(),
            log.as_os_str(),
            "-w".as_ref(),
            "-t".as_ref(),
            PG_CTL_TIMEOUT_SECS.as_ref(),
        ]);
        self.run("pg_ctl", &all).map(|_| ()).map_err(|e| {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            e.context(format!("server log:\n{}", tail.join("\n")))
        })
    }

    /// Runs one of the PostgreSQL binaries (as `run_as`, if set).
    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<Output> {
        let program = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} {:?} failed ({}): {}{}",
                args,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.data_dir().join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn a_private_postgres_starts_restarts_keeps_data_and_goes_away() {
        let Some(pg) = PrivatePostgres::start_or_skip("private postgres").unwrap() else {
            return;
        };
        assert!(pg.url().ends_with(&format!(":{}/postgres", pg.port())));
        pg.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
            .unwrap();
        assert_eq!(pg.psql("SELECT v FROM t").unwrap(), "42");

        pg.restart().unwrap();
        assert_eq!(pg.psql("SELECT v FROM t").unwrap(), "42", "data survives");

        pg.stop().unwrap();
        let err = pg.psql("SELECT 1").unwrap_err();
        assert!(err.to_string().contains("psql"), "{err:#}");
        pg.start_again().unwrap();
        assert_eq!(pg.psql("SELECT v FROM t").unwrap(), "42");

        let port = pg.port();
        let dir = pg.dir.path().to_owned();
        drop(pg);
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the server is stopped when dropped"
        );
        assert!(!dir.exists(), "its files are deleted");
    }
}
