//! Giving the allocator's free memory back to the system after a large
//! change (docs/benchmarks.md, "Agent memory per cached SVID").
//!
//! Taking in thousands of entries and SVIDs at once (a first sync, a start
//! with thousands due) frees as much as it keeps: the decoded sync
//! messages, the signing requests and answers, the cache file written
//! whole. glibc's malloc keeps those pages, between the blocks that stay,
//! for its own later use: an agent holding 10,000 SVIDs kept about twice
//! the bytes it used. After such a change the core asks glibc to return
//! every free page (`malloc_trim`) at a save once [`TRIM_AFTER`] entries
//! or SVIDs were saved since it last did, or [`TRIM_SETTLED`] when no
//! signing is in flight (the end of a round), so the cost (a pass over the
//! allocator's free lists, a few milliseconds for tens of MiB) is small
//! against the change that caused
//! it.
//!
//! glibc also gives each thread that meets a locked arena an arena of its
//! own, up to eight per core: the agent's threads (the runtime's workers,
//! the signing tasks, the blocking pool) spread what the core keeps over
//! as many arenas, each with its own free pages between the blocks that
//! stay. The agent allows two ([`ARENAS`]); with glibc's default an agent
//! holding 10,000 SVIDs kept 3.8–4.1 KB of RSS per SVID even with the trim,
//! with two 2.4–2.6 KB (docs/benchmarks.md, "Agent memory per cached SVID
//! (#15 item 5)"). Elsewhere than glibc this does nothing.

/// Most malloc arenas in an agent process.
const ARENAS: i32 = 2;

/// Blocks of this size and larger are mapped for themselves and unmapped
/// when freed (glibc's default is 128 KiB, raised as large blocks are
/// freed; see [`limit_arenas`]). 64 KiB also maps the early, smaller
/// signing answers of a round; with 128 KiB one run in five still kept
/// 0.35 KB per SVID more.
const MMAP_THRESHOLD: i32 = 64 * 1024;

/// Entries and SVIDs saved (added, changed or dropped) after which a save
/// gives memory back.
const TRIM_AFTER: usize = 1000;

/// The same once nothing is being signed.
const TRIM_SETTLED: usize = 100;

/// Whether a save after which `churn` entries and SVIDs were saved since
/// the last trim is to give memory back (`settled`: no signing in flight);
/// if so, `churn` starts again from 0.
pub(crate) fn due(churn: &mut usize, settled: bool) -> bool {
    let due = *churn >= TRIM_AFTER || (settled && *churn >= TRIM_SETTLED);
    if due {
        *churn = 0;
    }
    due
}

/// Allows at most [`ARENAS`] malloc arenas in this process, from now on,
/// and keeps the size from which glibc maps a block for itself at
/// [`MMAP_THRESHOLD`]. Left to itself, glibc raises that size to the
/// largest mapped block freed so far (up to 32 MiB): after the first
/// decoded sync page or signing answer is freed, the next ones come from
/// the heap, between the entries and SVIDs that stay, and what is left
/// there after they are freed varied from 0.1 to 1.7 KB per cached SVID
/// from run to run (docs/benchmarks.md, "Agent memory per cached SVID").
/// Held fixed, large buffers are mapped and unmapped whole.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "mallopt has no safe wrapper in libc or std")]
pub(crate) fn limit_arenas() {
    // SAFETY: mallopt takes two integers and sets a limit the allocator
    // reads under its own locks.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Allows at most [`ARENAS`] malloc arenas (not glibc: nothing).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn limit_arenas() {}

/// Returns the allocator's free pages to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "malloc_trim has no safe wrapper in libc or std")]
pub(crate) fn give_back_free_memory() {
    // SAFETY: malloc_trim takes an integer and touches only the allocator's
    // own free memory, under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns the allocator's free pages to the system (not glibc: nothing).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn give_back_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_given_back_after_a_large_change_or_at_its_end() {
        let mut churn = TRIM_SETTLED - 1;
        assert!(!due(&mut churn, true), "a small change costs no trim");
        churn = TRIM_AFTER - 1;
        assert!(!due(&mut churn, false), "a round still signing waits");
        assert_eq!(churn, TRIM_AFTER - 1);
        churn = TRIM_AFTER;
        assert!(due(&mut churn, false), "a large change trims while signing");
        assert_eq!(churn, 0);
        churn = TRIM_SETTLED;
        assert!(due(&mut churn, true), "the end of a round trims");
        assert_eq!(churn, 0);
        // Both calls are harmless to make (glibc or not).
        limit_arenas();
        give_back_free_memory();
    }
}
