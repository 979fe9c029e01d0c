//! From a process's `/proc/<pid>/cgroup` to the pod UID and container ID it
//! runs in, trusting only the kubelet's own cgroup hierarchy.
//!
//! A cgroup path is evidence only where nobody but the kubelet and its
//! container runtime could have created it. Under the kubelet's root (its
//! `cgroupRoot` followed by `kubepods` with the cgroupfs driver, or the
//! matching `…kubepods.slice` with the systemd driver) the levels are fixed:
//! an optional QoS class (`burstable`, `besteffort`), then the pod
//! (`pod<uid>`), then the container (`<id>` or `<runtime>-<id>[.scope]`).
//! Only the **first** pod level and the **first** container level under that
//! root count: a container that creates cgroups below its own (nested
//! runtimes, systemd in a container, or an attacker naming them after
//! another pod) is still that container. A path outside the root gives no
//! Kubernetes identity, however much it looks like one: a systemd-delegated
//! user subtree, a VM or nested node under `machine.slice`, a plain docker
//! container.
//!
//! Other rules, each closing a way to hand a process an identity that is not
//! its own:
//!
//! - **mountinfo is never read.** The mount table belongs to the process's
//!   mount namespace, which an unprivileged user can create
//!   (`unshare -Urm`) and fill with bind mounts of another pod's cgroup
//!   directory. The cgroup file is written by the kernel, relative to the
//!   reader's (the agent's) cgroup namespace, so the process's own cgroup
//!   namespace cannot hide anything from an agent in the host's.
//! - **Runtime monitors are not workloads.** CRI-O's `conmon` lives in
//!   `crio-conmon-<id>.scope`, named after the container it watches.
//! - **Every line that lies in the kubelet's hierarchy must say the same**
//!   (cgroup v1 has one line per controller hierarchy); lines outside it are
//!   controllers the kubelet does not manage (`rdma`, the hybrid `0::` line)
//!   and say nothing. A repeated hierarchy ID, a `.`/`..` inside a path, an
//!   empty segment or a path longer than the kernel's `PATH_MAX` is malformed.
//! - **Paths relative to the agent's cgroup namespace** (`/../…`, when the
//!   agent runs in a pod with a private cgroup namespace) are resolved from
//!   the first segment after the `..`s: it is a child of one of the agent's
//!   own ancestors, which only root creates, so its name must be a level of
//!   the kubelet's hierarchy (the root or its tail, a QoS class, a pod, a
//!   container), and the walk goes on from that level.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The kubelet's default `cgroupRoot` (its `--cgroup-root`).
pub const DEFAULT_KUBELET_CGROUP_ROOT: &str = "/";

/// The kernel's `PATH_MAX`: `/proc/<pid>/cgroup` never shows a longer path.
const MAX_PATH: usize = 4096;
/// More lines than any kernel has controller hierarchies (v1 has about 13).
const MAX_LINES: usize = 256;
/// The most bytes read from a cgroup file.
const MAX_FILE: u64 = (MAX_LINES * (MAX_PATH + 64)) as u64;

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

    /// A cgroup file that the default hierarchy ([`KubeletCgroups::default`])
    /// reads back as this location, for code that takes cgroup text (such as
    /// `kubelet::explain`) when the location was found under a custom root.
    pub fn to_cgroup_file(&self) -> String {
        match (&self.pod_uid, &self.container_id) {
            (Some(pod), Some(cid)) => format!("0::/kubepods/pod{pod}/{cid}\n"),
            // A sibling of the reader's own container: the pod is then found
            // by container ID, as for static pods.
            (None, Some(cid)) => format!("0::/../{cid}\n"),
            (Some(pod), None) => format!("0::/kubepods/pod{pod}\n"),
            (None, None) => "0::/\n".to_owned(),
        }
    }
}

/// Which file an error comes from (only the cgroup file is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CgroupFile {
    /// `/proc/<pid>/cgroup`.
    Cgroup,
}

impl fmt::Display for CgroupFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cgroup")
    }
}

