//! `/proc/<pid>/cgroup` text: the container locator never panics, and what
//! it reports is a well-formed pod UID and container ID.
//! The body is `sigil_fuzz::targets::cgroup::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::cgroup::run(data));
