//! Server and agent TOML configuration files: parsing arbitrary text never
//! panics (bad files get a [`ConfigError`](sigil_types::config::ConfigError)).
//! The body is `sigil_fuzz::targets::config::run`, shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sigil_fuzz::targets::config::run(data));
