//! The disk model, without FUSE: a tree of inodes, each with the content a
//! reader sees now and the content that would survive a power cut.
//!
//! The rule is the strict reading of POSIX, stricter than ext4's default
//! `data=ordered` journal (which commits every pending metadata change with
//! any fsync), so a product that passes here is right on any filesystem that
//! honours fsync:
//!
//! - a file's data, size and attributes survive only as of its last
//!   `fsync`/`fdatasync` (the two are not told apart);
//! - a directory's entries (create, mkdir, rename, link, unlink, rmdir)
//!   survive only as of its last `fsync` of the directory itself;
//! - an inode that a surviving entry names but that was never fsynced
//!   survives empty, with the attributes it was created with.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

/// An inode number; the root is 1.
pub type Ino = u64;

/// The root directory's inode number.
pub const ROOT: Ino = 1;

/// Files larger than this are refused (`EFBIG`): the model lives in memory.
pub const MAX_FILE: u64 = 1 << 30;

/// What one inode holds: a file's bytes or a directory's entries, and the
/// attributes that fsync makes durable along with them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Content {
    perm: u16,
    uid: u32,
    gid: u32,
    data: Vec<u8>,
    entries: BTreeMap<OsString, Ino>,
}

#[derive(Clone, Debug)]
struct Node {
    dir: bool,
    cur: Content,
    durable: Content,
    nlink: u32,
    mtime: SystemTime,
    ctime: SystemTime,
}

/// What `stat` shows of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// A directory (else a regular file).
    pub dir: bool,
    /// Bytes (files) or entries (directories).
    pub size: u64,
    /// Permission bits.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last change of the content.
    pub mtime: SystemTime,
    /// Last change of the content or the attributes.
    pub ctime: SystemTime,
}

/// What a power cut at this moment would lose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Volatile {
    /// Files whose current data or attributes differ from their durable ones.
    pub files: usize,
    /// Directories whose current entries differ from their durable ones.
    pub dirs: usize,
}

/// fsync calls seen, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Syncs {
    /// `fsync`/`fdatasync` of a file.
    pub files: u64,
    /// `fsync` of a directory.
    pub dirs: u64,
}

/// The whole disk: every inode (unlinked ones are kept until the next power
/// cut, as open files keep them on a real disk).
#[derive(Clone, Debug)]
pub struct Disk {
    nodes: HashMap<Ino, Node>,
    next: Ino,
    syncs: Syncs,
}

/// `Result` with an errno for the kernel.
pub type Res<T> = Result<T, i32>;

impl Disk {
    /// An empty disk whose root directory has `perm`, `uid` and `gid`.
    pub fn new(perm: u16, uid: u32, gid: u32) -> Self {
        let now = SystemTime::now();
        let root = Content {
            perm,
            uid,
            gid,
            ..Content::default()
        };
        let node = Node {
            dir: true,
            cur: root.clone(),
            durable: root,
            nlink: 2,
            mtime: now,
            ctime: now,
        };
        Self {
            nodes: HashMap::from([(ROOT, node)]),
            next: ROOT + 1,
            syncs: Syncs::default(),
        }
    }

