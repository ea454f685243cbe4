//! `xtask gpu-check`: the one short run that proves a CUDA build on a GPU (scripts/gpu-check.sh
//! runs it there; docs/CUDA.md). Built without CUDA, or with `--device cpu`, it runs the same
//! steps on the CPU, comparing the generic ops (the path a GPU takes) with the fused CPU kernels.
//!
//! 1. Parity, f32: image and text embeddings, the HarMA loss and the gradient of every adapter
//!    tensor at ViT-B/32 size (random backbone, random non-zero adapters), on the device against
//!    the CPU's fused kernels. Embeddings, loss and gradients must agree within 1e-4 (gradients:
//!    relative to the norm of all of them together, each tensor's cosine within 1e-6 of 1). With the backbone's linear layers in bf16, the embedding error is
//!    recorded (mixed precision).
//! 2. Throughput, each measurement in its own process: images/s, captions/s (full 77 tokens)
//!    and training pairs/s at each `--batches` size, f32 and bf16, plus the training step with
//!    Candle's plain backward (`train-naive`, which also computes frozen-weight gradients);
//!    peak device memory (GPU: sampled from `nvidia-smi`; CPU: peak RSS).
//! 3. With `--torch-python`: open_clip's embedding and (with `--harma-repo`) the original's
//!    training step on the same device and batches, in the same run.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use harma_adapters::{AdapterConfig, HarmaAdapters};
use harma_clip::{Clip, ClipConfig, Compute, Kernels, Precision};
use harma_kernels::compute::{ComputeSettings, DeviceSpec};
use harma_train::flags::Flags;

use crate::workloads::{
    caption_ids, child_json, model_from, random_model, random_weights, rate, run_python,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to measure: auto (a CUDA GPU when this build has CUDA and one is visible), cpu,
    /// cuda or cuda:N
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: DeviceSpec,
    /// Model size: vit-b32 (the real one) or tiny (2 small blocks, for testing this command)
    #[arg(long, default_value = "vit-b32")]
    model: String,
    /// Batch sizes of the throughput runs
    #[arg(long, value_delimiter = ',', default_values_t = [32, 214])]
    batches: Vec<usize>,
    /// Timed batches per measurement (after one warm-up)
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// A Python with torch and open_clip_torch: PyTorch on the same device, same batches
    #[arg(long, value_name = "PATH")]
    torch_python: Option<PathBuf>,
    /// A checkout of the original HarMA repository: with --torch-python, its training step too
    #[arg(long, value_name = "DIR")]
    harma_repo: Option<PathBuf>,
    /// Write the report as JSON here
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
}

/// One measurement in its own process (run by `gpu-check`).
#[derive(Debug, clap::Args)]
pub struct StepArgs {
    #[command(flatten)]
    compute: Flags<ComputeSettings>,
    #[arg(long, default_value = "vit-b32")]
    model: String,
    #[arg(long)]
    batch: usize,
    /// images, captions, train or train-naive
    #[arg(long)]
    mode: String,
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

fn model_config(name: &str) -> Result<ClipConfig> {
    Ok(match name {
        "vit-b32" => ClipConfig::vit_b32_quickgelu(),
        "tiny" => ClipConfig::tiny(harma_clip::Activation::QuickGelu),
        other => bail!("--model {other}: expected vit-b32 or tiny"),
    })
}

/// Fresh adapters with the zero-initialised up-projections made random, so that the adapters
/// change the result and their gradients are all non-zero.
fn random_adapters(cfg: &ClipConfig) -> Result<std::collections::HashMap<String, Tensor>> {
    let mut rng = harma_data::rng::Rng::new(7);
    let acfg = AdapterConfig::default();
    let mut t = harma_adapters::init_tensors(cfg, &acfg, &mut || rng.uniform(), &Device::Cpu)?;
    // in name order: a HashMap's own order differs between instances
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    for name in names {
        if name.contains("img_proj_up.") || name.contains(".l2.") {
            let v = &t[&name];
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| (rng.uniform() as f32 - 0.5) * 0.1)
                .collect();
            let shape = v.shape().clone();
            t.insert(name, Tensor::from_vec(vals, shape, &Device::Cpu)?);
        }
    }
    Ok(t)
}

