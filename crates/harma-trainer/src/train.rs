//! `harma train`: HarMA's adapters trained on image-caption pairs.
//!
//! A run writes into its folder `config.toml` (every resolved setting), `log.jsonl` (one line
//! per step), `metrics.json` (val and test), and at each save point the checkpoints of
//! [`crate::resume`]. All randomness (shuffling, augmentation, fresh adapters) is drawn from
//! streams derived from the seed and the position in the run, so the step number is the whole
//! random state: a resumed run equals an uninterrupted one, bit for bit.
//!
//! The pieces: the data ([`TrainData`]: pairs, tokens, the batch plan, val and test), the
//! [`Trainer`] (one step), the checkpoints ([`crate::resume`]), the records
//! ([`harma_report::record`]), and the loop below, which prepares batches two steps ahead and, after
//! each step, logs, evaluates, saves and stops as the settings say.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use harma_dist::{Collective, Single};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use harma_adapters::{AdapterConfig, HarmaAdapters};
use harma_clip::{Clip, ClipConfig, ClipTokenizer};
use harma_data::annotations::{EvalSet, LoadOptions, PairSet};
use harma_data::batcher::Batcher;
use harma_data::rng::Rng;
use harma_data::sampler::BatchPlan;
use harma_metrics::RetrievalMetrics;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::TrainConfig;
use crate::resume;
use crate::trainer::{NonFiniteLoss, StepReport, Trainer};
use harma_model::encode::Encoder;
use harma_model::eval::EvalOptions;
use harma_report::info::{DataFile, FileHash};
use harma_report::record::{MetricsLog, StartEntry, StepLog, TestEntry, ValEntry};
use harma_report::{Examples, Phase, Recorder, RunStart};

/// Stream label of fresh adapters under the seed (see [`Rng::derive`]).
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

/// A run's data: the training pairs and their tokens, the batch plan, val and test.
pub struct TrainData {
    pub pairs: PairSet,
    /// Token ids of every caption, `context` per caption.
    pub ids: Vec<u32>,
    pub plan: BatchPlan,
    pub val: Option<EvalSet>,
    pub test: Option<EvalSet>,
}

impl TrainData {
    /// Load and check the annotation files (before any model is loaded, so that a bad entry
    /// fails fast) and tokenize the captions.
    pub fn load(cfg: &TrainConfig, tokenizer: &ClipTokenizer) -> Result<Self> {
        let opts = LoadOptions {
            skip_bad: cfg.data.skip_bad,
            max_words: cfg.data.max_words,
            image_root: Some(cfg.image_root().to_path_buf()),
        };
        let pairs = harma_data::annotations::load_training(cfg.train_json(), &opts)?;
        harma_model::eval::warn_skipped(cfg.train_json(), &pairs.skipped);
        let n = pairs.captions.len();
        let plan = BatchPlan::new(
            n,
            cfg.batch_size(),
            cfg.length(),
            cfg.run.seed,
            cfg.run.shuffle,
        )
        .with_context(|| {
            format!(
                "--batch-size {} is larger than the {n} training pairs",
                cfg.batch_size()
            )
        })?;
        let split = |p: &Option<std::path::PathBuf>| {
            p.as_ref()
                .map(|p| harma_model::eval::load_split(p, cfg.image_root(), cfg.data.skip_bad))
                .transpose()
        };
        let (val, test) = (split(&cfg.data.val_json)?, split(&cfg.data.test_json)?);
        let ids = tokenizer.encode_batch(&pairs.captions)?;
        Ok(Self {
            pairs,
            ids,
            plan,
            val,
            test,
        })
    }

    /// How many distinct images the pairs show.
    pub fn images(&self) -> usize {
        self.pairs
            .image_ids
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
    }
}

