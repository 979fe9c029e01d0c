//! From a process's `/proc/<pid>/cgroup` (and, as a fallback only, its
//! `mountinfo`) to the pod UID and container ID it runs in.
//!
//! The rules are SPIRE's current locator (`pkg/common/containerinfo`,
//! spec/kubernetes.md §2.3): in each cgroup path, walking segments from the
//! end, the first 64-hex word is the container ID; a `pod<uuid>` (dashes or
//! underscores) before it is the pod UID. Across the lines of the file an
//! entry with a pod UID wins over entries without one, and two different pod
//! UIDs or two different container IDs are an error, because the safe answer
//! to a contradictory file is no answer.
//!
//! Three departures from SPIRE, each closing a way to hand a workload an
//! identity that is not its own:
//!
//! - **Runtime monitors are not workloads.** CRI-O's `conmon` lives in
//!   `crio-conmon-<id>.scope`, carrying the ID of the container it watches
//!   (and, with `conmon_cgroup = "pod"`, even the pod's slice). Such a process
//!   gets no Kubernetes identity at all.
//! - **A container ID without a pod counts only where the pod is invisible.**
//!   In a path seen from the host's cgroup root, every container the kubelet
//!   starts sits under a `pod…` cgroup; a bare `/docker/<id>` or
//!   `/system.slice/docker-<id>.scope` is a container outside Kubernetes and
//!   gets no Kubernetes identity (instead of 30 seconds of retries against a
//!   pod list it can never be in). A container ID alone is kept when the path
//!   is relative to the reader's cgroup namespace (`/../…`, where the pod's
//!   cgroup may lie above the namespace root: same-pod siblings, CRI-O on
//!   KubeEdge) or when the pod segment holds a static pod's 32-hex config
//!   hash instead of a UUID; the kubelet client then finds the pod by
//!   container ID.
//! - **Lines without a container ID are ignored**, where SPIRE counts them as
//!   a conflicting empty container ID when no pod UID is known (a cgroup v1
//!   process sits at `/` for controllers its runtime does not manage).
//!
//! `mountinfo` is read only when the cgroup file names no container at all:
//! the workload controls its own mount namespace and could bind-mount a
//! cgroup tree that names somebody else's pod (fixture
//! `spire_impersonation_pair`); the cgroup file is written by the kernel.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Where a process runs, as far as its cgroups tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The pod UID in canonical form (dashed lowercase UUID), when the cgroup
    /// path names one.
    pub pod_uid: Option<String>,
    /// The container ID, 64 lowercase hex digits; `None` means the process is
    /// not in a pod container.
    pub container_id: Option<String>,
}

impl ContainerInfo {
    /// Whether the process runs in a container the kubelet can be asked about.
    pub fn is_in_container(&self) -> bool {
        self.container_id.is_some()
    }
}

/// Which of the two files an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupFile {
    /// `/proc/<pid>/cgroup`.
    Cgroup,
    /// `/proc/<pid>/mountinfo`.
    Mountinfo,
}

impl fmt::Display for CgroupFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cgroup => "cgroup",
            Self::Mountinfo => "mountinfo",
        })
    }
}

/// Why a process's location could not be determined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// Two entries of the file name different pods.
    #[error("the {file} file names two pod UIDs: {first} and {second}")]
    MultiplePodUids {
        /// The file the entries come from.
        file: CgroupFile,
        /// The pod UID seen first.
        first: String,
        /// The different pod UID seen later.
        second: String,
    },
    /// Two entries of the file name different containers.
    #[error("the {file} file names two container IDs: {first} and {second}")]
    MultipleContainerIds {
        /// The file the entries come from.
        file: CgroupFile,
        /// The container ID seen first.
        first: String,
        /// The different container ID seen later.
        second: String,
    },
    /// A line does not have the kernel's format (the wrong file was given,
    /// or it was cut).
    #[error("line {line} of the {file} file is malformed: {text:?}")]
    Malformed {
        /// The file holding the line.
        file: CgroupFile,
        /// The line number, from 1.
        line: usize,
        /// The line (at most 200 characters of it).
        text: String,
    },
    /// The file could not be read (the process may have exited).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// What a file says about a process, in more detail than [`ContainerInfo`]