/// Why a process's location could not be determined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// Two lines of the file put the process in different pods.
    #[error("the {file} file names two pod UIDs: {first} and {second}")]
    MultiplePodUids {
        /// The file the lines come from.
        file: CgroupFile,
        /// The pod UID seen first.
        first: String,
        /// The different pod UID seen later.
        second: String,
    },
    /// Two lines of the file put the process in different containers.
    #[error("the {file} file names two container IDs: {first} and {second}")]
    MultipleContainerIds {
        /// The file the lines come from.
        file: CgroupFile,
        /// The container ID seen first.
        first: String,
        /// The different container ID seen later.
        second: String,
    },
    /// Two lines in the kubelet's hierarchy disagree otherwise (a container
    /// in one controller, only its pod, or a monitor, in another).
    #[error(
        "the {file} file places the process at two different levels of the kubelet's hierarchy: {first:?} and {second:?}"
    )]
    Inconsistent {
        /// The file the lines come from.
        file: CgroupFile,
        /// The path seen first (at most 200 characters of it).
        first: String,
        /// The path that disagrees (at most 200 characters of it).
        second: String,
    },
    /// A line does not have the kernel's format (the wrong file was given,
    /// it was cut, or it was made up).
    #[error("line {line} of the {file} file is malformed: {text:?}")]
    Malformed {
        /// The file holding the line.
        file: CgroupFile,
        /// The line number, from 1.
        line: usize,
        /// The line (at most 200 characters of it).
        text: String,
    },
    /// The configured kubelet `cgroupRoot` is not a usable cgroup path.
    #[error("kubelet cgroup root {value:?}: {reason}")]
    BadRoot {
        /// The value as configured.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
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

/// Where a process runs, with the reason when it has no pod identity.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// Not in the kubelet's hierarchy, and the path names no pod or
    /// container (a host process, a kernel thread, the reader's own cgroup).
    NotInContainer,
    /// In the kubelet's hierarchy above the container level: the pod's own
    /// cgroup (CRI-O's `conmon` with `conmon_cgroup = "pod"`), a QoS class.
    InPodOnly {
        /// The pod, when the path reaches the pod level.
        pod_uid: Option<String>,
    },
    /// A workload in a pod container (the pod UID may be unknown: static
    /// pods, or a sibling of the reader's container).
    Workload(ContainerInfo),
    /// A container runtime's monitor process (CRI-O `conmon`) of this
    /// container, not the container itself.
    Monitor {
        /// The container it watches.
        container_id: String,
    },
    /// A path outside the kubelet's hierarchy that names a pod or a
    /// container: a container not started by the kubelet, or a cgroup made
    /// to look like a pod's.
    Foreign {
        /// The path (at most 200 characters of it).
        path: String,
        /// The last 64-hex word of the path, if any.
        container_id: Option<String>,
    },
}

impl Location {
    /// The pod UID and container ID, when this is a workload in a pod.
    pub fn into_info(self) -> ContainerInfo {
        match self {
            Self::Workload(info) => info,
            _ => ContainerInfo::default(),
        }
    }

    /// Why this location gets no Kubernetes identity (`None` for a workload).
    pub fn refusal(&self, cgroups: &KubeletCgroups) -> Option<String> {
        Some(match self {
            Self::Workload(_) => return None,
            Self::NotInContainer => {
                "the process is not in a pod (its cgroup file names no pod or container)".into()
            }
            Self::InPodOnly { pod_uid: Some(uid) } => format!(
                "the process is in the cgroup of pod {uid} but not in one of its containers"
            ),
            Self::InPodOnly { pod_uid: None } => {
                "the process is in the kubelet's cgroup hierarchy but not in a pod container".into()
            }
            Self::Monitor { container_id } => format!(
                "the process is a container runtime's monitor (CRI-O conmon) of container {container_id}, not a workload in a pod"
            ),
            Self::Foreign { path, .. } => format!(
                "the process's cgroup {path:?} is outside the kubelet's pod cgroups ({}); only the kubelet's own hierarchy counts",
                cgroups.roots().join(", ")
            ),
        })
    }
}

/// What [`classify`] says, in the terms `kubelet::explain` matches on.
#[cfg(feature = "kubelet")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No line names a container.
    NoContainer,
    /// A workload in a pod container (the pod UID may be unknown).
    Workload(ContainerInfo),
    /// A container runtime's monitor process (CRI-O `conmon`).
    Monitor(String),
    /// A container outside the kubelet's hierarchy.
    OutsidePod(String),
}

