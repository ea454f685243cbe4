//! `harma train` settings: one definition per setting.
//!
//! [`TrainConfig`] nests the settings by concern (data, model, optimiser, objective, run,
//! compute), each group declared once with [`harma_settings::settings!`]: a field's type, its
//! default and its doc comment, from which the `harma` binary makes the flag and its help. The
//! layers, lowest first: defaults, a dataset preset (`dataset`), a TOML file (a config file,
//! or the `config.toml` of a run being resumed), the flags given on the command line. Each
//! layer is a table of keys; they are merged key by key and read back by serde, so no setting
//! needs merging code of its own. The resolved settings are written to `OUT/config.toml` (flat
//! keys, the flag names with `_` for `-`), itself a valid config file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use harma_kernels::compute::ComputeSettings;
use harma_model::BackboneSettings;
use harma_settings::{Setting, Settings};
use serde::{Deserialize, Serialize};

use harma_data::augment::TrainTransform;
use harma_data::LoadSettings;

use crate::optim::{AdamWConfig, AdamWVariant};
use crate::schedule::Schedule;
use crate::trainer::TrainerSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    Linear,
    Constant,
}

harma_settings::choices!(ScheduleKind {
    "linear": "warm-up over --warmup of the steps, then linear decay to 0 (the original's)",
    "constant": "",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AugmentKind {
    Harma,
    None,
}

harma_settings::choices!(AugmentKind {
    "harma": "RandomResizedCrop 0.5-1, horizontal flip, RandAugment 2 ops at magnitude 7",
    "none": "the evaluation resize only",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TripletKind {
    Adaptive,
    PlainSum,
    PlainMax,
    None,
}

harma_settings::choices!(TripletKind {
    "adaptive": "costs weighted by (1 - e^-cost)^2, summed (the original's)",
    "plain-sum": "VSE++ hinge, summed over negatives",
    "plain-max": "VSE++ hinge, hardest negative only",
    "none": "",
});

/// The datasets with presets; their files sit under the data folder as docs/DATA.md lays out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    Rsitmd,
    Rsicd,
}

harma_settings::choices!(Dataset { "rsitmd": "", "rsicd": "" });

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Rsitmd => "rsitmd",
            Dataset::Rsicd => "rsicd",
        }
    }

    /// The preset's settings on top of `cfg`: the data layout of docs/DATA.md under
    /// `data_dir`, and the original's "geo" configuration (GeoRSCLIP RET-2, lr 4e-6, 80
    /// epochs, batch 214).
    pub fn apply(self, cfg: &mut TrainConfig, data_dir: &Path) {
        let d = data_dir.join(self.name());
        cfg.data.train_json = Some(d.join("train.json"));
        cfg.data.val_json = Some(d.join("val.json"));
        cfg.data.test_json = Some(d.join("test.json"));
        cfg.data.image_root = Some(d.join("images"));
        cfg.model.init = Some(data_dir.join("models").join("RS5M_ViT-B-32_RET-2.pt"));
        cfg.optim.lr = Some(4e-6);
        cfg.run.epochs = Some(80);
        cfg.run.steps = None;
        cfg.run.batch_size = Some(214);
        cfg.run.out = Some(PathBuf::from("runs").join(self.name()));
        cfg.run.dataset = Some(self);
    }
}

harma_settings::settings! {
    /// The data: annotation files, images, caption cleaning.
    pub struct DataConfig {
        /// Training annotations: HarMA's format ([{"caption", "image", "image_id"}, ...], one
        /// entry per caption; pairs with the same image_id are soft positives of each other), or
        /// your own .csv (`image,caption` lines) or .jsonl ({"image", "caption"} lines; lines
        /// naming the same image share its id)
        #[setting(value_name("FILE"))]
        pub train_json: Option<PathBuf> = None,
        /// Folder the `image` paths of the annotations are relative to
        #[setting(value_name("DIR"))]
        pub image_root: Option<PathBuf> = None,
        /// Validation split (HarMA's val format, or .csv/.jsonl pairs): evaluated during
        /// training; the adapters with the best mR are kept as OUT/best.safetensors
        #[setting(value_name("FILE"))]
        pub val_json: Option<PathBuf> = None,
        /// Test split: evaluated once at the end with the best adapters by val (never used to
        /// choose them)
        #[setting(value_name("FILE"))]
        pub test_json: Option<PathBuf> = None,
        /// Skip bad annotation entries (empty caption, missing image) with a warning, instead
        /// of stopping at the first
        #[setting(switch(true))]
        pub skip_bad: bool = false,
        /// Words kept per caption (HarMA's pre_caption)
        #[setting(value_name("N"))]
        pub max_words: usize = 30,
    }
}