/// (used to explain a missing identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No entry names a container.
    NoContainer,
    /// A workload in a pod container (the pod UID may be unknown).
    Workload(ContainerInfo),
    /// A container runtime's monitor process (CRI-O `conmon`) of this
    /// container, not the container itself.
    Monitor(String),
    /// A container whose cgroup path names no pod although it is seen from
    /// the cgroup root: not started by the kubelet.
    OutsidePod(String),
}

impl Verdict {
    fn into_info(self) -> ContainerInfo {
        match self {
            Self::Workload(info) => info,
            Self::NoContainer | Self::Monitor(_) | Self::OutsidePod(_) => ContainerInfo::default(),
        }
    }
}

/// Pod UID and container ID from the text of `/proc/<pid>/cgroup`.
///
/// A process that is not in a pod container (a host process, `conmon`, a
/// container outside Kubernetes) yields an empty [`ContainerInfo`], not an
/// error; contradictory entries and malformed lines are errors.
pub fn from_cgroup(text: &str) -> Result<ContainerInfo, CgroupError> {
    scan_cgroup(text).map(Verdict::into_info)
}

/// Pod UID and container ID from the text of `/proc/<pid>/mountinfo`, using
/// only `cgroup`/`cgroup2` mounts whose root is not `/`.
///
/// The mount table is under the workload's control; use this only through
/// [`locate`], which consults it only when the cgroup file says nothing.
pub fn from_mountinfo(text: &str) -> Result<ContainerInfo, CgroupError> {
    scan_mountinfo(text).map(Verdict::into_info)
}

/// Pod UID and container ID of a process from its cgroup file, falling back to
/// its mountinfo only when the cgroup file names no container at all.
pub fn locate(cgroup: &str, mountinfo: Option<&str>) -> Result<ContainerInfo, CgroupError> {
    classify(cgroup, mountinfo).map(|(v, _)| v.into_info())
}

/// [`locate`] for a live process: reads `<proc_root>/<pid>/cgroup` and, only
/// if needed, `<proc_root>/<pid>/mountinfo`.
///
/// This is blocking file I/O; call it from `spawn_blocking`. A missing
/// cgroup file (the process exited) is an error, a missing mountinfo is not.
pub fn locate_pid(proc_root: &Path, pid: i32) -> Result<ContainerInfo, CgroupError> {
    let dir = proc_root.join(pid.to_string());
    let cgroup_path = dir.join("cgroup");
    let cgroup = std::fs::read_to_string(&cgroup_path).map_err(|source| CgroupError::Read {
        path: cgroup_path,
        source,
    })?;
    let verdict = scan_cgroup(&cgroup)?;
    if verdict != Verdict::NoContainer {
        return Ok(verdict.into_info());
    }
    let mountinfo_path = dir.join("mountinfo");
    match std::fs::read_to_string(&mountinfo_path) {
        Ok(text) => from_mountinfo(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ContainerInfo::default()),
        Err(source) => Err(CgroupError::Read {
            path: mountinfo_path,
            source,
        }),
    }
}

/// The verdict of [`locate`] and the file it came from.
pub(crate) fn classify(
    cgroup: &str,
    mountinfo: Option<&str>,
) -> Result<(Verdict, CgroupFile), CgroupError> {
    let verdict = scan_cgroup(cgroup)?;
    match (verdict, mountinfo) {
        (Verdict::NoContainer, Some(m)) => Ok((scan_mountinfo(m)?, CgroupFile::Mountinfo)),
        (v, _) => Ok((v, CgroupFile::Cgroup)),
    }
}

fn scan_cgroup(text: &str) -> Result<Verdict, CgroupError> {
    let mut merger = Merger::new(CgroupFile::Cgroup);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // hierarchy-ID:controller-list:path; the path itself may hold ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(CgroupFile::Cgroup, n, line));
        };
        if id.parse::<u32>().is_err() || !path.starts_with('/') {
            return Err(malformed(CgroupFile::Cgroup, n, line));
        }
        merger.add(path)?;
    }
    Ok(merger.finish())
}

