//! kvzip-score (under construction in this commit).
