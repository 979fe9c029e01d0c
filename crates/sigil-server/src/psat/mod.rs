//! Kubernetes PSAT node attestation on the server: one
//! `sigil_k8s::psat::PsatVerifier` per `[server.k8s_psat.<cluster>]` profile,
//! built when the server starts, and [`ServerState::attest_psat`].
//!
//! Agents attested this way are named after their node
//! (`spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node UID>`) and may attest
//! again with a fresh token: the same node keeps its agent ID and record.
//! Without the cargo feature `k8s` the server refuses PSAT configurations and
//! answers `AttestPsat` with `Unimplemented`. See `docs/kubernetes-psat.md`.

use std::collections::BTreeMap;

use sigil_types::SpiffeId;

use crate::ServerState;
use crate::error::{AttestationError, ServerError};

pub mod config;

pub use config::{PsatCluster, PsatVerification};

/// The `attestation_type` of agents attested with a PSAT.
pub const ATTESTATION_TYPE: &str = "k8s_psat";

/// What `AttestPsat` answers on a server built without the `k8s` feature.
pub const NO_K8S_SUPPORT: &str = "this server was built without Kubernetes support";

/// The verifiers of the configured clusters, by profile name.
#[derive(Debug, Default)]
pub(crate) struct PsatVerifiers {
    #[cfg(feature = "k8s")]
    clusters: BTreeMap<String, sigil_k8s::psat::PsatVerifier>,
}

impl PsatVerifiers {
    /// Builds one verifier per cluster: reads its JWKS, builds its API
    /// client and checks the profile. Any failure stops the server's start
    /// with an error that names the key.
    pub(crate) async fn build(
        clusters: &BTreeMap<String, PsatCluster>,
    ) -> Result<Self, ServerError> {
        #[cfg(feature = "k8s")]
        {
            let mut built = BTreeMap::new();
            for (name, cluster) in clusters {
                let verifier = k8s::build_verifier(name, cluster).await?;
                tracing::info!(cluster = %name, verifier = ?verifier, "PSAT cluster profile ready");
                built.insert(name.clone(), verifier);
            }
            Ok(Self { clusters: built })
        }
        #[cfg(not(feature = "k8s"))]
        {
            match clusters.keys().next() {
                None => Ok(Self::default()),
                Some(name) => Err(ServerError::Config(
                    sigil_types::config::ConfigError::Invalid {
                        path: None,
                        key: "server.k8s_psat",
                        message: format!(
                            "{NO_K8S_SUPPORT} (cargo feature \"k8s\"); remove \
                             [server.k8s_psat.{name}]"
                        ),
                    },
                )),
            }
        }
    }
}

/// The cluster name as the caller sent it, cut short for messages and logs
/// (it is the caller's input, not yet known to be a configured profile).
fn shown(cluster: &str) -> &str {
    match cluster.char_indices().nth(64) {
        Some((end, _)) => &cluster[..end],
        None => cluster,
    }
}

impl ServerState {
    /// Attests an agent with a Kubernetes projected service account token:
    /// verifies it with the `cluster` profile's verifier, signs the agent's
    /// CSR for `spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node UID>` and
    /// records the agent with its `k8s_psat:` selectors.
    ///
    /// The CSR is checked first. An unknown cluster and every refusal of the
    /// token are `PermissionDenied` (with a message that names only what the
    /// token says); an unreachable API server is `Unavailable`. An agent on a
    /// node that attested before gets the same ID and its record is updated
    /// (unless it is banned).
    pub async fn attest_psat(
        &self,
        cluster: &str,
        token: &str,
        csr: &[u8],
    ) -> Result<(SpiffeId, Vec<Vec<u8>>), ServerError> {
        let result = self.attest_psat_inner(cluster, token, csr).await;
        match &result {
            Ok((id, _)) => {
                self.metrics.attestations.inc();
                tracing::info!(agent = %id, cluster = ?shown(cluster), "agent attested with a Kubernetes PSAT");
            }
            Err(e) => {
                self.metrics.attestation_failures.inc();
                tracing::warn!(cluster = ?shown(cluster), error = %e, "PSAT attestation refused");
            }
        }
        result
    }

    #[cfg(not(feature = "k8s"))]
    async fn attest_psat_inner(
        &self,
        _cluster: &str,
        _token: &str,
        _csr: &[u8],
    ) -> Result<(SpiffeId, Vec<Vec<u8>>), ServerError> {
        Err(AttestationError::Unsupported(NO_K8S_SUPPORT).into())
    }