/// What the report records of a session: the data files hashed, the checkpoint, where the
/// starting adapters come from, the compute setting.
fn run_start(
    cfg: &TrainConfig,
    data: &TrainData,
    compute: &harma_clip::Compute,
    step: usize,
    fresh_adapters: bool,
) -> Result<RunStart> {
    let mut files = vec![DataFile {
        split: "train".into(),
        file: FileHash::of(cfg.train_json())?,
        images: data.images(),
        captions: data.pairs.captions.len(),
    }];
    for (split, path, set) in [
        ("val", &cfg.data.val_json, &data.val),
        ("test", &cfg.data.test_json, &data.test),
    ] {
        if let (Some(p), Some(s)) = (path, set) {
            files.push(DataFile {
                split: split.into(),
                file: FileHash::of(p)?,
                images: s.images.len(),
                captions: s.captions.len(),
            });
        }
    }
    let start_adapters = match &cfg.model.backbone.adapters {
        Some(p) => p.display().to_string(),
        None if fresh_adapters => "fresh".into(),
        None => cfg.init().display().to_string(),
    };
    Ok(RunStart {
        dir: cfg.out().to_path_buf(),
        data: files,
        init: cfg.init().to_path_buf(),
        start_adapters: Some(start_adapters),
        device: compute.describe(),
        precision: compute.precision.to_string(),
        step,
    })
}

/// The starting adapters: `--adapters`, else those in `--init`, else fresh (seeded).
fn starting_adapters(
    cfg: &TrainConfig,
    in_checkpoint: HashMap<String, Tensor>,
    clip: &ClipConfig,
    acfg: &AdapterConfig,
    compute: &harma_clip::Compute,
) -> Result<HashMap<String, Tensor>> {
    let explicit = cfg.model.backbone.adapters.as_deref();
    Ok(
        match harma_model::model::adapter_tensors(explicit, in_checkpoint, cfg.init())? {
            Some((t, source)) => {
                eprintln!("starting from the adapters in {}", source.display());
                t
            }
            None => {
                eprintln!("starting from fresh adapters (the model equals its backbone at step 0)");
                let mut rng = Rng::derive(cfg.run.seed, &[STREAM_INIT]);
                harma_adapters::init_tensors(clip, acfg, &mut || rng.uniform(), &compute.device)?
            }
        },
    )
}

/// The val and test splits and what evaluating them needs.
struct Evaluator<'a> {
    val: Option<EvalSet>,
    test: Option<EvalSet>,
    tokenizer: ClipTokenizer,
    acfg: AdapterConfig,
    cfg: &'a TrainConfig,
}

