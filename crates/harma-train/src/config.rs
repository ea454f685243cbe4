//! `harma train` settings: defaults, overlaid by a TOML file (`--config FILE.toml`, or the
//! `config.toml` of a run being resumed), overlaid by the flags given. The resolved settings are
//! written to `OUT/config.toml`, which is itself a valid `--config` file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::embed::SharingArg;

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
pub enum AdamWKind {
    /// transformers 4.x AdamW, as the original trains
    Transformers,
    /// torch.optim.AdamW
    Torch,
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

/// Every setting of a training run, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub train_json: PathBuf,
    pub image_root: PathBuf,
    pub init: PathBuf,
    #[serde(default = "d::arch")]
    pub arch: String,
    pub adapters: Option<PathBuf>,
    #[serde(default = "d::sharing")]
    pub sharing: SharingArg,
    pub batch_size: usize,
    pub steps: Option<usize>,
    pub epochs: Option<usize>,
    pub lr: f64,
    #[serde(default = "d::warmup")]
    pub warmup: f64,
    #[serde(default = "d::schedule")]
    pub schedule: ScheduleKind,
    #[serde(default = "d::yes")]
    pub shuffle: bool,
    #[serde(default = "d::augment")]
    pub augment: AugmentKind,
    #[serde(default = "d::seed")]
    pub seed: u64,
    pub out: PathBuf,
    #[serde(default = "d::weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "d::adamw")]
    pub adamw: AdamWKind,
    pub max_grad_norm: Option<f64>,
    #[serde(default = "d::triplet")]
    pub triplet: TripletKind,
    #[serde(default = "d::margin")]
    pub margin: f64,
    #[serde(default = "d::one")]
    pub contrastive_weight: f64,
    #[serde(default = "d::one")]
    pub triplet_weight: f64,
    #[serde(default)]
    pub save_every: usize,
    #[serde(default)]
    pub skip_bad: bool,
    #[serde(default = "d::max_words")]
    pub max_words: usize,
    /// val split: evaluated every `val_every` steps (0: each epoch end); the best by mR is kept
    pub val_json: Option<PathBuf>,
    /// test split: evaluated once at the end, with the best adapters by val
    pub test_json: Option<PathBuf>,
    #[serde(default)]
    pub val_every: usize,
    #[serde(default = "d::eval_batch")]
    pub eval_batch_size: usize,
    /// the preset the paths came from, if any (informational)
    pub dataset: Option<Dataset>,
    #[serde(default = "d::device")]
    pub device: String,
    /// the backbone's linear layers: f32 or bf16
    #[serde(default = "d::precision")]
    pub precision: String,
    /// recompute each block in the backward instead of keeping its activations
    #[serde(default)]
    pub recompute: bool,
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

    /// The preset's settings: the data layout of docs/DATA.md under `data_dir`, and the
    /// original's "geo" configuration (GeoRSCLIP RET-2, lr 4e-6, 80 epochs, batch 214).
    pub fn preset(self, data_dir: &Path) -> toml::Table {
        let d = data_dir.join(self.name());
        let path = |p: PathBuf| toml::Value::from(p.display().to_string());
        let mut t = toml::Table::new();
        t.insert("train_json".into(), path(d.join("train.json")));
        t.insert("val_json".into(), path(d.join("val.json")));
        t.insert("test_json".into(), path(d.join("test.json")));
        t.insert("image_root".into(), path(d.join("images")));
        t.insert(
            "init".into(),
            path(data_dir.join("models").join("RS5M_ViT-B-32_RET-2.pt")),
        );
        t.insert("lr".into(), 4e-6.into());
        t.insert("epochs".into(), 80.into());
        t.insert("batch_size".into(), 214.into());
        t.insert("out".into(), path(PathBuf::from("runs").join(self.name())));
        t.insert("dataset".into(), self.name().into());
        t
    }
}

