//! The kubelet's pod list: fetching it, sharing one copy between concurrent
//! attestations, finding a container in it, and the `k8s:` selectors of that
//! container — exactly SPIRE's names and values, so registrations carry over.
//!
//! Flow for one workload (spec/kubernetes.md §2.4–2.6): [`crate::cgroup`]
//! gives the pod UID and container ID; [`KubeletClient::attest`] looks the
//! container up in the node's pod list, fetching a newer list (at most every
//! [`RetryPolicy::min_refresh`]) while a freshly started container is not yet
//! listed, and returns its selectors.
//!
//! Selector values are SPIRE's (`getSelectorValuesFromPodInfo` and
//! `getSelectorValuesFromWorkloadContainerStatus`) with one difference: a
//! selector whose variable part is empty (`k8s:pod-image:` for an image not
//! pulled yet, `k8s:sa:` in a list without service accounts) is not emitted,
//! since no registration could mean it. Label selectors keep empty values
//! (`k8s:pod-label:key:` is a real label).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use rustls::client::danger::ServerCertVerifier;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use sigil_svid::tls::WebPkiVerifier;
use sigil_types::Selectors;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::cgroup::{self, ContainerInfo, Verdict};
use crate::selectors::{node_name, pod_uid, selectors_of, statuses};

/// The selector type of everything this module emits.
pub use crate::selectors::SELECTOR_TYPE;
/// The kubelet's secure port on the node itself (needs `hostNetwork`).
pub const DEFAULT_SECURE_URL: &str = "https://127.0.0.1:10250";
/// The kubelet's deprecated unauthenticated read-only port.
pub const DEFAULT_READ_ONLY_URL: &str = "http://127.0.0.1:10255";
/// The pod's own service-account token, SPIRE's default credential.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA, which signs kubelet serving certificates on most clusters.
pub const DEFAULT_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The largest pod list accepted by default (a busy node lists a few MiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 << 20;
/// How long one kubelet request may take by default (SPIRE's value).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the agent reaches the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletSource {
    /// The authenticated HTTPS port (10250), with a bearer token.
    Secure {
        /// Base URL, e.g. `https://127.0.0.1:10250`; `/pods` is appended.
        url: String,
        /// The bearer token file, read again for every request because the
        /// kubelet rotates projected tokens.
        token_path: PathBuf,
        /// PEM file of the CA that signs the kubelet's serving certificate;
        /// `None` means [`DEFAULT_CA_PATH`]. Re-read when it changes.
        ca_path: Option<PathBuf>,
        /// Accept any kubelet certificate (the connection is still encrypted
        /// but anybody on the path can read the token and forge the pod list).
        skip_verify: bool,
    },
    /// The unauthenticated plain-HTTP read-only port (10255), disabled on
    /// current distributions.
    ReadOnly {
        /// Base URL, e.g. `http://127.0.0.1:10255`; `/pods` is appended.
        url: String,
    },
}

