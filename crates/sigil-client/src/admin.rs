//! The server's admin API: entries listed page by page, written in batches
//! of at most [`MAX_BATCH`]; a method per call for the rest (agents, join
//! tokens, bundles, federation, authorities), each answering the message
//! the server sent, or an [`AdminError`] naming the call.

use std::path::Path;
use std::time::Duration;

use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::admin_api_client::AdminApiClient;
use sigil_types::TrustDomain;
use tonic::Status;
use tonic::transport::Channel;

use crate::connect::{ConnectError, UnixConnector};

/// The most items in one batch call (the server's limit).
pub const MAX_BATCH: usize = 500;

/// Why an admin API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The server answered a call with an error.
    #[error("{call}: {:?}: {}", status.code(), status.message())]
    Call {
        /// The method.
        call: &'static str,
        /// The server's answer.
        status: Status,
    },
    /// The server's answer could not be used.
    #[error("{0}")]
    BadAnswer(String),
}

impl AdminError {
    /// The server's answer, when the call failed there.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Call { status, .. } => Some(status),
            Self::BadAnswer(_) => None,
        }
    }
}

/// The metadata key of the reason the server gives for refusing a pod
/// certificate (`SignPodCertificate`).
pub const REFUSAL_KEY: &str = "sigil-refusal";

