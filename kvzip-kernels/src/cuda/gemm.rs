//! Linear layers: bf16 operands, f32 accumulation. Decode batches of at most
//! [`GEMV_MAX_ROWS`] rows run the bandwidth-bound GEMV kernel (`csrc/gemv.cu`, bias fused);
//! everything else runs cuBLAS (`CUBLAS_COMPUTE_32F`).

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};

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
        if self.gemv(x, w, bias, o, false, m, n, k)? {
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
        if self.gemv(x, w, None::<&CudaSliceBf16>, o, true, m, n, k)? {
            return Ok(());
        }
        self.gemm_raw(x, w, o, cudaDataType_t::CUDA_R_32F, m, n, k)
    }

    /// Launches the GEMV kernel when it applies (`1 <= m <=` [`GEMV_MAX_ROWS`], `k % 8 == 0`,
    /// `x` and `w` 16-byte aligned); `false` when the caller should use cuBLAS. Lengths of
    /// `x`, `w` are checked here, `out` / `bias` by the caller.
    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        bias: Option<&impl DevicePtr<bf16>>,
        out: u64,
        out_f32: bool,
        m: usize,
        n: usize,
        k: usize,
    ) -> CudaResult<bool> {
        check_len("linear x", x.len(), m * k)?;
        check_len("linear w", w.len(), n * k)?;
        let s = self.stream();
        let (xp, wp) = (dptr(x, s), dptr(w, s));
        let kernel = match m {
            1 => "kvz_gemv_m1",
            2 => "kvz_gemv_m2",
            _ => return Ok(false),
        };
        if k % 8 != 0 || xp % 16 != 0 || wp % 16 != 0 || n == 0 {
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
            m: m as i32,
            n: n32,
            k: k32,
            out_f32: i32::from(out_f32),
        };
        let cfg = LaunchConfig {
            grid_dim: (blocks(n, GEMV_ROWS_PER_BLOCK), 1, 1),
            block_dim: (GEMV_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x holds m * k and w n * k elements (checked above); the caller checked out
        // (m * n of the output type) and bias (n); alignment and k % 8 checked above.
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

/// The type named by `None::<&CudaSliceBf16>` (no bias).
type CudaSliceBf16 = super::CudaSlice<bf16>;
