//! Tests only: the crate's unit-test binary counts the heap bytes each
//! thread holds (`sigil_testkit::alloc`), for `index::memory`.

pub(crate) use sigil_testkit::alloc::{Held, Meter, chunk, held};

#[global_allocator]
static COUNTING: sigil_testkit::alloc::Counting = sigil_testkit::alloc::Counting;
