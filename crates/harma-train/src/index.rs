//! `harma index build` and `harma index info`: a folder of imagery, cut into tiles and embedded
//! by the image tower, into a search index (harma_search::store). Incremental and resumable:
//! a rerun embeds only new, changed or unfinished files; an interrupted build loses at most the
//! batch in flight. Decoding and tiling run on a producer thread ahead of the image tower.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use harma_data::{LoadLimits, RgbImage};
use harma_raster::{load_raster, preprocess_tile, read_georef, tile_grid, Bands, Tile};
use harma_search::store::{FileId, FileUpdate, NewTile, Pending, Settings};
use harma_search::{Index, Writer};

use harma_model::encode::{progress, IMAGE_EXTENSIONS};
use harma_model::Loaded;

use crate::model::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct IndexArgs {
    #[command(subcommand)]
    pub command: IndexCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum IndexCommand {
    /// Cut every image under a folder into tiles, embed them, and write (or bring up to date) a
    /// search index.
    ///
    /// Rerunning the same command adds new and changed files (by path, size and time), drops
    /// vanished ones and skips the rest; an interrupted build (Ctrl-C, a crash) loses at most
    /// the batch in flight and continues where it stopped. GeoTIFFs keep their
    /// georeferencing: each tile's box in the raster's CRS is stored.
    ///
    /// Example (GeoRSCLIP weights, 256-pixel tiles overlapping by half):
    ///
    /// harma index build --model RS5M_ViT-B-32_RET-2.pt --images archive/ --out archive.index --stride 128
    Build(Box<BuildArgs>),
    /// Print an index's settings and size.
    Info {
        /// The index folder
        index: PathBuf,
    },
    /// Write an index's tiles and vectors as a Lance table (LanceDB) on local disk or object
    /// storage (s3://, gs://, az://), for LanceDB, Ray or Spark to read, index and serve. Needs
    /// a binary built with `--features lance` (docs/SEARCH.md).
    ///
    /// Example: harma index export-lance archive.index s3://bucket/archive --storage-option region=eu-west-1
    ExportLance(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The index folder
    pub index: PathBuf,
    /// The LanceDB database: a folder, or s3://bucket/path, gs://..., az://...
    pub uri: String,
    /// The table to write (replaced if it exists)
    #[arg(long, default_value = "tiles")]
    pub table: String,
    /// Object-storage settings, repeatable (for S3: endpoint, region, allow_http,
    /// aws_access_key_id, aws_secret_access_key; the usual AWS_* variables are read too)
    #[arg(long = "storage-option", value_name = "KEY=VALUE")]
    pub storage_options: Vec<String>,
}

#[cfg(feature = "lance")]
fn export_lance(args: &ExportArgs) -> Result<()> {
    let options = args
        .storage_options
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => bail!("--storage-option {kv}: expected KEY=VALUE"),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut index = Index::open(&args.index)?;
    let start = std::time::Instant::now();
    let n = harma_search::lance::export(&mut index, &args.uri, &args.table, &options)?;
    eprintln!(
        "wrote {n} tiles to table {} of {} in {:.1}s",
        args.table,
        args.uri,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(not(feature = "lance"))]
fn export_lance(_: &ExportArgs) -> Result<()> {
    bail!(
        "this harma was built without LanceDB: build it with `cargo build --release -p harma-train \
         --features lance` (needs protoc and 35+ minutes on 2 cores; docs/SEARCH.md)"
    )
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub net: ModelArgs,
    /// Folder of images (tif, tiff, jpg, jpeg, png, bmp, webp), searched recursively; links
    /// are not followed
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// The index folder (created; an existing index there is brought up to date)
    #[arg(long, value_name = "INDEX")]
    pub out: PathBuf,
    /// Tile size in pixels: an image larger than this is cut into tiles (the last tile of a row
    /// or column is moved back to end at the edge); a smaller one is one tile
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(8..=65536))]
    pub tile: u64,
    /// Pixels from one tile to the next (default: the tile size; smaller overlaps tiles)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub stride: Option<u64>,
    /// Bands of multi-band rasters to show the model as red,green,blue (1-based, as GDAL
    /// counts; one band is shown as grey), e.g. 4,3,2 for Sentinel-2; only for TIFFs that need
    /// it (more bands than RGB/grey with alpha, or wider than 8 bits): 8-bit photos stay RGB. Samples wider than 8
    /// bits are stretched per band from their 2nd to 98th percentile
    #[arg(long, value_name = "R,G,B")]
    pub bands: Option<Bands>,
    /// Tiles per forward pass
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Index only shard I of N of the folder's files (0 <= I < N): a deterministic share by
    /// the hash of each file's relative path, the same on every machine, so N builds (on N
    /// machines) together cover the folder once; each shard is an index of its own
    #[arg(long, value_name = "I/N")]
    pub shard: Option<harma_search::walk::Shard>,
}

pub fn run(args: &IndexArgs) -> Result<()> {
    match &args.command {
        IndexCommand::Build(b) => build(b, &Arc::new(AtomicBool::new(false)), true).map(|_| ()),
        IndexCommand::Info { index } => info(index),
        IndexCommand::ExportLance(a) => export_lance(a),
    }
}

fn info(dir: &Path) -> Result<()> {
    let index = Index::open(dir)?;
    let (files, bad, tiles) = index.counts()?;
    println!("{}", serde_json::to_string_pretty(&index.settings)?);
    println!("{files} files ({bad} unreadable), {tiles} tiles");
    Ok(())
}

/// The settings an index built by `loaded` from `net`'s files records; `known` (an index's
/// settings) spares hashing files that did not change.
pub fn model_settings(
    net: &ModelArgs,
    loaded: &Loaded,
    known: Option<&Settings>,
) -> Result<Settings> {
    let model = FileId::of(&net.model, known.map(|k| &k.model))?;
    let adapters = match &loaded.adapters_from {
        Some(p) if *p != net.model => Some(FileId::of(p, known.and_then(|k| k.adapters.as_ref()))?),
        _ => None,
    };
    Ok(Settings {
        images: PathBuf::new(),
        model,
        adapters,
        arch: net.backbone.arch.clone(),
        arch_config: serde_json::to_value(&loaded.config)?,
        sharing: format!("{:?}", net.backbone.sharing).to_lowercase(),
        dim: loaded.config.embed_dim,
        image_size: loaded.config.vision.image_size,
        tile: 0,
        stride: 0,
        bands: None,
        shard: None,
    })
}

fn describe_model(s: &Settings) -> String {
    let short = |h: &str| h.chars().take(12).collect::<String>();
    let adapters = match &s.adapters {
        Some(a) => format!(
            "adapters {} (sha256 {})",
            a.path.display(),
            short(&a.sha256)
        ),
        None => "no separate adapters".into(),
    };
    format!(
        "model {} (sha256 {}), arch {}, {adapters}",
        s.model.path.display(),
        short(&s.model.sha256),
        s.arch
    )
}

/// Why a model (`new`) cannot search an index built with `stored`, if it cannot.
pub fn model_mismatch(stored: &Settings, new: &Settings) -> Option<String> {
    let sha = |f: &Option<FileId>| f.as_ref().map(|f| f.sha256.clone());
    let differs = stored.model.sha256 != new.model.sha256
        || sha(&stored.adapters) != sha(&new.adapters)
        || stored.arch_config != new.arch_config
        || stored.dim != new.dim
        || (stored.adapters.is_some() && stored.sharing != new.sharing);
    differs.then(|| {
        format!(
            "the index was built with {}; this uses {}: its embeddings would not be comparable. \
             Use the index's model (leave out --model, --adapters and --arch) or build a new \
             index with this one",
            describe_model(stored),
            describe_model(new)
        )
    })
}

/// An existing index can only be extended with the same model, folder and tiling.
fn same_build(stored: &Settings, new: &Settings) -> std::result::Result<(), String> {
    if let Some(m) = model_mismatch(stored, new) {
        return Err(m);
    }
    if stored.images != new.images {
        return Err(format!(
            "the index covers {}, not {}: give that folder, or a new --out for this one",
            stored.images.display(),
            new.images.display()
        ));
    }
    if stored.shard != new.shard {
        let shown = |s: &Option<String>| {
            s.as_ref()
                .map_or("all files".into(), |s| format!("--shard {s}"))
        };
        return Err(format!(
            "the index holds {} of the folder; this build asks for {}: a shard is an index of \
             its own, give it a new --out",
            shown(&stored.shard),
            shown(&new.shard)
        ));
    }
    let tiling = |s: &Settings| (s.tile, s.stride, s.bands.clone());
    if tiling(stored) != tiling(new) {
        return Err(format!(
            "the index was built with --tile {} --stride {}{}; this build asks for --tile {} --stride {}{}: \
             use the index's settings, or a new --out",
            stored.tile,
            stored.stride,
            stored.bands.as_ref().map_or(String::new(), |b| format!(" --bands {b}")),
            new.tile,
            new.stride,
            new.bands.as_ref().map_or(String::new(), |b| format!(" --bands {b}")),
        ));
    }
    Ok(())
}

/// What a build did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildReport {
    pub tiles: usize,
    pub files: usize,
    pub failed: usize,
    pub secs: f64,
    /// `true` when stopped (Ctrl-C) before the end.
    pub stopped: bool,
}

