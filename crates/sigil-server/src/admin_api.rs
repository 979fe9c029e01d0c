//! The admin API, served on a Unix socket that only the server's user can
//! open (mode 0600); callers are also checked by kernel peer credentials.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_proto::convert::entry_from_proto;
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::admin_api_server::{AdminApi, AdminApiServer};
use sigil_store::{AuthorityKind, AuthorityRecord};
use sigil_types::{
    BundleEndpointProfile, EntryId, FederationRelationship, Selectors, SpiffeId, TrustDomain,
};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::ServerState;
use crate::ca::AuthorityView;
use crate::error::{EntryRefusal, PodCertRefusal, RequestError, ServerError};
use crate::federation::RefreshStatus;
use crate::index::{EntryFilter, SelectorMatch};
use crate::registry::{MAX_BATCH, new_entry_id};

/// Default and largest page of `ListEntries`.
const DEFAULT_PAGE: usize = 500;
const MAX_PAGE: usize = 5000;
/// The most bytes of entries in one `ListEntries` page (the largest valid
/// entry is about 200 KiB, so a page always holds at least a dozen).
const MAX_PAGE_BYTES: usize = 3 << 20;
/// What every `next_page_token` starts with: any other token is refused
/// instead of silently answering an empty page.
const PAGE_TOKEN_PREFIX: &str = "after:";

/// The tonic service of the admin API.
pub fn service(state: Arc<ServerState>) -> AdminApiServer<AdminService> {
    let max = state.config.limits.admin_max_request_bytes;
    AdminApiServer::new(AdminService { state }).max_decoding_message_size(max)
}

/// Implements [`AdminApi`].
#[derive(Debug)]
pub struct AdminService {
    state: Arc<ServerState>,
}

/// Only root and the server's own user may administer it, whatever the
/// socket's mode was changed to.
fn check_caller<T>(req: &Request<T>) -> Result<(), ServerError> {
    let uid = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid());
    let me = nix::unistd::geteuid().as_raw();
    match uid {
        Some(0) => Ok(()),
        Some(u) if u == me => Ok(()),
        Some(uid) => Err(RequestError::CallerNotAllowed { uid, me }.into()),
        None => Err(RequestError::NoCallerCredentials.into()),
    }
}

fn parse_id(s: &str, field: &'static str) -> Result<SpiffeId, ServerError> {
    s.parse().map_err(|source| {
        RequestError::SpiffeId {
            field,
            value: s.to_owned(),
            source,
        }
        .into()
    })
}

fn batch_len(n: usize) -> Result<(), ServerError> {
    if n == 0 {
        return Err(RequestError::EmptyBatch.into());
    }
    if n > MAX_BATCH {
        return Err(RequestError::BatchTooLarge {
            max: MAX_BATCH,
            got: n,
        }
        .into());
    }
    Ok(())
}

/// The entry a request carries. A create without an ID gets a fresh one
/// (generated only then); an update must name its entry.
fn entry_of(e: &pb::Entry, create: bool) -> Result<sigil_types::Entry, ServerError> {
    let id = match (e.id.is_empty(), create) {
        (true, true) => new_entry_id()?,
        (true, false) => return Err(EntryRefusal::MissingId.into()),
        (false, _) => e.id.parse().map_err(EntryRefusal::InvalidId)?,
    };
    Ok(entry_from_proto(e, move || id).map_err(EntryRefusal::Malformed)?)
}

fn result_of(id: String, r: Result<sigil_types::Entry, ServerError>) -> pb::EntryResult {
    match r {
        Ok(e) => pb::EntryResult {
            id: e.id.to_string(),
            entry: Some(pb::Entry::from(&e)),
            error: String::new(),
        },
        Err(e) => pb::EntryResult {
            id,
            entry: None,
            error: e.to_status().message().to_owned(),
        },
    }
}