/// Why the kubelet could not be asked, or its answer not used.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KubeletError {
    /// The configured URL is not usable for this kind of source.
    #[error("kubelet URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA file could not be read.
    #[error("cannot read the kubelet CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: Arc<io::Error>,
    },
    /// The CA file holds no usable certificate.
    #[error("the kubelet CA file {path} is not usable: {reason}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The bearer token file could not be read.
    #[error("cannot read the kubelet token {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: Arc<io::Error>,
    },
    /// The bearer token file is empty or holds characters a header cannot carry.
    #[error("the kubelet token file {path} is empty or not a token")]
    BadToken {
        /// The file.
        path: PathBuf,
    },
    /// Connecting, the TLS handshake (including certificate verification) or
    /// the HTTP exchange failed.
    #[error("cannot get the pod list from the kubelet at {url}: {reason}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The kubelet did not answer in time.
    #[error("the kubelet at {url} did not answer within {timeout:?}")]
    Timeout {
        /// The URL asked.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The kubelet answered with another status than 200.
    #[error("the kubelet at {url} answered HTTP {status}{hint}: {body}")]
    Status {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: u16,
        /// A hint for 401/403, else empty.
        hint: &'static str,
        /// The start of the answer.
        body: String,
    },
    /// The answer is larger than the configured limit.
    #[error("the kubelet's answer from {url} exceeds {limit} bytes; refused")]
    TooLarge {
        /// The URL asked.
        url: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The answer is not a `PodList` (or `List`) of pods.
    #[error("the kubelet's answer is not a pod list: {reason}")]
    BadPodList {
        /// Why.
        reason: String,
    },
    /// The same container ID is listed in two pods, so neither can be trusted.
    #[error("two pods found with same container Id {container_id}: {first_pod} and {second_pod}")]
    DuplicateContainer {
        /// The container ID.
        container_id: String,
        /// UID of one pod listing it.
        first_pod: String,
        /// UID of the other.
        second_pod: String,
    },
    /// The pod list puts the container in another pod than its cgroup does.
    #[error(
        "container {container_id} is in pod {listed_pod} according to the kubelet, but its cgroup names pod {cgroup_pod}"
    )]
    PodMismatch {
        /// The container ID.
        container_id: String,
        /// The pod UID from the cgroup file.
        cgroup_pod: String,
        /// The pod the kubelet lists it in.
        listed_pod: String,
    },
    /// The container was still not in the pod list after every retry.
    #[error("container {container_id} was not in the kubelet's pod list after {attempts} attempts")]
    NotListed {
        /// The container ID.
        container_id: String,
        /// The pod UID from the cgroup file, if any.
        pod_uid: Option<String>,
        /// How many pod lists were examined.
        attempts: u32,
    },
}

/// A parsed `GET /pods` answer.
#[derive(Debug, Clone, Default)]
pub struct PodList(Vec<Pod>);

impl PodList {
    /// The pods, in the kubelet's order.
    pub fn pods(&self) -> &[Pod] {
        &self.0
    }

    /// How many pods are listed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no pod is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<Pod>> for PodList {
    fn from(pods: Vec<Pod>) -> Self {
        Self(pods)
    }
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    kind: Option<String>,
    // Distinguishes a missing `items` (not a list) from `null` (an empty one,
    // as Go marshals a nil slice).
    #[serde(default, deserialize_with = "present")]
    items: Option<Option<Vec<Pod>>>,
}

fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Parses the body of the kubelet's `GET /pods` (a `PodList`, or a `List` of
/// pods as some tools write it).
pub fn parse_pod_list(json: &[u8]) -> Result<PodList, KubeletError> {
    let env: Envelope = serde_json::from_slice(json).map_err(|e| KubeletError::BadPodList {
        reason: e.to_string(),
    })?;
    match env.kind.as_deref() {
        None | Some("PodList" | "List") => {}
        Some(other) => {
            return Err(KubeletError::BadPodList {
                reason: format!("kind is {other:?}"),
            });
        }
    }
    match env.items {
        None => Err(KubeletError::BadPodList {
            reason: "no items".into(),
        }),
        Some(items) => Ok(PodList(items.unwrap_or_default())),
    }
}

/// The result of looking a container up in a pod list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The container's pod is listed: these are its `k8s:` selectors.
    Found(Selectors),
    /// The process is not in a pod container: no `k8s:` selectors, and not an
    /// error (the process may still be attested by other attestors).
    NotInPod,
    /// The container is not (yet) in this list; a newer list may have it.
    ContainerNotListed {
        /// The pod UID from the cgroup file, if it named one.
        pod_uid: Option<String>,
        /// The container ID from the cgroup file.
        container_id: String,
    },
}

/// Settings of a lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LookupOptions {
    /// Consider only pods whose `spec.nodeName` is this (guards against a pod
    /// list of another node, or an API-server list of the whole cluster).
    pub node_name: Option<String>,
    /// SPIRE's `disable_container_selectors`: emit no `container-name` and
    /// `container-image` selectors, and when the cgroup names a listed pod but
    /// the container is not listed yet (postStart hooks, Istio's
    /// `holdApplicationUntilProxyStarts`), answer with the pod's selectors.
    pub disable_container_selectors: bool,
}

