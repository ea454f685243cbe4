//! `harma train`: HarMA's adapters trained on image-caption pairs.
//!
//! A run writes into its folder `config.toml` (every resolved setting), `log.jsonl` (one line
//! per step), and at each save point `adapters.safetensors` (the trained tensors under the
//! original's names) and `resume.safetensors` (those plus AdamW's moments and the step). All
//! randomness (shuffling, augmentation, fresh adapters) is drawn from streams derived from the
//! seed and the position in the run, so the step number is the whole random state: a resumed
//! run equals an uninterrupted one, bit for bit.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use harma_adapters::{AdapterConfig, HarmaAdapters};
use harma_clip::{Checkpoint, Clip, ClipConfig, ClipTokenizer};
use harma_data::annotations::{EvalSet, LoadOptions, PairSet};
use harma_data::augment::TrainTransform;
use harma_data::rng::Rng;
use harma_metrics::RetrievalMetrics;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{AdamWKind, AugmentKind, ScheduleKind, TrainConfig};
use crate::optim::{AdamW, AdamWConfig, AdamWVariant};
use crate::schedule::Schedule;

pub use crate::config::Args;

const RESUME_FORMAT: &str = "harma-rs-resume-1";
/// Stream labels under the seed (see [`Rng::derive`]).
const STREAM_SHUFFLE: u64 = 1;
const STREAM_AUGMENT: u64 = 2;
const STREAM_INIT: u64 = 3;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Finished {
        steps: usize,
    },
    /// stopped on request (Ctrl-C) after `step`, with a resume checkpoint
    Stopped {
        step: usize,
    },
}

/// Requests from outside the loop.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// set (by Ctrl-C) to finish the current step, save and return
    pub stop: Arc<AtomicBool>,
    /// stop after this many steps in total, as if stopped (tests of resuming)
    pub stop_after: Option<usize>,
}

/// Which pairs make up step `k` and how each is augmented.
pub struct Plan {
    pub n_pairs: usize,
    pub batch: usize,
    pub steps_per_epoch: usize,
    pub total: usize,
    pub seed: u64,
    pub shuffle: bool,
}

impl Plan {
    pub fn new(cfg: &TrainConfig, n_pairs: usize) -> Result<Self> {
        let steps_per_epoch = n_pairs / cfg.batch_size;
        if steps_per_epoch == 0 {
            bail!(
                "--batch-size {} is larger than the {n_pairs} training pairs",
                cfg.batch_size
            );
        }
        let total = match (cfg.steps, cfg.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * steps_per_epoch,
            (None, None) => unreachable!("validated"),
        };
        Ok(Self {
            n_pairs,
            batch: cfg.batch_size,
            steps_per_epoch,
            total,
            seed: cfg.seed,
            shuffle: cfg.shuffle,
        })
    }

    pub fn epoch(&self, step: usize) -> usize {
        step / self.steps_per_epoch
    }

    /// The pair indices of step `k` (0-based) and, for each, its augmentation stream.
    pub fn batch(&self, k: usize) -> Vec<(usize, Rng)> {
        let epoch = self.epoch(k);
        let mut order: Vec<usize> = (0..self.n_pairs).collect();
        if self.shuffle {
            Rng::derive(self.seed, &[STREAM_SHUFFLE, epoch as u64]).shuffle(&mut order);
        }
        let start = (k % self.steps_per_epoch) * self.batch;
        (start..start + self.batch)
            .map(|pos| {
                let rng = Rng::derive(self.seed, &[STREAM_AUGMENT, epoch as u64, pos as u64]);
                (order[pos], rng)
            })
            .collect()
    }

    /// Whether an event that comes every `every` steps (0: at each epoch end) and at the end is
    /// due after `done` steps: val (`--val-every`) and checkpoints (`--save-every`).
    pub fn due_after(&self, done: usize, every: usize) -> bool {
        let period = if every > 0 {
            every
        } else {
            self.steps_per_epoch
        };
        done == self.total || done.is_multiple_of(period)
    }
}

