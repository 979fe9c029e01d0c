//! The server's record of an attested agent (a node).

use serde::{Deserialize, Serialize};

use crate::selector::Selectors;
use crate::spiffe_id::SpiffeId;

/// What the server knows about one attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's SPIFFE ID, `spiffe://<td>/sigil/agent/<method>/...`.
    pub spiffe_id: SpiffeId,
    /// The node attestation method, e.g. `join_token`.
    pub attestation_type: String,
    /// Node selectors derived at attestation.
    pub selectors: Selectors,
    /// Serial number (hex) of the agent's current SVID; older ones are refused.
    pub serial: String,
    /// Serial (hex) of the SVID the current one replaced, still accepted until
    /// the agent first uses the new one, so a renewal whose answer was lost
    /// does not lock the agent out. Empty when none.
    #[serde(default)]
    pub previous_serial: String,
    /// Unix time at which the current agent SVID expires.
    pub expires_at: i64,
    /// A banned agent may not renew, sync, sign or attest again.
    pub banned: bool,
    /// Whether the agent may attest again with fresh evidence (join tokens: no).
    pub can_reattest: bool,
    /// Unix time of first attestation.
    pub created_at: i64,
    /// Unix time of the last attestation or renewal.
    pub updated_at: i64,
}
