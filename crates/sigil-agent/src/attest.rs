//! The `unix` workload attestor: selectors from the caller's process
//! credentials and, optionally, its executable, named as SPIRE names them so
//! registrations carry over unchanged.
//!
//! Everything here is read from `/proc/<pid>` after the connection was
//! accepted; [`UnixAttestor::attest`] ends with
//! [`PeerInfo::check_same_process`] so the selectors it returns are known to
//! describe the process that connected, not a later owner of its PID.
//!
//! `unix:path` and `unix:sha256` name the binary the caller runs *now*. A
//! caller may `exec` another binary after connecting; that binary then runs
//! with the caller's own uid (a setuid `exec` is refused by the uid check), so
//! the caller gains nothing it could not already take by tracing a process of
//! its own uid. As in SPIRE, do not rely on `path`/`sha256` to separate
//! workloads that share a uid.
//!
//! `unix:path` is the link `/proc/<pid>/exe`, resolved in the *caller's*
//! mount namespace: a caller in a mount namespace of its own (an unprivileged
//! user namespace suffices) can bind-mount any binary at any path, say its
//! own program at `/usr/sbin/sshd`. The path means something only when the
//! caller sees the agent's file system, so it is emitted only for callers in
//! the agent's mount namespace (same `/proc/<pid>/ns/mnt` device and inode).
//! `unix:sha256` is kept for the others: it hashes the file the process
//! really executes, opened through `/proc/<pid>/exe`, whatever path it has.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use nix::unistd::{Gid, Group, Uid, User};
use sigil_types::{Selector, Selectors};

use crate::peer::{self, PeerError, PeerInfo};

/// The selector type this attestor emits.
const SELECTOR_TYPE: &str = "unix";

/// How many executable digests to remember. A node runs few distinct
/// binaries; when the cache is full it is simply emptied, which costs some
/// re-hashing but never a wrong answer.
const HASH_CACHE_CAPACITY: usize = 256;

/// Settings of the `unix` workload attestor.
#[derive(Debug, Clone, Default)]
pub struct UnixAttestorConfig {
    /// Also emit `unix:path` and `unix:sha256` (reads `/proc/<pid>/exe` and
    /// hashes the binary; costs I/O, cached by file identity).
    pub discover_workload_path: bool,
    /// Skip `unix:sha256` for binaries larger than this many bytes; 0 means
    /// no limit (as in SPIRE).
    pub workload_size_limit: u64,
}

/// What identifies one version of a file for the digest cache. `ctime` is in
/// the key because an unprivileged user can restore `mtime` after rewriting a
/// file but cannot set `ctime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Hex SHA-256 digests of executables, by file identity.
#[derive(Debug, Default)]
struct HashCache {
    entries: Mutex<HashMap<FileKey, String>>,
}

impl HashCache {
    fn get(&self, key: &FileKey) -> Option<String> {
        // The map holds plain values; a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still usable.
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(key).cloned()
    }

    fn insert(&self, key: FileKey, digest: String) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= HASH_CACHE_CAPACITY {
            entries.clear();
        }
        entries.insert(key, digest);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// How long a user or group name that NSS gave is reused for the same
/// numeric id. A name is a function of the id, not of the process, so a
/// cached name never tells one caller's identity to another: the only
/// effect is that an account renamed or removed in the user database is
/// seen up to this much later (nscd, if it runs, already keeps names for
/// ten minutes).
const NAME_TTL: Duration = Duration::from_secs(10);

/// How many names to remember; when full the cache is emptied.
const NAME_CACHE_CAPACITY: usize = 1024;

/// A numeric id whose name NSS gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Id {
    User(u32),
    Group(u32),
}

/// User and group names by numeric id, each kept for [`NAME_TTL`].
#[derive(Debug, Default)]
struct NameCache {
    names: Mutex<HashMap<Id, (Instant, Option<String>)>>,
}

impl NameCache {
    /// The name of `id` looked up at most [`NAME_TTL`] before `now`
    /// (`Some(None)`: the id has no name), or `None` if there is none.
    fn get(&self, id: Id, now: Instant) -> Option<Option<String>> {
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let (at, name) = names.get(&id)?;
        (now.saturating_duration_since(*at) < NAME_TTL).then(|| name.clone())
    }

