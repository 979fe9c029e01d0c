//! The mount work of NodePublishVolume and NodeUnpublishVolume: blocking
//! system calls (through `nix`, so no unsafe code here), run on a blocking
//! thread by the service.
//!
//! The target is checked, then opened with `O_PATH | O_NOFOLLOW`, and the
//! mount is made onto `/proc/self/fd/<fd>`: the directory that was checked,
//! even if a path component were swapped for a symbolic link in between.
//! A mount is the driver's when the directory seen at the target is the
//! socket directory itself (same device and inode) and
//! `/proc/self/mountinfo` lists a mount at the target.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::error::RequestError;

/// How many mounts stacked at one target NodeUnpublishVolume removes at
/// most (a retried publish on an old kernel could stack two).
const MAX_STACKED: usize = 8;

/// What NodePublishVolume did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Published {
    /// The socket directory is now mounted read-only at the target.
    Mounted,
    /// It already was: nothing changed.
    AlreadyMounted,
}

/// What NodeUnpublishVolume did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unpublished {
    /// The mount was removed (and the directory, if it was there).
    Unmounted,
    /// The target was not mounted; its directory was removed if it existed.
    NotMounted,
}

fn io_err(op: &'static str, path: &Path, e: Errno) -> RequestError {
    RequestError::Io {
        op,
        path: path.display().to_string(),
        source: io::Error::from(e),
    }
}

fn refuse(path: &Path, reason: &'static str) -> RequestError {
    RequestError::TargetPath {
        path: path.display().to_string(),
        reason,
    }
}

/// Device and inode: what makes two directories the same one.
fn identity(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

/// Opens a directory for reference only, refusing a symbolic link at the
/// last component.
fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The path through which a system call reaches exactly `fd`.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The socket directory, opened, and its identity.
fn open_source(source: &Path) -> Result<(OwnedFd, (u64, u64)), RequestError> {
    let fd = open_dir(source).map_err(|e| RequestError::SourceUnavailable(e.into()))?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| RequestError::SourceUnavailable(e.into()))?;
    Ok((fd, identity(&st)))
}

/// Whether the target exists; refuses a symbolic link or something other
/// than a directory there.
fn existing_dir(target: &Path) -> Result<bool, RequestError> {
    match nix::sys::stat::lstat(target) {
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(io_err("lstat", target, e)),
        Ok(st) => {
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFLNK {
                Err(refuse(target, "is a symbolic link"))
            } else if kind != SFlag::S_IFDIR {
                Err(refuse(target, "exists and is not a directory"))
            } else {
                Ok(true)
            }
        }
    }
}

/// Opens the target directory and checks that the descriptor is the path
/// that was checked.
fn open_target(target: &Path) -> Result<OwnedFd, RequestError> {
    let fd = open_dir(target).map_err(|e| match e {
        Errno::ELOOP => refuse(target, "is a symbolic link"),
        Errno::ENOTDIR => refuse(target, "exists and is not a directory"),
        e => io_err("open", target, e),
    })?;
    let seen = nix::fcntl::readlink(&fd_path(&fd)).map_err(|e| io_err("readlink", target, e))?;
    if Path::new(&seen) != target {
        return Err(refuse(target, "changed while it was being checked"));
    }
    Ok(fd)
}

/// One line of `/proc/self/mountinfo`, the fields the driver reads.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// Where it is mounted (unescaped).
    pub(crate) mount_point: PathBuf,
    /// Whether the mount (not the filesystem) is read-only.
    pub(crate) read_only: bool,
}

/// Undoes the octal escapes (`\040` for a space, ...) of mountinfo.
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Parses mountinfo text (see proc(5)); lines it cannot read are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let options = fields.next()?;
            Some(MountEntry {
                mount_point: unescape(mount_point),
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// The mounts at `target`, oldest first (the last one is what the path
/// shows).
fn mounts_at(target: &Path) -> Result<Vec<MountEntry>, RequestError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| RequestError::Io {
        op: "reading /proc/self/mountinfo for",
        path: target.display().to_string(),
        source: e,
    })?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point == target)
        .collect())
}

