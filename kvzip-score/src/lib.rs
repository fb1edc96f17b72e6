//! KV importance scoring for kvzip-rs.
//!
//! * [`ContextScores`] / [`ScoreAccumulator`]: one f32 score per (layer, KV head, context
//!   position), assembled chunk by chunk (KVZIP-SPEC §1).
//! * [`score_chunk`]: the KVzip context-reconstruction score of one chunk on host memory (tiled
//!   two-pass softmax statistics, nothing larger than a tile materialised), plus
//!   [`score_chunk_reference`], a plain loop implementation used to test it (both from
//!   `kvzip-kernels`, which also runs the op on CUDA; [`ScoreAccumulator`] drives either).
//! * [`select`]: budget selection (pair, pair-uniform, head, pyramid) producing a
//!   [`kvzip_cache::KeepMask`] with exactly `round(ratio * N)` kept units (DESIGN §3).
//! * [`HeadScores`]: context-independent head scores (KVZIP-SPEC §3): compute, save/load as
//!   safetensors, merge by element-wise max.
//! * [`baselines`]: SnapKV, PyramidKV, H2O and StreamingLLM scores under the same budget rules.

pub mod baselines;
mod head;
mod recon;
mod scores;
mod select;

pub use head::{HeadScores, HEAD_SCORES_FORMAT, HEAD_SCORES_TENSOR};
pub use recon::{score_chunk, score_chunk_reference, ScoreShape};
pub use scores::{ContextScores, LayerScores, ScoreAccumulator};
pub use select::{
    pyramid_layer_budgets, select, select_heads, select_pyramid, Level, Selection, PYRAMID_BETA,
};

use std::path::PathBuf;

/// Errors of the scoring crate.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// A compression ratio outside `(0, 1]` (or not a number).
    #[error(
        "ratio {0} is outside (0, 1]: pass the fraction of context KV pairs to keep, e.g. 0.3"
    )]
    InvalidRatio(f64),
    /// Inputs of the wrong shape or length; the message names the argument.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A score is NaN (or otherwise unusable); the message names layer, head and position.
    #[error("invalid score: {0}")]
    InvalidScore(String),
    /// Scores were finished before every scored position was filled.
    #[error("incomplete scores: {0}")]
    Incomplete(String),
    /// A head-score file exists but its content is wrong (names the file and the problem).
    #[error("head-score file {}: {problem}", path.display())]
    File {
        /// The file being read or written.
        path: PathBuf,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// An I/O error while reading or writing a file.
    #[error("head-score file {}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A compute-kernel error from `kvzip-kernels`.
    #[error(transparent)]
    Kernel(#[from] kvzip_kernels::KernelError),
    /// A keep-mask error from `kvzip-cache`.
    #[error(transparent)]
    Cache(#[from] kvzip_cache::CacheError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ScoreError>;

/// Checks a keep ratio: finite and in `(0, 1]`.
pub fn check_ratio(ratio: f64) -> Result<()> {
    if ratio.is_finite() && ratio > 0.0 && ratio <= 1.0 {
        Ok(())
    } else {
        Err(ScoreError::InvalidRatio(ratio))
    }
}
