//! Integration tests of sigil-proto: the code generator with its freshness
//! check ([`codegen`]), and a round trip through the generated services
//! ([`services`]).

mod codegen;
mod services;
