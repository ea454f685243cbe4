//! Reading the checkpoint files people have into tensors under open_clip's key names.
//!
//! Accepted, detected from the file's first bytes ([`format`]): PyTorch zip archives
//! (`torch.save` of a state dict, plain or under `state_dict`/`model`, keys with or without a
//! `module.` or `model.` prefix: GeoRSCLIP, RemoteCLIP, open_clip, HarMA), read by a pickle
//! interpreter that never executes anything ([`pickle`]); safetensors in the same layout; and
//! Hugging Face transformers `CLIPModel` safetensors, renamed to open_clip's keys ([`hf`]).
//! This crate knows file formats and naming conventions, not models: which keys a model needs
//! is for the model's crate to check.

#![forbid(unsafe_code)]

pub mod format;
pub mod hf;
pub mod pickle;
pub mod write;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

pub use format::{detect_format, Format};

/// Errors of checkpoint reading; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Checkpoint(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Strip the `module.` (DataParallel) and `model.` (HarMA) wrappers from a key.
pub fn strip_prefixes(mut key: &str) -> &str {
    loop {
        if let Some(rest) = key.strip_prefix("module.") {
            key = rest;
        } else if let Some(rest) = key.strip_prefix("model.") {
            key = rest;
        } else {
            return key;
        }
    }
}

/// Every tensor of a checkpoint file under open_clip's names: a Hugging Face transformers CLIP
/// renamed ([`hf::to_open_clip`]), anything else with its `module.`/`model.` prefixes removed.
/// Keys the renaming does not know are kept as they are, for the caller to judge.
pub fn load_open_clip_named(path: &Path) -> Result<HashMap<String, Tensor>> {
    let raw = format::load_tensors(path)?;
    let is_hf = raw
        .keys()
        .any(|k| k.starts_with("vision_model.") || k.starts_with("text_model."));
    if is_hf {
        return hf::to_open_clip(raw)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())));
    }
    Ok(raw
        .into_iter()
        .map(|(k, t)| (strip_prefixes(&k).to_string(), t))
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrappers_are_stripped_in_any_order() {
        for (k, want) in [
            ("module.model.visual.proj", "visual.proj"),
            ("model.module.temp", "temp"),
            ("visual.model.x", "visual.model.x"),
            ("ln_final.bias", "ln_final.bias"),
        ] {
            assert_eq!(super::strip_prefixes(k), want);
        }
    }
}
