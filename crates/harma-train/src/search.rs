//! `harma search` and `harma serve`: a text (or an image) against an index built by
//! `harma index build`, with the model the index was built with; a different model is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use harma_adapters::Sharing;
use harma_clip::ClipTokenizer;
use harma_data::{preprocess_eval, LoadLimits, LoadSettings};
use harma_raster::{load_raster, preprocess_whole, Bands};
use harma_search::exact;
use harma_search::output::{geojson, ranked, table, GeoJsonCrs};
use harma_search::serve::{self, App};
use harma_search::store::FileId;
use harma_search::Index;

use harma_kernels::compute::ComputeSettings;
use harma_model::encode::Encoder;
use harma_model::{BackboneSettings, Loaded};

use crate::flags::Flags;
use crate::index::{model_mismatch, model_settings};
use crate::model::ModelArgs;

/// The model flags of `search` and `serve`: all optional, the index names its model.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryModelArgs {
    /// The checkpoint (default: the one the index was built with; another is refused unless it
    /// is the same file, by sha256)
    #[arg(long, value_name = "CKPT")]
    pub model: Option<PathBuf>,
    /// Adapters (default: the index's)
    #[arg(long, value_name = "FILE")]
    pub adapters: Option<PathBuf>,
    /// Architecture (default: the index's)
    #[arg(long)]
    pub arch: Option<String>,
    #[command(flatten)]
    pub compute: Flags<ComputeSettings>,
    #[command(flatten)]
    pub load: Flags<LoadSettings>,
}

/// Load the model an index was built with (or the one the flags name, if it is the same).
pub fn load_for(index: &Index, flags: &QueryModelArgs) -> Result<Loaded> {
    let s = &index.settings;
    let model = flags.model.clone().unwrap_or_else(|| s.model.path.clone());
    if !model.is_file() {
        bail!(
            "the index's model {} is not there: give it with --model (the same file, moved)",
            model.display()
        );
    }
    let sharing = match s.sharing.as_str() {
        "both" => Sharing::Both,
        "none" => Sharing::None,
        _ => Sharing::Text,
    };
    let backbone = BackboneSettings {
        arch: flags.arch.clone().unwrap_or_else(|| s.arch.clone()),
        adapters: flags
            .adapters
            .clone()
            .or_else(|| s.adapters.as_ref().map(|a| a.path.clone())),
        sharing,
    };
    let net = ModelArgs {
        model,
        backbone: backbone.into(),
        compute: flags.compute.clone(),
        load: flags.load.clone(),
    };
    // identify the files before loading (a cheap refusal), reusing the recorded hashes of
    // unchanged files
    let mut mine = s.clone();
    mine.model = FileId::of(&net.model, Some(&s.model))?;
    mine.adapters = match &net.backbone.adapters {
        Some(p) => Some(FileId::of(p, s.adapters.as_ref())?),
        None => None,
    };
    if let Some(msg) = model_mismatch(s, &mine) {
        bail!("index {}: {msg}", index.dir.display());
    }
    let loaded = net.load()?;
    let actual = model_settings(&net, &loaded, Some(&mine))?;
    if let Some(msg) = model_mismatch(s, &actual) {
        bail!("index {}: {msg}", index.dir.display());
    }
    Ok(loaded)
}

/// The L2-normalised embedding of a text.
pub fn embed_text(loaded: &Loaded, tokenizer: &ClipTokenizer, text: &str) -> Result<Vec<f32>> {
    let encoder = Encoder {
        model: &loaded.model,
        hook: loaded.hook(),
        batch: 1,
        // captions only: no image is decoded
        limits: Default::default(),
    };
    let t = encoder.captions(
        tokenizer,
        &[text.to_string()],
        &indicatif::ProgressBar::hidden(),
    )?;
    Ok(t.flatten_all()?.to_vec1()?)
}

/// The L2-normalised embedding of a whole image (its bands chosen as the index's were).
pub fn embed_image(
    loaded: &Loaded,
    path: &Path,
    bands: Option<&Bands>,
    limits: LoadLimits,
) -> Result<Vec<f32>> {
    let size = loaded.config.vision.image_size;
    let pixels = match bands {
        None => preprocess_eval(path, size, limits)?,
        Some(b) => preprocess_whole(&load_raster(path, Some(b), limits)?, size),
    };
    let x = Tensor::from_vec(pixels, (1, 3, size, size), &loaded.model.compute.device)?;
    Ok(loaded
        .model
        .encode_image(&x, loaded.hook())?
        .flatten_all()?
        .to_vec1()?)
}

