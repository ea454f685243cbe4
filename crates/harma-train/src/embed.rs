//! `harma embed`: images and captions to L2-normalised CLIP embeddings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use harma_adapters::{AdapterConfig, HarmaAdapters, Sharing};
use harma_clip::{BlockHook, Checkpoint, Clip, ClipConfig, ClipTokenizer};
use indicatif::{ProgressBar, ProgressStyle};

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["tif", "tiff", "jpg", "jpeg", "png", "bmp", "webp"];

/// The model flags shared by `embed` and `eval`.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// CLIP checkpoint: open_clip state dict (.pt/.pth/.bin, plain or under state_dict/model),
    /// open_clip safetensors, or Hugging Face transformers CLIP safetensors; an official HarMA
    /// checkpoint brings its adapters
    #[arg(long, value_name = "CKPT")]
    pub model: PathBuf,
    /// Architecture preset (GeoRSCLIP, RemoteCLIP and OpenAI weights use QuickGELU;
    /// LAION weights use ViT-B-32); also: tiny, tiny-quickgelu, or a JSON file of sizes
    #[arg(long, default_value = "ViT-B-32-quickgelu")]
    pub arch: String,
    /// HarMA adapters to apply: an adapters-only safetensors file (a run's adapters.safetensors
    /// or best.safetensors) or a HarMA checkpoint. Without it, adapters inside --model (an
    /// official HarMA checkpoint) are used; with neither, the model is plain CLIP (the
    /// zero-shot baseline)
    #[arg(long, value_name = "FILE")]
    pub adapters: Option<PathBuf>,
    /// Which blocks hold BiShareAdapter mini-adapters: text (the released code), both, none
    #[arg(long, default_value = "text", value_enum)]
    pub sharing: SharingArg,
    #[arg(long, default_value = "auto", help = crate::device::HELP)]
    pub device: String,
    #[arg(long, default_value = "f32", help = crate::device::PRECISION_HELP)]
    pub precision: String,
}

/// A loaded model: the backbone, the adapters if any, and where it runs.
pub struct Loaded {
    pub config: ClipConfig,
    pub model: Clip,
    pub adapters: Option<HarmaAdapters>,
    pub device: Device,
}

impl Loaded {
    pub fn hook(&self) -> Option<&dyn BlockHook> {
        self.adapters.as_ref().map(|a| a as &dyn BlockHook)
    }
}

