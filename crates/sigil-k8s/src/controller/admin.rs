//! The server's admin API as the controller uses it: the trust domain, all
//! entries (paged), and a [`Plan`] applied in batches.

use std::path::Path;

use hyper_util::rt::TokioIo;
use sigil_proto::convert::entry_from_proto;
use sigil_proto::server::v1 as pb;
use sigil_proto::server::v1::admin_api_client::AdminApiClient;
use sigil_types::{Entry, EntryId, TrustDomain};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use super::ControllerError;
use super::federation::FederationPlan;
use super::reconcile::Plan;

/// The most items in one batch call (the server's limit).
pub const MAX_BATCH: usize = 500;
/// Entries asked for per `ListEntries` page.
const PAGE_SIZE: u32 = 2000;

/// A connection to the server's admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    inner: AdminApiClient<Channel>,
}

/// What applying a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Entries created.
    pub created: usize,
    /// Entries updated.
    pub updated: usize,
    /// Entries deleted.
    pub deleted: usize,
    /// Creates and updates the server refused, with its reason.
    pub failures: Vec<(EntryId, String)>,
    /// Deletes the server refused, with its reason.
    pub delete_failures: Vec<(EntryId, String)>,
}

fn admin_err(call: &'static str) -> impl FnOnce(tonic::Status) -> ControllerError {
    move |s| ControllerError::Admin {
        call,
        status: format!("{:?}: {}", s.code(), s.message()),
    }
}

impl AdminClient {
    /// Connects to the admin socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ControllerError> {
        let p = path.to_owned();
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            }))
            .await
            .map_err(|e| ControllerError::Connect {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner: AdminApiClient::new(channel),
        })
    }

    /// The server's trust domain.
    pub async fn trust_domain(&mut self) -> Result<TrustDomain, ControllerError> {
        let r = self
            .inner
            .get_bundle(pb::GetBundleRequest {})
            .await
            .map_err(admin_err("GetBundle"))?
            .into_inner();
        TrustDomain::new(&r.trust_domain).map_err(|e| {
            ControllerError::BadAnswer(format!("trust domain {:?}: {e}", r.trust_domain))
        })
    }

    /// Every entry on the server whose ID satisfies `keep` (all pages).
    pub async fn list_entries(
        &mut self,
        keep: impl Fn(&EntryId) -> bool,
    ) -> Result<Vec<Entry>, ControllerError> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let r = self
                .inner
                .list_entries(pb::ListEntriesRequest {
                    page_size: PAGE_SIZE,
                    page_token: page_token.clone(),
                    ..Default::default()
                })
                .await
                .map_err(admin_err("ListEntries"))?
                .into_inner();
            for e in &r.entries {
                let Ok(id) = e.id.parse::<EntryId>() else {
                    continue;
                };
                if !keep(&id) {
                    continue;
                }
                let entry = entry_from_proto(e, || id.clone())
                    .map_err(|err| ControllerError::BadAnswer(format!("entry {}: {err}", e.id)))?;
                out.push(entry);
            }
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = r.next_page_token;
        }
    }

    /// Every federation relationship on the server.
    pub async fn list_federation_relationships(
        &mut self,
    ) -> Result<Vec<pb::FederationRelationship>, ControllerError> {
        Ok(self
            .inner
            .list_federation_relationships(pb::ListFederationRelationshipsRequest {})
            .await
            .map_err(admin_err("ListFederationRelationships"))?
            .into_inner()
            .relationships)
    }

    /// Applies a federation plan; returns, per trust domain, the server's
    /// refusal of that change (a refusal is not an error of the whole call).
    pub async fn apply_federation(
        &mut self,
        plan: &FederationPlan,
    ) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        for r in &plan.create {
            let res = self.inner.create_federation_relationship(r.clone()).await;
            out.push((
                r.trust_domain.clone(),
                res.err().map(|s| s.message().to_owned()),
            ));
        }
        for r in &plan.update {
            let res = self.inner.update_federation_relationship(r.clone()).await;
            out.push((
                r.trust_domain.clone(),
                res.err().map(|s| s.message().to_owned()),
            ));
        }
        for td in &plan.delete {
            let res = self
                .inner
                .delete_federation_relationship(pb::TrustDomainRequest {
                    trust_domain: td.to_string(),
                })
                .await;
            out.push((td.to_string(), res.err().map(|s| s.message().to_owned())));
        }
        out
    }

    /// Creates, then updates, then deletes, in batches of at most
    /// [`MAX_BATCH`]. Refusals of single entries are reported, not errors;
    /// a failed call is an error (what was done before it stays done).
    pub async fn apply(&mut self, plan: &Plan) -> Result<ApplyReport, ControllerError> {
        let mut report = ApplyReport::default();
        for chunk in plan.create.chunks(MAX_BATCH) {
            let r = self
                .inner
                .batch_create_entry(pb::BatchCreateEntryRequest {
                    entries: chunk.iter().map(pb::Entry::from).collect(),
                })
                .await
                .map_err(admin_err("BatchCreateEntry"))?
                .into_inner();
            tally(
                chunk.iter().map(|e| &e.id),
                r,
                &mut report.created,
                &mut report.failures,
            );
        }
        for chunk in plan.update.chunks(MAX_BATCH) {
            let r = self
                .inner
                .batch_update_entry(pb::BatchUpdateEntryRequest {
                    entries: chunk.iter().map(pb::Entry::from).collect(),
                })
                .await
                .map_err(admin_err("BatchUpdateEntry"))?
                .into_inner();
            tally(
                chunk.iter().map(|e| &e.id),
                r,
                &mut report.updated,
                &mut report.failures,
            );
        }
        for chunk in plan.delete.chunks(MAX_BATCH) {
            let r = self
                .inner
                .batch_delete_entry(pb::BatchDeleteEntryRequest {
                    ids: chunk.iter().map(ToString::to_string).collect(),
                })
                .await
                .map_err(admin_err("BatchDeleteEntry"))?
                .into_inner();
            tally(
                chunk.iter(),
                r,
                &mut report.deleted,
                &mut report.delete_failures,
            );
        }
        Ok(report)
    }
}

/// Counts the successes of one batch answer and collects its refusals; the
/// results come in the order of the request.
fn tally<'a>(
    ids: impl Iterator<Item = &'a EntryId>,
    r: pb::BatchEntryResponse,
    ok: &mut usize,
    failures: &mut Vec<(EntryId, String)>,
) {
    for (id, result) in ids.zip(r.results) {
        if result.error.is_empty() {
            *ok += 1;
        } else {
            failures.push((id.clone(), result.error));
        }
    }
}
