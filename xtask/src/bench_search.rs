//! `cargo xtask bench-search`: what docs/SEARCH.md and docs/BENCHMARKS.md report for search.
//!
//! 1. Index build vs embedding, in one process, alternating: `harma index build`'s library
//!    (`harma_train::index::build`) over a folder of 256x256 scenes (one tile each) and over
//!    large rasters cut into 256-pixel tiles, against `harma embed`'s (`Encoder::images`) over
//!    the same 256x256 files, with one random ViT-B/32 checkpoint.
//! 2. Query latency at 10k, 100k and 1M entries (synthetic unit vectors from a mixture of
//!    clustered directions, as embeddings are): the text tower on a query, exact search (our
//!    GEMM + a heap), and an HNSW index (instant-distance) with its build time and recall@10
//!    against exact.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use harma_clip::{ClipConfig, ClipTokenizer};
use harma_data::rng::Rng;
use harma_search::exact;
use harma_search::store::Vectors;
use harma_train::device::ComputeArgs;
use harma_train::encode::Encoder;
use harma_train::index::BuildArgs;
use harma_train::model::{BackboneArgs, ModelArgs};

use crate::workloads::median;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Index sizes for the latency part (entries)
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub sizes: Vec<usize>,
    /// Build HNSW indexes up to this size (their build is the slow part: 147 s at 10k on 2
    /// cores)
    #[arg(long, default_value_t = 10_000)]
    pub ann_max: usize,
    /// Text queries timed per size
    #[arg(long, default_value_t = 100)]
    pub queries: usize,
    /// Embedding size of the synthetic vectors
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    /// 256x256 images for the build-vs-embed part (0 skips it)
    #[arg(long, default_value_t = 96)]
    pub images: usize,
    /// Rounds of build-vs-embed (alternating; medians)
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Write the results as JSON
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: &Args) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    println!("harma-rs bench-search: {} ({threads} threads)", cpu_name());
    let mut out = serde_json::Map::new();
    out.insert("cpu".into(), cpu_name().into());
    out.insert("threads".into(), threads.into());
    let work = std::env::temp_dir().join(format!("harma-bench-search-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = (|| -> Result<()> {
        let cfg = ClipConfig::vit_b32_quickgelu();
        let model_path = work.join("vit-b-32-random.safetensors");
        {
            let weights = crate::workloads::random_weights(&cfg, &candle_core::Device::Cpu)?;
            let named: Vec<(&str, &candle_core::Tensor)> =
                weights.iter().map(|(k, v)| (k.as_str(), v)).collect();
            harma_train::output::write_safetensors(
                &model_path,
                &named,
                std::iter::empty::<(String, String)>(),
            )?;
        }
        let net = ModelArgs {
            model: model_path.clone(),
            backbone: BackboneArgs::default(),
            compute: ComputeArgs::default(),
        };
        if args.images > 0 {
            out.insert("build".into(), build_vs_embed(args, &net, &work)?);
        }
        out.insert("latency".into(), latency(args, &net)?);
        Ok(())
    })();
    std::fs::remove_dir_all(&work).ok();
    result?;
    if let Some(p) = &args.json {
        crate::write_json(p, &serde_json::Value::Object(out))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Part 1: tiles/s of `index build` against images/s of `embed`, same files, alternating.
fn build_vs_embed(args: &Args, net: &ModelArgs, work: &Path) -> Result<serde_json::Value> {
    let small = work.join("scenes");
    let large = work.join("rasters");
    std::fs::create_dir_all(&small)?;
    std::fs::create_dir_all(&large)?;
    let mut rng = Rng::new(5);
    let mut files = Vec::new();
    for i in 0..args.images {
        let scene = harma_data::synth::Scene::random(&mut rng);
        let img = scene.render(256, &mut rng);
        let p = small.join(format!("{i:05}.png"));
        image::RgbImage::from_raw(256, 256, img.data)
            .context("scene size")?
            .save(&p)?;
        files.push(p);
    }
    // large rasters: 1024x1024 mosaics of scenes, 16 tiles each, about as many tiles in all
    let n_large = args.images.div_ceil(16).max(1);
    for i in 0..n_large {
        let mut mosaic = image::RgbImage::new(1024, 1024);
        for t in 0..16 {
            let scene = harma_data::synth::Scene::random(&mut rng);
            let img = scene.render(256, &mut rng);
            let tile = image::RgbImage::from_raw(256, 256, img.data).context("scene size")?;
            image::imageops::replace(&mut mosaic, &tile, (t % 4) * 256, (t / 4) * 256);
        }
        mosaic.save(large.join(format!("{i:03}.tif")))?;
    }
    let loaded = net.load()?;
    let encoder = Encoder {
        model: &loaded.model,
        hook: None,
        batch: 32,
    };
    let (mut embed_rates, mut small_rates, mut large_rates) = (Vec::new(), Vec::new(), Vec::new());
    let hidden = indicatif::ProgressBar::hidden();
    for round in 0..args.rounds {
        let t = Instant::now();
        encoder.images(&files, &hidden)?;
        embed_rates.push(files.len() as f64 / t.elapsed().as_secs_f64());
        for (images, rates) in [(&small, &mut small_rates), (&large, &mut large_rates)] {
            let out = work.join(format!("index-{round}-{}", rates.len()));
            let b = BuildArgs {
                net: net.clone(),
                images: images.clone(),
                out: out.clone(),
                tile: 256,
                stride: None,
                bands: None,
                batch_size: 32,
            };
            let report = harma_train::index::build(&b, &Arc::new(AtomicBool::new(false)), false)?;
            rates.push(report.tiles as f64 / report.secs);
            std::fs::remove_dir_all(&out)?;
        }
        println!(
            "round {round}: embed {:.2} images/s, index build {:.2} tiles/s (256x256 files), {:.2} tiles/s (1024x1024 rasters)",
            embed_rates[round], small_rates[round], large_rates[round]
        );
    }
    let (e, s, l) = (
        median(&embed_rates),
        median(&small_rates),
        median(&large_rates),
    );
    println!(
        "median: embed {e:.2} images/s; index build {s:.2} tiles/s ({:.2}x) on 256x256 files, {l:.2} tiles/s ({:.2}x) on 1024x1024 rasters",
        s / e,
        l / e
    );
    Ok(serde_json::json!({
        "model": "ViT-B/32 (random weights), f32, batch 32",
        "images": files.len(), "rasters": n_large,
        "embed_images_per_s": e, "index_tiles_per_s_small": s, "index_tiles_per_s_large": l,
        "ratio_small": s / e, "ratio_large": l / e,
    }))
}

/// Unit vectors around `centres` clustered directions (as embeddings of an archive are).
fn clustered(n: usize, dim: usize, centres: &[Vec<f32>], rng: &mut Rng) -> Vec<f32> {
    let mut gauss = || {
        let (u1, u2) = (1.0 - rng.uniform(), rng.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = &centres[(i * 7919) % centres.len()];
        let v: Vec<f32> = c
            .iter()
            .map(|&x| x + 0.6 * gauss() / (dim as f32).sqrt())
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(v.iter().map(|x| x / norm));
    }
    out
}

#[derive(Clone)]
struct Point(Arc<Vec<f32>>, usize, usize);

impl instant_distance::Point for Point {
    fn distance(&self, other: &Self) -> f32 {
        let d = self.2;
        let a = &self.0[self.1 * d..(self.1 + 1) * d];
        let b = &other.0[other.1 * d..(other.1 + 1) * d];
        1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
    }
}

/// Part 2: query latency, exact and HNSW, and recall@10.
fn latency(args: &Args, net: &ModelArgs) -> Result<serde_json::Value> {
    let dim = args.dim;
    let mut rng = Rng::new(9);
    let centres: Vec<Vec<f32>> = (0..1000)
        .map(|_| {
            let v: Vec<f32> = (0..dim).map(|_| rng.range(-1.0, 1.0) as f32).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect()
        })
        .collect();
    // the text tower's share: one query at a time, as `harma serve` embeds them
    let loaded = net.load()?;
    let tok = ClipTokenizer::new(77)?;
    let caps = crate::workloads::captions(args.queries.max(1))?;
    let mut text_ms = Vec::new();
    for c in &caps {
        let t = Instant::now();
        harma_train::search::embed_text(&loaded, &tok, c)?;
        text_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (tp50, tp95) = (
        percentile(&mut text_ms, 0.5),
        percentile(&mut text_ms, 0.95),
    );
    println!(
        "text query embedding (ViT-B/32 text tower, one query): p50 {tp50:.1} ms, p95 {tp95:.1} ms"
    );
    drop(loaded);
    let queries = clustered(args.queries, dim, &centres, &mut Rng::new(77));
    let mut rows = Vec::new();
    println!(
        "{:>9} {:>11} {:>11} {:>11} {:>11} {:>9} {:>12}",
        "entries", "exact p50", "exact p95", "hnsw p50", "hnsw p95", "recall@10", "hnsw build"
    );
    for &n in &args.sizes {
        let data = clustered(n, dim, &centres, &mut Rng::derive(1, &[n as u64]));
        let v = Vectors {
            dim,
            ids: (0..n as i64).collect(),
            data,
        };
        let mut exact_ms = Vec::new();
        let mut exact_top = Vec::new();
        for q in queries.chunks(dim) {
            let t = Instant::now();
            let hits = exact::search(&v, q, 10);
            exact_ms.push(t.elapsed().as_secs_f64() * 1e3);
            exact_top.push(hits.iter().map(|h| h.id as usize).collect::<Vec<_>>());
        }
        let (ep50, ep95) = (
            percentile(&mut exact_ms, 0.5),
            percentile(&mut exact_ms, 0.95),
        );
        let mut row = serde_json::json!({
            "entries": n, "exact_p50_ms": ep50, "exact_p95_ms": ep95,
            "text_p50_ms": tp50, "text_p95_ms": tp95,
        });
        let mut ann = String::from("          -           -         -            -");
        if n <= args.ann_max {
            let shared = Arc::new(v.data);
            let points: Vec<Point> = (0..n).map(|i| Point(shared.clone(), i, dim)).collect();
            let values: Vec<usize> = (0..n).collect();
            let t = Instant::now();
            let map = instant_distance::Builder::default()
                .seed(7)
                .build(points, values);
            let build_s = t.elapsed().as_secs_f64();
            let qdata = Arc::new(queries.clone());
            let mut ann_ms = Vec::new();
            let mut hit = 0usize;
            let mut search = instant_distance::Search::default();
            for (qi, top) in exact_top.iter().enumerate() {
                let q = Point(qdata.clone(), qi, dim);
                let t = Instant::now();
                let found: Vec<usize> = map
                    .search(&q, &mut search)
                    .take(10)
                    .map(|m| *m.value)
                    .collect();
                ann_ms.push(t.elapsed().as_secs_f64() * 1e3);
                hit += found.iter().filter(|f| top.contains(f)).count();
            }
            let recall = hit as f64 / (10 * exact_top.len()) as f64;
            let (ap50, ap95) = (percentile(&mut ann_ms, 0.5), percentile(&mut ann_ms, 0.95));
            ann = format!("{ap50:>8.3} ms {ap95:>8.3} ms {recall:>9.3} {build_s:>10.1} s");
            row["hnsw_p50_ms"] = ap50.into();
            row["hnsw_p95_ms"] = ap95.into();
            row["recall_at_10"] = recall.into();
            row["hnsw_build_s"] = build_s.into();
        }
        println!("{n:>9} {ep50:>8.2} ms {ep95:>8.2} ms {ann}");
        rows.push(row);
    }
    Ok(serde_json::json!({
        "dim": dim, "queries": args.queries, "k": 10,
        "vectors": "unit vectors around 1000 random directions (noise 0.6/sqrt(dim) per coordinate)",
        "hnsw": "instant-distance 0.6 defaults (ef_construction 100, ef_search 100, M 32)",
        "rows": rows,
    }))
}
