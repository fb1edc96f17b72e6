//! Error type of the models crate.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// `config.json` is malformed, misses a field, or has an unusable value.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The offending field (dotted path for nested fields).
        field: String,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// The config names an architecture this crate does not implement.
    #[error("{path}: unsupported architecture {name:?}; supported: {supported}")]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture name found.
        name: String,
        /// Comma-separated list of supported architectures.
        supported: String,
    },
    /// A weight file is corrupt, truncated, or a tensor is missing or has the wrong shape/dtype.
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Weights {
        /// The weight file (or index file).
        path: PathBuf,
        /// The tensor name involved (empty when the whole file is unreadable).
        tensor: String,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// A compute kernel rejected its arguments, or the device failed (no CUDA in this build, no
    /// GPU, out of memory).
    #[error(transparent)]
    Kernel(#[from] kvzip_kernels::KernelError),
    /// The KV cache rejected an operation.
    #[error(transparent)]
    Cache(#[from] kvzip_cache::CacheError),
    /// Invalid input to the engine (e.g. empty prompt, context longer than the model allows).
    #[error("{0}")]
    Input(String),
}

/// Result alias of the models crate.
pub type Result<T> = std::result::Result<T, ModelError>;
