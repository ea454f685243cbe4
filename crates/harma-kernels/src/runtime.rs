//! The process-wide settings the kernels run best under: memory that stays with the process
//! between ops, and Candle's element-wise ops on the calling thread (rayon's threads run the
//! heavy kernels). Both binaries (`harma`, `xtask`) call [`start_up`] first in `main`.

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

/// The process-wide settings both binaries (`harma`, `xtask`) start with: call first in `main`,
/// before any Candle op and any thread, in a program whose global allocator is mimalloc.
pub fn start_up() {
    keep_freed_memory();
    candle_ops_on_caller();
}

/// Run Candle's element-wise CPU ops on the calling thread, unless `CANDLE_NUM_THREADS` says
/// otherwise (any value, even one Candle ignores, is the user's). Candle 0.11 runs them on a
/// pool of its own beside rayon's, whose threads spin for a while after each op: on a 2-core
/// machine they take the cores from our rayon kernels (and the two towers of a training step,
/// which run side by side, queue on the pool's lock). With the pool off, training steps ran
/// 1.29x (bf16) and 1.19x (f32) faster, image embedding 1.05x (docs/BENCHMARKS.md). Call at
/// the start of `main`, before any Candle op and any thread.
pub fn candle_ops_on_caller() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // read once, when Candle first builds its pool; no other thread exists yet
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

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
