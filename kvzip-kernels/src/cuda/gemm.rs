//! Linear layers: bf16 operands, f32 accumulation. Decode batches of at most
//! [`GEMV_MAX_ROWS`] rows run the bandwidth-bound GEMV kernel (`csrc/gemv.cu`: bias, a pre-norm,
//! the residual add and a GLU's activation fused);
//! everything else runs cuBLAS (`CUBLAS_COMPUTE_32F`).

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};

use super::ops::Activation;
use super::params::KvzGemvParams;
use super::{
    bf16, blocks, check_len, dptr, dptr_mut, CudaBackend, CudaResult, DevicePtr, DevicePtrMut,
};
use cudarc::driver::LaunchConfig;

/// Most rows (activation vectors) a linear layer sends to the GEMV kernel; from 4 rows on
/// cuBLAS's tensor-core path is as fast or faster (bench/gpu/hopper/gemv).
pub const GEMV_MAX_ROWS: usize = 2;
/// Threads per GEMV block (`KVZ_GEMV_THREADS`).
const GEMV_THREADS: usize = 256;
/// Weight rows per GEMV block: 8 warps of `KVZ_GEMV_ROWS` (2) rows.
const GEMV_ROWS_PER_BLOCK: usize = 16;
/// Most bytes of normalised input rows a pre-norm GEMV keeps in shared memory: 48 KiB less
/// 1 KiB for the kernel's static reduction slots.
const GEMV_MAX_NORM_SMEM: usize = (48 << 10) - (1 << 10);

