//! Integration tests of sigil-proto: the code generator with its freshness
//! check ([`codegen`]), a round trip through the generated services
//! ([`services`]), and hostile wire input ([`hostile`]).

mod codegen;
mod hostile;
mod services;
