//! `cargo xtask bench-search`: what docs/SEARCH.md and docs/BENCHMARKS.md report for search.
//!
//! 1. Index build vs embedding, in one process, alternating: `harma index build`'s library
//!    (`harma_train::index::build`) over a folder of 256x256 scenes (one tile each) and over
//!    large rasters cut into 256-pixel tiles, against `harma embed`'s (`Encoder::images`) over
//!    the same 256x256 files, with one random ViT-B/32 checkpoint.
//! 2. Query latency at 10k, 100k and 1M entries (synthetic unit vectors from a mixture of
//!    clustered directions, as embeddings are): the text tower on a query, exact search (our
//!    GEMM + a heap), an IVF-flat index (k-means lists searched by the same GEMM) at every size,
//!    and an HNSW index (instant-distance) up to `--ann-max`, each with its build time and
//!    recall@10 against exact.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use harma_clip::{ClipConfig, ClipTokenizer};
use harma_data::rng::Rng;
use harma_kernels::compute::ComputeSettings;
use harma_kernels::raw::gemm::gemm_acc;
use harma_model::encode::Encoder;
use harma_search::exact;
use harma_search::store::Vectors;
use harma_train::flags::Flags;
use harma_train::index::BuildArgs;
use harma_train::model::ModelArgs;