impl Evaluator<'_> {
    /// Metrics of `split` with the given adapter tensors.
    fn run(
        &self,
        model: &Clip,
        tensors: HashMap<String, Tensor>,
        split: &EvalSet,
    ) -> Result<RetrievalMetrics> {
        Ok(self.run_scores(model, tensors, split)?.0)
    }

    /// [`Evaluator::run`], with the score matrix.
    fn run_scores(
        &self,
        model: &Clip,
        tensors: HashMap<String, Tensor>,
        split: &EvalSet,
    ) -> Result<(RetrievalMetrics, Vec<f32>)> {
        let adapters =
            HarmaAdapters::from_tensors(tensors, &model.config, &self.acfg, &model.compute)?;
        let encoder = Encoder {
            model,
            hook: Some(&adapters),
            batch: self.cfg.run.eval_batch_size,
            limits: self.cfg.load.limits(),
        };
        let opts = EvalOptions {
            image_root: self.cfg.image_root(),
            progress: false,
        };
        let (m, _, scores) =
            harma_model::eval::evaluate_split_scores(&encoder, &self.tokenizer, split, &opts)?;
        Ok((m, scores))
    }

    /// Evaluate val and test with the starting adapters (before the first step) and record
    /// them: the zero-shot baseline when the adapters are fresh.
    fn zero_shot(&self, trainer: &Trainer, record: &mut MetricsLog) -> Result<()> {
        let mut start = StartEntry::default();
        for (split, slot) in [(&self.val, &mut start.val), (&self.test, &mut start.test)] {
            if let Some(set) = split {
                *slot = Some(self.run(trainer.model(), trainer.detached(), set)?);
            }
        }
        let show =
            |m: &Option<RetrievalMetrics>| m.map_or("-".into(), |m| format!("{:.2}", m.r_mean));
        eprintln!(
            "step 0 (before training): val mR {}, test mR {}",
            show(&start.val),
            show(&start.test)
        );
        record.start = Some(start);
        record.write(self.cfg.out())
    }

    /// Evaluate test once, with the best adapters by val (or the last without val); print
    /// and record it.
    fn final_test(&self, trainer: &Trainer, record: &mut MetricsLog, steps: usize) -> Result<()> {
        let dir = self.cfg.out();
        if let Some(best) = &record.best {
            eprintln!(
                "best val mR {:.2} at step {} (epoch {}): {}",
                best.metrics.r_mean,
                best.step,
                best.epoch,
                dir.join("best.safetensors").display()
            );
        }
        let Some(test) = &self.test else {
            return Ok(());
        };
        if record.test.is_some() {
            return Ok(());
        }
        let (file, step, tensors) = match &record.best {
            Some(best) => {
                let tensors = harma_adapters::load_file(&dir.join("best.safetensors"))?;
                ("best.safetensors", best.step, tensors)
            }
            None => ("adapters.safetensors", steps, trainer.detached()),
        };
        eprintln!("evaluating test with {file} (step {step})");
        let (m, scores) = self.run_scores(trainer.model(), tensors, test)?;
        let title = format!("test split, {file} (step {step})");
        let image_root = self.cfg.image_root();
        let counts = harma_report::examples::Counts::default();
        Examples::new(&title, test, &scores, image_root, self.cfg.run.seed, counts)?.write(dir)?;
        println!(
            "test ({file}, step {step}):\n{}",
            harma_model::eval::table(&m)
        );
        record.test = Some(TestEntry {
            adapters: file.to_string(),
            step,
            metrics: m,
        });
        record.write(dir)
    }
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

/// What the loop keeps between steps: the records, the progress bar, the last save. On a
/// data-parallel run only rank 0 (the lead) records, evaluates and saves.
struct RunState<'a> {
    cfg: &'a TrainConfig,
    plan: &'a BatchPlan,
    evaluator: Evaluator<'a>,
    record: MetricsLog,
    /// The lead's log; `None` on the other ranks.
    log: Option<StepLog>,
    pb: ProgressBar,
    last_saved: Option<usize>,
    timer: std::time::Instant,
    /// run.json and the report: the lead's, like `log`
    report: Option<Recorder>,
}

