//! `cargo xtask fetch-data`: the command line of `harma-fetch` (models and datasets into the
//! `data/` layout of docs/DATA.md); the environment's hosts and token are read here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use harma_fetch::{
    fetch_dataset, fetch_model, parse_bytes, safe_join, select, Limits, Net, Sources,
    DEFAULT_MAX_MEMBER, DEFAULT_MAX_TOTAL,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  cargo xtask fetch-data                                # RSITMD and GeoRSCLIP RET-2 (what the main job needs)
  cargo xtask fetch-data --dataset all --model none     # both datasets, no weights
  cargo xtask fetch-data --list                         # what is known and what is in place

Reruns skip what is complete and resume what is not. Every file is checked (size, and the sha256
pinned in crates/harma-fetch/sources.json or announced by the Hub or GitHub) before it is renamed into place.
Images are unpacked only if the annotations name them, each within --max-image-size and all
within --max-unpacked-size; nothing is ever written outside --data-dir (and the Hugging Face
cache, HF_HOME).")]
pub struct Args {
    /// Datasets: rsitmd, rsicd, all or none [default: rsitmd, with the default model]
    #[arg(long, value_delimiter = ',')]
    dataset: Vec<String>,
    /// Models: georsclip, georsclip-ret2, remoteclip, laion, openai, harma-rsitmd, harma-rsicd,
    /// all or none [default: georsclip-ret2]
    #[arg(long, value_delimiter = ',')]
    model: Vec<String>,
    /// List the sources and what is already in place, and download nothing
    #[arg(long)]
    list: bool,
    /// Root of the data layout
    #[arg(long, value_name = "DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Largest file an archive may unpack to, declared or actual (K, M, G suffixes)
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MAX_MEMBER, value_parser = parse_bytes)]
    max_image_size: u64,
    /// Largest total an archive may unpack to
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MAX_TOTAL, value_parser = parse_bytes)]
    max_unpacked_size: u64,
    /// Seconds a connection may stay silent before it counts as broken (and is resumed)
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
    /// Take a file of which neither a size nor a checksum is known (nothing can check it);
    /// refused without this
    #[arg(long)]
    allow_unverified: bool,
    /// Another sources file (tests, mirrors)
    #[arg(long, value_name = "FILE", hide = true)]
    sources: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let sources = Sources::load(args.sources.as_deref())?;
    let data = &args.data_dir;
    if args.list {
        for (name, m) in &sources.models {
            let from = match (&m.hf, &m.github_release) {
                (Some(h), _) => format!("hf {}/{}", h.repo, h.file),
                (None, Some(r)) => format!("github {} release {} ({}*)", r.repo, r.tag, r.prefix),
                _ => "-".into(),
            };
            let here = if safe_join(data, Path::new(&m.dest)).is_ok_and(|p| p.exists()) {
                "in place"
            } else {
                "missing"
            };
            println!("model   {name:<16} {here:<9} {from}  [{}]", m.licence);
        }
        for (name, d) in &sources.datasets {
            let here =
                if safe_join(data, Path::new(name)).is_ok_and(|p| p.join(".complete").exists()) {
                    "complete"
                } else {
                    "missing"
                };
            println!(
                "dataset {name:<16} {here:<9} annotations github {}, images hf {}/{}  [{}]",
                d.annotations.github, d.images.hf.repo, d.images.hf.file, d.licence
            );
        }
        return Ok(());
    }
    let defaults = args.dataset.is_empty() && args.model.is_empty();
    let ds_asked = if defaults {
        vec!["rsitmd".to_string()]
    } else {
        args.dataset.clone()
    };
    let m_asked = if defaults {
        vec!["georsclip-ret2".to_string()]
    } else {
        args.model.clone()
    };
    let datasets = select(&ds_asked, sources.datasets.keys().collect(), "dataset")?;
    let models = select(&m_asked, sources.models.keys().collect(), "model")?;
    let mut net =
        Net::new(Duration::from_secs(args.timeout.max(1))).with_env(&|k| std::env::var(k).ok());
    net.allow_unverified = args.allow_unverified;
    let limits = Limits {
        max_member: args.max_image_size,
        max_total: args.max_unpacked_size,
    };
    let mut failed = Vec::new();
    for name in models {
        if let Err(e) = fetch_model(&net, name, &sources.models[name], data) {
            eprintln!("error: {e:#}");
            failed.push(name.clone());
        }
    }
    for name in datasets {
        if let Err(e) = fetch_dataset(&net, name, &sources.datasets[name], data, &limits) {
            eprintln!("error: {e:#}");
            failed.push(name.clone());
        }
    }
    if !failed.is_empty() {
        bail!(
            "not fetched: {}; what finished is kept, run the command again to resume",
            failed.join(", ")
        );
    }
    Ok(())
}
