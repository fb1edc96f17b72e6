//! Cache writes for an engine that keeps all layers' segment metadata in one device array per
//! field (lengths are uploaded once per step for every layer, not once per layer): the same
//! append kernel as [`CudaBackend::append_kv`], with the lengths passed in.

use cudarc::driver::LaunchConfig;

use super::params::KvzAppendParams;
use super::{bf16, blocks, check_len, dptr, dptr_mut, CudaBackend, CudaResult};
use super::{DevicePtr, DevicePtrMut};

impl CudaBackend {
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
            q_len: q_len as i32,
            n_kv_heads: n_kv as i32,
            head_dim: head_dim as i32,
        };
        let vec = head_dim % 8 == 0;
        let n = q_len * n_kv * if vec { head_dim / 8 } else { head_dim };
        let cfg = LaunchConfig {
            grid_dim: (blocks(n, 256).min(132 * 32), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = if vec {
            "kvz_append_vec"
        } else {
            "kvz_append_scalar"
        };
        // SAFETY: the caller guarantees capacity (see the doc); lengths checked above.
        unsafe { self.launch(name, cfg, &p) }
    }
}
