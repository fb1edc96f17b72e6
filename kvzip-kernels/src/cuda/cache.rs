//! KV-cache maintenance on the GPU (`csrc/cache.cu`): appending new rows into per-head
//! capacity, and compaction (gathering kept rows after pruning).
//!
//! Layout (as [`crate::KvSegments`]): one layer's keys (and values) are `[rows, head_dim]` bf16;
//! KV head `h` owns rows `offsets[h] .. offsets[h] + capacities[h]`, of which the first
//! `lens[h]` are filled. [`HeadSegments`] keeps the host copy (for checks) and the device copy
//! (for kernels) of that layout. Dropping rows from the end of every head (rolling back a
//! query, "slice back") is bookkeeping only: [`CudaBackend::set_head_lens`].

use cudarc::driver::LaunchConfig;

use super::params::{KvzAppendParams, KvzCompactParams};
use super::{bf16, blocks, check_len, dptr, dptr_mut, CudaBackend, CudaError, CudaResult};
use super::{CudaSlice, DevicePtr, DevicePtrMut};

/// Threads per block of the copy kernels.
const THREADS: usize = 256;

/// Per-head segment layout of one layer's K/V buffers: host and device copies.
#[derive(Debug)]
pub struct HeadSegments {
    offsets: Vec<i64>,
    lens: Vec<i32>,
    capacities: Vec<usize>,
    offsets_dev: CudaSlice<i64>,
    lens_dev: CudaSlice<i32>,
}

impl HeadSegments {
    /// Number of KV heads.
    pub fn n_heads(&self) -> usize {
        self.offsets.len()
    }
    /// First row of each head's segment (host copy).
    pub fn offsets(&self) -> &[i64] {
        &self.offsets
    }
    /// Filled rows of each head (host copy).
    pub fn lens(&self) -> &[i32] {
        &self.lens
    }
    /// Row capacity of each head.
    pub fn capacities(&self) -> &[usize] {
        &self.capacities
    }
    /// Device copy of [`Self::offsets`] (`[n_heads]` i64), for the attention / score kernels.
    pub fn offsets_dev(&self) -> &CudaSlice<i64> {
        &self.offsets_dev
    }
    /// Device copy of [`Self::lens`] (`[n_heads]` i32).
    pub fn lens_dev(&self) -> &CudaSlice<i32> {
        &self.lens_dev
    }
    /// Rows a K or V buffer must hold: `max(offsets[h] + capacities[h])`.
    pub fn rows_needed(&self) -> usize {
        self.offsets
            .iter()
            .zip(&self.capacities)
            .map(|(&o, &c)| o as usize + c)
            .max()
            .unwrap_or(0)
    }
}

/// Host-side plan of a compaction: for every head, the absolute source rows it keeps
/// (ascending) and where its kept rows start in the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactPlan {
    /// Absolute source row of every kept row, head after head (`[total kept]`).
    pub src_rows: Vec<i64>,
    /// Kept rows of head `h` are `src_rows[row_starts[h] .. row_starts[h + 1]]` (`[n_heads + 1]`).
    pub row_starts: Vec<i64>,
    /// First destination row of each head (`[n_heads]`).
    pub dst_offsets: Vec<i64>,
}

impl CompactPlan {
    /// Plan from per-head kept positions: `kept[h]` lists positions `0..src_lens[h]` of head `h`
    /// (strictly ascending) that survive; head `h`'s source rows start at `src_offsets[h]`, and
    /// its kept rows go to `dst_offsets[h]..`.
    pub fn from_kept(
        kept: &[Vec<usize>],
        src_offsets: &[i64],
        src_lens: &[i32],
        dst_offsets: &[i64],
    ) -> CudaResult<Self> {
        let n = kept.len();
        if src_offsets.len() != n || src_lens.len() != n || dst_offsets.len() != n {
            return Err(CudaError::Shape(format!(
                "compact: {n} kept lists but {} src offsets, {} src lens, {} dst offsets",
                src_offsets.len(),
                src_lens.len(),
                dst_offsets.len()
            )));
        }
        let mut src_rows = Vec::with_capacity(kept.iter().map(Vec::len).sum());
        let mut row_starts = Vec::with_capacity(n + 1);
        row_starts.push(0i64);
        for (h, list) in kept.iter().enumerate() {
            let len = src_lens[h].max(0) as usize;
            let mut prev: Option<usize> = None;
            for &pos in list {
                if pos >= len || prev.is_some_and(|p| p >= pos) {
                    return Err(CudaError::Shape(format!(
                        "compact: head {h} keeps position {pos}; positions must be strictly \
                         ascending and below the head length {len}"
                    )));
                }
                prev = Some(pos);
                src_rows.push(src_offsets[h] + pos as i64);
            }
            row_starts.push(src_rows.len() as i64);
        }
        if dst_offsets.iter().any(|&o| o < 0) || src_offsets.iter().any(|&o| o < 0) {
            return Err(CudaError::Shape("compact: negative segment offset".into()));
        }
        Ok(Self {
            src_rows,
            row_starts,
            dst_offsets: dst_offsets.to_vec(),
        })
    }

