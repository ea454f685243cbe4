//! `cargo xtask bench`: embedding throughput and the training step at ViT-B/32 size (random
//! weights), evaluation of an RSITMD-sized split from disk and the metrics, with the same
//! workloads run by open_clip and the original HarMA in PyTorch in the same invocation when
//! `--torch-python` is given. Prints a table and writes JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use harma_clip::{BlockHook, Clip, ClipConfig, ClipTokenizer, Kernels, Precision};
use harma_kernels::compute::ComputeSettings;
use harma_train::flags::Flags;

use crate::workloads::{
    caption_ids, child_json, median, peak_rss_gb, random_model, rate, run_python,
    train_pairs_per_s, FullContext,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fewer timed batches (a smoke run, noisier numbers)
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON here
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// A Python with torch and open_clip_torch: run the same workloads in PyTorch too
    #[arg(long, value_name = "PY")]
    torch_python: Option<PathBuf>,
    /// A checkout of the original HarMA repository: with --torch-python, also time its training
    /// step (xtask/bench_torch_train.py)
    #[arg(long, value_name = "DIR")]
    harma_repo: Option<PathBuf>,
    /// Batch size
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

/// `cargo xtask bench-step`: one process timing the training step alone, so its peak memory
/// is its own (the bench runs it per mode).
#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// Candle's generic ops and backward: frozen weights get gradients, no fused kernels
    #[arg(long)]
    naive: bool,
    /// Recompute one block at a time in the backward (`harma train --recompute`)
    #[arg(long)]
    recompute: bool,
    #[command(flatten)]
    compute: Flags<ComputeSettings>,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    iters: usize,
}

/// Print `{"pairs_per_s", "peak_rss_gb"}` for one training-step mode.
pub fn run_step(args: &StepArgs) -> Result<()> {
    let mut compute = args.compute.compute()?;
    if args.naive {
        compute = compute.with_kernels(Kernels::Generic);
    }
    let b = args.batch;
    let cfg = ClipConfig::vit_b32_quickgelu();
    let model = random_model(&cfg, &compute)?;
    let ids = caption_ids(&cfg, b, &compute.device)?;
    let pixels = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &compute.device)?;
    let pairs_per_s = train_pairs_per_s(&model, &pixels, &ids, args.iters, args.recompute)?;
    let out = serde_json::json!({"pairs_per_s": pairs_per_s, "peak_rss_gb": peak_rss_gb()});
    println!("{out}");
    Ok(())
}

/// Forward FLOPs of one transformer block over `l` tokens of width `d`.
fn block_flops(l: usize, d: usize, mlp: usize) -> f64 {
    let (l, d, mlp) = (l as f64, d as f64, mlp as f64);
    2.0 * l * d * (4.0 * d + 2.0 * mlp) + 4.0 * l * l * d
}

/// What an embedding workload embeds.
enum Input<'a> {
    Images(&'a Tensor),
    Captions(&'a Tensor, Option<&'a dyn BlockHook>),
}

/// An embedding workload: a model on an input, its FLOPs per item, and the key of the same
/// workload in the PyTorch script's output.
struct EmbedWorkload<'a> {
    name: &'static str,
    model: &'a Clip,
    input: Input<'a>,
    flops: f64,
    torch_key: &'static str,
}

impl EmbedWorkload<'_> {
    /// Items per second over `iters` batches of `b`.
    fn rate(&self, b: usize, iters: usize) -> Result<f64> {
        rate(b, iters, || {
            match self.input {
                Input::Images(px) => self.model.encode_image(px, None)?,
                Input::Captions(ids, hook) => self.model.encode_text(ids, hook)?,
            };
            Ok(())
        })
    }
}

/// Who runs a training-step mode, each in its own process.
enum Runner {
    /// `xtask bench-step` with these flags
    Ours(&'static [&'static str]),
    /// xtask/bench_torch_train.py, under bf16 autocast or not
    Torch { bf16: bool },
}

/// A training-step mode, and the mode its ratio column compares it with.
struct StepMode {
    name: &'static str,
    runner: Runner,
    compared_with: Option<&'static str>,
}

