//! Every request message of sigil's gRPC APIs (the SPIFFE Workload API, the
//! server's AgentApi and AdminApi, and Envoy SDS, plain and delta) decoded from arbitrary
//! bytes: decoding never panics, a decoded message re-encodes to bytes that
//! decode to the same message, and the converters that take wire entries
//! never panic.
//! The body is `sigil_fuzz::targets::proto::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::proto::run(data));
