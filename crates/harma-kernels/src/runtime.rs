//! The process-wide settings the kernels run best under: memory that stays with the process
//! between ops, and Candle's element-wise ops on the calling thread (rayon's threads run the
//! heavy kernels). Both binaries (`harma`, `xtask`) apply them first in `main`, through
//! `harma_train::cli::start_up` (which also reads the environment: a library here reads none).

/// mimalloc's `mi_option_purge_delay` (the index in mimalloc 3's `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory for reuse instead of returning it to the OS. Candle allocates every
/// intermediate and gradient anew; with mimalloc's default (purge after 1 s) the kernel
/// zeroes fresh pages for each of them: 12% of a training step in a profile, 7% after this.
/// The step is about 1.1x faster at the same peak memory (docs/BENCHMARKS.md). Call at the
/// start of a program whose global allocator is mimalloc.
pub fn keep_freed_memory() {
    // SAFETY: sets a mimalloc option; valid at any time, read when memory would be purged.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// mimalloc's purge delay in ms (its default is 1000; -1 after [`keep_freed_memory`]).
pub fn purge_delay() -> i64 {
    // SAFETY: reading an option is valid at any time.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
}

/// The variable Candle sizes its element-wise pool by, read once when it first builds it.
/// The binaries set it to [`CANDLE_THREADS_DEFAULT`] at start-up unless the user set it (any
/// value, even one Candle ignores, is the user's): Candle 0.11 runs element-wise CPU ops on a
/// pool of its own beside rayon's, whose threads spin for a while after each op; on a 2-core
/// machine they take the cores from our rayon kernels (and the two towers of a training step,
/// which run side by side, queue on the pool's lock). With the pool off, training steps ran
/// 1.29x (bf16) and 1.19x (f32) faster, image embedding 1.05x (docs/BENCHMARKS.md).
pub const CANDLE_THREADS_VAR: &str = "CANDLE_NUM_THREADS";

/// Every element-wise op on the calling thread.
pub const CANDLE_THREADS_DEFAULT: &str = "1";

/// The worker threads Candle's element-wise pool gets under `CANDLE_NUM_THREADS = setting`,
/// by Candle 0.11's rule: a positive number n gives n - 1 workers beside the caller, anything
/// else (absent, 0, not a number) falls back to rayon's thread count.
pub fn candle_pool_workers(setting: Option<&str>) -> usize {
    let threads = setting
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(candle_core::utils::get_num_threads);
    threads.saturating_sub(1)
}

/// A global allocator that counts: the bytes live now and the most live at once since the
/// last [`CountingAlloc::reset_peak`], over the system allocator. For tests and benchmarks
/// that hold code to a memory budget (`#[global_allocator] static A: CountingAlloc =
/// CountingAlloc::new();`).
pub struct CountingAlloc {
    live: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl CountingAlloc {
    pub const fn new() -> Self {
        Self {
            live: std::sync::atomic::AtomicUsize::new(0),
            peak: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Bytes allocated and not yet freed.
    pub fn live(&self) -> usize {
        self.live.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most bytes live at once since the last reset.
    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Start a new peak from what is live now.
    pub fn reset_peak(&self) {
        self.peak
            .store(self.live(), std::sync::atomic::Ordering::Relaxed);
    }

    fn grew(&self, by: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.live.fetch_add(by, Relaxed) + by;
        self.peak.fetch_max(now, Relaxed);
    }

    fn shrank(&self, by: usize) {
        self.live
            .fetch_sub(by, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Default for CountingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call is forwarded to the system allocator with the caller's layout and
// pointer unchanged; the counters are atomics and never affect what is returned.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded (the caller upholds `GlobalAlloc::alloc`'s contract).
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            self.grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        self.shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded; on failure the old block stays allocated, as counted.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() {
            self.shrank(layout.size());
            self.grew(new);
        }
        p
    }
}
