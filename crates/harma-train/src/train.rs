//! `harma train` from the command line: the flags (each setting's flag made from its
//! declaration in [`harma_trainer::config`], plus where settings come from and how to launch),
//! Ctrl-C wired to a clean stop, the launcher of a data-parallel run, and a rank's connection.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use harma_dist::{Collective, Single};
use harma_trainer::config::{TrainArgs, TrainConfig};
use harma_trainer::train::{train_on, Control};

/// `harma train`'s flags.
#[derive(Debug, Clone, Default)]
pub struct TrainFlags(pub TrainArgs);

/// Parse `harma train` flags (without the command name), as the command line does.
pub fn from_flags<S: AsRef<str>>(flags: &[S]) -> Result<TrainArgs> {
    let cmd = <TrainFlags as clap::Args>::augment_args(clap::Command::new("train"));
    let argv = std::iter::once("train").chain(flags.iter().map(|s| s.as_ref()));
    let m = cmd.try_get_matches_from(argv)?;
    Ok(<TrainFlags as clap::FromArgMatches>::from_arg_matches(&m)?.0)
}

const LAUNCH: &str = "Data-parallel training (docs/DISTRIBUTED.md)";

impl clap::Args for TrainFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = crate::flags::augment::<TrainConfig>(cmd);
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
                .help_heading(LAUNCH)
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
                .help_heading(LAUNCH)
                .help("Machines in the run, each started with the same flags and its --node-rank"),
        )
        .arg(
            clap::Arg::new("node_rank")
                .long("node-rank")
                .value_name("R")
                .value_parser(clap::value_parser!(usize))
                .default_value("0")
                .requires("nproc")
                .help_heading(LAUNCH)
                .help("This machine's index among --nnodes (node 0 hosts rank 0)"),
        )
        .arg(
            clap::Arg::new("master")
                .long("master")
                .value_name("HOST:PORT")
                .requires("nproc")
                .help_heading(LAUNCH)
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

impl clap::FromArgMatches for TrainFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> std::result::Result<Self, clap::Error> {
        Ok(Self(TrainArgs {
            config: m.get_one::<PathBuf>("config").cloned(),
            resume: m.get_one::<PathBuf>("resume").cloned(),
            data_dir: m.get_one::<PathBuf>("data_dir").cloned(),
            flags: crate::flags::given::<TrainConfig>(m),
            launch: harma_dist::launch::LaunchArgs {
                nproc: m.get_one::<usize>("nproc").copied(),
                nnodes: m.get_one::<usize>("nnodes").copied().unwrap_or(1),
                node_rank: m.get_one::<usize>("node_rank").copied().unwrap_or(0),
                master: m.get_one::<String>("master").cloned(),
                secret: None,
            },
        }))
    }

    fn update_from_arg_matches(
        &mut self,
        m: &clap::ArgMatches,
    ) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// A [`Control`] whose stop Ctrl-C sets (a second Ctrl-C exits at once).
pub fn interruptible() -> Result<Control> {
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
    Ok(control)
}

/// `harma train` from the command line: settings resolved, Ctrl-C wired to a clean stop; with
/// `--nproc`, the launcher of a data-parallel run, and in a process that the environment
/// names a rank (`WORLD_SIZE`, `RANK`, ...), that rank.
pub fn run(args: &TrainArgs) -> Result<()> {
    use harma_dist::launch::{self, Role};
    let role = Role::from_env(&|k| std::env::var(k).ok())?;
    if args.launch.nproc.is_some() && role.is_none() {
        let argv: Vec<std::ffi::OsString> = std::env::args_os()
            .skip_while(|a| a != "train")
            .skip(1)
            .collect();
        // the job's secret comes from the environment, never from a flag (`ps` shows flags)
        let launch_args = harma_dist::launch::LaunchArgs {
            secret: std::env::var(harma_dist::launch::SECRET_VAR).ok(),
            ..args.launch.clone()
        };
        return launch::launch(&launch_args, &launch::worker_args(&argv));
    }
    let mut cfg = TrainConfig::resolve(args)?;
    let control = interruptible()?;
    let coll: Arc<dyn Collective> = match &role {
        None => Arc::new(Single),
        Some(role) => {
            if role.launched {
                // the launcher asks to stop by a line on stdin
                let stop = control.stop.clone();
                std::thread::spawn(move || {
                    for line in std::io::stdin().lines() {
                        if line.is_ok_and(|l| l.trim() == "stop") {
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                });
            }
            let connected = harma_dist::connect(role, cfg.compute.device)?;
            cfg.compute.device = connected.device;
            connected.collective
        }
    };
    train_on(&cfg, args.resume.is_some(), &control, coll)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use harma_trainer::config::{setting_names, Dataset};

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
        TrainConfig::resolve(&from_flags(&f)?)
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
        let err = TrainConfig::resolve(&from_flags(&no_lr)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing setting `lr`: give --lr"), "{err}");
        let no_steps: Vec<&str> = flags()
            .chunks(2)
            .filter(|kv| kv[0] != "--steps")
            .flatten()
            .copied()
            .collect();
        let err = TrainConfig::resolve(&from_flags(&no_steps)?)
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
        let args = from_flags(&["--config", file.to_str().unwrap(), "--lr", "1e-3"])?;
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