impl RunState<'_> {
    /// The error of a step whose loss is not finite, naming the checkpoint that is kept.
    fn non_finite(&self, e: anyhow::Error) -> anyhow::Error {
        if e.downcast_ref::<NonFiniteLoss>().is_none() {
            return e;
        }
        self.pb.abandon();
        let kept = match self.last_saved {
            Some(s) => format!(
                "the last good checkpoint, {}/adapters.safetensors after step {s}, is kept; \
                 resume from it with --resume and a lower --lr",
                self.cfg.out().display()
            ),
            None => "no checkpoint had been written yet".to_string(),
        };
        anyhow::anyhow!("{e}; training stopped. {kept}")
    }

    /// Before the first step (the lead's part): a new run's step-0 evaluation, and the test
    /// of a run that already has all its steps.
    fn begin(&mut self, trainer: &Trainer, start: usize) -> Result<()> {
        let Some(rec) = self.report.as_mut() else {
            return Ok(());
        };
        let dir = self.cfg.out();
        if start == 0 && self.cfg.run.zero_shot && self.record.start.is_none() {
            self.evaluator.zero_shot(trainer, &mut self.record)?;
            rec.lap(Phase::ZeroShot);
            rec.refresh(dir);
        }
        if start >= self.plan.total {
            eprintln!("the run already has {start} of {} steps", self.plan.total);
            self.evaluator
                .final_test(trainer, &mut self.record, start)?;
            rec.lap(Phase::Test);
            rec.refresh(dir);
        }
        Ok(())
    }

    /// After the last step (the lead's part): test with the best adapters, or how to go on.
    fn finish(&mut self, trainer: &Trainer, outcome: &Outcome) -> Result<()> {
        self.pb.finish();
        let Some(rec) = self.report.as_mut() else {
            return Ok(());
        };
        let dir = self.cfg.out();
        match outcome {
            Outcome::Finished { steps } => {
                eprintln!(
                    "finished {steps} steps: {}",
                    dir.join("adapters.safetensors").display()
                );
                self.evaluator
                    .final_test(trainer, &mut self.record, *steps)?;
                rec.lap(Phase::Test);
                rec.refresh(dir);
                eprintln!("report: {}", dir.join("report.html").display());
            }
            Outcome::Stopped { step } => eprintln!(
                "stopped after step {step}; continue with `harma train --resume {}`",
                dir.display()
            ),
        }
        Ok(())
    }

    /// After step `k` (0-based): log it, evaluate val and save where due. Returns whether to
    /// go on.
    fn after_step(
        &mut self,
        trainer: &Trainer,
        k: usize,
        report: &StepReport,
        pairs: usize,
        stop: bool,
    ) -> Result<bool> {
        let (done, epoch) = (report.step, self.plan.epoch(k) + 1);
        let (Some(log), Some(rec)) = (self.log.as_mut(), self.report.as_mut()) else {
            // not the lead: it logs, evaluates and saves for every rank
            return Ok(!(stop && done < self.plan.total));
        };
        rec.step(done, pairs);
        log.write(report, epoch)?;
        let secs = self.timer.elapsed().as_secs_f64();
        self.timer = std::time::Instant::now();
        self.pb.set_prefix(format!("epoch {epoch}"));
        self.pb.set_message(format!(
            "loss {:.4} lr {:.2e} {:.1} pairs/s",
            report.loss,
            report.lr,
            pairs as f64 / secs
        ));
        self.pb.inc(1);
        let dir = self.cfg.out();
        if let Some(val) = &self.evaluator.val {
            if self.plan.due_after(done, self.cfg.run.val_every) {
                self.pb.set_message("evaluating val".to_string());
                let m = self
                    .evaluator
                    .run(trainer.model(), trainer.detached(), val)?;
                let entry = ValEntry {
                    step: done,
                    epoch,
                    metrics: m,
                };
                rec.lap(Phase::Val);
                let improved = self.record.add_val(entry);
                if improved {
                    resume::save_best(dir, trainer, done, self.cfg)?;
                }
                self.record.write(dir)?;
                // suspend, not println: a hidden bar (no terminal) drops println
                self.pb.suspend(|| {
                    eprintln!(
                        "step {done} (epoch {epoch}): val mR {:.2} (R@1 i->t {:.2}, t->i {:.2}){}",
                        m.r_mean,
                        m.txt_r1,
                        m.img_r1,
                        if improved { ", best so far" } else { "" }
                    )
                });
                rec.refresh(dir);
            }
        }
        if stop || self.plan.due_after(done, self.cfg.run.save_every) {
            resume::save(dir, trainer, done, self.plan.n_pairs, self.cfg)?;
            self.last_saved = Some(done);
            rec.refresh(dir);
        }
        Ok(!(stop && done < self.plan.total))
    }
}