impl ModelArgs {
    /// Load the checkpoint and the adapters onto the device.
    pub fn load(&self) -> Result<Loaded> {
        let config = ClipConfig::preset(&self.arch)?;
        let device = crate::device::parse(&self.device)?;
        let dtype = crate::device::parse_precision(&self.precision)?;
        eprintln!("device: {}", crate::device::describe(&device));
        let start = std::time::Instant::now();
        let mut ckpt = Checkpoint::load(&self.model, &config)?;
        let model = Clip::from_checkpoint(&ckpt, &config, &device)?.with_linear_dtype(dtype)?;
        let adapters = resolve_adapters(
            self.adapters.as_deref(),
            &mut ckpt,
            &config,
            self.sharing.into(),
            &device,
        )?;
        eprintln!(
            "loaded {} ({}) in {:.1}s",
            self.model.display(),
            self.arch,
            start.elapsed().as_secs_f64()
        );
        Ok(Loaded {
            config,
            model,
            adapters,
            device,
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub net: ModelArgs,
    /// Folder of images (tif, tiff, jpg, jpeg, png, bmp, webp), embedded in file-name order
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Text file with one caption per line (empty lines are skipped)
    #[arg(long, value_name = "FILE")]
    pub captions: Option<PathBuf>,
    /// Output safetensors file (written atomically)
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// Images or captions per forward pass
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SharingArg {
    Text,
    Both,
    None,
}

impl From<SharingArg> for Sharing {
    fn from(s: SharingArg) -> Self {
        match s {
            SharingArg::Text => Sharing::Text,
            SharingArg::Both => Sharing::Both,
            SharingArg::None => Sharing::None,
        }
    }
}

/// The adapter tensors to use and where they come from: `--adapters`, else those inside the
/// model checkpoint (an official HarMA checkpoint), else none.
pub fn adapter_tensors(
    explicit: Option<&Path>,
    ckpt: &mut Checkpoint,
) -> Result<Option<(HashMap<String, Tensor>, PathBuf)>> {
    Ok(match explicit {
        Some(p) => Some((harma_clip::checkpoint::load_adapters(p)?, p.to_path_buf())),
        None if !ckpt.adapters.is_empty() => {
            Some((std::mem::take(&mut ckpt.adapters), ckpt.path.clone()))
        }
        None => None,
    })
}

/// The adapters to apply (see [`adapter_tensors`]), checked against the model.
pub fn resolve_adapters(
    explicit: Option<&Path>,
    ckpt: &mut Checkpoint,
    cfg: &ClipConfig,
    sharing: Sharing,
    device: &Device,
) -> Result<Option<HarmaAdapters>> {
    let Some((tensors, source)) = adapter_tensors(explicit, ckpt)? else {
        return Ok(None);
    };
    let acfg = AdapterConfig {
        sharing,
        ..AdapterConfig::default()
    };
    let adapters = HarmaAdapters::from_tensors(tensors, cfg, &acfg, device)
        .with_context(|| format!("adapters from {}", source.display()))?;
    eprintln!("adapters from {} (sharing: {sharing:?})", source.display());
    Ok(Some(adapters))
}

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

/// Busy seconds of the two sides of [`embed_images`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Busy {
    /// decoding, resizing and normalising (the producer thread)
    pub decode: f64,
    /// the image tower
    pub embed: f64,
}

/// Embed images in batches; decoding runs on a second thread one batch ahead of the model.
/// Returns the embeddings and where the time went.
pub fn embed_images(
    model: &Clip,
    hook: Option<&dyn BlockHook>,
    files: &[PathBuf],
    batch: usize,
    device: &Device,
    pb: &ProgressBar,
) -> Result<(Tensor, Busy)> {
    let size = model.config.vision.image_size;
    let chunks: Vec<&[PathBuf]> = files.chunks(batch).collect();
    let mut outs = Vec::with_capacity(chunks.len());
    let decode_ns = std::sync::atomic::AtomicU64::new(0);
    let mut embed = 0.0;
    crate::pipeline::prefetch(
        0..chunks.len(),
        1,
        |i| {
            use rayon::prelude::*;
            let t = std::time::Instant::now();
            let pixels = chunks[i]
                .par_iter()
                .map(|p| harma_data::preprocess_eval(p, size))
                .collect::<std::result::Result<Vec<Vec<f32>>, _>>()?;
            let ns = t.elapsed().as_nanos() as u64;
            decode_ns.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
            Ok(pixels.concat())
        },
        |i, pixels| {
            let t = std::time::Instant::now();
            let n = chunks[i].len();
            let x = Tensor::from_vec(pixels, (n, 3, size, size), device)?;
            outs.push(model.encode_image(&x, hook)?);
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

/// Token ids must index the model's token embedding: a model with a smaller vocabulary than
/// the CLIP tokenizer's (49,408) cannot read real captions.
pub fn check_vocab(ids: &[u32], cfg: &ClipConfig) -> Result<()> {
    if let Some(&max) = ids.iter().max() {
        if max as usize >= cfg.text.vocab_size {
            bail!(
                "the captions use token id {max}, but the model's vocabulary has {} tokens \
                 (the CLIP tokenizer needs 49408): is --arch right for this checkpoint?",
                cfg.text.vocab_size
            );
        }
    }
    Ok(())
}

/// Embed captions in batches.
pub fn embed_captions(
    model: &Clip,
    hook: Option<&dyn BlockHook>,
    tokenizer: &ClipTokenizer,
    captions: &[String],
    batch: usize,
    device: &Device,
    pb: &ProgressBar,
) -> Result<Tensor> {
    let ctx = tokenizer.context_length;
    let mut outs = Vec::new();
    for chunk in captions.chunks(batch) {
        let ids = tokenizer.encode_batch(chunk)?;
        check_vocab(&ids, &model.config)?;
        let ids = Tensor::from_vec(ids, (chunk.len(), ctx), device)?;
        outs.push(model.encode_text(&ids, hook)?);
        pb.inc(chunk.len() as u64);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

fn report(n: usize, what: &str, start: std::time::Instant) {
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "embedded {n} {what} in {secs:.1}s ({:.1} {what}/s)",
        n as f64 / secs
    );
}

pub fn run(args: &Args) -> Result<()> {
    if args.images.is_none() && args.captions.is_none() {
        bail!("nothing to embed: give --images DIR and/or --captions FILE");
    }
    // read the inputs first: a typo in a path fails before the model is loaded
    let files = args.images.as_deref().map(list_images).transpose()?;
    let captions = args.captions.as_deref().map(read_captions).transpose()?;
    let loaded = args.net.load()?;
    let (model, adapters, device) = (&loaded.model, &loaded.adapters, &loaded.device);
    let hook = loaded.hook();
    let batch = args.batch_size as usize;

    let mut tensors = Vec::new();
    let mut meta = HashMap::new();
    meta.insert("model".to_string(), args.net.model.display().to_string());
    meta.insert("arch".to_string(), args.net.arch.clone());
    meta.insert(
        "adapters".to_string(),
        match (adapters, &args.net.adapters) {
            (None, _) => "none".to_string(),
            (Some(_), Some(p)) => p.display().to_string(),
            (Some(_), None) => args.net.model.display().to_string(),
        },
    );
    if let Some(files) = &files {
        let pb = progress(files.len(), "images");
        let start = std::time::Instant::now();
        let (t, _) = embed_images(model, hook, files, batch, device, &pb)?;
        pb.finish();
        report(files.len(), "images", start);
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        meta.insert("image_names".to_string(), names.join("\n"));
        tensors.push(("image_embeds", t));
    }
    if let Some(captions) = &captions {
        let tokenizer = ClipTokenizer::new(loaded.config.text.context_length)?;
        let pb = progress(captions.len(), "captions");
        let start = std::time::Instant::now();
        let t = embed_captions(model, hook, &tokenizer, captions, batch, device, &pb)?;
        pb.finish();
        report(captions.len(), "captions", start);
        tensors.push(("text_embeds", t));
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    crate::output::write_safetensors(&args.out, &refs, meta)?;
    let shapes: Vec<String> = tensors
        .iter()
        .map(|(n, t)| format!("{n} {:?}", t.dims()))
        .collect();
    eprintln!("wrote {}: {}", args.out.display(), shapes.join(", "));
    Ok(())
}