fn agent_pb(state: &ServerState, a: &sigil_types::AgentRecord) -> pb::Agent {
    let mut out = pb::Agent::from(a);
    out.connected = state.is_connected(&a.spiffe_id);
    out
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn batch_create_entry(
        &self,
        req: Request<pb::BatchCreateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        check_caller(&req)?;
        let entries = req.into_inner().entries;
        batch_len(entries.len())?;
        // One store transaction for the batch: if the store fails, the call
        // fails and no entry of it was created.
        let parsed = entries.iter().map(|e| entry_of(e, true)).collect();
        let created = self.state.create_entries(parsed).await?;
        let results = entries
            .into_iter()
            .zip(created)
            .map(|(e, r)| result_of(e.id, r))
            .collect();
        Ok(Response::new(pb::BatchEntryResponse { results }))
    }

    async fn batch_update_entry(
        &self,
        req: Request<pb::BatchUpdateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        check_caller(&req)?;
        let entries = req.into_inner().entries;
        batch_len(entries.len())?;
        // One store transaction for the batch, as for creates.
        let parsed = entries.iter().map(|e| entry_of(e, false)).collect();
        let updated = self.state.update_entries(parsed).await?;
        let results = entries
            .into_iter()
            .zip(updated)
            .map(|(e, r)| result_of(e.id, r))
            .collect();
        Ok(Response::new(pb::BatchEntryResponse { results }))
    }

    async fn batch_delete_entry(
        &self,
        req: Request<pb::BatchDeleteEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        check_caller(&req)?;
        let ids = req.into_inner().ids;
        batch_len(ids.len())?;
        // One store transaction for the batch, as for creates.
        let parsed = ids
            .iter()
            .map(|id| {
                id.parse::<EntryId>()
                    .map_err(|e| EntryRefusal::BadId(e).into())
            })
            .collect();
        let deleted = self.state.delete_entries(parsed).await?;
        let results = ids
            .into_iter()
            .zip(deleted)
            .map(|(id, r)| result_of(id, r))
            .collect();
        Ok(Response::new(pb::BatchEntryResponse { results }))
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        check_caller(&req)?;
        let id: EntryId = req
            .get_ref()
            .id
            .parse()
            .map_err(|e| ServerError::from(EntryRefusal::BadId(e)))?;
        match self.state.index.get(&id) {
            Some(e) => Ok(Response::new(pb::Entry::from(e.as_ref()))),
            None => Err(ServerError::from(EntryRefusal::NotFound(id)).into()),
        }
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        check_caller(&req)?;
        let r = req.into_inner();
        let mut filter = EntryFilter::default();
        if !r.id_prefix.is_empty() {
            filter.id_prefix = Some(
                r.id_prefix
                    .parse()
                    .map_err(|e| ServerError::from(EntryRefusal::BadId(e)))?,
            );
        }
        if !r.spiffe_id.is_empty() {
            filter.spiffe_id = Some(parse_id(&r.spiffe_id, "spiffe_id")?);
        }
        if !r.parent_id.is_empty() {
            filter.parent_id = Some(parse_id(&r.parent_id, "parent_id")?);
        }
        if !r.selectors.is_empty() {
            let sel = Selectors::parse_all(&r.selectors)
                .map_err(|e| ServerError::from(RequestError::Selectors(e)))?;
            let mode: SelectorMatch = r
                .selector_match
                .parse()
                .map_err(RequestError::SelectorMatch)
                .map_err(ServerError::from)?;
            filter.selectors = Some((sel, mode));
        }
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(
                r.page_token
                    .strip_prefix(PAGE_TOKEN_PREFIX)
                    .and_then(|id| id.parse::<EntryId>().ok())
                    .ok_or(ServerError::from(RequestError::PageToken))?,
            )
        };
        let limit = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let (page, mut next) = self.state.index.list(&filter, after.as_ref(), limit);
        // A page is bounded by bytes too, so that any page fits the 4 MiB a
        // gRPC client accepts by default, however large the entries are.
        let mut entries = Vec::with_capacity(page.len());
        let mut bytes = 0;
        for (i, e) in page.iter().enumerate() {
            let wire = pb::Entry::from(e.as_ref());
            let len = prost::Message::encoded_len(&wire) + 8;
            if i > 0 && bytes + len > MAX_PAGE_BYTES {
                next = Some(page[i - 1].id.clone());
                break;
            }
            bytes += len;
            entries.push(wire);
        }
        Ok(Response::new(pb::ListEntriesResponse {
            entries,
            next_page_token: next
                .map(|n| format!("{PAGE_TOKEN_PREFIX}{n}"))
                .unwrap_or_default(),
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        check_caller(&req)?;
        let ttl = match req.get_ref().ttl {
            0 => None,
            t if t < 0 => return Err(ServerError::from(RequestError::NegativeTtl).into()),
            t => Some(Duration::from_secs(t as u64)),
        };
        let t = self.state.generate_join_token(ttl).await?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: t.token,
            expires_at: t.expires_at,
            agent_id: t.agent_id.to_string(),
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        check_caller(&req)?;
        let agents = self
            .state
            .store
            .list_agents()
            .await
            .map_err(ServerError::from)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(|a| agent_pb(&self.state, a)).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        check_caller(&req)?;
        let id = parse_id(&req.get_ref().spiffe_id, "spiffe_id")?;
        match self
            .state
            .store
            .get_agent(&id)
            .await
            .map_err(ServerError::from)?
        {
            Some(a) => Ok(Response::new(agent_pb(&self.state, &a))),
            None => Err(ServerError::from(RequestError::AgentNotFound(id)).into()),
        }
    }

    async fn evict_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        check_caller(&req)?;
        let id = parse_id(&req.get_ref().spiffe_id, "spiffe_id")?;
        let a = self.state.evict_agent(&id).await?;
        Ok(Response::new(pb::Agent::from(&a)))
    }

    async fn ban_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        check_caller(&req)?;
        let id = parse_id(&req.get_ref().spiffe_id, "spiffe_id")?;
        let a = self.state.ban_agent(&id).await?;
        Ok(Response::new(agent_pb(&self.state, &a)))
    }

    async fn get_bundle(
        &self,
        req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        check_caller(&req)?;
        Ok(Response::new(pb::GetBundleResponse {
            bundle_json: self.state.ca.bundle().to_json(),
            trust_domain: self.state.config.trust_domain.to_string(),
        }))
    }

    async fn list_federated_bundles(
        &self,
        req: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        check_caller(&req)?;
        let bundles = self.state.federation.list_bundles().await?;
        Ok(Response::new(pb::ListFederatedBundlesResponse {
            bundles: bundles
                .into_iter()
                .map(|(td, bundle_json)| pb::FederatedBundle {
                    trust_domain: td.to_string(),
                    bundle_json,
                })
                .collect(),
        }))
    }

    async fn get_federated_bundle(
        &self,
        req: Request<pb::TrustDomainRequest>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        check_caller(&req)?;
        let td = parse_td(&req.get_ref().trust_domain)?;
        let bundle_json = self.state.federation.get_bundle(&td).await?;
        Ok(Response::new(pb::FederatedBundle {
            trust_domain: td.to_string(),
            bundle_json,
        }))
    }

    async fn set_federated_bundle(
        &self,
        req: Request<pb::FederatedBundle>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        check_caller(&req)?;
        let r = req.get_ref();
        let td = parse_td(&r.trust_domain)?;
        let bundle_json = self
            .state
            .federation
            .set_bundle(&td, &r.bundle_json)
            .await?;
        Ok(Response::new(pb::FederatedBundle {
            trust_domain: td.to_string(),
            bundle_json,
        }))
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<pb::TrustDomainRequest>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        check_caller(&req)?;
        let td = parse_td(&req.get_ref().trust_domain)?;
        let bundle_json = self.state.federation.delete_bundle(&td).await?;
        Ok(Response::new(pb::FederatedBundle {
            trust_domain: td.to_string(),
            bundle_json,
        }))
    }

    async fn create_federation_relationship(
        &self,
        req: Request<pb::FederationRelationship>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        check_caller(&req)?;
        let r = req.get_ref();
        let created = self
            .state
            .federation
            .create_relationship(relationship_of(r)?, Some(&r.trust_domain_bundle_json))
            .await?;
        let (created, status) = self
            .state
            .federation
            .get_relationship(&created.trust_domain)
            .await?;
        Ok(Response::new(relationship_pb(&created, &status)))
    }

    async fn update_federation_relationship(
        &self,
        req: Request<pb::FederationRelationship>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        check_caller(&req)?;
        let r = req.get_ref();
        let updated = self
            .state
            .federation
            .update_relationship(relationship_of(r)?, Some(&r.trust_domain_bundle_json))
            .await?;
        let (updated, status) = self
            .state
            .federation
            .get_relationship(&updated.trust_domain)
            .await?;
        Ok(Response::new(relationship_pb(&updated, &status)))
    }

    async fn get_federation_relationship(
        &self,
        req: Request<pb::TrustDomainRequest>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        check_caller(&req)?;
        let td = parse_td(&req.get_ref().trust_domain)?;
        let (r, status) = self.state.federation.get_relationship(&td).await?;
        Ok(Response::new(relationship_pb(&r, &status)))
    }

    async fn list_federation_relationships(
        &self,
        req: Request<pb::ListFederationRelationshipsRequest>,
    ) -> Result<Response<pb::ListFederationRelationshipsResponse>, Status> {
        check_caller(&req)?;
        let all = self.state.federation.list_relationships().await?;
        Ok(Response::new(pb::ListFederationRelationshipsResponse {
            relationships: all.iter().map(|(r, s)| relationship_pb(r, s)).collect(),
        }))
    }

    async fn delete_federation_relationship(
        &self,
        req: Request<pb::TrustDomainRequest>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        check_caller(&req)?;
        let td = parse_td(&req.get_ref().trust_domain)?;
        let r = self.state.federation.delete_relationship(&td).await?;
        Ok(Response::new(relationship_pb(&r, &Default::default())))
    }

    async fn refresh_bundle(
        &self,
        req: Request<pb::TrustDomainRequest>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        check_caller(&req)?;
        let td = parse_td(&req.get_ref().trust_domain)?;
        let bundle_json = self.state.federation.refresh(&td).await?;
        Ok(Response::new(pb::FederatedBundle {
            trust_domain: td.to_string(),
            bundle_json,
        }))
    }

    async fn list_authorities(
        &self,
        req: Request<pb::ListAuthoritiesRequest>,
    ) -> Result<Response<pb::ListAuthoritiesResponse>, Status> {
        check_caller(&req)?;
        // The peers' authorities as the journal has them now.
        if let Err(e) = self.state.ca.refresh_peers(SystemTime::now()).await {
            tracing::warn!(error = %e, "re-reading the peers' authorities failed; listing the last known");
        }
        let authorities = self
            .state
            .ca
            .list()
            .await
            .iter()
            .map(authority_pb)
            .collect();
        Ok(Response::new(pb::ListAuthoritiesResponse { authorities }))
    }

    async fn prepare_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::Authority>, Status> {
        check_caller(&req)?;
        let kind = parse_kind(&req.get_ref().kind)?;
        let r = self.state.ca.prepare_now(kind, SystemTime::now()).await?;
        Ok(Response::new(own_authority_pb(r)))
    }

    async fn activate_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::Authority>, Status> {
        check_caller(&req)?;
        let kind = parse_kind(&req.get_ref().kind)?;
        let now = SystemTime::now();
        let r = self.state.ca.activate_now(kind, now).await?;
        self.state.metrics.ca_activations.inc();
        // The server's own SVID moves to the new CA, so that it stays valid
        // once the old one is revoked.
        if kind == AuthorityKind::X509
            && let Err(e) = self.state.renew_server_cert(now)
        {
            tracing::error!(error = %e, "renewing the server SVID failed; the rotation loop will retry");
        }
        Ok(Response::new(own_authority_pb(r)))
    }

    async fn taint_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::Authority>, Status> {
        let (kind, id) = kind_and_id(&req)?;
        let r = self.state.ca.taint(kind, id, SystemTime::now()).await?;
        Ok(Response::new(own_authority_pb(r)))
    }

    async fn revoke_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::Authority>, Status> {
        let (kind, id) = kind_and_id(&req)?;
        let r = self.state.ca.revoke(kind, id, SystemTime::now()).await?;
        Ok(Response::new(own_authority_pb(r)))
    }

    async fn sign_pod_certificate(
        &self,
        req: Request<pb::SignPodCertificateRequest>,
    ) -> Result<Response<pb::SignPodCertificateResponse>, Status> {
        use crate::pod_certificate::{PodCertificateRequest, max_expiration, parse_pod_selectors};
        use sigil_svid::pod_certificate::PodKeyProof;
        check_caller(&req)?;
        let r = req.get_ref();
        let bad = |field: &str, value: &str, e: sigil_types::SpiffeIdError| -> ServerError {
            PodCertRefusal::BadRequest(format!("{field} {value:?} is not a SPIFFE ID: {e}")).into()
        };
        let proof = PodKeyProof::from_fields(
            &r.pkix_public_key,
            &r.proof_of_possession,
            &r.stub_pkcs10_request,
        )
        .map_err(PodCertRefusal::from_key_error)
        .map_err(ServerError::from)?;
        let agent_id: SpiffeId = r
            .agent_id
            .parse()
            .map_err(|e| bad("agent_id", &r.agent_id, e))?;
        let requested: Option<SpiffeId> = match r.requested_spiffe_id.as_str() {
            "" => None,
            s => Some(s.parse().map_err(|e| bad("requested_spiffe_id", s, e))?),
        };
        let selectors = parse_pod_selectors(&r.pod_selectors, &r.pod_uid)?;
        let pod = format!("{}/{}", r.pod_namespace, r.pod_name);
        let signed = self
            .state
            .sign_pod_certificate(&PodCertificateRequest {
                proof,
                pod_uid: &r.pod_uid,
                agent_id: &agent_id,
                pod_selectors: &selectors,
                max_expiration: max_expiration(r.max_expiration_seconds)?,
                requested: requested.as_ref(),
                pod: &pod,
            })
            .await
            .inspect_err(|e| {
                tracing::info!(pod, pod_uid = r.pod_uid, agent = %agent_id, error = %e, "refused a pod certificate");
            })?;
        Ok(Response::new(pb::SignPodCertificateResponse {
            spiffe_id: signed.spiffe_id.to_string(),
            entry_id: signed.entry_id,
            cert_chain: signed.chain,
            not_before: crate::ca::unix(signed.not_before),
            not_after: crate::ca::unix(signed.not_after),
        }))
    }
}