/// Makes the mount at `target` (opened as `fd`) read-only, with no
/// set-user-ID, device or executable files.
fn remount_read_only(fd: &OwnedFd, target: &Path) -> Result<(), RequestError> {
    nix::mount::mount(
        None::<&str>,
        &fd_path(fd),
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| io_err("remounting read-only", target, e))
}

/// Bind-mounts `source` read-only at `target` (a checked path), creating
/// the directory; idempotent when it is already there.
pub(crate) fn publish(source: &Path, target: &Path) -> Result<Published, RequestError> {
    let (src_fd, src_id) = open_source(source)?;
    if !existing_dir(target)? {
        match nix::unistd::mkdir(target, Mode::from_bits_truncate(0o750)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io_err("mkdir", target, e)),
        }
    }
    let target_fd = open_target(target)?;
    let mounts = mounts_at(target)?;
    if let Some(top) = mounts.last() {
        let seen = nix::sys::stat::fstat(&target_fd).map_err(|e| io_err("fstat", target, e))?;
        if identity(&seen) != src_id {
            return Err(RequestError::AlreadyPublished(target.display().to_string()));
        }
        if !top.read_only {
            // A publish interrupted between the bind and the remount.
            remount_read_only(&target_fd, target)?;
        }
        return Ok(Published::AlreadyMounted);
    }
    nix::mount::mount(
        Some(&fd_path(&src_fd)),
        &fd_path(&target_fd),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io_err("bind-mounting the socket directory at", target, e))?;
    // Opened again, the path now leads into the new mount.
    let result = open_target(target).and_then(|mounted| {
        let seen = nix::sys::stat::fstat(&mounted).map_err(|e| io_err("fstat", target, e))?;
        if identity(&seen) != src_id {
            return Err(refuse(target, "changed while it was being mounted"));
        }
        remount_read_only(&mounted, target)
    });
    if let Err(e) = result {
        // Never leave a writable bind behind.
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
        return Err(e);
    }
    Ok(Published::Mounted)
}

/// Unmounts the socket directory from `target` (a checked path) and
/// removes the directory; idempotent when it is gone. Refuses to unmount
/// anything else.
pub(crate) fn unpublish(source: &Path, target: &Path) -> Result<Unpublished, RequestError> {
    if !existing_dir(target)? {
        return Ok(Unpublished::NotMounted);
    }
    let mut unmounted = false;
    for _ in 0..MAX_STACKED {
        if mounts_at(target)?.is_empty() {
            break;
        }
        let (_src_fd, src_id) = open_source(source)?;
        let fd = open_target(target)?;
        let seen = nix::sys::stat::fstat(&fd).map_err(|e| io_err("fstat", target, e))?;
        drop(fd);
        if identity(&seen) != src_id {
            return Err(RequestError::ForeignMount(target.display().to_string()));
        }
        nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW)
            .map_err(|e| io_err("unmounting", target, e))?;
        unmounted = true;
    }
    if !mounts_at(target)?.is_empty() {
        return Err(io_err("unmounting", target, Errno::EBUSY));
    }
    // rmdir(2) only: never anything the directory still holds.
    match std::fs::remove_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
            return Err(RequestError::NotEmpty(target.display().to_string()));
        }
        Err(e) => {
            return Err(RequestError::Io {
                op: "rmdir",
                path: target.display().to_string(),
                source: e,
            });
        }
    }
    Ok(if unmounted {
        Unpublished::Unmounted
    } else {
        Unpublished::NotMounted
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read_with_their_escapes() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
95 22 0:45 /run/sigil/agent /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount ro,nosuid,nodev,noexec,relatime shared:2 - tmpfs tmpfs rw
96 22 0:46 / /mnt/with\\040space rw master:3 - tmpfs tmpfs rw
bad line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert!(!m[0].read_only);
        assert_eq!(
            m[1].mount_point,
            Path::new("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount")
        );
        assert!(m[1].read_only);
        assert_eq!(m[2].mount_point, Path::new("/mnt/with space"));
    }

    #[test]
    fn unescape_leaves_what_is_not_an_escape() {
        assert_eq!(unescape("a\\b"), Path::new("a\\b"));
        assert_eq!(unescape("a\\04"), Path::new("a\\04"));
        assert_eq!(unescape("a\\134b"), Path::new("a\\b"));
        assert_eq!(unescape("\\777"), Path::new("\\777"));
    }
}