/// Whether the run in `dir` can go on: with a checkpoint, `--resume` continues it and a fresh
/// run is refused (nothing is overwritten); without one (the run stopped before its first
/// save: killed, a NaN at step 1, a full disk), both start from step 0, keeping nothing of it.
fn check_folder(dir: &Path, resume: bool) -> Result<bool> {
    let stale = harma_checkpoint::write::remove_stale_temps(dir);
    if stale > 0 {
        eprintln!(
            "removed {stale} temp files that an interrupted write left in {}",
            dir.display()
        );
    }
    let has_checkpoint = resume::resume_path(dir).exists();
    if has_checkpoint && !resume {
        bail!(
            "{} already holds a training run; continue it with `harma train --resume {}` or \
             choose another --out",
            dir.display(),
            dir.display()
        );
    }
    if !has_checkpoint && StepLog::path(dir).exists() {
        eprintln!(
            "{} holds a run that stopped before its first checkpoint: starting it again from \
             step 0",
            dir.display()
        );
        for f in [StepLog::path(dir), dir.join("metrics.json")] {
            if f.exists() {
                std::fs::remove_file(&f)
                    .with_context(|| format!("cannot remove {}", f.display()))?;
            }
        }
    }
    Ok(resume && has_checkpoint)
}

/// Train with resolved settings; `resume` continues the run in `cfg.out()` (from step 0 if
/// it has no checkpoint yet).
pub fn train(cfg: &TrainConfig, resume: bool, control: &Control) -> Result<Outcome> {
    train_on(cfg, resume, control, Arc::new(Single))
}

/// [`train`] as one rank of a data-parallel run (`coll`): every rank loads the data and the
/// model and steps on its shard of each global batch; rank 0 alone writes the run's files,
/// evaluates val and test and shows progress. A rank that fails stops the others.
pub fn train_on(
    cfg: &TrainConfig,
    resume: bool,
    control: &Control,
    coll: Arc<dyn Collective>,
) -> Result<Outcome> {
    let ran = run_rank(cfg, resume, control, coll.clone());
    if let Err(e) = &ran {
        coll.abort(&format!("rank {} failed: {e:#}", coll.rank()));
    }
    ran
}