const STEP_MODES: &[StepMode] = &[
    StepMode {
        name: "harma-rs",
        runner: Runner::Ours(&[]),
        compared_with: Some("PyTorch"),
    },
    StepMode {
        name: "naive Candle",
        runner: Runner::Ours(&["--naive"]),
        compared_with: Some("PyTorch"),
    },
    StepMode {
        name: "PyTorch",
        runner: Runner::Torch { bf16: false },
        compared_with: None,
    },
    StepMode {
        name: "--recompute",
        runner: Runner::Ours(&["--recompute"]),
        compared_with: Some("PyTorch"),
    },
    StepMode {
        name: "harma-rs bf16",
        runner: Runner::Ours(&["--precision", "bf16"]),
        compared_with: Some("PyTorch bf16"),
    },
    StepMode {
        name: "PyTorch bf16",
        runner: Runner::Torch { bf16: true },
        compared_with: None,
    },
    StepMode {
        name: "bf16 --recompute",
        runner: Runner::Ours(&["--precision", "bf16", "--recompute"]),
        compared_with: Some("PyTorch bf16"),
    },
];

/// One measurement of a step mode: `(pairs/s, peak RSS GB)`, or `None` for PyTorch without
/// `--torch-python` and `--harma-repo`.
fn step_mode(
    mode: &StepMode,
    args: &Args,
    iters: usize,
    threads: usize,
) -> Result<Option<(f64, f64)>> {
    let j = match mode.runner {
        Runner::Ours(flags) => {
            let mut a: Vec<String> = ["bench-step", "--device", "cpu", "--batch"]
                .map(String::from)
                .to_vec();
            a.extend([args.batch.to_string(), "--iters".into(), iters.to_string()]);
            a.extend(flags.iter().map(|f| f.to_string()));
            child_json(&a)?
        }
        Runner::Torch { bf16 } => {
            let (Some(py), Some(repo)) = (&args.torch_python, &args.harma_repo) else {
                return Ok(None);
            };
            let (bs, it) = (args.batch.to_string(), iters.to_string());
            let mut script_args = vec![
                std::ffi::OsStr::new("--batch"),
                bs.as_ref(),
                "--harma-repo".as_ref(),
                repo.as_os_str(),
                "--iters".as_ref(),
                it.as_ref(),
            ];
            if bf16 {
                script_args.push("--bf16".as_ref());
            }
            run_python(py, "xtask/bench_torch_train.py", &script_args, threads)?
        }
    };
    let get = |k: &str| {
        j[k].as_f64()
            .with_context(|| format!("{}: no {k}", mode.name))
    };
    Ok(Some((get("pairs_per_s")?, get("peak_rss_gb")?)))
}

/// Seconds to evaluate a random `n_img` x `5 n_img` score matrix (5 captions per image).
fn metrics_seconds(n_img: usize) -> Result<f64> {
    use rayon::prelude::*;
    let n_txt = 5 * n_img;
    let mut s = vec![0f32; n_img * n_txt];
    s.par_chunks_mut(n_txt).enumerate().for_each(|(i, row)| {
        let mut x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(1);
        for v in row.iter_mut() {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *v = (x >> 8) as f32 / (1u32 << 24) as f32;
        }
    });
    let txt2img: Vec<usize> = (0..n_txt).map(|j| j / 5).collect();
    let t = Instant::now();
    harma_metrics::evaluate(&s, n_img, &txt2img)?;
    Ok(t.elapsed().as_secs_f64())
}

/// `harma eval` on an RSITMD-test-sized split from disk (452 256x256 .tif scenes, 2,260
/// captions), with the random ViT-B/32: seconds of decoding (busy), embedding (busy), the image
/// side (overlapped), captions and metrics.
fn eval_rsitmd_sized(model: &Clip, batch: usize) -> Result<serde_json::Value> {
    use harma_train::synth::{write_dataset, SynthSizes};
    let dir = std::env::temp_dir().join(format!("harma-bench-eval-{}", std::process::id()));
    let sizes = SynthSizes {
        train: 0,
        val: 0,
        test: 452,
        size: 256,
        ext: "tif",
    };
    write_dataset(&dir, sizes, 1)?;
    let images = dir.join("images");
    let set = harma_model::eval::load_split(&dir.join("test.json"), &images, false)?;
    let tok = ClipTokenizer::new(model.config.text.context_length)?;
    let t = Instant::now();
    let encoder = harma_model::encode::Encoder {
        model,
        hook: None,
        batch,
        limits: Default::default(),
    };
    let opts = harma_model::eval::EvalOptions {
        image_root: &images,
        progress: false,
    };
    let (_, timings) = harma_model::eval::evaluate_split(&encoder, &tok, &set, &opts)?;
    let total = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir).ok();
    let mut j = serde_json::to_value(&timings)?;
    j["total"] = total.into();
    j["images_count"] = set.images.len().into();
    j["captions_count"] = set.captions.len().into();
    Ok(j)
}

