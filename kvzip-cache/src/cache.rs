//! The whole-model cache: layers, the spans (system prompt, context), the logical length, and
//! every layout operation, written once over a [`KvStorage`].

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use kvzip_kernels::GatherPlan;

use crate::layer::{packed_offsets, LayerCache, MIN_HEAD_SLACK};
use crate::storage::{AppendAt, DeviceKv, KvStorage};
use crate::{CacheError, KeepMask};

/// Source of layout generation ids: every structural change (compaction, front trim, a new or
/// loaded cache) takes a fresh one, so a [`CacheMark`] taken before it is refused.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

fn fresh_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// KV cache of a whole model: one [`LayerCache`] per attention layer plus metadata, over a
/// storage `S` (host memory or CUDA buffers by default, see [`DeviceKv`]).
///
/// Token positions are absolute: `[0, n_sys)` is the system prompt (never evicted),
/// `[n_sys, n_sys + n_ctx)` the context (the only evictable span), and everything from
/// `n_sys + n_ctx` on (queries, answers, kept turns) is never evicted either.
/// `seen_tokens` is the uncompressed length: the RoPE position of the next token, which keeps
/// counting evicted rows.
///
/// Layers may differ in geometry (`(n_kv_heads, head_dim)` per layer). Within a layer every
/// KV head is a segment of rows with its own length; see [`LayerCache`] and the crate docs for
/// the layout and for which method to use when.
///
/// ```
/// use kvzip_cache::KvCache;
///
/// // Host f32 cache: layer 0 has 2 KV heads of head_dim 8, layer 1 has 1 of head_dim 16.
/// let mut cache = KvCache::new(&[(2, 8), (1, 16)])?;
/// let pos = cache.next_positions(3); // [0, 1, 2]
/// cache.append(0, &[0.0; 3 * 2 * 8], &[0.0; 3 * 2 * 8], &pos)?;
/// cache.append(1, &[0.0; 3 * 16], &[0.0; 3 * 16], &pos)?;
/// assert_eq!(cache.lens(), vec![vec![3, 3], vec![3]]);
/// assert_eq!(cache.seen_tokens(), 3);
/// assert_eq!(cache.kv_bytes_live(), (3 * 2 * 8 + 3 * 16) * 2 * 4); // K+V, f32
/// # Ok::<(), kvzip_cache::CacheError>(())
/// ```
pub struct KvCache<S: KvStorage = DeviceKv> {
    pub(crate) storage: S,
    pub(crate) meta: S::Meta,
    pub(crate) layers: Vec<LayerCache<S::Layer>>,
    n_sys: usize,
    n_ctx: usize,
    seen_tokens: usize,
    generation: u64,
    /// Tokens of the step begun by [`KvCache::begin_step`] (0 when none).
    step: usize,
    /// Head groups `(first head, heads)` of a step begun by [`KvCache::begin_step_heads`], in
    /// input order, and its tokens per group.
    partial: Option<(Vec<(usize, usize)>, usize)>,
}

