//! Baseline scorers on the same budget rules as KVzip: they produce [`ContextScores`], so
//! [`crate::select()`] applies unchanged (PyramidKV = SnapKV scores + [`crate::Level::Pyramid`]).
//!
//! The engine feeds attention inputs during the (chunked) context prefill through
//! [`BaselineScorer::observe_layer`], once per scored layer per prefill chunk; the scorer keeps
//! only `O(heads x n_ctx)` state and computes probabilities tile by tile.
//!
//! * **SnapKV** (Li et al. 2024; paper App. A settings): observation window = the last `window`
//!   (32; 16 when `n_ctx < 1024`) tokens of the prefilled sequence, i.e. the *tail of the
//!   context* (KVzip is query-agnostic, so no question is in the prefill). Per query head:
//!   attention probabilities of the window rows (causal softmax over every prefilled key, model
//!   scale) at the other context keys, averaged over the window rows; 1-D pooling (kernel 7,
//!   stride 1, padding 3; max by default, avg = `count_include_pad`) along positions; mean over
//!   the GQA group. Window keys get `f32::MAX` so every level keeps them first.
//! * **H2O** (prefill variant using max, paper App. A): per KV head, max over every context query
//!   row and the group's query heads of the attention probability of each context key.
//! * **StreamingLLM**: the first `n_sink` (4) context tokens, then the most recent ones; scores
//!   only depend on position, so the recent window is whatever the budget leaves.
//!
//! ```
//! use kvzip_score::baselines::{streaming_llm_scores, Baseline, BaselineScorer, LayerObservation};
//! use kvzip_score::{select, Level};
//!
//! // H2O on a 1-layer model with 1 KV head, head_dim 2: 1 system token + 4 context tokens.
//! let (n_sys, n_ctx, d) = (1, 4, 2);
//! let keys = [0.0, 0.0, /* context */ 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0];
//! let q = [1.0; 5 * 2]; // [t, n_q_heads, head_dim] of positions 0..5
//! let head_keys = |_h: usize| &keys[..];
//! let mut scorer = BaselineScorer::new(Baseline::H2o, n_sys, n_ctx, &[Some(1)])?;
//! let obs = LayerObservation {
//!     q: &q,
//!     n_q_heads: 1,
//!     head_dim: d,
//!     first_pos: 0,
//!     n_kv_heads: 1,
//!     head_keys: &head_keys,
//!     scale: 1.0 / (d as f32).sqrt(),
//! };
//! scorer.observe_layer(0, &obs)?; // once per scored layer per prefill chunk
//! let scores = scorer.finish()?;
//! let sel = select(&scores, 0.5, Level::Pair)?;
//! assert_eq!(sel.mask.layer(0).unwrap().bits, [true, true, false, false]);
//!
//! // StreamingLLM needs no attention: 1 sink token, then the most recent ones.
//! let scores = streaming_llm_scores(n_ctx, 1, &[Some(1)]);
//! let sel = select(&scores, 0.5, Level::Pair)?;
//! assert_eq!(sel.mask.layer(0).unwrap().bits, [true, false, false, true]);
//! # Ok::<(), kvzip_score::ScoreError>(())
//! ```

use std::ops::Range;

use crate::{ContextScores, LayerScores, Result, ScoreError};
use kvzip_kernels::colstats::{ColReduce, ColumnUnit as Unit};
use kvzip_kernels::host::column_stats;

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

/// Which baseline to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// SnapKV (and PyramidKV, which only changes the selection).
    SnapKv(SnapKvConfig),
    /// H2O, prefill variant with max over query rows.
    H2o,
    /// StreamingLLM with `n_sink` attention-sink tokens (default 4).
    StreamingLlm {
        /// Number of leading context tokens always ranked first.
        n_sink: usize,
    },
}

/// One layer's attention inputs for one prefill chunk of `t` tokens (`t` = `q.len() /
/// (n_q_heads * head_dim)`).
pub struct LayerObservation<'a> {
    /// `[t, n_q_heads, head_dim]` rotated queries of positions `first_pos..first_pos + t`.
    pub q: &'a [f32],
    /// Query heads (`n_kv_heads * group`).
    pub n_q_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Absolute position of query row 0 (system prompt starts at 0).
    pub first_pos: usize,
    /// KV heads of the layer.
    pub n_kv_heads: usize,
    /// Key rows of KV head `h`, row r = position r, at least `first_pos + t` rows.
    pub head_keys: &'a (dyn Fn(usize) -> &'a [f32] + Sync),
    /// The model's attention scale (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