/// [`KubeletCgroups::locate`] with the default root, for the pod-list
/// explanation; mountinfo is accepted for its callers and never read.
#[cfg(feature = "kubelet")]
pub(crate) fn classify(
    cgroup: &str,
    _mountinfo: Option<&str>,
) -> Result<(Verdict, CgroupFile), CgroupError> {
    let verdict = match KubeletCgroups::default().locate(cgroup)? {
        Location::Workload(info) => Verdict::Workload(info),
        Location::Monitor { container_id } => Verdict::Monitor(container_id),
        Location::Foreign {
            container_id: Some(id),
            ..
        } => Verdict::OutsidePod(id),
        Location::NotInContainer | Location::InPodOnly { .. } | Location::Foreign { .. } => {
            Verdict::NoContainer
        }
    };
    Ok((verdict, CgroupFile::Cgroup))
}

/// Pod UID and container ID from the text of `/proc/<pid>/cgroup`, with the
/// kubelet's default cgroup root.
///
/// A process that is not in a pod container yields an empty
/// [`ContainerInfo`], not an error; contradictory and malformed lines are
/// errors.
pub fn from_cgroup(text: &str) -> Result<ContainerInfo, CgroupError> {
    KubeletCgroups::default()
        .locate(text)
        .map(Location::into_info)
}

/// The cgroup driver whose names a tree uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    Cgroupfs,
    Systemd,
}

/// A QoS class level: `burstable` or `besteffort` (guaranteed pods have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qos {
    Burstable,
    BestEffort,
}

impl Qos {
    const ALL: [Self; 2] = [Self::Burstable, Self::BestEffort];

    fn name(self) -> &'static str {
        match self {
            Self::Burstable => "burstable",
            Self::BestEffort => "besteffort",
        }
    }
}

/// Which QoS classes a pod-level name may carry (systemd repeats it there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QosFilter {
    /// Under this QoS level (`None`: directly under the root, guaranteed).
    Is(Option<Qos>),
    /// Unknown (a relative path that starts at the pod level).
    Any,
}

/// The level a walk starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Qos,
    Pod,
    Container,
}

/// What a pod-level name says.
enum PodName {
    Uid(String),
    /// A static pod, whose kubelet UID is a 32-hex config hash: the pod is
    /// found by container ID.
    Static,
}

/// One driver's rendering of the kubelet's hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tree {
    driver: Driver,
    /// The segments of the kubepods cgroup.
    root: Vec<String>,
    /// systemd: the name every slice below the root starts with
    /// (`kubepods`, `kubelet-kubepods`).
    prefix: String,
}

impl Tree {
    fn qos(&self, seg: &str) -> Option<Qos> {
        Qos::ALL.into_iter().find(|q| match self.driver {
            Driver::Cgroupfs => seg == q.name(),
            Driver::Systemd => {
                seg.strip_prefix(self.prefix.as_str())
                    .and_then(|s| s.strip_prefix('-'))
                    .and_then(|s| s.strip_suffix(".slice"))
                    == Some(q.name())
            }
        })
    }

    fn pod(&self, seg: &str, qos: QosFilter) -> Option<PodName> {
        let id = match self.driver {
            Driver::Cgroupfs => seg.strip_prefix("pod")?,
            Driver::Systemd => {
                let rest = seg
                    .strip_prefix(self.prefix.as_str())?
                    .strip_prefix('-')?
                    .strip_suffix(".slice")?;
                let (class, id) = match rest.strip_prefix("pod") {
                    Some(id) => (None, id),
                    None => {
                        let q = Qos::ALL.into_iter().find(|q| {
                            rest.strip_prefix(q.name())
                                .is_some_and(|r| r.starts_with("-pod"))
                        })?;
                        (Some(q), rest.get(q.name().len() + 4..)?)
                    }
                };
                if qos != QosFilter::Any && qos != QosFilter::Is(class) {
                    return None;
                }
                id
            }
        };
        if let Some(uid) = canonical_uuid(id) {
            return Some(PodName::Uid(uid));
        }
        (id.len() == 32 && is_lower_hex(id)).then_some(PodName::Static)
    }