/// Defaults: the original's settings (SPEC "Optimisation"); lr and batch size have none.
mod d {
    use super::*;
    pub fn arch() -> String {
        "ViT-B-32-quickgelu".into()
    }
    pub fn sharing() -> SharingArg {
        SharingArg::Text
    }
    pub fn warmup() -> f64 {
        0.1
    }
    pub fn schedule() -> ScheduleKind {
        ScheduleKind::Linear
    }
    pub fn yes() -> bool {
        true
    }
    pub fn augment() -> AugmentKind {
        AugmentKind::Harma
    }
    pub fn seed() -> u64 {
        3407
    }
    pub fn weight_decay() -> f64 {
        0.04
    }
    pub fn adamw() -> AdamWKind {
        AdamWKind::Transformers
    }
    pub fn triplet() -> TripletKind {
        TripletKind::Adaptive
    }
    pub fn margin() -> f64 {
        0.2
    }
    pub fn one() -> f64 {
        1.0
    }
    pub fn max_words() -> usize {
        30
    }
    pub fn eval_batch() -> usize {
        64
    }
    pub fn device() -> String {
        "auto".into()
    }
    pub fn precision() -> String {
        "f32".into()
    }
}

/// The flags of `harma train`. Each overrides the same key of the config file.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct Args {
    /// Read settings from a TOML file whose keys are the flag names with `_` for `-`
    /// (`train_json = "..."`, `lr = 4e-6`); flags given as well override it. A run's own
    /// OUT/config.toml is such a file.
    #[arg(long, value_name = "FILE.toml")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint, with its config.toml (flags override,
    /// e.g. a larger --steps). The result equals an uninterrupted run.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Training annotations: HarMA's format ([{"caption", "image", "image_id"}, ...], one entry
    /// per caption; pairs with the same image_id are soft positives of each other), or your own
    /// .csv (`image,caption` lines) or .jsonl ({"image", "caption"} lines; lines naming the same
    /// image share its id)
    #[arg(long, value_name = "FILE")]
    pub train_json: Option<PathBuf>,
    /// Folder the `image` paths of --train-json are relative to
    #[arg(long, value_name = "DIR")]
    pub image_root: Option<PathBuf>,
    /// CLIP checkpoint to start from (as `harma embed --model`); an official HarMA checkpoint
    /// also supplies the starting adapters
    #[arg(long, value_name = "CKPT")]
    pub init: Option<PathBuf>,
    /// Architecture preset [default: ViT-B-32-quickgelu] (LAION weights: ViT-B-32)
    #[arg(long)]
    pub arch: Option<String>,
    /// Start from these adapters (adapters-only safetensors or a HarMA checkpoint); without
    /// it and without adapters in --init, fresh ones (zero up-projections: the backbone)
    #[arg(long, value_name = "FILE")]
    pub adapters: Option<PathBuf>,
    /// Which blocks hold BiShareAdapter mini-adapters [default: text]
    #[arg(long, value_enum)]
    pub sharing: Option<SharingArg>,
    /// Image-caption pairs per step (the original: 214 per GPU on 2 GPUs)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: Option<u64>,
    /// Number of optimiser steps
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Number of passes over the training pairs (the last incomplete batch of each is dropped)
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Peak learning rate (the original: 4e-6 from GeoRSCLIP, 4e-4 from LAION CLIP)
    #[arg(long)]
    pub lr: Option<f64>,
    /// Fraction of the steps spent warming up (linear schedule) [default: 0.1]
    #[arg(long, value_name = "FRACTION")]
    pub warmup: Option<f64>,
    /// Learning-rate schedule, stepped per batch [default: linear]
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// Keep the file order instead of shuffling each epoch
    #[arg(long)]
    #[serde(skip)]
    pub no_shuffle: bool,
    /// Train-time image augmentation [default: harma]
    #[arg(long, value_enum)]
    pub augment: Option<AugmentKind>,
    /// Seed of the shuffling, the augmentation and fresh adapters [default: 3407]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder: config.toml, log.jsonl, adapters.safetensors, resume.safetensors
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// AdamW decoupled weight decay, not applied to biases [default: 0.04]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW update rule [default: transformers]
    #[arg(long, value_enum)]
    pub adamw: Option<AdamWKind>,
    /// Clip the global gradient norm to this value [default: no clipping]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// The triplet term of the objective [default: adaptive]
    #[arg(long, value_enum)]
    pub triplet: Option<TripletKind>,
    /// Triplet margin [default: 0.2]
    #[arg(long)]
    pub margin: Option<f64>,
    /// Weight of the contrastive term [default: 1]
    #[arg(long)]
    pub contrastive_weight: Option<f64>,
    /// Weight of the triplet term [default: 1]
    #[arg(long)]
    pub triplet_weight: Option<f64>,
    /// Write a checkpoint every N steps [default: 0 = at the end of each epoch and of the run]
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Skip bad annotation entries (empty caption, missing image) with a warning, instead of
    /// stopping at the first
    #[arg(long)]
    #[serde(skip)]
    pub skip_bad: bool,
    /// Keep only each block's input in the forward pass and recompute one block at a time in
    /// the backward: activation memory of one block instead of all 24, for about 1.3x the time
    /// (what makes the original's batch 214 fit in a laptop's memory). Without it, on the CPU,
    /// each block keeps only what its frozen branches' backward needs (in bf16 with
    /// `--precision bf16`) and the adapters run again in the backward
    #[arg(long)]
    #[serde(skip)]
    pub recompute: bool,
    /// Validation split (HarMA's val format, or .csv/.jsonl pairs): evaluated during training;
    /// the adapters with the best mR are kept as OUT/best.safetensors
    #[arg(long, value_name = "FILE")]
    pub val_json: Option<PathBuf>,
    /// Test split: evaluated once at the end with the best adapters by val (never used to
    /// choose them)
    #[arg(long, value_name = "FILE")]
    pub test_json: Option<PathBuf>,
    /// Evaluate val every N steps [default: 0 = at the end of each epoch]
    #[arg(long, value_name = "N")]
    pub val_every: Option<u64>,
    /// Images or captions per forward pass when evaluating [default: 64]
    #[arg(long, value_name = "N")]
    pub eval_batch_size: Option<u64>,
    /// Use a dataset preset: the files `cargo xtask fetch-data` writes under --data-dir
    /// (docs/DATA.md) and the original's settings (GeoRSCLIP RET-2, lr 4e-6, 80 epochs,
    /// batch 214); other settings override it
    #[arg(long, value_enum)]
    pub dataset: Option<Dataset>,
    #[arg(long, help = concat!(crate::device_help!(), " [default: auto]"))]
    pub device: Option<String>,
    #[arg(long, help = concat!(crate::precision_help!(), " [default: f32]"))]
    pub precision: Option<String>,
    /// Where the dataset presets look [default: data]
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub data_dir: Option<PathBuf>,
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("{}: not valid TOML", path.display()))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