/// The linear layers' shapes of a ViT-B/32 block: (in, out).
const LINEAR_SHAPES: [(usize, usize); 4] = [(768, 2304), (768, 768), (768, 3072), (3072, 768)];

/// GFLOP/s of the f32 GEMM and of every bf16 kernel this CPU has on the linear layers' shapes
/// (`rows` rows, forward, packed weights), and the register-only peak of AVX512-BF16.
fn kernel_gflops(rows: usize, iters: usize) -> Result<serde_json::Value> {
    use harma_kernels::bf16_linear::Bf16Linear;
    use harma_kernels::Bf16Kernel;
    let values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect()
    };
    let mut out = serde_json::Map::new();
    for (inp, outd) in LINEAR_SHAPES {
        let (x, w_t) = (values(rows * inp), values(inp * outd));
        let flops = 2.0 * (rows * inp * outd) as f64 / 1e9;
        let per_s = |f: &dyn Fn()| {
            rate(1, iters, || {
                f();
                Ok(())
            })
            .map(|r| r * flops)
        };
        let mut row = serde_json::Map::new();
        let f32 = per_s(&|| {
            std::hint::black_box(harma_kernels::raw::gemm::linear_f32(
                &x,
                &w_t,
                None,
                (rows, inp, outd),
            ));
        })?;
        row.insert("f32".into(), f32.into());
        for kernel in Bf16Kernel::ALL.into_iter().filter(|k| k.available()) {
            let lin = Bf16Linear::new(&w_t, inp, outd, None, kernel);
            let g = per_s(&|| {
                std::hint::black_box(lin.forward(&x, rows));
            })?;
            row.insert(format!("bf16 {kernel}"), g.into());
        }
        out.insert(format!("{inp}x{outd}"), row.into());
    }
    if Bf16Kernel::Avx512.available() {
        let threads = rayon::current_num_threads();
        let per_thread = harma_kernels::raw::avx512bf16::peak_gflops(20_000_000);
        out.insert(
            "avx512bf16_peak".into(),
            serde_json::json!({"per_thread": per_thread, "threads": threads,
                "total": per_thread * threads as f64}),
        );
    }
    Ok(out.into())
}

fn matmul_gflops(device: &Device) -> Result<f64> {
    let (m, k, n) = (1600, 768, 3072);
    let a = Tensor::randn(0f32, 1.0, (m, k), device)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), device)?;
    let r = rate(1, 10, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(r * 2.0 * (m * k * n) as f64 / 1e9)
}

/// One round of the PyTorch embedding workloads in a fresh process.
fn torch_round(py: &Path, b: usize, iters: usize, threads: usize) -> Result<serde_json::Value> {
    let (b, iters) = (b.to_string(), iters.to_string());
    let args = ["--batch", b.as_str(), "--iters", iters.as_str()].map(std::ffi::OsStr::new);
    run_python(py, "xtask/bench_torch.py", &args, threads)
}