/// One evaluation of the val split during training.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ValEntry {
    pub step: usize,
    pub epoch: usize,
    #[serde(flatten)]
    pub metrics: RetrievalMetrics,
}

/// The test split, evaluated once at the end.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TestEntry {
    /// which adapters: `best.safetensors` (best val mR) or `adapters.safetensors` (no val)
    pub adapters: String,
    pub step: usize,
    #[serde(flatten)]
    pub metrics: RetrievalMetrics,
}

/// OUT/metrics.json.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MetricsLog {
    pub val: Vec<ValEntry>,
    pub best: Option<ValEntry>,
    pub test: Option<TestEntry>,
}

impl MetricsLog {
    fn path(dir: &Path) -> PathBuf {
        dir.join("metrics.json")
    }

    /// The record of a resumed run, without what came after `step`.
    fn read(dir: &Path, step: usize) -> Result<Self> {
        let path = Self::path(dir);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(Self::default());
        };
        let mut log: Self = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a metrics record", path.display()))?;
        log.val.retain(|v| v.step <= step);
        log.best = log
            .val
            .iter()
            .fold(None::<&ValEntry>, |b, v| match b {
                Some(b) if b.metrics.r_mean >= v.metrics.r_mean => Some(b),
                _ => Some(v),
            })
            .cloned();
        log.test = None;
        Ok(log)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        crate::output::write_atomic(
            &Self::path(dir),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }
}

/// The val and test splits and what evaluating them needs.
struct Evaluator {
    val: Option<EvalSet>,
    test: Option<EvalSet>,
    tokenizer: ClipTokenizer,
    clip: ClipConfig,
    acfg: AdapterConfig,
    image_root: PathBuf,
    batch: usize,
    device: Device,
}

impl Evaluator {
    /// Metrics of `split` with the given adapter tensors.
    fn run(
        &self,
        model: &Clip,
        tensors: HashMap<String, Tensor>,
        split: &EvalSet,
    ) -> Result<RetrievalMetrics> {
        let adapters = HarmaAdapters::from_tensors(tensors, &self.clip, &self.acfg, &self.device)?;
        let (m, _) = crate::eval::evaluate_split(
            model,
            Some(&adapters),
            &self.tokenizer,
            split,
            &self.image_root,
            self.batch,
            &self.device,
            false,
        )?;
        Ok(m)
    }
}

/// The trained tensors' current values, detached: evaluating them keeps no graph.
fn detached(vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect()
}

/// A prepared batch.
struct Batch {
    pixels: Vec<f32>,
    ids: Vec<u32>,
    image_ids: Vec<i64>,
}

fn progress(total: usize, start: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} steps, eta {eta} | {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_position(start as u64);
    pb
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

/// The trained tensors and the optimiser, ready to step.
struct State {
    adapters: HarmaAdapters,
    vars: Vec<(String, Var)>,
    opt: AdamW,
}

fn adamw_config(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        weight_decay: cfg.weight_decay,
        variant: match cfg.adamw {
            AdamWKind::Transformers => AdamWVariant::Transformers,
            AdamWKind::Torch => AdamWVariant::Torch,
        },
        ..AdamWConfig::default()
    }
}

/// Starting adapters: `--adapters`, else those in `--init`, else fresh (seeded).
fn initial_state(
    cfg: &TrainConfig,
    ckpt: &mut Checkpoint,
    clip: &ClipConfig,
    acfg: &AdapterConfig,
    device: &Device,
) -> Result<State> {
    let tensors = match crate::embed::adapter_tensors(cfg.adapters.as_deref(), ckpt)? {
        Some((t, source)) => {
            eprintln!("starting from the adapters in {}", source.display());
            t
        }
        None => {
            eprintln!("starting from fresh adapters (the model equals its backbone at step 0)");
            let mut rng = Rng::derive(cfg.seed, &[STREAM_INIT]);
            harma_adapters::init_tensors(clip, acfg, &mut || rng.uniform(), device)?
        }
    };
    let (adapters, vars) = HarmaAdapters::trainable(tensors, clip, acfg, device)
        .context("the starting adapters do not fit the model")?;
    let opt = AdamW::new(vars.clone(), adamw_config(cfg))?;
    Ok(State {
        adapters,
        vars,
        opt,
    })
}