/// The machine-readable reason of a refused pod certificate
/// (`UnsupportedKeyType`, `NoRegistration`, ...), if `status` carries one.
pub fn refusal_reason(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get(REFUSAL_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|r| !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn call_err(call: &'static str) -> impl FnOnce(Status) -> AdminError {
    move |status| AdminError::Call { call, status }
}

/// The answer of the unary call `call`, or its refusal named after it.
async fn answer<T>(
    call: &'static str,
    sent: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, AdminError> {
    sent.await
        .map(tonic::Response::into_inner)
        .map_err(call_err(call))
}

fn trust_domain_request(td: &TrustDomain) -> pb::TrustDomainRequest {
    pb::TrustDomainRequest {
        trust_domain: td.to_string(),
    }
}

fn agent_request(spiffe_id: String) -> pb::GetAgentRequest {
    pb::GetAgentRequest { spiffe_id }
}

fn authority_request(kind: &str, id: String) -> pb::AuthorityRequest {
    pb::AuthorityRequest {
        kind: kind.to_owned(),
        id,
    }
}

/// A client of the server's admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    inner: AdminApiClient<Channel>,
}

impl AdminClient {
    /// Connects to the admin socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ConnectError> {
        Ok(Self::new(UnixConnector::new(path).connect().await?))
    }

    /// A client on an open channel.
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: AdminApiClient::new(channel),
        }
    }

    /// Accepts answers up to `bytes` long (tonic's default is 4 MiB).
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.inner = self.inner.max_decoding_message_size(bytes);
        self
    }

    /// The generated client, for what has no method here: one batch call
    /// timed alone (the load generator), or a call answered with its bare
    /// status (the Kubernetes controller's federation plan).
    pub fn api(&mut self) -> &mut AdminApiClient<Channel> {
        &mut self.inner
    }

    /// The server's trust domain.
    pub async fn trust_domain(&mut self) -> Result<TrustDomain, AdminError> {
        let r = self.bundle().await?;
        TrustDomain::new(&r.trust_domain)
            .map_err(|e| AdminError::BadAnswer(format!("trust domain {:?}: {e}", r.trust_domain)))
    }

    /// The server's own trust domain and bundle (JSON).
    pub async fn bundle(&mut self) -> Result<pb::GetBundleResponse, AdminError> {
        answer("GetBundle", self.inner.get_bundle(pb::GetBundleRequest {})).await
    }

    /// A single-use join token valid for `ttl` (whole seconds).
    pub async fn create_join_token(
        &mut self,
        ttl: Duration,
    ) -> Result<pb::CreateJoinTokenResponse, AdminError> {
        // Past i64::MAX seconds the server refuses it as too long, as it
        // would the largest value.
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let request = pb::CreateJoinTokenRequest { ttl };
        answer("CreateJoinToken", self.inner.create_join_token(request)).await
    }

    /// Every agent the server knows.
    pub async fn list_agents(&mut self) -> Result<Vec<pb::Agent>, AdminError> {
        let request = pb::ListAgentsRequest {};
        Ok(answer("ListAgents", self.inner.list_agents(request))
            .await?
            .agents)
    }

    /// One agent by SPIFFE ID (as given: the server checks it).
    pub async fn get_agent(&mut self, spiffe_id: String) -> Result<pb::Agent, AdminError> {
        let request = agent_request(spiffe_id);
        answer("GetAgent", self.inner.get_agent(request)).await
    }

    /// Deletes an agent's record; it may attest again. Answers the record.
    pub async fn evict_agent(&mut self, spiffe_id: String) -> Result<pb::Agent, AdminError> {
        let request = agent_request(spiffe_id);
        answer("EvictAgent", self.inner.evict_agent(request)).await
    }

    /// Bans an agent. Answers its record.
    pub async fn ban_agent(&mut self, spiffe_id: String) -> Result<pb::Agent, AdminError> {
        let request = agent_request(spiffe_id);
        answer("BanAgent", self.inner.ban_agent(request)).await
    }

    /// The bundle held for a foreign trust domain.
    pub async fn federated_bundle(
        &mut self,
        td: &TrustDomain,
    ) -> Result<pb::FederatedBundle, AdminError> {
        let request = trust_domain_request(td);
        answer(
            "GetFederatedBundle",
            self.inner.get_federated_bundle(request),
        )
        .await
    }

    /// Every bundle held for a foreign trust domain.
    pub async fn list_federated_bundles(&mut self) -> Result<Vec<pb::FederatedBundle>, AdminError> {
        let request = pb::ListFederatedBundlesRequest {};
        let sent = self.inner.list_federated_bundles(request);
        Ok(answer("ListFederatedBundles", sent).await?.bundles)
    }

    /// Sets the bundle of a foreign trust domain; answers it as stored.
    pub async fn set_federated_bundle(
        &mut self,
        td: &TrustDomain,
        bundle_json: String,
    ) -> Result<pb::FederatedBundle, AdminError> {
        let request = pb::FederatedBundle {
            trust_domain: td.to_string(),
            bundle_json,
        };
        answer(
            "SetFederatedBundle",
            self.inner.set_federated_bundle(request),
        )
        .await
    }

    /// Deletes the bundle of a foreign trust domain; answers it.
    pub async fn delete_federated_bundle(
        &mut self,
        td: &TrustDomain,
    ) -> Result<pb::FederatedBundle, AdminError> {
        let request = trust_domain_request(td);
        let sent = self.inner.delete_federated_bundle(request);
        answer("DeleteFederatedBundle", sent).await
    }

    /// Creates a federation relationship; answers it as stored.
    pub async fn create_federation_relationship(
        &mut self,
        relationship: pb::FederationRelationship,
    ) -> Result<pb::FederationRelationship, AdminError> {
        let sent = self.inner.create_federation_relationship(relationship);
        answer("CreateFederationRelationship", sent).await
    }

    /// Replaces a federation relationship; answers it as stored.
    pub async fn update_federation_relationship(
        &mut self,
        relationship: pb::FederationRelationship,
    ) -> Result<pb::FederationRelationship, AdminError> {
        let sent = self.inner.update_federation_relationship(relationship);
        answer("UpdateFederationRelationship", sent).await
    }

    /// The federation relationship with a trust domain.
    pub async fn federation_relationship(
        &mut self,
        td: &TrustDomain,
    ) -> Result<pb::FederationRelationship, AdminError> {
        let request = trust_domain_request(td);
        let sent = self.inner.get_federation_relationship(request);
        answer("GetFederationRelationship", sent).await
    }

    /// Every federation relationship.
    pub async fn list_federation_relationships(
        &mut self,
    ) -> Result<Vec<pb::FederationRelationship>, AdminError> {
        let request = pb::ListFederationRelationshipsRequest {};
        let sent = self.inner.list_federation_relationships(request);
        Ok(answer("ListFederationRelationships", sent)
            .await?
            .relationships)
    }

    /// Deletes the federation relationship with a trust domain; answers it.
    pub async fn delete_federation_relationship(
        &mut self,
        td: &TrustDomain,
    ) -> Result<pb::FederationRelationship, AdminError> {
        let request = trust_domain_request(td);
        let sent = self.inner.delete_federation_relationship(request);
        answer("DeleteFederationRelationship", sent).await
    }

    /// Fetches a trust domain's bundle from its endpoint now; answers the
    /// bundle held afterwards.
    pub async fn refresh_bundle(
        &mut self,
        td: &TrustDomain,
    ) -> Result<pb::FederatedBundle, AdminError> {
        let request = trust_domain_request(td);
        answer("RefreshBundle", self.inner.refresh_bundle(request)).await
    }

    /// Every signing authority of the trust domain.
    pub async fn list_authorities(&mut self) -> Result<Vec<pb::Authority>, AdminError> {
        let request = pb::ListAuthoritiesRequest {};
        let sent = self.inner.list_authorities(request);
        Ok(answer("ListAuthorities", sent).await?.authorities)
    }

    /// Prepares a new authority of `kind` (`x509` or `jwt`).
    pub async fn prepare_authority(&mut self, kind: &str) -> Result<pb::Authority, AdminError> {
        let request = authority_request(kind, String::new());
        answer("PrepareAuthority", self.inner.prepare_authority(request)).await
    }

    /// Makes the prepared authority of `kind` the one that signs.
    pub async fn activate_authority(&mut self, kind: &str) -> Result<pb::Authority, AdminError> {
        let request = authority_request(kind, String::new());
        answer("ActivateAuthority", self.inner.activate_authority(request)).await
    }

    /// Taints a retired authority: agents replace what it signed.
    pub async fn taint_authority(
        &mut self,
        kind: &str,
        id: String,
    ) -> Result<pb::Authority, AdminError> {
        let request = authority_request(kind, id);
        answer("TaintAuthority", self.inner.taint_authority(request)).await
    }

    /// Removes a tainted authority from the bundle.
    pub async fn revoke_authority(
        &mut self,
        kind: &str,
        id: String,
    ) -> Result<pb::Authority, AdminError> {
        let request = authority_request(kind, id);
        answer("RevokeAuthority", self.inner.revoke_authority(request)).await
    }

    /// One entry by ID.
    pub async fn get_entry(&mut self, id: String) -> Result<pb::Entry, AdminError> {
        Ok(self
            .inner
            .get_entry(pb::GetEntryRequest { id })
            .await
            .map_err(call_err("GetEntry"))?
            .into_inner())
    }

    /// The entries matching `filter`, one page at a time (`filter.page_size`
    /// per page; its `page_token` is ignored).
    pub fn entry_pages(&mut self, filter: pb::ListEntriesRequest) -> EntryPages<'_> {
        EntryPages {
            client: self,
            request: pb::ListEntriesRequest {
                page_token: String::new(),
                ..filter
            },
            done: false,
        }
    }

    /// Every entry matching `filter` (all pages).
    pub async fn list_entries(
        &mut self,
        filter: pb::ListEntriesRequest,
    ) -> Result<Vec<pb::Entry>, AdminError> {
        let mut pages = self.entry_pages(filter);
        let mut all = Vec::new();
        while let Some(page) = pages.next_page().await? {
            all.extend(page);
        }
        Ok(all)
    }

    /// Creates `entries` in batches; the results, in the order given.
    /// Refusals of single entries are results, not errors; a failed call is
    /// an error (the batches before it stay done).
    pub async fn create_entries(
        &mut self,
        entries: Vec<pb::Entry>,
    ) -> Result<Vec<pb::EntryResult>, AdminError> {
        self.write::<pb::BatchCreateEntryRequest>(entries).await
    }

    /// Replaces `entries` (by ID) in batches; results as for [`Self::create_entries`].
    pub async fn update_entries(
        &mut self,
        entries: Vec<pb::Entry>,
    ) -> Result<Vec<pb::EntryResult>, AdminError> {
        self.write::<pb::BatchUpdateEntryRequest>(entries).await
    }

    /// Deletes the entries with these IDs in batches; results as for [`Self::create_entries`].
    pub async fn delete_entries(
        &mut self,
        ids: Vec<String>,
    ) -> Result<Vec<pb::EntryResult>, AdminError> {
        self.write::<pb::BatchDeleteEntryRequest>(ids).await
    }

    /// Deletes the entries with these IDs in one call, as given: more IDs
    /// than [`MAX_BATCH`] are refused whole rather than deleted in parts.
    pub async fn delete_entries_in_one_call(
        &mut self,
        ids: Vec<String>,
    ) -> Result<Vec<pb::EntryResult>, AdminError> {
        let request = pb::BatchDeleteEntryRequest { ids };
        let sent = self.inner.batch_delete_entry(request);
        Ok(answer("BatchDeleteEntry", sent).await?.results)
    }

    /// Signs the X509-SVID of a Kubernetes PodCertificateRequest. A
    /// refusal is an [`AdminError::Call`] whose status carries the reason
    /// ([`refusal_reason`]).
    pub async fn sign_pod_certificate(
        &mut self,
        request: pb::SignPodCertificateRequest,
    ) -> Result<pb::SignPodCertificateResponse, AdminError> {
        let sent = self.inner.sign_pod_certificate(request);
        answer("SignPodCertificate", sent).await
    }

    async fn write<B: BatchWrite>(
        &mut self,
        items: Vec<B::Item>,
    ) -> Result<Vec<pb::EntryResult>, AdminError> {
        let mut out = Vec::with_capacity(items.len());
        for batch in batches(items) {
            let r = B::from_items(batch)
                .send(&mut self.inner)
                .await
                .map_err(call_err(B::CALL))?;
            out.extend(r.into_inner().results);
        }
        Ok(out)
    }
}