    fn insert(&self, id: Id, name: Option<String>, at: Instant) {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if names.len() >= NAME_CACHE_CAPACITY {
            names.clear();
        }
        names.insert(id, (at, name));
    }

    /// The name of `id`, from the cache or else through NSS (which may
    /// block: call on the blocking pool). A failed lookup gives no name and
    /// is not remembered.
    fn lookup(&self, id: Id) -> Option<String> {
        let now = Instant::now();
        if let Some(name) = self.get(id, now) {
            return name;
        }
        let found = match id {
            Id::User(uid) => user_name(uid),
            Id::Group(gid) => group_name(gid),
        };
        let name = found.ok()?;
        self.insert(id, name.clone(), now);
        name
    }
}

/// The `unix` workload attestor; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct UnixAttestor {
    config: UnixAttestorConfig,
    cache: Arc<HashCache>,
    names: Arc<NameCache>,
}

impl UnixAttestor {
    /// An attestor with the given settings and an empty digest cache.
    pub fn new(config: UnixAttestorConfig) -> Self {
        Self {
            config,
            cache: Arc::default(),
            names: Arc::default(),
        }
    }

    /// Selectors for the caller: `unix:uid`, `unix:gid`, `unix:user` and
    /// `unix:group` (when the id has a name), `unix:supplementary_gid` and
    /// `unix:supplementary_group` for each supplementary group, and with
    /// `discover_workload_path` also `unix:path` and `unix:sha256`.
    ///
    /// The uid and gid are the effective ones, as in SPIRE and `SO_PEERCRED`;
    /// if `/proc` disagrees with the ids recorded at connect the call fails
    /// with [`PeerError::CredentialsChanged`]. `/proc/<pid>/status` is read
    /// in place (procfs answers from memory); name lookups not cached and
    /// the executable's path and digest run on tokio's blocking pool.
    pub async fn attest(&self, peer: &PeerInfo) -> Result<Selectors, PeerError> {
        let selectors = self.read_unchecked(peer).await?;
        // Everything was read by PID; it described the caller only if the
        // caller still holds that PID now.
        peer.check_same_process()?;
        Ok(selectors)
    }

    /// [`UnixAttestor::attest`] without its last step: the selectors read
    /// from `/proc/<pid>`, which describe the caller only once
    /// [`PeerInfo::check_same_process`] has passed *after* this returns.
    /// For [`crate::caller::CallerAttestor::identify`], which runs that
    /// check once after every attestor.
    pub(crate) async fn read_unchecked(&self, peer: &PeerInfo) -> Result<Selectors, PeerError> {
        let status = checked_status(peer)?;
        if !self.config.discover_workload_path {
            // With every name cached, nothing here can block: no hop to
            // the blocking pool (a burst of callers of one uid takes one).
            let now = Instant::now();
            if let Some(selectors) = id_selectors(&status, |id| self.names.get(id, now)) {
                return Ok(selectors);
            }
        }
        let peer = peer.clone();
        let config = self.config.clone();
        let cache = Arc::clone(&self.cache);
        let names = Arc::clone(&self.names);
        tokio::task::spawn_blocking(move || {
            let mut out = id_selectors(&status, |id| Some(names.lookup(id))).unwrap_or_default();
            if config.discover_workload_path {
                exe_selectors(&peer, &config, &cache, &mut out)?;
            }
            Ok(out)
        })
        .await
        .map_err(|e| PeerError::Task(e.to_string()))?
    }
}

/// The caller's `/proc/<pid>/status`, refused if its effective ids are not
/// the ones recorded at connect.
fn checked_status(peer: &PeerInfo) -> Result<peer::ProcStatus, PeerError> {
    let status = peer::read_status(peer.pid)?;
    if status.uid != peer.uid || status.gid != peer.gid {
        return Err(PeerError::CredentialsChanged { pid: peer.pid });
    }
    Ok(status)
}