/// The `k8s:` selectors of the container `info` names, looked up in `pods`.
///
/// A pod is found by its UID when the cgroup names one, and by container ID
/// alone otherwise (CRI-O on KubeEdge, static pods); a container ID listed in
/// two pods is an error. `node_name`, when given, ignores pods of other nodes.
pub fn selectors_for(
    pods: &PodList,
    info: &ContainerInfo,
    node_name: Option<&str>,
) -> Result<Lookup, KubeletError> {
    let options = LookupOptions {
        node_name: node_name.map(str::to_owned),
        disable_container_selectors: false,
    };
    selectors_with(pods, info, &options)
}

/// [`selectors_for`] with all [`LookupOptions`].
pub fn selectors_with(
    pods: &PodList,
    info: &ContainerInfo,
    options: &LookupOptions,
) -> Result<Lookup, KubeletError> {
    let Some(container_id) = info.container_id.as_deref() else {
        return Ok(Lookup::NotInPod);
    };
    let candidates = pods.0.iter().filter(|p| {
        // SPIRE indexes pods by UID and drops those without one; a UID that
        // is not one (no Kubernetes UID holds other characters) could not
        // be written as a selector, and the pod would be served without it.
        is_pod_uid(pod_uid(p))
            && options
                .node_name
                .as_deref()
                .is_none_or(|n| node_name(p) == Some(n))
    });

    let mut found: Option<(&Pod, &ContainerStatus)> = None;
    for pod in candidates.clone() {
        let Some(status) = find_container(pod, container_id) else {
            continue;
        };
        match found {
            Some((first, _)) if pod_uid(first) != pod_uid(pod) => {
                return Err(KubeletError::DuplicateContainer {
                    container_id: container_id.to_owned(),
                    first_pod: pod_uid(first).to_owned(),
                    second_pod: pod_uid(pod).to_owned(),
                });
            }
            Some(_) => {}
            None => found = Some((pod, status)),
        }
    }

    let container = |status| (!options.disable_container_selectors).then_some(status);
    match (found, info.pod_uid.as_deref()) {
        (Some((pod, _)), Some(want)) if !pod_uid(pod).eq_ignore_ascii_case(want) => {
            Err(KubeletError::PodMismatch {
                container_id: container_id.to_owned(),
                cgroup_pod: want.to_owned(),
                listed_pod: pod_uid(pod).to_owned(),
            })
        }
        (Some((pod, status)), _) => Ok(Lookup::Found(selectors_of(pod, container(status)))),
        (None, Some(want)) => {
            let pod = candidates
                .clone()
                .find(|p| pod_uid(p).eq_ignore_ascii_case(want));
            match pod {
                Some(pod) if options.disable_container_selectors => {
                    Ok(Lookup::Found(selectors_of(pod, None)))
                }
                _ => Ok(Lookup::ContainerNotListed {
                    pod_uid: Some(want.to_owned()),
                    container_id: container_id.to_owned(),
                }),
            }
        }
        (None, None) => Ok(Lookup::ContainerNotListed {
            pod_uid: None,
            container_id: container_id.to_owned(),
        }),
    }
}

/// A Kubernetes object UID as the API server writes them (a dashed UUID), or
/// a static pod's config hash (32 hex digits): hex digits and dashes.
fn is_pod_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The status whose `containerID` (`<runtime>://<id>`) names this container.
/// Ephemeral (debug) containers are not consulted, as in SPIRE.
fn find_container<'a>(pod: &'a Pod, container_id: &str) -> Option<&'a ContainerStatus> {
    let (containers, inits) = statuses(pod);
    containers.iter().chain(inits).find(|s| {
        s.container_id
            .as_deref()
            .and_then(|id| id.split_once("://"))
            .is_some_and(|(_, id)| id.trim_end_matches('/').eq_ignore_ascii_case(container_id))
    })
}

