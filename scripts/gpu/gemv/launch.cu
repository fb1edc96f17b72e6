// Prototype harness: the product kernel (csrc/gemv.cu) behind a C entry point for ctypes.
#include "gemv.cu"  // kvzip-kernels/csrc (on the include path)
#include <cuda_runtime.h>
extern "C" int proto_gemv(const void* x, const void* w, const void* bias, void* out, int m, int n,
                          int k, int out_f32, void* stream) {
    KvzGemvParams p{x, w, bias, out, m, n, k, out_f32};
    const int rows_per_block = (KVZ_GEMV_THREADS / 32) * KVZ_GEMV_ROWS;
    dim3 grid((n + rows_per_block - 1) / rows_per_block), block(KVZ_GEMV_THREADS);
    cudaStream_t s = (cudaStream_t)stream;
    switch (m) {
        case 1: kvz_gemv_m1<<<grid, block, 0, s>>>(p); break;
        case 2: kvz_gemv_m2<<<grid, block, 0, s>>>(p); break;
        default: return -1;
    }
    return (int)cudaGetLastError();
}
