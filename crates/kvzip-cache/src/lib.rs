//! Flattened variable-length per-head KV cache for kvzip-rs.
//!
//! (The cache proper is being written; this commit holds the keep-mask type shared with
//! `kvzip-score`.)

mod keep;

pub use keep::{KeepMask, LayerKeep};

/// Errors of the KV cache crate.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A tensor or mask has the wrong shape; the message names it.
    #[error("shape mismatch: {0}")]
    Shape(String),
}