/// Explains in words why a process gets the `k8s:` selectors it gets, or why
/// none (for the `sigil k8s selectors` command).
///
/// `cgroup` and `mountinfo` are the process's files, `pods_json` the
/// kubelet's `GET /pods` answer, `node_name` the node to restrict the list to.
pub fn explain(
    cgroup: &str,
    mountinfo: Option<&str>,
    pods_json: &[u8],
    node_name: Option<&str>,
) -> Result<Selectors, String> {
    let (verdict, file) = cgroup::classify(cgroup, mountinfo).map_err(|e| e.to_string())?;
    let info = match verdict {
        Verdict::Workload(info) => info,
        Verdict::NoContainer => {
            return Err(match mountinfo {
                None => "the process is not in a pod (no pod UID or container ID in its cgroup file)".into(),
                Some(_) => "the process is not in a pod (no pod UID or container ID in its cgroup file, nor in the cgroup mounts of its mountinfo)".into(),
            });
        }
        Verdict::Monitor(id) => {
            return Err(format!(
                "the process is a container runtime's monitor (CRI-O conmon) of container {id}, not a workload in a pod"
            ));
        }
        Verdict::OutsidePod(id) => {
            return Err(format!(
                "the process is in container {id}, which is not in a Kubernetes pod (its {file} path names no pod)"
            ));
        }
    };
    let pods = parse_pod_list(pods_json).map_err(|e| e.to_string())?;
    match selectors_for(&pods, &info, node_name).map_err(|e| e.to_string())? {
        Lookup::Found(selectors) => Ok(selectors),
        Lookup::NotInPod => Err("the process is not in a pod".into()),
        Lookup::ContainerNotListed {
            pod_uid,
            container_id,
        } => {
            let elsewhere = node_name.and_then(|want| {
                let any = selectors_for(&pods, &info, None).ok()?;
                matches!(any, Lookup::Found(_)).then(|| {
                    format!(
                        "; the list has it, but on another node than {want} (is the pod list from the right node?)"
                    )
                })
            });
            let hint = elsewhere.unwrap_or_else(|| {
                " (is the pod list from the right node? is the container started?)".to_owned()
            });
            Err(match pod_uid {
                Some(uid) => {
                    format!("container {container_id} of pod {uid} is not in the pod list{hint}")
                }
                None => format!("container {container_id} is not in the pod list{hint}"),
            })
        }
    }
}

/// How long to keep asking for a container that is not listed yet, and how
/// often the kubelet may be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// How many pod lists to examine before giving up (SPIRE's
    /// `max_poll_attempts`, 60).
    pub attempts: u32,
    /// The pause between two attempts (SPIRE's `poll_retry_interval`, 500 ms).
    pub interval: Duration,
    /// The least time between two kubelet requests, and how long a fetched
    /// list answers new lookups (500 ms).
    pub min_refresh: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 60,
            interval: Duration::from_millis(500),
            min_refresh: Duration::from_millis(500),
        }
    }
}

/// One fetched pod list.
#[derive(Debug)]
struct Snapshot {
    version: u64,
    pods: PodList,
}

#[derive(Debug)]
struct LastFetch {
    started: Instant,
    finished: Instant,
    result: Result<Arc<Snapshot>, KubeletError>,
}

#[derive(Debug, Default)]
struct FetchState {
    last: Option<LastFetch>,
    version: u64,
}

/// The kubelet client of the agent: one cached pod list shared by concurrent
/// attestations. Share it behind an `Arc`.
///
/// Callers that arrive while a request is in flight wait for it and share its
/// answer (or error); a list younger than [`RetryPolicy::min_refresh`]
/// answers new callers without a request; a caller that did not find its
/// container waits for a strictly newer list, and requests are spaced at
/// least `min_refresh` apart.
#[derive(Debug)]
pub struct KubeletClient {
    http: HttpTarget,
    node_name: Option<String>,
    retry: RetryPolicy,
    disable_container_selectors: bool,
    max_response_bytes: usize,
    timeout: Duration,
    // A tokio mutex: the holder fetches while others queue behind it, which
    // is what makes them share its answer.
    state: tokio::sync::Mutex<FetchState>,
}

