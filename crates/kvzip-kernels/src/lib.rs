//! kvzip-kernels (under construction in this commit).