fn parse_kind(s: &str) -> Result<AuthorityKind, ServerError> {
    match s {
        "x509" => Ok(AuthorityKind::X509),
        "jwt" => Ok(AuthorityKind::Jwt),
        "" => Err(RequestError::MissingKind.into()),
        other => Err(RequestError::InvalidKind(other.to_owned()).into()),
    }
}

/// The kind and the ID of the authority `req` names, once its caller is
/// checked: what taint and revoke act on.
fn kind_and_id(req: &Request<pb::AuthorityRequest>) -> Result<(AuthorityKind, &str), ServerError> {
    check_caller(req)?;
    let kind = parse_kind(&req.get_ref().kind)?;
    let id = req.get_ref().id.as_str();
    if id.is_empty() {
        return Err(RequestError::MissingAuthorityId.into());
    }
    Ok((kind, id))
}

fn own_authority_pb(record: AuthorityRecord) -> pb::Authority {
    authority_pb(&AuthorityView {
        record,
        local: true,
    })
}

fn authority_pb(v: &AuthorityView) -> pb::Authority {
    let r = &v.record;
    pb::Authority {
        id: r.id.clone(),
        kind: r.kind.to_string(),
        state: r.state.to_string(),
        tainted: r.tainted,
        not_before: r.not_before,
        not_after: r.not_after,
        created_at: r.created_at,
        owner: r.owner.clone(),
        local: v.local,
        public_key_id: v.public_key_id(),
    }
}

