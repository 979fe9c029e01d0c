//! Integration tests of sigil-types through its public API: hostile input to
//! the SPIFFE ID, trust domain and selector parsers ([`hostile`]).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure is reported by the panic"
)]

mod hostile;
