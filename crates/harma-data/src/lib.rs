//! Data for HarMA: image decoding and the CLIP preprocessing (this crate matches PIL and
//! torchvision so embeddings equal the PyTorch pipeline's), caption cleaning, annotation files,
//! and the batches of a training run (which pairs, how augmented, prepared in parallel).

#![forbid(unsafe_code)]

pub mod annotations;
pub mod augment;
pub mod batcher;
pub mod caption;
pub mod image;
pub mod pipeline;
pub mod rng;
pub mod sampler;

pub use crate::caption::clean_caption;
pub use crate::image::{
    load_rgb8, load_rgb8_with, preprocess_eval, resize_bicubic, LoadLimits, LoadSettings, RgbImage,
    CLIP_MEAN, CLIP_STD,
};

/// Errors of the data crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {msg}")]
    Image { path: String, msg: String },
    #[error("{path}: {msg}")]
    Data { path: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The sha256 of a file, in lowercase hex, read in 1 MiB pieces: the checksum that run reports
/// record for data and checkpoints and that a search index records for its model.
pub fn sha256_file(path: &std::path::Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}
