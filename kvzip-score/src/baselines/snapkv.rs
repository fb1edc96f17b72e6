//! SnapKV (Li et al. 2024; paper App. A settings) and PyramidKV's scores: observation window =
//! the last `window` (32; 16 when `n_ctx < 1024`) tokens of the prefilled sequence, i.e. the
//! tail of the context (KVzip is query-agnostic, so no question is in the prefill). Per query
//! head: attention probabilities of the window rows (causal softmax over every prefilled key,
//! model scale) at the other context keys, averaged over the window rows; 1-D pooling (kernel
//! 7, stride 1, padding 3; max by default, avg = `count_include_pad`) along positions; mean
//! over the GQA group. Window keys get `f32::MAX` so every level keeps them first. PyramidKV =
//! these scores + [`crate::Level::Pyramid`].

use std::ops::Range;

/// 1-D pooling kind of SnapKV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// `max_pool1d` (padding ignored).
    Max,
    /// `avg_pool1d` with zero padding counted (divides by the kernel size everywhere).
    Avg,
}

/// SnapKV settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapKvConfig {
    /// Observation window in tokens (paper: 32).
    pub window: usize,
    /// Window used when `n_ctx < short_context` (paper: 16 below 1K tokens).
    pub short_window: usize,
    /// Context length below which `short_window` applies.
    pub short_context: usize,
    /// Pooling kernel size (odd; paper: 7).
    pub kernel: usize,
    /// Pooling kind.
    pub pooling: Pooling,
}

impl Default for SnapKvConfig {
    fn default() -> Self {
        Self {
            window: 32,
            short_window: 16,
            short_context: 1024,
            kernel: 7,
            pooling: Pooling::Max,
        }
    }
}

impl SnapKvConfig {
    /// The observation window as context-relative positions.
    pub fn window_for(&self, n_ctx: usize) -> Range<usize> {
        let w = if n_ctx < self.short_context {
            self.short_window
        } else {
            self.window
        };
        n_ctx - w.min(n_ctx)..n_ctx
    }
}

/// SnapKV scores of one layer from per-query-head window sums `[n_q_heads, n_ctx]`.
pub(super) fn snapkv_layer(
    sums: &[f32],
    n_q_heads: usize,
    n_kv: usize,
    n_ctx: usize,
    window: Range<usize>,
    c: &SnapKvConfig,
) -> Vec<f32> {
    let group = n_q_heads / n_kv;
    let w = window.len().max(1) as f32;
    let prefix = window.start;
    let mut out = vec![f32::MAX; n_kv * n_ctx];
    for qh in 0..n_q_heads {
        let mean: Vec<f32> = sums[qh * n_ctx..qh * n_ctx + prefix]
            .iter()
            .map(|s| s / w)
            .collect();
        let pooled = pool1d(&mean, c.kernel, c.pooling);
        let h = qh / group;
        let dst = &mut out[h * n_ctx..h * n_ctx + prefix];
        if qh % group == 0 {
            dst.fill(0.0);
        }
        dst.iter_mut()
            .zip(&pooled)
            .for_each(|(o, p)| *o += p / group as f32);
    }
    out
}

/// 1-D pooling of `values` with an odd `kernel` size, stride 1 and padding `kernel / 2`
/// (output length = input length).
pub fn pool1d(values: &[f32], kernel: usize, pooling: Pooling) -> Vec<f32> {
    let half = kernel / 2;
    (0..values.len())
        .map(|i| {
            let win = &values[i.saturating_sub(half)..(i + half + 1).min(values.len())];
            match pooling {
                Pooling::Max => win.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                Pooling::Avg => win.iter().sum::<f32>() / kernel.max(1) as f32,
            }
        })
        .collect()
}
