//! What `bench` and `gpu-check` both measure, and how: random ViT-B/32 models and inputs,
//! rates over timed calls, the training step, peak memory, and the processes (ours and
//! PyTorch's) that measurements run in.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use harma_adapters::{AdapterConfig, HarmaAdapters};
use harma_clip::{BlockHook, Clip, ClipConfig, Compute, Tower};

/// Random ViT-B/32 weights (std 0.02, layer norms 1/0), like a freshly initialised open_clip
/// (seeded: every call gives the same), on `device`.
pub fn random_weights(cfg: &ClipConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = harma_data::rng::Rng::new(0);
    Ok(harma_clip::checkpoint::random_backbone(
        cfg,
        harma_clip::checkpoint::RandomInit::Clip,
        &mut || rng.uniform(),
        device,
    )?)
}

/// f32 on the CPU with the bf16 kernel `HARMA_BF16_KERNEL` names (read as `harma` reads it
/// into `--bf16-kernel`; `HARMA_AMX=0` is turned into it by `start_up`), else the fastest
/// this CPU has: for the workloads xtask runs in its own process.
pub fn cpu_compute() -> Result<Compute> {
    use harma_kernels::compute::{ComputeSettings, DeviceSpec};
    let settings = harma_train::flags::from_env::<ComputeSettings>()?;
    ComputeSettings {
        device: DeviceSpec::Cpu,
        bf16_kernel: settings.bf16_kernel,
        ..Default::default()
    }
    .compute()
}

/// A CLIP of `cfg` with random weights (`init`, drawn from `rng`) written to `path` as
/// safetensors (atomically): the models that the demos, checks and benches load from a file.
pub fn write_random_model(
    cfg: &ClipConfig,
    init: harma_clip::checkpoint::RandomInit,
    rng: &mut harma_data::rng::Rng,
    path: &Path,
) -> Result<()> {
    harma_clip::checkpoint::write_random_backbone(cfg, init, &mut || rng.uniform(), path)
}

/// A model from open_clip-named weights (moved to `compute.device` if elsewhere).
pub fn model_from(
    weights: HashMap<String, Tensor>,
    cfg: &ClipConfig,
    compute: &Compute,
) -> Result<Clip> {
    Ok(Clip::new(
        VarBuilder::from_tensors(weights, DType::F32, &compute.device),
        cfg,
        compute,
    )?)
}

/// [`model_from`] the [`random_weights`].
pub fn random_model(cfg: &ClipConfig, compute: &Compute) -> Result<Clip> {
    model_from(random_weights(cfg, &compute.device)?, cfg, compute)
}

/// A hook that changes nothing but, like HarMA's text adapters, needs every position.
pub struct FullContext;

impl BlockHook for FullContext {
    fn mlp_out(&self, _: Tower, _: usize, m: &Tensor) -> harma_clip::Result<Tensor> {
        Ok(m.clone())
    }
}

/// The first `n` RSITMD test captions as written (not cleaned: the PyTorch scripts,
/// xtask/bench_torch*.py, tokenize the same raw strings), the caption-length distribution of
/// the real task.
pub fn captions(n: usize) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Entry {
        caption: Vec<String>,
    }
    let path = Path::new("data/annotations/rsitmd_test.json");
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let entries: Vec<Entry> =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    Ok(entries
        .into_iter()
        .flat_map(|e| e.caption)
        .take(n)
        .collect())
}

/// Token ids [b, context] of the first `b` captions, on `device`.
pub fn caption_ids(cfg: &ClipConfig, b: usize, device: &Device) -> Result<Tensor> {
    let tok = harma_clip::ClipTokenizer::new(cfg.text.context_length)?;
    let ctx = cfg.text.context_length;
    Ok(Tensor::from_vec(
        tok.encode_batch(&captions(b)?)?,
        (b, ctx),
        device,
    )?)
}

/// Items per second over `iters` timed calls after one warm-up call.
pub fn rate(items: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok((items * iters) as f64 / t.elapsed().as_secs_f64())
}

/// The median; of an even count, the mean of the middle two.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in GB.
pub fn peak_rss_gb() -> f64 {
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

/// Training pairs per second: forward of both towers with fresh HarMA adapters, the HarMA
/// objective, backward (adapters only) and an AdamW update, at the batch of `pixels`.
pub fn train_pairs_per_s(
    model: &Clip,
    pixels: &Tensor,
    ids: &Tensor,
    iters: usize,
    recompute: bool,
) -> Result<f64> {
    let compute = &model.compute;
    let acfg = AdapterConfig::default();
    // fresh adapters as a run starts with them (the values do not change the work)
    let mut rng = harma_data::rng::Rng::new(1);
    let tensors =
        harma_adapters::init_tensors(&model.config, &acfg, &mut || rng.uniform(), &compute.device)?;
    let (adapters, vars) = HarmaAdapters::trainable(tensors, &model.config, &acfg, compute)?;
    let params: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let mut opt = harma_trainer::optim::AdamW::new(vars, Default::default())?;
    let b = pixels.dim(0)?;
    let image_ids: Vec<i64> = (0..b as i64).collect();
    rate(b, iters, || {
        let (_, grads) = harma_trainer::step::loss_and_grads(
            model,
            &adapters,
            &params,
            (pixels, ids),
            &image_ids,
            &Default::default(),
            recompute,
        )?;
        opt.step(&grads, 1e-4)?;
        Ok(compute.device.synchronize()?)
    })
}

/// This program run again with `args` (a hidden measuring subcommand), in its own process so
/// that its peak memory is its own; its stdout parsed as JSON.
pub fn child_json(args: &[String]) -> Result<serde_json::Value> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(args);
    crate::run_json(&mut cmd, &args.join(" "))
}

/// Run a Python bench script (from the workspace root) with `threads` threads; its stdout is
/// JSON.
pub fn run_python(
    py: &Path,
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
