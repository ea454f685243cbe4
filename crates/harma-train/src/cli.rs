//! Command-line interface (clap derive).

use clap::{Parser, Subcommand};

use harma_trainer::config;

use crate::{demo, embed, eval, index, report, search, train};

/// harma: HarMA remote-sensing image-text retrieval (CLIP ViT-B/32 + adapters) on Candle.
#[derive(Debug, Parser)]
#[command(name = "harma", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed a folder of images and/or a file of captions with a CLIP checkpoint.
    ///
    /// Writes L2-normalised `image_embeds` [n_images, dim] (the images of DIR sorted by file
    /// name) and `text_embeds` [n_lines, dim] (one per non-empty line of FILE, in order) to a
    /// safetensors file; its metadata lists the image names.
    ///
    /// Example (GeoRSCLIP weights, RSITMD images, one query per line):
    ///
    /// harma embed --model RS5M_ViT-B-32_RET-2.pt --images rsitmd/images --captions queries.txt --out embeds.safetensors
    ///
    /// With HarMA's released checkpoint the adapters inside it are applied:
    ///
    /// harma embed --model harma_rsitmd_georsclip_mr523.pth --captions queries.txt --out q.safetensors
    Embed(embed::Args),
    /// Train HarMA's adapters (the backbone stays frozen) on image-caption pairs.
    ///
    /// Writes OUT/config.toml (every resolved setting), OUT/log.jsonl (step, lr, loss,
    /// loss_contrastive, loss_triplet, temp per step) and, at the end of each epoch (or every
    /// --save-every steps) and of the run, OUT/adapters.safetensors (the trained tensors under
    /// the original's names: `harma embed --adapters` and PyTorch HarMA's
    /// load_state_dict(strict=False) read it) and OUT/resume.safetensors. Ctrl-C finishes the
    /// step, saves, and exits; `--resume OUT` continues exactly where it stopped. A NaN or
    /// infinite loss stops training and keeps the last good checkpoint.
    ///
    /// Example (RSITMD from GeoRSCLIP, the original's settings but one GPU's batch):
    ///
    /// harma train --train-json rsitmd_train.json --image-root rsitmd/images --init RS5M_ViT-B-32_RET-2.pt --batch-size 214 --epochs 80 --lr 4e-6 --out runs/rsitmd
    ///
    /// The same from the files `cargo xtask fetch-data` places (docs/DATA.md), with val every
    /// epoch, best-by-val and test at the end; a smaller batch for a CPU:
    ///
    /// harma train --dataset rsitmd --batch-size 32
    Train(Box<train::TrainFlags>),
    /// Evaluate image-text retrieval on a split: R@1/5/10 both ways and mR, as HarMA reports.
    ///
    /// Without adapters it is the zero-shot baseline of the checkpoint.
    ///
    /// Example (a trained run on RSITMD's test split):
    ///
    /// harma eval --model RS5M_ViT-B-32_RET-2.pt --adapters runs/rsitmd/adapters.safetensors --test-json rsitmd_test.json --image-root rsitmd/images --out metrics.json
    Eval(eval::Args),
    /// The offline demo: synthetic aerial scenes, a small random CLIP, adapters trained for
    /// about two minutes, zero-shot vs trained retrieval. What `harma` runs with no arguments
    /// when no dataset has been fetched.
    Demo(demo::Args),
    /// Rebuild the report of a finished (or running) training run or evaluation, or compare
    /// runs on one page.
    ///
    /// Every `harma train` run keeps RUN_DIR/report.html (one self-contained page: curves,
    /// results, retrieval examples with thumbnails, settings, data and checkpoint hashes,
    /// machine and time) and report.md, refreshed as it goes; this rebuilds them from the
    /// folder's files alone. With --compare, one page sets runs side by side: the curves
    /// overlaid, the results in columns, the settings that differ. How to judge an ablation:
    ///
    /// harma report runs/adaptive --compare runs/no-triplet --out runs
    Report(report::Args),
    /// Build a search index of an image archive (tiles, embeddings, georeferencing).
    ///
    /// Example (a folder of GeoTIFFs, 256-pixel tiles):
    ///
    /// harma index build --model RS5M_ViT-B-32_RET-2.pt --images archive/ --out archive.index
    Index(index::IndexArgs),
    /// Search an index by text (or by an image with --image): ranked tiles with score, file,
    /// pixel box and, for georeferenced rasters, the box in their CRS.
    ///
    /// Example: harma search archive.index "a harbour with many boats next to a bridge" -k 20
    ///
    /// Into QGIS: harma search archive.index "an airport runway" --geojson > runways.geojson
    Search(Box<search::SearchArgs>),
    /// Serve a web page to search an index: a search box, a grid of result tiles (click one for
    /// more like it), and the JSON API behind it (GET /api/search?q=TEXT&k=20,
    /// /api/search?like=TILE_ID, /api/tile/ID.png, /api/info).
    ///
    /// Example: harma serve archive.index, then open http://127.0.0.1:8080
    Serve(Box<search::ServeArgs>),
}

