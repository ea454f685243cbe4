//! The frozen CLIP backbone of HarMA: open_clip's ViT-B/32 image and text towers and the CLIP
//! BPE tokenizer, built from checkpoints that `harma-checkpoint` reads and run on the layers
//! of `harma-kernels` with the [`Compute`] setting they are given.
//!
//! Reference: open_clip `src/open_clip/model.py` and `transformer.py`
//! (<https://github.com/mlfoundations/open_clip>).

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod model;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use config::{Activation, ClipConfig, TextConfig, VisionConfig};
pub use harma_kernels::{Bf16Kernel, Compute, Kernels, Precision};
pub use model::{BlockActs, BlockHook, Clip, SavedTower, Tower};
pub use tokenizer::ClipTokenizer;

/// Errors of the backbone crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Read(#[from] harma_checkpoint::Error),
    #[error("{0}")]
    Checkpoint(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;