    /// A container-level name: `<id>` or `<runtime>-<id>` (cgroupfs),
    /// `<runtime>-<id>.scope` (systemd).
    fn container(&self, seg: &str) -> Option<Container> {
        match self.driver {
            Driver::Cgroupfs => container_name(seg, true),
            Driver::Systemd => container_name(seg.strip_suffix(".scope")?, false),
        }
    }

    /// The first pod level and the first container level of `segs`, read
    /// from level `start`; anything deeper belongs to that container.
    fn walk(&self, segs: &[&str], start: Level) -> Slot {
        let mut i = 0;
        let mut qos = QosFilter::Any;
        if start == Level::Qos {
            let Some(first) = segs.first() else {
                return Slot::default();
            };
            let class = self.qos(first);
            // No QoS level: a guaranteed pod sits directly under the root.
            qos = QosFilter::Is(class);
            i = usize::from(class.is_some());
        }
        let mut slot = Slot::default();
        if start <= Level::Pod {
            let Some(seg) = segs.get(i) else {
                return slot;
            };
            match self.pod(seg, qos) {
                Some(PodName::Uid(uid)) => slot.pod_uid = Some(uid),
                Some(PodName::Static) => {}
                // Something else the kubelet's tree holds: not a pod.
                None => return slot,
            }
            slot.in_pod = true;
            i += 1;
        }
        slot.container = segs.get(i).and_then(|seg| self.container(seg));
        slot
    }
}

/// A container-level cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Container {
    Workload(String),
    Monitor(String),
}

/// A place in the kubelet's hierarchy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Slot {
    in_pod: bool,
    pod_uid: Option<String>,
    container: Option<Container>,
}

/// What one line says.
enum Place {
    Kubelet(Slot),
    /// Outside the hierarchy; `Some` when the path names a pod or container.
    Outside(Option<Location>),
}

/// The kubelet's pod cgroups on a node: where a cgroup path is evidence of
/// a pod and container (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletCgroups {
    trees: [Tree; 2],
}

impl Default for KubeletCgroups {
    fn default() -> Self {
        Self::from_components(&[])
    }
}