/// A batch of tiles ready for the image tower.
struct Batch {
    pixels: Vec<f32>,
    tiles: Vec<NewTile>,
    files: Vec<FileUpdate>,
    done: Vec<i64>,
    failed: Vec<(i64, String)>,
}

/// A decoded file and the tiles of it still to embed.
struct Open {
    file_id: i64,
    img: Arc<RgbImage>,
    grid: Vec<Tile>,
    next: usize,
    update: Option<FileUpdate>,
}

/// The number of tiles of `p` still to embed, from its header (for the progress bar; 1 when
/// the header cannot be read: the decoder will say why).
fn tiles_left(root: &Path, p: &Pending, tile: usize, stride: usize) -> usize {
    let path = root.join(&p.rel);
    let dims = image::image_dimensions(&path).ok().or_else(|| {
        let f = std::fs::File::open(&path).ok()?;
        let mut d = tiff::decoder::Decoder::new(std::io::BufReader::new(f)).ok()?;
        d.dimensions().ok()
    });
    match dims {
        Some((w, h)) => tile_grid(w as usize, h as usize, tile, stride)
            .len()
            .saturating_sub(p.tiles_done),
        None => 1,
    }
}

/// Build or update the index `args.out`; `stop` (Ctrl-C) ends it after the batch in flight.
pub fn build(args: &BuildArgs, stop: &Arc<AtomicBool>, handle_ctrlc: bool) -> Result<BuildReport> {
    let tile = args.tile as usize;
    let stride = args.stride.map_or(tile, |s| s as usize);
    if stride > tile {
        bail!("--stride {stride} is larger than --tile {tile}: pixels between tiles would never be searched");
    }
    let root = args
        .images
        .canonicalize()
        .with_context(|| format!("cannot read image folder {}", args.images.display()))?;
    let mut found = harma_search::walk::find_images(&root, IMAGE_EXTENSIONS)?;
    if let Some(shard) = &args.shard {
        let all = found.len();
        found.retain(|f| shard.takes(&f.rel));
        eprintln!(
            "shard {shard}: {} of the {all} images under {}",
            found.len(),
            args.images.display()
        );
    }
    if found.is_empty() {
        bail!(
            "no images ({}) under {}",
            IMAGE_EXTENSIONS.join(", "),
            args.images.display()
        );
    }
    let loaded = args.net.load()?;
    let mut settings = model_settings(&args.net, &loaded, None)?;
    settings.images = root.clone();
    settings.tile = tile;
    settings.stride = stride;
    settings.bands = args.bands.as_ref().map(|b| b.to_string());
    settings.shard = args.shard.map(|s| s.to_string());
    // tests only (a build with harma-search's `fault-injection`): a crash (abort) after a step
    // of creating the index, or after N batches
    let crash_point = |var: &str| {
        harma_search::store::FAULT_INJECTION
            .then(|| std::env::var(var).ok()?.parse().ok())
            .flatten()
    };
    let crash_creating = crash_point("HARMA_INDEX_CRASH_CREATING");
    let mut writer = Writer::open_crashing(&args.out, &settings, same_build, crash_creating)?;
    writer.crash_after = crash_point("HARMA_INDEX_CRASH_AFTER");
    let (pending, sync) = writer.sync_files(&found)?;
    eprintln!(
        "{} images under {}: {} new, {} changed, {} unfinished, {} unchanged; {} gone",
        found.len(),
        args.images.display(),
        sync.new,
        sync.changed,
        sync.resumed,
        sync.unchanged,
        sync.removed
    );
    if handle_ctrlc {
        let flag = stop.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting now; the batch in flight is lost, the index is intact");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing this batch (Ctrl-C again to quit now)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let total: usize = {
        use rayon::prelude::*;
        pending
            .par_iter()
            .map(|p| tiles_left(&root, p, tile, stride))
            .sum()
    };
    let report = embed_tiles(&loaded, &mut writer, &root, &pending, args, total, stop)?;
    let removed = writer.compact()?;
    if removed > 0 {
        eprintln!("compacted the vectors: {removed} rows of changed or vanished files removed");
    }
    let (_, live) = writer.row_counts()?;
    eprintln!(
        "{} {} tiles from {} files in {:.1}s ({:.1} tiles/s){}; the index {} holds {live} tiles",
        if report.stopped {
            "stopped after"
        } else {
            "embedded"
        },
        report.tiles,
        report.files,
        report.secs,
        report.tiles as f64 / report.secs.max(1e-9),
        if report.failed > 0 {
            format!(
                ", {} unreadable files skipped (listed above)",
                report.failed
            )
        } else {
            String::new()
        },
        args.out.display()
    );
    if report.stopped {
        eprintln!("rerun the same command to continue");
    }
    Ok(report)
}

