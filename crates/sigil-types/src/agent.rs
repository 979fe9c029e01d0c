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
    /// Whether a call authenticated with `serial` has been seen: from then
    /// on `previous_serial` is refused, so a copy of the old SVID cannot
    /// keep renewing alongside the real agent.
    #[serde(default)]
    pub serial_used: bool,
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

/// How an SVID serial presented by an agent stands against its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialStatus {
    /// The serial of the current SVID.
    Current,
    /// The serial of the SVID the current one replaced, while the current
    /// one has not been used yet: accepted (a renewal whose answer was lost).
    Previous,
    /// The serial of the replaced SVID after the current one was used: only
    /// a copy of the old SVID can present it, so it is refused as possible
    /// theft.
    Superseded,
    /// Any other serial (empty, or an SVID two or more renewals old): refused.
    Unknown,
}

impl SerialStatus {
    /// Whether a call presenting this serial is accepted.
    pub fn is_accepted(self) -> bool {
        matches!(self, Self::Current | Self::Previous)
    }
}

impl AgentRecord {
    /// Where `serial` (hex, as in the record) stands. The one rule for
    /// which agent SVIDs are accepted: the current one, and the one before
    /// only until the current one is first used.
    pub fn serial_status(&self, serial: &str) -> SerialStatus {
        if serial.is_empty() {
            SerialStatus::Unknown
        } else if serial == self.serial {
            SerialStatus::Current
        } else if serial == self.previous_serial {
            if self.serial_used {
                SerialStatus::Superseded
            } else {
                SerialStatus::Previous
            }
        } else {
            SerialStatus::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_serial_is_accepted_until_the_current_one_is_used() {
        let mut a = AgentRecord {
            spiffe_id: "spiffe://td/sigil/agent/join_token/x".parse().unwrap(),
            attestation_type: "join_token".into(),
            selectors: Selectors::new(),
            serial: "02".into(),
            previous_serial: "01".into(),
            serial_used: false,
            expires_at: 0,
            banned: false,
            can_reattest: false,
            created_at: 0,
            updated_at: 0,
        };
        assert_eq!(a.serial_status("02"), SerialStatus::Current);
        assert_eq!(a.serial_status("01"), SerialStatus::Previous);
        assert_eq!(a.serial_status("00"), SerialStatus::Unknown);
        assert_eq!(a.serial_status(""), SerialStatus::Unknown);
        a.serial_used = true;
        assert_eq!(a.serial_status("02"), SerialStatus::Current);
        assert_eq!(a.serial_status("01"), SerialStatus::Superseded);
        assert!(!SerialStatus::Superseded.is_accepted());
        a.previous_serial.clear();
        a.serial_used = false;
        assert_eq!(a.serial_status(""), SerialStatus::Unknown);
    }
}
