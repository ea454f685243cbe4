//! `harma train` settings: one definition per setting.
//!
//! [`TrainConfig`] nests the settings by concern (data, model, optimiser, objective, run,
//! compute). Each field is declared once, with its flag, its help (the doc comment) and its
//! default (the flag's default: [`clap_defaults`] builds the defaults from them, and the
//! help shows them). The layers, lowest first: defaults, a dataset preset (`--dataset`), a
//! TOML file (`--config`, or the `config.toml` of a run being resumed), the flags given on the
//! command line. Each layer is a typed value; they are merged key by key on their serialised
//! form, so no setting needs merging code of its own. The resolved settings are written to
//! `OUT/config.toml` (flat keys, the flag names with `_` for `-`), itself a valid `--config`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use serde::{Deserialize, Serialize};

use crate::device::ComputeArgs;
use crate::model::BackboneArgs;
use crate::optim::AdamWVariant;

/// A settings group with the defaults its flags declare: the parse of an empty command line.
pub fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    let m = cmd
        .try_get_matches_from(["defaults"])
        .expect("settings have no required flags");
    T::from_arg_matches(&m).expect("the defaults parse")
}

/// `Default` from the flags' declared defaults.
macro_rules! defaults_from_flags {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                clap_defaults()
            }
        }
    )*};
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// warm-up over --warmup of the steps, then linear decay to 0 (the original's)
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AugmentKind {
    /// RandomResizedCrop 0.5-1, horizontal flip, RandAugment 2 ops at magnitude 7
    Harma,
    /// the evaluation resize only
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TripletKind {
    /// costs weighted by (1 - e^-cost)^2, summed (the original's)
    Adaptive,
    /// VSE++ hinge, summed over negatives
    PlainSum,
    /// VSE++ hinge, hardest negative only
    PlainMax,
    None,
}

/// The datasets with presets; their files sit under `--data-dir` as docs/DATA.md lays out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    Rsitmd,
    Rsicd,
}

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

/// The data: annotation files, images, caption cleaning.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// Training annotations: HarMA's format ([{"caption", "image", "image_id"}, ...], one entry
    /// per caption; pairs with the same image_id are soft positives of each other), or your own
    /// .csv (`image,caption` lines) or .jsonl ({"image", "caption"} lines; lines naming the same
    /// image share its id)
    #[arg(long, value_name = "FILE")]
    pub train_json: Option<PathBuf>,
    /// Folder the `image` paths of the annotations are relative to
    #[arg(long, value_name = "DIR")]
    pub image_root: Option<PathBuf>,
    /// Validation split (HarMA's val format, or .csv/.jsonl pairs): evaluated during training;
    /// the adapters with the best mR are kept as OUT/best.safetensors
    #[arg(long, value_name = "FILE")]
    pub val_json: Option<PathBuf>,
    /// Test split: evaluated once at the end with the best adapters by val (never used to
    /// choose them)
    #[arg(long, value_name = "FILE")]
    pub test_json: Option<PathBuf>,
    /// Skip bad annotation entries (empty caption, missing image) with a warning, instead of
    /// stopping at the first
    #[arg(long)]
    pub skip_bad: bool,
    /// Words kept per caption (HarMA's pre_caption)
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub max_words: usize,
}

/// The model: the checkpoint to start from, its architecture and adapters.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// CLIP checkpoint to start from (as `harma embed --model`); an official HarMA checkpoint
    /// also supplies the starting adapters
    #[arg(long, value_name = "CKPT")]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub backbone: BackboneArgs,
}

/// The optimiser and its schedule (SPEC "Optimisation").
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimConfig {
    /// Peak learning rate (the original: 4e-6 from GeoRSCLIP, 4e-4 from LAION CLIP)
    #[arg(long)]
    pub lr: Option<f64>,
    /// Fraction of the steps spent warming up (linear schedule)
    #[arg(long, value_name = "FRACTION", default_value_t = 0.1)]
    pub warmup: f64,
    /// Learning-rate schedule, stepped per batch
    #[arg(long, value_enum, default_value_t = ScheduleKind::Linear)]
    pub schedule: ScheduleKind,
    /// AdamW decoupled weight decay, not applied to biases
    #[arg(long, default_value_t = 0.04)]
    pub weight_decay: f64,
    /// AdamW update rule
    #[arg(long, value_enum, default_value_t = AdamWVariant::Transformers)]
    pub adamw: AdamWVariant,
    /// Clip the global gradient norm to this value [default: no clipping]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Take the update the original's DistributedDataParallel takes on W GPUs: every trained
    /// tensor's gradient divided by W but `temp`'s (its AllGather gives each GPU only its own
    /// rows' share of the gradient, and DDP averages the GPUs'). AdamW then differs from
    /// W = 1 where a gradient is near its eps. 1: the global batch's gradient, on any number
    /// of ranks (--nproc). `cargo xtask reproduce` sets 2, the original's two GPUs
    #[arg(long, value_name = "W", default_value_t = 1)]
    pub emulate_ddp: usize,
}

