//! A HarMA model at work, for every command that embeds and for the training loop: `model`
//! (a CLIP checkpoint on a compute setting, and HarMA's adapters from a file or from inside the
//! checkpoint; [`model::BackboneSettings`]), `encode` (batched embedding of images and
//! captions, decoding overlapped with the model) and `eval` (a split's R@K and mR).

#![forbid(unsafe_code)]

pub mod encode;
pub mod eval;
pub mod model;

pub use model::{BackboneSettings, Loaded};
