//! kvzip-models (under construction in this commit).