/// One of the batch write calls.
trait BatchWrite: Sized + Send {
    /// What one batch holds.
    type Item: Send;
    /// The method's name, for errors.
    const CALL: &'static str;
    /// The request for one batch.
    fn from_items(items: Vec<Self::Item>) -> Self;
    /// Sends the request.
    fn send(
        self,
        api: &mut AdminApiClient<Channel>,
    ) -> impl Future<Output = Result<tonic::Response<pb::BatchEntryResponse>, Status>> + Send;
}

/// Implements [`BatchWrite`] for a request: its item type and field, its method.
macro_rules! batch_write {
    ($request:ty, $item:ty, $field:ident, $method:ident, $call:literal) => {
        impl BatchWrite for $request {
            type Item = $item;
            const CALL: &'static str = $call;
            fn from_items($field: Vec<$item>) -> Self {
                Self { $field }
            }
            fn send(
                self,
                api: &mut AdminApiClient<Channel>,
            ) -> impl Future<Output = Result<tonic::Response<pb::BatchEntryResponse>, Status>> + Send
            {
                api.$method(self)
            }
        }
    };
}

batch_write!(
    pb::BatchCreateEntryRequest,
    pb::Entry,
    entries,
    batch_create_entry,
    "BatchCreateEntry"
);
batch_write!(
    pb::BatchUpdateEntryRequest,
    pb::Entry,
    entries,
    batch_update_entry,
    "BatchUpdateEntry"
);
batch_write!(
    pb::BatchDeleteEntryRequest,
    String,
    ids,
    batch_delete_entry,
    "BatchDeleteEntry"
);

