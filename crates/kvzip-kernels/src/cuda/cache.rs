//! Placeholder: filled by the cache kernels.
