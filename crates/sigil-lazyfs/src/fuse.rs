//! The FUSE adapter: kernel requests onto the [`Disk`] model.
//!
//! Files are opened without `direct_io`, so shared writable mmap (SQLite's
//! `-shm` file) works; the kernel writes dirty mmap pages back to us before
//! it sends an fsync, so a synced file's mapped writes are in its durable
//! content. Write-back caching is not negotiated: every `write(2)` reaches
//! the model before it returns. Locks are left to the kernel (no
//! `FUSE_POSIX_LOCKS`), which is right for processes on one machine.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::model::{Attr, Disk, Res};

/// How long the kernel may cache attributes and names. Only the kernel
/// changes this filesystem, so its caches stay right; a power cut mounts a
/// new filesystem, which starts with empty caches.
const TTL: Duration = Duration::from_secs(1);

/// The disk as the FUSE thread and the test share it.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) disk: Disk,
    /// Set by a power cut: the disk that comes back. From then on every
    /// request fails with `EIO`, as on a disk without power.
    pub(crate) cut: Option<Disk>,
}

pub(crate) type SharedDisk = Arc<Mutex<Shared>>;

pub(crate) fn lock(s: &SharedDisk) -> MutexGuard<'_, Shared> {
    // A panic elsewhere must not make the disk unreadable to the test.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct LazyFuse {
    pub(crate) shared: SharedDisk,
}

fn to_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: if a.dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn perm_of(mode: u32, umask: u32) -> u16 {
    // Only the permission bits; masked to 0o7777 so the cast keeps them all.
    ((mode & !umask) & 0o7777) as u16
}

impl LazyFuse {
    /// Runs `f` on the disk unless the power is cut.
    fn with<T>(&self, f: impl FnOnce(&mut Disk) -> Res<T>) -> Res<T> {
        let mut s = lock(&self.shared);
        if s.cut.is_some() {
            return Err(libc::EIO);
        }
        f(&mut s.disk)
    }

    fn entry(&self, reply: ReplyEntry, r: Res<Attr>) {
        match r {
            Ok(a) => reply.entry(&TTL, &to_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn empty(reply: ReplyEmpty, r: Res<()>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        dir: bool,
        perm: u16,
    ) -> Res<Attr> {
        self.with(|d| {
            let ino = d.create(parent.0, name, dir, perm, req.uid(), req.gid())?;
            d.attr(ino)
        })
    }
}

impl Filesystem for LazyFuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.with(|d| d.attr(d.lookup(parent.0, name)?));
        self.entry(reply, r);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|d| d.attr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &to_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.with(|d| {
            if let Some(s) = size {
                d.set_size(ino.0, s)?;
            }
            d.set_attrs(ino.0, mode.map(|m| perm_of(m, 0)), uid, gid)?;
            d.attr(ino.0)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &to_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Regular files only: sockets and devices belong elsewhere.
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        let r = self.make(req, parent, name, false, perm_of(mode, umask));
        self.entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make(req, parent, name, true, perm_of(mode, umask));
        self.entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.with(|d| d.remove(parent.0, name, false)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.with(|d| d.remove(parent.0, name, true)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        Self::empty(
            reply,
            self.with(|d| d.rename(parent.0, name, newparent.0, newname, noreplace)),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.with(|d| {
            d.link(ino.0, newparent.0, newname)?;
            d.attr(ino.0)
        });
        self.entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|d| d.attr(ino.0)) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let s = lock(&self.shared);
        if s.cut.is_some() {
            reply.error(Errno::EIO);
            return;
        }
        match s.disk.read(ino.0, offset, size) {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|d| d.write(ino.0, offset, data)) {
            // A FUSE write is at most max_write (well under u32::MAX) bytes.
            Ok(n) => reply.written(u32::try_from(n).unwrap_or(u32::MAX)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a sync: nothing becomes durable here.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.with(|d| d.fsync(ino.0)));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.with(|d| d.entries(ino.0)) {
            Ok(e) => e,
            Err(e) => {
                reply.error(errno(e));
                return;
            }
        };
        let dots = [
            (OsStr::new(".").to_owned(), ino.0, true),
            // The parent is not tracked; ".." is resolved by the kernel's
            // dentry cache, so what readdir lists for it does not matter.
            (OsStr::new("..").to_owned(), ino.0, true),
        ];
        let all = dots.into_iter().chain(entries);
        for (i, (name, child, dir)) in all.enumerate().skip(offset as usize) {
            let kind = if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.with(|d| d.fsync(ino.0)));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BLOCKS: u64 = crate::model::MAX_FILE / 4096 * 4;
        reply.statfs(BLOCKS, BLOCKS, BLOCKS, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.with(|d| {
            let ino = match d.lookup(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(libc::EEXIST),
                Ok(ino) => {
                    if flags & libc::O_TRUNC != 0 {
                        d.set_size(ino, 0)?;
                    }
                    ino
                }
                Err(_) => d.create(
                    parent.0,
                    name,
                    false,
                    perm_of(mode, umask),
                    req.uid(),
                    req.gid(),
                )?,
            };
            d.attr(ino)
        });
        match r {
            Ok(a) => reply.created(
                &TTL,
                &to_attr(&a),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        }
        let r = self.with(|d| {
            let end = offset.checked_add(length).ok_or(libc::EFBIG)?;
            if d.attr(ino.0)?.size < end {
                d.set_size(ino.0, end)?;
            }
            Ok(())
        });
        Self::empty(reply, r);
    }
}
