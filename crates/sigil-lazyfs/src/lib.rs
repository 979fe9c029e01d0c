//! A FUSE filesystem for tests that models a disk with a volatile cache, so
//! that a test can cut the power under a real process and see what it had
//! really made durable.
//!
//! Killing a process (even with SIGKILL) proves little about durability: the
//! kernel's page cache outlives the process, so a write that was never
//! fsynced is still read back. [`LazyFs`] keeps everything in memory and
//! tracks, for every inode, the content a reader sees and the content that
//! fsync made durable (the rule is in [`model`]). [`LazyFs::power_cut`]
//! freezes the disk at that instant (every later request fails with `EIO`);
//! [`LazyFs::restart`] then unmounts and mounts, at the same path, only what
//! was durable, with the kernel's caches gone as after a reboot.
//!
//! Mounting needs root and `/dev/fuse`; [`LazyFs::available`] says whether
//! both are there. The mount is made with mount(2) directly, so neither
//! libfuse nor `fusermount` is needed.

pub mod model;

mod fuse;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, Session, SessionACL};
use nix::mount::{MntFlags, MsFlags};

pub use model::{Syncs, Volatile};

use crate::fuse::{LazyFuse, Shared, SharedDisk, lock};
use crate::model::Disk;

/// Why a lazy filesystem could not be mounted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/fuse` could not be opened: no FUSE in this kernel, or no access.
    #[error("opening /dev/fuse: {0}")]
    Device(io::Error),
    /// mount(2) refused (not root, or the mount point is not a directory).
    #[error("mounting a FUSE filesystem on {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// What mount(2) said.
        source: nix::Error,
    },
    /// The kernel's FUSE handshake failed, or its thread could not start.
    #[error("starting the FUSE session on {path}: {source}")]
    Session {
        /// The mount point.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// A mounted lazy filesystem; unmounted when dropped.
pub struct LazyFs {
    mountpoint: PathBuf,
    shared: SharedDisk,
    session: Option<BackgroundSession>,
}

impl std::fmt::Debug for LazyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFs")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl LazyFs {
    /// Whether this process can mount one (root, and `/dev/fuse` opens).
    pub fn available() -> bool {
        nix::unistd::geteuid().is_root()
            && OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .is_ok()
    }

    /// Mounts an empty lazy filesystem on the directory `mountpoint`; its
    /// root has mode 0755 and belongs to this process's user.
    pub fn mount(mountpoint: &Path) -> Result<Self, Error> {
        let disk = Disk::new(
            0o755,
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let (shared, session) = mount_disk(mountpoint, disk)?;
        Ok(Self {
            mountpoint: mountpoint.to_owned(),
            shared,
            session: Some(session),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The power goes off now: what is durable at this instant is what
    /// [`LazyFs::restart`] brings back, and every request from now on fails
    /// with `EIO`. Returns what the cut lost (a second call loses nothing more).
    pub fn power_cut(&self) -> Volatile {
        let mut s = lock(&self.shared);
        if s.cut.is_some() {
            return Volatile::default();
        }
        let lost = s.disk.volatile();
        s.cut = Some(s.disk.after_power_cut());
        lost
    }

    /// After a [`LazyFs::power_cut`] (made now if there was none) and once
    /// the processes that used the filesystem are gone: unmounts it and
    /// mounts what was durable at the cut on the same path.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.power_cut();
        let disk = lock(&self.shared).cut.take();
        self.unmount();
        let disk = disk.unwrap_or_else(|| Disk::new(0o755, 0, 0));
        let (shared, session) = mount_disk(&self.mountpoint, disk)?;
        self.shared = shared;
        self.session = Some(session);
        Ok(())
    }

    /// What a power cut now would lose.
    pub fn volatile(&self) -> Volatile {
        lock(&self.shared).disk.volatile()
    }

    /// The fsyncs seen since this mount (or the last restart).
    pub fn syncs(&self) -> Syncs {
        lock(&self.shared).disk.syncs()
    }

    fn unmount(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // Lazy: the mount point is free at once; the kernel ends the FUSE
        // connection (and so our thread) when the last open file is closed.
        let _ = nix::mount::umount2(&self.mountpoint, MntFlags::MNT_DETACH);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if session.guard.is_finished() {
            let _ = session.join();
        }
        // Otherwise a process still holds a file there; the thread (which
        // answers it with EIO) ends when that process lets go.
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn mount_disk(mountpoint: &Path, disk: Disk) -> Result<(SharedDisk, BackgroundSession), Error> {
    let dev: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(Error::Device)?
        .into();
    let options = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
        dev.as_raw_fd(),
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    nix::mount::mount(
        Some("sigil-lazyfs"),
        mountpoint,
        Some("fuse.sigil-lazyfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|source| Error::Mount {
        path: mountpoint.to_owned(),
        source,
    })?;
    let shared = Arc::new(Mutex::new(Shared { disk, cut: None }));
    let fs = LazyFuse {
        shared: Arc::clone(&shared),
    };
    let session = Session::from_fd(fs, dev, SessionACL::Owner, Config::default())
        .and_then(Session::spawn)
        .map_err(|source| {
            let _ = nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH);
            Error::Session {
                path: mountpoint.to_owned(),
                source,
            }
        })?;
    Ok((shared, session))
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::io::Write;

    use super::*;

    fn mounted(test: &str) -> Option<(tempfile::TempDir, LazyFs)> {
        if !sigil_testkit::runnable(test, LazyFs::available(), "needs root and /dev/fuse") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = LazyFs::mount(dir.path()).unwrap();
        Some((dir, fs))
    }

    fn write_file(path: &Path, data: &[u8], sync: bool) {
        let mut f = File::create(path).unwrap();
        f.write_all(data).unwrap();
        if sync {
            f.sync_all().unwrap();
        }
    }

    fn sync_dir(path: &Path) {
        File::open(path).unwrap().sync_all().unwrap();
    }

    #[test]
    fn through_the_kernel_only_fsynced_writes_and_synced_names_survive() {
        let Some((_dir, mut fs)) = mounted("lazyfs_power_cut") else {
            return;
        };
        let root = fs.path().to_owned();
        write_file(&root.join("synced"), b"durable", true);
        write_file(&root.join("unsynced"), b"volatile", false);
        fs::create_dir(root.join("keys")).unwrap();
        write_file(&root.join("keys/k"), b"k1", true);
        sync_dir(&root.join("keys"));
        sync_dir(&root);
        // After the directories were synced: a rename not followed by a
        // directory fsync, and an overwrite without fsync.
        write_file(&root.join("keys/.k.tmp"), b"k2", true);
        fs::rename(root.join("keys/.k.tmp"), root.join("keys/k")).unwrap();
        write_file(&root.join("synced"), b"overwritten", false);
        fs::create_dir(root.join("late")).unwrap();
        assert_eq!(fs::read(root.join("keys/k")).unwrap(), b"k2");
        assert!(
            fs.syncs().files >= 3 && fs.syncs().dirs >= 2,
            "{:?}",
            fs.syncs()
        );

        let lost = fs.power_cut();
        assert!(lost.files >= 2 && lost.dirs >= 2, "{lost:?}");
        // Without power, nothing reads or writes.
        assert!(fs::read(root.join("keys/k")).is_err());
        fs.restart().unwrap();

        assert_eq!(fs::read(root.join("keys/k")).unwrap(), b"k1");
        assert!(!root.join("keys/.k.tmp").exists());
        assert!(!root.join("late").exists());
        // The name was synced, the data never: it comes back empty.
        assert_eq!(fs::read(root.join("unsynced")).unwrap(), b"");
        // The file's durable content is as of its fsync, with its length.
        assert_eq!(fs::read(root.join("synced")).unwrap(), b"durable");
    }

    #[test]
    fn a_file_created_and_fsynced_without_a_directory_fsync_is_gone() {
        let Some((_dir, mut fs)) = mounted("lazyfs_new_file") else {
            return;
        };
        let root = fs.path().to_owned();
        write_file(&root.join("db"), b"data", true);
        fs.restart().unwrap();
        assert!(!root.join("db").exists());
        // Restarts can repeat; what is synced after one survives the next.
        write_file(&root.join("db"), b"data", true);
        sync_dir(&root);
        fs.restart().unwrap();
        assert_eq!(fs::read(root.join("db")).unwrap(), b"data");
        fs.restart().unwrap();
        assert_eq!(fs::read(root.join("db")).unwrap(), b"data");
    }

    #[test]
    fn modes_owners_truncation_and_appends_behave_as_on_a_disk() {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let Some((_dir, mut fs)) = mounted("lazyfs_attributes") else {
            return;
        };
        let root = fs.path().to_owned();
        let p = root.join("f");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        f.write_all(b"0123456789").unwrap();
        f.sync_all().unwrap();
        sync_dir(&root);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut a = OpenOptions::new().append(true).open(&p).unwrap();
        a.write_all(b"ab").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"0123456789ab");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"");
        assert!(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .is_err()
        );
        drop((f, a));
        fs.restart().unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"0123456789");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
