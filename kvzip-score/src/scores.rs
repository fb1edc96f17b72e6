//! Per-(layer, KV head, context position) scores and their chunk-by-chunk accumulation.

use std::ops::Range;

use kvzip_kernels::{
    AttentionShape, DType, Device, KvView, ScoreChunkShape, Tensor, View, ViewMut,
};

use crate::{score_chunk, Result, ScoreError, ScoreShape};

/// Scores of one scored layer: `n_heads` rows of `n_ctx` f32 values, head-major
/// (`values[h * n_ctx + pos]`, `pos` relative to the context start).
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
/// and is never evicted. Larger score = more important; KVzip scores are probabilities in
/// `[0, 1]`, baselines may use other ranges (only the order matters to [`crate::select()`]).
///
/// ```
/// use kvzip_score::{ContextScores, LayerScores};
///
/// // 2 layers (layer 1 not scored), 2 KV heads, 3 context positions.
/// let l0 = LayerScores { n_heads: 2, values: vec![0.9, 0.1, 0.5, /* head 1 */ 0.2, 0.8, 0.3] };
/// let scores = ContextScores::from_layers(3, vec![Some(l0), None])?;
/// assert_eq!(scores.head(0, 1), Some(&[0.2, 0.8, 0.3][..]));
/// assert_eq!(scores.total_pairs(), 6);
/// assert_eq!(scores.head_counts(), vec![Some(2), None]);
/// # Ok::<(), kvzip_score::ScoreError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ContextScores {
    n_ctx: usize,
    layers: Vec<Option<LayerScores>>,
}

impl ContextScores {
    /// All-zero scores over `n_ctx` context positions for `n_heads[l]` KV heads per layer
    /// (`None` = layer not scored).
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

    /// Builds scores over `n_ctx` context positions from per-layer values (`None` = not
    /// scored); errors with [`ScoreError::Shape`] unless every layer holds `n_heads * n_ctx`
    /// values.
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

    /// Mutable scores of layer `l` (`None` if not scored or out of range).
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

    /// Iterates `(layer index, scores)` over the scored layers, in model order.
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

/// Assembles [`ContextScores`] chunk by chunk, on any device.
///
/// Each scored layer keeps a `[n_heads, n_ctx]` f32 buffer on the accumulator's device. The
/// score ops ([`score_layer_chunk`](Self::score_layer_chunk) on host key slices,
/// [`score_layer_view`](Self::score_layer_view) on a cache layer of any device) take the max
/// of the stored value and the chunk's score (scores are probabilities, the buffers start at
/// 0); [`insert_chunk`](Self::insert_chunk) stores externally computed values. Every context
/// position must be covered before [`finish`](Self::finish).
///
/// Chunks may arrive in any order, layer by layer or chunk by chunk; where score-op chunks
/// overlap the max is kept (`insert_chunk` overwrites).
/// For the whole recipe see the crate docs and `examples/toy_engine.rs`.
#[derive(Debug)]
pub struct ScoreAccumulator {
    device: Device,
    n_ctx: usize,
    heads: Vec<Option<usize>>,
    layers: Vec<Option<Tensor>>,
    /// Row log-sum-exp scratch of the CUDA score kernel (grown on demand).
    row_lse: Option<Tensor>,
    filled: Vec<Option<Vec<bool>>>,
}

impl ScoreAccumulator {
    /// Host accumulator for `n_ctx` context positions and `n_heads[l]` KV heads per layer
    /// (`None` = layer not scored, e.g. sliding-window layers).
    pub fn new(n_ctx: usize, n_heads: &[Option<usize>]) -> Self {
        Self {
            device: Device::Cpu,
            n_ctx,
            heads: n_heads.to_vec(),
            layers: n_heads
                .iter()
                .map(|h| h.map(|n| Tensor::from_f32(vec![0.0; n * n_ctx])))
                .collect(),
            row_lse: None,
            filled: n_heads
                .iter()
                .map(|h| h.map(|_| vec![false; n_ctx]))
                .collect(),
        }
    }

