//! One layer of the cache: per-KV-head variable-length row segments in flat f32 storage.

use crate::CacheError;

/// Minimum free rows per head left after a growth re-layout or a compaction (see
/// [`LayerCache::append`] for the growth policy).
pub const MIN_HEAD_SLACK: usize = 64;

/// K/V rows of one attention layer, grouped head-major with per-head capacity.
///
/// Head `h` owns rows `offsets[h] .. offsets[h] + caps[h]` of the storage; the first `lens[h]`
/// of them are live (in append order, i.e. increasing token position) and the rest is free
/// capacity for appends. `offsets[h + 1] == offsets[h] + caps[h]`. Every row is `head_dim` f32
/// for K, the same for V, and one `u32` absolute token position. Offsets, capacities and
/// lengths are counted in rows; multiply by `head_dim` for f32 element indices.
#[derive(Debug, Clone)]
pub struct LayerCache {
    n_kv_heads: usize,
    head_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    pos: Vec<u32>,
    offsets: Vec<usize>,
    caps: Vec<usize>,
    lens: Vec<usize>,
    relayouts: usize,
}

impl PartialEq for LayerCache {
    /// Logical equality: same geometry and, per head, the same live K, V and positions
    /// (capacity, slack contents and the re-layout counter are ignored).
    fn eq(&self, other: &Self) -> bool {
        self.n_kv_heads == other.n_kv_heads
            && self.head_dim == other.head_dim
            && self.lens == other.lens
            && (0..self.n_kv_heads).all(|h| {
                self.head_keys(h) == other.head_keys(h)
                    && self.head_values(h) == other.head_values(h)
                    && self.head_positions(h) == other.head_positions(h)
            })
    }
}

impl LayerCache {
    /// An empty layer with `n_kv_heads` heads of `head_dim` f32 each and no capacity.
    pub fn new(n_kv_heads: usize, head_dim: usize) -> Result<Self, CacheError> {
        Self::with_capacity(n_kv_heads, head_dim, 0)
    }

    /// An empty layer with room for `rows_per_head` rows in every head (no re-layout until
    /// a head exceeds it).
    pub fn with_capacity(
        n_kv_heads: usize,
        head_dim: usize,
        rows_per_head: usize,
    ) -> Result<Self, CacheError> {
        if n_kv_heads == 0 || head_dim == 0 {
            return Err(CacheError::Shape(format!(
                "layer geometry n_kv_heads {n_kv_heads} x head_dim {head_dim}: both must be > 0"
            )));
        }
        let total = n_kv_heads * rows_per_head;
        Ok(Self {
            n_kv_heads,
            head_dim,
            k: vec![0.0; total * head_dim],
            v: vec![0.0; total * head_dim],
            pos: vec![0; total],
            offsets: (0..n_kv_heads).map(|h| h * rows_per_head).collect(),
            caps: vec![rows_per_head; n_kv_heads],
            lens: vec![0; n_kv_heads],
            relayouts: 0,
        })
    }

    /// Builds a layer from packed head-major rows (`lens[h]` rows per head, no gaps):
    /// `k`/`v` are `[sum(lens), head_dim]`, `positions` is `[sum(lens)]`. Every head gets
    /// `slack` free rows after its live rows.
    pub fn from_packed(
        head_dim: usize,
        lens: &[usize],
        k: &[f32],
        v: &[f32],
        positions: &[u32],
        slack: usize,
    ) -> Result<Self, CacheError> {
        let rows: usize = lens.iter().sum();
        if k.len() != rows * head_dim || v.len() != rows * head_dim || positions.len() != rows {
            return Err(CacheError::Shape(format!(
                "packed layer: lens sum to {rows} rows x head_dim {head_dim}, but k has {} f32, \
                 v has {} f32 and positions has {} entries",
                k.len(),
                v.len(),
                positions.len()
            )));
        }
        let mut layer = Self::with_capacity(lens.len(), head_dim, 0)?;
        let caps: Vec<usize> = lens.iter().map(|&l| l + slack).collect();
        layer.allocate(&caps);
        let mut src = 0;
        for (h, &len) in lens.iter().enumerate() {
            let dst = layer.offsets[h];
            layer.k[dst * head_dim..(dst + len) * head_dim]
                .copy_from_slice(&k[src * head_dim..(src + len) * head_dim]);
            layer.v[dst * head_dim..(dst + len) * head_dim]
                .copy_from_slice(&v[src * head_dim..(src + len) * head_dim]);
            layer.pos[dst..dst + len].copy_from_slice(&positions[src..src + len]);
            layer.lens[h] = len;
            src += len;
        }
        Ok(layer)
    }

    /// Number of KV heads.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// f32 elements per row (per head, per token) of K and of V.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Live rows per head (`[n_kv_heads]`).
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// First storage row of each head's segment (`[n_kv_heads]`, in rows).
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Capacity of each head's segment in rows (`[n_kv_heads]`).
    pub fn caps(&self) -> &[usize] {
        &self.caps
    }

    /// Whole K storage, `[capacity_rows, head_dim]` f32 (free rows included; index with
    /// [`offsets`](Self::offsets) and [`lens`](Self::lens)).
    pub fn k_storage(&self) -> &[f32] {
        &self.k
    }