/// The objective.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct LossSettings {
    /// The triplet term of the objective
    #[arg(long, value_enum, default_value_t = TripletKind::Adaptive)]
    pub triplet: TripletKind,
    /// Triplet margin
    #[arg(long, default_value_t = 0.2)]
    pub margin: f64,
    /// Weight of the contrastive term
    #[arg(long, default_value_t = 1.0)]
    pub contrastive_weight: f64,
    /// Weight of the triplet term
    #[arg(long, default_value_t = 1.0)]
    pub triplet_weight: f64,
}

/// The run: its length, batches, randomness, output and evaluation points.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    /// Image-caption pairs per step (the original: 214 per GPU on 2 GPUs)
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Number of optimiser steps
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Number of passes over the training pairs (the last incomplete batch of each is dropped)
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Keep the file order instead of shuffling each epoch
    #[arg(long = "no-shuffle", action = clap::ArgAction::SetFalse)]
    pub shuffle: bool,
    /// Train-time image augmentation
    #[arg(long, value_enum, default_value_t = AugmentKind::Harma)]
    pub augment: AugmentKind,
    /// Seed of the shuffling, the augmentation and fresh adapters
    #[arg(long, default_value_t = 3407)]
    pub seed: u64,
    /// Output folder: config.toml, log.jsonl, adapters.safetensors, resume.safetensors
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Write a checkpoint every N steps (0: at the end of each epoch and of the run)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub save_every: usize,
    /// Evaluate val every N steps (0: at the end of each epoch)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub val_every: usize,
    /// Images or captions per forward pass when evaluating
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub eval_batch_size: usize,
    /// Do not evaluate the model before the first step. By default a new run evaluates val
    /// and test with the starting adapters (fresh adapters: the backbone alone, the zero-shot
    /// baseline) for metrics.json and the report
    #[arg(long = "no-zero-shot", action = clap::ArgAction::SetFalse)]
    pub zero_shot: bool,
    /// Keep only each block's input in the forward pass and recompute one block at a time in
    /// the backward: activation memory of one block instead of all 24, for about 1.3x the time
    /// (what makes the original's batch 214 fit in a laptop's memory). Without it, on the CPU,
    /// each block keeps only what its frozen branches' backward needs (in bf16 with
    /// `--precision bf16`) and the adapters run again in the backward
    #[arg(long)]
    pub recompute: bool,
    /// Use a dataset preset: the files `cargo xtask fetch-data` writes under --data-dir
    /// (docs/DATA.md) and the original's settings (GeoRSCLIP RET-2, lr 4e-6, 80 epochs,
    /// batch 214); other settings override it
    #[arg(long, value_enum)]
    pub dataset: Option<Dataset>,
}

/// Every setting of a training run.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub loss: LossSettings,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub compute: ComputeArgs,
}

defaults_from_flags!(
    DataConfig,
    ModelConfig,
    OptimConfig,
    LossSettings,
    RunConfig,
    TrainConfig
);

/// Keys of which a layer that sets one clears the other below it.
const EXCLUSIVE: &[(&str, &str)] = &[("steps", "epochs")];

/// The flags of `harma train`: where the settings come from, and the settings given.
#[derive(Debug, Clone, Default)]
pub struct TrainArgs {
    /// `--config FILE.toml`
    pub config: Option<PathBuf>,
    /// `--resume DIR`
    pub resume: Option<PathBuf>,
    /// `--data-dir DIR` (where dataset presets look; default `data`)
    pub data_dir: Option<PathBuf>,
    /// The settings given on the command line, typed, as a table of just those keys.
    pub flags: toml::Table,
    /// How to start a data-parallel run (`--nproc`, `--nnodes`, `--node-rank`, `--master`).
    pub launch: crate::dist::launch::LaunchArgs,
}