impl KubeletCgroups {
    /// The hierarchy of a kubelet whose `cgroupRoot` (`--cgroup-root`) is
    /// `cgroup_root`, written as the kubelet takes it: `/` (the default),
    /// `/kubelet` (kind), or the node's own cgroup as the agent sees it
    /// (`/docker/<node container ID>` for kind on cgroup v1).
    pub fn new(cgroup_root: &str) -> Result<Self, CgroupError> {
        let bad = |reason| CgroupError::BadRoot {
            value: cgroup_root.to_owned(),
            reason,
        };
        let Some(rest) = cgroup_root.strip_prefix('/') else {
            return Err(bad("must be an absolute cgroup path such as / or /kubelet"));
        };
        if cgroup_root.len() > 1024 {
            return Err(bad("is too long"));
        }
        let components: Vec<&str> = rest.split('/').filter(|c| !c.is_empty()).collect();
        for c in &components {
            if !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(bad(
                    "a component holds a character other than letters, digits, '_' and '-' (write the kubelet's cgroupfs form, e.g. /kubelet, not /kubelet.slice)",
                ));
            }
        }
        Ok(Self::from_components(&components))
    }

    fn from_components(components: &[&str]) -> Self {
        let mut cgroupfs: Vec<String> = components.iter().map(|c| (*c).to_owned()).collect();
        cgroupfs.push("kubepods".to_owned());
        // The kubelet's systemd names: every component escaped (`-` is the
        // slice separator) and joined to its ancestors' names.
        let mut systemd = Vec::with_capacity(cgroupfs.len());
        let mut prefix = String::new();
        for c in &cgroupfs {
            if !prefix.is_empty() {
                prefix.push('-');
            }
            prefix.push_str(&c.replace('-', "_"));
            systemd.push(format!("{prefix}.slice"));
        }
        Self {
            trees: [
                Tree {
                    driver: Driver::Cgroupfs,
                    root: cgroupfs,
                    prefix: String::new(),
                },
                Tree {
                    driver: Driver::Systemd,
                    root: systemd,
                    prefix,
                },
            ],
        }
    }

    /// The kubepods cgroups this hierarchy trusts, one per driver.
    pub fn roots(&self) -> Vec<String> {
        self.trees
            .iter()
            .map(|t| format!("/{}", t.root.join("/")))
            .collect()
    }

    /// Where the process whose `/proc/<pid>/cgroup` is `text` runs.
    ///
    /// A process outside pod containers is an `Ok` location, not an error;
    /// contradictory and malformed lines are errors.
    pub fn locate(&self, text: &str) -> Result<Location, CgroupError> {
        let mut ids = HashSet::new();
        let mut found: Option<(Slot, &str)> = None;
        let mut foreign = None;
        // Split on `\n` only: `lines()` would also drop a `\r` that belongs to a
        // cgroup name.
        for (n, line) in text.split('\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            if n >= MAX_LINES {
                return Err(malformed(n, line));
            }
            // hierarchy-ID:controller-list:path; the path itself may hold ':'.
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(_controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(malformed(n, line));
            };
            let Ok(id) = id.parse::<u32>() else {
                return Err(malformed(n, line));
            };
            if !ids.insert(id) {
                return Err(malformed(n, line));
            }
            match self.place(path).ok_or_else(|| malformed(n, line))? {
                Place::Outside(f) => {
                    if foreign.is_none() {
                        foreign = f;
                    }
                }
                Place::Kubelet(slot) => match &found {
                    None => found = Some((slot, path)),
                    Some((first, first_path)) if *first != slot => {
                        return Err(conflict(first, first_path, &slot, path));
                    }
                    Some(_) => {}
                },
            }
        }
        Ok(match found {
            Some((slot, _)) => match slot.container {
                Some(Container::Workload(id)) => Location::Workload(ContainerInfo {
                    pod_uid: slot.pod_uid,
                    container_id: Some(id),
                }),
                Some(Container::Monitor(container_id)) => Location::Monitor { container_id },
                None => Location::InPodOnly {
                    pod_uid: slot.pod_uid,
                },
            },
            None => foreign.unwrap_or(Location::NotInContainer),
        })
    }

    /// [`Self::locate`] for a live process: reads `<proc_root>/<pid>/cgroup`.
    ///
    /// This is blocking file I/O; call it from `spawn_blocking`. A missing
    /// file (the process exited) is an error.
    pub fn locate_pid(&self, proc_root: &Path, pid: i32) -> Result<Location, CgroupError> {
        let path = proc_root.join(pid.to_string()).join("cgroup");
        let read = |path: &Path| -> io::Result<String> {
            let mut text = String::new();
            std::fs::File::open(path)?
                .take(MAX_FILE + 1)
                .read_to_string(&mut text)?;
            if text.len() as u64 > MAX_FILE {
                return Err(io::Error::other(
                    "larger than any cgroup file the kernel writes",
                ));
            }
            Ok(text)
        };
        let text = read(&path).map_err(|source| CgroupError::Read { path, source })?;
        self.locate(&text)
    }

    /// What one path says; `None` when it is malformed.
    fn place(&self, path: &str) -> Option<Place> {
        if path.len() > MAX_PATH || path.contains('\0') {
            return None;
        }
        let rest = path.strip_prefix('/')?;
        if rest.is_empty() {
            return Some(Place::Outside(None));
        }
        let segs: Vec<&str> = rest.split('/').collect();
        let ups = segs.iter().take_while(|s| **s == "..").count();
        let segs = &segs[ups..];
        if segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
            return None;
        }
        if ups == 0 {
            for tree in &self.trees {
                if let Some(below) = strip_segments(segs, &tree.root) {
                    return Some(Place::Kubelet(tree.walk(below, Level::Qos)));
                }
            }
        } else if let Some(slot) = self.relative(segs) {
            return Some(Place::Kubelet(slot));
        }
        Some(Place::Outside(foreign(path, segs)))
    }

    /// A path relative to the reader's cgroup namespace, after its `..`s:
    /// its first segment says which level of the hierarchy it is.
    fn relative(&self, segs: &[&str]) -> Option<Slot> {
        let first = segs.first()?;
        for tree in &self.trees {
            // The root itself, or its tail when the reader sits inside it.
            for skip in 0..tree.root.len() {
                if let Some(below) = strip_segments(segs, &tree.root[skip..]) {
                    return Some(tree.walk(below, Level::Qos));
                }
            }
        }
        for tree in &self.trees {
            if tree.qos(first).is_some() {
                return Some(tree.walk(segs, Level::Qos));
            }
            if tree.pod(first, QosFilter::Any).is_some() {
                return Some(tree.walk(segs, Level::Pod));
            }
            if tree.container(first).is_some() {
                return Some(tree.walk(segs, Level::Container));
            }
        }
        None
    }
}