fn scan_mountinfo(text: &str) -> Result<Verdict, CgroupError> {
    let mut merger = Merger::new(CgroupFile::Mountinfo);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // ID parent major:minor root mount-point options [optional…] - fstype source super-options
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields
            .iter()
            .enumerate()
            .skip(6)
            .find(|(_, f)| **f == "-")
            .map(|(i, _)| i);
        let (Some(sep), Some(root)) = (sep, fields.get(3)) else {
            return Err(malformed(CgroupFile::Mountinfo, n, line));
        };
        let Some(fstype) = fields.get(sep + 1) else {
            return Err(malformed(CgroupFile::Mountinfo, n, line));
        };
        if !matches!(*fstype, "cgroup" | "cgroup2") {
            continue;
        }
        let root = unescape_octal(root);
        // A cgroup mounted at its root says nothing about where the process is.
        if root == "/" {
            continue;
        }
        merger.add(&root)?;
    }
    Ok(merger.finish())
}

fn malformed(file: CgroupFile, index: usize, line: &str) -> CgroupError {
    CgroupError::Malformed {
        file,
        line: index + 1,
        text: line.chars().take(200).collect(),
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b.get(i + 1..i + 4);
        if b[i] == b'\\'
            && let Some(d) = digits
            && d.iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What one cgroup path (or mount root) names.
struct Entry {
    container_id: String,
    pod_uid: Option<String>,
    /// Whether a container ID without a pod UID may stand (see module docs).
    podless_ok: bool,
    /// The container segment is a runtime monitor's scope.
    monitor: bool,
}

/// SPIRE's merge of entries across the lines of a file.
struct Merger {
    file: CgroupFile,
    current: Option<Entry>,
    monitor: Option<String>,
}

impl Merger {
    fn new(file: CgroupFile) -> Self {
        Self {
            file,
            current: None,
            monitor: None,
        }
    }

    fn add(&mut self, path: &str) -> Result<(), CgroupError> {
        let Some(entry) = extract(path) else {
            return Ok(());
        };
        if entry.monitor {
            self.monitor.get_or_insert(entry.container_id);
            return Ok(());
        }
        let Some(cur) = &mut self.current else {
            self.current = Some(entry);
            return Ok(());
        };
        match (&cur.pod_uid, &entry.pod_uid) {
            // kind's extra `0::/docker/<node>/…` line: the pod entry wins.
            (Some(_), None) => return Ok(()),
            (None, Some(_)) => {
                *cur = entry;
                return Ok(());
            }
            (Some(a), Some(b)) if a != b => {
                return Err(CgroupError::MultiplePodUids {
                    file: self.file,
                    first: a.clone(),
                    second: b.clone(),
                });
            }
            _ => {}
        }
        if cur.container_id != entry.container_id {
            return Err(CgroupError::MultipleContainerIds {
                file: self.file,
                first: cur.container_id.clone(),
                second: entry.container_id,
            });
        }
        cur.podless_ok &= entry.podless_ok;
        Ok(())
    }

    fn finish(self) -> Verdict {
        if let Some(id) = self.monitor {
            return Verdict::Monitor(id);
        }
        match self.current {
            None => Verdict::NoContainer,
            Some(e) if e.pod_uid.is_none() && !e.podless_ok => Verdict::OutsidePod(e.container_id),
            Some(e) => Verdict::Workload(ContainerInfo {
                pod_uid: e.pod_uid,
                container_id: Some(e.container_id),
            }),
        }
    }
}

/// Container ID and pod UID named by one path, walking its segments from the end.
fn extract(path: &str) -> Option<Entry> {
    let mut segments = path.rsplit('/');
    let mut container = None;
    for segment in segments.by_ref() {
        if let Some((start, end)) = find_container_id(segment) {
            container = Some((&segment[..start], segment[start..end].to_ascii_lowercase()));
            break;
        }
    }
    let (rest_of_segment, container_id) = container?;
    // `crio-conmon-<id>.scope`: the monitor, named after the container it watches.
    let monitor = rest_of_segment.contains("conmon");
    let mut pod_uid = None;
    let mut static_pod = false;
    for segment in std::iter::once(rest_of_segment).chain(segments) {
        if let Some(uid) = find_pod_uid(segment) {
            pod_uid = Some(uid);
            break;
        }
        static_pod |= has_static_pod_hash(segment);
    }
    Some(Entry {
        container_id,
        pod_uid,
        podless_ok: path.starts_with("/..") || static_pod,
        monitor,
    })
}

/// Go's `\w`: what `\b` separates from.
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn at_boundary(b: &[u8], i: usize) -> bool {
    i == 0 || i == b.len() || !is_word(b[i - 1]) || !is_word(b[i])
}

/// `\b([[:xdigit:]]{64})\b`: a whole word of exactly 64 hex digits.
fn find_container_id(segment: &str) -> Option<(usize, usize)> {
    let b = segment.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !is_word(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_word(b[i]) {
            i += 1;
        }
        if i - start == 64 && b[start..i].iter().all(u8::is_ascii_hexdigit) {
            return Some((start, i));
        }
    }
    None
}

/// `\bpod(<uuid with - or _>)\b`, returned in canonical dashed lowercase form.
fn find_pod_uid(segment: &str) -> Option<String> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let b = segment.as_bytes();
    'start: for i in 0..b.len() {
        if !b[i..].starts_with(b"pod") || !at_boundary(b, i) {
            continue;
        }
        let mut j = i + 3;
        let mut uid = String::with_capacity(36);
        for (g, len) in GROUPS.iter().enumerate() {
            if g > 0 {
                match b.get(j) {
                    Some(b'-' | b'_') => uid.push('-'),
                    _ => continue 'start,
                }
                j += 1;
            }
            let Some(hex) = b.get(j..j + len) else {
                continue 'start;
            };
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                continue 'start;
            }
            uid.extend(hex.iter().map(|c| char::from(c.to_ascii_lowercase())));
            j += len;
        }
        if at_boundary(b, j) {
            return Some(uid);
        }
    }
    None
}

