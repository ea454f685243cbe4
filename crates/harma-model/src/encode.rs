//! Batched embedding of images and captions: the library under `embed`, `eval`, validation
//! during training and the upcoming search commands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use harma_clip::{BlockHook, Clip, ClipTokenizer};
use indicatif::{ProgressBar, ProgressStyle};

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["tif", "tiff", "jpg", "jpeg", "png", "bmp", "webp"];

/// The image files of `dir` with a known extension, sorted by file name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read image folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() {
        bail!(
            "no images ({}) in {}",
            IMAGE_EXTENSIONS.join(", "),
            dir.display()
        );
    }
    Ok(files)
}

/// The non-empty lines of a caption file, in order.
pub fn read_captions(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read captions {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    if lines.is_empty() {
        bail!("{}: no non-empty lines", path.display());
    }
    Ok(lines)
}

/// A progress bar over `n` items named `what`.
pub fn progress(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>8} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} eta {{eta}}"
        ))
        .unwrap()
        .progress_chars("=> "),
    );
    pb
}

/// Busy seconds of the two sides of [`Encoder::images`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Busy {
    /// decoding, resizing and normalising (the producer thread)
    pub decode: f64,
    /// the image tower
    pub embed: f64,
}

/// Embeds in batches with a model and its hook (HarMA's adapters), on the model's device.
#[derive(Clone, Copy)]
pub struct Encoder<'a> {
    pub model: &'a Clip,
    pub hook: Option<&'a dyn BlockHook>,
    /// Images or captions per forward pass.
    pub batch: usize,
    /// How large an image may be decoded.
    pub limits: harma_data::LoadLimits,
}

impl Encoder<'_> {
    /// L2-normalised embeddings of image files [n, dim]; decoding runs on a second thread one
    /// batch ahead of the model. Returns where the time went too.
    pub fn images(&self, files: &[PathBuf], pb: &ProgressBar) -> Result<(Tensor, Busy)> {
        self.images_bands(files, None, pb)
    }

    /// [`Encoder::images`] with `bands` picked from multi-band rasters
    /// (harma_raster::load_raster), the whole image resized as one tile.
    pub fn images_bands(
        &self,
        files: &[PathBuf],
        bands: Option<&harma_raster::Bands>,
        pb: &ProgressBar,
    ) -> Result<(Tensor, Busy)> {
        let size = self.model.config.vision.image_size;
        let device = &self.model.compute.device;
        let chunks: Vec<&[PathBuf]> = files.chunks(self.batch).collect();
        let mut outs = Vec::with_capacity(chunks.len());
        let decode_ns = std::sync::atomic::AtomicU64::new(0);
        let mut embed = 0.0;
        harma_data::pipeline::prefetch(
            0..chunks.len(),
            1,
            |i| {
                use rayon::prelude::*;
                let t = std::time::Instant::now();
                let pixels = chunks[i]
                    .par_iter()
                    .map(|p| match bands {
                        None => harma_data::preprocess_eval(p, size, self.limits),
                        Some(b) => harma_raster::load_raster(p, Some(b), self.limits)
                            .map(|img| harma_raster::preprocess_whole(&img, size)),
                    })
                    .collect::<std::result::Result<Vec<Vec<f32>>, _>>()?;
                let ns = t.elapsed().as_nanos() as u64;
                decode_ns.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
                Ok(pixels.concat())
            },
            |i, pixels| {
                let t = std::time::Instant::now();
                let n = chunks[i].len();
                let x = Tensor::from_vec(pixels, (n, 3, size, size), device)?;
                outs.push(self.model.encode_image(&x, self.hook)?);
                pb.inc(n as u64);
                embed += t.elapsed().as_secs_f64();
                Ok(true)
            },
        )?;
        let busy = Busy {
            decode: decode_ns.into_inner() as f64 / 1e9,
            embed,
        };
        Ok((Tensor::cat(&outs, 0)?, busy))
    }

    /// L2-normalised embeddings of captions [n, dim].
    pub fn captions(
        &self,
        tokenizer: &ClipTokenizer,
        captions: &[String],
        pb: &ProgressBar,
    ) -> Result<Tensor> {
        let ctx = tokenizer.context_length;
        let mut outs = Vec::new();
        for chunk in captions.chunks(self.batch) {
            let ids = tokenizer.encode_batch(chunk)?;
            crate::model::check_vocab(&ids, &self.model.config)?;
            let ids = Tensor::from_vec(ids, (chunk.len(), ctx), &self.model.compute.device)?;
            outs.push(self.model.encode_text(&ids, self.hook)?);
            pb.inc(chunk.len() as u64);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }
}
