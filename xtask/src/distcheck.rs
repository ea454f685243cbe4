//! `xtask dist-check`: data-parallel training on every GPU of the machine (NCCL; a world of 1
//! on one GPU) or on CPU ranks, against one process with the same data, model and settings
//! (docs/DISTRIBUTED.md). `scripts/gpu-check.sh` runs it on a GPU machine; the CPU build runs
//! it in its tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use harma_clip::ClipConfig;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The `harma` binary (the CUDA build's, on a GPU machine)
    #[arg(long, value_name = "PATH")]
    harma: PathBuf,
    /// Ranks [default: every GPU nvidia-smi lists; 2 with --device cpu]
    #[arg(long, value_name = "N")]
    nproc: Option<usize>,
    /// cuda (a rank per GPU) or cpu (CPU ranks over TCP)
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Training steps of both runs
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Working folder (replaced)
    #[arg(long, value_name = "DIR", default_value = "target/dist-check")]
    dir: PathBuf,
    /// Write the report as JSON here
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
}

/// How closely the runs must agree: losses relative, adapters relative to their norm. On a GPU
/// the two runs' GEMMs differ by shape (cuBLAS picks its algorithm by size), so the bounds
/// are wider than the CPU's (2e-7 and 7e-6 measured there over five steps).
const LOSS_BOUND: f64 = 1e-4;
const ADAPTER_BOUND: f64 = 1e-3;

fn gpus() -> usize {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or(0, |o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count()
        })
}

/// A small CLIP (the tiny preset with CLIP's vocabulary) with random weights, and its config.
fn tiny_model(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cfg = ClipConfig::tiny(harma_clip::Activation::QuickGelu);
    let arch = dir.join("clip.json");
    std::fs::write(&arch, serde_json::to_string(&cfg)?)?;
    let model = dir.join("model.safetensors");
    crate::workloads::write_random_model(
        &cfg,
        harma_clip::checkpoint::RandomInit::FanIn,
        &mut harma_data::rng::Rng::new(5),
        &model,
    )?;
    Ok((model, arch))
}

/// The losses of a run's log.
fn losses(run: &Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(run.join("log.jsonl"))
        .with_context(|| format!("no log in {}", run.display()))?;
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            v["loss"].as_f64().context("a log line without loss")
        })
        .collect()
}

/// `||a - b|| / ||b||` over the adapters of two runs.
fn adapter_difference(a: &Path, b: &Path) -> Result<f64> {
    let load = |d: &Path| {
        candle_core::safetensors::load(d.join("adapters.safetensors"), &candle_core::Device::Cpu)
            .with_context(|| format!("no adapters in {}", d.display()))
    };
    let (ta, tb) = (load(a)?, load(b)?);
    let (mut diff, mut norm) = (0f64, 0f64);
    for (k, x) in &ta {
        let y = tb.get(k).with_context(|| format!("{k} only in one run"))?;
        let d = (x - y)?
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?;
        diff += d.to_scalar::<f64>()?;
        norm += y
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok((diff / norm).sqrt())
}

pub fn run(args: &Args) -> Result<()> {
    let cpu = args.device == "cpu";
    let nproc = args.nproc.unwrap_or(if cpu { 2 } else { gpus() });
    if nproc == 0 {
        bail!("no GPU found (nvidia-smi -L): give --device cpu to check CPU ranks");
    }
    let dir = &args.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let sizes = harma_train::synth::SynthSizes {
        train: 24,
        val: 0,
        test: 0,
        size: 64,
        ext: "png",
    };
    harma_train::synth::write_dataset(&dir.join("data"), sizes, 3)?;
    let (model, arch) = tiny_model(dir)?;
    let batch = 4 * nproc;
    let common: Vec<String> = [
        "train",
        "--train-json",
        &dir.join("data/train.json").display().to_string(),
        "--image-root",
        &dir.join("data/images").display().to_string(),
        "--init",
        &model.display().to_string(),
        "--arch",
        &arch.display().to_string(),
        "--batch-size",
        &batch.to_string(),
        "--steps",
        &args.steps.to_string(),
        "--lr",
        "1e-3",
    ]
    .map(String::from)
    .to_vec();
    let harma = |extra: &[&str], out: &str| -> Result<f64> {
        let t = std::time::Instant::now();
        let o = Command::new(&args.harma)
            .args(&common)
            .args(["--out", &dir.join(out).display().to_string()])
            .args(extra)
            .output()
            .with_context(|| format!("cannot run {}", args.harma.display()))?;
        if !o.status.success() {
            bail!(
                "harma train {} failed:\n{}",
                extra.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let one_device = if cpu { "cpu" } else { "cuda:0" };
    let one_s = harma(&["--device", one_device], "one")?;
    let nproc_s = nproc.to_string();
    let mut extra = vec!["--nproc", nproc_s.as_str()];
    if cpu {
        extra.extend(["--device", "cpu"]);
    }
    let ranks_s = harma(&extra, "ranks")?;
    let (l1, ln) = (losses(&dir.join("one"))?, losses(&dir.join("ranks"))?);
    if l1.len() != args.steps || ln.len() != args.steps {
        bail!(
            "the runs logged {} and {} steps of {}",
            l1.len(),
            ln.len(),
            args.steps
        );
    }
    let loss = l1
        .iter()
        .zip(&ln)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0, f64::max);
    let adapters = adapter_difference(&dir.join("ranks"), &dir.join("one"))?;
    let pass = loss <= LOSS_BOUND && adapters <= ADAPTER_BOUND;
    println!(
        "data-parallel training, {nproc} {} ranks (global batch {batch}, {} steps) vs one \
         process: losses within {loss:.1e}, adapters {adapters:.1e} of their norm ({:.1} s vs \
         {:.1} s): {}",
        if cpu { "CPU" } else { "GPU" },
        args.steps,
        ranks_s,
        one_s,
        if pass { "PASS" } else { "FAIL" }
    );
    let report = serde_json::json!({
        "device": args.device, "ranks": nproc, "global_batch": batch, "steps": args.steps,
        "loss_rel_diff": loss, "adapters_rel_diff": adapters, "seconds_ranks": ranks_s,
        "seconds_one": one_s, "pass": pass,
    });
    if let Some(p) = &args.json {
        crate::write_json(p, &report)?;
    }
    if !pass {
        bail!("the data-parallel run differs from one process beyond {LOSS_BOUND:e} / {ADAPTER_BOUND:e}");
    }
    Ok(())
}