#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    /// The index folder (from `harma index build`)
    pub index: PathBuf,
    /// What to look for, in words
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    pub text: Option<String>,
    /// Look for tiles like this image instead of a text
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Results to show
    #[arg(short, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100000))]
    pub k: u64,
    /// Print the results as JSON
    #[arg(long, conflicts_with = "geojson")]
    pub json: bool,
    /// With --json: include the query's embedding (`query_vector`), to ask other stores (the
    /// Lance table of `harma index export-lance`) the same question
    #[arg(long, requires = "json")]
    pub vector: bool,
    /// Print the results as a GeoJSON FeatureCollection (RFC 7946): each tile's box as a
    /// WGS84 longitude/latitude polygon, its corners reprojected from the raster's CRS, with the
    /// native box and EPSG code as properties; results without georeferencing have no geometry
    #[arg(long)]
    pub geojson: bool,
    /// With --geojson: boxes in the rasters' own CRS instead, named in a `crs` member (the 2008
    /// GeoJSON form GDAL and QGIS read; strict RFC 7946 readers do not)
    #[arg(long, requires = "geojson")]
    pub geojson_native: bool,
    #[command(flatten)]
    pub model: QueryModelArgs,
}

pub fn run_search(args: &SearchArgs) -> Result<()> {
    let mut index = Index::open(&args.index)?;
    let loaded = load_for(&index, &args.model)?;
    let bands = index
        .settings
        .bands
        .as_deref()
        .map(str::parse::<Bands>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let query = match (&args.text, &args.image) {
        (Some(text), _) => {
            let tokenizer = ClipTokenizer::new(loaded.config.text.context_length)?;
            embed_text(&loaded, &tokenizer, text)?
        }
        (None, Some(image)) => {
            embed_image(&loaded, image, bands.as_ref(), args.model.load.limits())?
        }
        (None, None) => bail!("give a text or --image FILE"),
    };
    // the vectors and the results' rows from one consistent view of the index
    let (total, results, secs) = index.read(|view| {
        let vectors = view.vectors()?;
        let start = std::time::Instant::now();
        let hits = exact::search(&vectors, &query, args.k as usize);
        let secs = start.elapsed().as_secs_f64();
        Ok((vectors.len(), ranked(view, &hits)?, secs))
    })?;
    if args.json {
        let mut out = serde_json::json!({
            "query": args.text, "image": args.image, "k": args.k,
            "total": total, "results": results,
        });
        if args.vector {
            out["query_vector"] = serde_json::json!(query);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if args.geojson {
        let crs = if args.geojson_native {
            GeoJsonCrs::Native
        } else {
            GeoJsonCrs::Wgs84
        };
        println!("{}", serde_json::to_string_pretty(&geojson(&results, crs))?);
    } else {
        print!("{}", table(&results));
    }
    eprintln!("searched {total} tiles in {:.1} ms", secs * 1e3);
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The index folder (from `harma index build`)
    pub index: PathBuf,
    /// Address to listen on (host:port); 127.0.0.1 keeps it to this machine
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// The images folder, if it moved since the index was built
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Print a line per request (method, target, status, milliseconds) to stderr
    #[arg(long)]
    pub log: bool,
    /// Threads answering requests
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub threads: u64,
    #[command(flatten)]
    pub model: QueryModelArgs,
}

pub fn run_serve(args: &ServeArgs) -> Result<()> {
    let index = Index::open(&args.index)?;
    let (files, _, tiles) = index.counts()?;
    let loaded = Arc::new(load_for(&index, &args.model)?);
    let tokenizer = Arc::new(ClipTokenizer::new(loaded.config.text.context_length)?);
    let embed: serve::TextEmbedder = {
        let (loaded, tokenizer) = (loaded.clone(), tokenizer.clone());
        Box::new(move |q: &str| embed_text(&loaded, &tokenizer, q).map_err(|e| format!("{e:#}")))
    };
    let app = App::new(index, args.images.clone(), embed)
        .map(|app| app.with_limits(args.model.load.limits()))
        .with_context(|| format!("cannot serve {}", args.index.display()))?;
    let listener = serve::bind(&args.addr)?;
    eprintln!(
        "serving {} ({tiles} tiles from {files} files) on http://{} (Ctrl-C stops)",
        args.index.display(),
        listener.local_addr()?
    );
    // a name it was bound by is one it answers to, besides IP addresses and localhost
    let name = args
        .addr
        .rsplit_once(':')
        .map_or(args.addr.as_str(), |(h, _)| h);
    let cfg = serve::ServeConfig {
        threads: args.threads as usize,
        hosts: vec![name.trim_matches(['[', ']']).to_string()],
        log: args
            .log
            .then(|| Arc::new(|line: &str| eprintln!("{line}")) as serve::Log),
        ..serve::ServeConfig::default()
    };
    let never = std::sync::atomic::AtomicBool::new(false);
    serve::run_with(Arc::new(app), listener, &cfg, &never);
    Ok(())
}
