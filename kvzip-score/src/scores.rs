//! Per-(layer, KV head, context position) scores and their chunk-by-chunk accumulation.

use std::ops::Range;

use crate::recon::{score_chunk, ScoreShape};
use crate::{Result, ScoreError};

/// Scores of one scored layer: `n_heads` rows of `n_ctx` f32 values, head-major
/// (`values[h * n_ctx + pos]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerScores {
    /// Number of KV heads of the layer.
    pub n_heads: usize,
    /// `n_heads * n_ctx` scores, head-major.
    pub values: Vec<f32>,
}

/// Importance scores of every context KV pair: `[layer][kv_head][context position]`.
///
/// Positions run over the context span only (`0..n_ctx`, absolute positions
/// `n_sys..n_sys + n_ctx`). A `None` layer is not scored (e.g. Gemma3 sliding-window layers)
/// and is never evicted. Larger score = more important.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextScores {
    n_ctx: usize,
    layers: Vec<Option<LayerScores>>,
}

impl ContextScores {
    /// All-zero scores for `n_heads[l]` KV heads per layer (`None` = layer not scored).
    pub fn zeros(n_ctx: usize, n_heads: &[Option<usize>]) -> Self {
        let layers = n_heads
            .iter()
            .map(|h| {
                h.map(|n_heads| LayerScores {
                    n_heads,
                    values: vec![0.0; n_heads * n_ctx],
                })
            })
            .collect();
        Self { n_ctx, layers }
    }

    /// Builds scores from per-layer values; checks every layer holds `n_heads * n_ctx` values.
    pub fn from_layers(n_ctx: usize, layers: Vec<Option<LayerScores>>) -> Result<Self> {
        for (l, layer) in layers.iter().enumerate() {
            if let Some(layer) = layer {
                if layer.values.len() != layer.n_heads * n_ctx {
                    return Err(ScoreError::Shape(format!(
                        "scores of layer {l}: {} values, expected n_heads {} x n_ctx {n_ctx}",
                        layer.values.len(),
                        layer.n_heads
                    )));
                }
            }
        }
        Ok(Self { n_ctx, layers })
    }

    /// Number of context positions.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Number of layers (scored or not).
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// KV head count per layer (`None` = not scored).
    pub fn head_counts(&self) -> Vec<Option<usize>> {
        self.layers
            .iter()
            .map(|l| l.as_ref().map(|l| l.n_heads))
            .collect()
    }

    /// Scores of layer `l` (`None` if not scored or out of range).
    pub fn layer(&self, l: usize) -> Option<&LayerScores> {
        self.layers.get(l).and_then(|x| x.as_ref())
    }

    /// Mutable scores of layer `l`.
    pub fn layer_mut(&mut self, l: usize) -> Option<&mut LayerScores> {
        self.layers.get_mut(l).and_then(|x| x.as_mut())
    }

    /// The `n_ctx` scores of (`layer`, `head`), if that layer is scored and the head exists.
    pub fn head(&self, layer: usize, head: usize) -> Option<&[f32]> {
        let ls = self.layer(layer)?;
        (head < ls.n_heads).then(|| &ls.values[head * self.n_ctx..(head + 1) * self.n_ctx])
    }

    /// Total number of scored (evictable) context pairs `N = Σ_scored layers n_heads * n_ctx`.
    pub fn total_pairs(&self) -> usize {
        self.layers.iter().flatten().map(|l| l.values.len()).sum()
    }

    /// Iterates `(layer index, scores)` over the scored layers.
    pub fn scored_layers(&self) -> impl Iterator<Item = (usize, &LayerScores)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(l, s)| s.as_ref().map(|s| (l, s)))
    }

    /// Fails with [`ScoreError::InvalidScore`] naming the first NaN (layer, head, position).
    pub fn check_no_nan(&self) -> Result<()> {
        for (l, ls) in self.scored_layers() {
            if let Some(i) = ls.values.iter().position(|v| v.is_nan()) {
                return Err(ScoreError::InvalidScore(format!(
                    "NaN at layer {l}, head {}, context position {}",
                    i / self.n_ctx.max(1),
                    i % self.n_ctx.max(1)
                )));
            }
        }
        Ok(())
    }
}

