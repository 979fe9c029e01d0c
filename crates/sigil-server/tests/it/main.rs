//! Integration tests of sigil_server through its public API: hostile
//! configuration files ([`hostile`]).

mod hostile;