impl KubeletClient {
    /// A client for `source`; `node_name`, when set, restricts lookups to pods
    /// of that node. Reads the CA file now, so a wrong path fails at start.
    pub fn new(
        source: KubeletSource,
        node_name: Option<String>,
        retry: RetryPolicy,
    ) -> Result<Self, KubeletError> {
        Ok(Self {
            http: HttpTarget::new(source)?,
            node_name,
            retry,
            disable_container_selectors: false,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            timeout: DEFAULT_TIMEOUT,
            state: tokio::sync::Mutex::default(),
        })
    }

    /// SPIRE's `disable_container_selectors` (see [`LookupOptions`]).
    pub fn with_disable_container_selectors(mut self, disable: bool) -> Self {
        self.disable_container_selectors = disable;
        self
    }

    /// Refuse pod lists larger than this many bytes (default 64 MiB).
    pub fn with_max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// Give up on a kubelet request after this long (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The `k8s:` selectors of the container `info` names, or `None` when the
    /// process is not in a pod container.
    ///
    /// While the container is not listed (it was just started) or the kubelet
    /// cannot be reached, tries again up to [`RetryPolicy::attempts`] times,
    /// then fails with the last error or [`KubeletError::NotListed`].
    pub async fn attest(&self, info: &ContainerInfo) -> Result<Option<Selectors>, KubeletError> {
        let Some(container_id) = info.container_id.clone() else {
            return Ok(None);
        };
        let options = LookupOptions {
            node_name: self.node_name.clone(),
            disable_container_selectors: self.disable_container_selectors,
        };
        let attempts = self.retry.attempts.max(1);
        let mut seen = 0;
        let mut last_error = None;
        for attempt in 1..=attempts {
            match self.list_newer_than(seen).await {
                Ok(snapshot) => {
                    seen = snapshot.version;
                    match selectors_with(&snapshot.pods, info, &options)? {
                        Lookup::Found(selectors) => return Ok(Some(selectors)),
                        Lookup::NotInPod => return Ok(None),
                        Lookup::ContainerNotListed { .. } => last_error = None,
                    }
                }
                Err(e) => last_error = Some(e),
            }
            if attempt < attempts {
                tracing::debug!(
                    container_id,
                    attempt,
                    attempts,
                    error = last_error.as_ref().map(tracing::field::display),
                    "container not found in the kubelet's pod list yet; trying again"
                );
                tokio::time::sleep(self.retry.interval).await;
            }
        }
        Err(last_error.unwrap_or(KubeletError::NotListed {
            container_id,
            pod_uid: info.pod_uid.clone(),
            attempts,
        }))
    }

    /// One uncached `GET /pods`, the raw body (for `sigil k8s selectors`,
    /// which hands it to [`explain`]).
    pub async fn fetch_pods_json(&self) -> Result<Vec<u8>, KubeletError> {
        self.get().await
    }

    /// A pod list with a version above `seen`: the shared cached one when it
    /// qualifies, else a new fetch (spaced `min_refresh` after the last one).
    async fn list_newer_than(&self, seen: u64) -> Result<Arc<Snapshot>, KubeletError> {
        let arrived = Instant::now();
        let mut state = self.state.lock().await;
        if let Some(last) = &state.last {
            // Finished after we arrived: we were waiting for this very fetch.
            let waited_for_it = last.finished >= arrived;
            let fresh = waited_for_it || arrived < last.started + self.retry.min_refresh;
            match &last.result {
                Ok(snapshot) if snapshot.version > seen && fresh => {
                    return Ok(Arc::clone(snapshot));
                }
                Err(e) if waited_for_it => return Err(e.clone()),
                _ => {}
            }
            tokio::time::sleep_until(last.started + self.retry.min_refresh).await;
        }
        let started = Instant::now();
        let result = match self.get().await {
            // A busy node's list is megabytes of JSON: parse it off the runtime threads.
            Ok(body) => tokio::task::spawn_blocking(move || parse_pod_list(&body))
                .await
                .unwrap_or_else(|e| {
                    Err(KubeletError::BadPodList {
                        reason: format!("the parser failed: {e}"),
                    })
                })
                .map(|pods| {
                    state.version += 1;
                    Arc::new(Snapshot {
                        version: state.version,
                        pods,
                    })
                }),
            Err(e) => Err(e),
        };
        match &result {
            Ok(s) => tracing::debug!(
                pods = s.pods.len(),
                version = s.version,
                "fetched the kubelet's pod list"
            ),
            // Retries may repeat this every min_refresh; the caller reports the final failure.
            Err(e) => tracing::debug!(error = %e, "fetching the kubelet's pod list failed"),
        }
        state.last = Some(LastFetch {
            started,
            finished: Instant::now(),
            result: result.clone(),
        });
        result
    }