impl TrainArgs {
    /// Parse `harma train` flags (without the command name), as the command line does.
    pub fn from_flags<S: AsRef<str>>(flags: &[S]) -> Result<Self> {
        let cmd = <Self as clap::Args>::augment_args(clap::Command::new("train"));
        let argv = std::iter::once("train").chain(flags.iter().map(|s| s.as_ref()));
        let m = cmd.try_get_matches_from(argv)?;
        Ok(<Self as clap::FromArgMatches>::from_arg_matches(&m)?)
    }
}

impl clap::Args for TrainArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = TrainConfig::augment_args(cmd);
        cmd.arg(
            clap::Arg::new("config")
                .long("config")
                .value_name("FILE.toml")
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "Read settings from a TOML file whose keys are the flag names with `_` \
                     for `-` (`train_json = \"...\"`, `lr = 4e-6`); flags given as well \
                     override it. A run's own OUT/config.toml is such a file",
                ),
        )
        .arg(
            clap::Arg::new("resume")
                .long("resume")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .conflicts_with("config")
                .help(
                    "Continue the run in DIR from its last checkpoint, with its config.toml \
                     (flags override, e.g. a larger --steps). The result equals an \
                     uninterrupted run",
                ),
        )
        .arg(
            clap::Arg::new("data_dir")
                .long("data-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Where the dataset presets look [default: data]"),
        )
        .arg(
            clap::Arg::new("nproc")
                .long("nproc")
                .value_name("N")
                .value_parser(clap::value_parser!(usize))
                .help_heading("Data-parallel training (docs/DISTRIBUTED.md)")
                .help(
                    "Train on N processes of this machine, one per GPU (GPU i of those \
                     visible; NCCL), or on CPU ranks with --device cpu; --batch-size is the \
                     global batch, split over all ranks",
                ),
        )
        .arg(
            clap::Arg::new("nnodes")
                .long("nnodes")
                .value_name("M")
                .value_parser(clap::value_parser!(usize))
                .default_value("1")
                .requires("nproc")
                .help_heading("Data-parallel training (docs/DISTRIBUTED.md)")
                .help("Machines in the run, each started with the same flags and its --node-rank"),
        )
        .arg(
            clap::Arg::new("node_rank")
                .long("node-rank")
                .value_name("R")
                .value_parser(clap::value_parser!(usize))
                .default_value("0")
                .requires("nproc")
                .help_heading("Data-parallel training (docs/DISTRIBUTED.md)")
                .help("This machine's index among --nnodes (node 0 hosts rank 0)"),
        )
        .arg(
            clap::Arg::new("master")
                .long("master")
                .value_name("HOST:PORT")
                .requires("nproc")
                .help_heading("Data-parallel training (docs/DISTRIBUTED.md)")
                .help(
                    "Where rank 0 meets the others (node 0's address and a free port); \
                     needed with --nnodes > 1. Workers started by other launchers read \
                     WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT instead",
                ),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for TrainArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> std::result::Result<Self, clap::Error> {
        let settings = TrainConfig::from_arg_matches(m)?;
        let all = toml::Table::try_from(&settings)
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, e))?;
        let flags = all
            .into_iter()
            .filter(|(k, _)| m.value_source(k) == Some(ValueSource::CommandLine))
            .collect();
        Ok(Self {
            config: m.get_one::<PathBuf>("config").cloned(),
            resume: m.get_one::<PathBuf>("resume").cloned(),
            data_dir: m.get_one::<PathBuf>("data_dir").cloned(),
            flags,
            launch: crate::dist::launch::LaunchArgs {
                nproc: m.get_one::<usize>("nproc").copied(),
                nnodes: m.get_one::<usize>("nnodes").copied().unwrap_or(1),
                node_rank: m.get_one::<usize>("node_rank").copied().unwrap_or(0),
                master: m.get_one::<String>("master").cloned(),
            },
        })
    }

    fn update_from_arg_matches(
        &mut self,
        m: &clap::ArgMatches,
    ) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
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

