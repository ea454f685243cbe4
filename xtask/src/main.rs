//! Project tasks: `cargo xtask bench`, `bench-search`, `search-demo`, `fetch-data`,
//! `reproduce`, `build-cuda`, `gpu-check`. One module per command.

#![forbid(unsafe_code)]

mod bench;
mod bench_search;
mod cuda;
mod distcheck;
mod fetch;
mod gpucheck;
mod reproduce;
mod search_demo;
mod workloads;

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
    /// Search: index build vs embed throughput, query latency exact vs IVF and HNSW at 10k-1M entries,
    /// recall@10 (docs/SEARCH.md)
    BenchSearch(bench_search::Args),
    /// A small archive and a tiny random model to index and serve, offline
    SearchDemo(search_demo::Args),
    /// Download models and datasets into the data/ layout (docs/DATA.md, docs/SOURCES.md)
    FetchData(fetch::Args),
    /// The paper's experiment in one command: fetch, zero-shot, train with the original's
    /// recipe, test with the adapters chosen on val, and a report set against the published
    /// numbers in reports/<dataset>-<backbone>-<date>/ (docs/REPRODUCE.md). Rerunning
    /// continues where it stopped
    Reproduce(reproduce::Args),
    /// Build CUDA binaries of harma and xtask on a machine without a GPU (docs/CUDA.md)
    BuildCuda(cuda::Args),
    /// On a GPU: parity with the CPU, throughput and memory, PyTorch beside us (docs/CUDA.md)
    GpuCheck(gpucheck::Args),
    /// Data-parallel training on every GPU (or CPU ranks) against one process
    /// (docs/DISTRIBUTED.md)
    DistCheck(distcheck::Args),
    /// One training-step measurement in this process (run by `bench`, one process per mode)
    #[command(hide = true)]
    BenchStep(bench::StepArgs),
    /// One gpu-check measurement in this process
    #[command(hide = true)]
    GpuStep(gpucheck::StepArgs),
}

/// Run `cmd` (`what` names it in errors); when it succeeds, its stdout parsed as JSON, else an
/// error carrying its stderr.
pub(crate) fn run_json(
    cmd: &mut std::process::Command,
    what: &str,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        anyhow::bail!("{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{what} printed no JSON"))
}

/// Write JSON through a temporary file, so that a reader never sees half of it.
pub(crate) fn write_json(path: &std::path::Path, v: &serde_json::Value) -> anyhow::Result<()> {
    harma_checkpoint::write::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
}

fn main() {
    harma_train::cli::start_up();
    let cli = Cli::parse();
    // xtask runs from anywhere in the workspace; paths are relative to its root. A binary
    // carried to another machine (gpu-check) runs from the checkout it is started in.
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    if root.join("Cargo.toml").is_file() {
        if let Err(e) = std::env::set_current_dir(root) {
            eprintln!("error: cannot enter {}: {e}", root.display());
            std::process::exit(1);
        }
    }
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::BenchStep(args) => bench::run_step(&args),
        Command::BenchSearch(args) => bench_search::run(&args),
        Command::SearchDemo(args) => search_demo::run(&args),
        Command::FetchData(args) => fetch::run(&args),
        Command::Reproduce(args) => reproduce::run(&args),
        Command::BuildCuda(args) => cuda::run(&args),
        Command::GpuCheck(args) => gpucheck::run(&args),
        Command::DistCheck(args) => distcheck::run(&args),
        Command::GpuStep(args) => gpucheck::run_step(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