    async fn get(&self) -> Result<Vec<u8>, KubeletError> {
        let limit = self.max_response_bytes;
        match tokio::time::timeout(self.timeout, self.http.get(limit)).await {
            Ok(r) => r,
            Err(_) => Err(KubeletError::Timeout {
                url: self.http.url.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

/// Where and how to send `GET /pods`.
#[derive(Debug)]
struct HttpTarget {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    tls: Option<TlsSettings>,
}

#[derive(Debug)]
struct TlsSettings {
    token_path: PathBuf,
    ca_path: PathBuf,
    skip_verify: bool,
    server_name: ServerName<'static>,
    // The CA bytes the config was built from; rebuilt when the file changes.
    // A std mutex, never held across an await.
    config: Mutex<Option<(Vec<u8>, Arc<ClientConfig>)>>,
}

impl HttpTarget {
    fn new(source: KubeletSource) -> Result<Self, KubeletError> {
        let (url, tls) = match source {
            KubeletSource::Secure {
                url,
                token_path,
                ca_path,
                skip_verify,
            } => (
                url,
                Some((
                    token_path,
                    ca_path.unwrap_or_else(|| PathBuf::from(DEFAULT_CA_PATH)),
                    skip_verify,
                )),
            ),
            KubeletSource::ReadOnly { url } => (url, None),
        };
        let bad = |reason: &str| KubeletError::BadUrl {
            url: url.clone(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let want = if tls.is_some() { "https" } else { "http" };
        if uri.scheme_str() != Some(want) {
            return Err(bad(&format!("the scheme must be {want}")));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not allowed"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not allowed"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let path = format!("{}/pods", uri.path().trim_end_matches('/'));
        let tls = match tls {
            None => None,
            Some((token_path, ca_path, skip_verify)) => {
                let server_name =
                    ServerName::try_from(host.clone()).map_err(|_| bad("not a TLS server name"))?;
                let settings = TlsSettings {
                    token_path,
                    ca_path,
                    skip_verify,
                    server_name,
                    config: Mutex::new(None),
                };
                // Fail at start on a missing or unusable CA file.
                settings.client_config()?;
                Some(settings)
            }
        };
        Ok(Self {
            authority: authority.as_str().to_owned(),
            url,
            host,
            port,
            path,
            tls,
        })
    }

    async fn get(&self, limit: usize) -> Result<Vec<u8>, KubeletError> {
        let unreachable = |reason: String| KubeletError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(format!("connecting: {e}")))?;
        // Latency matters more than packet count for one small request.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.exchange(tcp, None, limit).await,
            Some(tls) => {
                let token = read_token(&tls.token_path)?;
                let config = tls.client_config()?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS handshake: {e}")))?;
                self.exchange(stream, Some(token), limit).await
            }
        }
    }

    async fn exchange<IO>(
        &self,
        io: IO,
        token: Option<HeaderValue>,
        limit: usize,
    ) -> Result<Vec<u8>, KubeletError>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let unreachable = |reason: String| KubeletError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unreachable(format!("HTTP: {e}")))?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "kubelet connection ended with an error");
            }
        }));
        let mut request = Request::get(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "sigil-agent");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, token);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| unreachable(format!("building the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(format!("HTTP: {e}")))?;
        let status = response.status();
        let too_large = || KubeletError::TooLarge {
            url: self.url.clone(),
            limit,
        };
        if status == StatusCode::OK {
            let declared = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit as u64) {
                return Err(too_large());
            }
        }
        let body_limit = if status == StatusCode::OK { limit } else { 512 };
        let mut body = response.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| unreachable(format!("reading the answer: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if out.len() + data.len() > body_limit {
                if status == StatusCode::OK {
                    return Err(too_large());
                }
                out.extend_from_slice(&data[..body_limit - out.len()]);
                break;
            }
            out.extend_from_slice(&data);
        }
        if status != StatusCode::OK {
            let text: String = String::from_utf8_lossy(&out)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            return Err(KubeletError::Status {
                url: self.url.clone(),
                status: status.as_u16(),
                hint: match status {
                    StatusCode::UNAUTHORIZED => {
                        " (the kubelet rejected the token; does it run with --authentication-token-webhook?)"
                    }
                    StatusCode::FORBIDDEN => {
                        " (the token's service account needs get on nodes/pods, or nodes/proxy before Kubernetes 1.33)"
                    }
                    _ => "",
                },
                body: text.trim().to_owned(),
            });
        }
        Ok(out)
    }
}