/// `\bpod[[:xdigit:]]{32}\b`: a static (mirror) pod, whose kubelet UID is
/// the config hash rather than a UUID.
fn has_static_pod_hash(segment: &str) -> bool {
    let b = segment.as_bytes();
    (0..b.len()).any(|i| {
        b[i..].starts_with(b"pod")
            && at_boundary(b, i)
            && b.get(i + 3..i + 35)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
            && at_boundary(b, i + 35)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn word_boundaries_follow_go_regexp() {
        // 65 hex digits are not a container ID; `_` is a word character.
        assert_eq!(find_container_id(&format!("{CID}0")), None);
        assert_eq!(find_container_id(&format!("x_{CID}")), None);
        assert_eq!(find_container_id(&format!("x-{CID}.scope")), Some((2, 66)));
        assert_eq!(
            find_pod_uid("kubepods-podAB0DC5B2_0123_4567_89ab_0123456789ab.slice").as_deref(),
            Some("ab0dc5b2-0123-4567-89ab-0123456789ab")
        );
        assert_eq!(
            find_pod_uid("xpod00000000-1111-2222-3333-444444444444"),
            None
        );
        assert_eq!(
            find_pod_uid("pod00000000-1111-2222-3333-4444444444445"),
            None
        );
        assert!(has_static_pod_hash("pod2732ca68f6358eba7703fb6f82a25c94"));
        assert!(!has_static_pod_hash("pod2732ca68f6358eba7703fb6f82a25c9"));
    }

    #[test]
    fn mountinfo_octal_escapes() {
        assert_eq!(unescape_octal(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_octal(r"/a\04"), r"/a\04");
    }

    #[test]
    fn static_pod_container_is_kept_without_pod_uid() {
        let text = format!("0::/kubepods/pod2732ca68f6358eba7703fb6f82a25c94/{CID}\n");
        assert_eq!(
            from_cgroup(&text).ok(),
            Some(ContainerInfo {
                pod_uid: None,
                container_id: Some(CID.into())
            })
        );
    }

    #[test]
    fn conmon_in_pod_slice_is_not_the_workload() {
        let text = format!(
            "0::/kubepods.slice/kubepods-pod00000000_1111_2222_3333_444444444444.slice/crio-conmon-{CID}.scope\n"
        );
        assert_eq!(scan_cgroup(&text).ok(), Some(Verdict::Monitor(CID.into())));
    }

    #[test]
    fn plain_docker_container_is_outside_pods() {
        let text = format!("0::/system.slice/docker-{CID}.scope\n");
        assert_eq!(
            scan_cgroup(&text).ok(),
            Some(Verdict::OutsidePod(CID.into()))
        );
    }
}