    /// Plan from per-head keep masks: `masks[h][pos]` keeps position `pos` of head `h`
    /// (`masks[h].len()` must equal `src_lens[h]`).
    pub fn from_masks(
        masks: &[Vec<bool>],
        src_offsets: &[i64],
        src_lens: &[i32],
        dst_offsets: &[i64],
    ) -> CudaResult<Self> {
        for (h, m) in masks.iter().enumerate() {
            if src_lens
                .get(h)
                .is_some_and(|&l| l.max(0) as usize != m.len())
            {
                return Err(CudaError::Shape(format!(
                    "compact: mask of head {h} has {} entries, the head holds {}",
                    m.len(),
                    src_lens[h]
                )));
            }
        }
        let kept: Vec<Vec<usize>> = masks
            .iter()
            .map(|m| {
                m.iter()
                    .enumerate()
                    .filter(|(_, &k)| k)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        Self::from_kept(&kept, src_offsets, src_lens, dst_offsets)
    }

    /// Destination offsets packing heads back to back with the given capacities
    /// (`offsets[h] = sum of capacities[..h]`).
    pub fn packed_offsets(capacities: &[usize]) -> Vec<i64> {
        let mut acc = 0i64;
        capacities
            .iter()
            .map(|&c| {
                let o = acc;
                acc += c as i64;
                o
            })
            .collect()
    }

    /// Kept rows per head: the new `lens` after the compaction.
    pub fn kept_lens(&self) -> Vec<i32> {
        self.row_starts
            .windows(2)
            .map(|w| (w[1] - w[0]) as i32)
            .collect()
    }

    /// Total kept rows.
    pub fn total_rows(&self) -> usize {
        self.src_rows.len()
    }
}

/// A [`CompactPlan`] uploaded to the device, with the bounds its launch is checked against.
#[derive(Debug)]
pub struct DeviceCompactPlan {
    src_rows: CudaSlice<i64>,
    row_starts: CudaSlice<i64>,
    dst_offsets: CudaSlice<i64>,
    total_rows: usize,
    n_heads: usize,
    src_rows_needed: usize,
    dst_rows_needed: usize,
}

impl DeviceCompactPlan {
    /// Total kept rows.
    pub fn total_rows(&self) -> usize {
        self.total_rows
    }
    /// Rows the destination buffers must hold.
    pub fn dst_rows_needed(&self) -> usize {
        self.dst_rows_needed
    }
}

fn i32_of(what: &str, v: usize) -> CudaResult<i32> {
    i32::try_from(v).map_err(|_| CudaError::Shape(format!("{what} = {v} exceeds i32")))
}

fn copy_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks(n, THREADS).min(132 * 32), 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Uploads a segment layout. Errors if a head's `lens[h]` exceeds `capacities[h]` or the
    /// three slices differ in length.
    pub fn head_segments(
        &self,
        offsets: &[i64],
        lens: &[i32],
        capacities: &[usize],
    ) -> CudaResult<HeadSegments> {
        if lens.len() != offsets.len() || capacities.len() != offsets.len() {
            return Err(CudaError::Shape(format!(
                "segments: {} offsets, {} lens, {} capacities",
                offsets.len(),
                lens.len(),
                capacities.len()
            )));
        }
        for h in 0..offsets.len() {
            if offsets[h] < 0 || lens[h] < 0 || lens[h] as usize > capacities[h] {
                return Err(CudaError::Shape(format!(
                    "segments: head {h} has offset {}, len {} and capacity {}",
                    offsets[h], lens[h], capacities[h]
                )));
            }
        }
        Ok(HeadSegments {
            offsets: offsets.to_vec(),
            lens: lens.to_vec(),
            capacities: capacities.to_vec(),
            offsets_dev: self.upload(offsets)?,
            lens_dev: self.upload(lens)?,
        })
    }

    /// Sets every head's filled length (rolling back appended rows is just this: no data moves).
    /// Errors if a length exceeds its head's capacity.
    pub fn set_head_lens(&self, seg: &mut HeadSegments, lens: &[i32]) -> CudaResult<()> {
        if lens.len() != seg.n_heads() {
            return Err(CudaError::Shape(format!(
                "set_head_lens: {} lens for {} heads",
                lens.len(),
                seg.n_heads()
            )));
        }
        if let Some(h) =
            (0..lens.len()).find(|&h| lens[h] < 0 || lens[h] as usize > seg.capacities[h])
        {
            return Err(CudaError::Shape(format!(
                "set_head_lens: head {h} len {} outside 0..={}",
                lens[h], seg.capacities[h]
            )));
        }
        seg.lens.copy_from_slice(lens);
        self.stream().memcpy_htod(lens, &mut seg.lens_dev)?;
        Ok(())
    }

    /// Appends `q_len` new rows to every head: `k_cache[offsets[h] + lens[h] + t] =
    /// k_new[t, h]` (same for v), then advances `lens` by `q_len` (host and device).
    /// `k_new`, `v_new`: `[q_len, n_heads, head_dim]` bf16; the caches hold
    /// [`HeadSegments::rows_needed`] rows. Errors (nothing written) if a head lacks capacity.
    #[allow(clippy::too_many_arguments)]
    pub fn append_kv(
        &self,
        seg: &mut HeadSegments,
        k_new: &impl DevicePtr<bf16>,
        v_new: &impl DevicePtr<bf16>,
        k_cache: &mut impl DevicePtrMut<bf16>,
        v_cache: &mut impl DevicePtrMut<bf16>,
        q_len: usize,
        head_dim: usize,
    ) -> CudaResult<()> {
        let n_heads = seg.n_heads();
        check_len("append k_new", k_new.len(), q_len * n_heads * head_dim)?;
        check_len("append v_new", v_new.len(), q_len * n_heads * head_dim)?;
        check_len(
            "append k_cache",
            k_cache.len(),
            seg.rows_needed() * head_dim,
        )?;
        check_len(
            "append v_cache",
            v_cache.len(),
            seg.rows_needed() * head_dim,
        )?;
        for h in 0..n_heads {
            if seg.lens[h] as usize + q_len > seg.capacities[h] {
                return Err(CudaError::Shape(format!(
                    "append: head {h} holds {} of {} rows, {q_len} more do not fit \
                     (grow the cache capacity first)",
                    seg.lens[h], seg.capacities[h]
                )));
            }
        }
        if q_len == 0 || n_heads == 0 || head_dim == 0 {
            return Ok(());
        }
        // SAFETY: every head's capacity was checked above against the host copy of the layout.
        unsafe {
            self.append_rows(
                k_new,
                v_new,
                k_cache,
                v_cache,
                &seg.offsets_dev,
                &seg.lens_dev,
                q_len,
                n_heads,
                head_dim,
            )?;
        }
        let new_lens: Vec<i32> = seg.lens.iter().map(|&l| l + q_len as i32).collect();
        self.set_head_lens(seg, &new_lens)
    }

    /// Uploads a compaction plan. Errors if the destination ranges of two heads
    /// (`dst_offsets[h] .. dst_offsets[h] + kept[h]`) overlap.
    pub fn upload_compact_plan(&self, plan: &CompactPlan) -> CudaResult<DeviceCompactPlan> {
        let n_heads = plan.dst_offsets.len();
        if plan.row_starts.len() != n_heads + 1 || n_heads == 0 {
            return Err(CudaError::Shape(format!(
                "compact plan: {} row starts for {n_heads} heads",
                plan.row_starts.len()
            )));
        }
        let counts = plan.kept_lens();
        let mut spans: Vec<(i64, i64)> = (0..n_heads)
            .map(|h| (plan.dst_offsets[h], plan.dst_offsets[h] + counts[h] as i64))
            .filter(|(a, b)| a < b)
            .collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(CudaError::Shape(
                "compact plan: destination ranges of two heads overlap".into(),
            ));
        }
        let src_rows_needed = plan
            .src_rows
            .iter()
            .map(|&r| r as usize + 1)
            .max()
            .unwrap_or(0);
        let dst_rows_needed = spans.last().map_or(0, |s| s.1 as usize);
        Ok(DeviceCompactPlan {
            src_rows: self.upload(&plan.src_rows)?,
            row_starts: self.upload(&plan.row_starts)?,
            dst_offsets: self.upload(&plan.dst_offsets)?,
            total_rows: plan.total_rows(),
            n_heads,
            src_rows_needed,
            dst_rows_needed,
        })
    }

