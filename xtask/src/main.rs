//! Project tasks: `cargo xtask bench`, `cargo xtask fetch-data`. One module per command.

mod bench;
mod fetch;

// Candle allocates a fresh buffer per op; mimalloc reuses freed pages where glibc returns
// large blocks to the kernel and takes a page fault on every first touch.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "harma-rs project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time the workloads at ViT-B/32 size with random weights; optionally PyTorch beside us
    Bench(bench::Args),
    /// Download models and datasets into the data/ layout (docs/DATA.md, docs/SOURCES.md)
    FetchData(fetch::Args),
    /// One training-step measurement in this process (run by `bench`, one process per mode)
    #[command(hide = true)]
    BenchStep(bench::StepArgs),
}

fn main() {
    harma_train::keep_freed_memory();
    let cli = Cli::parse();
    // xtask runs from anywhere in the workspace; paths are relative to its root
    let result = std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .map_err(anyhow::Error::from)
        .and_then(|()| match cli.command {
            Command::Bench(args) => bench::run(&args),
            Command::BenchStep(args) => bench::run_step(&args),
            Command::FetchData(args) => fetch::run(&args),
        });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
