//! Placeholder: filled by the attention kernels.
