//! The server's admin API: entries listed page by page, written in batches
//! of at most [`MAX_BATCH`], and the trust domain; the other calls through
//! [`AdminClient::api`].

use std::path::Path;

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

fn call_err(call: &'static str) -> impl FnOnce(Status) -> AdminError {
    move |status| AdminError::Call { call, status }
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

    /// The generated client, for the calls without a method here (bundles,
    /// federation, authorities, agents, join tokens).
    pub fn api(&mut self) -> &mut AdminApiClient<Channel> {
        &mut self.inner
    }

    /// The server's trust domain.
    pub async fn trust_domain(&mut self) -> Result<TrustDomain, AdminError> {
        let r = self
            .inner
            .get_bundle(pb::GetBundleRequest {})
            .await
            .map_err(call_err("GetBundle"))?
            .into_inner();
        TrustDomain::new(&r.trust_domain)
            .map_err(|e| AdminError::BadAnswer(format!("trust domain {:?}: {e}", r.trust_domain)))
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
