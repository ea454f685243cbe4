//! `harma`: the command-line front end. Parsing only; the work is in the library.
#![forbid(unsafe_code)]

use clap::Parser;

// Candle allocates a fresh buffer per op; mimalloc reuses freed pages where glibc returns
// large blocks to the kernel and takes a page fault on every first touch (measured in
// docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    harma_train::cli::start_up();
    let cli = harma_train::cli::Cli::parse();
    if let Err(e) = harma_train::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
