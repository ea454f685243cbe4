//! `cargo xtask bench`: embedding throughput at ViT-B/32 size (random weights), batch 32,
//! with the same workloads run by open_clip in PyTorch in the same invocation when
//! `--torch-python` is given. Prints a table and writes JSON.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use harma_clip::{BlockHook, Clip, ClipConfig, ClipTokenizer, Tower};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fewer timed batches (a smoke run, noisier numbers)
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON here
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// A Python with torch and open_clip_torch: run the same workloads in PyTorch too
    #[arg(long, value_name = "PATH")]
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
    /// The backbone's linear layers in bf16 (`harma train --precision bf16`)
    #[arg(long)]
    bf16: bool,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    iters: usize,
}

/// Print `{"pairs_per_s", "peak_rss_gb"}` for one training-step mode.
pub fn run_step(args: &StepArgs) -> Result<()> {
    let device = Device::Cpu;
    let b = args.batch;
    let cfg = ClipConfig::vit_b32_quickgelu();
    let mut model = random_model(&cfg, &device)?;
    if args.bf16 {
        model = model.with_linear_dtype(candle_core::DType::BF16)?;
    }
    let tok = ClipTokenizer::new(77)?;
    let ids = Tensor::from_vec(tok.encode_batch(&captions(b)?)?, (b, 77), &device)?;
    let pixels = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &device)?;
    harma_clip::ops::set_generic_ops(args.naive);
    let pairs_per_s = train_pairs_per_s(&model, &cfg, &pixels, &ids, args.iters, args.recompute)?;
    let out = serde_json::json!({"pairs_per_s": pairs_per_s, "peak_rss_gb": peak_rss_gb()});
    println!("{out}");
    Ok(())
}

/// Run `bench-step` in a child process, with `flags` (`--naive`, `--recompute`, `--bf16`).
fn step_in_child(flags: &[&str], b: usize, iters: usize) -> Result<serde_json::Value> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["bench-step", "--batch", &b.to_string()])
        .args(["--iters", &iters.to_string()])
        .args(flags);
    crate::run_json(&mut cmd, "bench-step")
}

/// Random ViT-B/32 weights (std 0.02, layer norms 1/0), like a freshly initialised open_clip.
pub(crate) fn random_model(cfg: &ClipConfig, device: &Device) -> Result<Clip> {
    model_from(random_weights(cfg, device)?, cfg, device)
}

/// The weights of [`random_model`] (seeded: every call gives the same), on `device`.
pub(crate) fn random_weights(
    cfg: &ClipConfig,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let mut rng = harma_data::rng::Rng::new(0);
    Ok(harma_clip::checkpoint::random_backbone(
        cfg,
        harma_clip::checkpoint::RandomInit::Clip,
        &mut || rng.uniform(),
        device,
    )?)
}

/// A model on `device` from open_clip-named weights (moved there if elsewhere).
pub(crate) fn model_from(
    weights: std::collections::HashMap<String, Tensor>,
    cfg: &ClipConfig,
    device: &Device,
) -> Result<Clip> {
    Ok(Clip::new(
        VarBuilder::from_tensors(weights, DType::F32, device),
        cfg,
    )?)
}

/// A hook that changes nothing but, like HarMA's text adapters, needs every position.
pub(crate) struct FullContext;

impl BlockHook for FullContext {
    fn mlp_out(&self, _: Tower, _: usize, m: &Tensor) -> harma_clip::Result<Tensor> {
        Ok(m.clone())
    }
}

/// RSITMD test captions, the caption-length distribution of the real task.
pub(crate) fn captions(n: usize) -> Result<Vec<String>> {
    let path = "data/annotations/rsitmd_test.json";
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?,
    )?;
    let mut out = Vec::new();
    for e in v.as_array().context("expected a list")? {
        for c in e["caption"].as_array().context("caption list")? {
            out.push(c.as_str().unwrap_or_default().to_string());
        }
    }
    out.truncate(n);
    Ok(out)
}

