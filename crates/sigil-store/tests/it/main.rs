//! sigil-store integration tests: a conformance suite any [`Store`] must pass,
//! run against each SQLite flavour and PostgreSQL, and checks specific to each.
//!
//! [`Store`]: sigil_store::Store

// clippy's allow-*-in-tests covers only #[test] functions, not the shared
// helpers and conformance cases they call; failing loudly is their job.
#![expect(clippy::unwrap_used, clippy::panic, reason = "test code")]

#[macro_use]
mod conformance;
mod postgres;
mod sqlite;