fn parse_td(s: &str) -> Result<TrustDomain, ServerError> {
    if s.is_empty() {
        return Err(RequestError::MissingTrustDomain.into());
    }
    // Accept `spiffe://td` too, as SPIRE's tools print it.
    let name = s.strip_prefix("spiffe://").unwrap_or(s);
    TrustDomain::new(name).map_err(|source| {
        RequestError::TrustDomain {
            value: s.to_owned(),
            source,
        }
        .into()
    })
}

/// The relationship a create or update request describes.
fn relationship_of(r: &pb::FederationRelationship) -> Result<FederationRelationship, ServerError> {
    let profile = BundleEndpointProfile::from_parts(
        &r.bundle_endpoint_profile,
        Some(r.endpoint_spiffe_id.as_str()),
    )
    .map_err(RequestError::Profile)?;
    if r.bundle_endpoint_url.is_empty() {
        return Err(RequestError::MissingBundleEndpointUrl.into());
    }
    Ok(FederationRelationship {
        trust_domain: parse_td(&r.trust_domain)?,
        bundle_endpoint_url: r.bundle_endpoint_url.clone(),
        profile,
        from_config: false,
    })
}

fn relationship_pb(r: &FederationRelationship, s: &RefreshStatus) -> pb::FederationRelationship {
    pb::FederationRelationship {
        trust_domain: r.trust_domain.to_string(),
        bundle_endpoint_url: r.bundle_endpoint_url.clone(),
        bundle_endpoint_profile: r.profile.name().to_owned(),
        endpoint_spiffe_id: r
            .profile
            .endpoint_spiffe_id()
            .map(ToString::to_string)
            .unwrap_or_default(),
        trust_domain_bundle_json: String::new(),
        from_config: r.from_config,
        last_refresh: s.last_refresh.unwrap_or(0),
        next_refresh: s.next_refresh.unwrap_or(0),
        last_error: s.last_error.clone().unwrap_or_default(),
    }
}