/// The id selectors of `status`, with the names `name` gives (`Some(None)`:
/// the id has no name); `None` as soon as `name` does not know one.
fn id_selectors(
    status: &peer::ProcStatus,
    mut name: impl FnMut(Id) -> Option<Option<String>>,
) -> Option<Selectors> {
    let mut out = Selectors::new();
    push(&mut out, &format!("uid:{}", status.uid));
    if let Some(n) = name(Id::User(status.uid))? {
        push(&mut out, &format!("user:{n}"));
    }
    push(&mut out, &format!("gid:{}", status.gid));
    if let Some(n) = name(Id::Group(status.gid))? {
        push(&mut out, &format!("group:{n}"));
    }
    for gid in &status.groups {
        push(&mut out, &format!("supplementary_gid:{gid}"));
        if let Some(n) = name(Id::Group(*gid))? {
            push(&mut out, &format!("supplementary_group:{n}"));
        }
    }
    Some(out)
}

/// Adds `unix:path` and `unix:sha256` (blocking: may hash the binary).
fn exe_selectors(
    peer: &PeerInfo,
    config: &UnixAttestorConfig,
    cache: &HashCache,
    out: &mut Selectors,
) -> Result<(), PeerError> {
    let pid = peer.pid;
    let exe = format!("/proc/{pid}/exe");
    let target = std::fs::read_link(&exe).map_err(|e| peer::proc_error(pid, &exe, e))?;
    // Checked after the link is read: a process that is in the agent's
    // mount namespace now has been in it since it executed the binary,
    // since only a process privileged over the host can enter it again
    // after leaving.
    if in_agent_mount_namespace(pid)? {
        match target.to_str() {
            Some(path) => push(out, &format!("path:{path}")),
            // A lossy conversion could make two paths look alike.
            None => {
                tracing::warn!(pid, path = ?target, "executable path is not UTF-8; no unix:path selector")
            }
        }
    } else {
        tracing::debug!(
            pid,
            "caller is in another mount namespace; no unix:path selector"
        );
    }
    if let Some(hex) = exe_sha256(pid, &exe, config.workload_size_limit, cache)? {
        push(out, &format!("sha256:{hex}"));
    }
    Ok(())
}

/// Whether the caller's mount namespace is the agent's, compared by the
/// device and inode of `/proc/<pid>/ns/mnt` (the kernel's identity of a
/// namespace). `stat` follows the magic link without needing access to the
/// namespace itself.
fn in_agent_mount_namespace(pid: i32) -> Result<bool, PeerError> {
    let theirs_path = format!("/proc/{pid}/ns/mnt");
    let theirs =
        std::fs::metadata(&theirs_path).map_err(|e| peer::proc_error(pid, &theirs_path, e))?;
    let ours = std::fs::metadata("/proc/self/ns/mnt").map_err(PeerError::Proc)?;
    Ok((theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()))
}

/// Adds `unix:<value>`. A value the selector rules reject (a control
/// character in a name, an over-long path) is left out with a warning: a
/// missing selector can only make fewer entries match, never more.
fn push(out: &mut Selectors, value: &str) {
    match Selector::new(SELECTOR_TYPE, value) {
        Ok(s) => out.insert(s),
        Err(e) => tracing::warn!(error = %e, "skipping invalid unix selector"),
    }
}

/// The name of `uid` (`Ok(None)`: it has none); `Err` when NSS failed.
fn user_name(uid: u32) -> Result<Option<String>, ()> {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(user) => Ok(user.map(|u| u.name)),
        Err(e) => {
            tracing::debug!(uid, error = %e, "user lookup failed");
            Err(())
        }
    }
}

/// The name of `gid` (`Ok(None)`: it has none); `Err` when NSS failed.
fn group_name(gid: u32) -> Result<Option<String>, ()> {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(group) => Ok(group.map(|g| g.name)),
        Err(e) => {
            tracing::debug!(gid, error = %e, "group lookup failed");
            Err(())
        }
    }
}

/// The hex SHA-256 of the caller's executable, or `None` when it is larger
/// than `limit` (0: no limit).
///
/// `/proc/<pid>/exe` is opened rather than the path it names: that is the
/// very file the process runs, even if the path was since replaced or lies
/// in another mount namespace. Identity and content come from the same open
/// file, so the cache key cannot describe a different file than was hashed.
fn exe_sha256(
    pid: i32,
    exe: &str,
    limit: u64,
    cache: &HashCache,
) -> Result<Option<String>, PeerError> {
    let proc_err = |e| peer::proc_error(pid, exe, e);
    let mut file = File::open(exe).map_err(proc_err)?;
    let meta = file.metadata().map_err(proc_err)?;
    if limit > 0 && meta.size() > limit {
        tracing::debug!(
            pid,
            size = meta.size(),
            limit,
            "executable over size limit; no unix:sha256 selector"
        );
        return Ok(None);
    }
    let key = FileKey::of(&meta);
    if let Some(hex) = cache.get(&key) {
        return Ok(Some(hex));
    }
    let hex = sha256_hex(&mut file).map_err(proc_err)?;
    cache.insert(key, hex.clone());
    Ok(Some(hex))
}

