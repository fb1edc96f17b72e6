//! kvzip-templates (under construction in this commit).