fn embed_tiles(
    loaded: &Loaded,
    writer: &mut Writer,
    root: &Path,
    pending: &[Pending],
    args: &BuildArgs,
    total: usize,
    stop: &AtomicBool,
) -> Result<BuildReport> {
    let settings = writer.settings.clone();
    let (tile, stride, size) = (settings.tile, settings.stride, settings.image_size);
    let batch = args.batch_size as usize;
    let bands = args.bands.as_ref();
    let limits = args.net.load.limits();
    let device = &loaded.model.compute.device;
    let pb = progress(total, "tiles");
    let start = std::time::Instant::now();
    let mut report = BuildReport::default();
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(1);
        let producer = s.spawn(move || {
            produce(
                root,
                pending,
                (bands, limits),
                (tile, stride, size),
                batch,
                &tx,
            )
        });
        for b in rx {
            let n = b.tiles.len();
            let vectors: Vec<f32> = if n > 0 {
                let x = Tensor::from_vec(b.pixels, (n, 3, size, size), device)?;
                loaded
                    .model
                    .encode_image(&x, loaded.hook())?
                    .flatten_all()?
                    .to_vec1()?
            } else {
                Vec::new()
            };
            for (id, msg) in &b.failed {
                let shown = harma_search::output::printable(msg);
                pb.suspend(|| eprintln!("warning: skipping {shown}"));
                writer.fail_file(*id, msg)?;
            }
            writer.append(&b.tiles, &vectors, &b.files, &b.done)?;
            report.tiles += n;
            report.files += b.done.len();
            report.failed += b.failed.len();
            pb.inc(n as u64);
            if stop.load(Ordering::SeqCst) {
                report.stopped = true;
                break; // dropping rx stops the producer
            }
        }
        producer.join().expect("the tiling thread panicked");
        Ok(())
    })?;
    pb.finish();
    report.secs = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The producer: decode files (several at once), cut them into tiles and send batches of