/// The GEMM table: each kernel on the linear layers' GEMMs at `rows` rows, beside PyTorch's
/// f32 and bf16 matmul (from its last round, if it ran). Returns the kernels' JSON.
fn gemm_table(
    rows: usize,
    b: usize,
    iters: usize,
    torch_gemm: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    let kernels = kernel_gflops(rows, iters)?;
    let names: Vec<String> = kernels[format!("{}x{}", LINEAR_SHAPES[0].0, LINEAR_SHAPES[0].1)]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    println!(
        "GEMM GFLOP/s, {rows} rows (the linear layers of a block at batch {b}), forward, \
         packed weights; PyTorch's x @ w.t() in f32 and bf16:"
    );
    println!(
        "{:<11} {} {:>13} {:>13}",
        "in x out",
        names.iter().map(|n| format!("{n:>16}")).collect::<String>(),
        "PyTorch f32",
        "PyTorch bf16"
    );
    for (inp, outd) in LINEAR_SHAPES {
        let key = format!("{inp}x{outd}");
        let ours: String = names
            .iter()
            .map(|n| format!("{:>16.1}", kernels[&key][n].as_f64().unwrap_or(f64::NAN)))
            .collect();
        let torch = |dt: &str| {
            torch_gemm
                .and_then(|t| t[format!("{key}_{dt}")].as_f64())
                .map_or("-".to_string(), |v| format!("{v:.1}"))
        };
        println!(
            "{key:<11} {ours} {:>13} {:>13}",
            torch("f32"),
            torch("bf16")
        );
    }
    if let Some(p) = kernels.get("avx512bf16_peak") {
        println!(
            "AVX512-BF16 peak (VDPBF16PS on registers, no memory): {:.1} GFLOP/s ({:.1} per \
             thread x {})",
            p["total"].as_f64().unwrap_or(f64::NAN),
            p["per_thread"].as_f64().unwrap_or(f64::NAN),
            p["threads"]
        );
    }
    Ok(kernels)
}

/// The training step, each mode in its own process (peak memory is per process), the modes
/// alternating; prints the table and returns its JSON. `pair_flops`: the forward FLOPs of a
/// pair; `gflops`: the f32 matmul rate the shares are of.
fn train_table(
    args: &Args,
    threads: usize,
    pair_flops: f64,
    gflops: f64,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let b = args.batch;
    let step_iters = if args.quick { 1 } else { 3 };
    let step_rounds = if args.quick { 1 } else { 2 };
    let mut measured: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); STEP_MODES.len()];
    for _ in 0..step_rounds {
        for (mode, (speed, rss)) in STEP_MODES.iter().zip(&mut measured) {
            if let Some((s, m)) = step_mode(mode, args, step_iters, threads)? {
                speed.push(s);
                rss.push(m);
            }
        }
        eprintln!("training-step round done");
    }
    println!(
        "training step (HarMA adapters, batch {b}, {step_rounds} rounds of {step_iters} steps; \
         medians; ~{:.0} GFLOP per pair without frozen-weight gradients):",
        pair_flops / 1e9
    );
    println!(
        "{:<18} {:>9} {:>14} {:>14} {:>13}",
        "", "pairs/s", "peak RSS GB", "vs PyTorch", "matmul share"
    );
    let mut train_json = serde_json::Map::new();
    let medians = |name: &str| {
        let i = STEP_MODES.iter().position(|m| m.name == name)?;
        let (s, m) = &measured[i];
        (!s.is_empty()).then(|| (median(s), median(m)))
    };
    for (mode, (speed, _)) in STEP_MODES.iter().zip(&measured) {
        let Some((sp, mem)) = medians(mode.name) else {
            continue;
        };
        let vs = match mode.compared_with.and_then(medians) {
            Some((ts, tm)) => format!("{:.2}x, {:.2}x mem", sp / ts, mem / tm),
            None => "-".into(),
        };
        let share = 100.0 * sp * pair_flops / 1e9 / gflops;
        println!(
            "{:<18} {sp:>9.2} {mem:>14.2} {vs:>14} {:>12.0}%",
            mode.name, share
        );
        train_json.insert(
            mode.name.into(),
            serde_json::json!({"pairs_per_s": sp, "peak_rss_gb": mem, "runs": speed}),
        );
    }
    Ok(train_json)
}

/// Evaluation of an RSITMD-test-sized split from disk; prints it and returns its JSON.
fn eval_line(model: &Clip, b: usize) -> Result<serde_json::Value> {
    let ev = eval_rsitmd_sized(model, b)?;
    let sec = |k: &str| ev[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "evaluation, RSITMD-test-sized ({} .tif 256x256 images, {} captions, from disk): {:.1} s \
         = images {:.1} s (decode {:.1} s busy on its thread, image tower {:.1} s) + captions \
         {:.1} s + metrics {:.3} s",
        ev["images_count"],
        ev["captions_count"],
        sec("total"),
        sec("images"),
        sec("decode"),
        sec("embed_images"),
        sec("captions"),
        sec("metrics")
    );
    Ok(ev)
}

