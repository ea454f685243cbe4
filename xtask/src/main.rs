//! Project tasks: `cargo xtask bench`. One module per command.

mod bench;

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
    /// One training-step measurement in this process (run by `bench`, one process per mode)
    #[command(hide = true)]
    BenchStep(bench::StepArgs),
}

fn main() -> anyhow::Result<()> {
    // xtask runs from anywhere in the workspace; paths are relative to its root
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))?;
    match Cli::parse().command {
        Command::Bench(args) => bench::run(&args),
        Command::BenchStep(args) => bench::run_step(&args),
    }
}