    #[cfg(feature = "k8s")]
    async fn attest_psat_inner(
        &self,
        cluster: &str,
        token: &str,
        csr: &[u8],
    ) -> Result<(SpiffeId, Vec<Vec<u8>>), ServerError> {
        use std::time::SystemTime;

        use sigil_svid::x509::csr_public_key;
        use sigil_types::AgentRecord;

        use crate::ca::unix;

        let spki = csr_public_key(csr)?;
        let Some(verifier) = self.psat.clusters.get(cluster) else {
            return Err(AttestationError::UnknownCluster(shown(cluster).to_owned()).into());
        };
        let attestation = verifier
            .attest(token)
            .await
            .map_err(AttestationError::Psat)?;
        let agent_id = crate::error::own_id(&self.config.trust_domain, &attestation.agent_path)?;

        // Held from reading the record to writing it, so that a ban made
        // meanwhile (which takes the same lock) is not overwritten.
        let write_guard = self.agent_writes.lock().await;
        let existing = self.store.get_agent(&agent_id).await?;
        if existing.as_ref().is_some_and(|a| a.banned) {
            return Err(crate::error::AgentRefusal::Banned(agent_id).into());
        }
        let now = SystemTime::now();
        let leaf = self.sign_agent_svid(&agent_id, &spki, now)?;
        let info = sigil_svid::x509::cert_info(&leaf)?;
        let now_s = unix(now);
        let record = AgentRecord {
            spiffe_id: agent_id.clone(),
            attestation_type: ATTESTATION_TYPE.into(),
            selectors: attestation.selectors,
            serial: info.serial_hex,
            // Calls still in flight with the SVID this one replaces keep
            // working, as after a renewal.
            previous_serial: existing
                .as_ref()
                .map(|a| a.serial.clone())
                .unwrap_or_default(),
            serial_used: false,
            expires_at: unix(info.not_after),
            banned: false,
            can_reattest: true,
            created_at: existing.as_ref().map_or(now_s, |a| a.created_at),
            updated_at: now_s,
        };
        self.store.upsert_agent(record).await?;
        drop(write_guard);
        if existing.is_some() {
            tracing::info!(agent = %agent_id, "agent re-attested; its record was updated");
        }
        self.settle(self.store.revision().await?).await;
        Ok((agent_id, vec![leaf]))
    }
}

#[cfg(feature = "k8s")]
mod k8s {
    use sigil_k8s::api::{ApiClientError, Client, api_client};
    use sigil_k8s::psat::{ClusterConfig, PsatError, PsatVerifier, Verification};
    use sigil_types::config::ConfigError;

    use super::config::{PsatCluster, PsatVerification};
    use crate::error::ServerError;

    fn invalid(key: &'static str, cluster: &str, message: String) -> ServerError {
        ServerError::Config(ConfigError::Invalid {
            path: None,
            key,
            message: format!("{message} (in [server.k8s_psat.{cluster}])"),
        })
    }

