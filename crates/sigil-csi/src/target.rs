//! Which `target_path` the driver mounts onto: only the directory the
//! kubelet gives an ephemeral CSI volume,
//! `<pods dir>/<pod uid>/volumes/kubernetes.io~csi/<volume name>/mount`,
//! and only when no symbolic link leads there.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::error::RequestError;

/// The longest `target_path` accepted (Linux's `PATH_MAX`).
const MAX_PATH: usize = 4096;

/// The last component the kubelet gives every CSI volume's target.
const MOUNT_DIR: &str = "mount";
/// The kubelet's directory of a pod's volumes.
const VOLUMES_DIR: &str = "volumes";
/// The kubelet's directory of a pod's CSI volumes (the plugin name
/// `kubernetes.io/csi`, escaped).
const CSI_PLUGIN_DIR: &str = "kubernetes.io~csi";

/// The kubelet's pods directory, as given and resolved.
#[derive(Debug, Clone)]
pub(crate) struct PodsDir {
    /// As given (`--kubelet-pods-dir`): the path the kubelet uses.
    given: PathBuf,
    /// With every symbolic link resolved.
    resolved: PathBuf,
}

impl PodsDir {
    /// Resolves `given`, which must be an existing directory.
    pub(crate) fn new(given: &Path) -> io::Result<Self> {
        let resolved = std::fs::canonicalize(given)?;
        if !resolved.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        Ok(Self {
            given: given.to_path_buf(),
            resolved,
        })
    }
}

/// Where a checked `target_path` stands.
#[derive(Debug)]
pub(crate) enum Target {
    /// The volume directory exists: the target is `path` (its parent
    /// resolved, which changed nothing).
    Checked(PathBuf),
    /// The volume directory does not exist (any more).
    ParentGone,
}

fn refuse(raw: &str, reason: &'static str) -> RequestError {
    RequestError::TargetPath {
        path: raw.to_owned(),
        reason,
    }
}

/// Whether `rel` (under the pods directory) is a CSI volume's directory:
/// `<pod uid>/volumes/kubernetes.io~csi/<volume>`.
fn volume_dir_shape(rel: &Path) -> bool {
    let parts: Vec<Component<'_>> = rel.components().collect();
    matches!(
        parts.as_slice(),
        [Component::Normal(_), Component::Normal(v), Component::Normal(c), Component::Normal(_)]
            if *v == VOLUMES_DIR && *c == CSI_PLUGIN_DIR
    )
}

