//! The CSI Identity and Node services.

use std::collections::HashMap;
use std::path::PathBuf;

use sigil_proto::csi::v1 as csi;
use tonic::{Request, Response, Status};

use crate::error::RequestError;
use crate::mount::{self, Published, Unpublished};
use crate::target::{self, PodsDir, Target};

/// The volume attribute the kubelet sets to "true" on an ephemeral inline
/// volume.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// The prefix of every volume attribute the kubelet itself adds (pod name,
/// namespace, UID, service account with `podInfoOnMount: true`).
pub const KUBELET_KEY_PREFIX: &str = "csi.storage.k8s.io/";

/// The longest volume ID accepted (the kubelet's are `csi-<sha256 hex>`).
const MAX_VOLUME_ID: usize = 256;

/// The driver: what every RPC reads, and one lock so that publishes and
/// unpublishes never interleave their checks and mounts.
#[derive(Debug)]
pub(crate) struct Driver {
    pub(crate) name: String,
    pub(crate) node_id: String,
    /// The Workload API socket directory, resolved.
    pub(crate) source: PathBuf,
    pub(crate) pods: PodsDir,
    pub(crate) lock: tokio::sync::Mutex<()>,
}

fn check_volume_id(id: &str) -> Result<(), RequestError> {
    if id.is_empty() {
        return Err(RequestError::Missing("volume_id"));
    }
    if id.len() > MAX_VOLUME_ID {
        return Err(RequestError::Unsupported(format!(
            "volume_id is longer than {MAX_VOLUME_ID} bytes"
        )));
    }
    Ok(())
}

/// Shortens a key of the caller's for an error message.
fn shown(key: &str) -> String {
    key.chars().take(63).collect()
}

/// Everything in a NodePublishVolumeRequest except the target path.
fn check_publish(req: &csi::NodePublishVolumeRequest) -> Result<(), RequestError> {
    check_volume_id(&req.volume_id)?;
    if req.target_path.is_empty() {
        return Err(RequestError::Missing("target_path"));
    }
    let cap = req
        .volume_capability
        .as_ref()
        .ok_or(RequestError::Missing("volume_capability"))?;
    match &cap.access_type {
        None => return Err(RequestError::Missing("volume_capability.access_type")),
        Some(csi::volume_capability::AccessType::Block(_)) => {
            return Err(RequestError::Unsupported(
                "block volumes are not supported: the volume is a directory".into(),
            ));
        }
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            if !m.mount_flags.is_empty() {
                return Err(RequestError::Unsupported(
                    "mount flags are not supported: the mount is always read-only, nosuid, nodev, noexec".into(),
                ));
            }
        }
    }
    if !req.staging_target_path.is_empty() {
        return Err(RequestError::Unsupported(
            "staging_target_path is set, but the driver has no NodeStageVolume".into(),
        ));
    }
    check_context(&req.volume_context)?;
    if !req.readonly {
        return Err(RequestError::Unsupported(
            "the volume must be read-only: set readOnly: true on the pod's csi volume".into(),
        ));
    }
    Ok(())
}

/// Only ephemeral inline volumes, and no attributes but the kubelet's own:
/// the driver takes none, and one it ignored would be a setting that does
/// nothing.
fn check_context(context: &HashMap<String, String>) -> Result<(), RequestError> {
    if context.get(EPHEMERAL_KEY).map(String::as_str) != Some("true") {
        return Err(RequestError::Unsupported(format!(
            "only ephemeral inline volumes are served ({EPHEMERAL_KEY} = \"true\"); \
             a PersistentVolume cannot use this driver"
        )));
    }
    let mut unknown: Vec<String> = context
        .keys()
        .filter(|k| !k.starts_with(KUBELET_KEY_PREFIX))
        .map(|k| shown(k))
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        unknown.truncate(8);
        return Err(RequestError::Unsupported(format!(
            "unknown volume attributes {unknown:?}: the driver takes no volumeAttributes"
        )));
    }
    Ok(())
}

