//! The model flags of the commands that embed (`embed`, `eval`, `index build`).

use std::path::PathBuf;

use anyhow::Result;
use harma_data::LoadSettings;
use harma_kernels::compute::ComputeSettings;
use harma_model::{BackboneSettings, Loaded};

use crate::flags::Flags;

/// The model flags of `embed`, `eval` and `index build`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// CLIP checkpoint: open_clip state dict (.pt/.pth/.bin, plain or under state_dict/model),
    /// open_clip safetensors, or Hugging Face transformers CLIP safetensors; an official HarMA
    /// checkpoint brings its adapters
    #[arg(long, value_name = "CKPT")]
    pub model: PathBuf,
    #[command(flatten)]
    pub backbone: Flags<BackboneSettings>,
    #[command(flatten)]
    pub compute: Flags<ComputeSettings>,
    #[command(flatten)]
    pub load: Flags<LoadSettings>,
}

impl ModelArgs {
    /// Load the checkpoint and the adapters with the compute setting of the flags.
    pub fn load(&self) -> Result<Loaded> {
        let compute = self.compute.compute()?;
        harma_model::model::load(&self.model, &self.backbone, &compute)
    }
}
