//! Baseline scorers on the same budget rules as KVzip: they produce [`ContextScores`], so
//! [`crate::select()`] applies unchanged (PyramidKV = SnapKV scores + [`crate::Level::Pyramid`]).
//! One file per method:
//!
//! * [`snapkv`]: SnapKV (and PyramidKV's scores): window attention of the context's tail.
//! * H2O (prefill variant using max, paper App. A; here): per KV head, max over every context
//!   query row and the group's query heads of the attention probability of each context key.
//! * [`tova`]: TOVA: the last token's attention, averaged over the layer's heads.
//! * [`knorm`]: KNorm: `-‖k‖`.
//! * [`keydiff`]: KeyDiff: `-cos(k, mean key direction)`.
//! * [`expected_attention`]: Expected Attention: the attention future queries are expected to
//!   pay, from query statistics, times `‖v‖`.
//! * [`streaming`]: StreamingLLM: sinks + recent window.
//!
//! The engine feeds attention inputs during the (chunked) context prefill through
//! [`BaselineScorer::observe_layer`], once per scored layer per prefill chunk; the scorer keeps
//! only `O(heads x n_ctx)` state (`O(heads x d²)` for Expected Attention) and computes
//! probabilities tile by tile.
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
//!     head_values: None,
//!     rope: None,
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

pub mod expected_attention;
pub mod keydiff;
pub mod knorm;
pub mod snapkv;
pub mod streaming;
pub mod tova;

use std::ops::Range;

use crate::{ContextScores, LayerScores, Result, ScoreError};
use kvzip_kernels::colstats::{ColReduce, ColumnUnit as Unit};
use kvzip_kernels::host::column_stats;

pub use expected_attention::ExpectedAttentionConfig;
pub use keydiff::keydiff_scores;
pub use knorm::knorm_scores;
pub use snapkv::{pool1d, Pooling, SnapKvConfig};
pub use streaming::streaming_llm_scores;

/// Which baseline to compute.
#[derive(Debug, Clone, Copy, PartialEq)]
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
    /// TOVA: the last context token's attention, mean over the layer's query heads.
    Tova,
    /// KNorm: `-‖k‖₂`.
    KNorm,
    /// KeyDiff: `-cos(k, anchor)`.
    KeyDiff,
    /// Expected Attention from query statistics.
    ExpectedAttention(ExpectedAttentionConfig),
}

/// RoPE of a layer as the observed queries were rotated: rotate-half layout over the first
/// `2 * inv_freq.len()` dims, cos and sin multiplied by `factor`.
#[derive(Debug, Clone, Copy)]
pub struct RopeObservation<'a> {
    /// Inverse frequencies `[rotary_dim / 2]`.
    pub inv_freq: &'a [f32],
    /// Attention factor multiplying cos and sin (1 for most models).
    pub factor: f32,
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
    /// Value rows of KV head `h` like `head_keys` (Expected Attention's `‖v‖`).
    pub head_values: Option<&'a (dyn Fn(usize) -> &'a [f32] + Sync)>,
    /// The layer's RoPE (Expected Attention un-rotates the queries with it).
    pub rope: Option<RopeObservation<'a>>,
    /// The model's attention scale (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// Per-layer state between prefill chunks.
enum LayerState {
    /// Attention sums (SnapKV, TOVA: `[n_q_heads, n_ctx]`) or maxima (H2O: `[n_kv, n_ctx]`).
    Attention { acc: Vec<f32>, n_q_heads: usize },
    /// Query statistics (Expected Attention).
    Queries(expected_attention::QueryStats),
    /// Final scores `[n_kv, n_ctx]` (KNorm, KeyDiff, Expected Attention).
    Scores(Vec<f32>),
}