impl TrainConfig {
    /// Defaults, then the config file (`--config`, or the resumed run's), then the flags.
    pub fn resolve(args: &Args) -> Result<Self> {
        let file = match (&args.resume, &args.config) {
            (Some(dir), _) => Some(dir.join("config.toml")),
            (None, Some(f)) => Some(f.clone()),
            (None, None) => None,
        };
        let mut table = match &file {
            Some(f) => read_table(f)?,
            None => toml::Table::new(),
        };
        let flags = toml::Table::try_from(args).context("flags")?;
        // a dataset preset (from the flags, else the file) sits under both
        let dataset = match flags.get("dataset").or(table.get("dataset")) {
            Some(v) => Some(
                Dataset::deserialize(v.clone())
                    .map_err(|e| anyhow::anyhow!("`dataset`: {}", e.message()))?,
            ),
            None => None,
        };
        if let Some(d) = dataset {
            let data_dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("data"));
            let mut preset = d.preset(&data_dir);
            if table.contains_key("steps") || flags.contains_key("steps") {
                preset.remove("epochs");
            }
            preset.extend(table);
            table = preset;
        }
        // --steps and --epochs replace each other
        if flags.contains_key("steps") {
            table.remove("epochs");
        }
        if flags.contains_key("epochs") {
            table.remove("steps");
        }
        table.extend(flags);
        if args.no_shuffle {
            table.insert("shuffle".into(), false.into());
        }
        if args.recompute {
            table.insert("recompute".into(), true.into());
        }
        if args.skip_bad {
            table.insert("skip_bad".into(), true.into());
        }
        if let Some(dir) = &args.resume {
            if let Some(out) = &args.out {
                if absolute(out) != absolute(dir) {
                    bail!("--resume continues the run in its own folder; leave out --out");
                }
            }
            table.insert("out".into(), dir.display().to_string().into());
        }
        let origin = file
            .as_ref()
            .map_or("settings".to_string(), |f| f.display().to_string());
        let mut cfg: TrainConfig = table.try_into().map_err(|e: toml::de::Error| {
            let msg = e.message().to_string();
            match msg.strip_prefix("missing field `") {
                Some(rest) => {
                    let key = rest.trim_end_matches('`');
                    anyhow::anyhow!(
                        "missing setting `{key}`: give --{} or set `{key}` in --config",
                        key.replace('_', "-")
                    )
                }
                None => anyhow::anyhow!("{origin}: {msg}"),
            }
        })?;
        cfg.validate()?;
        for p in [
            &mut cfg.train_json,
            &mut cfg.image_root,
            &mut cfg.init,
            &mut cfg.out,
        ] {
            *p = absolute(p);
        }
        for p in [&mut cfg.adapters, &mut cfg.val_json, &mut cfg.test_json]
            .into_iter()
            .flatten()
        {
            *p = absolute(p);
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        match (self.steps, self.epochs) {
            (None, None) => bail!("give --steps N or --epochs N"),
            (Some(_), Some(_)) => bail!("give --steps or --epochs, not both"),
            (Some(0), _) | (_, Some(0)) => bail!("--steps/--epochs must be at least 1"),
            _ => {}
        }
        crate::device::parse_precision(&self.precision)?;
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            bail!("--batch-size and --eval-batch-size must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("--lr must be a finite number >= 0, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.warmup) {
            bail!(
                "--warmup is a fraction of the steps in [0, 1), got {}",
                self.warmup
            );
        }
        if self.max_grad_norm.is_some_and(|m| m.is_nan() || m <= 0.0) {
            bail!("--max-grad-norm must be > 0");
        }
        Ok(())
    }