harma_settings::settings! {
    /// The checkpoint to start from.
    pub struct InitConfig {
        /// CLIP checkpoint to start from (as `harma embed --model`); an official HarMA
        /// checkpoint also supplies the starting adapters
        #[setting(value_name("CKPT"))]
        pub init: Option<PathBuf> = None,
    }
}

/// The model: the checkpoint to start from, its architecture and adapters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// CLIP checkpoint to start from
    pub init: Option<PathBuf>,
    #[serde(flatten)]
    pub backbone: BackboneSettings,
}

impl Settings for ModelConfig {
    fn settings() -> Vec<Setting> {
        [InitConfig::settings(), BackboneSettings::settings()].concat()
    }
}

harma_settings::settings! {
    /// The optimiser and its schedule (SPEC "Optimisation").
    pub struct OptimConfig {
        /// Peak learning rate (the original: 4e-6 from GeoRSCLIP, 4e-4 from LAION CLIP)
        pub lr: Option<f64> = None,
        /// Fraction of the steps spent warming up (linear schedule)
        #[setting(value_name("FRACTION"))]
        pub warmup: f64 = 0.1,
        /// Learning-rate schedule, stepped per batch
        pub schedule: ScheduleKind = ScheduleKind::Linear,
        /// AdamW decoupled weight decay, not applied to biases
        pub weight_decay: f64 = 0.04,
        /// AdamW update rule
        pub adamw: AdamWVariant = AdamWVariant::Transformers,
        /// Clip the global gradient norm to this value [default: no clipping]
        pub max_grad_norm: Option<f64> = None,
        /// Take the update the original's DistributedDataParallel takes on W GPUs: every
        /// trained tensor's gradient divided by W but `temp`'s (its AllGather gives each GPU
        /// only its own rows' share of the gradient, and DDP averages the GPUs'). AdamW then
        /// differs from W = 1 where a gradient is near its eps. 1: the global batch's gradient,
        /// on any number of ranks (--nproc). `cargo xtask reproduce` sets 2, the original's two
        /// GPUs
        #[setting(value_name("W"))]
        pub emulate_ddp: usize = 1,
    }
}

harma_settings::settings! {
    /// The objective.
    pub struct LossSettings {
        /// The triplet term of the objective
        pub triplet: TripletKind = TripletKind::Adaptive,
        /// Triplet margin
        pub margin: f64 = 0.2,
        /// Weight of the contrastive term
        pub contrastive_weight: f64 = 1.0,
        /// Weight of the triplet term
        pub triplet_weight: f64 = 1.0,
    }
}

