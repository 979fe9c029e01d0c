//! Every request message of sigil's gRPC APIs (the SPIFFE Workload API, the
//! server's AgentApi and AdminApi, and Envoy SDS, plain and delta) decoded from arbitrary
//! bytes: decoding never panics, a decoded message re-encodes to bytes that
//! decode to the same message, and the converters that take wire entries
//! never panic.

use prost::Message;
use sigil_proto::envoy::service::discovery::v3 as xds;
use sigil_proto::server::v1 as pb;
use sigil_proto::workload as wl;
use sigil_types::EntryId;

/// Decodes `data` as `M`; a decoded message must re-encode to bytes that
/// decode to an equal message of the same encoded length. (Equal as
/// messages or, failing that, as bytes: map fields are `HashMap`s, whose
/// encoding order varies, and Envoy's metadata may hold a NaN `double`.)
fn round_trip<M: Message + Default + PartialEq>(data: &[u8]) -> Option<M> {
    let msg = M::decode(data).ok()?;
    let bytes = msg.encode_to_vec();
    let again = M::decode(bytes.as_slice());
    assert!(again.is_ok(), "a re-encoded message does not decode");
    if let Ok(again) = again {
        assert_eq!(again.encoded_len(), bytes.len());
        assert!(again == msg || again.encode_to_vec() == bytes);
    }
    Some(msg)
}

fn convert(entries: &[pb::Entry]) {
    let Ok(default_id) = "fuzz-default".parse::<EntryId>() else {
        return;
    };
    for e in entries {
        let _ = sigil_proto::entry_from_proto(e, || default_id.clone());
    }
}

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 28 {
        0 => drop(round_trip::<wl::X509svidRequest>(body)),
        1 => drop(round_trip::<wl::X509BundlesRequest>(body)),
        2 => drop(round_trip::<wl::JwtsvidRequest>(body)),
        3 => drop(round_trip::<wl::JwtBundlesRequest>(body)),
        4 => drop(round_trip::<wl::ValidateJwtsvidRequest>(body)),
        5 => drop(round_trip::<pb::GetBundleRequest>(body)),
        6 => drop(round_trip::<pb::AttestJoinTokenRequest>(body)),
        7 => drop(round_trip::<pb::AttestPsatRequest>(body)),
        8 => drop(round_trip::<pb::RenewAgentRequest>(body)),
        9 => drop(round_trip::<pb::SyncRequest>(body)),
        10 => drop(round_trip::<pb::BatchNewX509svidRequest>(body)),
        11 => drop(round_trip::<pb::NewJwtsvidRequest>(body)),
        12 => {
            if let Some(m) = round_trip::<pb::BatchCreateEntryRequest>(body) {
                convert(&m.entries);
            }
        }
        13 => {
            if let Some(m) = round_trip::<pb::BatchUpdateEntryRequest>(body) {
                convert(&m.entries);
            }
        }
        14 => drop(round_trip::<pb::BatchDeleteEntryRequest>(body)),
        15 => drop(round_trip::<pb::GetEntryRequest>(body)),
        16 => drop(round_trip::<pb::ListEntriesRequest>(body)),
        17 => drop(round_trip::<pb::CreateJoinTokenRequest>(body)),
        18 => drop(round_trip::<pb::ListAgentsRequest>(body)),
        19 => drop(round_trip::<pb::GetAgentRequest>(body)),
        20 => drop(round_trip::<pb::TrustDomainRequest>(body)),
        21 => drop(round_trip::<pb::FederatedBundle>(body)),
        22 => drop(round_trip::<pb::ListFederatedBundlesRequest>(body)),
        23 => drop(round_trip::<pb::FederationRelationship>(body)),
        24 => drop(round_trip::<pb::ListFederationRelationshipsRequest>(body)),
        25 => {
            if let Some(e) = round_trip::<pb::Entry>(body) {
                convert(std::slice::from_ref(&e));
            }
        }
        26 => drop(round_trip::<xds::DiscoveryRequest>(body)),
        _ => drop(round_trip::<xds::DeltaDiscoveryRequest>(body)),
    }
}