/// The embedding table: the f32 matmul rate and each workload, ours beside PyTorch's
/// (medians of the rounds); adds each row to `json`.
fn embed_table(
    gemm: &(Vec<f64>, Vec<f64>),
    workloads: &[EmbedWorkload],
    ours: &[Vec<f64>],
    theirs: &[Vec<f64>],
    json: &mut serde_json::Map<String, serde_json::Value>,
) {
    let gflops = median(&gemm.0);
    println!(
        "{:<30} {:>10} {:>10} {:>8} {:>11} {:>12}",
        "workload", "harma-rs", "PyTorch", "ratio", "GFLOP/item", "matmul share"
    );
    let gemm_torch = (!gemm.1.is_empty()).then(|| median(&gemm.1));
    let rows = std::iter::once(("matmul 1600x768x3072 GFLOP/s", gflops, gemm_torch, f64::NAN))
        .chain(
            workloads
                .iter()
                .zip(ours.iter().zip(theirs))
                .map(|(w, (o, th))| {
                    let th = (!th.is_empty()).then(|| median(th));
                    (w.name, median(o), th, w.flops)
                }),
        );
    for (name, ours, theirs, flops) in rows {
        let (share, per_item) = if flops.is_nan() {
            (String::new(), String::new())
        } else {
            (
                format!("{:.0}%", 100.0 * ours * flops / 1e9 / gflops),
                format!("{:.1}", flops / 1e9),
            )
        };
        let (th, ratio) = match theirs {
            Some(t) => (format!("{t:.1}"), format!("{:.2}x", ours / t)),
            None => ("-".into(), "-".into()),
        };
        println!("{name:<30} {ours:>10.1} {th:>10} {ratio:>8} {per_item:>11} {share:>12}");
        json.insert(
            name.to_string(),
            serde_json::json!({"harma_rs": ours, "pytorch": theirs, "gflop_per_item": flops / 1e9}),
        );
    }
}

/// FLOPs per item of the image tower, the text tower at 77 tokens, and the text tower cut at
/// `cut_len` tokens.
fn tower_flops(cfg: &ClipConfig, cut_len: usize) -> (f64, f64, f64) {
    let v = &cfg.vision;
    let t = &cfg.text;
    let img = v.layers as f64 * block_flops(v.seq_len(), v.width, v.mlp_dim)
        + 2.0 * (v.seq_len() - 1) as f64 * (3 * v.patch_size * v.patch_size * v.width) as f64;
    let txt = t.layers as f64 * block_flops(77, t.width, t.mlp_dim);
    let cut = t.layers as f64 * block_flops(cut_len, t.width, t.mlp_dim);
    (img, txt, cut)
}

/// A batch of images and one of captions.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    pixels: &'a Tensor,
    ids: &'a Tensor,
}

/// The embedding workloads: images, captions cut after their end and at full length, in f32
/// and bf16; their FLOPs from [`tower_flops`].
fn embed_workloads<'a>(
    (f32_model, bf16_model): (&'a Clip, &'a Clip),
    x: Inputs<'a>,
    (img, txt, cut): (f64, f64, f64),
) -> [EmbedWorkload<'a>; 5] {
    let full: Option<&dyn BlockHook> = Some(&FullContext);
    let w = |name, model, input, flops, torch_key| EmbedWorkload {
        name,
        model,
        input,
        flops,
        torch_key,
    };
    [
        w(
            "images/s",
            f32_model,
            Input::Images(x.pixels),
            img,
            "images_per_s",
        ),
        w(
            "captions/s (cut after EOT)",
            f32_model,
            Input::Captions(x.ids, None),
            cut,
            "captions_per_s",
        ),
        w(
            "captions/s (full 77 tokens)",
            f32_model,
            Input::Captions(x.ids, full),
            txt,
            "captions_per_s",
        ),
        w(
            "images/s, bf16",
            bf16_model,
            Input::Images(x.pixels),
            img,
            "images_per_s_bf16",
        ),
        w(
            "captions/s (77 tokens), bf16",
            bf16_model,
            Input::Captions(x.ids, full),
            txt,
            "captions_per_s_bf16",
        ),
    ]
}

