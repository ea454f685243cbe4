//! The frozen CLIP backbone of HarMA: open_clip's ViT-B/32 image and text towers, the CLIP BPE
//! tokenizer, and readers for the checkpoint formats people have (PyTorch zip, safetensors,
//! Hugging Face transformers).
//!
//! Reference: open_clip `src/open_clip/model.py` and `transformer.py`
//! (<https://github.com/mlfoundations/open_clip>).

pub mod bf16;
pub mod checkpoint;
pub mod config;
mod kernels;
pub mod model;
pub mod ops;
pub mod tokenizer;
mod torch_pickle;

pub use checkpoint::Checkpoint;
pub use config::{Activation, ClipConfig, TextConfig, VisionConfig};
pub use model::{BlockActs, BlockHook, Clip, SavedTower, Tower};
pub use tokenizer::ClipTokenizer;

use std::path::Path;

/// Errors of the backbone crate.
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
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Msg(String),
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