/// What both binaries (`harma`, `xtask`) do first in `main`, before any Candle op and any
/// thread, in a program whose global allocator is mimalloc: freed memory kept for reuse,
/// Candle's element-wise ops on the calling thread unless `CANDLE_NUM_THREADS` is set, and
/// `HARMA_AMX=0` read as `HARMA_BF16_KERNEL` naming the fastest kernel but AMX. The one place
/// that reads the environment into settings (`--bf16-kernel` reads `HARMA_BF16_KERNEL`).
pub fn start_up() {
    use harma_kernels::compute::Bf16Kernel;
    use harma_kernels::runtime::{CANDLE_THREADS_DEFAULT, CANDLE_THREADS_VAR};
    harma_kernels::runtime::keep_freed_memory();
    // no other thread exists yet: setting variables is sound here, and read by what follows
    if std::env::var_os(CANDLE_THREADS_VAR).is_none() {
        std::env::set_var(CANDLE_THREADS_VAR, CANDLE_THREADS_DEFAULT);
    }
    if std::env::var("HARMA_AMX").as_deref() == Ok("0")
        && std::env::var_os("HARMA_BF16_KERNEL").is_none()
    {
        let k = Bf16Kernel::fastest_of(&[Bf16Kernel::Avx512, Bf16Kernel::F32]);
        std::env::set_var("HARMA_BF16_KERNEL", k.name());
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Embed(args)) => embed::run(&args),
        Some(Command::Train(args)) => train::run(&args.0),
        Some(Command::Eval(args)) => eval::run(&args),
        Some(Command::Demo(args)) => demo::run(&args),
        Some(Command::Report(args)) => report::run(&args),
        Some(Command::Index(args)) => index::run(&args),
        Some(Command::Search(args)) => search::run_search(&args),
        Some(Command::Serve(args)) => search::run_serve(&args),
        None => default_run(),
    }
}

/// `harma` with no arguments: train RSITMD with the original's settings when it has been
/// fetched (docs/DATA.md), else the offline demo.
fn default_run() -> anyhow::Result<()> {
    let mut preset = config::TrainConfig::default();
    config::Dataset::Rsitmd.apply(&mut preset, std::path::Path::new("data"));
    let needed = [
        &preset.data.train_json,
        &preset.data.image_root,
        &preset.model.init,
    ];
    if needed
        .iter()
        .all(|p| p.as_ref().is_some_and(|p| p.exists()))
    {
        eprintln!("RSITMD found under data/: training with the original's settings (`harma --help` lists the commands)");
        let out = preset.run.out.clone().unwrap_or_default();
        // continue an interrupted default run instead of refusing its folder
        let args = if harma_trainer::resume::resume_path(&out).exists() {
            config::TrainArgs {
                resume: Some(out),
                ..config::TrainArgs::default()
            }
        } else {
            train::from_flags(&["--dataset", "rsitmd"])?
        };
        return train::run(&args);
    }
    eprintln!("(`harma --help` lists the commands)");
    demo::run(&demo::Args::default())
}