    /// The configuration key a verifier's configuration error is about.
    fn key_of(psat_key: &str) -> &'static str {
        match psat_key {
            "service_account_allow_list" => "server.k8s_psat.service_account_allow_list",
            "audience" => "server.k8s_psat.audience",
            "issuer" => "server.k8s_psat.issuer",
            "jwks" => "server.k8s_psat.jwks_file",
            "trusted_node_label_keys" => "server.k8s_psat.trusted_node_label_keys",
            "allowed_node_label_keys" => "server.k8s_psat.allowed_node_label_keys",
            "allowed_pod_label_keys" => "server.k8s_psat.allowed_pod_label_keys",
            "verification" => "server.k8s_psat.verification",
            _ => "server.k8s_psat",
        }
    }

    /// The API client of a cluster: from `kube_config_file`, or inferred.
    /// Offline verification works without one, so there a failed inference
    /// only means the pod and node are never read.
    async fn client(name: &str, cluster: &PsatCluster) -> Result<Option<Client>, ServerError> {
        match api_client(cluster.kube_config_file.as_deref()).await {
            Ok(client) => Ok(Some(client)),
            Err(ApiClientError::Infer(e))
                if cluster.verification != PsatVerification::TokenReview =>
            {
                tracing::info!(
                    cluster = %name,
                    error = %e,
                    "no Kubernetes API client for this PSAT cluster; tokens are verified \
                     offline only (no pod or node checks, no node IP, label or location \
                     selectors)"
                );
                Ok(None)
            }
            Err(ApiClientError::Infer(e)) => Err(invalid(
                "server.k8s_psat.kube_config_file",
                name,
                format!(
                    "verification = \"token_review\" needs the API server, and no \
                     client could be inferred ({e}); set kube_config_file or run \
                     the server in the cluster"
                ),
            )),
            Err(e) => Err(invalid(
                "server.k8s_psat.kube_config_file",
                name,
                e.to_string(),
            )),
        }
    }

    /// Builds the verifier of one cluster profile.
    pub(super) async fn build_verifier(
        name: &str,
        cluster: &PsatCluster,
    ) -> Result<PsatVerifier, ServerError> {
        super::config::check_psat_cluster_name(name)
            .map_err(|e| invalid("server.k8s_psat", name, e.to_string()))?;
        let verification = match &cluster.verification {
            PsatVerification::TokenReview => Verification::TokenReview,
            PsatVerification::OfflineJwks { jwks_file, issuer } => {
                let jwks_json = std::fs::read_to_string(jwks_file).map_err(|e| {
                    invalid(
                        "server.k8s_psat.jwks_file",
                        name,
                        format!("cannot read {}: {e}", jwks_file.display()),
                    )
                })?;
                Verification::OfflineJwks {
                    jwks_json,
                    issuer: issuer.clone(),
                }
            }
        };
        let mut config = ClusterConfig::new(name, verification);
        config
            .service_account_allow_list
            .clone_from(&cluster.service_account_allow_list);
        config.audience.clone_from(&cluster.audience);
        config
            .trusted_node_label_keys
            .clone_from(&cluster.trusted_node_label_keys);
        config
            .allowed_node_label_keys
            .clone_from(&cluster.allowed_node_label_keys);
        config
            .allowed_pod_label_keys
            .clone_from(&cluster.allowed_pod_label_keys);
        let client = client(name, cluster).await?;
        PsatVerifier::new(config, client).map_err(|e| match e {
            PsatError::Config { key, reason, .. } => invalid(key_of(key), name, reason),
            other => invalid("server.k8s_psat", name, other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use sigil_svid::keys::PrivateKey;

    use super::*;
    use crate::config::{PsatVerification, ServerConfig};
    use crate::start;

    fn csr() -> Vec<u8> {
        let key = PrivateKey::generate_p256().unwrap();
        sigil_svid::x509::make_csr(&key).unwrap()
    }

    fn config(dir: &Path, clusters: BTreeMap<String, PsatCluster>) -> ServerConfig {
        let mut config = ServerConfig::for_test(dir);
        config.k8s_psat = clusters;
        config
    }

    #[cfg(not(feature = "k8s"))]
    #[tokio::test]
    async fn without_k8s_attest_psat_is_unimplemented_and_clusters_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let server = start(config(dir.path(), BTreeMap::new())).await.unwrap();
        let err = server
            .state
            .attest_psat("eks-dev", "token", &csr())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ServerError::Attestation(AttestationError::Unsupported(m)) if m == NO_K8S_SUPPORT),
            "{err}"
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        server.shutdown().await;

        let cluster = PsatCluster::new(
            vec!["kube-system:aws-node".into()],
            PsatVerification::TokenReview,
        );
        let dir = tempfile::tempdir().unwrap();
        let clusters = BTreeMap::from([("eks-dev".to_owned(), cluster)]);
        let err = start(config(dir.path(), clusters))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.k8s_psat") && err.contains("without Kubernetes support"),
            "{err}"
        );
    }

    /// Offline verification from tokens alone: tokens signed with a fresh
    /// P-256 key (by hand: header.claims signed with ES256) and an API
    /// client pointed at a closed port, so the pod and node are never read.
    #[cfg(feature = "k8s")]
    mod offline {
        use std::path::PathBuf;

        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use serde_json::json;
        use sigil_types::Selectors;

        use super::*;
        use crate::ServerHandle;

        use sigil_testkit::fake_k8s::{NAMESPACE, NODE, NODE_UID, POD, POD_UID, TOKEN_SELECTORS};

        const ISSUER: &str = "https://kubernetes.default.svc";

        struct Cluster {
            key: EcdsaKeyPair,
            _dir: tempfile::TempDir,
            server: Option<ServerHandle>,
        }

        impl Cluster {
            async fn start() -> Self {
                let dir = tempfile::tempdir().unwrap();
                let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
                let point = key.public_key().as_ref();
                let jwks = json!({ "keys": [{
                    "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..]),
                }]});
                let jwks_file = dir.path().join("jwks.json");
                std::fs::write(&jwks_file, jwks.to_string()).unwrap();
                let mut cluster = PsatCluster::new(
                    vec!["kube-system:aws-node".into()],
                    PsatVerification::OfflineJwks {
                        jwks_file,
                        issuer: ISSUER.into(),
                    },
                );
                cluster.kube_config_file = Some(closed_port_kubeconfig(dir.path()));
                let clusters = BTreeMap::from([("eks-dev".to_owned(), cluster)]);
                let server = start(config(dir.path(), clusters)).await.unwrap();
                Self {
                    key,
                    _dir: dir,
                    server: Some(server),
                }
            }

            fn state(&self) -> &ServerState {
                self.server.as_ref().unwrap().state()
            }

            fn token(&self, sa: &str, aud: &str, ttl: i64) -> String {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64;
                let claims = json!({
                    "aud": [aud], "iss": ISSUER, "iat": now - 60, "nbf": now - 60,
                    "exp": now + ttl,
                    "sub": format!("system:serviceaccount:{NAMESPACE}:{sa}"),
                    "kubernetes.io": {
                        "namespace": NAMESPACE,
                        "serviceaccount": { "name": sa, "uid": "0b8c5a2e-7c4b-4a86-9f57-1f7d3c1f2a11" },
                        "pod": { "name": POD, "uid": POD_UID },
                        "node": { "name": NODE, "uid": NODE_UID },
                    },
                });
                let header = json!({ "alg": "ES256", "kid": "k1", "typ": "JWT" });
                let input = format!(
                    "{}.{}",
                    URL_SAFE_NO_PAD.encode(header.to_string()),
                    URL_SAFE_NO_PAD.encode(claims.to_string())
                );
                let rng = aws_lc_rs::rand::SystemRandom::new();
                let sig = self.key.sign(&rng, input.as_bytes()).unwrap();
                format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
            }

            fn good_token(&self) -> String {
                self.token("aws-node", "sigil-server", 600)
            }

            async fn agents(&self) -> usize {
                self.state().store.list_agents().await.unwrap().len()
            }

            async fn shutdown(mut self) {
                if let Some(s) = self.server.take() {
                    s.shutdown().await;
                }
            }
        }

        fn closed_port_kubeconfig(dir: &Path) -> PathBuf {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let path = dir.join("kubeconfig");
            let config = json!({
                "apiVersion": "v1", "kind": "Config", "current-context": "c",
                "clusters": [{ "name": "c", "cluster": { "server": format!("http://127.0.0.1:{port}") } }],
                "users": [{ "name": "u", "user": {} }],
                "contexts": [{ "name": "c", "context": { "cluster": "c", "user": "u" } }],
            });
            std::fs::write(&path, config.to_string()).unwrap();
            path
        }

        fn denied(err: &ServerError, needle: &str) {
            let status = err.to_status();
            assert!(
                status.code() == tonic::Code::PermissionDenied && status.message().contains(needle),
                "expected PermissionDenied containing {needle:?}, got {err:?}"
            );
        }

        #[tokio::test]
        async fn attests_from_the_token_and_reattests_into_the_same_record() {
            let c = Cluster::start().await;
            let (id, chain) = c
                .state()
                .attest_psat("eks-dev", &c.good_token(), &csr())
                .await
                .unwrap();
            assert_eq!(
                id.to_string(),
                format!("spiffe://example.org/sigil/agent/k8s_psat/eks-dev/{NODE_UID}")
            );
            let info = sigil_svid::x509::cert_info(&chain[0]).unwrap();
            assert_eq!(info.spiffe_id.as_ref(), Some(&id));
            let first = c.state().store.get_agent(&id).await.unwrap().unwrap();
            assert_eq!(first.attestation_type, ATTESTATION_TYPE);
            assert!(first.can_reattest && !first.banned);
            assert_eq!(first.serial, info.serial_hex);
            let want = Selectors::parse_all(TOKEN_SELECTORS).unwrap();
            assert_eq!(first.selectors, want);

            // created_at has second resolution; make the update visible.
            let mut backdated = first.clone();
            backdated.created_at -= 100;
            c.state().store.upsert_agent(backdated).await.unwrap();

            let (again, _) = c
                .state()
                .attest_psat("eks-dev", &c.good_token(), &csr())
                .await
                .unwrap();
            assert_eq!(again, id);
            let second = c.state().store.get_agent(&id).await.unwrap().unwrap();
            assert_eq!(second.created_at, first.created_at - 100);
            assert_ne!(second.serial, first.serial);
            assert_eq!(second.previous_serial, first.serial);
            assert_eq!(c.agents().await, 1);
            c.shutdown().await;
        }

        #[tokio::test]
        async fn refusals_record_no_agent() {
            let c = Cluster::start().await;
            let state = c.state();
            let failures = state.metrics.attestation_failures.get();

            let err = state
                .attest_psat("other", &c.good_token(), &csr())
                .await
                .unwrap_err();
            denied(&err, "no Kubernetes cluster profile \"other\"");

            let token = c.token("aws-node", "someone-else", 600);
            let err = state
                .attest_psat("eks-dev", &token, &csr())
                .await
                .unwrap_err();
            denied(&err, "audience does not include \"sigil-server\"");

            let token = c.token("aws-node", "sigil-server", -600);
            let err = state
                .attest_psat("eks-dev", &token, &csr())
                .await
                .unwrap_err();
            denied(&err, "expired");

            let token = c.token("default", "sigil-server", 600);
            let err = state
                .attest_psat("eks-dev", &token, &csr())
                .await
                .unwrap_err();
            denied(&err, "kube-system:default may not attest agents");

            let err = state
                .attest_psat("eks-dev", "not.a.jwt", &csr())
                .await
                .unwrap_err();
            denied(&err, "invalid service account token");

            assert_eq!(c.agents().await, 0);
            assert_eq!(state.metrics.attestation_failures.get(), failures + 5);
            c.shutdown().await;
        }

        #[tokio::test]
        async fn the_csr_is_checked_first() {
            let c = Cluster::start().await;
            let err = c
                .state()
                .attest_psat("unknown", "token", b"not a CSR")
                .await
                .unwrap_err();
            assert!(matches!(err, ServerError::Svid(_)), "{err:?}");
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            c.shutdown().await;
        }

        #[tokio::test]
        async fn a_banned_agent_cannot_attest_again() {
            let c = Cluster::start().await;
            let (id, _) = c
                .state()
                .attest_psat("eks-dev", &c.good_token(), &csr())
                .await
                .unwrap();
            c.state().ban_agent(&id).await.unwrap();
            let err = c
                .state()
                .attest_psat("eks-dev", &c.good_token(), &csr())
                .await
                .unwrap_err();
            denied(&err, "is banned");
            assert!(
                c.state()
                    .store
                    .get_agent(&id)
                    .await
                    .unwrap()
                    .unwrap()
                    .banned
            );

            // Evicted (not banned), it comes back with a fresh token.
            let other = c.state();
            other.store.delete_agent(&id).await.unwrap();
            let (back, _) = other
                .attest_psat("eks-dev", &c.good_token(), &csr())
                .await
                .unwrap();
            assert_eq!(back, id);
            c.shutdown().await;
        }

        #[tokio::test]
        async fn bad_files_stop_the_start_naming_the_key() {
            let dir = tempfile::tempdir().unwrap();
            let jwks_file = dir.path().join("jwks.json");
            let offline = |jwks_file: PathBuf| {
                PsatCluster::new(
                    vec!["kube-system:aws-node".into()],
                    PsatVerification::OfflineJwks {
                        jwks_file,
                        issuer: ISSUER.into(),
                    },
                )
            };
            let start_with = |cluster: PsatCluster| {
                let config = config(
                    dir.path(),
                    BTreeMap::from([("eks-dev".to_owned(), cluster)]),
                );
                async move { start(config).await.unwrap_err().to_string() }
            };

            let err = start_with(offline(jwks_file.clone())).await;
            assert!(
                err.contains("server.k8s_psat.jwks_file") && err.contains("eks-dev"),
                "{err}"
            );

            std::fs::write(&jwks_file, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
            let err = start_with(offline(jwks_file.clone())).await;
            assert!(err.contains("server.k8s_psat.jwks_file"), "{err}");

            let mut cluster = PsatCluster::new(
                vec!["kube-system:aws-node".into()],
                PsatVerification::TokenReview,
            );
            cluster.kube_config_file = Some(dir.path().join("missing-kubeconfig"));
            let err = start_with(cluster.clone()).await;
            assert!(err.contains("server.k8s_psat.kube_config_file"), "{err}");

            cluster.kube_config_file = Some(closed_port_kubeconfig(dir.path()));
            cluster.trusted_node_label_keys = vec!["example.com/rack".into()];
            let err = start_with(cluster).await;
            assert!(
                err.contains("server.k8s_psat.trusted_node_label_keys"),
                "{err}"
            );
        }
    }
}
