//! Integration tests of sigil_agent through its public API: hostile
//! configuration files ([`hostile`]), the limits on clients ([`limits`]) and
//! the sync loop against a scripted server ([`sync`]).

mod hostile;
mod limits;
mod sync;
