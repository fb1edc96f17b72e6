//! One layer of the cache: the per-KV-head segment layout, the absolute position of every row,
//! and the storage's buffers.

use kvzip_kernels::GatherPlan;

use crate::CacheError;

/// Minimum free rows per head left after a growth re-layout, a compaction, a front trim or a
/// load (see [`crate::KvCache::append_rows`] for the growth policy).
pub const MIN_HEAD_SLACK: usize = 64;

/// The rows of one attention layer, grouped head-major with per-head capacity.
///
/// Head `h` owns rows `offsets[h] .. offsets[h] + caps[h]` of the layer's buffers; the first
/// `lens[h]` of them are live (in append order, i.e. increasing token position) and the rest
/// is free capacity for appends. `offsets[h + 1] == offsets[h] + caps[h]`. Every row holds
/// `head_dim` elements of K, the same of V, and one `u32` absolute token position (kept on
/// the host whatever the storage). Offsets, capacities and lengths count rows.
#[derive(Debug)]
pub struct LayerCache<L> {
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) pos: Vec<u32>,
    pub(crate) offsets: Vec<usize>,
    pub(crate) caps: Vec<usize>,
    pub(crate) lens: Vec<usize>,
    pub(crate) relayouts: usize,
    pub(crate) data: L,
}

/// Per-head capacities packed back to back: the offsets.
pub(crate) fn packed_offsets(caps: &[usize]) -> Vec<usize> {
    let mut off = 0;
    caps.iter()
        .map(|&c| {
            let o = off;
            off += c;
            o
        })
        .collect()
}

impl<L> LayerCache<L> {
    /// Number of KV heads.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// Elements per row (per head, per token) of K and of V.
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

    /// The storage's buffers of this layer (for [`crate::DeviceKv`]: [`crate::KvBuffers`],
    /// K and V tensors of `[capacity_rows, head_dim]`).
    pub fn data(&self) -> &L {
        &self.data
    }

    /// Absolute token position of every storage row (`[capacity_rows]`; free rows hold junk).
    pub fn positions_storage(&self) -> &[u32] {
        &self.pos
    }

    /// Absolute token positions of head `h`'s live rows (`[lens[h]]`, increasing).
    /// Panics if `h >= n_kv_heads`.
    pub fn head_positions(&self, h: usize) -> &[u32] {
        let (a, b) = self.head_range(h);
        &self.pos[a..b]
    }

    pub(crate) fn head_range(&self, h: usize) -> (usize, usize) {
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

    /// How many times this layer's storage was re-laid out to grow.
    pub fn relayout_count(&self) -> usize {
        self.relayouts
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

    /// The live rows for which `keep(head, position)` holds, as a gather into packed segments
    /// of capacity `count + slack` each: `(plan, new lens, new caps)`.
    pub(crate) fn filter_plan(
        &self,
        keep: impl Fn(usize, u32) -> bool,
        slack: usize,
    ) -> Result<(GatherPlan, Vec<usize>, Vec<usize>), CacheError> {
        let rows: Vec<Vec<usize>> = (0..self.n_kv_heads)
            .map(|h| {
                let base = self.offsets[h];
                self.head_positions(h)
                    .iter()
                    .enumerate()
                    .filter(|(_, &p)| keep(h, p))
                    .map(|(i, _)| base + i)
                    .collect()
            })
            .collect();
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        let caps: Vec<usize> = lens.iter().map(|&l| l + slack).collect();
        let offsets = packed_offsets(&caps);
        let plan = GatherPlan::from_rows(&rows, &offsets)?;
        Ok((plan, lens, caps))
    }

    /// Every live row, packed into segments of capacities `caps` (each >= its length).
    pub(crate) fn relayout_plan(
        &self,
        caps: &[usize],
    ) -> Result<(GatherPlan, Vec<usize>), CacheError> {
        let rows: Vec<Vec<usize>> = (0..self.n_kv_heads)
            .map(|h| (self.offsets[h]..self.offsets[h] + self.lens[h]).collect())
            .collect();
        let offsets = packed_offsets(caps);
        Ok((GatherPlan::from_rows(&rows, &offsets)?, offsets))
    }

    /// The positions a gather `plan` moves, laid out for a destination of `caps`.
    pub(crate) fn gathered_positions(
        &self,
        plan: &GatherPlan,
        offsets: &[usize],
        caps: &[usize],
    ) -> Vec<u32> {
        let total: usize = caps.iter().sum();
        let mut pos = vec![0u32; total];
        for h in 0..plan.n_heads() {
            let (a, b) = (plan.row_starts[h] as usize, plan.row_starts[h + 1] as usize);
            for (i, &src) in plan.src_rows[a..b].iter().enumerate() {
                pos[offsets[h] + i] = self.pos[src as usize];
            }
        }
        pos
    }

    /// Cuts every head back to `lens[h]` rows (`[n_kv_heads]`, each <= the current length),
    /// keeping the oldest rows; capacity is kept. Errors on a wrong count or a longer length.
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
}