    /// Gathers the kept rows of `k_src` / `v_src` into `k_dst` / `v_dst` (`[rows, head_dim]`
    /// bf16 each) as the plan says. Source and destination must be different buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn compact(
        &self,
        k_src: &impl DevicePtr<bf16>,
        v_src: &impl DevicePtr<bf16>,
        k_dst: &mut impl DevicePtrMut<bf16>,
        v_dst: &mut impl DevicePtrMut<bf16>,
        plan: &DeviceCompactPlan,
        head_dim: usize,
    ) -> CudaResult<()> {
        check_len(
            "compact k_src",
            k_src.len(),
            plan.src_rows_needed * head_dim,
        )?;
        check_len(
            "compact v_src",
            v_src.len(),
            plan.src_rows_needed * head_dim,
        )?;
        check_len(
            "compact k_dst",
            k_dst.len(),
            plan.dst_rows_needed * head_dim,
        )?;
        check_len(
            "compact v_dst",
            v_dst.len(),
            plan.dst_rows_needed * head_dim,
        )?;
        if plan.total_rows == 0 || head_dim == 0 {
            return Ok(());
        }
        let st = self.stream();
        let p = KvzCompactParams {
            k_src: dptr(k_src, st) as _,
            v_src: dptr(v_src, st) as _,
            k_dst: dptr_mut(k_dst, st) as _,
            v_dst: dptr_mut(v_dst, st) as _,
            src_rows: dptr(&plan.src_rows, st) as _,
            row_starts: dptr(&plan.row_starts, st) as _,
            dst_offsets: dptr(&plan.dst_offsets, st) as _,
            total_rows: plan.total_rows as i64,
            n_kv_heads: i32_of("n_kv_heads", plan.n_heads)?,
            head_dim: i32_of("head_dim", head_dim)?,
        };
        let vec = head_dim % 8 == 0;
        let n = plan.total_rows * if vec { head_dim / 8 } else { head_dim };
        let name = if vec {
            "kvz_compact_vec"
        } else {
            "kvz_compact_scalar"
        };
        // SAFETY: source / destination extents checked against the plan above.
        unsafe { self.launch(name, copy_cfg(n), &p) }
    }

    /// Appends `q_len` rows per KV head: `k_cache[offsets[h] + lens_before[h] + t] =
    /// k_new[t, h]` (same for `v`). `k_new`, `v_new`: `[q_len, n_kv, head_dim]` bf16;
    /// `offsets` `[n_kv]` i64 and `lens_before` `[n_kv]` i32 on the device.
    ///
    /// # Safety
    /// Every head must have room: `lens_before[h] + q_len <= capacity[h]` with the segment
    /// inside `k_cache` / `v_cache` (the device values cannot be checked here; the engine's
    /// cache reserves capacity before every step).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn append_rows(
        &self,
        k_new: &impl DevicePtr<bf16>,
        v_new: &impl DevicePtr<bf16>,
        k_cache: &mut impl DevicePtrMut<bf16>,
        v_cache: &mut impl DevicePtrMut<bf16>,
        offsets: &impl DevicePtr<i64>,
        lens_before: &impl DevicePtr<i32>,
        q_len: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> CudaResult<()> {
        check_len("append_rows k_new", k_new.len(), q_len * n_kv * head_dim)?;
        check_len("append_rows v_new", v_new.len(), q_len * n_kv * head_dim)?;
        check_len("append_rows offsets", offsets.len(), n_kv)?;
        check_len("append_rows lens_before", lens_before.len(), n_kv)?;
        if q_len == 0 || n_kv == 0 || head_dim == 0 {
            return Ok(());
        }
        let st = self.stream();
        let p = KvzAppendParams {
            k_new: dptr(k_new, st) as _,
            v_new: dptr(v_new, st) as _,
            k_cache: dptr_mut(k_cache, st) as _,
            v_cache: dptr_mut(v_cache, st) as _,
            offsets: dptr(offsets, st) as _,
            lens: dptr(lens_before, st) as _,
            q_len: i32_of("q_len", q_len)?,
            n_kv_heads: i32_of("n_kv_heads", n_kv)?,
            head_dim: i32_of("head_dim", head_dim)?,
        };
        let vec = head_dim % 8 == 0;
        let n = q_len * n_kv * if vec { head_dim / 8 } else { head_dim };
        let cfg = copy_cfg(n);
        let name = if vec {
            "kvz_append_vec"
        } else {
            "kvz_append_scalar"
        };
        // SAFETY: the caller guarantees capacity (see the doc); lengths checked above.
        unsafe { self.launch(name, cfg, &p) }
    }
}