/// What one side of the parity check computes.
struct Outputs {
    image: Tensor,
    text: Tensor,
    loss: f32,
    grads: Vec<(String, Tensor)>,
}

fn outputs(model: &Clip, pixels: &Tensor, ids: &Tensor) -> Result<Outputs> {
    let (cfg, compute) = (&model.config, &model.compute);
    let tensors = random_adapters(cfg)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&compute.device)?)))
        .collect::<Result<_>>()?;
    let acfg = AdapterConfig::default();
    let (adapters, vars) = HarmaAdapters::trainable(tensors, cfg, &acfg, compute)?;
    let image = model.encode_image(pixels, Some(&adapters))?;
    let text = model.encode_text(ids, Some(&adapters))?;
    let image_ids: Vec<i64> = (0..pixels.dim(0)? as i64).collect();
    let loss = harma_loss::harma_loss(
        &image,
        &text,
        &adapters.temp,
        &image_ids,
        &Default::default(),
    )?;
    let store = loss.total.backward()?;
    let grads = vars
        .iter()
        .map(|(name, var)| {
            let g = store
                .get(var.as_tensor())
                .with_context(|| format!("no gradient reached {name}"))?;
            Ok((name.clone(), g.to_device(&Device::Cpu)?))
        })
        .collect::<Result<_>>()?;
    Ok(Outputs {
        image: image.to_device(&Device::Cpu)?,
        text: text.to_device(&Device::Cpu)?,
        loss: loss.total.to_scalar()?,
        grads,
    })
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

fn inputs(cfg: &ClipConfig, b: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let ids = caption_ids(cfg, b, device)?;
    let s = cfg.vision.image_size;
    let mut rng = harma_data::rng::Rng::new(3);
    let px: Vec<f32> = (0..b * 3 * s * s)
        .map(|_| (rng.uniform() as f32 - 0.5) * 3.0)
        .collect();
    let pixels = Tensor::from_vec(px, (b, 3, s, s), device)?;
    Ok((pixels, ids))
}

/// The parity section of the report.
fn parity(cfg: &ClipConfig, device: &Device) -> Result<serde_json::Value> {
    let b = 4;
    let cpu = crate::workloads::cpu_compute()?;
    // drawn once, for both sides
    let weights = random_weights(cfg, &cpu.device)?;
    let model_cpu = model_from(weights.clone(), cfg, &cpu)?;
    let (px, ids) = inputs(cfg, b, &cpu.device)?;
    let want = outputs(&model_cpu, &px, &ids)?;
    // on the CPU the device side is the generic path: the ops a GPU runs
    let mut compute = Compute::new(device.clone(), Precision::F32);
    if device.is_cpu() {
        compute = compute.with_kernels(Kernels::Generic);
    }
    let model = model_from(weights, cfg, &compute)?;
    let (pxd, idsd) = (px.to_device(device)?, ids.to_device(device)?);
    let got = outputs(&model, &pxd, &idsd)?;
    let m = model.with_precision(Precision::Bf16)?;
    let (bf_img, bf_txt) = (m.encode_image(&pxd, None)?, m.encode_text(&idsd, None)?);
    let cpu = &cpu.device;
    let plain_img = model_cpu.encode_image(&px, None)?;
    let plain_txt = model_cpu.encode_text(&ids, None)?;
    let image_err = max_abs(&(&got.image - &want.image)?)?;
    let text_err = max_abs(&(&got.text - &want.text)?)?;
    let loss_err = (got.loss - want.loss).abs();
    let grads = harma_trainer::step::GradAgreement::measure(
        got.grads
            .iter()
            .zip(&want.grads)
            .map(|((name, g), (_, w))| (name.as_str(), g, w)),
    )?;
    let bf16_img_err = max_abs(&(bf_img.to_device(cpu)? - &plain_img)?)?;
    let bf16_txt_err = max_abs(&(bf_txt.to_device(cpu)? - &plain_txt)?)?;
    let pass = image_err <= 1e-4
        && text_err <= 1e-4
        && loss_err <= 1e-4
        && grads.rel_err <= 1e-4
        && grads.worst_cosine >= 1.0 - 1e-6;
    println!(
        "parity vs the CPU (batch {b}, f32): image {image_err:.1e}, text {text_err:.1e}, loss \
         {loss_err:.1e}, gradients {:.1e} of their norm over {} tensors (lowest cosine \
         1 - {:.1e}: {}): {}",
        grads.rel_err,
        grads.tensors,
        1.0 - grads.worst_cosine,
        grads.worst_tensor,
        if pass { "PASS" } else { "FAIL" }
    );
    println!(
        "bf16 linear layers vs the CPU's f32: image {bf16_img_err:.1e}, text {bf16_txt_err:.1e} \
         (unit-norm embeddings)"
    );
    Ok(serde_json::json!({
        "batch": b,
        "image_max_abs_err": image_err,
        "text_max_abs_err": text_err,
        "loss_abs_err": loss_err,
        "loss_cpu": want.loss,
        "grad_rel_err": grads.rel_err,
        "grad_worst_cosine": grads.worst_cosine,
        "grad_worst_tensor": grads.worst_tensor,
        "grad_tensors": grads.tensors,
        "bf16_image_max_abs_err": bf16_img_err,
        "bf16_text_max_abs_err": bf16_txt_err,
        "pass": pass,
    }))
}

