//! `harma eval`: a split's retrieval metrics, and optionally its report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use harma_clip::ClipTokenizer;
use harma_model::encode::Encoder;
use harma_model::eval::{evaluate_split_scores, load_split, table, EvalOptions};
use harma_report::info::{DataFile, FileHash};

use crate::model::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub net: ModelArgs,
    /// Evaluation annotations: HarMA's format ([{"image", "caption": [five strings]}, ...]), or
    /// your own .csv (`image,caption` lines) or .jsonl ({"image", "caption"} lines), grouped by
    /// image
    #[arg(long, value_name = "FILE")]
    pub test_json: PathBuf,
    /// Folder the `image` paths are relative to
    #[arg(long, value_name = "DIR")]
    pub image_root: PathBuf,
    /// Also write the metrics (and timings) as JSON here
    #[arg(long, value_name = "metrics.json")]
    pub out: Option<PathBuf>,
    /// Images or captions per forward pass
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Skip bad entries (missing image, empty caption) with a warning instead of stopping
    #[arg(long)]
    pub skip_bad: bool,
    /// Also write a report into DIR: report.html (self-contained: results, retrieval examples
    /// with thumbnails, data and model hashes, machine and time) and report.md, with the
    /// records they are made from (eval.json, run.json, examples.json; `harma report DIR`
    /// rebuilds the pages from them)
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Seed of the report's sample of retrieval examples
    #[arg(long, default_value_t = 3407)]
    pub seed: u64,
}

pub fn run(args: &Args) -> Result<()> {
    let since = Instant::now();
    if let Some(dir) = &args.report {
        if dir.join("config.toml").exists() {
            anyhow::bail!(
                "{} holds a training run: give --report another folder",
                dir.display()
            );
        }
    }
    let set = load_split(&args.test_json, &args.image_root, args.skip_bad)?;
    let loaded = args.net.load()?;
    let (cfg, adapters) = (&loaded.config, &loaded.adapters);
    if adapters.is_none() {
        eprintln!("no adapters: evaluating plain CLIP (the zero-shot baseline)");
    }
    let tokenizer = ClipTokenizer::new(cfg.text.context_length)?;
    let t = Instant::now();
    let encoder = Encoder {
        model: &loaded.model,
        hook: loaded.hook(),
        batch: args.batch_size as usize,
        limits: args.net.load.limits(),
    };
    let opts = EvalOptions {
        image_root: &args.image_root,
        progress: true,
    };
    let load = since.elapsed().as_secs_f64();
    let (metrics, timings, scores) = evaluate_split_scores(&encoder, &tokenizer, &set, &opts)?;
    println!(
        "{}: {} images, {} captions\n{}",
        args.test_json.display(),
        set.images.len(),
        set.captions.len(),
        table(&metrics)
    );
    eprintln!(
        "{:.1}s: images {:.1}s (decode {:.1}s busy, embed {:.1}s busy), captions {:.1}s, \
         metrics {:.3}s",
        t.elapsed().as_secs_f64(),
        timings.images,
        timings.decode,
        timings.embed_images,
        timings.captions,
        timings.metrics
    );
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let record = harma_report::EvalRecord {
        test: metrics,
        test_json: absolute(&args.test_json),
        model: absolute(&args.net.model),
        adapters: loaded.adapters_from.as_deref().map(absolute),
        images: set.images.len(),
        captions: set.captions.len(),
        seconds: timings,
    };
    let json = serde_json::to_string_pretty(&record)?;
    if let Some(out) = &args.out {
        harma_checkpoint::write::write_atomic(out, json.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(dir) = &args.report {
        let t = Instant::now();
        harma_checkpoint::write::write_atomic(
            &harma_report::EvalRecord::path(dir),
            json.as_bytes(),
        )?;
        let title = format!("{}", args.test_json.display());
        let ex = harma_report::Examples::new(
            &title,
            &set,
            &scores,
            &args.image_root,
            args.seed,
            harma_report::examples::Counts::default(),
        )?;
        ex.write(dir)?;
        let mut session = harma_report::info::session(
            loaded.compute().describe(),
            loaded.compute().precision.to_string(),
            0,
        );
        session.phases.load = load;
        session.phases.test = record.seconds.images
            + record.seconds.captions
            + record.seconds.metrics
            + t.elapsed().as_secs_f64();
        let info = harma_report::RunInfo {
            kind: "eval".into(),
            data: vec![DataFile {
                split: "test".into(),
                file: FileHash::of(&record.test_json)?,
                images: record.images,
                captions: record.captions,
            }],
            init: Some(FileHash::of(&record.model)?),
            start_adapters: record.adapters.as_ref().map(|p| p.display().to_string()),
            sessions: vec![session],
        };
        info.write(dir)?;
        let page = harma_report::write_report(dir)?;
        eprintln!("report: {}", page.display());
    }
    Ok(())
}