/// `items` in order, at most [`MAX_BATCH`] at a time, moved rather than copied.
fn batches<T>(items: Vec<T>) -> impl Iterator<Item = Vec<T>> {
    let mut items = items.into_iter().peekable();
    std::iter::from_fn(move || {
        items.peek()?;
        Some(items.by_ref().take(MAX_BATCH).collect())
    })
}

/// A listing of entries read page by page ([`AdminClient::entry_pages`]).
#[derive(Debug)]
pub struct EntryPages<'a> {
    client: &'a mut AdminClient,
    request: pb::ListEntriesRequest,
    done: bool,
}

impl EntryPages<'_> {
    /// The next page; `None` after the last one.
    pub async fn next_page(&mut self) -> Result<Option<Vec<pb::Entry>>, AdminError> {
        if self.done {
            return Ok(None);
        }
        let r = self
            .client
            .inner
            .list_entries(self.request.clone())
            .await
            .map_err(call_err("ListEntries"))?
            .into_inner();
        if r.next_page_token.is_empty() {
            self.done = true;
        }
        self.request.page_token = r.next_page_token;
        Ok(Some(r.entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_and_the_limit() {
        let sizes: Vec<usize> = batches((0..2 * MAX_BATCH + 7).collect::<Vec<_>>())
            .map(|b| b.len())
            .collect();
        assert_eq!(sizes, vec![MAX_BATCH, MAX_BATCH, 7]);
        let flat: Vec<usize> = batches((0..1201).collect()).flatten().collect();
        assert_eq!(flat, (0..1201).collect::<Vec<_>>());
        assert_eq!(batches(Vec::<u8>::new()).count(), 0);
    }
}