/// `gpu-step`: print `{"items_per_s", "peak_rss_gb"}` for one measurement.
pub fn run_step(args: &StepArgs) -> Result<()> {
    let mut compute = args.compute.compute()?;
    if args.mode == "train-naive" {
        compute = compute.with_kernels(Kernels::Generic);
    }
    let device = compute.device.clone();
    let cfg = model_config(&args.model)?;
    let b = args.batch;
    let model = random_model(&cfg, &compute)?;
    let (pixels, ids) = inputs(&cfg, b, &device)?;
    let per_s = match args.mode.as_str() {
        "images" => rate(b, args.iters, || {
            model.encode_image(&pixels, None)?;
            Ok(device.synchronize()?)
        })?,
        "captions" => rate(b, args.iters, || {
            model.encode_text(&ids, Some(&crate::workloads::FullContext))?;
            Ok(device.synchronize()?)
        })?,
        "train" | "train-naive" => {
            crate::workloads::train_pairs_per_s(&model, &pixels, &ids, args.iters, false)?
        }
        other => bail!("--mode {other}: expected images, captions, train or train-naive"),
    };
    let out =
        serde_json::json!({"items_per_s": per_s, "peak_rss_gb": crate::workloads::peak_rss_gb()});
    println!("{out}");
    Ok(())
}

/// Samples the GPU's used memory (MiB, `nvidia-smi`) every 20 ms until dropped.
struct GpuMemory {
    child: std::process::Child,
    peak: Arc<AtomicU64>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl GpuMemory {
    fn start(ordinal: usize) -> Option<Self> {
        let mut child = Command::new("nvidia-smi")
            .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
            .arg(format!("--id={ordinal}"))
            .arg("--loop-ms=20")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let out = child.stdout.take()?;
        let peak = Arc::new(AtomicU64::new(0));
        let p = peak.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Ok(mib) = line.trim().parse::<u64>() {
                    p.fetch_max(mib, Ordering::Relaxed);
                }
            }
        });
        Some(Self {
            child,
            peak,
            reader: Some(reader),
        })
    }

    /// The peak so far, in GB.
    fn peak_gb(&self) -> f64 {
        self.peak.load(Ordering::Relaxed) as f64 * 1024.0 * 1024.0 / 1e9
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        if let Some(r) = self.reader.take() {
            r.join().ok();
        }
    }
}

/// Run `gpu-step` in a child process; on a GPU also its peak device memory (the GPU's used
/// memory above what it held before).
fn step_in_child(
    args: &Args,
    device: &Device,
    b: usize,
    mode: &str,
    prec: &str,
) -> Result<(f64, f64)> {
    let ordinal = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Some(gpu_id),
        _ => None,
    };
    let before = ordinal.and_then(GpuMemory::start).map(|m| {
        std::thread::sleep(std::time::Duration::from_millis(200));
        m.peak_gb()
    });
    let mem = ordinal.and_then(GpuMemory::start);
    let j = child_json(&[
        "gpu-step".into(),
        "--device".into(),
        args.device.to_string(),
        "--model".into(),
        args.model.clone(),
        "--batch".into(),
        b.to_string(),
        "--mode".into(),
        mode.into(),
        "--precision".into(),
        prec.into(),
        "--iters".into(),
        args.iters.to_string(),
    ])?;
    let per_s = j["items_per_s"]
        .as_f64()
        .context("gpu-step printed no rate")?;
    let peak = match (mem, before) {
        (Some(m), Some(b0)) => m.peak_gb() - b0,
        _ => j["peak_rss_gb"].as_f64().unwrap_or(f64::NAN),
    };
    Ok((per_s, peak))
}