    /// An accumulator whose buffers live on `device` (zeroed there), for
    /// [`score_layer_view`](Self::score_layer_view) over a cache on that device. Same shapes
    /// as [`new`](Self::new).
    pub fn on_device(device: &Device, n_ctx: usize, n_heads: &[Option<usize>]) -> Result<Self> {
        let layers = n_heads
            .iter()
            .map(|h| h.map(|n| device.zeros(DType::F32, n * n_ctx)).transpose())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self {
            device: device.clone(),
            n_ctx,
            heads: n_heads.to_vec(),
            layers,
            row_lse: None,
            filled: n_heads
                .iter()
                .map(|h| h.map(|_| vec![false; n_ctx]))
                .collect(),
        })
    }

    /// Number of context positions.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn layer_buf(&mut self, layer: usize) -> Result<(usize, &mut Tensor)> {
        let n_layers = self.layers.len();
        match (
            self.heads.get(layer).copied().flatten(),
            self.layers.get_mut(layer),
        ) {
            (Some(n), Some(Some(t))) => Ok((n, t)),
            _ => Err(ScoreError::Shape(format!(
                "layer {layer} is not scored (model has {n_layers} layers; \
                 scored layers are fixed when the accumulator is created)"
            ))),
        }
    }

    fn check_chunk(&self, chunk: &Range<usize>) -> Result<()> {
        if chunk.start > chunk.end || chunk.end > self.n_ctx {
            return Err(ScoreError::Shape(format!(
                "chunk {chunk:?} is outside the context 0..{}",
                self.n_ctx
            )));
        }
        Ok(())
    }

    fn mark_filled(&mut self, layer: usize, chunk: Range<usize>) {
        if let Some(Some(filled)) = self.filled.get_mut(layer) {
            filled[chunk].iter_mut().for_each(|f| *f = true);
        }
    }

    /// Stores externally computed chunk scores: `values` is `[n_heads, chunk.len()]`
    /// head-major, written (overwriting) to `score[layer][h][chunk]`; `chunk` is relative to
    /// the context start. Host accumulators only.
    ///
    /// ```
    /// use kvzip_score::ScoreAccumulator;
    ///
    /// let mut acc = ScoreAccumulator::new(4, &[Some(2)]);
    /// acc.insert_chunk(0, 0..2, &[0.1, 0.2, /* head 1 */ 0.3, 0.4])?;
    /// assert!(ScoreAccumulator::new(4, &[Some(2)]).finish().is_err()); // positions missing
    /// acc.insert_chunk(0, 2..4, &[0.5, 0.6, /* head 1 */ 0.7, 0.8])?;
    /// let scores = acc.finish()?;
    /// assert_eq!(scores.head(0, 1), Some(&[0.3, 0.4, 0.7, 0.8][..]));
    /// # Ok::<(), kvzip_score::ScoreError>(())
    /// ```
    pub fn insert_chunk(
        &mut self,
        layer: usize,
        chunk: Range<usize>,
        values: &[f32],
    ) -> Result<()> {
        self.check_chunk(&chunk)?;
        let n_ctx = self.n_ctx;
        let (n_heads, buf) = self.layer_buf(layer)?;
        let len = chunk.len();
        if values.len() != n_heads * len {
            return Err(ScoreError::Shape(format!(
                "chunk scores of layer {layer}: {} values, expected n_heads {n_heads} x chunk length {len}",
                values.len()
            )));
        }
        let dst = buf.host_f32_mut("score buffer")?;
        for h in 0..n_heads {
            dst[h * n_ctx + chunk.start..h * n_ctx + chunk.end]
                .copy_from_slice(&values[h * len..(h + 1) * len]);
        }
        self.mark_filled(layer, chunk);
        Ok(())
    }

    /// Runs the KVzip score op ([`score_chunk`]) for one layer and chunk on host key slices and
    /// keeps the max with the stored scores. Host accumulators only.
    ///
    /// `q` is `[shape.q_len, n_kv_heads * group, head_dim]` (rotated queries of the scoring
    /// input, query head `kv_head * group + g`); `head_keys(h)` returns every key row of KV
    /// head `h` of the unpruned cache after appending the scoring input (row r = position r,
    /// `head_dim` f32 each; the last `q_len` rows are the input's own keys); `chunk` is the
    /// scored range of context positions (relative to the context start, key rows
    /// `n_sys + chunk.start .. n_sys + chunk.end`). Scores are f32 probabilities; scale
    /// `1 / sqrt(head_dim)`.
    ///
    /// Errors: [`ScoreError::Shape`] if the layer is not scored, the head count differs from
    /// `shape.n_kv_heads`, the chunk is outside the context or a length does not fit.
    ///
    /// ```
    /// use kvzip_cache::KvCache;
    /// use kvzip_score::{ScoreAccumulator, ScoreShape};
    ///
    /// // One layer, 2 KV heads, group 1, head_dim 2; 1 system token + 3 context tokens.
    /// let (n_kv, d, n_sys, n_ctx) = (2, 2, 1, 3);
    /// let mut cache = KvCache::uniform(1, n_kv, d)?;
    /// let pos = cache.next_positions(n_sys + n_ctx);
    /// let keys = [0.0, 0.0, 0.0, 0.0, /* ctx */ 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, -1.0, 0.0, 0.0, -1.0];
    /// cache.append(0, &keys, &keys, &pos)?;
    ///
    /// // A 2-token scoring input: its K/V go into the cache for the call only.
    /// let mark = cache.mark();
    /// let q_len = 2;
    /// let input_kv = [0.0; 2 * 2 * 2];
    /// cache.append(0, &input_kv, &input_kv, &cache.next_positions(q_len))?;
    /// // Queries [q_len, n_kv_heads * group, head_dim]: both rows look for direction (4, 0).
    /// let q = [4.0, 0.0, 4.0, 0.0, 4.0, 0.0, 4.0, 0.0];
    /// let shape = ScoreShape { q_len, n_kv_heads: n_kv, group: 1, head_dim: d, n_sys };
    /// let mut acc = ScoreAccumulator::new(n_ctx, &[Some(n_kv)]);
    /// let head_keys: Vec<&[f32]> = vec![cache.head_keys(0, 0)?, cache.head_keys(0, 1)?];
    /// acc.score_layer_chunk(0, &shape, &q, |h| head_keys[h], 0..n_ctx)?;
    /// cache.rollback(&mark)?;
    ///
    /// let scores = acc.finish()?;
    /// let h0 = scores.head(0, 0).unwrap();
    /// assert!(h0[0] > h0[1] && h0[1] > h0[2]); // key (1, 0) matches best, (-1, 0) worst
    /// assert!(h0.iter().all(|p| (0.0..=1.0).contains(p)));
    /// # Ok::<(), kvzip_score::ScoreError>(())
    /// ```
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
        self.check_chunk(&chunk)?;
        let mut out = vec![0.0f32; shape.n_kv_heads * chunk.len()];
        score_chunk(shape, q, head_keys, chunk.clone(), &mut out)?;
        let n_ctx = self.n_ctx;
        let (n_heads, buf) = self.layer_buf(layer)?;
        if n_heads != shape.n_kv_heads {
            return Err(ScoreError::Shape(format!(
                "layer {layer} has {n_heads} KV heads, the score shape {}",
                shape.n_kv_heads
            )));
        }
        let dst = buf.host_f32_mut("score buffer")?;
        let len = chunk.len();
        for h in 0..n_heads {
            dst[h * n_ctx + chunk.start..h * n_ctx + chunk.end]
                .iter_mut()
                .zip(&out[h * len..(h + 1) * len])
                .for_each(|(a, &b)| *a = a.max(b));
        }
        self.mark_filled(layer, chunk);
        Ok(())
    }

    /// Runs the KVzip score op for one layer and chunk over a cache layer of the accumulator's
    /// device ([`Device::score_chunk`]: host code on the CPU, the fused kernel on CUDA).
    /// `q`: `[n_in, n_kv_heads * group, head_dim]`; `kv`: the unpruned layer after appending
    /// the scoring input; the chunk is `shape.chunk_start - shape.n_sys ..` `+ chunk_len`.
    pub fn score_layer_view(
        &mut self,
        layer: usize,
        q: &View<'_>,
        kv: &KvView<'_>,
        shape: &ScoreChunkShape,
    ) -> Result<()> {
        self.score_with(layer, shape, |device, shape, lse, buf| {
            device.score_chunk(q, kv, shape, lse, buf)
        })
    }

    /// [`Self::score_layer_view`] together with the layer's attention output: `out` =
    /// attention of `q` over `kv` per `attn` ([`Device::attention_scored`]: one pass on the
    /// CPU, the two kernels on CUDA).
    pub fn score_layer_attention(
        &mut self,
        layer: usize,
        q: &View<'_>,
        kv: &KvView<'_>,
        shape: &ScoreChunkShape,
        attn: &AttentionShape,
        out: &mut ViewMut<'_>,
    ) -> Result<()> {
        self.score_with(layer, shape, |device, shape, lse, buf| {
            device.attention_scored(q, kv, attn, shape, lse, buf, out)
        })
    }

    /// Checks the chunk and layer, then runs `op(device, shape, row_lse, layer scores)`.
    fn score_with(
        &mut self,
        layer: usize,
        shape: &ScoreChunkShape,
        op: impl FnOnce(
            &Device,
            &ScoreChunkShape,
            &mut ViewMut<'_>,
            &mut ViewMut<'_>,
        ) -> kvzip_kernels::Result<()>,
    ) -> Result<()> {
        let start = shape.chunk_start.saturating_sub(shape.n_sys);
        let chunk = start..start + shape.chunk_len;
        self.check_chunk(&chunk)?;
        let mut shape = *shape;
        shape.score_stride = self.n_ctx;
        let need = shape.lse_len();
        let device = self.device.clone();
        if self.row_lse.as_ref().is_none_or(|t| t.len() < need) && device.is_cuda() {
            self.row_lse = Some(device.alloc(DType::F32, need)?);
        }
        let mut empty = Tensor::from_f32(Vec::new());
        let lse = self.row_lse.as_mut().unwrap_or(&mut empty);
        let mut lse_view = lse.view_mut();
        let (n_heads, buf) = match (
            self.heads.get(layer).copied().flatten(),
            self.layers.get_mut(layer),
        ) {
            (Some(n), Some(Some(t))) => (n, t),
            _ => return Err(ScoreError::Shape(format!("layer {layer} is not scored"))),
        };
        if n_heads != shape.n_kv_heads {
            return Err(ScoreError::Shape(format!(
                "layer {layer} has {n_heads} KV heads, the score shape {}",
                shape.n_kv_heads
            )));
        }
        op(&device, &shape, &mut lse_view, &mut buf.view_mut())?;
        self.mark_filled(layer, chunk);
        Ok(())
    }

    /// Returns the scores (downloaded to the host); fails with [`ScoreError::Incomplete`] if
    /// some scored layer has positions no chunk covered.
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
        let mut layers = Vec::with_capacity(self.layers.len());
        for (h, t) in self.heads.iter().zip(&self.layers) {
            layers.push(match (h, t) {
                (Some(n), Some(t)) => Some(LayerScores {
                    n_heads: *n,
                    values: self.device.to_host_f32(&t.view())?,
                }),
                _ => None,
            });
        }
        ContextScores::from_layers(self.n_ctx, layers)
    }
}
