//! Searching an image archive by text: the index on disk ([`store`]: SQLite for the settings,
//! files and tiles, the embeddings in a vector file beside it, written transactionally and
//! incrementally), exact search over it by GEMM ([`exact`]), the listing of an images folder
//! ([`walk`]), results as JSON and GeoJSON ([`output`]) and the web page with its JSON API
//! ([`serve`]). The model stays outside: the `harma` binary embeds and passes vectors in.

#![forbid(unsafe_code)]

pub mod exact;
#[cfg(feature = "lance")]
pub mod lance;
pub mod output;
pub mod serve;
pub mod store;
pub mod walk;

pub use exact::Hit;
pub use store::{Index, Settings, TileInfo, TileSource, Vectors, View, Writer};

/// Errors of the search crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("index {path}: {msg}")]
    Index { path: String, msg: String },
    #[error(transparent)]
    Data(#[from] harma_data::Error),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
