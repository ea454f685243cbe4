//! `harma eval`, and the evaluation the training loop runs on val and test: embed every image
//! and caption of a split, score all pairs (`S = I T^T`), and compute R@1/5/10 both ways and mR
//! as the original's `itm_eval`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use harma_clip::ClipTokenizer;
use harma_data::annotations::{load_evaluation, EvalSet, LoadOptions};
use harma_metrics::RetrievalMetrics;
use indicatif::ProgressBar;

use crate::encode::{self, Encoder};
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

/// Where the time of an evaluation went, in seconds. Decoding runs on its own thread while the
/// model embeds, so `decode` and `embed_images` overlap within `images`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// decoding, resizing and normalising the images (producer thread, busy time)
    pub decode: f64,
    /// the image tower (busy time)
    pub embed_images: f64,
    /// wall time of the image side (decode and embedding overlapped)
    pub images: f64,
    /// tokenizing and embedding the captions
    pub captions: f64,
    /// the score matrix and the metrics
    pub metrics: f64,
}

/// Load a val/test split, checking every image exists under `image_root`.
pub fn load_split(json: &Path, image_root: &Path, skip_bad: bool) -> Result<EvalSet> {
    let set = load_evaluation(
        json,
        &LoadOptions {
            skip_bad,
            image_root: Some(image_root.to_path_buf()),
            ..LoadOptions::default()
        },
    )?;
    warn_skipped(json, &set.skipped);
    Ok(set)
}

/// The warning for entries `--skip-bad` dropped from `file`.
pub(crate) fn warn_skipped(file: &Path, skipped: &[String]) {
    if let Some(first) = skipped.first() {
        eprintln!(
            "warning: skipped {} bad entries of {}, first: {first}",
            skipped.len(),
            file.display()
        );
    }
}

/// How to evaluate a split.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions<'a> {
    /// The folder the split's image paths are relative to.
    pub image_root: &'a Path,
    /// Show progress bars.
    pub progress: bool,
}

/// Embed a split with `encoder` and compute its metrics.
pub fn evaluate_split(
    encoder: &Encoder,
    tokenizer: &ClipTokenizer,
    set: &EvalSet,
    opts: &EvalOptions,
) -> Result<(RetrievalMetrics, Timings)> {
    let (m, t, _) = evaluate_split_scores(encoder, tokenizer, set, opts)?;
    Ok((m, t))
}

/// [`evaluate_split`], also returning the scores `S = I T^T` ([n_images, n_captions],
/// row-major): what a report's retrieval examples are drawn from.
pub fn evaluate_split_scores(
    encoder: &Encoder,
    tokenizer: &ClipTokenizer,
    set: &EvalSet,
    opts: &EvalOptions,
) -> Result<(RetrievalMetrics, Timings, Vec<f32>)> {
    let mut timings = Timings::default();
    let files: Vec<PathBuf> = set.images.iter().map(|p| opts.image_root.join(p)).collect();
    let bar = |n: usize, what: &str| {
        if opts.progress {
            encode::progress(n, what)
        } else {
            ProgressBar::hidden()
        }
    };
    let t = Instant::now();
    let pb = bar(files.len(), "images");
    let (img, busy) = encoder.images(&files, &pb)?;
    pb.finish_and_clear();
    timings.images = t.elapsed().as_secs_f64();
    timings.decode = busy.decode;
    timings.embed_images = busy.embed;

    let t = Instant::now();
    let pb = bar(set.captions.len(), "captions");
    let txt = encoder.captions(tokenizer, &set.captions, &pb)?;
    pb.finish_and_clear();
    timings.captions = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let scores: Vec<f32> = img.matmul(&txt.t()?)?.flatten_all()?.to_vec1()?;
    let metrics = harma_metrics::evaluate(&scores, files.len(), &set.txt2img)?;
    timings.metrics = t.elapsed().as_secs_f64();
    Ok((metrics, timings, scores))
}

/// The metrics as a table: R@1/5/10 both ways and mR.
pub fn table(m: &RetrievalMetrics) -> String {
    format!(
        "{:<22} {:>6} {:>6} {:>6}\n{:<22} {:>6.2} {:>6.2} {:>6.2}\n{:<22} {:>6.2} {:>6.2} {:>6.2}\n{:<22} {:>6.2}",
        "", "R@1", "R@5", "R@10",
        "image -> text (txt_r)", m.txt_r1, m.txt_r5, m.txt_r10,
        "text -> image (img_r)", m.img_r1, m.img_r5, m.img_r10,
        "mR (r_mean)", m.r_mean
    )
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
    let record = crate::report::EvalRecord {
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
        crate::output::write_atomic(out, json.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(dir) = &args.report {
        let t = Instant::now();
        crate::output::write_atomic(&crate::report::EvalRecord::path(dir), json.as_bytes())?;
        let title = format!("{}", args.test_json.display());
        let ex = crate::report::Examples::new(
            &title,
            &set,
            &scores,
            &args.image_root,
            args.seed,
            crate::report::examples::Counts::default(),
        )?;
        ex.write(dir)?;
        let mut session = crate::report::info::session(loaded.compute(), 0);
        session.phases.load = load;
        session.phases.test = record.seconds.images
            + record.seconds.captions
            + record.seconds.metrics
            + t.elapsed().as_secs_f64();
        let info = crate::report::RunInfo {
            kind: "eval".into(),
            data: vec![crate::report::info::DataFile {
                split: "test".into(),
                file: crate::report::info::FileHash::of(&record.test_json)?,
                images: record.images,
                captions: record.captions,
            }],
            init: Some(crate::report::info::FileHash::of(&record.model)?),
            start_adapters: record.adapters.as_ref().map(|p| p.display().to_string()),
            sessions: vec![session],
        };
        info.write(dir)?;
        let page = crate::report::write_report(dir)?;
        eprintln!("report: {}", page.display());
    }
    Ok(())
}