    fn node(&self, ino: Ino) -> Res<&Node> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: Ino) -> Res<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir_mut(&mut self, ino: Ino) -> Res<&mut Node> {
        let n = self.node_mut(ino)?;
        if !n.dir {
            return Err(libc::ENOTDIR);
        }
        Ok(n)
    }

    /// The attributes of `ino`.
    pub fn attr(&self, ino: Ino) -> Res<Attr> {
        let n = self.node(ino)?;
        Ok(Attr {
            ino,
            dir: n.dir,
            size: if n.dir {
                n.cur.entries.len() as u64
            } else {
                n.cur.data.len() as u64
            },
            perm: n.cur.perm,
            nlink: n.nlink,
            uid: n.cur.uid,
            gid: n.cur.gid,
            mtime: n.mtime,
            ctime: n.ctime,
        })
    }

    /// The inode `name` in directory `parent` names now.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Res<Ino> {
        let p = self.node(parent)?;
        if !p.dir {
            return Err(libc::ENOTDIR);
        }
        p.cur.entries.get(name).copied().ok_or(libc::ENOENT)
    }

    /// Creates an empty file or directory `name` in `parent`.
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        dir: bool,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Res<Ino> {
        if self.lookup(parent, name).is_ok() {
            return Err(libc::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let now = SystemTime::now();
        let content = Content {
            perm,
            uid,
            gid,
            ..Content::default()
        };
        self.nodes.insert(
            ino,
            Node {
                dir,
                cur: content.clone(),
                durable: content,
                nlink: if dir { 2 } else { 1 },
                mtime: now,
                ctime: now,
            },
        );
        let p = self.dir_mut(parent)?;
        p.cur.entries.insert(name.to_owned(), ino);
        p.mtime = now;
        Ok(ino)
    }

    /// A new name `name` in `parent` for the file `ino`.
    pub fn link(&mut self, ino: Ino, parent: Ino, name: &OsStr) -> Res<()> {
        if self.node(ino)?.dir {
            return Err(libc::EPERM);
        }
        if self.lookup(parent, name).is_ok() {
            return Err(libc::EEXIST);
        }
        self.dir_mut(parent)?
            .cur
            .entries
            .insert(name.to_owned(), ino);
        let n = self.node_mut(ino)?;
        n.nlink += 1;
        n.ctime = SystemTime::now();
        Ok(())
    }

    fn drop_link(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.nlink = if n.dir { 0 } else { n.nlink.saturating_sub(1) };
            n.ctime = SystemTime::now();
        }
    }

    /// Removes the entry `name` (a file when `dir` is false, an empty
    /// directory when it is true) from `parent`.
    pub fn remove(&mut self, parent: Ino, name: &OsStr, dir: bool) -> Res<()> {
        let ino = self.lookup(parent, name)?;
        let n = self.node(ino)?;
        match (dir, n.dir) {
            (false, true) => return Err(libc::EISDIR),
            (true, false) => return Err(libc::ENOTDIR),
            (true, true) if !n.cur.entries.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        let p = self.dir_mut(parent)?;
        p.cur.entries.remove(name);
        p.mtime = SystemTime::now();
        self.drop_link(ino);
        Ok(())
    }

    /// Moves `name` in `parent` to `new_name` in `new_parent`, replacing what
    /// is there unless `noreplace` (the kernel has already refused moving a
    /// directory into itself).
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        noreplace: bool,
    ) -> Res<()> {
        let ino = self.lookup(parent, name)?;
        let moving_dir = self.node(ino)?.dir;
        self.dir_mut(new_parent)?;
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if noreplace {
                return Err(libc::EEXIST);
            }
            if old == ino {
                return Ok(());
            }
            let o = self.node(old)?;
            match (moving_dir, o.dir) {
                (false, true) => return Err(libc::EISDIR),
                (true, false) => return Err(libc::ENOTDIR),
                (true, true) if !o.cur.entries.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.drop_link(old);
        }
        let now = SystemTime::now();
        let p = self.dir_mut(parent)?;
        p.cur.entries.remove(name);
        p.mtime = now;
        let np = self.dir_mut(new_parent)?;
        np.cur.entries.insert(new_name.to_owned(), ino);
        np.mtime = now;
        self.node_mut(ino)?.ctime = now;
        Ok(())
    }

    /// Up to `size` bytes of file `ino` from `offset`.
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Res<&[u8]> {
        let n = self.node(ino)?;
        if n.dir {
            return Err(libc::EISDIR);
        }
        let len = n.cur.data.len();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
        let end = start.saturating_add(size as usize).min(len);
        Ok(&n.cur.data[start..end])
    }

    /// Writes `data` at `offset` into file `ino` (the cache, not the disk).
    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> Res<usize> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE)
            .ok_or(libc::EFBIG)?;
        let n = self.node_mut(ino)?;
        if n.dir {
            return Err(libc::EISDIR);
        }
        // Both fit in usize: they are at most MAX_FILE.
        let (start, end) = (offset as usize, end as usize);
        if n.cur.data.len() < end {
            n.cur.data.resize(end, 0);
        }
        n.cur.data[start..end].copy_from_slice(data);
        let now = SystemTime::now();
        n.mtime = now;
        n.ctime = now;
        Ok(data.len())
    }

    /// Truncates or extends file `ino` to `size` bytes.
    pub fn set_size(&mut self, ino: Ino, size: u64) -> Res<()> {
        if size > MAX_FILE {
            return Err(libc::EFBIG);
        }
        let n = self.node_mut(ino)?;
        if n.dir {
            return Err(libc::EISDIR);
        }
        n.cur.data.resize(size as usize, 0);
        let now = SystemTime::now();
        n.mtime = now;
        n.ctime = now;
        Ok(())
    }

    /// Changes the attributes given.
    pub fn set_attrs(
        &mut self,
        ino: Ino,
        perm: Option<u16>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Res<()> {
        let n = self.node_mut(ino)?;
        if let Some(p) = perm {
            n.cur.perm = p;
        }
        if let Some(u) = uid {
            n.cur.uid = u;
        }
        if let Some(g) = gid {
            n.cur.gid = g;
        }
        n.ctime = SystemTime::now();
        Ok(())
    }

    /// `fsync` of `ino`: its current content becomes durable. For a
    /// directory that is its entries; the inodes they name are not synced.
    pub fn fsync(&mut self, ino: Ino) -> Res<()> {
        let n = self.node_mut(ino)?;
        n.durable = n.cur.clone();
        if n.dir {
            self.syncs.dirs += 1;
        } else {
            self.syncs.files += 1;
        }
        Ok(())
    }

    /// The entries of directory `ino`, sorted by name.
    pub fn entries(&self, ino: Ino) -> Res<Vec<(OsString, Ino, bool)>> {
        let n = self.node(ino)?;
        if !n.dir {
            return Err(libc::ENOTDIR);
        }
        Ok(n.cur
            .entries
            .iter()
            .map(|(name, i)| (name.clone(), *i, self.nodes.get(i).is_some_and(|c| c.dir)))
            .collect())
    }

    /// fsyncs seen so far.
    pub fn syncs(&self) -> Syncs {
        self.syncs
    }

    /// What a power cut now would lose, among the inodes reachable now.
    pub fn volatile(&self) -> Volatile {
        let mut v = Volatile::default();
        for ino in self.reachable(|n| &n.cur) {
            if let Some(n) = self.nodes.get(&ino)
                && n.cur != n.durable
            {
                if n.dir {
                    v.dirs += 1;
                } else {
                    v.files += 1;
                }
            }
        }
        v
    }

    /// Inodes reachable from the root through `content`'s entries, each
    /// once (a directory reached a second time, which only odd durable
    /// states of directory renames can make, is not followed again).
    fn reachable(&self, content: impl Fn(&Node) -> &Content) -> Vec<Ino> {
        let mut seen = HashSet::from([ROOT]);
        let mut order = vec![ROOT];
        let mut queue = VecDeque::from([ROOT]);
        while let Some(ino) = queue.pop_front() {
            let Some(n) = self.nodes.get(&ino) else {
                continue;
            };
            for child in content(n).entries.values() {
                if seen.insert(*child) {
                    order.push(*child);
                    queue.push_back(*child);
                }
            }
        }
        order
    }

    /// The disk as it comes back after a power cut now: only durable
    /// entries, each inode with its durable content.
    pub fn after_power_cut(&self) -> Disk {
        let mut nodes = HashMap::new();
        let now = SystemTime::now();
        for ino in self.reachable(|n| &n.durable) {
            let Some(n) = self.nodes.get(&ino) else {
                continue;
            };
            let durable = n.durable.clone();
            nodes.insert(
                ino,
                Node {
                    dir: n.dir,
                    cur: durable.clone(),
                    durable,
                    nlink: if n.dir { 2 } else { 0 },
                    mtime: now,
                    ctime: now,
                },
            );
        }
        let mut counts: HashMap<Ino, u32> = HashMap::new();
        let mut dir_children: HashSet<Ino> = HashSet::from([ROOT]);
        for n in nodes.values_mut().filter(|n| n.dir) {
            // A directory may appear in two durable parents (moved, both
            // synced at different times); it keeps the first.
            n.cur.entries.retain(|_, c| {
                let is_dir = self.nodes.get(c).is_some_and(|x| x.dir);
                !is_dir || dir_children.insert(*c)
            });
            n.durable = n.cur.clone();
            for c in n.cur.entries.values() {
                *counts.entry(*c).or_default() += 1;
            }
        }
        for (ino, n) in &mut nodes {
            if !n.dir {
                n.nlink = counts.get(ino).copied().unwrap_or(0);
            }
        }
        Disk {
            nodes,
            next: self.next,
            syncs: Syncs::default(),
        }
    }

    /// The current content of the file at `path` (names from the root).
    pub fn file_at(&self, path: &[&str]) -> Option<Vec<u8>> {
        let mut ino = ROOT;
        for part in path {
            ino = self.lookup(ino, OsStr::new(part)).ok()?;
        }
        let n = self.nodes.get(&ino)?;
        (!n.dir).then(|| n.cur.data.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn file(d: &mut Disk, parent: Ino, n: &str, data: &[u8]) -> Ino {
        let ino = d.create(parent, name(n), false, 0o600, 0, 0).unwrap();
        d.write(ino, 0, data).unwrap();
        ino
    }

    #[test]
    fn a_write_without_fsync_is_lost() {
        let mut d = Disk::new(0o755, 0, 0);
        let f = file(&mut d, ROOT, "a", b"one");
        d.fsync(f).unwrap();
        d.fsync(ROOT).unwrap();
        d.write(f, 0, b"two").unwrap();
        assert_eq!(d.volatile().files, 1);
        let back = d.after_power_cut();
        assert_eq!(back.file_at(&["a"]).unwrap(), b"one");
    }

    #[test]
    fn fsynced_data_in_a_synced_directory_survives() {
        let mut d = Disk::new(0o755, 0, 0);
        let f = file(&mut d, ROOT, "a", b"one");
        d.fsync(f).unwrap();
        d.fsync(ROOT).unwrap();
        assert_eq!(d.volatile(), Volatile::default());
        assert_eq!(d.after_power_cut().file_at(&["a"]).unwrap(), b"one");
    }

    #[test]
    fn a_new_file_without_a_directory_fsync_is_lost_even_when_fsynced() {
        let mut d = Disk::new(0o755, 0, 0);
        let f = file(&mut d, ROOT, "a", b"one");
        d.fsync(f).unwrap();
        assert_eq!(d.after_power_cut().file_at(&["a"]), None);
    }

    #[test]
    fn a_synced_entry_to_an_unsynced_file_comes_back_empty() {
        let mut d = Disk::new(0o755, 0, 0);
        file(&mut d, ROOT, "a", b"one");
        d.fsync(ROOT).unwrap();
        assert_eq!(d.after_power_cut().file_at(&["a"]).unwrap(), b"");
    }

    #[test]
    fn a_rename_without_a_directory_fsync_is_lost() {
        let mut d = Disk::new(0o755, 0, 0);
        let old = file(&mut d, ROOT, "key", b"old");
        d.fsync(old).unwrap();
        d.fsync(ROOT).unwrap();
        let new = file(&mut d, ROOT, "key.tmp", b"new");
        d.fsync(new).unwrap();
        d.rename(ROOT, name("key.tmp"), ROOT, name("key"), false)
            .unwrap();
        assert_eq!(d.file_at(&["key"]).unwrap(), b"new");
        let back = d.after_power_cut();
        assert_eq!(back.file_at(&["key"]).unwrap(), b"old");
        assert_eq!(back.file_at(&["key.tmp"]), None);
        // With the directory synced the new content is there.
        d.fsync(ROOT).unwrap();
        assert_eq!(d.after_power_cut().file_at(&["key"]).unwrap(), b"new");
    }

    #[test]
    fn a_rename_of_an_unsynced_file_over_a_synced_one_can_leave_it_empty() {
        let mut d = Disk::new(0o755, 0, 0);
        file(&mut d, ROOT, "key.tmp", b"new");
        d.rename(ROOT, name("key.tmp"), ROOT, name("key"), false)
            .unwrap();
        d.fsync(ROOT).unwrap();
        assert_eq!(d.after_power_cut().file_at(&["key"]).unwrap(), b"");
    }

    #[test]
    fn a_subdirectory_needs_its_parent_synced() {
        let mut d = Disk::new(0o755, 0, 0);
        let keys = d.create(ROOT, name("keys"), true, 0o700, 0, 0).unwrap();
        let f = file(&mut d, keys, "k", b"secret");
        d.fsync(f).unwrap();
        d.fsync(keys).unwrap();
        assert_eq!(d.after_power_cut().file_at(&["keys", "k"]), None);
        d.fsync(ROOT).unwrap();
        assert_eq!(
            d.after_power_cut().file_at(&["keys", "k"]).unwrap(),
            b"secret"
        );
    }

    #[test]
    fn an_unlink_without_a_directory_fsync_is_undone() {
        let mut d = Disk::new(0o755, 0, 0);
        let f = file(&mut d, ROOT, "a", b"one");
        d.fsync(f).unwrap();
        d.fsync(ROOT).unwrap();
        d.remove(ROOT, name("a"), false).unwrap();
        assert_eq!(d.file_at(&["a"]), None);
        let back = d.after_power_cut();
        assert_eq!(back.file_at(&["a"]).unwrap(), b"one");
        assert_eq!(back.attr(f).unwrap().nlink, 1);
    }

    #[test]
    fn truncation_and_attributes_are_durable_only_with_fsync() {
        let mut d = Disk::new(0o755, 0, 0);
        let f = file(&mut d, ROOT, "a", b"0123456789");
        d.fsync(f).unwrap();
        d.fsync(ROOT).unwrap();
        d.set_size(f, 2).unwrap();
        d.set_attrs(f, Some(0o644), None, None).unwrap();
        let back = d.after_power_cut();
        assert_eq!(back.file_at(&["a"]).unwrap(), b"0123456789");
        assert_eq!(back.attr(f).unwrap().perm, 0o600);
        d.fsync(f).unwrap();
        let back = d.after_power_cut();
        assert_eq!(back.file_at(&["a"]).unwrap(), b"01");
        assert_eq!(back.attr(f).unwrap().perm, 0o644);
    }

    #[test]
    fn a_directory_in_two_durable_parents_comes_back_once() {
        let mut d = Disk::new(0o755, 0, 0);
        let a = d.create(ROOT, name("a"), true, 0o755, 0, 0).unwrap();
        let b = d.create(ROOT, name("b"), true, 0o755, 0, 0).unwrap();
        let c = d.create(a, name("c"), true, 0o755, 0, 0).unwrap();
        d.fsync(ROOT).unwrap();
        d.fsync(a).unwrap();
        d.rename(a, name("c"), b, name("c"), false).unwrap();
        d.fsync(b).unwrap();
        let back = d.after_power_cut();
        let in_a = back.lookup(a, name("c")).is_ok();
        let in_b = back.lookup(b, name("c")).is_ok();
        assert!(in_a ^ in_b, "c in a: {in_a}, in b: {in_b}");
        assert!(back.attr(c).is_ok());
    }

    #[test]
    fn refusals_change_nothing() {
        let mut d = Disk::new(0o755, 0, 0);
        let dir = d.create(ROOT, name("d"), true, 0o755, 0, 0).unwrap();
        file(&mut d, dir, "f", b"x");
        assert_eq!(d.remove(ROOT, name("d"), true), Err(libc::ENOTEMPTY));
        assert_eq!(d.remove(ROOT, name("d"), false), Err(libc::EISDIR));
        assert_eq!(
            d.create(ROOT, name("d"), false, 0o600, 0, 0),
            Err(libc::EEXIST)
        );
        file(&mut d, ROOT, "g", b"y");
        assert_eq!(
            d.rename(ROOT, name("g"), ROOT, name("d"), false),
            Err(libc::EISDIR)
        );
        assert_eq!(
            d.rename(ROOT, name("g"), dir, name("f"), true),
            Err(libc::EEXIST)
        );
        assert_eq!(d.write(dir, 0, b"z"), Err(libc::EISDIR));
        assert_eq!(d.write(ROOT + 3, MAX_FILE, b"z"), Err(libc::EFBIG));
        assert_eq!(d.file_at(&["d", "f"]).unwrap(), b"x");
        assert_eq!(d.file_at(&["g"]).unwrap(), b"y");
    }
}