/// `batch` preprocessed tiles. Stops when the receiver is gone.
fn produce(
    root: &Path,
    pending: &[Pending],
    (bands, limits): (Option<&Bands>, LoadLimits),
    (tile, stride, size): (usize, usize, usize),
    batch: usize,
    tx: &std::sync::mpsc::SyncSender<Batch>,
) {
    use rayon::prelude::*;
    let mut files = pending.iter().peekable();
    let mut open: std::collections::VecDeque<Open> = Default::default();
    let mut failed = Vec::new();
    loop {
        // decode files until a batch's worth of tiles is open (a group in parallel)
        let queued: usize = open.iter().map(|o| o.grid.len() - o.next).sum();
        if queued < batch && files.peek().is_some() {
            // at most the files a batch needs, and about 64 MiB of them on disk: large rasters
            // one or a few at a time
            let mut group: Vec<&Pending> = Vec::new();
            let mut bytes = 0u64;
            while group.len() < (batch - queued).max(1) && (group.is_empty() || bytes < 64 << 20) {
                let Some(p) = files.next() else { break };
                bytes += std::fs::metadata(root.join(&p.rel)).map_or(0, |m| m.len());
                group.push(p);
            }
            let decoded: Vec<std::result::Result<Open, (i64, String)>> = group
                .par_iter()
                .map(|p| {
                    let path = root.join(&p.rel);
                    let failed = |e: harma_data::Error| (p.file_id, e.to_string());
                    let img = load_raster(&path, bands, limits).map_err(failed)?;
                    let geo = read_georef(&path).map_err(failed)?;
                    let grid = tile_grid(img.width, img.height, tile, stride);
                    Ok(Open {
                        file_id: p.file_id,
                        update: Some(FileUpdate {
                            file_id: p.file_id,
                            width: img.width,
                            height: img.height,
                            n_tiles: grid.len(),
                            geo,
                        }),
                        img: Arc::new(img),
                        next: p.tiles_done.min(grid.len()),
                        grid,
                    })
                })
                .collect();
            for d in decoded {
                match d {
                    Ok(o) => open.push_back(o),
                    Err(f) => failed.push(f),
                }
            }
            continue;
        }
        if open.is_empty() && failed.is_empty() {
            return;
        }
        // take the next batch's tiles
        let mut b = Batch {
            pixels: Vec::new(),
            tiles: Vec::new(),
            files: Vec::new(),
            done: Vec::new(),
            failed: std::mem::take(&mut failed),
        };
        let mut work: Vec<(Arc<RgbImage>, Tile)> = Vec::new();
        while b.tiles.len() < batch {
            let Some(o) = open.front_mut() else { break };
            if let Some(u) = o.update.take() {
                b.files.push(u);
            }
            while b.tiles.len() < batch && o.next < o.grid.len() {
                b.tiles.push(NewTile {
                    file_id: o.file_id,
                    seq: o.next,
                    tile: o.grid[o.next],
                });
                work.push((o.img.clone(), o.grid[o.next]));
                o.next += 1;
            }
            if o.next == o.grid.len() {
                b.done.push(o.file_id);
                open.pop_front();
            }
        }
        let pixels: Vec<Vec<f32>> = work
            .par_iter()
            .map(|(img, t)| preprocess_tile(img, t, size))
            .collect();
        b.pixels = pixels.concat();
        if tx.send(b).is_err() {
            return;
        }
    }
}