harma_settings::settings! {
    /// The run: its length, batches, randomness, output and evaluation points.
    pub struct RunConfig {
        /// Image-caption pairs per step (the original: 214 per GPU on 2 GPUs)
        pub batch_size: Option<usize> = None,
        /// Number of optimiser steps
        #[setting(conflicts(&["epochs"]))]
        pub steps: Option<usize> = None,
        /// Number of passes over the training pairs (the last incomplete batch of each is
        /// dropped)
        pub epochs: Option<usize> = None,
        /// Keep the file order instead of shuffling each epoch
        #[setting(switch(false), flag("no-shuffle"))]
        pub shuffle: bool = true,
        /// Train-time image augmentation
        pub augment: AugmentKind = AugmentKind::Harma,
        /// Seed of the shuffling, the augmentation and fresh adapters
        pub seed: u64 = 3407,
        /// Output folder: config.toml, log.jsonl, adapters.safetensors, resume.safetensors
        #[setting(value_name("DIR"))]
        pub out: Option<PathBuf> = None,
        /// Write a checkpoint every N steps (0: at the end of each epoch and of the run)
        #[setting(value_name("N"))]
        pub save_every: usize = 0,
        /// Evaluate val every N steps (0: at the end of each epoch)
        #[setting(value_name("N"))]
        pub val_every: usize = 0,
        /// Images or captions per forward pass when evaluating
        #[setting(value_name("N"))]
        pub eval_batch_size: usize = 64,
        /// Do not evaluate the model before the first step. By default a new run evaluates val
        /// and test with the starting adapters (fresh adapters: the backbone alone, the
        /// zero-shot baseline) for metrics.json and the report
        #[setting(switch(false), flag("no-zero-shot"))]
        pub zero_shot: bool = true,
        /// Keep only each block's input in the forward pass and recompute one block at a time
        /// in the backward: activation memory of one block instead of all 24, for about 1.3x
        /// the time (what makes the original's batch 214 fit in a laptop's memory). Without it,
        /// on the CPU, each block keeps only what its frozen branches' backward needs (in bf16
        /// with `--precision bf16`) and the adapters run again in the backward
        #[setting(switch(true))]
        pub recompute: bool = false,
        /// Use a dataset preset: the files `cargo xtask fetch-data` writes under --data-dir
        /// (docs/DATA.md) and the original's settings (GeoRSCLIP RET-2, lr 4e-6, 80 epochs,
        /// batch 214); other settings override it
        pub dataset: Option<Dataset> = None,
    }
}

/// Every setting of a training run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub data: DataConfig,
    #[serde(flatten)]
    pub load: LoadSettings,
    #[serde(flatten)]
    pub model: ModelConfig,
    #[serde(flatten)]
    pub optim: OptimConfig,
    #[serde(flatten)]
    pub loss: LossSettings,
    #[serde(flatten)]
    pub run: RunConfig,
    #[serde(flatten)]
    pub compute: ComputeSettings,
}

impl Settings for TrainConfig {
    fn settings() -> Vec<Setting> {
        [
            DataConfig::settings(),
            LoadSettings::settings(),
            ModelConfig::settings(),
            OptimConfig::settings(),
            LossSettings::settings(),
            RunConfig::settings(),
            ComputeSettings::settings(),
        ]
        .concat()
    }
}

/// Keys of which a layer that sets one clears the other below it.
const EXCLUSIVE: &[(&str, &str)] = &[("steps", "epochs")];

/// Where the settings of `harma train` come from, and how to start it.
#[derive(Debug, Clone, Default)]
pub struct TrainArgs {
    /// A config file (`--config FILE.toml`).
    pub config: Option<PathBuf>,
    /// The run to continue (`--resume DIR`).
    pub resume: Option<PathBuf>,
    /// Where dataset presets look (`--data-dir DIR`; default `data`).
    pub data_dir: Option<PathBuf>,
    /// The settings given on the command line, typed, as a table of just those keys.
    pub flags: toml::Table,
    /// How to start a data-parallel run (`--nproc`, `--nnodes`, `--node-rank`, `--master`).
    pub launch: harma_dist::launch::LaunchArgs,
}

/// `layer` over `table`, key by key; a layer that sets one of an [`EXCLUSIVE`] pair clears
/// the other.
fn overlay(table: &mut toml::Table, layer: &toml::Table) {
    for (a, b) in EXCLUSIVE {
        if layer.contains_key(*a) {
            table.remove(*b);
        }
        if layer.contains_key(*b) {
            table.remove(*a);
        }
    }
    for (k, v) in layer {
        table.insert(k.clone(), v.clone());
    }
}

