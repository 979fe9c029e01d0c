//! The server's admin API as the controller uses it: the trust domain, all
//! entries (paged), and a [`Plan`] applied in batches, through
//! [`sigil_client::AdminClient`].

use std::path::Path;

use sigil_client::AdminError;
use sigil_proto::convert::entry_from_proto;
use sigil_proto::server::v1 as pb;
use sigil_types::{Entry, EntryId, TrustDomain};

use super::ControllerError;
use super::federation::FederationPlan;
use super::reconcile::Plan;

/// The most items in one batch call (the server's limit).
pub use sigil_client::admin::MAX_BATCH;
/// Entries asked for per `ListEntries` page.
const PAGE_SIZE: u32 = 2000;

/// A connection to the server's admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    inner: sigil_client::AdminClient,
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

impl From<AdminError> for ControllerError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Call { call, status } => admin_err(call)(status),
            other => ControllerError::BadAnswer(other.to_string()),
        }
    }
}

impl AdminClient {
    /// Connects to the admin socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ControllerError> {
        let inner = sigil_client::AdminClient::connect(path)
            .await
            .map_err(|e| ControllerError::Connect {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self { inner })
    }

    /// The server's trust domain.
    pub async fn trust_domain(&mut self) -> Result<TrustDomain, ControllerError> {
        Ok(self.inner.trust_domain().await?)
    }

    /// Every entry on the server whose ID satisfies `keep` (all pages).
    pub async fn list_entries(
        &mut self,
        keep: impl Fn(&EntryId) -> bool,
    ) -> Result<Vec<Entry>, ControllerError> {
        self.list_entries_with_prefix("", keep).await
    }

    /// Every entry on the server whose ID starts with `id_prefix` (the
    /// server filters: it reads only that range of its ID-ordered entries)
    /// and satisfies `keep`, all pages.
    pub async fn list_entries_with_prefix(
        &mut self,
        id_prefix: &str,
        keep: impl Fn(&EntryId) -> bool,
    ) -> Result<Vec<Entry>, ControllerError> {
        let mut out = Vec::new();
        let mut pages = self.inner.entry_pages(pb::ListEntriesRequest {
            page_size: PAGE_SIZE,
            id_prefix: id_prefix.to_owned(),
            ..Default::default()
        });
        while let Some(page) = pages.next_page().await? {
            for e in &page {
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
        }
        Ok(out)
    }

    /// Every federation relationship on the server.
    pub async fn list_federation_relationships(
        &mut self,
    ) -> Result<Vec<pb::FederationRelationship>, ControllerError> {
        Ok(self
            .inner
            .api()
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
            let res = self
                .inner
                .api()
                .create_federation_relationship(r.clone())
                .await;
            out.push((
                r.trust_domain.clone(),
                res.err().map(|s| s.message().to_owned()),
            ));
        }
        for r in &plan.update {
            let res = self
                .inner
                .api()
                .update_federation_relationship(r.clone())
                .await;
            out.push((
                r.trust_domain.clone(),
                res.err().map(|s| s.message().to_owned()),
            ));
        }
        for td in &plan.delete {
            let res = self
                .inner
                .api()
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
        let created = self
            .inner
            .create_entries(plan.create.iter().map(pb::Entry::from).collect())
            .await?;
        tally(
            plan.create.iter().map(|e| &e.id),
            created,
            &mut report.created,
            &mut report.failures,
        );
        let updated = self
            .inner
            .update_entries(plan.update.iter().map(pb::Entry::from).collect())
            .await?;
        tally(
            plan.update.iter().map(|e| &e.id),
            updated,
            &mut report.updated,
            &mut report.failures,
        );
        let deleted = self
            .inner
            .delete_entries(plan.delete.iter().map(ToString::to_string).collect())
            .await?;
        tally(
            plan.delete.iter(),
            deleted,
            &mut report.deleted,
            &mut report.delete_failures,
        );
        Ok(report)
    }
}

/// Counts the successes of batch answers and collects their refusals; the
/// results come in the order of the request.
fn tally<'a>(
    ids: impl Iterator<Item = &'a EntryId>,
    results: Vec<pb::EntryResult>,
    ok: &mut usize,
    failures: &mut Vec<(EntryId, String)>,
) {
    for (id, result) in ids.zip(results) {
        if result.error.is_empty() {
            *ok += 1;
        } else {
            failures.push((id.clone(), result.error));
        }
    }
}
