//! Element-wise and row-wise ops on bf16 device buffers (`csrc/elementwise.cu`).

use cudarc::driver::LaunchConfig;

use super::params::{
    KvzActMulParams, KvzAddParams, KvzEmbeddingParams, KvzRmsNormParams, KvzRopeParams,
    KvzSampleParams, KvzSoftcapParams,
};
use super::{
    bf16, blocks, check_len, dptr, dptr_mut, CudaBackend, CudaResult, DevicePtr, DevicePtrMut,
};

pub use crate::device::Activation;

/// Threads per block of the grid-stride element-wise kernels.
const THREADS: u32 = 256;
/// Upper bound on blocks of the grid-stride kernels (enough to fill an H200 several times).
const MAX_BLOCKS: usize = 132 * 16;

fn linear_cfg(n: usize, per_thread: usize) -> LaunchConfig {
    let grid = blocks(n.div_ceil(per_thread), THREADS as usize).min(MAX_BLOCKS as u32);
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_arg(what: &str, v: usize) -> CudaResult<i32> {
    i32::try_from(v).map_err(|_| super::CudaError::Shape(format!("{what} = {v} exceeds i32")))
}

impl CudaBackend {
    /// RMSNorm of `rows` rows of `dim`: `out = x / sqrt(mean(x²) + eps) * (w + weight_offset)`.
    ///
    /// If `residual` is given, `x` is first replaced (in place, rounded to bf16) by `x + residual`
    /// and that sum is normalised: the fused "add then norm" of a decoder block.
    /// `x`, `residual`, `out`: `[rows, dim]`; `weight`: `[dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        x: &mut impl DevicePtrMut<bf16>,
        residual: Option<&dyn DevicePtr<bf16>>,
        weight: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
        weight_offset: f32,
    ) -> CudaResult<()> {
        let n = rows * dim;
        check_len("rms_norm x", x.len(), n)?;
        check_len("rms_norm out", out.len(), n)?;
        check_len("rms_norm weight", weight.len(), dim)?;
        if let Some(r) = residual {
            check_len("rms_norm residual", r.len(), n)?;
        }
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let s = self.stream();
        let p = KvzRmsNormParams {
            x: dptr_mut(x, s) as _,
            residual: residual.map_or(0, |r| dptr(r, s)) as _,
            weight: dptr(weight, s) as _,
            out: dptr_mut(out, s) as _,
            rows: i32_arg("rows", rows)?,
            dim: i32_arg("dim", dim)?,
            eps,
            weight_offset,
        };
        let threads = (dim.div_ceil(8).next_multiple_of(32)).clamp(32, 1024) as u32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: lengths checked above; the kernel touches rows * dim elements of x/out.
        unsafe { self.launch("kvz_rms_norm", cfg, &p) }
    }

    /// NeoX RoPE in place on `q` `[tokens, n_q_heads, head_dim]` and, if given, `k`
    /// `[tokens, n_kv_heads, head_dim]`. `positions`: `[tokens]` i32 on the device;
    /// `inv_freq`: `[rot_half]` f32 on the device; cos/sin scaled by `attention_factor`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        q: &mut impl DevicePtrMut<bf16>,
        k: Option<&mut dyn DevicePtrMut<bf16>>,
        positions: &impl DevicePtr<i32>,
        inv_freq: &impl DevicePtr<f32>,
        tokens: usize,
        n_q_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        attention_factor: f32,
    ) -> CudaResult<()> {
        let rot_half = inv_freq.len();
        if 2 * rot_half > head_dim {
            return Err(super::CudaError::Shape(format!(
                "rope: 2 * inv_freq.len() = {} exceeds head_dim {head_dim}",
                2 * rot_half
            )));
        }
        check_len("rope q", q.len(), tokens * n_q_heads * head_dim)?;
        check_len("rope positions", positions.len(), tokens)?;
        let s = self.stream();
        let k_ptr = match k {
            Some(k) => {
                check_len("rope k", k.len(), tokens * n_kv_heads * head_dim)?;
                dptr_mut(k, s)
            }
            None => 0,
        };
        if tokens == 0 || rot_half == 0 {
            return Ok(());
        }
        let p = KvzRopeParams {
            q: dptr_mut(q, s) as _,
            k: k_ptr as _,
            positions: dptr(positions, s) as _,
            inv_freq: dptr(inv_freq, s) as _,
            tokens: i32_arg("tokens", tokens)?,
            n_q_heads: i32_arg("n_q_heads", n_q_heads)?,
            n_kv_heads: i32_arg("n_kv_heads", n_kv_heads)?,
            head_dim: i32_arg("head_dim", head_dim)?,
            rot_half: rot_half as i32,
            attention_factor,
        };
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, (n_q_heads + n_kv_heads) as u32, 1),
            block_dim: (rot_half.next_multiple_of(32).min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: lengths checked above.
        unsafe { self.launch("kvz_rope", cfg, &p) }
    }

    /// `out[r, i] = act(gate_up[r, i]) * gate_up[r, inter + i]`.
    /// `gate_up`: `[rows, 2 * inter]`; `out`: `[rows, inter]`.
    pub fn act_mul(
        &self,
        gate_up: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        inter: usize,
        act: Activation,
    ) -> CudaResult<()> {
        check_len("act_mul gate_up", gate_up.len(), rows * 2 * inter)?;
        check_len("act_mul out", out.len(), rows * inter)?;
        if rows * inter == 0 {
            return Ok(());
        }
        let s = self.stream();
        let p = KvzActMulParams {
            gate_up: dptr(gate_up, s) as _,
            out: dptr_mut(out, s) as _,
            rows: i32_arg("rows", rows)?,
            inter: i32_arg("inter", inter)?,
            act: super::gemm::act_code(act),
        };
        let per_thread = if inter % 8 == 0 { 8 } else { 1 };
        // SAFETY: lengths checked above.
        unsafe { self.launch("kvz_act_mul", linear_cfg(rows * inter, per_thread), &p) }
    }

    /// `out[i, :] = table[ids[i], :] * scale`. `ids`: `[n]` u32 on the device (validated by the
    /// caller against `vocab`; out-of-range ids give zero rows); `table`: `[vocab, dim]`.
    pub fn embedding(
        &self,
        ids: &impl DevicePtr<u32>,
        table: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        dim: usize,
        scale: f32,
    ) -> CudaResult<()> {
        let n = ids.len();
        check_len("embedding out", out.len(), n * dim)?;
        if dim == 0 || n == 0 {
            return Ok(());
        }
        let vocab = table.len() / dim;
        let s = self.stream();
        let p = KvzEmbeddingParams {
            ids: dptr(ids, s) as _,
            table: dptr(table, s) as _,
            out: dptr_mut(out, s) as _,
            n: i32_arg("ids", n)?,
            dim: i32_arg("dim", dim)?,
            vocab: i32_arg("vocab", vocab)?,
            scale,
        };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (dim.next_multiple_of(32).min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: lengths checked above.
        unsafe { self.launch("kvz_embedding", cfg, &p) }
    }

    /// `x += y` element-wise over `n` elements.
    pub fn add(
        &self,
        x: &mut impl DevicePtrMut<bf16>,
        y: &impl DevicePtr<bf16>,
        n: usize,
    ) -> CudaResult<()> {
        check_len("add x", x.len(), n)?;
        check_len("add y", y.len(), n)?;
        let s = self.stream();
        let p = KvzAddParams {
            x: dptr_mut(x, s) as _,
            y: dptr(y, s) as _,
            bias: std::ptr::null(),
            n: n as i64,
            cols: 1,
        };
        if n == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above.
        unsafe { self.launch("kvz_add", linear_cfg(n, 1), &p) }
    }

    /// `x[r, c] += bias[c]` for `rows` rows of `bias.len()` columns.
    pub fn add_bias(
        &self,
        x: &mut impl DevicePtrMut<bf16>,
        bias: &impl DevicePtr<bf16>,
        rows: usize,
    ) -> CudaResult<()> {
        let cols = bias.len();
        let n = rows * cols;
        check_len("add_bias x", x.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let s = self.stream();
        let p = KvzAddParams {
            x: dptr_mut(x, s) as _,
            y: std::ptr::null(),
            bias: dptr(bias, s) as _,
            n: n as i64,
            cols: i32_arg("bias columns", cols)?,
        };
        // SAFETY: lengths checked above.
        unsafe { self.launch("kvz_add", linear_cfg(n, 1), &p) }
    }

    /// `x = cap * tanh(x / cap)` in place over `n` f32 values (`cap > 0`).
    pub fn softcap(&self, x: &mut impl DevicePtrMut<f32>, n: usize, cap: f32) -> CudaResult<()> {
        check_len("softcap x", x.len(), n)?;
        if !(cap > 0.0 && cap.is_finite()) {
            return Err(super::CudaError::Shape(format!(
                "softcap {cap} must be finite and > 0"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let s = self.stream();
        let p = KvzSoftcapParams {
            x: dptr_mut(x, s) as _,
            n: n as i64,
            cap,
        };
        // SAFETY: length checked above.
        unsafe { self.launch("kvz_softcap", linear_cfg(n, 1), &p) }
    }

    /// Per row of `logits` `[rows, vocab]` (f32, softcapped in place when `softcap > 0`):
    /// `out[r]` = argmax (`temperature <= 0`) or a sample of `softmax(logits / temperature)`
    /// drawn with the Gumbel-max trick from a counter-based hash of `(seed, step, r, index)`.
    /// Ties go to the lowest index.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        logits: &mut impl DevicePtrMut<f32>,
        out: &mut impl DevicePtrMut<u32>,
        rows: usize,
        vocab: usize,
        softcap: f32,
        temperature: f32,
        seed: u64,
        step: u64,
    ) -> CudaResult<()> {
        check_len("sample logits", logits.len(), rows * vocab)?;
        check_len("sample out", out.len(), rows)?;
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        let s = self.stream();
        let p = KvzSampleParams {
            logits: dptr_mut(logits, s) as _,
            out: dptr_mut(out, s) as _,
            rows: i32_arg("rows", rows)?,
            vocab: i32_arg("vocab", vocab)?,
            softcap,
            temperature,
            seed,
            step,
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: lengths checked above.
        unsafe { self.launch("kvz_sample", cfg, &p) }
    }
}
