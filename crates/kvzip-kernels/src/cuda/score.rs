//! Placeholder: filled by the score kernels.