/// The header metadata of the adapter files a run writes.
fn checkpoint_meta(step: usize, cfg: &TrainConfig) -> Result<HashMap<String, String>> {
    let sharing = toml::Value::try_from(cfg.sharing)?;
    Ok(HashMap::from([
        ("step".to_string(), step.to_string()),
        ("arch".to_string(), cfg.arch.clone()),
        (
            "sharing".to_string(),
            sharing.as_str().unwrap_or("").to_string(),
        ),
    ]))
}

fn resume_path(dir: &Path) -> PathBuf {
    dir.join("resume.safetensors")
}

/// Write `adapters.safetensors` and `resume.safetensors` after `step` steps. Refuses to write
/// non-finite tensors, so the files on disk stay the last good state.
fn save(dir: &Path, st: &State, step: usize, plan: &Plan, cfg: &TrainConfig) -> Result<()> {
    for (name, v) in &st.vars {
        let bad = v
            .as_tensor()
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .any(|x| !x.is_finite());
        if bad {
            bail!("`{name}` holds NaN or infinite values after step {step}: not saved");
        }
    }
    let mut meta = checkpoint_meta(step, cfg)?;
    crate::optim::save_trained_with(&dir.join("adapters.safetensors"), &st.vars, meta.clone())?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, v) in &st.vars {
        named.push((format!("param/{name}"), v.as_tensor().clone()));
    }
    for (name, m, v) in st.opt.moments() {
        named.push((format!("adam_m/{name}"), m.clone()));
        named.push((format!("adam_v/{name}"), v.clone()));
    }
    meta.insert("format".into(), RESUME_FORMAT.into());
    meta.insert("n_pairs".into(), plan.n_pairs.to_string());
    meta.insert("adamw_step".into(), st.opt.step.to_string());
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::output::write_safetensors(&resume_path(dir), &refs, meta)
}

/// Load a resume checkpoint into `st`; returns the step it was written after.
fn restore(dir: &Path, st: &mut State, plan: &Plan) -> Result<usize> {
    let path = resume_path(dir);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {} (a run saves it at its first checkpoint)",
            path.display()
        )
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| -> Result<String> {
        meta.get(k)
            .cloned()
            .with_context(|| format!("{}: no `{k}` in its metadata", path.display()))
    };
    if get("format")? != RESUME_FORMAT {
        bail!("{}: not a harma-rs resume checkpoint", path.display());
    }
    let n_pairs: usize = get("n_pairs")?.parse()?;
    if n_pairs != plan.n_pairs {
        bail!(
            "{} was trained on {n_pairs} pairs, the annotations now give {}",
            path.display(),
            plan.n_pairs
        );
    }
    let step: usize = get("step")?.parse()?;
    let adamw_step: usize = get("adamw_step")?.parse()?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{}: cannot read its tensors", path.display()))?;
    let mut moments = HashMap::new();
    for (name, var) in &st.vars {
        let mut take = |kind: &str| {
            tensors
                .remove(&format!("{kind}/{name}"))
                .with_context(|| format!("{}: no `{kind}/{name}`", path.display()))
        };
        let p = take("param")?;
        if p.dims() != var.dims() {
            bail!(
                "{}: `{name}` has shape {:?}, the model needs {:?}",
                path.display(),
                p.dims(),
                var.dims()
            );
        }
        var.set(&p.to_device(var.device())?)?;
        moments.insert(name.clone(), (take("adam_m")?, take("adam_v")?));
    }
    st.opt
        .restore(adamw_step, &moments)
        .with_context(|| path.display().to_string())?;
    Ok(step)
}