use crate::workloads::median;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Index sizes for the latency part (entries)
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub sizes: Vec<usize>,
    /// Build HNSW indexes up to this size (their build is the slow part: 108-205 s at 10k on 2
    /// cores)
    #[arg(long, default_value_t = 10_000)]
    pub ann_max: usize,
    /// Lists an IVF query searches (one row each per size)
    #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
    pub nprobe: Vec<usize>,
    /// Directions the synthetic vectors cluster around; 0: uniform on the sphere (the worst
    /// case for the ANN indexes)
    #[arg(long, default_value_t = 1000)]
    pub clusters: usize,
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
        crate::workloads::write_random_model(
            &cfg,
            harma_clip::checkpoint::RandomInit::Clip,
            &mut Rng::new(0),
            &model_path,
        )?;
        let net = ModelArgs {
            model: model_path.clone(),
            backbone: Flags::default(),
            compute: Flags::<ComputeSettings>::default(),
            load: Flags::default(),
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
        let scene = harma_train::synth::Scene::random(&mut rng);
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
            let scene = harma_train::synth::Scene::random(&mut rng);
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
        limits: Default::default(),
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
                shard: None,
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

/// Unit vectors around `centres` clustered directions (as embeddings of an archive are); with
/// no centres, uniform on the sphere (no structure at all: the hardest case for an ANN index).
fn clustered(n: usize, dim: usize, centres: &[Vec<f32>], rng: &mut Rng) -> Vec<f32> {
    let origin = [vec![0.0f32; dim]];
    let (centres, noise) = if centres.is_empty() {
        (&origin[..], 1.0)
    } else {
        (centres, 0.6)
    };
    let mut gauss = || {
        let (u1, u2) = (1.0 - rng.uniform(), rng.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = &centres[(i * 7919) % centres.len()];
        let v: Vec<f32> = c
            .iter()
            .map(|&x| x + noise * gauss() / (dim as f32).sqrt())
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

/// An inverted-file index (IVF-flat): `sqrt(n)` k-means centroids, each vector stored in the
/// list of its nearest one; a query scores the centroids, then the vectors of its `nprobe` best
/// lists exactly. Lists are kept contiguous so that each is one GEMV.
struct Ivf {
    dim: usize,
    centroids: Vec<f32>,
    /// the vectors ordered by list, `offsets[l]..offsets[l + 1]` the rows of list `l`
    data: Vec<f32>,
    ids: Vec<usize>,
    offsets: Vec<usize>,
}

/// The index of the nearest (highest dot product) centroid of every row of `x`, in chunks so
/// that the score matrix stays small.
fn nearest(x: &[f32], dim: usize, centroids: &[f32]) -> Vec<usize> {
    let c = centroids.len() / dim;
    let mut out = Vec::with_capacity(x.len() / dim);
    let mut y = Vec::new();
    for rows in x.chunks(4096 * dim) {
        let m = rows.len() / dim;
        y.clear();
        y.resize(m * c, 0.0f32);
        gemm_acc(&mut y, rows, m, dim, c, (centroids, 1, dim as isize));
        out.extend(y.chunks(c).map(|s| {
            s.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i)
        }));
    }
    out
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

impl Ivf {
    /// Spherical k-means (10 Lloyd rounds) on a sample of 32 vectors per list, then every
    /// vector assigned to its nearest centroid.
    fn build(data: &[f32], dim: usize, rng: &mut Rng) -> Ivf {
        let n = data.len() / dim;
        let lists = ((n as f64).sqrt().round() as usize).clamp(1, n.max(1));
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        let sample: Vec<f32> = order[..(32 * lists).min(n)]
            .iter()
            .flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        let mut centroids: Vec<f32> = sample[..lists * dim].to_vec();
        for _ in 0..10 {
            let assign = nearest(&sample, dim, &centroids);
            let mut sums = vec![0.0f32; lists * dim];
            let mut counts = vec![0usize; lists];
            for (row, &l) in sample.chunks(dim).zip(&assign) {
                counts[l] += 1;
                sums[l * dim..(l + 1) * dim]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(s, x)| *s += x);
            }
            for l in 0..lists {
                let dst = &mut centroids[l * dim..(l + 1) * dim];
                if counts[l] == 0 {
                    // an empty list restarts at a random sample vector
                    let r = rng.below(sample.len() / dim);
                    dst.copy_from_slice(&sample[r * dim..(r + 1) * dim]);
                } else {
                    dst.copy_from_slice(&sums[l * dim..(l + 1) * dim]);
                    normalise(dst);
                }
            }
        }
        let assign = nearest(data, dim, &centroids);
        let mut ids: Vec<usize> = (0..n).collect();
        ids.sort_by_key(|&i| assign[i]);
        let mut offsets = vec![0usize; lists + 1];
        for &l in &assign {
            offsets[l + 1] += 1;
        }
        for l in 0..lists {
            offsets[l + 1] += offsets[l];
        }
        let sorted = ids
            .iter()
            .flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        Ivf {
            dim,
            centroids,
            data: sorted,
            ids,
            offsets,
        }
    }

    /// The ids of the `k` best vectors among the `nprobe` lists nearest to `q`.
    fn search(&self, q: &[f32], k: usize, nprobe: usize) -> Vec<usize> {
        let d = self.dim;
        let lists = self.offsets.len() - 1;
        let mut cs = vec![0.0f32; lists];
        gemm_acc(&mut cs, &self.centroids, lists, d, 1, (q, 1, 1));
        let mut cands: Vec<(usize, f32)> = Vec::new();
        for (l, _) in exact::top_k(&cs, nprobe) {
            let (a, b) = (self.offsets[l], self.offsets[l + 1]);
            if a == b {
                continue;
            }
            let mut y = vec![0.0f32; b - a];
            gemm_acc(&mut y, &self.data[a * d..b * d], b - a, d, 1, (q, 1, 1));
            cands.extend(exact::top_k(&y, k).into_iter().map(|(r, s)| (a + r, s)));
        }
        let scores: Vec<f32> = cands.iter().map(|c| c.1).collect();
        exact::top_k(&scores, k)
            .into_iter()
            .map(|(i, _)| self.ids[cands[i].0])
            .collect()
    }
}

/// The share of `exact`'s top-k that `found` holds, over all queries.
fn recall(found: &[Vec<usize>], exact: &[Vec<usize>]) -> f64 {
    let hit: usize = found
        .iter()
        .zip(exact)
        .map(|(f, e)| f.iter().filter(|x| e.contains(x)).count())
        .sum();
    hit as f64 / exact.iter().map(Vec::len).sum::<usize>().max(1) as f64
}

/// Latency percentiles of a search over every query, and what it found.
struct Timed {
    p50: f64,
    p95: f64,
    found: Vec<Vec<usize>>,
}

fn timed(queries: &[f32], dim: usize, mut f: impl FnMut(&[f32]) -> Vec<usize>) -> Timed {
    let mut ms = Vec::new();
    let mut found = Vec::new();
    for q in queries.chunks(dim) {
        let t = Instant::now();
        found.push(f(q));
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Timed {
        p50: percentile(&mut ms, 0.5),
        p95: percentile(&mut ms, 0.95),
        found,
    }
}

/// Part 2: query latency, exact, IVF and HNSW, and recall@10.
fn latency(args: &Args, net: &ModelArgs) -> Result<serde_json::Value> {
    let dim = args.dim;
    let mut rng = Rng::new(9);
    let centres: Vec<Vec<f32>> = (0..args.clusters)
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
        "{:>9}  {:<26} {:>10} {:>10} {:>9} {:>9}",
        "entries", "search", "p50", "p95", "recall@10", "build"
    );
    let line = |n: usize, what: &str, t: &Timed, recall: f64, build: Option<f64>| {
        let build = build.map_or("-".into(), |s| format!("{s:.1} s"));
        println!(
            "{n:>9}  {what:<26} {:>7.3} ms {:>7.3} ms {recall:>9.3} {build:>9}",
            t.p50, t.p95
        );
    };
    for &n in &args.sizes {
        let data = clustered(n, dim, &centres, &mut Rng::derive(1, &[n as u64]));
        let v = Vectors {
            dim,
            ids: (0..n as i64).collect(),
            data,
        };
        let exact = timed(&queries, dim, |q| {
            exact::search(&v, q, 10)
                .iter()
                .map(|h| h.id as usize)
                .collect()
        });
        line(n, "exact", &exact, 1.0, None);
        let mut row = serde_json::json!({
            "entries": n, "exact_p50_ms": exact.p50, "exact_p95_ms": exact.p95,
            "text_p50_ms": tp50, "text_p95_ms": tp95,
        });
        let t = Instant::now();
        let ivf = Ivf::build(&v.data, dim, &mut Rng::derive(3, &[n as u64]));
        let ivf_build = t.elapsed().as_secs_f64();
        let lists = ivf.offsets.len() - 1;
        let mut ivf_rows = Vec::new();
        for &nprobe in &args.nprobe {
            let r = timed(&queries, dim, |q| ivf.search(q, 10, nprobe));
            let rc = recall(&r.found, &exact.found);
            let first = ivf_rows.is_empty();
            line(
                n,
                &format!("ivf {lists} lists, nprobe {nprobe}"),
                &r,
                rc,
                first.then_some(ivf_build),
            );
            ivf_rows.push(serde_json::json!({
                "nprobe": nprobe, "p50_ms": r.p50, "p95_ms": r.p95, "recall_at_10": rc,
            }));
        }
        drop(ivf);
        row["ivf"] = serde_json::json!({"lists": lists, "build_s": ivf_build, "probes": ivf_rows});
        if n <= args.ann_max {
            let shared = Arc::new(v.data);
            let points: Vec<Point> = (0..n).map(|i| Point(shared.clone(), i, dim)).collect();
            let values: Vec<usize> = (0..n).collect();
            let t = Instant::now();
            let map = instant_distance::Builder::default()
                .seed(7)
                .build(points, values);
            let build_s = t.elapsed().as_secs_f64();
            let mut search = instant_distance::Search::default();
            let r = timed(&queries, dim, |q| {
                let q = Point(Arc::new(q.to_vec()), 0, dim);
                map.search(&q, &mut search)
                    .take(10)
                    .map(|m| *m.value)
                    .collect()
            });
            let rc = recall(&r.found, &exact.found);
            line(n, "hnsw", &r, rc, Some(build_s));
            row["hnsw_p50_ms"] = r.p50.into();
            row["hnsw_p95_ms"] = r.p95.into();
            row["recall_at_10"] = rc.into();
            row["hnsw_build_s"] = build_s.into();
        }
        rows.push(row);
    }
    Ok(serde_json::json!({
        "dim": dim, "queries": args.queries, "k": 10,
        "vectors": if args.clusters > 0 {
            format!("unit vectors around {} random directions (noise 0.6/sqrt(dim) per coordinate)", args.clusters)
        } else {
            "unit vectors uniform on the sphere".to_string()
        },
        "hnsw": "instant-distance 0.6 defaults (ef_construction 100, ef_search 100, M 32)",
        "ivf": "IVF-flat: round(sqrt(n)) spherical k-means lists (10 rounds on 32 vectors a list), our GEMM",
        "rows": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probing every list is exact search; probing fewer finds a subset of it, and every
    /// vector sits in the list of its nearest centroid.
    #[test]
    fn ivf_probing_all_lists_is_exact_search() {
        let dim = 16;
        let mut rng = Rng::new(1);
        let centres: Vec<Vec<f32>> = (0..20)
            .map(|_| {
                let mut v: Vec<f32> = (0..dim).map(|_| rng.range(-1.0, 1.0) as f32).collect();
                normalise(&mut v);
                v
            })
            .collect();
        let n = 1500;
        let data = clustered(n, dim, &centres, &mut rng);
        let ivf = Ivf::build(&data, dim, &mut Rng::new(2));
        let lists = ivf.offsets.len() - 1;
        assert_eq!(lists, 39);
        assert_eq!(ivf.offsets[lists], n);
        let assign = nearest(&data, dim, &ivf.centroids);
        for l in 0..lists {
            for &i in &ivf.ids[ivf.offsets[l]..ivf.offsets[l + 1]] {
                assert_eq!(assign[i], l);
            }
        }
        let v = Vectors {
            dim,
            ids: (0..n as i64).collect(),
            data: data.clone(),
        };
        let queries = clustered(30, dim, &centres, &mut Rng::new(3));
        let (mut few, mut all) = (Vec::new(), Vec::new());
        for q in queries.chunks(dim) {
            let want: Vec<usize> = exact::search(&v, q, 10)
                .iter()
                .map(|h| h.id as usize)
                .collect();
            assert_eq!(ivf.search(q, 10, lists), want);
            few.push(ivf.search(q, 10, 2));
            all.push(want);
        }
        let r = recall(&few, &all);
        assert!(r > 0.0 && r <= 1.0, "{r}");
        assert_eq!(recall(&all, &all), 1.0);
    }
}
