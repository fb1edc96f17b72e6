//! kvzip-cache (under construction in this commit).
