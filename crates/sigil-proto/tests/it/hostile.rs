//! Hostile protobuf input (the proptest versions of
//! `fuzz/fuzz_targets/{proto,entry_proto}.rs`): every request message of the
//! Workload API, the server's AgentApi and AdminApi, and Envoy SDS decoded
//! from arbitrary bytes and from one-byte edits of a valid encoding; and
//! registration entries built from arbitrary wire fields, converted and
//! validated. Nothing panics, decoded messages re-encode stably, conversion
//! errors name the field, and a converted entry converts back to itself.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

use proptest::prelude::*;
use prost::Message;
use sigil_proto::envoy::service::discovery::v3 as xds;
use sigil_proto::server::v1 as pb;
use sigil_proto::workload as wl;
use sigil_proto::{ConvertError, entry_from_proto};
use sigil_types::{EntryId, TrustDomain};

/// Cases per property: bounded so that CI stays fast.
const CASES: u32 = 256;

/// One edit of `sample`: flip (xor with a non-zero byte), insert or delete a
/// byte at `pos` (modulo the length).
fn mutate(sample: &[u8], op: u8, pos: usize, value: u8) -> Vec<u8> {
    let mut out = sample.to_vec();
    let pos = pos % out.len().max(1);
    match op % 3 {
        0 => {
            if let Some(b) = out.get_mut(pos) {
                *b ^= value.max(1);
            }
        }
        1 => out.insert(pos.min(out.len()), value),
        _ => {
            if pos < out.len() {
                out.remove(pos);
            }
        }
    }
    out
}

/// Decodes `bytes` as `M`. A decoded message must re-encode to bytes that
/// decode to an equal message of the same encoded length (equal as messages
/// or, failing that, as bytes: map fields are `HashMap`s, whose encoding
/// order varies, and Envoy's metadata may hold a NaN `double`). Returns the
/// message.
fn decode_stably<M: Message + Default + PartialEq>(bytes: &[u8]) -> Option<M> {
    let msg = M::decode(bytes).ok()?;
    let encoded = msg.encode_to_vec();
    let again = M::decode(encoded.as_slice()).unwrap();
    let name = std::any::type_name::<M>();
    assert_eq!(again.encoded_len(), encoded.len(), "{name} changes size");
    assert!(
        again == msg || again.encode_to_vec() == encoded,
        "{name} changes across a round trip"
    );
    Some(msg)
}

/// Decodes `bytes` as every request message of every API, converting the
/// wire entries found on the way.
fn decode_as_every_request(bytes: &[u8]) {
    decode_stably::<wl::X509svidRequest>(bytes);
    decode_stably::<wl::X509BundlesRequest>(bytes);
    decode_stably::<wl::JwtsvidRequest>(bytes);
    decode_stably::<wl::JwtBundlesRequest>(bytes);
    decode_stably::<wl::ValidateJwtsvidRequest>(bytes);
    decode_stably::<pb::GetBundleRequest>(bytes);
    decode_stably::<pb::AttestJoinTokenRequest>(bytes);
    decode_stably::<pb::AttestPsatRequest>(bytes);
    decode_stably::<pb::RenewAgentRequest>(bytes);
    decode_stably::<pb::SyncRequest>(bytes);
    decode_stably::<pb::BatchNewX509svidRequest>(bytes);
    decode_stably::<pb::NewJwtsvidRequest>(bytes);
    decode_stably::<pb::BatchDeleteEntryRequest>(bytes);
    decode_stably::<pb::GetEntryRequest>(bytes);
    decode_stably::<pb::ListEntriesRequest>(bytes);
    decode_stably::<pb::CreateJoinTokenRequest>(bytes);
    decode_stably::<pb::ListAgentsRequest>(bytes);
    decode_stably::<pb::GetAgentRequest>(bytes);
    decode_stably::<pb::TrustDomainRequest>(bytes);
    decode_stably::<pb::FederatedBundle>(bytes);
    decode_stably::<pb::ListFederatedBundlesRequest>(bytes);
    decode_stably::<pb::FederationRelationship>(bytes);
    decode_stably::<pb::ListFederationRelationshipsRequest>(bytes);
    decode_stably::<xds::DiscoveryRequest>(bytes);
    decode_stably::<xds::DeltaDiscoveryRequest>(bytes);
    let batches = [
        decode_stably::<pb::BatchCreateEntryRequest>(bytes).map(|m| m.entries),
        decode_stably::<pb::BatchUpdateEntryRequest>(bytes).map(|m| m.entries),
        decode_stably::<pb::Entry>(bytes).map(|e| vec![e]),
    ];
    for entry in batches.iter().flatten().flatten() {
        convert_and_validate(entry);
    }
}

fn default_id() -> EntryId {
    "assigned-by-server".parse().unwrap()
}

