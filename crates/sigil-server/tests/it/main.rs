//! Integration tests of sigil_server through its public API: hostile
//! configuration files ([`hostile`]) and the limits on clients ([`limits`]).

mod batch;
mod hostile;
mod limits;
mod list_prefix;
