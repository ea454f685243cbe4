//! Loading a model: a CLIP checkpoint on the compute setting it will run with, and HarMA's
//! adapters from a file or from inside the checkpoint. Used by every command that embeds
//! (`embed`, `eval`, `train`, the index, the demo) and by xtask.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use harma_adapters::{AdapterConfig, HarmaAdapters, Sharing};
use harma_clip::{BlockHook, Checkpoint, Clip, ClipConfig, Compute};

harma_settings::settings! {
    /// The architecture and the adapters, shared by `embed`, `eval`, `train` and the index.
    pub struct BackboneSettings {
        /// Architecture preset: ViT-B-32-quickgelu (OpenAI, GeoRSCLIP and RemoteCLIP weights),
        /// ViT-B-32 (LAION weights), tiny, tiny-quickgelu, or a JSON file of sizes
        pub arch: String = "ViT-B-32-quickgelu".to_string(),
        /// HarMA adapters: an adapters-only safetensors file (a run's adapters.safetensors or
        /// best.safetensors) or a HarMA checkpoint. Without it, the adapters inside the
        /// checkpoint (an official HarMA checkpoint) are used; with neither, `embed` and `eval`
        /// run plain CLIP (the zero-shot baseline) and `train` starts from fresh adapters (zero
        /// up-projections: the backbone)
        #[setting(value_name("FILE"))]
        pub adapters: Option<PathBuf> = None,
        /// Which blocks hold BiShareAdapter mini-adapters
        pub sharing: Sharing = Sharing::Text,
    }
}

/// A loaded model: the backbone (which carries its compute setting) and the adapters if any.
pub struct Loaded {
    pub config: ClipConfig,
    pub model: Clip,
    pub adapters: Option<HarmaAdapters>,
    /// The file the adapters came from.
    pub adapters_from: Option<PathBuf>,
}

impl Loaded {
    pub fn hook(&self) -> Option<&dyn BlockHook> {
        self.adapters.as_ref().map(|a| a as &dyn BlockHook)
    }

    pub fn compute(&self) -> &Compute {
        &self.model.compute
    }
}

/// The backbone of `checkpoint` for `arch` on `compute`, and the adapter tensors the
/// checkpoint carries (an official HarMA checkpoint; empty otherwise).
pub fn load_backbone(
    checkpoint: &Path,
    arch: &str,
    compute: &Compute,
) -> Result<(ClipConfig, Clip, HashMap<String, Tensor>)> {
    let config = ClipConfig::preset(arch)?;
    let ckpt = Checkpoint::load(checkpoint, &config, &harma_adapters::is_adapter_key)?;
    let model = Clip::from_checkpoint(&ckpt, &config, compute)?;
    Ok((config, model, ckpt.extras))
}

/// The adapter tensors to use and where they come from: `explicit` (a file), else those
/// inside the checkpoint (`in_checkpoint`, read from `checkpoint`), else none.
pub fn adapter_tensors(
    explicit: Option<&Path>,
    in_checkpoint: HashMap<String, Tensor>,
    checkpoint: &Path,
) -> Result<Option<(HashMap<String, Tensor>, PathBuf)>> {
    Ok(match explicit {
        Some(p) => Some((harma_adapters::load_file(p)?, p.to_path_buf())),
        None if !in_checkpoint.is_empty() => Some((in_checkpoint, checkpoint.to_path_buf())),
        None => None,
    })
}

/// Load `checkpoint` with the architecture and adapters `backbone` names, on `compute`.
pub fn load(checkpoint: &Path, backbone: &BackboneSettings, compute: &Compute) -> Result<Loaded> {
    eprintln!("device: {}", compute.describe());
    let start = std::time::Instant::now();
    let (config, model, extras) = load_backbone(checkpoint, &backbone.arch, compute)?;
    let found = adapter_tensors(backbone.adapters.as_deref(), extras, checkpoint)?;
    let (adapters, adapters_from) = match found {
        Some((tensors, source)) => {
            let acfg = AdapterConfig {
                sharing: backbone.sharing,
                ..AdapterConfig::default()
            };
            let adapters = HarmaAdapters::from_tensors(tensors, &config, &acfg, compute)
                .with_context(|| format!("adapters from {}", source.display()))?;
            eprintln!(
                "adapters from {} (sharing: {:?})",
                source.display(),
                backbone.sharing
            );
            (Some(adapters), Some(source))
        }
        None => (None, None),
    };
    eprintln!(
        "loaded {} ({}) in {:.1}s",
        checkpoint.display(),
        backbone.arch,
        start.elapsed().as_secs_f64()
    );
    Ok(Loaded {
        config,
        model,
        adapters,
        adapters_from,
    })
}

/// Token ids must index the model's token embedding: a model with a smaller vocabulary than
/// the CLIP tokenizer's (49,408) cannot read real captions.
pub fn check_vocab(ids: &[u32], cfg: &ClipConfig) -> Result<()> {
    if let Some(&max) = ids.iter().max() {
        if max as usize >= cfg.text.vocab_size {
            anyhow::bail!(
                "the captions use token id {max}, but the model's vocabulary has {} tokens \
                 (the CLIP tokenizer needs 49408): is --arch right for this checkpoint?",
                cfg.text.vocab_size
            );
        }
    }
    Ok(())
}
