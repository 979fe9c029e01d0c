//! Tests only: the global allocator of the crate's unit-test binary, which
//! counts the heap bytes each thread holds, so that a test can measure what a
//! structure it builds costs (`index::memory`). Per thread, because the
//! other tests run beside it: a test that allocates and frees on its own
//! thread sees only its own bytes.

#![allow(
    unsafe_code,
    reason = "a GlobalAlloc is an unsafe trait; every call is passed to System unchanged"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// What the current thread holds: the bytes asked for, and the bytes glibc
/// malloc takes for them (each block carries an 8-byte header and is rounded
/// up to 16 bytes, at least 32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) requested: i64,
    pub(crate) chunks: i64,
}

impl std::ops::Sub for Held {
    type Output = Held;
    fn sub(self, o: Held) -> Held {
        Held {
            requested: self.requested - o.requested,
            chunks: self.chunks - o.chunks,
        }
    }
}

thread_local! {
    static HELD: Cell<Held> = const {
        Cell::new(Held {
            requested: 0,
            chunks: 0,
        })
    };
}

/// The bytes this thread holds now (allocated here and not yet freed, minus
/// what it freed of other threads' allocations).
pub(crate) fn held() -> Held {
    HELD.with(Cell::get)
}

/// The block glibc malloc uses for `size` bytes (x86_64 and aarch64).
pub(crate) fn chunk(size: usize) -> i64 {
    ((size + 8 + 15) & !15).max(32) as i64
}

fn count(size: usize, sign: i64) {
    // Never fails for a const-initialized Cell, even while the thread exits.
    let _ = HELD.try_with(|h| {
        let mut v = h.get();
        v.requested += sign * size as i64;
        v.chunks += sign * chunk(size);
        h.set(v);
    });
}

struct Counting;

// SAFETY: every method forwards to `System` with the same arguments and
// returns its result; the counting touches only a thread-local `Cell`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) };
        count(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(layout.size(), -1);
            count(new_size, 1);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;
