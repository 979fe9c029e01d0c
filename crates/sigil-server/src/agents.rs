//! The attested agents, in memory: what authenticates every agent call.
//!
//! The change follower keeps it current (an `AgentChanged` re-reads the
//! record, an `AgentDeleted` drops it) before the index publishes the change,
//! so a sync stream that hears of a change finds the new record here. Only
//! the follower writes: a write of this server is seen here once it has
//! settled, which keeps an eviction or a ban made by another server from
//! being undone by a stale local copy. Because calls are authenticated from
//! memory, agents keep getting workload SVIDs signed while the database is
//! briefly unreachable.

use std::collections::HashMap;
use std::sync::RwLock;

use sigil_store::{Store, StoreError};
use sigil_types::{AgentRecord, SpiffeId};

/// Agent records by SPIFFE ID.
#[derive(Debug, Default)]
pub struct AgentRecords {
    map: RwLock<HashMap<SpiffeId, AgentRecord>>,
}

impl AgentRecords {
    /// Starts from every record of the store.
    pub async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let map = store
            .list_agents()
            .await?
            .into_iter()
            .map(|a| (a.spiffe_id.clone(), a))
            .collect();
        Ok(Self {
            map: RwLock::new(map),
        })
    }

    /// The record of agent `id`, as of the last change applied.
    pub fn get(&self, id: &SpiffeId) -> Option<AgentRecord> {
        self.map.read().ok()?.get(id).cloned()
    }

    /// Re-reads agent `id` from the store after a change of it.
    pub(crate) async fn reload(&self, store: &dyn Store, id: &SpiffeId) -> Result<(), StoreError> {
        let record = store.get_agent(id).await?;
        self.set(id, record);
        Ok(())
    }

    /// Drops agent `id` after its deletion.
    pub(crate) fn remove(&self, id: &SpiffeId) {
        self.set(id, None);
    }

    fn set(&self, id: &SpiffeId, record: Option<AgentRecord>) {
        // A poisoned lock means a panic while writing a map of plain
        // records; the map itself is still consistent.
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        match record {
            Some(r) => map.insert(id.clone(), r),
            None => map.remove(id),
        };
    }
}