/// The setting names (the keys of config files).
pub fn setting_names() -> Vec<String> {
    TrainConfig::settings()
        .iter()
        .map(|s| s.key.to_string())
        .collect()
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table = text
        .parse::<toml::Table>()
        .with_context(|| format!("{}: not valid TOML", path.display()))?;
    let known = setting_names();
    if let Some(k) = table.keys().find(|k| !known.contains(k)) {
        bail!(
            "{}: unknown setting `{k}` (settings are the flag names with `_` for `-`; see \
             `harma train --help`)",
            path.display()
        );
    }
    Ok(table)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A required setting, or the error that says how to give it.
fn required<'a, T>(v: &'a Option<T>, key: &str) -> Result<&'a T> {
    v.as_ref().with_context(|| {
        format!(
            "missing setting `{key}`: give --{} or set `{key}` in --config",
            key.replace('_', "-")
        )
    })
}

impl TrainConfig {
    /// Defaults, then the dataset preset, then the config file (`--config`, or the resumed
    /// run's), then the flags given.
    pub fn resolve(args: &TrainArgs) -> Result<Self> {
        let file = match (&args.resume, &args.config) {
            (Some(dir), _) => Some(dir.join("config.toml")),
            (None, Some(f)) => Some(f.clone()),
            (None, None) => None,
        };
        let file_table = match &file {
            Some(f) => read_table(f)?,
            None => toml::Table::new(),
        };
        let origin = file
            .as_ref()
            .map_or("settings".to_string(), |f| f.display().to_string());
        let mut base = TrainConfig::default();
        // a dataset preset (from the flags, else the file) sits under both
        if let Some(v) = args.flags.get("dataset").or(file_table.get("dataset")) {
            let d = Dataset::deserialize(v.clone())
                .map_err(|e| anyhow::anyhow!("`dataset`: {}", e.message()))?;
            let data_dir = args.data_dir.as_deref().unwrap_or(Path::new("data"));
            d.apply(&mut base, data_dir);
        }
        let mut table = toml::Table::try_from(&base).context("settings")?;
        overlay(&mut table, &file_table);
        overlay(&mut table, &args.flags);
        if let Some(dir) = &args.resume {
            if let Some(out) = args.flags.get("out").and_then(|v| v.as_str()) {
                if absolute(Path::new(out)) != absolute(dir) {
                    bail!("--resume continues the run in its own folder; leave out --out");
                }
            }
            table.insert("out".into(), dir.display().to_string().into());
        }
        let cfg: TrainConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{origin}: {}", e.message()))?;
        cfg.finish()
    }

    /// Check the settings (every required one present, every number in its range) and make
    /// the paths absolute.
    pub fn finish(mut self) -> Result<Self> {
        self.validate()?;
        for p in [
            &mut self.data.train_json,
            &mut self.data.image_root,
            &mut self.model.init,
            &mut self.run.out,
            &mut self.model.backbone.adapters,
            &mut self.data.val_json,
            &mut self.data.test_json,
        ]
        .into_iter()
        .flatten()
        {
            *p = absolute(p);
        }
        Ok(self)
    }

