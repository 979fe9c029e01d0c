//! Integration tests of sigil_agent through its public API: hostile
//! configuration files ([`hostile`]) and the limits on clients ([`limits`]).

mod hostile;
mod limits;