/// Keep the log lines of steps up to `step` (a resumed run rewrites what follows).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::output::write_atomic(path, kept.as_bytes())
}

fn load_pairs(cfg: &TrainConfig) -> Result<PairSet> {
    let opts = LoadOptions {
        skip_bad: cfg.skip_bad,
        max_words: cfg.max_words,
        image_root: Some(cfg.image_root.clone()),
    };
    let set = harma_data::annotations::load_training(&cfg.train_json, &opts)?;
    crate::eval::warn_skipped(&cfg.train_json, &set.skipped);
    Ok(set)
}

/// Train with resolved settings; `resume` continues the run in `cfg.out`.
pub fn train(cfg: &TrainConfig, resume: bool, control: &Control) -> Result<Outcome> {
    let dir = &cfg.out;
    let log_path = dir.join("log.jsonl");
    if !resume && (log_path.exists() || resume_path(dir).exists()) {
        bail!(
            "{} already holds a training run; continue it with `harma train --resume {}` or \
             choose another --out",
            dir.display(),
            dir.display()
        );
    }
    // inputs first: a bad annotation fails before the model loads
    let pairs = load_pairs(cfg)?;
    let plan = Plan::new(cfg, pairs.captions.len())?;
    let split = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| crate::eval::load_split(p, &cfg.image_root, cfg.skip_bad))
            .transpose()
    };
    let (val, test) = (split(&cfg.val_json)?, split(&cfg.test_json)?);
    let clip = ClipConfig::preset(&cfg.arch)?;
    let device = crate::device::parse(&cfg.device)?;
    let dtype = crate::device::parse_precision(&cfg.precision)?;
    eprintln!("device: {}", crate::device::describe(&device));
    // one tokenizer: for the training captions now, for val and test later
    let tokenizer = ClipTokenizer::new(clip.text.context_length)?;
    let ctx = clip.text.context_length;
    let ids = tokenizer.encode_batch(&pairs.captions)?;
    crate::embed::check_vocab(&ids, &clip)?;

    let mut ckpt = Checkpoint::load(&cfg.init, &clip)?;
    let model = Clip::from_checkpoint(&ckpt, &clip, &device)?.with_linear_dtype(dtype)?;
    let acfg = AdapterConfig {
        sharing: cfg.sharing.into(),
        ..AdapterConfig::default()
    };
    let mut st = initial_state(cfg, &mut ckpt, &clip, &acfg, &device)?;
    let params: Vec<Tensor> = st.vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    drop(ckpt);

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let start = if resume {
        let step = restore(dir, &mut st, &plan)?;
        truncate_log(&log_path, step)?;
        eprintln!("resuming {} after step {step}", dir.display());
        step
    } else {
        0
    };
    let mut record = if resume {
        MetricsLog::read(dir, start)?
    } else {
        MetricsLog::default()
    };
    crate::output::write_atomic(&dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let evaluator = Evaluator {
        val,
        test,
        tokenizer,
        clip: clip.clone(),
        acfg: acfg.clone(),
        image_root: cfg.image_root.clone(),
        batch: cfg.eval_batch_size,
        device: device.clone(),
    };
    if start >= plan.total {
        eprintln!("the run already has {start} of {} steps", plan.total);
        final_test(dir, &model, &st, &evaluator, &mut record, start)?;
        return Ok(Outcome::Finished { steps: start });
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;

    let size = clip.vision.image_size;
    let transform = match cfg.augment {
        AugmentKind::Harma => TrainTransform::harma(size),
        AugmentKind::None => TrainTransform::none(size),
    };
    let schedule = match cfg.schedule {
        ScheduleKind::Linear => Schedule::linear(plan.total, cfg.warmup),
        ScheduleKind::Constant => Schedule::Constant,
    };
    let loss_cfg = cfg.loss();
    eprintln!(
        "training {} pairs ({} images), batch {}, {} steps ({} per epoch)",
        plan.n_pairs,
        pairs
            .image_ids
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        plan.batch,
        plan.total,
        plan.steps_per_epoch
    );
    let pb = progress(plan.total, start);
    let mut last_saved: Option<usize> = resume.then_some(start);
    let mut outcome = Outcome::Finished { steps: plan.total };
    let mut timer = std::time::Instant::now();

    crate::pipeline::prefetch(
        start..plan.total,
        2,
        |k| {
            use rayon::prelude::*;
            let items = plan.batch(k);
            let pixels = items
                .par_iter()
                .map(|(i, rng)| -> Result<Vec<f32>> {
                    let img = harma_data::load_rgb8(&cfg.image_root.join(&pairs.images[*i]))?;
                    let out = transform.apply(&img, &mut rng.clone());
                    Ok(harma_data::image::normalize_chw(&out))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Batch {
                pixels: pixels.concat(),
                ids: items
                    .iter()
                    .flat_map(|(i, _)| ids[i * ctx..(i + 1) * ctx].iter().copied())
                    .collect(),
                image_ids: items.iter().map(|(i, _)| pairs.image_ids[*i]).collect(),
            })
        },
        |k, batch| {
            let b = batch.image_ids.len();
            let pixels = Tensor::from_vec(batch.pixels, (b, 3, size, size), &device)?;
            let tokens = Tensor::from_vec(batch.ids, (b, ctx), &device)?;
            let temp = scalar(&st.adapters.temp)?;
            let (terms, mut grads) = crate::step::loss_and_grads(
                &model,
                &st.adapters,
                &params,
                (&pixels, &tokens),
                &batch.image_ids,
                &loss_cfg,
                cfg.recompute,
            )?;
            let (loss, lc, lt) = (
                scalar(&terms.total)?,
                scalar(&terms.contrastive)?,
                scalar(&terms.triplet)?,
            );
            if !loss.is_finite() {
                pb.abandon();
                let kept = match last_saved {
                    Some(s) => format!(
                        "the last good checkpoint, {}/adapters.safetensors after step {s}, \
                         is kept; resume from it with --resume and a lower --lr",
                        dir.display()
                    ),
                    None => "no checkpoint had been written yet".to_string(),
                };
                bail!(
                    "step {}: the loss is {loss} (contrastive {lc}, triplet {lt}); training \
                     stopped. {kept}",
                    k + 1
                );
            }
            drop(terms);
            let grad_norm = match cfg.max_grad_norm {
                Some(m) => Some(st.opt.clip_grad_norm(&mut grads, m)?),
                None => None,
            };
            let lr = schedule.lr(cfg.lr, k);
            st.opt.step(&grads, lr)?;
            drop(grads);
            let done = k + 1;
            let mut line = serde_json::json!({
                "step": done,
                "epoch": plan.epoch(k) + 1,
                "lr": lr,
                "loss": loss,
                "loss_contrastive": lc,
                "loss_triplet": lt,
                "temp": temp,
            });
            if let Some(g) = grad_norm {
                line["grad_norm"] = g.into();
            }
            writeln!(log, "{line}")?;
            log.flush()?;

            let secs = timer.elapsed().as_secs_f64();
            timer = std::time::Instant::now();
            pb.set_prefix(format!("epoch {}", plan.epoch(k) + 1));
            pb.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.1} pairs/s",
                b as f64 / secs
            ));
            pb.inc(1);

            let stop = control.stop.load(Ordering::SeqCst)
                || control.stop_after.is_some_and(|s| done >= s);
            if let Some(val) = &evaluator.val {
                if plan.due_after(done, cfg.val_every) {
                    pb.set_message("evaluating val".to_string());
                    let m = evaluator.run(&model, detached(&st.vars), val)?;
                    let entry = ValEntry {
                        step: done,
                        epoch: plan.epoch(k) + 1,
                        metrics: m,
                    };
                    let improved = record
                        .best
                        .as_ref()
                        .is_none_or(|b| m.r_mean > b.metrics.r_mean);
                    if improved {
                        save_best(dir, &st, done, cfg)?;
                        record.best = Some(entry.clone());
                    }
                    record.val.push(entry);
                    record.write(dir)?;
                    // suspend, not println: a hidden bar (no terminal) drops println
                    pb.suspend(|| {
                        eprintln!(
                            "step {done} (epoch {}): val mR {:.2} (R@1 i->t {:.2}, t->i {:.2}){}",
                            plan.epoch(k) + 1,
                            m.r_mean,
                            m.txt_r1,
                            m.img_r1,
                            if improved { ", best so far" } else { "" }
                        )
                    });
                }
            }
            if stop || plan.due_after(done, cfg.save_every) {
                save(dir, &st, done, &plan, cfg)?;
                last_saved = Some(done);
            }
            if stop && done < plan.total {
                outcome = Outcome::Stopped { step: done };
                return Ok(false);
            }
            Ok(true)
        },
    )?;
    pb.finish();
    match &outcome {
        Outcome::Finished { steps } => {
            eprintln!(
                "finished {steps} steps: {}",
                dir.join("adapters.safetensors").display()
            );
            final_test(dir, &model, &st, &evaluator, &mut record, *steps)?;
        }
        Outcome::Stopped { step } => eprintln!(
            "stopped after step {step}; continue with `harma train --resume {}`",
            dir.display()
        ),
    }
    Ok(outcome)
}

