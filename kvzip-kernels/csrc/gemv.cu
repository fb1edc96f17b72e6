// Linear layers at decode batch sizes (1 or 2 rows): out[r, j] = x[r, :] · w[j, :] (+ bias[j]).
//
// Decode reads every weight once per token, so these products are bandwidth-bound: the kernel
// streams each weight row once with 16-byte loads (evict-first: nothing re-reads them this
// token), keeps several loads in flight per lane, and multiplies each loaded chunk with all m
// activation rows (read through the read-only path; they are tiny and shared by every warp).
// Each warp owns KVZ_GEMV_ROWS weight rows and walks their k in 16-byte chunks, lane-strided;
// a warp reduction gives the dot products; lane 0 adds the bias and stores (bf16 or f32).
// At 1 and 2 rows this beats cuBLAS at every Llama-8B / Qwen-7B shape measured (0.9-4.5 TB/s
// against 1.1-4.2; bench/gpu/hopper/gemv); from 4 rows on cuBLAS's tensor-core path wins, so the
// host sends larger batches there. ROWS / UNROLL are overridable for that sweep
// (scripts/gpu/gemv/bench.py).
#include "common.cuh"

// Weight rows per warp: each 16-byte activation chunk loaded serves this many rows.
#ifndef KVZ_GEMV_ROWS
#define KVZ_GEMV_ROWS 2
#endif
// 16-byte chunks per lane and row in flight per iteration.
#ifndef KVZ_GEMV_UNROLL
#define KVZ_GEMV_UNROLL 4
#endif
// Threads per block (8 warps).
#define KVZ_GEMV_THREADS 256

__device__ __forceinline__ void kvz_unpack8(const uint4 v, float f[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

template <int M>
__device__ __forceinline__ void gemv_impl(const KvzGemvParams& p) {
    constexpr int R = KVZ_GEMV_ROWS, U = KVZ_GEMV_UNROLL;
    const int lane = threadIdx.x % KVZ_WARP;
    const int warp = threadIdx.x / KVZ_WARP;
    const int64_t row0 = (int64_t(blockIdx.x) * (KVZ_GEMV_THREADS / KVZ_WARP) + warp) * R;
    if (row0 >= p.n) return;
    const int kc = p.k / 8;  // 16-byte chunks per row
    const uint4* w = reinterpret_cast<const uint4*>(p.w);
    const uint4* x = reinterpret_cast<const uint4*>(p.x);
    const uint4* wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        // Rows past n re-read the last row (never stored): no branch in the loop.
        const int64_t row = row0 + r < p.n ? row0 + r : p.n - 1;
        wr[r] = w + row * kc;
    }
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int mi = 0; mi < M; ++mi) acc[r][mi] = 0.f;

    for (int base = lane; base < kc; base += KVZ_WARP * U) {
        uint4 wv[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = base + u * KVZ_WARP;
#pragma unroll
            for (int r = 0; r < R; ++r)
                wv[u][r] = c < kc ? __ldcs(wr[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = base + u * KVZ_WARP;
            if (c >= kc) break;
            float wf[R][8];
#pragma unroll
            for (int r = 0; r < R; ++r) kvz_unpack8(wv[u][r], wf[r]);
#pragma unroll
            for (int mi = 0; mi < M; ++mi) {
                float xf[8];
                kvz_unpack8(__ldg(x + int64_t(mi) * kc + c), xf);
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[r][mi] = fmaf(wf[r][i], xf[i], acc[r][mi]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int mi = 0; mi < M; ++mi) acc[r][mi] = kvz_warp_sum(acc[r][mi]);
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int64_t row = row0 + r;
        if (row >= p.n) break;
        const float b = p.bias ? kvz_bf16_to_f32(reinterpret_cast<const bf16*>(p.bias)[row]) : 0.f;
#pragma unroll
        for (int mi = 0; mi < M; ++mi) {
            const int64_t o = int64_t(mi) * p.n + row;
            if (p.out_f32)
                reinterpret_cast<float*>(p.out)[o] = acc[r][mi] + b;
            else
                reinterpret_cast<bf16*>(p.out)[o] = kvz_f32_to_bf16(acc[r][mi] + b);
        }
    }
}

extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_m1(KvzGemvParams p) { gemv_impl<1>(p); }
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_m2(KvzGemvParams p) { gemv_impl<2>(p); }