impl Driver {
    async fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<Published, RequestError> {
        check_publish(&req)?;
        let target = match target::check(&req.target_path, &self.pods)? {
            Target::Checked(p) => p,
            Target::ParentGone => {
                return Err(RequestError::TargetPath {
                    path: req.target_path,
                    reason: "its parent directory does not exist",
                });
            }
        };
        let _guard = self.lock.lock().await;
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || mount::publish(&source, &target))
            .await
            .map_err(|e| RequestError::Io {
                op: "publishing",
                path: req.target_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<Unpublished, RequestError> {
        check_volume_id(&req.volume_id)?;
        if req.target_path.is_empty() {
            return Err(RequestError::Missing("target_path"));
        }
        let target = match target::check(&req.target_path, &self.pods)? {
            Target::Checked(p) => p,
            Target::ParentGone => return Ok(Unpublished::NotMounted),
        };
        let _guard = self.lock.lock().await;
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || mount::unpublish(&source, &target))
            .await
            .map_err(|e| RequestError::Io {
                op: "unpublishing",
                path: req.target_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Driver {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // A node plugin only: no controller service, no topology.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Ready while there is a socket directory to mount.
        let source = self.source.clone();
        let ok = tokio::task::spawn_blocking(move || source.is_dir())
            .await
            .unwrap_or(false);
        if !ok {
            let e = RequestError::SourceUnavailable(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not a directory", self.source.display()),
            ));
            tracing::warn!(error = %e, "CSI Probe: not ready");
            return Err(e.to_status());
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Driver {
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let (volume_id, target) = (shown(&req.volume_id), req.target_path.clone());
        match self.publish(req).await {
            Ok(what) => {
                tracing::info!(volume_id, target, ?what, "CSI NodePublishVolume");
                Ok(Response::new(csi::NodePublishVolumeResponse {}))
            }
            Err(e) => {
                tracing::warn!(volume_id, target, error = %e, "CSI NodePublishVolume refused");
                Err(e.to_status())
            }
        }
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let (volume_id, target) = (shown(&req.volume_id), req.target_path.clone());
        match self.unpublish(req).await {
            Ok(what) => {
                tracing::info!(volume_id, target, ?what, "CSI NodeUnpublishVolume");
                Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
            }
            Err(e) => {
                tracing::warn!(volume_id, target, error = %e, "CSI NodeUnpublishVolume refused");
                Err(e.to_status())
            }
        }
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        // No staging, no stats, no expansion: publish and unpublish only.
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            // No limit: every pod of the node may have the volume.
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: "csi-0123".into(),
            target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount".into(),
            volume_capability: Some(csi::VolumeCapability {
                access_type: Some(csi::volume_capability::AccessType::Mount(
                    csi::volume_capability::MountVolume::default(),
                )),
                access_mode: Some(csi::volume_capability::AccessMode {
                    mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }),
            readonly: true,
            volume_context: HashMap::from([
                (EPHEMERAL_KEY.to_owned(), "true".to_owned()),
                ("csi.storage.k8s.io/pod.name".to_owned(), "p".to_owned()),
            ]),
            ..Default::default()
        }
    }

    type Change = Box<dyn Fn(&mut csi::NodePublishVolumeRequest)>;

    fn change(f: impl Fn(&mut csi::NodePublishVolumeRequest) + 'static) -> Change {
        Box::new(f)
    }

    fn code(req: &csi::NodePublishVolumeRequest) -> tonic::Code {
        check_publish(req).map_or_else(|e| e.to_status().code(), |()| tonic::Code::Ok)
    }

    #[test]
    fn a_kubelet_request_passes_and_each_change_is_refused() {
        assert_eq!(code(&request()), tonic::Code::Ok);
        let cases: Vec<(&str, Change)> = vec![
            ("no volume_id", change(|r| r.volume_id.clear())),
            ("huge volume_id", change(|r| r.volume_id = "x".repeat(300))),
            ("no target", change(|r| r.target_path.clear())),
            ("no capability", change(|r| r.volume_capability = None)),
            (
                "no access type",
                change(|r| {
                    if let Some(c) = r.volume_capability.as_mut() {
                        c.access_type = None;
                    }
                }),
            ),
            (
                "block",
                change(|r| {
                    if let Some(c) = r.volume_capability.as_mut() {
                        c.access_type = Some(csi::volume_capability::AccessType::Block(
                            csi::volume_capability::BlockVolume {},
                        ));
                    }
                }),
            ),
            (
                "mount flags",
                change(|r| {
                    if let Some(c) = r.volume_capability.as_mut() {
                        c.access_type = Some(csi::volume_capability::AccessType::Mount(
                            csi::volume_capability::MountVolume {
                                mount_flags: vec!["rw".into()],
                                ..Default::default()
                            },
                        ));
                    }
                }),
            ),
            ("staging", change(|r| r.staging_target_path = "/x".into())),
            ("writable", change(|r| r.readonly = false)),
            (
                "persistent",
                change(|r| {
                    r.volume_context.remove(EPHEMERAL_KEY);
                }),
            ),
            (
                "ephemeral false",
                change(|r| {
                    r.volume_context
                        .insert(EPHEMERAL_KEY.into(), "false".into());
                }),
            ),
            (
                "unknown attribute",
                change(|r| {
                    r.volume_context.insert("socket".into(), "/etc".into());
                }),
            ),
        ];
        for (what, change) in cases {
            let mut r = request();
            change(&mut r);
            assert_eq!(code(&r), tonic::Code::InvalidArgument, "{what}");
        }
    }
}
