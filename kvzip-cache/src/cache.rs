//! The whole-model cache: layers plus the spans (system prompt, context) and the logical length.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::layer::{LayerCache, MIN_HEAD_SLACK};
use crate::{CacheError, KeepMask};

/// Source of layout generation ids: every structural change (compaction, front trim, a new or
/// loaded cache) takes a fresh one, so a [`CacheMark`] taken before it is refused.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

fn fresh_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// KV cache of a whole model: one [`LayerCache`] per attention layer plus metadata.
///
/// Token positions are absolute: `[0, n_sys)` is the system prompt (never evicted),
/// `[n_sys, n_sys + n_ctx)` the context (the only evictable span), and everything from
/// `n_sys + n_ctx` on (queries, answers, kept turns) is never evicted either.
/// `seen_tokens` is the uncompressed length: the RoPE position of the next token, which keeps
/// counting evicted rows.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    n_sys: usize,
    n_ctx: usize,
    seen_tokens: usize,
    generation: u64,
}

impl PartialEq for KvCache {
    /// Logical equality: same spans, `seen_tokens` and per-head live rows in every layer.
    fn eq(&self, other: &Self) -> bool {
        self.n_sys == other.n_sys
            && self.n_ctx == other.n_ctx
            && self.seen_tokens == other.seen_tokens
            && self.layers == other.layers
    }
}

/// A saved cache length to slice back to (see [`KvCache::mark`] / [`KvCache::rollback`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMark {
    lens: Vec<Vec<usize>>,
    seen_tokens: usize,
    generation: u64,
}

impl CacheMark {
    /// `seen_tokens` at the time of the mark.
    pub fn seen_tokens(&self) -> usize {
        self.seen_tokens
    }

    /// Per-layer, per-head live row counts at the time of the mark.
    pub fn lens(&self) -> &[Vec<usize>] {
        &self.lens
    }
}

/// Context-only KV usage (system prompt and post-context rows excluded), from
/// [`KvCache::context_usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContextUsage {
    /// Live (layer, head, position) rows with a position in the context span.
    pub pairs_kept: usize,
    /// `n_ctx * n_kv_heads` summed over the counted layers (the unpruned amount).
    pub pairs_full: usize,
    /// K+V bytes of the kept pairs: `2 * head_dim * elem_bytes` per pair.
    pub bytes_kept: usize,
    /// K+V bytes of the full context: `2 * head_dim * elem_bytes` per pair.
    pub bytes_full: usize,
}

impl KvCache {
    /// An empty cache with one layer per `(n_kv_heads, head_dim)` entry; spans are 0.
    pub fn new(layer_shapes: &[(usize, usize)]) -> Result<Self, CacheError> {
        let layers = layer_shapes
            .iter()
            .map(|&(h, d)| LayerCache::new(h, d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_layers(layers, 0, 0, 0))
    }

    /// An empty cache of `n_layers` identical layers.
    pub fn uniform(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self, CacheError> {
        Self::new(&vec![(n_kv_heads, head_dim); n_layers])
    }

    /// Assembles a cache from existing layers (used by loading and retain views).
    pub fn from_layers(
        layers: Vec<LayerCache>,
        n_sys: usize,
        n_ctx: usize,
        seen_tokens: usize,
    ) -> Self {
        Self {
            layers,
            n_sys,
            n_ctx,
            seen_tokens,
            generation: fresh_generation(),
        }
    }

    /// Declares the system-prompt length and context length (in tokens) for later pruning.
    pub fn set_spans(&mut self, n_sys: usize, n_ctx: usize) {
        self.n_sys = n_sys;
        self.n_ctx = n_ctx;
    }

    /// Protected system-prompt length in tokens (positions `[0, n_sys)`).
    pub fn n_sys(&self) -> usize {
        self.n_sys
    }

    /// Context length in tokens (positions `[n_sys, n_sys + n_ctx)`, the evictable span).
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The evictable span of absolute positions, `n_sys..n_sys + n_ctx`.
    pub fn context_span(&self) -> Range<usize> {
        self.n_sys..self.n_sys + self.n_ctx
    }

    /// Uncompressed length in tokens: the absolute (RoPE) position of the next token.
    pub fn seen_tokens(&self) -> usize {
        self.seen_tokens
    }

    /// Overrides the logical length (e.g. when an engine feeds positions itself).
    pub fn set_seen_tokens(&mut self, seen_tokens: usize) {
        self.seen_tokens = seen_tokens;
    }

    /// The positions `seen_tokens .. seen_tokens + t` for the next `t` tokens.
    pub fn next_positions(&self, t: usize) -> Vec<u32> {
        (self.seen_tokens..self.seen_tokens + t)
            .map(|p| p as u32)
            .collect()
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// All layers.
    pub fn layers(&self) -> &[LayerCache] {
        &self.layers
    }

    /// Layer `l`, or `None` if out of range.
    pub fn layer(&self, l: usize) -> Option<&LayerCache> {
        self.layers.get(l)
    }

    fn layer_checked(&self, l: usize) -> Result<&LayerCache, CacheError> {
        self.layers.get(l).ok_or_else(|| {
            CacheError::Shape(format!(
                "layer {l} out of range: cache has {} layers",
                self.layers.len()
            ))
        })
    }

    fn layer_checked_mut(&mut self, l: usize) -> Result<&mut LayerCache, CacheError> {
        let n = self.layers.len();
        self.layers.get_mut(l).ok_or_else(|| {
            CacheError::Shape(format!("layer {l} out of range: cache has {n} layers"))
        })
    }

    /// Borrowed varlen view of `layer` for the attention kernels (see [`LayerCache::segments`]).
    pub fn segments(&self, layer: usize) -> Result<kvzip_kernels::KvSegments<'_>, CacheError> {
        Ok(self.layer_checked(layer)?.segments())
    }

    /// Live K rows of (`layer`, head `h`): `[len, head_dim]` f32.
    pub fn head_keys(&self, layer: usize, h: usize) -> Result<&[f32], CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc, layer, h)?;
        Ok(lc.head_keys(h))
    }

