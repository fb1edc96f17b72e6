//! GEMMs through cuBLAS: bf16 operands, f32 accumulation (`CUBLAS_COMPUTE_32F`).

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};

use super::{bf16, check_len, dptr, dptr_mut, CudaBackend, CudaResult, DevicePtr, DevicePtrMut};

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
        check_len("linear out", out.len(), m * n)?;
        let o = dptr_mut(out, self.stream());
        self.gemm_raw(x, w, o, cudaDataType_t::CUDA_R_16BF, m, n, k)
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
        self.gemm_raw(x, w, o, cudaDataType_t::CUDA_R_32F, m, n, k)
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