struct LayerAcc {
    /// SnapKV: `[n_q_heads, n_ctx]` sums; H2O: `[n_kv_heads, n_ctx]` maxima.
    acc: Vec<f32>,
    rows: usize,
    n_q_heads: usize,
}

/// Accumulates baseline scores over the prefill; see the module docs. Keeps
/// `O(n_heads * n_ctx)` f32 per scored layer.
pub struct BaselineScorer {
    kind: Baseline,
    n_sys: usize,
    n_ctx: usize,
    heads: Vec<Option<usize>>,
    layers: Vec<Option<LayerAcc>>,
}

impl BaselineScorer {
    /// Scorer for a prefill of `n_sys` system-prompt plus `n_ctx` context tokens, with
    /// `n_heads[l]` KV heads per layer (`None` = layer not scored).
    pub fn new(
        kind: Baseline,
        n_sys: usize,
        n_ctx: usize,
        n_heads: &[Option<usize>],
    ) -> Result<Self> {
        if let Baseline::SnapKv(c) = kind {
            if c.kernel == 0 || c.kernel % 2 == 0 || c.window == 0 || c.short_window == 0 {
                return Err(ScoreError::Shape(format!(
                    "SnapKV needs an odd pooling kernel and windows >= 1 (got {c:?})"
                )));
            }
        }
        Ok(Self {
            kind,
            n_sys,
            n_ctx,
            heads: n_heads.to_vec(),
            layers: n_heads.iter().map(|_| None).collect(),
        })
    }

    /// Whether [`BaselineScorer::observe_layer`] must be called (false for StreamingLLM).
    pub fn needs_attention(&self) -> bool {
        !matches!(self.kind, Baseline::StreamingLlm { .. })
    }

    /// SnapKV observation window as context-relative positions (empty for other baselines).
    pub fn window(&self) -> Range<usize> {
        match self.kind {
            Baseline::SnapKv(c) => {
                let w = if self.n_ctx < c.short_context {
                    c.short_window
                } else {
                    c.window
                };
                self.n_ctx - w.min(self.n_ctx)..self.n_ctx
            }
            _ => 0..0,
        }
    }

    /// Absolute positions of the query rows this baseline needs.
    fn needed_rows(&self) -> Range<usize> {
        let ctx_end = self.n_sys + self.n_ctx;
        match self.kind {
            Baseline::SnapKv(_) => {
                let w = self.window();
                self.n_sys + w.start..self.n_sys + w.end
            }
            Baseline::H2o => self.n_sys..ctx_end,
            Baseline::StreamingLlm { .. } => 0..0,
        }
    }

