//! Command-line interface (clap derive).

use clap::{Parser, Subcommand};

use crate::embed;

/// harma: HarMA remote-sensing image-text retrieval (CLIP ViT-B/32 + adapters) on Candle.
#[derive(Debug, Parser)]
#[command(name = "harma", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed a folder of images and/or a file of captions with a CLIP checkpoint.
    ///
    /// Writes L2-normalised `image_embeds` [n_images, dim] (the images of DIR sorted by file
    /// name) and `text_embeds` [n_lines, dim] (one per non-empty line of FILE, in order) to a
    /// safetensors file; its metadata lists the image names.
    ///
    /// Example (GeoRSCLIP weights, RSITMD images, one query per line):
    ///
    /// harma embed --model RS5M_ViT-B-32_RET-2.pt --images rsitmd/images --captions queries.txt --out embeds.safetensors
    ///
    /// With HarMA's released checkpoint the adapters inside it are applied:
    ///
    /// harma embed --model harma_rsitmd_georsclip_mr523.pth --captions queries.txt --out q.safetensors
    Embed(embed::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Embed(args)) => embed::run(&args),
        None => {
            use clap::CommandFactory;
            Cli::command().print_long_help()?;
            println!(
                "\nTraining and the offline demo are not built yet; `harma embed` works today."
            );
            Ok(())
        }
    }
}