/// Stops the connection task when the exchange ends or is abandoned (timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn read_token(path: &Path) -> Result<HeaderValue, KubeletError> {
    let text = std::fs::read_to_string(path).map_err(|e| KubeletError::TokenFile {
        path: path.to_owned(),
        source: Arc::new(e),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(KubeletError::BadToken {
            path: path.to_owned(),
        });
    }
    let mut value =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| KubeletError::BadToken {
            path: path.to_owned(),
        })?;
    // Keeps it out of hyper's debug output.
    value.set_sensitive(true);
    Ok(value)
}

impl TlsSettings {
    /// The TLS config, rebuilt when the CA file's content changed (the cluster
    /// CA may be rotated under a running agent).
    fn client_config(&self) -> Result<Arc<ClientConfig>, KubeletError> {
        let ca = if self.skip_verify {
            Vec::new()
        } else {
            std::fs::read(&self.ca_path).map_err(|e| KubeletError::CaFile {
                path: self.ca_path.clone(),
                source: Arc::new(e),
            })?
        };
        let mut cached = self.config.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((bytes, config)) = cached.as_ref()
            && *bytes == ca
        {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(self.build(&ca)?);
        *cached = Some((ca, Arc::clone(&config)));
        Ok(config)
    }

    fn build(&self, ca: &[u8]) -> Result<ClientConfig, KubeletError> {
        let bad = |reason: String| KubeletError::BadCa {
            path: self.ca_path.clone(),
            reason,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?;
        let verifier: Arc<dyn ServerCertVerifier> = if self.skip_verify {
            Arc::new(sigil_svid::tls::danger::NoServerVerification(provider))
        } else {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| bad(format!("PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad("no PEM certificate in it".into()));
            }
            let roots = Arc::new(roots);
            match &self.server_name {
                // Kubelet serving certificates name the node (hostname, node
                // IPs), never 127.0.0.1, and the loopback address already
                // pins the peer to this node. SPIRE behaves the same way.
                ServerName::IpAddress(ip) if IpAddr::from(*ip).is_loopback() => {
                    Arc::new(WebPkiVerifier::chain_only(roots))
                }
                _ => Arc::new(WebPkiVerifier::new(roots)),
            }
        };
        let mut config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl fmt::Display for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Found(s) => write!(f, "found ({} selectors)", s.len()),
            Self::NotInPod => f.write_str("not in a pod"),
            Self::ContainerNotListed {
                pod_uid: Some(uid),
                container_id,
            } => write!(f, "container {container_id} of pod {uid} not listed"),
            Self::ContainerNotListed {
                pod_uid: None,
                container_id,
            } => write!(f, "container {container_id} not listed"),
        }
    }
}