/// Converts a wire entry and validates the result; a converted entry must
/// convert back to a wire entry that converts to the same entry.
fn convert_and_validate(wire: &pb::Entry) {
    match entry_from_proto(wire, default_id) {
        Ok(entry) => {
            let td = TrustDomain::new("example.org").unwrap();
            if let Err(e) = entry.validate(&td) {
                assert!(!e.to_string().is_empty());
            }
            if entry.validate(&entry.spiffe_id.trust_domain()).is_ok() {
                assert!(!entry.selectors.is_empty());
                assert!(!entry.spiffe_id.is_root() && !entry.parent_id.is_root());
            }
            let back = pb::Entry::from(&entry);
            let again = entry_from_proto(&back, default_id).unwrap();
            assert_eq!(again, entry, "entry changed across a wire round trip");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// A valid sample of each request message with content, encoded.
fn samples() -> Vec<Vec<u8>> {
    let entry = pb::Entry {
        spiffe_id: "spiffe://example.org/ns/web".to_owned(),
        parent_id: "spiffe://example.org/agent/node-1".to_owned(),
        selectors: vec!["unix:uid:1000".to_owned(), "k8s:ns:web".to_owned()],
        x509_svid_ttl: 3600,
        dns_names: vec!["web.example.org".to_owned()],
        federates_with: vec!["partner.org".to_owned()],
        attributes: vec!["namespace".to_owned()],
        hint: "web".to_owned(),
        ..Default::default()
    };
    vec![
        entry.encode_to_vec(),
        pb::BatchCreateEntryRequest {
            entries: vec![entry.clone(), entry],
        }
        .encode_to_vec(),
        wl::JwtsvidRequest {
            audience: vec!["db".to_owned()],
            spiffe_id: "spiffe://example.org/ns/web".to_owned(),
        }
        .encode_to_vec(),
        wl::ValidateJwtsvidRequest {
            audience: "db".to_owned(),
            svid: "eyJhbGciOiJFUzI1NiJ9.e30.c2ln".to_owned(),
        }
        .encode_to_vec(),
        xds::DiscoveryRequest {
            version_info: "1".to_owned(),
            resource_names: vec!["default".to_owned(), "ROOTCA".to_owned()],
            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
                .to_owned(),
            response_nonce: "n".to_owned(),
            ..Default::default()
        }
        .encode_to_vec(),
    ]
}

/// Wire entries whose fields are near-valid as often as hostile.
fn wire_entry() -> impl Strategy<Value = pb::Entry> {
    let id = prop_oneof![
        "spiffe://example.org(/[a-z0-9.]{1,6}){0,3}",
        "spiffe://[a-z.]{1,10}/[a-zA-Z0-9/._%-]{0,12}",
        any::<String>(),
    ];
    let selector = prop_oneof!["[a-z]{1,5}:[a-z0-9:]{1,8}", "[ -~]{0,10}"];
    let td = prop_oneof!["[a-z.]{1,10}", "spiffe://[a-z.]{1,10}", any::<String>()];
    let ttl = prop_oneof![Just(0i64), -5i64..5, any::<i64>()];
    (
        (
            prop_oneof![Just(String::new()), "[a-zA-Z0-9._-]{1,12}", any::<String>()],
            id.clone(),
            id,
            proptest::collection::vec(selector, 0..5),
            ttl.clone(),
            ttl.clone(),
        ),
        (
            proptest::collection::vec("[a-z0-9.*-]{0,12}", 0..3),
            proptest::collection::vec(td, 0..3),
            proptest::collection::vec("[a-z_]{1,16}", 0..3),
            any::<(bool, bool)>(),
            "[ -~]{0,20}",
            ttl,
            any::<(u64, i64)>(),
        ),
    )
        .prop_map(
            |(
                (id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl),
                (
                    dns_names,
                    federates_with,
                    attributes,
                    (admin, downstream),
                    hint,
                    expires_at,
                    (revision, created_at),
                ),
            )| pb::Entry {
                id,
                spiffe_id,
                parent_id,
                selectors,
                x509_svid_ttl,
                jwt_svid_ttl,
                dns_names,
                federates_with,
                admin,
                downstream,
                hint,
                expires_at,
                revision,
                created_at,
                attributes,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn requests_decode_from_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        decode_as_every_request(&bytes);
    }

    #[test]
    fn requests_decode_from_edited_samples(
        which in any::<prop::sample::Index>(),
        op in any::<u8>(),
        pos in any::<usize>(),
        value in any::<u8>(),
    ) {
        let samples = samples();
        let sample = which.get(&samples);
        decode_as_every_request(&mutate(sample, op, pos, value));
    }

    #[test]
    fn wire_entries_convert_or_name_the_bad_field(wire in wire_entry()) {
        convert_and_validate(&wire);
    }
}

#[test]
fn each_conversion_error_names_its_field() {
    let good = pb::Entry {
        spiffe_id: "spiffe://example.org/ns/web".to_owned(),
        parent_id: "spiffe://example.org/agent/node-1".to_owned(),
        selectors: vec!["unix:uid:1000".to_owned()],
        ..Default::default()
    };
    assert!(entry_from_proto(&good, default_id).is_ok());
    let bad_parent = pb::Entry {
        parent_id: "spiffe://Example.org/agent".to_owned(),
        ..good.clone()
    };
    let err = entry_from_proto(&bad_parent, default_id).unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::BadSpiffeId {
                field: "parent_id",
                ..
            }
        ),
        "{err:?}"
    );
    let negative = pb::Entry {
        jwt_svid_ttl: -1,
        ..good
    };
    let err = entry_from_proto(&negative, default_id).unwrap_err();
    assert!(err.to_string().contains("jwt_svid_ttl"), "{err}");
}

/// Regression (fuzz target `proto`, its one crash): a map field with two
/// entries re-encodes in `HashMap` order, so two encodings of one message may
/// differ byte for byte; the round trip must compare messages.
#[test]
fn map_fields_round_trip_in_any_order() {
    let bytes = [0x2a, 0x03, 0x0a, 0x01, 0x53, 0x2a, 0x03, 0x0a, 0x01, 0x00];
    let msg = decode_stably::<xds::DeltaDiscoveryRequest>(&bytes).unwrap();
    assert_eq!(msg.initial_resource_versions.len(), 2);
    for _ in 0..16 {
        decode_stably::<xds::DeltaDiscoveryRequest>(&bytes).unwrap();
    }
}