fn save_best(dir: &Path, st: &State, step: usize, cfg: &TrainConfig) -> Result<()> {
    let mut meta = checkpoint_meta(step, cfg)?;
    meta.insert("selected_by".into(), "val r_mean".into());
    crate::optim::save_trained_with(&dir.join("best.safetensors"), &st.vars, meta)
}

/// Evaluate test once, with the best adapters by val (or the last without val); print and
/// record it.
fn final_test(
    dir: &Path,
    model: &Clip,
    st: &State,
    ev: &Evaluator,
    record: &mut MetricsLog,
    steps: usize,
) -> Result<()> {
    if let Some(best) = &record.best {
        eprintln!(
            "best val mR {:.2} at step {} (epoch {}): {}",
            best.metrics.r_mean,
            best.step,
            best.epoch,
            dir.join("best.safetensors").display()
        );
    }
    let Some(test) = &ev.test else {
        return Ok(());
    };
    if record.test.is_some() {
        return Ok(());
    }
    let (file, step, tensors) = match &record.best {
        Some(best) => {
            let tensors = harma_clip::checkpoint::load_adapters(&dir.join("best.safetensors"))?;
            ("best.safetensors", best.step, tensors)
        }
        None => ("adapters.safetensors", steps, detached(&st.vars)),
    };
    eprintln!("evaluating test with {file} (step {step})");
    let m = ev.run(model, tensors, test)?;
    println!("test ({file}, step {step}):\n{}", crate::eval::table(&m));
    record.test = Some(TestEntry {
        adapters: file.to_string(),
        step,
        metrics: m,
    });
    record.write(dir)
}

/// `harma train` from the command line: settings resolved, Ctrl-C wired to a clean stop.
pub fn run(args: &Args) -> Result<()> {
    let cfg = TrainConfig::resolve(args)?;
    let control = Control::default();
    let stop = control.stop.clone();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now, without saving this step");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step and saving (Ctrl-C again to quit now)");
    })
    .context("cannot install the Ctrl-C handler")?;
    train(&cfg, args.resume.is_some(), &control)?;
    Ok(())
}