/// A [`Location::Foreign`] when a path outside the hierarchy names a pod or
/// container, so that the refusal says why.
fn foreign(path: &str, segs: &[&str]) -> Option<Location> {
    // CRI-O's conmon sits in `system.slice` by default.
    let monitor = segs.iter().rev().find_map(|s| {
        match container_name(s.strip_suffix(".scope").unwrap_or(s), false) {
            Some(Container::Monitor(container_id)) => Some(container_id),
            _ => None,
        }
    });
    if let Some(container_id) = monitor {
        return Some(Location::Monitor { container_id });
    }
    let container_id = segs.iter().rev().find_map(|s| last_hex64(s));
    let names_pod = segs.iter().any(|s| s.contains("pod"));
    (container_id.is_some() || names_pod).then(|| Location::Foreign {
        path: path.chars().take(200).collect(),
        container_id,
    })
}

/// `[<runtime>-]<64 lowercase hex>`; a runtime named `…conmon…` is a monitor.
fn container_name(name: &str, bare_ok: bool) -> Option<Container> {
    let split = name.len().checked_sub(64)?;
    let id = name.get(split..)?;
    if !is_lower_hex(id) {
        return None;
    }
    let runtime = &name[..split];
    if runtime.is_empty() {
        return bare_ok.then(|| Container::Workload(id.to_owned()));
    }
    let runtime = runtime.strip_suffix('-')?;
    let valid = runtime.starts_with(|c: char| c.is_ascii_lowercase())
        && runtime
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return None;
    }
    Some(if runtime.contains("conmon") {
        Container::Monitor(id.to_owned())
    } else {
        Container::Workload(id.to_owned())
    })
}

/// The last whole word of exactly 64 hex digits in `seg`, lowercased.
fn last_hex64(seg: &str) -> Option<String> {
    seg.split(|c: char| !c.is_ascii_alphanumeric())
        .rev()
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
}

/// `segs` without its leading `prefix`, if it starts with it.
fn strip_segments<'a, 'b>(segs: &'b [&'a str], prefix: &[String]) -> Option<&'b [&'a str]> {
    let head = segs.get(..prefix.len())?;
    head.iter()
        .zip(prefix)
        .all(|(a, b)| *a == b.as_str())
        .then(|| &segs[prefix.len()..])
}

fn conflict(first: &Slot, first_path: &str, second: &Slot, second_path: &str) -> CgroupError {
    let file = CgroupFile::Cgroup;
    if let (Some(a), Some(b)) = (&first.pod_uid, &second.pod_uid)
        && a != b
    {
        return CgroupError::MultiplePodUids {
            file,
            first: a.clone(),
            second: b.clone(),
        };
    }
    if let (Some(Container::Workload(a)), Some(Container::Workload(b))) =
        (&first.container, &second.container)
        && a != b
    {
        return CgroupError::MultipleContainerIds {
            file,
            first: a.clone(),
            second: b.clone(),
        };
    }
    CgroupError::Inconsistent {
        file,
        first: first_path.chars().take(200).collect(),
        second: second_path.chars().take(200).collect(),
    }
}