    /// Feeds one layer of one prefill chunk. Layers that are not scored are ignored.
    pub fn observe_layer(&mut self, layer: usize, obs: &LayerObservation<'_>) -> Result<()> {
        let Some(Some(n_kv)) = self.heads.get(layer).copied() else {
            return Ok(());
        };
        let d = obs.head_dim;
        if d == 0
            || obs.n_kv_heads != n_kv
            || obs.n_q_heads % n_kv.max(1) != 0
            || obs.q.len() % (obs.n_q_heads * d).max(1) != 0
        {
            return Err(ScoreError::Shape(format!(
                "layer {layer}: observation with {} KV heads / {} query heads / head_dim {d} / {} query floats \
                 does not fit {n_kv} KV heads",
                obs.n_kv_heads,
                obs.n_q_heads,
                obs.q.len()
            )));
        }
        let t = obs.q.len() / (obs.n_q_heads * d).max(1);
        let need = self.needed_rows();
        let rows = need.start.max(obs.first_pos)..need.end.min(obs.first_pos + t);
        if rows.is_empty() || !self.needs_attention() {
            return Ok(());
        }
        let group = obs.n_q_heads / n_kv;
        for h in 0..n_kv {
            let have = (obs.head_keys)(h).len();
            if have < rows.end * d {
                return Err(ScoreError::Shape(format!(
                    "layer {layer} head {h}: {} key rows, need {} (all keys up to the last query row)",
                    have / d,
                    rows.end
                )));
            }
        }
        let ctx = self.n_sys..self.n_sys + self.n_ctx;
        let target = ctx.start..ctx.end.min(rows.end);
        let segments = vec![0..rows.end; 1];
        let gather = |qh: usize| -> Vec<f32> {
            rows.clone()
                .flat_map(|p| {
                    let off = ((p - obs.first_pos) * obs.n_q_heads + qh) * d;
                    obs.q[off..off + d].iter().copied()
                })
                .collect()
        };
        let (n_units, reduce) = match self.kind {
            Baseline::SnapKv(_) => (obs.n_q_heads, ColReduce::Sum),
            _ => (n_kv, ColReduce::Max),
        };
        // SnapKV: one unit per query head; H2O: one unit per KV head with its group's rows.
        let qs: Vec<Vec<f32>> = (0..n_units)
            .map(|u| match reduce {
                ColReduce::Sum => gather(u),
                ColReduce::Max => (0..group).flat_map(|g| gather(u * group + g)).collect(),
            })
            .collect();
        let units: Vec<Unit<'_>> = qs
            .iter()
            .enumerate()
            .map(|(u, q)| Unit {
                q,
                keys: (obs.head_keys)(if reduce == ColReduce::Sum {
                    u / group
                } else {
                    u
                }),
                period: rows.len(),
                first_pos: rows.start,
            })
            .collect();
        let tlen = target.len();
        let mut out = vec![0.0f32; n_units * tlen];
        column_stats(
            &units,
            d,
            obs.scale,
            &segments,
            target.clone(),
            reduce,
            &mut out,
        )?;
        let n_ctx = self.n_ctx;
        let la = self.layers[layer].get_or_insert_with(|| LayerAcc {
            acc: vec![0.0; n_units * n_ctx],
            rows: 0,
            n_q_heads: obs.n_q_heads,
        });
        if la.acc.len() != n_units * n_ctx {
            return Err(ScoreError::Shape(format!(
                "layer {layer}: head count changed between chunks"
            )));
        }
        la.rows += rows.len();
        for u in 0..n_units {
            let dst = &mut la.acc[u * n_ctx..u * n_ctx + tlen];
            let src = &out[u * tlen..(u + 1) * tlen];
            match reduce {
                ColReduce::Sum => dst.iter_mut().zip(src).for_each(|(a, b)| *a += b),
                ColReduce::Max => dst.iter_mut().zip(src).for_each(|(a, b)| *a = a.max(*b)),
            }
        }
        Ok(())
    }

    /// Final scores (one per scored (layer, KV head, context position), for
    /// [`crate::select()`]); fails with [`ScoreError::Incomplete`] if a scored layer did not see
    /// every query row it needs.
    pub fn finish(self) -> Result<ContextScores> {
        let n_ctx = self.n_ctx;
        if let Baseline::StreamingLlm { n_sink } = self.kind {
            return Ok(streaming_llm_scores(n_ctx, n_sink, &self.heads));
        }
        let expected = self.needed_rows().len();
        let window = self.window();
        let mut layers = Vec::with_capacity(self.heads.len());
        for (l, (h, la)) in self.heads.iter().zip(self.layers).enumerate() {
            let Some(n_kv) = *h else {
                layers.push(None);
                continue;
            };
            let seen = la.as_ref().map_or(0, |la| la.rows);
            if seen != expected {
                return Err(ScoreError::Incomplete(format!(
                    "layer {l}: observed {seen} query rows, expected {expected}; call observe_layer \
                     once per prefill chunk for every scored layer"
                )));
            }
            let values = match (self.kind, la) {
                (Baseline::SnapKv(c), Some(la)) => {
                    snapkv_layer(&la.acc, la.n_q_heads, n_kv, n_ctx, window.clone(), &c)
                }
                (_, Some(la)) => la.acc,
                (_, None) => vec![0.0; n_kv * n_ctx],
            };
            layers.push(Some(LayerScores {
                n_heads: n_kv,
                values,
            }));
        }
        ContextScores::from_layers(n_ctx, layers)
    }
}

/// SnapKV scores of one layer from per-query-head window sums `[n_q_heads, n_ctx]`.
fn snapkv_layer(
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