fn run_rank(
    cfg: &TrainConfig,
    resume: bool,
    control: &Control,
    coll: Arc<dyn Collective>,
) -> Result<Outcome> {
    let since = std::time::Instant::now();
    let dir = cfg.out();
    let (rank, world) = (coll.rank(), coll.world());
    let lead = rank == 0;
    let resume = if lead {
        check_folder(dir, resume)?
    } else {
        resume && resume::resume_path(dir).exists()
    };
    // inputs first: a bad annotation fails before the model loads
    let clip = ClipConfig::preset(&cfg.model.backbone.arch)?;
    // one tokenizer: for the training captions now, for val and test later
    let tokenizer = ClipTokenizer::new(clip.text.context_length)?;
    let data = TrainData::load(cfg, &tokenizer)?;
    let compute = cfg.compute.compute()?;
    eprintln!("device: {}", compute.describe());
    harma_model::model::check_vocab(&data.ids, &clip)?;
    let (mut trainer, clip, fresh) = build_trainer(cfg, &data.plan, &compute, &coll)?;
    let plan = &data.plan;
    let (start, record) = restore(cfg, resume, lead, &mut trainer, plan)?;

    let report = if lead {
        harma_checkpoint::write::write_atomic(&dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        Some(Recorder::start(
            run_start(cfg, &data, &compute, start, fresh)?,
            since,
        )?)
    } else {
        None
    };
    let evaluator = Evaluator {
        val: data.val.clone().filter(|_| lead),
        test: data.test.clone().filter(|_| lead),
        tokenizer,
        acfg: cfg.adapters(),
        cfg,
    };
    let mut state = RunState {
        cfg,
        plan,
        evaluator,
        record,
        log: lead.then(|| StepLog::open(dir)).transpose()?,
        pb: if lead {
            progress(plan.total, start)
        } else {
            ProgressBar::hidden()
        },
        last_saved: resume.then_some(start),
        timer: std::time::Instant::now(),
        report,
    };
    state.begin(&trainer, start)?;
    if start >= plan.total {
        return Ok(Outcome::Finished { steps: start });
    }
    if lead {
        let ranks = if world > 1 {
            format!(" over {world} ranks")
        } else {
            String::new()
        };
        eprintln!(
            "training {} pairs ({} images), batch {}{ranks}, {} steps ({} per epoch)",
            plan.n_pairs,
            data.images(),
            plan.batch,
            plan.total,
            plan.steps_per_epoch
        );
    }
    let batcher = Batcher {
        pairs: &data.pairs,
        ids: &data.ids,
        context: clip.text.context_length,
        transform: cfg.transform(clip.vision.image_size),
        image_root: cfg.image_root().to_path_buf(),
        limits: cfg.load.limits(),
    };
    let mut outcome = Outcome::Finished { steps: plan.total };
    harma_data::pipeline::prefetch(
        start..plan.total,
        2,
        |k| Ok(batcher.batch(&plan.shard(k, rank, world))?),
        |k, batch| {
            debug_assert_eq!(
                k,
                trainer.steps_done(),
                "the schedule follows the optimiser"
            );
            let pairs = batch.len();
            let report = trainer.step(batch).map_err(|e| state.non_finite(e))?;
            let done = report.step;
            let stop = control.stop.load(Ordering::SeqCst)
                || control.stop_after.is_some_and(|s| done >= s);
            let stop = any_rank(coll.as_ref(), stop)?;
            let go_on = state.after_step(&trainer, k, &report, pairs, stop)?;
            if !go_on {
                outcome = Outcome::Stopped { step: done };
            }
            Ok(go_on)
        },
    )?;
    state.finish(&trainer, &outcome)?;
    Ok(outcome)
}

/// The backbone, the starting adapters and the `Trainer` over `coll`'s ranks; also the
/// backbone's sizes and whether the adapters are fresh.
fn build_trainer(
    cfg: &TrainConfig,
    plan: &BatchPlan,
    compute: &harma_clip::Compute,
    coll: &Arc<dyn Collective>,
) -> Result<(Trainer, ClipConfig, bool)> {
    let (clip, model, in_checkpoint) =
        harma_model::model::load_backbone(cfg.init(), &cfg.model.backbone.arch, compute)?;
    let acfg = cfg.adapters();
    let fresh = cfg.model.backbone.adapters.is_none() && in_checkpoint.is_empty();
    let tensors = starting_adapters(cfg, in_checkpoint, &clip, &acfg, compute)?;
    let world = coll.world();
    if !plan.batch.is_multiple_of(world) {
        bail!(
            "--batch-size {} does not split over {world} ranks: give a multiple of {world}",
            plan.batch
        );
    }
    let trainer = Trainer::new(model, tensors, &acfg, cfg.trainer_settings(plan.total))?
        .on_ranks(coll.clone());
    Ok((trainer, clip, fresh))
}

/// The step a run starts after (its checkpoint restored into `trainer` when resuming) and its
/// metrics so far (the lead's; the other ranks keep none).
fn restore(
    cfg: &TrainConfig,
    resume: bool,
    lead: bool,
    trainer: &mut Trainer,
    plan: &BatchPlan,
) -> Result<(usize, MetricsLog)> {
    let dir = cfg.out();
    if lead {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if !resume {
        return Ok((0, MetricsLog::default()));
    }
    let step = resume::restore(dir, trainer, plan.n_pairs)?;
    if !lead {
        return Ok((step, MetricsLog::default()));
    }
    StepLog::truncate(dir, step)?;
    eprintln!("resuming {} after step {step}", dir.display());
    Ok((step, MetricsLog::read(dir, step)?))
}

/// Whether any rank says `stop`, so that every rank stops after the same step.
fn any_rank(coll: &dyn Collective, stop: bool) -> Result<bool> {
    if coll.world() == 1 {
        return Ok(stop);
    }
    let flag = Tensor::new(&[stop as u8 as f32], &candle_core::Device::Cpu)?;
    Ok(coll.all_reduce_sum(&[flag])?[0].to_vec1::<f32>()?[0] > 0.0)
}