fn malformed(index: usize, line: &str) -> CgroupError {
    CgroupError::Malformed {
        file: CgroupFile::Cgroup,
        line: index + 1,
        text: line.chars().take(200).collect(),
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A UUID written with `-` (cgroupfs) or `_` (systemd escaping) throughout,
/// in canonical dashed lowercase form.
fn canonical_uuid(s: &str) -> Option<String> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let sep = s
        .as_bytes()
        .get(8)
        .copied()
        .filter(|b| matches!(b, b'-' | b'_'))?;
    let mut parts = s.split(char::from(sep));
    let mut out = String::with_capacity(36);
    for (i, len) in GROUPS.iter().enumerate() {
        let part = parts.next()?;
        if part.len() != *len || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        if i > 0 {
            out.push('-');
        }
        out.push_str(&part.to_ascii_lowercase());
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const POD: &str = "00000000-1111-2222-3333-444444444444";
    const POD_: &str = "00000000_1111_2222_3333_444444444444";

    fn workload(pod: Option<&str>, cid: &str) -> Location {
        Location::Workload(ContainerInfo {
            pod_uid: pod.map(str::to_owned),
            container_id: Some(cid.to_owned()),
        })
    }

    fn at(path: &str) -> Location {
        KubeletCgroups::default()
            .locate(&format!("0::{path}\n"))
            .unwrap()
    }

    #[test]
    fn uuids_use_one_separator_throughout() {
        assert_eq!(canonical_uuid(POD_).as_deref(), Some(POD));
        assert_eq!(
            canonical_uuid("AB0DC5B2-0123-4567-89AB-0123456789AB").as_deref(),
            Some("ab0dc5b2-0123-4567-89ab-0123456789ab")
        );
        assert_eq!(canonical_uuid("00000000_1111-2222-3333-444444444444"), None);
        assert_eq!(
            canonical_uuid("00000000-1111-2222-3333-4444444444445"),
            None
        );
        assert_eq!(
            canonical_uuid("00000000-1111-2222-3333-444444444444-"),
            None
        );
        assert_eq!(canonical_uuid("0000000g-1111-2222-3333-444444444444"), None);
    }

    #[test]
    fn container_names_by_driver() {
        let fs = &KubeletCgroups::default().trees[0];
        let sd = &KubeletCgroups::default().trees[1];
        let w = Some(Container::Workload(CID.into()));
        assert_eq!(fs.container(CID), w);
        assert_eq!(fs.container(&format!("crio-{CID}")), w);
        assert_eq!(sd.container(&format!("cri-containerd-{CID}.scope")), w);
        assert_eq!(
            sd.container(&format!("crio-conmon-{CID}.scope")),
            Some(Container::Monitor(CID.into()))
        );
        // A bare ID is cgroupfs only; `.scope` is systemd only; no 65 hex,
        // no upper case, no odd runtime names.
        assert_eq!(sd.container(&format!("{CID}.scope")), None);
        assert_eq!(fs.container(&format!("docker-{CID}.scope")), None);
        assert_eq!(fs.container(&format!("0{CID}")), None);
        assert_eq!(fs.container(&CID.to_ascii_uppercase()), None);
        assert_eq!(fs.container(&format!("x_{CID}")), None);
        assert_eq!(fs.container(&format!("-{CID}")), None);
    }

    #[test]
    fn custom_roots_follow_the_kubelets_systemd_naming() {
        let c = KubeletCgroups::new("/kubelet").unwrap();
        assert_eq!(
            c.roots(),
            ["/kubelet/kubepods", "/kubelet.slice/kubelet-kubepods.slice"]
        );
        let c = KubeletCgroups::new("/my-root/").unwrap();
        assert_eq!(
            c.roots(),
            ["/my-root/kubepods", "/my_root.slice/my_root-kubepods.slice"]
        );
        assert_eq!(KubeletCgroups::new("/").unwrap(), KubeletCgroups::default());
        for bad in ["", "kubelet", "/kubelet.slice", "/a/../b", "/a b"] {
            assert!(
                matches!(KubeletCgroups::new(bad), Err(CgroupError::BadRoot { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_first_pod_and_container_levels_decide() {
        let other = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
        let outer = format!("/kubepods/besteffort/pod{POD}/{CID}");
        assert_eq!(at(&outer), workload(Some(POD), CID));
        assert_eq!(
            at(&format!(
                "{outer}/kubepods/burstable/podffffffff-ffff-ffff-ffff-ffffffffffff/{other}"
            )),
            workload(Some(POD), CID)
        );
        assert_eq!(at(&format!("{outer}/{other}")), workload(Some(POD), CID));
        // Between the pod and the container, no room for anything else.
        assert_eq!(
            at(&format!("/kubepods/besteffort/pod{POD}/sub/{other}")),
            Location::InPodOnly {
                pod_uid: Some(POD.into())
            }
        );
    }

    #[test]
    fn systemd_pod_slices_must_match_their_qos_parent() {
        let scope = format!("cri-containerd-{CID}.scope");
        assert_eq!(
            at(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/{scope}"
            )),
            workload(Some(POD), CID)
        );
        assert_eq!(
            at(&format!("/kubepods.slice/kubepods-pod{POD_}.slice/{scope}")),
            workload(Some(POD), CID)
        );
        for wrong in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{POD_}.slice/{scope}"
            ),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-pod{POD_}.slice/{scope}"),
            format!("/kubepods.slice/kubepods-besteffort-pod{POD_}.slice/{scope}"),
            format!("/kubepods.slice/kubepods-burstable.slice/pod{POD}/{CID}"),
        ] {
            assert_eq!(at(&wrong), Location::InPodOnly { pod_uid: None }, "{wrong}");
        }
    }

    #[test]
    fn relative_paths_start_at_the_level_their_first_segment_names() {
        let sd = format!(
            "kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(at(&format!("/../../{sd}")), workload(Some(POD), CID));
        assert_eq!(
            at(&format!("/../../../kubepods.slice/{sd}")),
            workload(Some(POD), CID)
        );
        assert_eq!(
            at(&format!("/../../../burstable/pod{POD}/{CID}")),
            workload(Some(POD), CID)
        );
        assert_eq!(at(&format!("/../pod{POD}/{CID}")), workload(Some(POD), CID));
        assert_eq!(at(&format!("/../{CID}")), workload(None, CID));
        assert_eq!(at(&format!("/../crio-{CID}.scope")), workload(None, CID));
        assert_eq!(at("/../.."), Location::NotInContainer);
        // The common ancestor's child must be a level of the kubelet's tree.
        assert!(matches!(
            at(&format!(
                "/../../../../user.slice/user-1000.slice/user@1000.service/{sd}"
            )),
            Location::Foreign { .. }
        ));
    }

    #[test]
    fn static_pods_are_found_by_container_id() {
        assert_eq!(
            at(&format!(
                "/kubepods/pod2732ca68f6358eba7703fb6f82a25c94/{CID}"
            )),
            workload(None, CID)
        );
        assert_eq!(
            at("/kubepods/pod2732ca68f6358eba7703fb6f82a25c94"),
            Location::InPodOnly { pod_uid: None }
        );
    }

    #[test]
    fn conmon_is_not_the_workload_inside_or_outside_the_pod() {
        let monitor = Location::Monitor {
            container_id: CID.into(),
        };
        assert_eq!(
            at(&format!(
                "/kubepods.slice/kubepods-pod{POD_}.slice/crio-conmon-{CID}.scope"
            )),
            monitor
        );
        assert_eq!(
            at(&format!("/system.slice/crio-conmon-{CID}.scope")),
            monitor
        );
    }

    #[test]
    fn containers_outside_the_hierarchy_are_foreign() {
        assert_eq!(
            at(&format!("/system.slice/docker-{CID}.scope")),
            Location::Foreign {
                path: format!("/system.slice/docker-{CID}.scope"),
                container_id: Some(CID.into())
            }
        );
        assert_eq!(
            at("/user.slice/user-1000.slice/session-2.scope"),
            Location::NotInContainer
        );
        // A `\r` is part of a name (the kernel escapes nothing), not a line end.
        assert!(matches!(
            KubeletCgroups::default().locate(&format!("0::/kubepods/pod{POD}/{CID}\r\n")),
            Ok(Location::InPodOnly { .. })
        ));
    }

    #[test]
    fn located_containers_survive_the_trip_through_cgroup_text() {
        for info in [
            ContainerInfo {
                pod_uid: Some(POD.into()),
                container_id: Some(CID.into()),
            },
            ContainerInfo {
                pod_uid: None,
                container_id: Some(CID.into()),
            },
            ContainerInfo::default(),
        ] {
            assert_eq!(from_cgroup(&info.to_cgroup_file()).unwrap(), info);
        }
    }
}