    /// Whole V storage, same layout as [`k_storage`](Self::k_storage).
    pub fn v_storage(&self) -> &[f32] {
        &self.v
    }

    /// Absolute token position of every storage row (`[capacity_rows]`; free rows hold junk).
    pub fn positions_storage(&self) -> &[u32] {
        &self.pos
    }

    /// Borrowed view for the attention kernels: whole K/V storage, per-head row offsets and
    /// live lengths.
    pub fn segments(&self) -> kvzip_kernels::KvSegments<'_> {
        kvzip_kernels::KvSegments {
            k: &self.k,
            v: &self.v,
            offsets: &self.offsets,
            lens: &self.lens,
            head_dim: self.head_dim,
        }
    }

    /// Live K rows of head `h`: `[lens[h], head_dim]` f32. Panics if `h >= n_kv_heads`.
    pub fn head_keys(&self, h: usize) -> &[f32] {
        let (a, b) = self.head_range(h);
        &self.k[a * self.head_dim..b * self.head_dim]
    }

    /// Live V rows of head `h`: `[lens[h], head_dim]` f32. Panics if `h >= n_kv_heads`.
    pub fn head_values(&self, h: usize) -> &[f32] {
        let (a, b) = self.head_range(h);
        &self.v[a * self.head_dim..b * self.head_dim]
    }

    /// Absolute token positions of head `h`'s live rows (`[lens[h]]`, increasing).
    /// Panics if `h >= n_kv_heads`.
    pub fn head_positions(&self, h: usize) -> &[u32] {
        let (a, b) = self.head_range(h);
        &self.pos[a..b]
    }

    fn head_range(&self, h: usize) -> (usize, usize) {
        (self.offsets[h], self.offsets[h] + self.lens[h])
    }

    /// Total live rows over all heads.
    pub fn rows(&self) -> usize {
        self.lens.iter().sum()
    }

    /// Longest head segment in rows (what varlen kernels call `max_len_k`).
    pub fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }

    /// Total allocated rows over all heads (live + free).
    pub fn capacity_rows(&self) -> usize {
        self.pos.len()
    }

    /// How many times this layer's storage was re-laid out to grow (see [`append`](Self::append)).
    pub fn relayout_count(&self) -> usize {
        self.relayouts
    }

    /// Allocated K+V bytes of this layer (f32 storage, free capacity included).
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    /// Number of live rows (over all heads) whose position lies in `span`.
    pub fn rows_in(&self, span: std::ops::Range<usize>) -> usize {
        (0..self.n_kv_heads)
            .map(|h| {
                self.head_positions(h)
                    .iter()
                    .filter(|&&p| span.contains(&(p as usize)))
                    .count()
            })
            .sum()
    }

    /// Appends `t = positions.len()` tokens to every head.
    ///
    /// `k_new` and `v_new` are `[t, n_kv_heads, head_dim]` token-major (the layout of the K/V
    /// projections after RoPE); `positions` are the tokens' absolute positions. Cost is O(t) rows
    /// amortized. Growth policy: if some head lacks room for `t` rows the layer is re-laid out
    /// once, giving every head `lens[h] + t` rows plus a uniform slack of
    /// `max(ceil(total_rows_after / n_kv_heads), MIN_HEAD_SLACK)` rows. Since every append adds
    /// the same `t` rows to each head, at least `total_rows_after` rows are appended before the
    /// next re-layout, which copies about that many rows: O(1) copies per appended row, and the
    /// allocation is at most about twice the live rows.
    pub fn append(
        &mut self,
        k_new: &[f32],
        v_new: &[f32],
        positions: &[u32],
    ) -> Result<(), CacheError> {
        let t = positions.len();
        let (nh, hd) = (self.n_kv_heads, self.head_dim);
        if k_new.len() != t * nh * hd || v_new.len() != t * nh * hd {
            return Err(CacheError::Shape(format!(
                "append: k_new has {} f32 and v_new {} f32, expected t {t} x n_kv_heads {nh} x \
                 head_dim {hd} = {} (token-major [t, n_kv_heads, head_dim])",
                k_new.len(),
                v_new.len(),
                t * nh * hd
            )));
        }
        if t == 0 {
            return Ok(());
        }
        if (0..nh).any(|h| self.lens[h] + t > self.caps[h]) {
            let total_after = self.rows() + nh * t;
            let slack = total_after.div_ceil(nh).max(MIN_HEAD_SLACK);
            let caps: Vec<usize> = self.lens.iter().map(|&l| l + t + slack).collect();
            self.relayout(&caps);
            self.relayouts += 1;
        }
        for h in 0..nh {
            let base = self.offsets[h] + self.lens[h];
            for (i, &p) in positions.iter().enumerate() {
                let src = (i * nh + h) * hd;
                let dst = (base + i) * hd;
                self.k[dst..dst + hd].copy_from_slice(&k_new[src..src + hd]);
                self.v[dst..dst + hd].copy_from_slice(&v_new[src..src + hd]);
                self.pos[base + i] = p;
            }
            self.lens[h] += t;
        }
        Ok(())
    }

    /// Makes sure every head has at least `rows` free rows (one re-layout if not).
    pub fn reserve(&mut self, rows: usize) {
        if (0..self.n_kv_heads).any(|h| self.lens[h] + rows > self.caps[h]) {
            let caps: Vec<usize> = (0..self.n_kv_heads)
                .map(|h| self.caps[h].max(self.lens[h] + rows))
                .collect();
            self.relayout(&caps);
        }
    }

    /// Re-lays out the storage so every head has exactly `slack` free rows.
    pub fn shrink_to(&mut self, slack: usize) {
        let caps: Vec<usize> = self.lens.iter().map(|&l| l + slack).collect();
        self.relayout(&caps);
    }

    /// Sets offsets/caps for `caps` and allocates zeroed storage (live data is discarded).
    fn allocate(&mut self, caps: &[usize]) {
        let mut off = 0;
        for (h, &c) in caps.iter().enumerate() {
            self.offsets[h] = off;
            self.caps[h] = c;
            off += c;
        }
        self.k = vec![0.0; off * self.head_dim];
        self.v = vec![0.0; off * self.head_dim];
        self.pos = vec![0; off];
    }

    /// Moves every head's live rows into fresh storage with capacities `caps` (each ≥ len).
    fn relayout(&mut self, caps: &[usize]) {
        let empty = self.empty_like();
        let old = std::mem::replace(self, empty);
        self.relayouts = old.relayouts;
        self.allocate(caps);
        let hd = self.head_dim;
        for h in 0..self.n_kv_heads {
            let len = old.lens[h];
            let dst = self.offsets[h];
            self.k[dst * hd..(dst + len) * hd].copy_from_slice(old.head_keys(h));
            self.v[dst * hd..(dst + len) * hd].copy_from_slice(old.head_values(h));
            self.pos[dst..dst + len].copy_from_slice(old.head_positions(h));
            self.lens[h] = len;
        }
    }

    fn empty_like(&self) -> Self {
        Self {
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            k: Vec::new(),
            v: Vec::new(),
            pos: Vec::new(),
            offsets: vec![0; self.n_kv_heads],
            caps: vec![0; self.n_kv_heads],
            lens: vec![0; self.n_kv_heads],
            relayouts: 0,
        }
    }

    /// A new compact layer holding only the rows for which `keep(head, position)` is true
    /// (order preserved), each head with `slack` free rows.
    pub fn filtered(&self, keep: impl Fn(usize, u32) -> bool, slack: usize) -> Self {
        let hd = self.head_dim;
        let mut out = self.empty_like();
        let new_lens: Vec<usize> = (0..self.n_kv_heads)
            .map(|h| {
                self.head_positions(h)
                    .iter()
                    .filter(|&&p| keep(h, p))
                    .count()
            })
            .collect();
        let caps: Vec<usize> = new_lens.iter().map(|&l| l + slack).collect();
        out.allocate(&caps);
        for h in 0..self.n_kv_heads {
            let (keys, values) = (self.head_keys(h), self.head_values(h));
            let mut dst = out.offsets[h];
            for (i, &p) in self.head_positions(h).iter().enumerate() {
                if keep(h, p) {
                    out.k[dst * hd..(dst + 1) * hd].copy_from_slice(&keys[i * hd..(i + 1) * hd]);
                    out.v[dst * hd..(dst + 1) * hd].copy_from_slice(&values[i * hd..(i + 1) * hd]);
                    out.pos[dst] = p;
                    dst += 1;
                }
            }
            out.lens[h] = dst - out.offsets[h];
        }
        out
    }

    /// Cuts every head back to `lens[h]` rows (each must be ≤ the current length).
    pub fn truncate(&mut self, lens: &[usize]) -> Result<(), CacheError> {
        if lens.len() != self.n_kv_heads {
            return Err(CacheError::Shape(format!(
                "truncate: {} lengths for {} heads",
                lens.len(),
                self.n_kv_heads
            )));
        }
        if let Some(h) = (0..self.n_kv_heads).find(|&h| lens[h] > self.lens[h]) {
            return Err(CacheError::Shape(format!(
                "truncate: head {h} has {} rows, cannot grow it to {}",
                self.lens[h], lens[h]
            )));
        }
        self.lens.copy_from_slice(lens);
        Ok(())
    }

    /// Drops the oldest rows of every head so at most `keep_last` remain (sliding window).
    /// Returns the number of rows dropped over all heads.
    pub fn trim_front(&mut self, keep_last: usize) -> usize {
        let hd = self.head_dim;
        let mut dropped = 0;
        for h in 0..self.n_kv_heads {
            let len = self.lens[h];
            if len <= keep_last {
                continue;
            }
            let (off, drop) = (self.offsets[h], len - keep_last);
            self.k
                .copy_within((off + drop) * hd..(off + len) * hd, off * hd);
            self.v
                .copy_within((off + drop) * hd..(off + len) * hd, off * hd);
            self.pos.copy_within(off + drop..off + len, off);
            self.lens[h] = keep_last;
            dropped += drop;
        }
        dropped
    }
}
