//! The agent's allocator (jemalloc, chosen in `main.rs`) seen from inside: its figures for the metrics, and the
//! one habit of it the agent corrects. jemalloc gives each thread a cache of freed objects that only that
//! thread's own allocations empty; after a burst of closing connections an idle worker kept about 1.5 MiB there
//! that no other thread could use, so resident memory stayed well above where it started.

use std::cell::Cell;

/// A worker that has freed this much since its cache was last flushed flushes it before it goes idle: enough
/// that a busy worker keeps the cache's benefit, small enough that what an idle one holds stays bounded.
const FLUSH_AFTER_FREED_BYTES: u64 = 256 * 1024;

thread_local! {
    static FREED_AT_LAST_FLUSH: Cell<u64> = const { Cell::new(0) };
    static FREED_COUNTER: Option<tikv_jemalloc_ctl::thread::ThreadLocal<u64>> =
        tikv_jemalloc_ctl::thread::deallocatedp::read().ok();
}

/// For the runtime's `on_thread_park`: hands the thread's cached frees back to the shared arenas when it has
/// freed [`FLUSH_AFTER_FREED_BYTES`] since the last time. Costs two thread-local reads otherwise.
pub fn flush_thread_cache_if_due() {
    let Some(freed) = FREED_COUNTER.with(|c| c.as_ref().map(|c| c.get())) else { return };
    FREED_AT_LAST_FLUSH.with(|last| {
        if freed.saturating_sub(last.get()) >= FLUSH_AFTER_FREED_BYTES {
            last.set(freed);
            // SAFETY: "thread.tcache.flush" takes and returns nothing; null pointers and zero length say so.
            unsafe {
                tikv_jemalloc_sys::mallctl(
                    c"thread.tcache.flush".as_ptr(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    0,
                );
            }
        }
    });
}

/// jemalloc's figures in bytes, by kind: `allocated` is what live objects use (including the thread caches'
/// share, also given alone as `thread_caches`), `resident` what the allocator holds in RAM, `retained` address
/// space kept unmapped for reuse. `None` when jemalloc was built without statistics.
pub fn stats() -> Option<Vec<(&'static str, usize)>> {
    use tikv_jemalloc_ctl::{epoch, raw, stats};
    epoch::advance().ok()?;
    Some(vec![
        ("allocated", stats::allocated::read().ok()?),
        ("active", stats::active::read().ok()?),
        ("metadata", stats::metadata::read().ok()?),
        ("resident", stats::resident::read().ok()?),
        ("mapped", stats::mapped::read().ok()?),
        ("retained", stats::retained::read().ok()?),
        // SAFETY: a size_t statistic; arena index 4096 (MALLCTL_ARENAS_ALL) sums all arenas.
        ("thread_caches", unsafe { raw::read::<usize>(b"stats.arenas.4096.tcache_bytes\0") }.ok()?),
    ])
}