/// Accumulates baseline scores over the prefill; see the module docs.
pub struct BaselineScorer {
    kind: Baseline,
    n_sys: usize,
    n_ctx: usize,
    heads: Vec<Option<usize>>,
    layers: Vec<Option<LayerState>>,
    rows_seen: Vec<usize>,
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
        if n_ctx == 0 {
            return Err(ScoreError::Shape(
                "a baseline needs a non-empty context".into(),
            ));
        }
        Ok(Self {
            kind,
            n_sys,
            n_ctx,
            heads: n_heads.to_vec(),
            layers: n_heads.iter().map(|_| None).collect(),
            rows_seen: vec![0; n_heads.len()],
        })
    }

    /// Whether [`BaselineScorer::observe_layer`] must be called (false for StreamingLLM).
    pub fn needs_attention(&self) -> bool {
        !matches!(self.kind, Baseline::StreamingLlm { .. })
    }

    /// Whether observations must carry the value rows and the layer's RoPE (Expected
    /// Attention).
    pub fn needs_values_and_rope(&self) -> bool {
        matches!(self.kind, Baseline::ExpectedAttention(_))
    }

    /// SnapKV observation window as context-relative positions (empty for other baselines).
    pub fn window(&self) -> Range<usize> {
        match self.kind {
            Baseline::SnapKv(c) => c.window_for(self.n_ctx),
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
            // The last context row (key-only methods finish when it is there).
            Baseline::Tova | Baseline::KNorm | Baseline::KeyDiff => ctx_end - 1..ctx_end,
            Baseline::ExpectedAttention(c) => c.n_sink.min(ctx_end - 1)..ctx_end,
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
        self.rows_seen[layer] += rows.len();
        let ctx = self.n_sys..self.n_sys + self.n_ctx;
        let last_chunk = rows.end == ctx.end;
        match self.kind {
            Baseline::SnapKv(_) | Baseline::H2o | Baseline::Tova => {
                self.accumulate_attention(layer, obs, rows, n_kv)
            }
            Baseline::KNorm | Baseline::KeyDiff if last_chunk => {
                let mut values = Vec::with_capacity(n_kv * self.n_ctx);
                for h in 0..n_kv {
                    let keys = (obs.head_keys)(h);
                    values.extend(match self.kind {
                        Baseline::KNorm => knorm_scores(keys, d, ctx.clone()),
                        _ => keydiff_scores(keys, d, ctx.end, ctx.clone()),
                    });
                }
                self.layers[layer] = Some(LayerState::Scores(values));
                Ok(())
            }
            Baseline::ExpectedAttention(cfg) => {
                let rope = obs.rope.ok_or_else(|| {
                    ScoreError::Shape(format!(
                        "layer {layer}: Expected Attention needs the layer's RoPE in the observation"
                    ))
                })?;
                let state = self.layers[layer].get_or_insert_with(|| {
                    LayerState::Queries(expected_attention::QueryStats::new(obs.n_q_heads, d))
                });
                let LayerState::Queries(stats) = state else {
                    return Err(ScoreError::Shape(format!("layer {layer}: state mixed up")));
                };
                stats.add(obs.q, obs.first_pos, rows, &rope);
                if last_chunk {
                    let values = obs.head_values.ok_or_else(|| {
                        ScoreError::Shape(format!(
                            "layer {layer}: Expected Attention needs the value rows in the observation"
                        ))
                    })?;
                    let scores = stats.finish_layer(
                        &cfg,
                        &rope,
                        &|h| (obs.head_keys)(h)[..ctx.end * d].to_vec(),
                        &|h| values(h)[..ctx.end * d].to_vec(),
                        n_kv,
                        ctx.end,
                        ctx.clone(),
                        obs.scale,
                    );
                    self.layers[layer] = Some(LayerState::Scores(scores));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Attention probabilities of `rows` at the context keys, summed (SnapKV, TOVA: per query
    /// head) or maxed (H2O: per KV head over its group) into the layer's state.
    fn accumulate_attention(
        &mut self,
        layer: usize,
        obs: &LayerObservation<'_>,
        rows: Range<usize>,
        n_kv: usize,
    ) -> Result<()> {
        let d = obs.head_dim;
        let group = obs.n_q_heads / n_kv;
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
            Baseline::H2o => (n_kv, ColReduce::Max),
            _ => (obs.n_q_heads, ColReduce::Sum),
        };
        // One unit per query head (sums) or per KV head with its group's rows (maxima).
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
        let state = self.layers[layer].get_or_insert_with(|| LayerState::Attention {
            acc: vec![0.0; n_units * n_ctx],
            n_q_heads: obs.n_q_heads,
        });
        let LayerState::Attention { acc, .. } = state else {
            return Err(ScoreError::Shape(format!("layer {layer}: state mixed up")));
        };
        if acc.len() != n_units * n_ctx {
            return Err(ScoreError::Shape(format!(
                "layer {layer}: head count changed between chunks"
            )));
        }
        for u in 0..n_units {
            let dst = &mut acc[u * n_ctx..u * n_ctx + tlen];
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
        for (l, (h, state)) in self.heads.iter().zip(self.layers).enumerate() {
            let Some(n_kv) = *h else {
                layers.push(None);
                continue;
            };
            let seen = self.rows_seen[l];
            if seen != expected {
                return Err(ScoreError::Incomplete(format!(
                    "layer {l}: observed {seen} query rows, expected {expected}; call observe_layer \
                     once per prefill chunk for every scored layer"
                )));
            }
            let values = match (self.kind, state) {
                (Baseline::SnapKv(c), Some(LayerState::Attention { acc, n_q_heads })) => {
                    snapkv::snapkv_layer(&acc, n_q_heads, n_kv, n_ctx, window.clone(), &c)
                }
                (Baseline::Tova, Some(LayerState::Attention { acc, n_q_heads })) => {
                    tova::tova_layer(&acc, n_q_heads, n_kv, n_ctx)
                }
                (_, Some(LayerState::Attention { acc, .. })) => acc,
                (_, Some(LayerState::Scores(v))) => v,
                (_, _) => {
                    return Err(ScoreError::Incomplete(format!(
                        "layer {l}: the baseline did not see the end of the context"
                    )))
                }
            };
            layers.push(Some(LayerScores {
                n_heads: n_kv,
                values,
            }));
        }
        ContextScores::from_layers(n_ctx, layers)
    }
}
