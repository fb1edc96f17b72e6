//! StreamingLLM (Xiao et al. 2024): the first `n_sink` (4) context tokens, then the most recent
//! ones; scores only depend on position, so the recent window is whatever the budget leaves.

use crate::{ContextScores, LayerScores};

/// StreamingLLM scores: sink positions `0..n_sink` rank first (earlier first), then every other
/// position by recency (later = higher). Identical for every scored (layer, head).
pub fn streaming_llm_scores(
    n_ctx: usize,
    n_sink: usize,
    n_heads: &[Option<usize>],
) -> ContextScores {
    let top = 2.0 * n_ctx as f32 + n_sink as f32;
    let row: Vec<f32> = (0..n_ctx)
        .map(|p| if p < n_sink { top - p as f32 } else { p as f32 })
        .collect();
    let layers = n_heads
        .iter()
        .map(|h| {
            h.map(|n| LayerScores {
                n_heads: n,
                values: row.repeat(n),
            })
        })
        .collect();
    // Shapes are consistent by construction.
    ContextScores::from_layers(n_ctx, layers)
        .unwrap_or_else(|_| ContextScores::zeros(n_ctx, n_heads))
}