fn sha256_hex(reader: &mut impl Read) -> io::Result<String> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => ctx.update(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let digest = ctx.finish();
    let mut hex = String::with_capacity(64);
    for b in digest.as_ref() {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn own_peer() -> PeerInfo {
        PeerInfo::this_process()
    }

    fn has(sel: &Selectors, s: &str) -> bool {
        sel.contains(&s.parse().unwrap())
    }

    fn values_of<'a>(sel: &'a Selectors, prefix: &str) -> Vec<&'a str> {
        sel.iter()
            .filter(|s| s.kind() == "unix")
            .filter_map(|s| s.value().strip_prefix(prefix))
            .collect()
    }

    #[tokio::test]
    async fn own_process_ids_and_names() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let sel = attestor.attest(&own_peer()).await.unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        assert!(has(&sel, &format!("unix:uid:{uid}")), "{sel:?}");
        assert!(has(&sel, &format!("unix:gid:{gid}")), "{sel:?}");
        if uid == 0 {
            assert!(has(&sel, "unix:user:root"), "{sel:?}");
        }
        if gid == 0 {
            assert!(has(&sel, "unix:group:root"), "{sel:?}");
        }
        let groups = nix::unistd::getgroups().unwrap();
        for g in &groups {
            assert!(has(&sel, &format!("unix:supplementary_gid:{g}")), "{sel:?}");
        }
        assert_eq!(values_of(&sel, "supplementary_gid:").len(), groups.len());
        assert!(values_of(&sel, "path:").is_empty());
        assert!(values_of(&sel, "sha256:").is_empty());
    }

    #[tokio::test]
    async fn own_process_path_and_digest() {
        let attestor = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: true,
            workload_size_limit: 0,
        });
        let sel = attestor.attest(&own_peer()).await.unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(values_of(&sel, "path:"), vec![exe.to_str().unwrap()]);
        let want = digest::digest(&digest::SHA256, &std::fs::read(&exe).unwrap());
        let want: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(values_of(&sel, "sha256:"), vec![want.as_str()]);

        // The second call is answered from the cache, with the same result.
        assert_eq!(attestor.cache.len(), 1);
        let again = attestor.attest(&own_peer()).await.unwrap();
        assert_eq!(again, sel);
        assert_eq!(attestor.cache.len(), 1);
    }

    #[test]
    fn own_process_shares_the_agents_mount_namespace() {
        let pid = i32::try_from(std::process::id()).unwrap();
        assert!(in_agent_mount_namespace(pid).unwrap());
        let err = in_agent_mount_namespace(i32::MAX).unwrap_err();
        assert!(matches!(err, PeerError::ProcessGone { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn size_limit_skips_only_the_digest() {
        let attestor = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: true,
            workload_size_limit: 1,
        });
        let sel = attestor.attest(&own_peer()).await.unwrap();
        assert_eq!(values_of(&sel, "path:").len(), 1);
        assert!(values_of(&sel, "sha256:").is_empty());
        assert_eq!(attestor.cache.len(), 0);
    }

    #[tokio::test]
    async fn mismatched_credentials_are_refused() {
        let mut peer = own_peer();
        peer.uid = peer.uid.wrapping_add(1);
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let err = attestor.attest(&peer).await.unwrap_err();
        assert!(
            matches!(err, PeerError::CredentialsChanged { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn sha256_hex_matches_known_vector() {
        let mut input: &[u8] = b"abc";
        assert_eq!(
            sha256_hex(&mut input).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn full_cache_is_emptied_not_grown() {
        let cache = HashCache::default();
        for i in 0..=HASH_CACHE_CAPACITY as u64 {
            let key = FileKey {
                dev: 1,
                ino: i,
                size: 0,
                mtime: (0, 0),
                ctime: (0, 0),
            };
            cache.insert(key, String::new());
        }
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn names_are_kept_per_id_and_only_for_their_ttl() {
        let cache = NameCache::default();
        let t0 = Instant::now();
        cache.insert(Id::User(1000), Some("alice".into()), t0);
        cache.insert(Id::Group(1001), None, t0);
        assert_eq!(cache.get(Id::User(1000), t0), Some(Some("alice".into())));
        assert_eq!(cache.get(Id::Group(1001), t0), Some(None));
        // Another id, or the same number as a group, is not a hit.
        assert_eq!(cache.get(Id::User(1001), t0), None);
        assert_eq!(cache.get(Id::Group(1000), t0), None);
        // Kept for the TTL, and not after.
        let last = t0 + NAME_TTL - Duration::from_millis(1);
        assert_eq!(cache.get(Id::User(1000), last), Some(Some("alice".into())));
        assert_eq!(cache.get(Id::User(1000), t0 + NAME_TTL), None);
        // Full: emptied, not grown.
        let cache = NameCache::default();
        for i in 0..=NAME_CACHE_CAPACITY as u32 {
            cache.insert(Id::Group(i), None, t0);
        }
        assert_eq!(
            cache
                .names
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            1
        );
    }

    /// Once its names are cached, a caller is attested in place: with the
    /// blocking pool busy, the call completes on its first poll.
    #[test]
    fn cached_names_attest_without_the_blocking_pool() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let attestor = UnixAttestor::new(UnixAttestorConfig::default());
            let peer = own_peer();
            let first = attestor.attest(&peer).await.unwrap();
            // The only blocking thread waits until released.
            let (release, wait) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || wait.recv());
            let mut read = std::pin::pin!(attestor.read_unchecked(&peer));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let polled = read.as_mut().poll(&mut cx);
            release.send(()).unwrap();
            busy.await.unwrap().unwrap();
            match polled {
                std::task::Poll::Ready(again) => assert_eq!(again.unwrap(), first),
                std::task::Poll::Pending => panic!("the attestation waited for the blocking pool"),
            }
        });
    }

    /// Needs root to start a process as another user; CI runs as root.
    #[tokio::test]
    async fn child_running_as_nobody() {
        use std::os::unix::process::CommandExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping child_running_as_nobody: needs root to change uid");
            return;
        }
        let mut child = Command::new("sleep")
            .arg("60")
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // Until the exec completes /proc still shows the forked agent's ids.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while peer::read_status(pid).unwrap().uid != 65534 {
            assert!(std::time::Instant::now() < deadline, "child did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let fd = peer::pidfd_open(pid).unwrap();
        let peer = PeerInfo::capture(pid, 65534, 65534, Some(fd)).unwrap();
        let attestor = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: true,
            workload_size_limit: 0,
        });
        let sel = attestor.attest(&peer).await.unwrap();
        assert!(has(&sel, "unix:uid:65534"), "{sel:?}");
        assert!(has(&sel, "unix:gid:65534"), "{sel:?}");
        assert!(!has(&sel, "unix:uid:0"), "{sel:?}");

        // Names are cached by numeric id: with root's names cached (and
        // answered in place), the child still gets its own, never root's.
        let ids_only = UnixAttestor::new(UnixAttestorConfig::default());
        let own = ids_only.attest(&own_peer()).await.unwrap();
        assert!(has(&own, "unix:user:root"), "{own:?}");
        for _ in 0..2 {
            let child_sel = ids_only.attest(&peer).await.unwrap();
            assert!(has(&child_sel, "unix:uid:65534"), "{child_sel:?}");
            assert!(!has(&child_sel, "unix:user:root"), "{child_sel:?}");
            assert!(!has(&child_sel, "unix:group:root"), "{child_sel:?}");
            let want = user_name(65534).unwrap();
            assert_eq!(
                values_of(&child_sel, "user:"),
                want.iter().map(String::as_str).collect::<Vec<_>>()
            );
        }
        let path = values_of(&sel, "path:");
        assert_eq!(path.len(), 1);
        assert!(path[0].ends_with("/sleep"), "{path:?}");

        child.kill().unwrap();
        child.wait().unwrap();
        // Cached names or not, a caller that is gone gets nothing.
        for a in [&attestor, &ids_only] {
            let err = a.attest(&peer).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    PeerError::ProcessGone { .. } | PeerError::PidReused { .. }
                ),
                "{err:?}"
            );
        }
    }
}
