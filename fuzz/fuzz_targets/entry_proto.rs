//! A registration entry built from arbitrary wire fields: decoding an
//! `Entry` message and converting it never panics, and a converted entry that
//! passes validation converts back to a wire entry that converts to itself.
//! The body is `sigil_fuzz::targets::entry_proto::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::entry_proto::run(data));