    /// Live V rows of (`layer`, head `h`): `[len, head_dim]` f32.
    pub fn head_values(&self, layer: usize, h: usize) -> Result<&[f32], CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc, layer, h)?;
        Ok(lc.head_values(h))
    }

    /// Absolute positions of (`layer`, head `h`)'s live rows (`[len]`, increasing).
    pub fn head_positions(&self, layer: usize, h: usize) -> Result<&[u32], CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc, layer, h)?;
        Ok(lc.head_positions(h))
    }

    /// Appends `t = positions.len()` tokens to every head of `layer` (see
    /// [`LayerCache::append`]; `k_new`/`v_new` are `[t, n_kv_heads, head_dim]`), and raises
    /// `seen_tokens` to `max(positions) + 1` if that is larger.
    pub fn append(
        &mut self,
        layer: usize,
        k_new: &[f32],
        v_new: &[f32],
        positions: &[u32],
    ) -> Result<(), CacheError> {
        self.layer_checked_mut(layer)?
            .append(k_new, v_new, positions)
            .map_err(|e| match e {
                CacheError::Shape(m) => CacheError::Shape(format!("layer {layer}: {m}")),
                other => other,
            })?;
        if let Some(&max) = positions.iter().max() {
            self.seen_tokens = self.seen_tokens.max(max as usize + 1);
        }
        Ok(())
    }

    /// Makes sure every head of every layer has at least `rows` free rows.
    pub fn reserve(&mut self, rows: usize) {
        self.layers.iter_mut().for_each(|l| l.reserve(rows));
    }

    /// Records the current per-head lengths and `seen_tokens`, to [`rollback`](Self::rollback)
    /// to after a query that must not stay in the cache.
    pub fn mark(&self) -> CacheMark {
        CacheMark {
            lens: self.layers.iter().map(|l| l.lens().to_vec()).collect(),
            seen_tokens: self.seen_tokens,
            generation: self.generation,
        }
    }

    /// Restores exactly the state at `mark`: drops every row appended since (in every head of
    /// every layer) and resets `seen_tokens`. Rows kept by earlier turns stay.
    ///
    /// Errors if the cache was compacted, front-trimmed or replaced since the mark (its rows no
    /// longer line up) or if a head is shorter than at the mark.
    pub fn rollback(&mut self, mark: &CacheMark) -> Result<(), CacheError> {
        if mark.generation != self.generation || mark.lens.len() != self.layers.len() {
            return Err(CacheError::InvalidMark(
                "the cache was compacted, trimmed or replaced after the mark was taken; take a new \
                 mark() after such changes"
                    .into(),
            ));
        }
        for (l, (layer, lens)) in self.layers.iter().zip(&mark.lens).enumerate() {
            if lens.len() != layer.n_kv_heads() || lens.iter().zip(layer.lens()).any(|(m, c)| m > c)
            {
                return Err(CacheError::InvalidMark(format!(
                    "layer {l}: mark lengths {lens:?} do not fit current lengths {:?}",
                    layer.lens()
                )));
            }
        }
        for (layer, lens) in self.layers.iter_mut().zip(&mark.lens) {
            layer.truncate(lens)?;
        }
        self.seen_tokens = mark.seen_tokens;
        Ok(())
    }

    /// Drops the oldest rows of every head of `layer` so at most `keep_last` remain (sliding
    /// window layers). If rows were dropped, earlier marks become invalid: call it only when
    /// committing a turn. Returns the number of rows dropped over all heads.
    pub fn trim_front(&mut self, layer: usize, keep_last: usize) -> Result<usize, CacheError> {
        let dropped = self.layer_checked_mut(layer)?.trim_front(keep_last);
        if dropped > 0 {
            self.generation = fresh_generation();
        }
        Ok(dropped)
    }

    fn check_mask(&self, mask: &KeepMask) -> Result<(), CacheError> {
        if mask.n_layers() != self.layers.len() || mask.n_ctx() != self.n_ctx {
            return Err(CacheError::Shape(format!(
                "keep mask covers {} layers x n_ctx {}, cache has {} layers x n_ctx {}",
                mask.n_layers(),
                mask.n_ctx(),
                self.layers.len(),
                self.n_ctx
            )));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            if let Some(lk) = mask.layer(l) {
                if lk.n_heads != layer.n_kv_heads() {
                    return Err(CacheError::Shape(format!(
                        "keep mask layer {l} has {} heads, cache layer has {}",
                        lk.n_heads,
                        layer.n_kv_heads()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Layer `l` filtered by `mask`, or `None` if the mask keeps the whole layer.
    fn filtered_layer(&self, mask: &KeepMask, l: usize, slack: usize) -> Option<LayerCache> {
        let lk = mask.layer(l)?;
        let span = self.context_span();
        let (n_sys, n_ctx) = (self.n_sys, self.n_ctx);
        let keep = |h: usize, p: u32| {
            let p = p as usize;
            !span.contains(&p) || lk.bits[h * n_ctx + (p - n_sys)]
        };
        Some(self.layers[l].filtered(keep, slack))
    }

    /// Evict mode: physically removes the context rows whose keep bit is false, leaving
    /// [`MIN_HEAD_SLACK`] free rows per head. See [`compact_with_slack`](Self::compact_with_slack).
    pub fn compact(&mut self, mask: &KeepMask) -> Result<(), CacheError> {
        self.compact_with_slack(mask, MIN_HEAD_SLACK)
    }

    /// Evict mode with an explicit number of free rows per head after compaction.
    ///
    /// Rows are matched by absolute position: a row at position `p` in the context span is kept
    /// iff `mask.is_kept(layer, head, p - n_sys)`; system-prompt rows and rows after the context
    /// are always kept, layers without mask bits are untouched, and bits of rows already evicted
    /// by an earlier compaction are ignored. Invalidates earlier marks.
    pub fn compact_with_slack(&mut self, mask: &KeepMask, slack: usize) -> Result<(), CacheError> {
        self.check_mask(mask)?;
        for l in 0..self.layers.len() {
            if let Some(layer) = self.filtered_layer(mask, l, slack) {
                self.layers[l] = layer;
            }
        }
        self.generation = fresh_generation();
        Ok(())
    }

    /// Retain mode: a new compacted cache (as [`compact`](Self::compact) would produce) while
    /// `self` stays intact, so many ratios can be tried after one prefill + scoring.
    pub fn compacted_view(&self, mask: &KeepMask) -> Result<KvCache, CacheError> {
        self.check_mask(mask)?;
        let layers = (0..self.layers.len())
            .map(|l| {
                self.filtered_layer(mask, l, MIN_HEAD_SLACK)
                    .unwrap_or_else(|| self.layers[l].clone())
            })
            .collect();
        Ok(Self::from_layers(
            layers,
            self.n_sys,
            self.n_ctx,
            self.seen_tokens,
        ))
    }

    /// Allocated K+V bytes over all layers (f32 storage, free capacity included).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// K+V bytes of the live rows over all layers, at `elem_bytes` bytes per element
    /// (4 for this f32 storage, 2 for a bf16 device copy).
    pub fn kv_bytes_used(&self, elem_bytes: usize) -> usize {
        self.layers
            .iter()
            .map(|l| l.rows() * l.head_dim() * 2 * elem_bytes)
            .sum()
    }

    /// Context-only usage over the layers for which `include(layer)` is true (pass
    /// `|_| true` for all layers, or the evictable layers to exclude e.g. Gemma3 sliding
    /// layers whose context rows are trimmed by the window, not by pruning).
    pub fn context_usage(
        &self,
        elem_bytes: usize,
        include: impl Fn(usize) -> bool,
    ) -> ContextUsage {
        let span = self.context_span();
        let mut u = ContextUsage::default();
        for (_, layer) in self.layers.iter().enumerate().filter(|(l, _)| include(*l)) {
            let kept = layer.rows_in(span.clone());
            let full = self.n_ctx * layer.n_kv_heads();
            let per_pair = 2 * layer.head_dim() * elem_bytes;
            u.pairs_kept += kept;
            u.pairs_full += full;
            u.bytes_kept += kept * per_pair;
            u.bytes_full += full * per_pair;
        }
        u
    }

    /// Live (layer, head, position) rows inside the context span, over all layers.
    pub fn context_pairs_kept(&self) -> usize {
        self.context_usage(0, |_| true).pairs_kept
    }

    /// `n_ctx * n_kv_heads` summed over all layers: context pairs of the unpruned cache.
    pub fn context_pairs_full(&self) -> usize {
        self.context_usage(0, |_| true).pairs_full
    }
}

fn check_head(layer: &LayerCache, l: usize, h: usize) -> Result<(), CacheError> {
    if h >= layer.n_kv_heads() {
        return Err(CacheError::Shape(format!(
            "head {h} out of range: layer {l} has {} KV heads",
            layer.n_kv_heads()
        )));
    }
    Ok(())
}