/// Checks `raw` (a `target_path` as the kubelet sent it) lexically, then
/// resolves its parent and checks that nothing changed: no `.` or `..`,
/// no symbolic link anywhere under the pods directory, the kubelet's
/// layout for a CSI volume, inside the pods directory once resolved.
pub(crate) fn check(raw: &str, pods: &PodsDir) -> Result<Target, RequestError> {
    if raw.len() > MAX_PATH {
        return Err(refuse(raw, "longer than PATH_MAX"));
    }
    if raw.contains('\0') {
        return Err(refuse(raw, "contains a NUL byte"));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(refuse(raw, "not an absolute path"));
    }
    // Path::components drops interior "." silently: look at the raw text.
    if raw.split('/').any(|c| c == "." || c == "..") {
        return Err(refuse(raw, "contains a '.' or '..' component"));
    }
    if path.file_name().is_none_or(|n| n != MOUNT_DIR) {
        return Err(refuse(
            raw,
            "not a CSI volume's target (<pods dir>/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount)",
        ));
    }
    let Some(parent) = path.parent() else {
        return Err(refuse(raw, "has no parent directory"));
    };
    let lexical = parent
        .strip_prefix(&pods.given)
        .or_else(|_| parent.strip_prefix(&pods.resolved))
        .map_err(|_| refuse(raw, "outside the kubelet's pods directory"))?;
    if !volume_dir_shape(lexical) {
        return Err(refuse(
            raw,
            "not a CSI volume's target (<pods dir>/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount)",
        ));
    }
    let resolved = match std::fs::canonicalize(parent) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Target::ParentGone),
        Err(e) => {
            return Err(RequestError::Io {
                op: "resolving the parent of",
                path: raw.to_owned(),
                source: e,
            });
        }
    };
    let resolved_rel = resolved
        .strip_prefix(&pods.resolved)
        .map_err(|_| refuse(raw, "outside the kubelet's pods directory once resolved"))?;
    if resolved_rel != lexical {
        return Err(refuse(
            raw,
            "a symbolic link under the kubelet's pods directory leads elsewhere",
        ));
    }
    Ok(Target::Checked(resolved.join(MOUNT_DIR)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> (tempfile::TempDir, PodsDir) {
        let dir = tempfile::tempdir().unwrap();
        let pods = PodsDir::new(dir.path()).unwrap();
        (dir, pods)
    }

    fn volume_dir(pods: &PodsDir, uid: &str, vol: &str) -> PathBuf {
        let d = pods
            .resolved
            .join(uid)
            .join("volumes/kubernetes.io~csi")
            .join(vol);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn refused(raw: &str, pods: &PodsDir) -> &'static str {
        match check(raw, pods) {
            Err(RequestError::TargetPath { reason, .. }) => reason,
            other => panic!("{raw}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_kubelet_layout_is_accepted() {
        let (_d, pods) = pods();
        let vol = volume_dir(&pods, "uid-1", "spiffe");
        let raw = vol.join("mount");
        match check(raw.to_str().unwrap(), &pods).unwrap() {
            Target::Checked(p) => assert_eq!(p, raw),
            Target::ParentGone => panic!("the parent exists"),
        }
        let gone = pods
            .resolved
            .join("uid-2/volumes/kubernetes.io~csi/x/mount");
        assert!(matches!(
            check(gone.to_str().unwrap(), &pods).unwrap(),
            Target::ParentGone
        ));
    }

    #[test]
    fn other_shapes_are_refused() {
        let (_d, pods) = pods();
        let base = pods.resolved.display().to_string();
        volume_dir(&pods, "uid-1", "spiffe");
        for raw in [
            "relative/mount".to_owned(),
            format!("{base}/uid-1/volumes/kubernetes.io~csi/spiffe/other"),
            format!("{base}/uid-1/volumes/kubernetes.io~csi/mount"),
            format!("{base}/uid-1/volumes/kubernetes.io~empty-dir/spiffe/mount"),
            format!("{base}/uid-1/etc-hosts/kubernetes.io~csi/spiffe/mount"),
            format!("{base}/uid-1/volumes/kubernetes.io~csi/spiffe/extra/mount"),
            format!("{base}/mount"),
            "/etc/mount".to_owned(),
            format!("{base}/uid-1/volumes/kubernetes.io~csi/spiffe/../spiffe/mount"),
            format!("{base}/uid-1/volumes/./kubernetes.io~csi/spiffe/mount"),
            format!("{base}/../../../../etc/x/volumes/kubernetes.io~csi/y/mount"),
            format!("{base}/uid-1/volumes/kubernetes.io~csi/spi\0ffe/mount"),
            format!(
                "{base}/{}/volumes/kubernetes.io~csi/v/mount",
                "a".repeat(5000)
            ),
        ] {
            refused(&raw, &pods);
        }
    }

    #[test]
    fn symbolic_links_under_the_pods_dir_are_refused() {
        let (_d, pods) = pods();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(outside.path().join("volumes/kubernetes.io~csi/v")).unwrap();
        // A pod directory that is a link to elsewhere.
        std::os::unix::fs::symlink(outside.path(), pods.resolved.join("uid-evil")).unwrap();
        let raw = pods
            .resolved
            .join("uid-evil/volumes/kubernetes.io~csi/v/mount");
        assert_eq!(
            refused(raw.to_str().unwrap(), &pods),
            "outside the kubelet's pods directory once resolved"
        );
        // A link that stays inside the pods directory is refused too.
        volume_dir(&pods, "uid-1", "real");
        std::os::unix::fs::symlink(
            pods.resolved.join("uid-1/volumes/kubernetes.io~csi/real"),
            volume_dir(&pods, "uid-2", "x")
                .parent()
                .unwrap()
                .join("alias"),
        )
        .unwrap();
        let raw = pods
            .resolved
            .join("uid-2/volumes/kubernetes.io~csi/alias/mount");
        assert_eq!(
            refused(raw.to_str().unwrap(), &pods),
            "a symbolic link under the kubelet's pods directory leads elsewhere"
        );
    }
}
