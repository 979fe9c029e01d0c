//! Integration tests of sigil_agent through its public API: hostile
//! configuration files ([`hostile`]).

mod hostile;