pub fn run(args: &Args) -> Result<()> {
    let device = args.device.device()?;
    let cfg = model_config(&args.model)?;
    let dev_name = Compute::new(device.clone(), Precision::F32).describe();
    println!("harma-rs gpu-check on {dev_name}, model {}", args.model);
    let mut report = serde_json::Map::new();
    report.insert("device".into(), dev_name.clone().into());
    report.insert("model".into(), args.model.clone().into());
    let parity = parity(&cfg, &device)?;
    let pass = parity["pass"].as_bool() == Some(true);
    report.insert("parity".into(), parity);

    let mem_name = if device.is_cpu() {
        "peak RSS GB"
    } else {
        "peak GPU GB"
    };
    println!(
        "{:>6} {:<10} {:<10} {:>12} {:>12}",
        "batch", "mode", "precision", "items/s", mem_name
    );
    let mut rows = Vec::new();
    for &b in &args.batches {
        for (mode, prec) in [
            ("images", "f32"),
            ("images", "bf16"),
            ("captions", "f32"),
            ("captions", "bf16"),
            ("train", "f32"),
            ("train", "bf16"),
            ("train-naive", "f32"),
        ] {
            let (per_s, peak) = step_in_child(args, &device, b, mode, prec)?;
            println!("{b:>6} {mode:<10} {prec:<10} {per_s:>12.1} {peak:>12.2}");
            rows.push(serde_json::json!({
                "batch": b, "mode": mode, "precision": prec,
                "items_per_s": per_s, "peak_memory_gb": peak,
            }));
        }
    }
    report.insert("harma_rs".into(), rows.into());

    if let Some(py) = &args.torch_python {
        if args.model != "vit-b32" {
            bail!("--torch-python: the PyTorch side runs ViT-B/32 only; leave out --model");
        }
        let torch_device = if device.is_cpu() { "cpu" } else { "cuda" };
        let threads = candle_core::utils::get_num_threads();
        let mut rows = Vec::new();
        for &b in &args.batches {
            let (bs, it) = (b.to_string(), args.iters.to_string());
            let mut script_args: Vec<&std::ffi::OsStr> = ["--batch", &bs, "--iters", &it]
                .into_iter()
                .chain(["--device", torch_device])
                .map(std::ffi::OsStr::new)
                .collect();
            let emb = run_python(py, "xtask/bench_torch.py", &script_args, threads)?;
            println!(
                "PyTorch batch {b}: {:.1} images/s, {:.1} captions/s",
                emb["images_per_s"].as_f64().unwrap_or(f64::NAN),
                emb["captions_per_s"].as_f64().unwrap_or(f64::NAN)
            );
            let mut row = serde_json::json!({"batch": b, "embedding": emb});
            if let Some(repo) = &args.harma_repo {
                script_args.extend(["--harma-repo".as_ref(), repo.as_os_str()]);
                let tr = run_python(py, "xtask/bench_torch_train.py", &script_args, threads)?;
                let mem = match tr["peak_gpu_gb"].as_f64() {
                    Some(g) => format!("peak GPU {g:.2} GB"),
                    None => format!(
                        "peak RSS {:.2} GB",
                        tr["peak_rss_gb"].as_f64().unwrap_or(f64::NAN)
                    ),
                };
                println!(
                    "PyTorch batch {b}: {:.1} training pairs/s, {mem}",
                    tr["pairs_per_s"].as_f64().unwrap_or(f64::NAN)
                );
                row["train"] = tr;
            }
            rows.push(row);
        }
        report.insert("pytorch".into(), rows.into());
    }
    if let Some(p) = &args.json {
        crate::write_json(p, &serde_json::Value::Object(report))?;
        println!("wrote {}", p.display());
    }
    if !pass {
        bail!("parity failed (see above)");
    }
    Ok(())
}
