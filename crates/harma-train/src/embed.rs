//! `harma embed`: images and captions to L2-normalised CLIP embeddings.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Tensor;
use harma_clip::ClipTokenizer;

use crate::model::ModelArgs;
use harma_model::encode::{list_images, progress, read_captions, Encoder};

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
    /// Output safetensors file (written atomically); its metadata lists the image file names
    /// as a JSON list (`image_names`), in the order of the rows
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// Bands of multi-band rasters to show the model as red,green,blue (1-based, as GDAL
    /// counts; one band is shown as grey), e.g. 4,3,2 for Sentinel-2; only for TIFFs that need
    /// it (more bands than RGB/grey with alpha, or wider than 8 bits): 8-bit photos stay RGB; as `harma index build
    /// --bands`. Samples wider than 8 bits are stretched per band from their 2nd to 98th
    /// percentile
    #[arg(long, value_name = "R,G,B")]
    pub bands: Option<harma_raster::Bands>,
    /// Images or captions per forward pass
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
}

/// The file names of `files` for the output's metadata (a JSON list, so that any name, a
/// newline in it included, comes back as it was), and the indices of names that are not
/// UTF-8: those are stored with U+FFFD in place of their bad bytes, and a warning names them.
fn image_names(files: &[PathBuf]) -> (Vec<String>, Vec<usize>) {
    let mut lossy = Vec::new();
    let names = files
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = p.file_name().unwrap_or_default();
            name.to_str().map(String::from).unwrap_or_else(|| {
                eprintln!(
                    "warning: {} is not a UTF-8 file name: stored as {:?} (its index {i} \
                     is in the metadata's image_names_lossy)",
                    p.display(),
                    name.to_string_lossy()
                );
                lossy.push(i);
                name.to_string_lossy().into_owned()
            })
        })
        .collect();
    (names, lossy)
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
    let encoder = Encoder {
        model: &loaded.model,
        hook: loaded.hook(),
        batch: args.batch_size as usize,
        limits: args.net.load.limits(),
    };

    let mut tensors = Vec::new();
    let mut meta = HashMap::new();
    meta.insert("model".to_string(), args.net.model.display().to_string());
    meta.insert("arch".to_string(), args.net.backbone.arch.clone());
    meta.insert(
        "adapters".to_string(),
        loaded
            .adapters_from
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string()),
    );
    if let Some(b) = &args.bands {
        meta.insert("bands".to_string(), b.to_string());
    }
    if let Some(files) = &files {
        let pb = progress(files.len(), "images");
        let start = std::time::Instant::now();
        let (t, _) = encoder.images_bands(files, args.bands.as_ref(), &pb)?;
        pb.finish();
        report(files.len(), "images", start);
        let (names, lossy) = image_names(files);
        meta.insert("image_names".to_string(), serde_json::to_string(&names)?);
        if !lossy.is_empty() {
            meta.insert(
                "image_names_lossy".to_string(),
                serde_json::to_string(&lossy)?,
            );
        }
        tensors.push(("image_embeds", t));
    }
    if let Some(captions) = &captions {
        let tokenizer = ClipTokenizer::new(loaded.config.text.context_length)?;
        let pb = progress(captions.len(), "captions");
        let start = std::time::Instant::now();
        let t = encoder.captions(&tokenizer, captions, &pb)?;
        pb.finish();
        report(captions.len(), "captions", start);
        tensors.push(("text_embeds", t));
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    harma_checkpoint::write::write_safetensors(&args.out, &refs, meta)?;
    let shapes: Vec<String> = tensors
        .iter()
        .map(|(n, t)| format!("{n} {:?}", t.dims()))
        .collect();
    eprintln!("wrote {}: {}", args.out.display(), shapes.join(", "));
    Ok(())
}