/// Items per second over `iters` timed calls after one warm-up call.
pub(crate) fn rate(items: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok((items * iters) as f64 / t.elapsed().as_secs_f64())
}

/// Forward FLOPs of one transformer block over `l` tokens of width `d`.
fn block_flops(l: usize, d: usize, mlp: usize) -> f64 {
    let (l, d, mlp) = (l as f64, d as f64, mlp as f64);
    2.0 * l * d * (4.0 * d + 2.0 * mlp) + 4.0 * l * l * d
}

/// The median; of an even count, the mean of the middle two.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// Run a Python bench script (from the workspace root) with `threads` threads; its stdout is JSON.
pub(crate) fn run_python(
    py: &PathBuf,
    script: &str,
    args: &[&std::ffi::OsStr],
    threads: usize,
) -> Result<serde_json::Value> {
    let mut cmd = std::process::Command::new(py);
    cmd.arg(script)
        .args(args)
        .env("OMP_NUM_THREADS", threads.to_string());
    crate::run_json(&mut cmd, &format!("{} {script}", py.display()))
}

/// One round of the PyTorch workloads in a fresh process.
fn torch_round(py: &PathBuf, b: usize, iters: usize, threads: usize) -> Result<serde_json::Value> {
    let (b, iters) = (b.to_string(), iters.to_string());
    let args = ["--batch", b.as_str(), "--iters", iters.as_str()].map(std::ffi::OsStr::new);
    run_python(py, "xtask/bench_torch.py", &args, threads)
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
fn eval_rsitmd_sized(model: &Clip, cfg: &ClipConfig, batch: usize) -> Result<serde_json::Value> {
    use harma_data::synth::{write_dataset, SynthSizes};
    let dir = std::env::temp_dir().join(format!("harma-bench-eval-{}", std::process::id()));
    let sizes = SynthSizes {
        train: 0,
        val: 0,
        test: 452,
        size: 256,
        ext: "tif",
    };
    write_dataset(&dir, sizes, 1)?;
    let set = harma_train::eval::load_split(&dir.join("test.json"), &dir.join("images"), false)?;
    let tok = ClipTokenizer::new(cfg.text.context_length)?;
    let t = Instant::now();
    let (_, timings) = harma_train::eval::evaluate_split(
        model,
        None,
        &tok,
        &set,
        &dir.join("images"),
        batch,
        &Device::Cpu,
        false,
    )?;
    let total = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir).ok();
    let mut j = serde_json::to_value(&timings)?;
    j["total"] = total.into();
    j["images_count"] = set.images.len().into();
    j["captions_count"] = set.captions.len().into();
    Ok(j)
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in GB.
pub(crate) fn peak_rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1e6)
        .unwrap_or(f64::NAN)
}