impl<S: KvStorage> std::fmt::Debug for KvCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("n_layers", &self.layers.len())
            .field("n_sys", &self.n_sys)
            .field("n_ctx", &self.n_ctx)
            .field("seen_tokens", &self.seen_tokens)
            .field(
                "lens",
                &self
                    .layers
                    .iter()
                    .map(|l| l.lens.clone())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A saved cache length to slice back to (see [`KvCache::mark`] / [`KvCache::rollback`]):
/// every head's live row count and `seen_tokens` at the time of the mark, plus the layout
/// generation, so that a mark taken before a compaction or front trim is refused.
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
/// [`KvCache::context_usage`]. Pairs count (layer, KV head, position) rows; bytes count K+V.
/// `pairs_kept as f64 / pairs_full as f64` is the real kept ratio of the context.
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

fn layer_err(l: usize) -> impl FnOnce(CacheError) -> CacheError {
    move |e| match e {
        CacheError::Shape(m) => CacheError::Shape(format!("layer {l}: {m}")),
        other => other,
    }
}

impl<S: KvStorage + Clone> KvCache<S> {
    /// An empty cache in `storage` with one layer per `(n_kv_heads, head_dim)` entry and
    /// `rows_per_head` rows reserved in every head (0: grow on demand); spans are 0.
    ///
    /// Errors with [`CacheError::Shape`] if a layer has 0 heads or `head_dim` 0, and with the
    /// storage's error if the allocation fails.
    pub fn with_capacity_in(
        storage: S,
        layer_shapes: &[(usize, usize)],
        rows_per_head: usize,
    ) -> Result<Self, CacheError> {
        let mut layers = Vec::with_capacity(layer_shapes.len());
        for &(h, d) in layer_shapes {
            if h == 0 || d == 0 {
                return Err(CacheError::Shape(format!(
                    "layer geometry n_kv_heads {h} x head_dim {d}: both must be > 0"
                )));
            }
            let rows = h.checked_mul(rows_per_head).ok_or_else(|| {
                CacheError::Shape(format!("{h} heads x {rows_per_head} rows overflow usize"))
            })?;
            let caps = vec![rows_per_head; h];
            layers.push(LayerCache {
                n_kv_heads: h,
                head_dim: d,
                pos: vec![0; rows],
                offsets: packed_offsets(&caps),
                caps,
                lens: vec![0; h],
                relayouts: 0,
                data: storage.alloc_layer(rows, d)?,
            });
        }
        Self::from_parts(storage, layers, 0, 0, 0)
    }

    /// An empty cache in `storage` (no capacity reserved), one layer per
    /// `(n_kv_heads, head_dim)` entry. `KvCache::new` is this with host storage.
    pub fn new_in(storage: S, layer_shapes: &[(usize, usize)]) -> Result<Self, CacheError> {
        Self::with_capacity_in(storage, layer_shapes, 0)
    }

    /// Assembles a cache from layers (loading, retain views) and uploads its layout.
    pub(crate) fn from_parts(
        storage: S,
        layers: Vec<LayerCache<S::Layer>>,
        n_sys: usize,
        n_ctx: usize,
        seen_tokens: usize,
    ) -> Result<Self, CacheError> {
        let heads: Vec<usize> = layers.iter().map(|l| l.n_kv_heads).collect();
        let meta = storage.new_meta(&heads)?;
        let mut cache = Self {
            storage,
            meta,
            layers,
            n_sys,
            n_ctx,
            seen_tokens,
            generation: fresh_generation(),
            step: 0,
            partial: None,
        };
        cache.sync(0, true)?;
        Ok(cache)
    }

    /// A deep copy in the same storage (live rows and positions; fresh capacity).
    pub fn try_clone(&self) -> Result<Self, CacheError> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(self.copied_layer(l, |_, _| true, MIN_HEAD_SLACK)?);
        }
        self.sibling(layers)
    }

    /// A new cache in the same storage with `layers` and this cache's spans and length.
    fn sibling(&self, layers: Vec<LayerCache<S::Layer>>) -> Result<Self, CacheError> {
        Self::from_parts(
            self.storage.clone(),
            layers,
            self.n_sys,
            self.n_ctx,
            self.seen_tokens,
        )
    }

    /// The storage that owns the rows (e.g. [`DeviceKv`]: the device and element type).
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The storage's device-side copies of the layout (offsets and lengths), synced after
    /// every change; `kvzip_kernels::KvLayoutMirror` for [`DeviceKv`].
    pub fn meta(&self) -> &S::Meta {
        &self.meta
    }

    /// Declares the system-prompt length and context length (in tokens) for later pruning:
    /// positions `[0, n_sys)` are the protected system prompt and `[n_sys, n_sys + n_ctx)` the
    /// evictable context that [`KeepMask`]s index. Call it after the prefill, before
    /// [`compact`](Self::compact), [`compacted_view`](Self::compacted_view) or
    /// [`context_usage`](Self::context_usage).
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

    /// Overrides the logical length in tokens (e.g. when an engine feeds positions itself).
    pub fn set_seen_tokens(&mut self, seen_tokens: usize) {
        self.seen_tokens = seen_tokens;
    }

    /// The absolute positions `seen_tokens .. seen_tokens + t` of the next `t` tokens (what
    /// [`append`](Self::append) and RoPE need); does not change the cache.
    pub fn next_positions(&self, t: usize) -> Vec<u32> {
        (self.seen_tokens..self.seen_tokens + t)
            .map(|p| p as u32)
            .collect()
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// All layers, in model order (`[n_layers]`).
    pub fn layers(&self) -> &[LayerCache<S::Layer>] {
        &self.layers
    }

    /// Layer `l`, or `None` if out of range.
    pub fn layer(&self, l: usize) -> Option<&LayerCache<S::Layer>> {
        self.layers.get(l)
    }

    pub(crate) fn layer_checked(&self, l: usize) -> Result<&LayerCache<S::Layer>, CacheError> {
        self.layers.get(l).ok_or_else(|| {
            CacheError::Shape(format!(
                "layer {l} out of range: cache has {} layers",
                self.layers.len()
            ))
        })
    }

    /// The buffers of layer `l` for direct writes (e.g. benchmark data); the layout does not
    /// change. `None` if out of range.
    pub fn layer_mut_data(&mut self, l: usize) -> Option<&mut S::Layer> {
        self.layers.get_mut(l).map(|layer| &mut layer.data)
    }

    /// Absolute positions of (`layer`, head `h`)'s live rows (`[len]`, increasing).
    pub fn head_positions(&self, layer: usize, h: usize) -> Result<&[u32], CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc.n_kv_heads, layer, h)?;
        Ok(lc.head_positions(h))
    }

    /// Per-layer, per-head live lengths in rows (`[n_layers][n_kv_heads]`, a copy).
    pub fn lens(&self) -> Vec<Vec<usize>> {
        self.layers.iter().map(|l| l.lens.clone()).collect()
    }

    /// Uploads the layout to the storage's device copies (`appended` rows of the current step;
    /// offsets too when `offsets_changed`).
    fn sync(&mut self, appended: usize, offsets_changed: bool) -> Result<(), CacheError> {
        let lens: Vec<usize> = self
            .layers
            .iter()
            .flat_map(|l| l.lens.iter().copied())
            .collect();
        let offsets: Option<Vec<usize>> = offsets_changed.then(|| {
            self.layers
                .iter()
                .flat_map(|l| l.offsets.iter().copied())
                .collect()
        });
        self.storage
            .sync_meta(&mut self.meta, &lens, appended, offsets.as_deref())
    }

    /// Moves layer `l` into fresh buffers with capacities `caps` (each >= its length).
    fn relayout(&mut self, l: usize, caps: &[usize]) -> Result<(), CacheError> {
        let layer = &self.layers[l];
        let (plan, offsets) = layer.relayout_plan(caps)?;
        let total: usize = caps.iter().sum();
        let mut data = self.storage.alloc_layer(total, layer.head_dim)?;
        self.storage
            .gather(&layer.data, &mut data, &plan, layer.head_dim)?;
        let pos = layer.gathered_positions(&plan, &offsets, caps);
        let layer = &mut self.layers[l];
        layer.data = data;
        layer.pos = pos;
        layer.offsets = offsets;
        layer.caps = caps.to_vec();
        Ok(())
    }

    /// Makes room for `t` more rows in every head of layer `l`; returns whether it re-laid out.
    ///
    /// Growth policy: if some head lacks room the layer is re-laid out once, giving every head
    /// `lens[h] + t` rows plus a uniform slack of `max(ceil(total_rows_after / n_kv_heads),
    /// MIN_HEAD_SLACK)` rows. Since every append adds the same `t` rows to each head, at least
    /// `total_rows_after` rows are appended before the next re-layout, which copies about that
    /// many rows: O(1) copies per appended row, and the allocation is at most about twice the
    /// live rows.
    fn grow_for(&mut self, l: usize, t: usize) -> Result<bool, CacheError> {
        let layer = &self.layers[l];
        let nh = layer.n_kv_heads;
        if (0..nh).all(|h| layer.lens[h] + t <= layer.caps[h]) {
            return Ok(false);
        }
        let total_after = layer.rows() + nh * t;
        let slack = total_after.div_ceil(nh).max(MIN_HEAD_SLACK);
        let caps: Vec<usize> = layer.lens.iter().map(|&len| len + t + slack).collect();
        self.relayout(l, &caps)?;
        self.layers[l].relayouts += 1;
        Ok(true)
    }

    /// Makes sure every head of every layer has at least `rows` free rows, so that the next
    /// appends of up to `rows` tokens copy nothing (e.g. before a decode loop of known
    /// length). Re-lays out only the layers that lack room.
    pub fn reserve(&mut self, rows: usize) -> Result<(), CacheError> {
        let mut changed = false;
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            if (0..layer.n_kv_heads).all(|h| layer.lens[h] + rows <= layer.caps[h]) {
                continue;
            }
            let caps: Vec<usize> = (0..layer.n_kv_heads)
                .map(|h| layer.caps[h].max(layer.lens[h] + rows))
                .collect();
            self.relayout(l, &caps)?;
            changed = true;
        }
        if changed {
            self.sync(0, true)?;
        }
        Ok(())
    }

    /// Starts a forward step of `t` tokens at positions `seen_tokens..seen_tokens + t`: makes
    /// room in every layer, extends every head by `t` rows (data written per layer with
    /// [`write_step`](Self::write_step)), advances `seen_tokens`, and syncs the storage's
    /// device layout once for all layers.
    ///
    /// This is the append path for engines that run every layer per step (one layout sync per
    /// step instead of one per layer; what matters on CUDA). Every layer must then be written
    /// with `write_step` before its rows are read.
    ///
    /// ```
    /// use kvzip_cache::KvCache;
    /// use kvzip_kernels::View;
    ///
    /// let (n_layers, n_kv, d, t) = (3, 2, 4, 5);
    /// let mut cache = KvCache::uniform(n_layers, n_kv, d)?;
    /// cache.begin_step(t)?; // positions 0..5 in every layer
    /// for l in 0..n_layers {
    ///     // ... the layer's forward produces k, v: [t, n_kv_heads, head_dim] ...
    ///     let k = vec![l as f32; t * n_kv * d];
    ///     let v = vec![1.0; t * n_kv * d];
    ///     cache.write_step(l, View::f32(&k), View::f32(&v))?;
    /// }
    /// assert_eq!(cache.seen_tokens(), 5);
    /// assert_eq!(cache.head_keys(2, 1)?, &[2.0; 5 * 4][..]);
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
    pub fn begin_step(&mut self, t: usize) -> Result<(), CacheError> {
        let mut relaid = false;
        for l in 0..self.layers.len() {
            relaid |= self.grow_for(l, t)?;
        }
        let first = self.seen_tokens as u32;
        for layer in &mut self.layers {
            for h in 0..layer.n_kv_heads {
                let base = layer.offsets[h] + layer.lens[h];
                for i in 0..t {
                    layer.pos[base + i] = first + i as u32;
                }
                layer.lens[h] += t;
            }
        }
        self.seen_tokens += t;
        self.step = t;
        self.sync(t, relaid)
    }

    /// Writes the K/V rows of the step begun by [`begin_step`](Self::begin_step) into layer `l`
    /// (`k`, `v`: `[t, n_kv_heads, head_dim]` token-major, e.g. the projections after RoPE; for
    /// [`DeviceKv`] a `kvzip_kernels::View` on the cache's device). Errors if no step was begun
    /// or the shapes do not match.
    pub fn write_step(
        &mut self,
        l: usize,
        k: S::Rows<'_>,
        v: S::Rows<'_>,
    ) -> Result<(), CacheError> {
        let t = self.step;
        if t == 0 {
            return Err(CacheError::Shape(
                "write_step without a begun step (call begin_step first)".into(),
            ));
        }
        let layer = self
            .layers
            .get_mut(l)
            .ok_or_else(|| CacheError::Shape(format!("layer {l} out of range")))?;
        let lens_before: Vec<usize> = layer.lens.iter().map(|&x| x - t).collect();
        let at = AppendAt {
            offsets: &layer.offsets,
            lens_before: &lens_before,
            caps: &layer.caps,
            t,
            head_dim: layer.head_dim,
        };
        self.storage
            .write_step(&self.meta, l, &mut layer.data, at, k, v)
            .map_err(layer_err(l))
    }

    /// Starts a step that appends `t` tokens to some heads only: for each group `(first head,
    /// heads, first position)`, heads `first .. first + heads` of every layer get `t` rows at
    /// positions `first position ..`. The step's input rows are ordered group by group, `t`
    /// rows each, `heads` K/V rows per token (`[groups * t, heads, head_dim]`, all groups of
    /// the same width); write them per layer with [`write_step_heads`](Self::write_step_heads).
    /// Used to keep many sequences (each a group of heads, e.g. the private suffixes of
    /// requests decoding together) in one cache. `seen_tokens` is not changed.
    pub fn begin_step_heads(
        &mut self,
        groups: &[(usize, usize, u32)],
        t: usize,
    ) -> Result<(), CacheError> {
        let width = groups.first().map_or(0, |g| g.1);
        for (l, layer) in self.layers.iter().enumerate() {
            for &(first, n, _) in groups {
                if n != width || first + n > layer.n_kv_heads {
                    return Err(CacheError::Shape(format!(
                        "layer {l}: head group {first}..{} (width {n}, others {width}) is outside \
                         its {} heads",
                        first + n,
                        layer.n_kv_heads
                    )));
                }
            }
        }
        let mut relaid = false;
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            let short = groups.iter().any(|&(first, n, _)| {
                (first..first + n).any(|h| layer.lens[h] + t > layer.caps[h])
            });
            if short {
                let rows: usize = layer.rows() + groups.len() * width * t;
                let slack = rows.div_ceil(layer.n_kv_heads).max(MIN_HEAD_SLACK);
                let mut caps = layer.caps.clone();
                for &(first, n, _) in groups {
                    for (cap, len) in caps[first..first + n].iter_mut().zip(&layer.lens[first..]) {
                        *cap = (*cap).max(len + t + slack);
                    }
                }
                self.relayout(l, &caps)?;
                self.layers[l].relayouts += 1;
                relaid = true;
            }
        }
        for layer in &mut self.layers {
            for &(first, n, pos0) in groups {
                for h in first..first + n {
                    let base = layer.offsets[h] + layer.lens[h];
                    for i in 0..t {
                        layer.pos[base + i] = pos0 + i as u32;
                    }
                    layer.lens[h] += t;
                }
            }
        }
        self.step = 0;
        self.partial = Some((groups.iter().map(|g| (g.0, g.1)).collect(), t));
        self.sync(0, relaid)
    }

    /// Writes layer `l`'s rows of the step begun by [`begin_step_heads`](Self::begin_step_heads)
    /// (`k`, `v`: `[groups * t, heads, head_dim]`).
    pub fn write_step_heads(
        &mut self,
        l: usize,
        k: S::Rows<'_>,
        v: S::Rows<'_>,
    ) -> Result<(), CacheError> {
        let Some((groups, t)) = self.partial.as_ref() else {
            return Err(CacheError::Shape(
                "write_step_heads without begin_step_heads".into(),
            ));
        };
        let t = *t;
        let layer = self
            .layers
            .get_mut(l)
            .ok_or_else(|| CacheError::Shape(format!("layer {l} out of range")))?;
        let mut rows = Vec::new();
        let mut dst = Vec::new();
        for (gi, &(first, n)) in groups.iter().enumerate() {
            for j in 0..n {
                let h = first + j;
                rows.push((0..t).map(|i| (gi * t + i) * n + j).collect::<Vec<_>>());
                dst.push(layer.offsets[h] + layer.lens[h] - t);
            }
        }
        let plan = GatherPlan::from_rows(&rows, &dst)?;
        self.storage
            .scatter_step(&mut layer.data, &plan, k, v, layer.head_dim)
            .map_err(layer_err(l))
    }

    /// Empties heads `first .. first + n` of every layer (their capacity stays): a finished
    /// sequence hands its heads to the next one.
    pub fn clear_heads(&mut self, first: usize, n: usize) -> Result<(), CacheError> {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            if first + n > layer.n_kv_heads {
                return Err(CacheError::Shape(format!(
                    "layer {l}: heads {first}..{} outside its {} heads",
                    first + n,
                    layer.n_kv_heads
                )));
            }
            layer.lens[first..first + n].iter_mut().for_each(|x| *x = 0);
        }
        self.partial = None;
        self.sync(0, false)
    }

    /// Appends `t = positions.len()` tokens to every head of `layer` alone (`k_new` /
    /// `v_new`: `[t, n_kv_heads, head_dim]` token-major rows in the storage's row type, for
    /// [`DeviceKv`] a `kvzip_kernels::View` on the cache's device), at the absolute
    /// `positions`, and raises `seen_tokens` to `max(positions) + 1` if that is larger. Host
    /// engines with f32 slices use [`KvCache::append`]. Engines stepping all layers together
    /// use [`begin_step`](Self::begin_step) + [`write_step`](Self::write_step), which sync the
    /// device layout once per step.
    ///
    /// Cost is O(t) rows amortized. Growth policy: if some head lacks room the layer is
    /// re-laid out once, giving every head `lens[h] + t` rows plus a uniform slack of
    /// `max(ceil(total_rows_after / n_kv_heads),` [`MIN_HEAD_SLACK`]`)` rows, so the
    /// allocation is at most about twice the live rows. On error the cache is unchanged.
    pub fn append_rows(
        &mut self,
        layer: usize,
        k_new: S::Rows<'_>,
        v_new: S::Rows<'_>,
        positions: &[u32],
    ) -> Result<(), CacheError> {
        self.layer_checked(layer)?;
        let t = positions.len();
        if t == 0 {
            return Ok(());
        }
        let relaid = self.grow_for(layer, t)?;
        let lc = &mut self.layers[layer];
        for h in 0..lc.n_kv_heads {
            let base = lc.offsets[h] + lc.lens[h];
            lc.pos[base..base + t].copy_from_slice(positions);
            lc.lens[h] += t;
        }
        self.sync(t, relaid)?;
        self.step = t;
        let res = self.write_step(layer, k_new, v_new);
        self.step = 0;
        if res.is_err() {
            // Undo the length change so the cache stays consistent.
            let lc = &mut self.layers[layer];
            lc.lens.iter_mut().for_each(|x| *x -= t);
            self.sync(0, false)?;
            return res;
        }
        if let Some(&max) = positions.iter().max() {
            self.seen_tokens = self.seen_tokens.max(max as usize + 1);
        }
        Ok(())
    }

    /// Records the current per-head lengths and `seen_tokens`, to [`rollback`](Self::rollback)
    /// to after a query that must not stay in the cache (`update_cache = false`). Cheap: one
    /// length per (layer, head).
    ///
    /// ```
    /// use kvzip_cache::KvCache;
    ///
    /// let mut cache = KvCache::uniform(1, 2, 4)?;
    /// let ctx = cache.next_positions(10);
    /// cache.append(0, &[1.0; 10 * 2 * 4], &[1.0; 10 * 2 * 4], &ctx)?;
    ///
    /// // Turn 1 is kept (update_cache = true): append and do not roll back.
    /// let turn = cache.next_positions(3);
    /// cache.append(0, &[2.0; 3 * 2 * 4], &[2.0; 3 * 2 * 4], &turn)?;
    ///
    /// // Turn 2 is a throw-away query: mark, append query + answer, roll back.
    /// let before = cache.try_clone()?;
    /// let mark = cache.mark();
    /// let q = cache.next_positions(4);
    /// cache.append(0, &[3.0; 4 * 2 * 4], &[3.0; 4 * 2 * 4], &q)?;
    /// assert_eq!(cache.seen_tokens(), 17);
    /// cache.rollback(&mark)?;
    /// assert!(cache == before); // exactly the state at the mark, turn 1 included
    /// assert_eq!((cache.seen_tokens(), cache.lens()[0][1]), (13, 13));
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
    pub fn mark(&self) -> CacheMark {
        CacheMark {
            lens: self.layers.iter().map(|l| l.lens.clone()).collect(),
            seen_tokens: self.seen_tokens,
            generation: self.generation,
        }
    }

    /// Restores exactly the state at `mark`: drops every row appended since (in every head of
    /// every layer) and resets `seen_tokens`. Rows kept by earlier turns stay. Growth
    /// re-layouts keep each head's rows in order, so a mark survives them.
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
            if lens.len() != layer.n_kv_heads || lens.iter().zip(&layer.lens).any(|(m, c)| m > c) {
                return Err(CacheError::InvalidMark(format!(
                    "layer {l}: mark lengths {lens:?} do not fit current lengths {:?}",
                    layer.lens
                )));
            }
        }
        for (layer, lens) in self.layers.iter_mut().zip(&mark.lens) {
            layer.truncate(lens)?;
        }
        self.seen_tokens = mark.seen_tokens;
        self.step = 0;
        self.sync(0, false)
    }

    /// Benchmarks: sets every head's live length (`lens[layer][head]` rows, each within
    /// capacity, e.g. after [`with_capacity_in`](Self::with_capacity_in); positions become
    /// `0..len`) and `seen_tokens`, without touching the data (rows hold whatever the
    /// allocation held). Not for inference.
    pub fn set_head_lens(
        &mut self,
        lens: &[Vec<usize>],
        seen_tokens: usize,
    ) -> Result<(), CacheError> {
        if lens.len() != self.layers.len() {
            return Err(CacheError::Shape(format!(
                "set_head_lens: {} layers given, cache has {}",
                lens.len(),
                self.layers.len()
            )));
        }
        for (l, (layer, want)) in self.layers.iter().zip(lens).enumerate() {
            if want.len() != layer.n_kv_heads || want.iter().zip(&layer.caps).any(|(w, c)| w > c) {
                return Err(CacheError::Shape(format!(
                    "set_head_lens: layer {l} lengths {want:?} exceed the capacities {:?}",
                    layer.caps
                )));
            }
        }
        for (layer, want) in self.layers.iter_mut().zip(lens) {
            for (&o, &len) in layer.offsets.iter().zip(want) {
                for (i, p) in layer.pos[o..o + len].iter_mut().enumerate() {
                    *p = i as u32;
                }
            }
            layer.lens.clone_from(want);
        }
        self.seen_tokens = seen_tokens;
        self.step = 0;
        self.sync(0, false)
    }

    /// A copy of `layer` holding only the rows for which `keep(head, position)` holds, each head
    /// with `slack` free rows.
    fn copied_layer(
        &self,
        layer: &LayerCache<S::Layer>,
        keep: impl Fn(usize, u32) -> bool,
        slack: usize,
    ) -> Result<LayerCache<S::Layer>, CacheError> {
        let (plan, lens, caps) = layer.filter_plan(keep, slack)?;
        let offsets = packed_offsets(&caps);
        let total: usize = caps.iter().sum();
        let mut data = self.storage.alloc_layer(total, layer.head_dim)?;
        self.storage
            .gather(&layer.data, &mut data, &plan, layer.head_dim)?;
        let pos = layer.gathered_positions(&plan, &offsets, &caps);
        Ok(LayerCache {
            n_kv_heads: layer.n_kv_heads,
            head_dim: layer.head_dim,
            pos,
            offsets,
            caps,
            lens,
            relayouts: 0,
            data,
        })
    }

    /// Drops the oldest rows of every head of `layer` so at most `keep_last` rows remain
    /// (sliding-window layers), moving the rest into buffers of `len +` [`MIN_HEAD_SLACK`] rows
    /// per head so the memory is really freed (also when no row is dropped but the layer holds
    /// more than twice the slack of free capacity, e.g. after scoring passes grew it). If rows
    /// were dropped, earlier marks become invalid: call it only when committing a turn. Returns
    /// the number of rows dropped over all heads.
    ///
    /// ```
    /// use kvzip_cache::KvCache;
    ///
    /// let mut cache = KvCache::uniform(2, 1, 4)?;
    /// let pos = cache.next_positions(6);
    /// for l in 0..2 {
    ///     cache.append(l, &[0.0; 6 * 4], &[0.0; 6 * 4], &pos)?;
    /// }
    /// assert_eq!(cache.trim_front(1, 4)?, 2); // layer 1 has a window of 4 tokens
    /// assert_eq!(cache.head_positions(1, 0)?, &[2, 3, 4, 5]);
    /// assert_eq!(cache.seen_tokens(), 6);
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
    pub fn trim_front(&mut self, layer: usize, keep_last: usize) -> Result<usize, CacheError> {
        let lc = self.layer_checked(layer)?;
        let dropped: usize = lc.lens.iter().map(|&l| l.saturating_sub(keep_last)).sum();
        let oversized =
            (0..lc.n_kv_heads).any(|h| lc.caps[h] > lc.lens[h].min(keep_last) + 2 * MIN_HEAD_SLACK);
        if dropped == 0 && !oversized {
            return Ok(0);
        }
        let firsts: Vec<u32> = (0..lc.n_kv_heads)
            .map(|h| {
                let pos = lc.head_positions(h);
                pos.get(pos.len().saturating_sub(keep_last))
                    .copied()
                    .unwrap_or(u32::MAX)
            })
            .collect();
        let new = self.copied_layer(lc, |h, p| p >= firsts[h], MIN_HEAD_SLACK)?;
        self.layers[layer] = new;
        if dropped > 0 {
            self.generation = fresh_generation();
        }
        self.sync(0, true)?;
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
                if lk.n_heads != layer.n_kv_heads {
                    return Err(CacheError::Shape(format!(
                        "keep mask layer {l} has {} heads, cache layer has {}",
                        lk.n_heads, layer.n_kv_heads
                    )));
                }
            }
        }
        Ok(())
    }

    /// Layer `l` filtered by `mask`, or `None` if the mask keeps the whole layer.
    fn filtered_layer(
        &self,
        mask: &KeepMask,
        l: usize,
        slack: usize,
    ) -> Result<Option<LayerCache<S::Layer>>, CacheError> {
        let Some(lk) = mask.layer(l) else {
            return Ok(None);
        };
        let span = self.context_span();
        let (n_sys, n_ctx) = (self.n_sys, self.n_ctx);
        let keep = |h: usize, p: u32| {
            let p = p as usize;
            !span.contains(&p) || lk.bits[h * n_ctx + (p - n_sys)]
        };
        self.copied_layer(&self.layers[l], keep, slack).map(Some)
    }

    /// Evict mode: physically removes the context rows whose keep bit is false, leaving
    /// [`MIN_HEAD_SLACK`] free rows per head, and frees the old buffers. See
    /// [`compact_with_slack`](Self::compact_with_slack) for the exact rule. `seen_tokens` is
    /// unchanged (new tokens keep their RoPE positions); earlier marks become invalid.
    ///
    /// ```
    /// use kvzip_cache::{KeepMask, KvCache, LayerKeep};
    ///
    /// let (n_sys, n_ctx, n_kv, d) = (1, 4, 2, 2);
    /// let mut cache = KvCache::uniform(1, n_kv, d)?;
    /// let pos = cache.next_positions(n_sys + n_ctx + 1); // sys, context, one query token
    /// cache.append(0, &[0.0; 6 * 2 * 2], &[0.0; 6 * 2 * 2], &pos)?;
    /// cache.set_spans(n_sys, n_ctx);
    ///
    /// // Head 0 keeps context positions 0 and 3, head 1 keeps only 1.
    /// let bits = vec![true, false, false, true, /* head 1 */ false, true, false, false];
    /// let mask = KeepMask::from_layers(n_ctx, vec![Some(LayerKeep { n_heads: n_kv, bits })])?;
    /// cache.compact(&mask)?;
    /// // System prompt (0) and the token after the context (5) always stay.
    /// assert_eq!(cache.head_positions(0, 0)?, &[0, 1, 4, 5]);
    /// assert_eq!(cache.head_positions(0, 1)?, &[0, 2, 5]);
    /// assert_eq!(cache.context_pairs_kept(), 3);
    /// assert_eq!(cache.seen_tokens(), 6);
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
    pub fn compact(&mut self, mask: &KeepMask) -> Result<(), CacheError> {
        self.compact_with_slack(mask, MIN_HEAD_SLACK)
    }

    /// Evict mode with an explicit number of free rows per head after compaction.
    ///
    /// Rows are matched by absolute position: a row at position `p` in the context span is kept
    /// iff `mask.is_kept(layer, head, p - n_sys)`; system-prompt rows and rows after the context
    /// are always kept, layers without mask bits are untouched, and bits of rows already evicted
    /// by an earlier compaction are ignored. The old buffers are freed. Invalidates earlier marks.
    pub fn compact_with_slack(&mut self, mask: &KeepMask, slack: usize) -> Result<(), CacheError> {
        self.check_mask(mask)?;
        for l in 0..self.layers.len() {
            if let Some(layer) = self.filtered_layer(mask, l, slack)? {
                self.layers[l] = layer;
            }
        }
        self.generation = fresh_generation();
        self.sync(0, true)
    }

    /// Retain mode: a new compacted cache (as [`compact`](Self::compact) would produce) while
    /// `self` stays intact, so many ratios can be tried after one prefill + scoring. The view
    /// is an independent cache (its own buffers, spans and `seen_tokens`); appending to it does
    /// not touch `self`.
    ///
    /// ```
    /// use kvzip_cache::{KeepMask, KvCache, LayerKeep};
    ///
    /// let (n_ctx, n_kv, d) = (8, 1, 4);
    /// let mut full = KvCache::uniform(1, n_kv, d)?;
    /// let pos = full.next_positions(n_ctx);
    /// full.append(0, &[1.0; 8 * 4], &[1.0; 8 * 4], &pos)?;
    /// full.set_spans(0, n_ctx);
    ///
    /// for keep in [2, 4, 8] {
    ///     let bits = (0..n_ctx).map(|p| p < keep).collect();
    ///     let mask = KeepMask::from_layers(n_ctx, vec![Some(LayerKeep { n_heads: n_kv, bits })])?;
    ///     let view = full.compacted_view(&mask)?;
    ///     assert_eq!(view.context_pairs_kept(), keep);
    /// }
    /// assert_eq!(full.context_pairs_kept(), 8); // the full cache is untouched
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
    pub fn compacted_view(&self, mask: &KeepMask) -> Result<Self, CacheError> {
        self.check_mask(mask)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            layers.push(match self.filtered_layer(mask, l, MIN_HEAD_SLACK)? {
                Some(layer) => layer,
                None => self.copied_layer(&self.layers[l], |_, _| true, MIN_HEAD_SLACK)?,
            });
        }
        self.sibling(layers)
    }

    /// Allocated K+V bytes over all layers (free capacity included), at the storage's element
    /// size: what the cache really occupies.
    pub fn bytes(&self) -> usize {
        let e = self.storage.elem_bytes();
        self.layers
            .iter()
            .map(|l| l.capacity_rows() * l.head_dim * 2 * e)
            .sum()
    }

    /// K+V bytes of the live rows over all layers, at the storage's element size.
    pub fn kv_bytes_live(&self) -> usize {
        self.kv_bytes_used(self.storage.elem_bytes())
    }

    /// K+V bytes of the live rows over all layers, at `elem_bytes` bytes per element.
    pub fn kv_bytes_used(&self, elem_bytes: usize) -> usize {
        self.layers
            .iter()
            .map(|l| l.rows() * l.head_dim * 2 * elem_bytes)
            .sum()
    }

    /// Context-only usage over the layers for which `include(layer)` is true (pass
    /// `|_| true` for all layers, or the evictable layers to exclude e.g. Gemma3 sliding
    /// layers whose context rows are trimmed by the window, not by pruning). Bytes are counted
    /// at `elem_bytes` per element (4 for f32, 2 to report bf16 sizes), free capacity excluded.
    ///
    /// ```
    /// use kvzip_cache::KvCache;
    ///
    /// let mut cache = KvCache::uniform(2, 2, 4)?;
    /// let pos = cache.next_positions(10);
    /// for l in 0..2 {
    ///     cache.append(l, &[0.0; 10 * 2 * 4], &[0.0; 10 * 2 * 4], &pos)?;
    /// }
    /// cache.set_spans(2, 8); // 2 system-prompt tokens, 8 context tokens
    /// let u = cache.context_usage(2, |_| true);
    /// assert_eq!((u.pairs_kept, u.pairs_full), (2 * 2 * 8, 2 * 2 * 8));
    /// assert_eq!(u.bytes_full, 32 * 2 * 4 * 2); // pairs x (K+V) x head_dim x bf16 bytes
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
    pub fn context_usage(
        &self,
        elem_bytes: usize,
        include: impl Fn(usize) -> bool,
    ) -> ContextUsage {
        let span = self.context_span();
        let mut u = ContextUsage::default();
        for (_, layer) in self.layers.iter().enumerate().filter(|(l, _)| include(*l)) {
            let kept = layer.rows_in(span.clone());
            let full = self.n_ctx * layer.n_kv_heads;
            let per_pair = 2 * layer.head_dim * elem_bytes;
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

pub(crate) fn check_head(n_kv_heads: usize, l: usize, h: usize) -> Result<(), CacheError> {
    if h >= n_kv_heads {
        return Err(CacheError::Shape(format!(
            "head {h} out of range: layer {l} has {n_kv_heads} KV heads"
        )));
    }
    Ok(())
}