impl CudaBackend {
    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` (a linear layer with HF `[out, in]` weights), bf16 out.
    pub fn linear(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> CudaResult<()> {
        self.linear_bias(x, w, None::<&CudaSliceBf16>, out, m, n, k)
    }

    /// [`Self::linear`] plus `bias[n]` on every row (fused into the GEMV kernel; a separate
    /// add after cuBLAS).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_bias(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        bias: Option<&impl DevicePtr<bf16>>,
        out: &mut impl DevicePtrMut<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> CudaResult<()> {
        check_len("linear out", out.len(), m * n)?;
        if let Some(b) = bias.filter(|b| b.len() != n) {
            return Err(super::CudaError::Shape(format!(
                "linear bias holds {} elements, the layer has {n} outputs",
                b.len()
            )));
        }
        let o = dptr_mut(out, self.stream());
        if self.gemv(x, w, bias, None, o, GemvStore::Bf16, m, n, k)? {
            return Ok(());
        }
        self.gemm_raw(x, w, o, cudaDataType_t::CUDA_R_16BF, m, n, k)?;
        match bias {
            Some(b) => self.add_bias(out, b, m),
            None => Ok(()),
        }
    }

    /// [`Self::linear`] with an f32 output (logits).
    pub fn linear_f32(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> CudaResult<()> {
        check_len("linear_f32 out", out.len(), m * n)?;
        let o = dptr_mut(out, self.stream());
        if self.gemv(
            x,
            w,
            None::<&CudaSliceBf16>,
            None,
            o,
            GemvStore::F32,
            m,
            n,
            k,
        )? {
            return Ok(());
        }
        self.gemm_raw(x, w, o, cudaDataType_t::CUDA_R_32F, m, n, k)
    }

    /// A decode-row linear layer with the GEMV kernel's fusions, when it applies (1-2 rows, see
    /// [`GEMV_MAX_ROWS`]; `k % 8 == 0`; aligned operands; with `norm`, `m * k * 2` bytes of
    /// input rows fit in 47 KiB of shared memory): `norm` RMS-normalises each row of `x` first
    /// (so `x` is the raw residual stream), `store` picks what is written to `out`
    /// (`[m, n]`; for [`GemvStore::Glu`], `w` is the stacked `[2 n, k]` gate-and-up projection
    /// and `out` is `[m, n]` with `n` the intermediate size). Returns `false`, doing nothing,
    /// when the caller should run the unfused ops instead.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_fused(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        bias: Option<&impl DevicePtr<bf16>>,
        norm: Option<GemvNorm<'_>>,
        out: &mut impl DevicePtrMut<bf16>,
        m: usize,
        n: usize,
        k: usize,
        store: GemvStore,
    ) -> CudaResult<bool> {
        if matches!(store, GemvStore::F32) {
            return Err(super::CudaError::Shape(
                "linear_fused: an f32 store needs linear_fused_f32".into(),
            ));
        }
        let rows = if matches!(store, GemvStore::Glu(_)) {
            2 * n
        } else {
            n
        };
        check_len("linear_fused w", w.len(), rows * k)?;
        check_len("linear_fused out", out.len(), m * n)?;
        if let Some(b) = bias {
            check_len("linear_fused bias", b.len(), n)?;
        }
        let o = dptr_mut(out, self.stream());
        self.gemv(x, w, bias, norm, o, store, m, n, k)
    }

    /// [`Self::linear_fused`] with an f32 output (`out[m, n] = norm(x) · wᵀ`, no bias): the
    /// logits of a decode step with the final norm fused.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_fused_f32(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        norm: Option<GemvNorm<'_>>,
        out: &mut impl DevicePtrMut<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> CudaResult<bool> {
        check_len("linear_fused_f32 out", out.len(), m * n)?;
        let o = dptr_mut(out, self.stream());
        let no_bias = None::<&CudaSliceBf16>;
        self.gemv(x, w, no_bias, norm, o, GemvStore::F32, m, n, k)
    }

    /// Launches the GEMV kernel when it applies (`1 <= m <=` [`GEMV_MAX_ROWS`], `k % 8 == 0`,
    /// `x`, `w` (and the norm weight) 16-byte aligned, normalised rows fit in shared memory);
    /// `false` when the caller should use cuBLAS / the unfused ops. Lengths of `x`, `w` and the
    /// norm weight are checked here (`n` output rows; `2 n` weight rows for a GLU), `out` /
    /// `bias` by the caller.
    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        bias: Option<&impl DevicePtr<bf16>>,
        norm: Option<GemvNorm<'_>>,
        out: u64,
        store: GemvStore,
        m: usize,
        n: usize,
        k: usize,
    ) -> CudaResult<bool> {
        let glu = matches!(store, GemvStore::Glu(_));
        check_len("linear x", x.len(), m * k)?;
        check_len("linear w", w.len(), if glu { 2 * n * k } else { n * k })?;
        if let Some(nm) = &norm {
            check_len("linear norm weight", nm.weight.len(), k)?;
        }
        let s = self.stream();
        let (xp, wp) = (dptr(x, s), dptr(w, s));
        let gp = norm.as_ref().map_or(0, |nm| dptr(nm.weight, s));
        let kernel = match (m, glu, norm.is_some()) {
            (1, false, false) => "kvz_gemv_m1",
            (2, false, false) => "kvz_gemv_m2",
            (1, true, false) => "kvz_gemv_glu_m1",
            (2, true, false) => "kvz_gemv_glu_m2",
            (1, false, true) => "kvz_gemv_norm_m1",
            (2, false, true) => "kvz_gemv_norm_m2",
            (1, true, true) => "kvz_gemv_norm_glu_m1",
            (2, true, true) => "kvz_gemv_norm_glu_m2",
            _ => return Ok(false),
        };
        // The normalised input rows live in dynamic shared memory, which with the kernel's
        // few static bytes must stay within the 48 KiB a launch gets without opting in.
        let smem = if norm.is_some() { m * k * 2 } else { 0 };
        let too_big = smem > GEMV_MAX_NORM_SMEM;
        if k % 8 != 0 || xp % 16 != 0 || wp % 16 != 0 || gp % 16 != 0 || n == 0 || too_big {
            return Ok(false);
        }
        let (Ok(n32), Ok(k32)) = (i32::try_from(n), i32::try_from(k)) else {
            return Ok(false);
        };
        let p = KvzGemvParams {
            x: xp as _,
            w: wp as _,
            bias: bias.map_or(std::ptr::null(), |b| dptr(b, s) as _),
            out: out as _,
            norm_w: gp as _,
            norm_eps: norm.as_ref().map_or(0.0, |nm| nm.eps),
            norm_offset: norm.as_ref().map_or(0.0, |nm| nm.offset),
            m: m as i32,
            n: n32,
            k: k32,
            out_f32: i32::from(matches!(store, GemvStore::F32)),
            act: match store {
                GemvStore::Glu(a) => act_code(a),
                _ => 0,
            },
            accumulate: i32::from(matches!(store, GemvStore::Accumulate)),
        };
        // Row groups of 16; the pre-norm kernels normalise their input once per block, so
        // they run at most one wave of blocks, each walking an equal number of groups.
        let groups = blocks(n, GEMV_ROWS_PER_BLOCK);
        let grid = if norm.is_some() {
            let resident = self.blocks_per_sm(kernel, GEMV_THREADS as u32, smem as u32)?;
            let wave = (self.n_sms as u32 * resident).max(1);
            groups.div_ceil(groups.div_ceil(wave))
        } else {
            groups
        };
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (GEMV_THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: x holds m * k, w n * k (2 n * k for a GLU) and the norm weight k elements
        // (checked above); the caller checked out (m * n of the output type) and bias (n);
        // alignment, k % 8 and the shared-memory size checked above.
        unsafe { self.launch(kernel, cfg, &p)? };
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        out: u64,
        out_type: cudaDataType_t,
        m: usize,
        n: usize,
        k: usize,
    ) -> CudaResult<()> {
        check_len("linear x", x.len(), m * k)?;
        check_len("linear w", w.len(), n * k)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dims = [m, n, k].map(|d| i32::try_from(d).unwrap_or(i32::MAX));
        if dims.contains(&i32::MAX) {
            return Err(super::CudaError::Shape(format!(
                "linear dims ({m}, {n}, {k}) exceed i32"
            )));
        }
        let [m, n, k] = dims;
        let s = self.stream();
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Row-major out[m, n] = x · wᵀ is column-major outᵀ[n, m] = w[n, k] (stored as k×n,
        // transposed) · xᵀ (stored as k×m).
        // SAFETY: buffer lengths checked above; pointers stay valid until the stream runs it
        // (callers hold the buffers).
        unsafe {
            gemm_ex(
                *self.blas().handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha) as *const f32 as *const _,
                dptr(w, s) as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k,
                dptr(x, s) as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k,
                (&beta) as *const f32 as *const _,
                out as *mut _,
                out_type,
                n,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

/// What the GEMV kernel stores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GemvStore {
    /// `out = x · wᵀ (+ bias)` in bf16.
    Bf16,
    /// `out = x · wᵀ` in f32 ([`CudaBackend::linear_fused_f32`]).
    F32,
    /// `out += bf16(x · wᵀ + bias)` in bf16: the residual add folded into the product.
    Accumulate,
    /// `out = act(x · gateᵀ) * (x · upᵀ)` of a stacked gate-and-up weight (bf16, no bias).
    Glu(Activation),
}

/// The RMSNorm a GEMV applies to its input rows first (as `rms_norm` would, without residual).
#[derive(Clone, Copy)]
pub struct GemvNorm<'a> {
    /// `[k]` bf16 norm weight.
    pub weight: &'a dyn DevicePtr<bf16>,
    /// Epsilon inside the square root.
    pub eps: f32,
    /// Added to the weight (Gemma's `1 + w`).
    pub offset: f32,
}

/// The kernels' `KVZ_ACT_*` code of an activation.
pub(crate) fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Silu => super::params::KVZ_ACT_SILU as i32,
        Activation::GeluTanh => super::params::KVZ_ACT_GELU_TANH as i32,
    }
}

/// The type named by `None::<&CudaSliceBf16>` (no bias).
type CudaSliceBf16 = super::CudaSlice<bf16>;