/// Training pairs per second: forward of both towers with random ViT-B/32 adapters, the HarMA
/// objective, backward (adapters only) and an AdamW update, at batch `b`.
pub(crate) fn train_pairs_per_s(
    model: &Clip,
    cfg: &ClipConfig,
    pixels: &Tensor,
    ids: &Tensor,
    iters: usize,
    recompute: bool,
) -> Result<f64> {
    use harma_adapters::{AdapterConfig, HarmaAdapters};
    let device = pixels.device();
    let acfg = AdapterConfig::default();
    // fresh adapters as a run starts with them (the values do not change the work)
    let mut rng = harma_data::rng::Rng::new(1);
    let tensors = harma_adapters::init_tensors(cfg, &acfg, &mut || rng.uniform(), device)?;
    let (adapters, vars) = HarmaAdapters::trainable(tensors, cfg, &acfg, device)?;
    let params: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let mut opt = harma_train::optim::AdamW::new(vars, Default::default())?;
    let b = pixels.dim(0)?;
    let image_ids: Vec<i64> = (0..b as i64).collect();
    rate(b, iters, || {
        let (_, grads) = harma_train::step::loss_and_grads(
            model,
            &adapters,
            &params,
            (pixels, ids),
            &image_ids,
            &Default::default(),
            recompute,
        )?;
        opt.step(&grads, 1e-4)?;
        Ok(device.synchronize()?)
    })
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

pub fn run(args: &Args) -> Result<()> {
    let device = Device::Cpu;
    let iters = if args.quick { 2 } else { 6 };
    let b = args.batch;
    let cfg = ClipConfig::vit_b32_quickgelu();
    let model = random_model(&cfg, &device)?;
    let tok = ClipTokenizer::new(77)?;
    let mut json = serde_json::Map::new();
    let caps = captions(b)?;
    let ids = Tensor::from_vec(tok.encode_batch(&caps)?, (b, 77), &device)?;
    let lengths = caps
        .iter()
        .map(|c| tok.encode_raw(c).map(|v| (v.len() + 2).min(77)))
        .collect::<harma_clip::Result<Vec<usize>>>()?;
    let mean_tokens = lengths.iter().sum::<usize>() as f64 / b as f64;
    // the text tower runs up to the batch's last end-of-text token
    let cut_len = lengths.iter().copied().max().unwrap_or(77);
    let pixels = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &device)?;

    let threads = candle_core::utils::get_num_threads();
    let rounds = if args.quick { 1 } else { 5 };
    println!(
        "harma-rs bench: ViT-B/32 random weights, batch {b}, {threads} threads, \
         {rounds} rounds of {iters} timed batches (ours and PyTorch alternate; medians)"
    );
    let v = &cfg.vision;
    let t = &cfg.text;
    let img_flops = v.layers as f64 * block_flops(v.seq_len(), v.width, v.mlp_dim)
        + 2.0 * (v.seq_len() - 1) as f64 * (3 * v.patch_size * v.patch_size * v.width) as f64;
    let txt_flops = t.layers as f64 * block_flops(77, t.width, t.mlp_dim);
    let names = [
        "matmul 1600x768x3072 GFLOP/s",
        "images/s",
        "captions/s (cut after EOT)",
        "captions/s (full 77 tokens)",
        "images/s, bf16",
        "captions/s (77 tokens), bf16",
    ];
    let cut_flops = t.layers as f64 * block_flops(cut_len, t.width, t.mlp_dim);
    let flops = [
        f64::NAN,
        img_flops,
        cut_flops,
        txt_flops,
        img_flops,
        txt_flops,
    ];
    let model_bf16 = model.with_linear_dtype(candle_core::DType::BF16)?;
    let mut ours: Vec<Vec<f64>> = vec![vec![]; names.len()];
    let mut theirs: Vec<Vec<f64>> = vec![vec![]; names.len()];
    for round in 0..rounds {
        ours[0].push(matmul_gflops(&device)?);
        // rows 1.. of `names`: (model, image or text, hook)
        let full: Option<&dyn harma_clip::BlockHook> = Some(&FullContext);
        let embeds = [
            (&model, true, None),
            (&model, false, None),
            (&model, false, full),
            (&model_bf16, true, None),
            (&model_bf16, false, full),
        ];
        for (i, (m, image, hook)) in embeds.into_iter().enumerate() {
            ours[i + 1].push(rate(b, iters, || {
                if image {
                    m.encode_image(&pixels, None)?;
                } else {
                    m.encode_text(&ids, hook)?;
                }
                Ok(())
            })?);
        }
        if let Some(py) = &args.torch_python {
            let j = torch_round(py, b, iters, threads)?;
            for (i, key) in [
                "matmul_gflops",
                "images_per_s",
                "captions_per_s",
                "captions_per_s",
                "images_per_s_bf16",
                "captions_per_s_bf16",
            ]
            .iter()
            .enumerate()
            {
                theirs[i].push(j[key].as_f64().context("PyTorch result")?);
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let gflops = median(&ours[0]);
    let rows: Vec<(&str, f64, Option<f64>, f64)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let th = (!theirs[i].is_empty()).then(|| median(&theirs[i]));
            (*n, median(&ours[i]), th, flops[i])
        })
        .collect();
    println!("mean caption length: {mean_tokens:.1} tokens (of 77)");
    // the training step, each mode in its own process (peak memory is per process), alternating
    let step_iters = if args.quick { 1 } else { 3 };
    let step_rounds = if args.quick { 1 } else { 2 };
    let modes = [
        "harma-rs",
        "naive Candle",
        "PyTorch",
        "--recompute",
        "harma-rs bf16",
        "PyTorch bf16",
        "bf16 --recompute",
    ];
    // each mode's PyTorch counterpart, for the ratio column
    let torch_of = |m: usize| if m == 4 || m == 6 { 5 } else { 2 };
    let mut speed: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    let mut rss: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    for _ in 0..step_rounds {
        let ours: [(usize, &[&str]); 5] = [
            (0, &[]),
            (1, &["--naive"]),
            (3, &["--recompute"]),
            (4, &["--bf16"]),
            (6, &["--bf16", "--recompute"]),
        ];
        for (m, flags) in ours {
            let j = step_in_child(flags, b, step_iters)?;
            speed[m].push(j["pairs_per_s"].as_f64().context("bench-step")?);
            rss[m].push(j["peak_rss_gb"].as_f64().context("bench-step")?);
        }
        if let (Some(py), Some(repo)) = (&args.torch_python, &args.harma_repo) {
            let (bs, it) = (b.to_string(), step_iters.to_string());
            let script_args = [
                std::ffi::OsStr::new("--batch"),
                bs.as_ref(),
                "--harma-repo".as_ref(),
                repo.as_os_str(),
                "--iters".as_ref(),
                it.as_ref(),
            ];
            for (m, bf16) in [(2, false), (5, true)] {
                let mut script_args = script_args.to_vec();
                if bf16 {
                    script_args.push("--bf16".as_ref());
                }
                let j = run_python(py, "xtask/bench_torch_train.py", &script_args, threads)?;
                speed[m].push(j["pairs_per_s"].as_f64().context("PyTorch step")?);
                rss[m].push(j["peak_rss_gb"].as_f64().context("PyTorch step")?);
            }
        }
        eprintln!("training-step round done");
    }
    let pair_flops = 2.0 * (img_flops + txt_flops);
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
    for m in 0..modes.len() {
        if speed[m].is_empty() {
            continue;
        }
        let (sp, mem) = (median(&speed[m]), median(&rss[m]));
        let t = torch_of(m);
        let vs = if m != t && !speed[t].is_empty() {
            let (ts, tm) = (median(&speed[t]), median(&rss[t]));
            format!("{:.2}x, {:.2}x mem", sp / ts, mem / tm)
        } else {
            "-".into()
        };
        let share = 100.0 * sp * pair_flops / 1e9 / gflops;
        println!(
            "{:<18} {sp:>9.2} {mem:>14.2} {vs:>14} {:>12.0}%",
            modes[m], share
        );
        train_json.insert(
            modes[m].into(),
            serde_json::json!({"pairs_per_s": sp, "peak_rss_gb": mem, "runs": speed[m]}),
        );
    }
    let ev = eval_rsitmd_sized(&model, &cfg, b)?;
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
    json.insert("eval_rsitmd_test_sized".into(), ev);
    let n_img = if args.quick { 2_000 } else { 10_000 };
    let metrics_s = metrics_seconds(n_img)?;
    println!(
        "metrics (R@K both ways, mR) on a {n_img} x {} score matrix: {metrics_s:.2} s",
        5 * n_img
    );
    println!(
        "{:<30} {:>10} {:>10} {:>8} {:>11} {:>12}",
        "workload", "harma-rs", "PyTorch", "ratio", "GFLOP/item", "matmul share"
    );
    for (name, ours, theirs, flops) in &rows {
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
