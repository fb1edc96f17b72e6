//! KV-cache maintenance on the GPU (`csrc/cache.cu`): appending new rows into per-head
//! capacity, and row gathers (compaction after pruning, re-layouts) from a
//! [`crate::GatherPlan`]. The layout bookkeeping itself lives in `kvzip-cache`; these are the
//! kernels the device layer ([`crate::Device::append_kv`], [`crate::Device::gather_rows`])
//! launches.

use cudarc::driver::LaunchConfig;

use super::params::{KvzAppendParams, KvzCompactParams};
use super::{bf16, blocks, check_len, dptr, dptr_mut, CudaBackend, CudaError, CudaResult};
use super::{CudaSlice, DevicePtr, DevicePtrMut};
use crate::GatherPlan;

/// Threads per block of the copy kernels.
const THREADS: usize = 256;

/// A [`GatherPlan`] uploaded to the device, with the bounds its launch is checked against.
#[derive(Debug)]
pub struct DeviceGatherPlan {
    src_rows: CudaSlice<i64>,
    row_starts: CudaSlice<i64>,
    dst_offsets: CudaSlice<i64>,
    total_rows: usize,
    n_heads: usize,
    src_rows_needed: usize,
    dst_rows_needed: usize,
}

impl DeviceGatherPlan {
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
    /// Uploads a gather plan. Errors if the destination ranges of two heads
    /// (`dst_offsets[h] .. dst_offsets[h] + count[h]`) overlap.
    pub fn upload_gather_plan(&self, plan: &GatherPlan) -> CudaResult<DeviceGatherPlan> {
        let n_heads = plan.dst_offsets.len();
        if plan.row_starts.len() != n_heads + 1 || n_heads == 0 {
            return Err(CudaError::Shape(format!(
                "compact plan: {} row starts for {n_heads} heads",
                plan.row_starts.len()
            )));
        }
        let counts = plan.head_counts();
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
        Ok(DeviceGatherPlan {
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
        plan: &DeviceGatherPlan,
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