/// The setting names (the keys of config files): the flags' ids.
pub fn setting_names() -> Vec<String> {
    <TrainConfig as clap::Args>::augment_args(clap::Command::new("names"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
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

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<&'static str> {
        vec![
            "--train-json",
            "train.json",
            "--image-root",
            "images",
            "--init",
            "clip.pt",
            "--batch-size",
            "8",
            "--steps",
            "10",
            "--lr",
            "1e-4",
            "--out",
            "run",
        ]
    }

    fn resolve(extra: &[&str]) -> Result<TrainConfig> {
        let mut f = flags();
        f.extend_from_slice(extra);
        TrainConfig::resolve(&TrainArgs::from_flags(&f)?)
    }

    #[test]
    fn defaults_are_the_originals_and_round_trip_through_toml() -> Result<()> {
        let cfg = resolve(&[])?;
        assert_eq!(cfg.run.seed, 3407);
        assert_eq!(cfg.optim.warmup, 0.1);
        assert_eq!(cfg.optim.weight_decay, 0.04);
        assert_eq!(cfg.loss(), harma_loss::LossConfig::default());
        assert!(cfg.run.shuffle && cfg.out().is_absolute());
        let back: TrainConfig = toml::from_str(&cfg.to_toml()?)?;
        assert_eq!(back, cfg);
        // every key of the file is a setting's name
        let names = setting_names();
        for k in toml::Table::try_from(&cfg)?.keys() {
            assert!(names.contains(k), "{k}");
        }
        Ok(())
    }

    #[test]
    fn flags_override_the_file_and_bad_settings_are_named() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("harma-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.toml");
        let file_flag = file.to_str().unwrap();
        std::fs::write(&file, "lr = 0.5\nepochs = 3\nseed = 7\nbatch_size = 4\n")?;
        let cfg = resolve(&["--config", file_flag, "--no-shuffle"])?;
        // flags win; --steps replaces the file's epochs; the file fills what flags leave out
        assert_eq!(
            (cfg.optim.lr, cfg.run.steps, cfg.run.epochs, cfg.run.seed),
            (Some(1e-4), Some(10), None, 7)
        );
        assert_eq!(cfg.batch_size(), 8);
        assert!(!cfg.run.shuffle);

        std::fs::write(&file, "lr = 0.5\nbatch_sise = 4\n")?;
        let err = resolve(&["--config", file_flag]).unwrap_err().to_string();
        assert!(
            err.contains("c.toml") && err.contains("batch_sise"),
            "{err}"
        );

        let no_lr: Vec<&str> = flags()
            .chunks(2)
            .filter(|kv| kv[0] != "--lr")
            .flatten()
            .copied()
            .collect();
        let err = TrainConfig::resolve(&TrainArgs::from_flags(&no_lr)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing setting `lr`: give --lr"), "{err}");
        let no_steps: Vec<&str> = flags()
            .chunks(2)
            .filter(|kv| kv[0] != "--steps")
            .flatten()
            .copied()
            .collect();
        let err = TrainConfig::resolve(&TrainArgs::from_flags(&no_steps)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--steps N or --epochs N"), "{err}");
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }

    /// Every number is checked, from the flags and from a file, with the setting named.
    #[test]
    fn non_finite_and_out_of_range_numbers_are_refused() -> Result<()> {
        for (flag, value, named) in [
            ("--margin", "NaN", "--margin"),
            ("--weight-decay", "NaN", "--weight-decay"),
            ("--lr", "inf", "--lr"),
            ("--lr", "-1", "--lr"),
            ("--warmup", "NaN", "--warmup"),
            ("--warmup", "1", "--warmup"),
            ("--max-grad-norm", "NaN", "--max-grad-norm"),
            ("--max-grad-norm", "0", "--max-grad-norm"),
            ("--contrastive-weight", "-inf", "--contrastive-weight"),
            ("--triplet-weight", "NaN", "--triplet-weight"),
            ("--eval-batch-size", "0", "--eval-batch-size"),
            ("--batch-size", "0", "--batch-size"),
            ("--max-words", "0", "--max-words"),
        ] {
            let err = resolve(&[&format!("{flag}={value}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{flag} {value}: {err}");
        }
        let dir = std::env::temp_dir().join(format!("harma-cfg-nan-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("nan.toml");
        std::fs::write(&file, "margin = nan\n")?;
        let err = resolve(&["--config", file.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--margin") && err.contains("NaN"), "{err}");
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }

    #[test]
    fn a_preset_sits_under_the_file_and_the_flags() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("harma-cfg-preset-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("p.toml");
        std::fs::write(&file, "dataset = \"rsicd\"\nsteps = 7\n")?;
        let args = TrainArgs::from_flags(&["--config", file.to_str().unwrap(), "--lr", "1e-3"])?;
        let cfg = TrainConfig::resolve(&args)?;
        // the preset's paths and batch, the file's steps (which clear the preset's epochs),
        // the flag's lr
        assert!(cfg.train_json().ends_with("data/rsicd/train.json"));
        assert_eq!(
            (cfg.batch_size(), cfg.run.steps, cfg.run.epochs),
            (214, Some(7), None)
        );
        assert_eq!(cfg.lr(), 1e-3);
        assert_eq!(cfg.run.dataset, Some(Dataset::Rsicd));
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
