//! The evaluation of a split (`harma eval`, and val and test in the training loop): embed every
//! image and caption, score all pairs (`S = I T^T`), and compute R@1/5/10 both ways and mR as
//! the original's `itm_eval`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use harma_clip::ClipTokenizer;
use harma_data::annotations::{load_evaluation, EvalSet, LoadOptions};
use harma_metrics::{RetrievalMetrics, Timings};
use indicatif::ProgressBar;

use crate::encode::{self, Encoder};

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
pub fn warn_skipped(file: &Path, skipped: &[String]) {
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
