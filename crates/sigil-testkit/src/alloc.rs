//! A global allocator for tests that counts the heap bytes each thread
//! holds, so that a test can measure what a structure it builds costs
//! (sigil-server's `index::memory`, sigil-agent's `core::memory`). Per
//! thread, because the other tests run beside it: a test that allocates and
//! frees on its own thread sees only its own bytes, and dropping a
//! structure on the test's thread counts what it frees wherever it was
//! allocated. A crate's unit-test binary installs it with
//! `#[global_allocator] static A: sigil_testkit::alloc::Counting = sigil_testkit::alloc::Counting;`.

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
pub struct Held {
    /// Bytes asked for.
    pub requested: i64,
    /// Bytes of the malloc blocks that hold them.
    pub chunks: i64,
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

impl Held {
    /// The bytes asked for and in malloc blocks, each divided by `n` (per
    /// entry, per SVID).
    pub fn per(self, n: usize) -> (f64, f64) {
        (
            self.requested as f64 / n as f64,
            self.chunks as f64 / n as f64,
        )
    }
}

impl std::ops::Add for Held {
    type Output = Held;
    fn add(self, o: Held) -> Held {
        Held {
            requested: self.requested + o.requested,
            chunks: self.chunks + o.chunks,
        }
    }
}

/// What dropping each structure in turn frees on this thread: a
/// structure's part is what this thread holds less since the part before.
#[derive(Debug)]
pub struct Meter {
    /// What this thread held after the last part.
    pub at: Held,
    /// Each part's name and bytes, in order.
    pub parts: Vec<(&'static str, Held)>,
}

impl Meter {
    /// Starts from what this thread holds now.
    pub fn new() -> Self {
        Self {
            at: held(),
            parts: Vec::new(),
        }
    }

    /// Records what was freed since the last part as `name`.
    pub fn freed(&mut self, name: &'static str) {
        let now = held();
        self.parts.push((name, self.at - now));
        self.at = now;
    }
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
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
pub fn held() -> Held {
    HELD.with(Cell::get)
}

/// The block glibc malloc uses for `size` bytes (x86_64 and aarch64).
pub fn chunk(size: usize) -> i64 {
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

/// The counting allocator (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Counting;

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
