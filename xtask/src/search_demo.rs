//! `cargo xtask search-demo --out DIR`: a small archive to index and serve without any
//! download (scripts/browser-check.sh, scripts/lance-proof.sh): a tiny CLIP with random
//! weights, generated aerial scenes as PNGs, and a 1024x1024 GeoTIFF mosaic of scenes in
//! UTM 33N. Its search results mean nothing; the pipeline, the page and the API work on it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use harma_clip::{Activation, ClipConfig};
use harma_data::rng::Rng;
use harma_data::RgbImage;
use harma_raster::{write_geotiff, GeoRef};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder to write model.safetensors and images/ into
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Scenes written as separate PNGs
    #[arg(long, default_value_t = 40)]
    pub images: usize,
}

pub fn run(args: &Args) -> Result<()> {
    let images = args.out.join("images");
    std::fs::create_dir_all(images.join("scenes"))
        .with_context(|| format!("cannot create {}", images.display()))?;
    std::fs::create_dir_all(images.join("rasters"))?;
    let cfg = ClipConfig::tiny(Activation::QuickGelu);
    let mut rng = Rng::new(3407);
    let model = args.out.join("model.safetensors");
    crate::workloads::write_random_model(
        &cfg,
        harma_clip::checkpoint::RandomInit::FanIn,
        &mut rng,
        &model,
    )?;
    for i in 0..args.images {
        let img = harma_train::synth::Scene::random(&mut rng).render(256, &mut rng);
        image::RgbImage::from_raw(256, 256, img.data)
            .context("scene size")?
            .save(images.join(format!("scenes/scene-{i:03}.png")))?;
    }
    let mut mosaic = RgbImage {
        width: 1024,
        height: 1024,
        data: vec![0; 1024 * 1024 * 3],
    };
    for t in 0..16 {
        let img = harma_train::synth::Scene::random(&mut rng).render(256, &mut rng);
        let (x0, y0) = ((t % 4) * 256, (t / 4) * 256);
        for y in 0..256 {
            let dst = ((y0 + y) * 1024 + x0) * 3;
            mosaic.data[dst..dst + 256 * 3]
                .copy_from_slice(&img.data[y * 256 * 3..(y + 1) * 256 * 3]);
        }
    }
    let geo = GeoRef {
        epsg: Some(32633),
        x0: 500000.0,
        dx: 0.5,
        y0: 4000000.0,
        dy: -0.5,
    };
    write_geotiff(&images.join("rasters/mosaic.tif"), &mosaic, &geo)?;
    println!(
        "wrote {} (tiny-quickgelu, random weights) and {} scenes + a GeoTIFF mosaic under {}\n\
         harma index build --model {} --arch tiny-quickgelu --images {} --out INDEX\n\
         harma serve INDEX",
        model.display(),
        args.images,
        images.display(),
        model.display(),
        images.display()
    );
    Ok(())
}