/// Assembles [`ContextScores`] chunk by chunk: the engine calls it once per scored layer per
/// scoring chunk (chunks may arrive in any order, each position exactly once).
#[derive(Debug, Clone)]
pub struct ScoreAccumulator {
    scores: ContextScores,
    filled: Vec<Option<Vec<bool>>>,
}

impl ScoreAccumulator {
    /// Accumulator for `n_ctx` context positions and `n_heads[l]` KV heads per layer
    /// (`None` = layer not scored).
    pub fn new(n_ctx: usize, n_heads: &[Option<usize>]) -> Self {
        Self {
            scores: ContextScores::zeros(n_ctx, n_heads),
            filled: n_heads
                .iter()
                .map(|h| h.map(|_| vec![false; n_ctx]))
                .collect(),
        }
    }

    /// Number of context positions.
    pub fn n_ctx(&self) -> usize {
        self.scores.n_ctx
    }

    /// Stores externally computed chunk scores (e.g. from a GPU kernel): `values` is
    /// `[n_heads, chunk.len()]` head-major, written to `score[layer][h][chunk]`.
    pub fn insert_chunk(
        &mut self,
        layer: usize,
        chunk: Range<usize>,
        values: &[f32],
    ) -> Result<()> {
        let n_ctx = self.scores.n_ctx;
        if chunk.start > chunk.end || chunk.end > n_ctx {
            return Err(ScoreError::Shape(format!(
                "chunk {chunk:?} is outside the context 0..{n_ctx}"
            )));
        }
        let n_layers = self.scores.n_layers();
        let Some(ls) = self.scores.layer_mut(layer) else {
            return Err(ScoreError::Shape(format!(
                "layer {layer} is not scored (model has {n_layers} layers; \
                 scored layers are fixed when the accumulator is created)"
            )));
        };
        let len = chunk.len();
        if values.len() != ls.n_heads * len {
            return Err(ScoreError::Shape(format!(
                "chunk scores of layer {layer}: {} values, expected n_heads {} x chunk length {len}",
                values.len(),
                ls.n_heads
            )));
        }
        for h in 0..ls.n_heads {
            ls.values[h * n_ctx + chunk.start..h * n_ctx + chunk.end]
                .copy_from_slice(&values[h * len..(h + 1) * len]);
        }
        if let Some(Some(filled)) = self.filled.get_mut(layer) {
            filled[chunk].iter_mut().for_each(|f| *f = true);
        }
        Ok(())
    }

    /// Runs [`score_chunk`] for one layer and chunk and stores the result.
    ///
    /// `q` is `[shape.q_len, n_kv_heads * group, head_dim]` (rotated queries of the scoring
    /// input); `head_keys(h)` returns every key row of KV head `h` of the unpruned cache after
    /// appending the scoring input (row r = position r).
    pub fn score_layer_chunk<'k, F>(
        &mut self,
        layer: usize,
        shape: &ScoreShape,
        q: &[f32],
        head_keys: F,
        chunk: Range<usize>,
    ) -> Result<()>
    where
        F: Fn(usize) -> &'k [f32] + Sync,
    {
        let mut out = vec![0.0f32; shape.n_kv_heads * chunk.len()];
        score_chunk(shape, q, head_keys, chunk.clone(), &mut out)?;
        self.insert_chunk(layer, chunk, &out)
    }

    /// Returns the scores; fails if some scored layer has unfilled positions.
    pub fn finish(self) -> Result<ContextScores> {
        for (l, filled) in self.filled.iter().enumerate() {
            if let Some(filled) = filled {
                if let Some(p) = filled.iter().position(|f| !f) {
                    let missing = filled.iter().filter(|f| !**f).count();
                    return Err(ScoreError::Incomplete(format!(
                        "layer {l}: {missing} of {} context positions were never scored \
                         (first: {p}); every chunk must be scored for every scored layer",
                        filled.len()
                    )));
                }
            }
        }
        Ok(self.scores)
    }
}