    /// The objective these settings ask for.
    pub fn loss(&self) -> harma_loss::LossConfig {
        use harma_loss::Triplet;
        let triplet = match self.triplet {
            TripletKind::Adaptive => Triplet::Adaptive {
                margin: self.margin,
                gamma: 2.0,
                max_violation: false,
            },
            TripletKind::PlainSum | TripletKind::PlainMax => Triplet::Plain {
                margin: self.margin,
                max_violation: self.triplet == TripletKind::PlainMax,
            },
            TripletKind::None => Triplet::None,
        };
        harma_loss::LossConfig {
            contrastive_weight: self.contrastive_weight,
            triplet_weight: self.triplet_weight,
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

    fn args() -> Args {
        Args {
            train_json: Some("train.json".into()),
            image_root: Some("images".into()),
            init: Some("clip.pt".into()),
            batch_size: Some(8),
            steps: Some(10),
            lr: Some(1e-4),
            out: Some("run".into()),
            ..Args::default()
        }
    }

    #[test]
    fn defaults_are_the_originals_and_round_trip_through_toml() -> Result<()> {
        let cfg = TrainConfig::resolve(&args())?;
        assert_eq!(cfg.seed, 3407);
        assert_eq!(cfg.warmup, 0.1);
        assert_eq!(cfg.weight_decay, 0.04);
        assert_eq!(cfg.loss(), harma_loss::LossConfig::default());
        assert!(cfg.shuffle && cfg.out.is_absolute());
        let back: TrainConfig = toml::from_str(&cfg.to_toml()?)?;
        assert_eq!(back, cfg);
        Ok(())
    }

    #[test]
    fn flags_override_the_file_and_bad_settings_are_named() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("harma-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.toml");
        std::fs::write(&file, "lr = 0.5\nepochs = 3\nseed = 7\nbatch_size = 4\n")?;
        let cfg = TrainConfig::resolve(&Args {
            config: Some(file.clone()),
            no_shuffle: true,
            ..args()
        })?;
        // flags win; --steps replaces the file's epochs; the file fills what flags leave out
        assert_eq!(
            (cfg.lr, cfg.steps, cfg.epochs, cfg.seed),
            (1e-4, Some(10), None, 7)
        );
        assert_eq!(cfg.batch_size, 8);
        assert!(!cfg.shuffle);

        std::fs::write(&file, "lr = 0.5\nbatch_sise = 4\n")?;
        let err = TrainConfig::resolve(&Args {
            config: Some(file.clone()),
            ..args()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("c.toml") && err.contains("batch_sise"),
            "{err}"
        );

        let err = TrainConfig::resolve(&Args { lr: None, ..args() })
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing setting `lr`: give --lr"), "{err}");
        let err = TrainConfig::resolve(&Args {
            steps: None,
            ..args()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("--steps N or --epochs N"), "{err}");
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
