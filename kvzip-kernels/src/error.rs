//! Error type of the kernels crate.

/// Errors returned by kernels and parameter helpers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A tensor has the wrong length / shape; the message names the argument and the expected size.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A scalar argument is out of its valid range; the message names it and the valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An argument lives on another device or has another element type than the op needs;
    /// the message names it.
    #[error("device mismatch: {0}")]
    Device(String),
    /// A CUDA device was asked for, but this build has no CUDA support.
    #[error(
        "this build has no CUDA support: rebuild with `--features cuda` (e.g. `cargo build \
         --release -p kvzip-cli --features cuda`) or run on the CPU"
    )]
    NoCuda,
    /// The CUDA backend failed (no driver or device, out of memory, a launch or driver error).
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A token id is outside the embedding table.
    #[error(
        "token id {id} at position {position} is out of range for a vocabulary of {vocab} rows"
    )]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Its index in the `ids` slice.
        position: usize,
        /// Number of rows in the embedding table.
        vocab: usize,
    },
}