    fn validate(&self) -> Result<()> {
        required(&self.data.train_json, "train_json")?;
        required(&self.data.image_root, "image_root")?;
        required(&self.model.init, "init")?;
        required(&self.run.batch_size, "batch_size")?;
        let lr = *required(&self.optim.lr, "lr")?;
        required(&self.run.out, "out")?;
        match (self.run.steps, self.run.epochs) {
            (None, None) => bail!("give --steps N or --epochs N"),
            (Some(_), Some(_)) => bail!("give --steps or --epochs, not both"),
            (Some(0), _) | (_, Some(0)) => bail!("--steps/--epochs must be at least 1"),
            _ => {}
        }
        if self.run.batch_size == Some(0) || self.run.eval_batch_size == 0 {
            bail!("--batch-size and --eval-batch-size must be at least 1");
        }
        if self.data.max_words == 0 {
            bail!("--max-words must be at least 1");
        }
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("--lr must be a finite number >= 0, got {lr}");
        }
        if !(0.0..1.0).contains(&self.optim.warmup) {
            bail!(
                "--warmup is a fraction of the steps in [0, 1), got {}",
                self.optim.warmup
            );
        }
        if self.optim.emulate_ddp == 0 {
            bail!("--emulate-ddp is a number of GPUs, at least 1 (1: no emulation)");
        }
        if self
            .optim
            .max_grad_norm
            .is_some_and(|m| !(m.is_finite() && m > 0.0))
        {
            bail!("--max-grad-norm must be a finite number > 0");
        }
        for (flag, v) in [
            ("--weight-decay", self.optim.weight_decay),
            ("--margin", self.loss.margin),
            ("--contrastive-weight", self.loss.contrastive_weight),
            ("--triplet-weight", self.loss.triplet_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} must be a finite number >= 0, got {v}");
            }
        }
        Ok(())
    }

    /// The training annotations (set once [`TrainConfig::finish`] has checked it).
    pub fn train_json(&self) -> &Path {
        self.data.train_json.as_deref().expect("checked by finish")
    }

    /// The image folder.
    pub fn image_root(&self) -> &Path {
        self.data.image_root.as_deref().expect("checked by finish")
    }

    /// The checkpoint to start from.
    pub fn init(&self) -> &Path {
        self.model.init.as_deref().expect("checked by finish")
    }

    /// The run's folder.
    pub fn out(&self) -> &Path {
        self.run.out.as_deref().expect("checked by finish")
    }

    /// The peak learning rate.
    pub fn lr(&self) -> f64 {
        self.optim.lr.expect("checked by finish")
    }

    /// Pairs per step.
    pub fn batch_size(&self) -> usize {
        self.run.batch_size.expect("checked by finish")
    }

    /// The run's length.
    pub fn length(&self) -> harma_data::sampler::Length {
        use harma_data::sampler::Length;
        match (self.run.steps, self.run.epochs) {
            (Some(s), _) => Length::Steps(s),
            (None, Some(e)) => Length::Epochs(e),
            (None, None) => unreachable!("checked by finish"),
        }
    }

    /// The adapters' configuration.
    pub fn adapters(&self) -> harma_adapters::AdapterConfig {
        harma_adapters::AdapterConfig {
            sharing: self.model.backbone.sharing,
            ..Default::default()
        }
    }

    /// The objective these settings ask for.
    pub fn loss(&self) -> harma_loss::LossConfig {
        use harma_loss::Triplet;
        let l = &self.loss;
        let triplet = match l.triplet {
            TripletKind::Adaptive => Triplet::Adaptive {
                margin: l.margin,
                gamma: 2.0,
                max_violation: false,
            },
            TripletKind::PlainSum | TripletKind::PlainMax => Triplet::Plain {
                margin: l.margin,
                max_violation: l.triplet == TripletKind::PlainMax,
            },
            TripletKind::None => Triplet::None,
        };
        harma_loss::LossConfig {
            contrastive_weight: l.contrastive_weight,
            triplet_weight: l.triplet_weight,
            triplet,
        }
    }

    /// The trainer's settings for a run of `total` steps.
    pub fn trainer_settings(&self, total: usize) -> TrainerSettings {
        TrainerSettings {
            lr: self.lr(),
            schedule: match self.optim.schedule {
                ScheduleKind::Linear => Schedule::linear(total, self.optim.warmup),
                ScheduleKind::Constant => Schedule::Constant,
            },
            adamw: AdamWConfig {
                weight_decay: self.optim.weight_decay,
                variant: self.optim.adamw,
                ..AdamWConfig::default()
            },
            loss: self.loss(),
            max_grad_norm: self.optim.max_grad_norm,
            recompute: self.run.recompute,
            emulate_ddp: self.optim.emulate_ddp,
        }
    }

    /// The training transform of these settings for images of `size`.
    pub fn transform(&self, size: usize) -> TrainTransform {
        match self.run.augment {
            AugmentKind::Harma => TrainTransform::harma(size),
            AugmentKind::None => TrainTransform::none(size),
        }
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}