pub fn run(args: &Args) -> Result<()> {
    let compute = crate::workloads::cpu_compute()?;
    let iters = if args.quick { 2 } else { 6 };
    let b = args.batch;
    let cfg = ClipConfig::vit_b32_quickgelu();
    let model = random_model(&cfg, &compute)?;
    let model_bf16 = model.with_precision(Precision::Bf16)?;
    let tok = ClipTokenizer::new(77)?;
    let mut json = serde_json::Map::new();
    let caps = crate::workloads::captions(b)?;
    let ids = caption_ids(&cfg, b, &compute.device)?;
    let lengths = caps
        .iter()
        .map(|c| tok.encode_raw(c).map(|v| (v.len() + 2).min(77)))
        .collect::<harma_clip::Result<Vec<usize>>>()?;
    let mean_tokens = lengths.iter().sum::<usize>() as f64 / b as f64;
    // the text tower runs up to the batch's last end-of-text token
    let cut_len = lengths.iter().copied().max().unwrap_or(77);
    let pixels = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &compute.device)?;

    let threads = candle_core::utils::get_num_threads();
    let rounds = if args.quick { 1 } else { 5 };
    println!(
        "harma-rs bench: ViT-B/32 random weights, batch {b}, {threads} threads, \
         {rounds} rounds of {iters} timed batches (ours and PyTorch alternate; medians); {}",
        compute.clone().with_precision(Precision::Bf16).describe()
    );
    let (img_flops, txt_flops, cut_flops) = tower_flops(&cfg, cut_len);
    let inputs = Inputs {
        pixels: &pixels,
        ids: &ids,
    };
    let workloads = embed_workloads(
        (&model, &model_bf16),
        inputs,
        (img_flops, txt_flops, cut_flops),
    );
    let mut gemm = (vec![], vec![]);
    // PyTorch's GEMMs of the linear layers, from its last round
    let mut torch_gemm: Option<serde_json::Value> = None;
    let mut ours: Vec<Vec<f64>> = vec![vec![]; workloads.len()];
    let mut theirs: Vec<Vec<f64>> = vec![vec![]; workloads.len()];
    for round in 0..rounds {
        gemm.0.push(matmul_gflops(&compute.device)?);
        for (w, o) in workloads.iter().zip(&mut ours) {
            o.push(w.rate(b, iters)?);
        }
        if let Some(py) = &args.torch_python {
            let j = torch_round(py, b, iters, threads)?;
            gemm.1
                .push(j["matmul_gflops"].as_f64().context("PyTorch result")?);
            torch_gemm = Some(j["gemm_gflops"].clone());
            for (w, th) in workloads.iter().zip(&mut theirs) {
                th.push(j[w.torch_key].as_f64().context("PyTorch result")?);
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!("mean caption length: {mean_tokens:.1} tokens (of 77)");
    json.insert(
        "kernels".into(),
        gemm_table(50 * b, b, iters, torch_gemm.as_ref())?,
    );
    if let Some(t) = torch_gemm {
        json.insert("pytorch_gemm".into(), t);
    }
    let pair_flops = 2.0 * (img_flops + txt_flops);
    let train_json = train_table(args, threads, pair_flops, median(&gemm.0))?;
    json.insert("eval_rsitmd_test_sized".into(), eval_line(&model, b)?);
    let n_img = if args.quick { 2_000 } else { 10_000 };
    let metrics_s = metrics_seconds(n_img)?;
    println!(
        "metrics (R@K both ways, mR) on a {n_img} x {} score matrix: {metrics_s:.2} s",
        5 * n_img
    );
    embed_table(&gemm, &workloads, &ours, &theirs, &mut json);
    json.insert("train".into(), train_json.into());
    json.insert(
        "metrics_seconds".into(),
        serde_json::json!({"images": n_img, "captions": 5 * n_img, "seconds": metrics_s}),
    );
    json.insert("threads".into(), threads.into());
    json.insert("batch".into(), b.into());
    if let Some(p) = &args.json {
        crate::write_json(p, &serde_json::Value::Object(json))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
