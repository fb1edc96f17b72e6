// Linear layers at decode batch sizes (1 or 2 rows): out[r, j] = x[r, :] · w[j, :] (+ bias[j]).
//
// Decode reads every weight once per token, so these products are bandwidth-bound: the kernel
// streams each weight row once with 16-byte loads (evict-first: nothing re-reads them this
// token), keeps several loads in flight per lane, and multiplies each loaded chunk with all m
// activation rows (read through the read-only path; they are tiny and shared by every warp).
// Each warp owns KVZ_GEMV_ROWS output rows and walks their k in 16-byte chunks, lane-strided;
// a warp reduction gives the dot products; lane 0 adds the bias and stores (bf16 or f32), or
// adds the product into the output (the residual stream). The GLU variant computes a gated
// MLP's gate and up rows together and stores act(gate) * up, so the decode step needs no
// separate activation kernel and never stores the gate_up product; the pre-norm variants
// RMS-normalise their input rows themselves, so no norm kernel runs before them. Every fusion
// rounds exactly as the unfused kernels do (bench/gpu/hopper/decode-fusions).
// At 1 and 2 rows this beats cuBLAS at every Llama-8B / Qwen-7B shape measured (0.9-4.5 TB/s
// against 1.1-4.2; bench/gpu/hopper/gemv); from 4 rows on cuBLAS's tensor-core path wins, so the
// host sends larger batches there. ROWS / UNROLL are overridable for that sweep
// (scripts/gpu/gemv/bench.py).
#include "common.cuh"

// Output rows per warp: each 16-byte activation chunk loaded serves this many rows.
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

// RMS-normalises the block's m input rows into shared memory (pre-norm kernels), bit for bit
// as kvz_rms_norm does: that kernel runs VT = clamp(round_up(k / 8, 32), 32, 1024) threads,
// thread vt summing the squares of chunks vt, vt + VT, ... in order, then a warp butterfly per
// warp and one over the warp partials (zeros past the last warp). Here each of the 256 threads
// plays virtual threads t, t + 256, ... and the same sums run in the same order, so the
// normalised rows equal the unfused norm's output exactly. The raw chunks are staged in shared
// memory on the way; each thread re-reads only what it stored itself.
template <int M>
__device__ __forceinline__ void gemv_norm_rows(const KvzGemvParams& p, uint4* xs) {
    constexpr int MAX_VT = 1024, VW = MAX_VT / KVZ_WARP;
    __shared__ float partial[M][VW];
    __shared__ float inv[M];
    const int kc = p.k / 8, lane = threadIdx.x % KVZ_WARP, warp = threadIdx.x / KVZ_WARP;
    const int vt_count = min(max((kc + KVZ_WARP - 1) / KVZ_WARP * KVZ_WARP, KVZ_WARP), MAX_VT);
    const uint4* x = reinterpret_cast<const uint4*>(p.x);
    const uint4* g = reinterpret_cast<const uint4*>(p.norm_w);
#pragma unroll
    for (int mi = 0; mi < M; ++mi) {
        // vt_count is a multiple of 32, so a real warp's lanes are one virtual warp each pass.
        for (int vt = threadIdx.x; vt < vt_count; vt += KVZ_GEMV_THREADS) {
            float ss = 0.f;
            for (int c = vt; c < kc; c += vt_count) {
                const uint4 v = __ldg(x + int64_t(mi) * kc + c);
                xs[mi * kc + c] = v;
                float f[8];
                kvz_unpack8(v, f);
#pragma unroll
                for (int i = 0; i < 8; ++i) ss += f[i] * f[i];
            }
            ss = kvz_warp_sum(ss);
            if (lane == 0) partial[mi][vt / KVZ_WARP] = ss;
        }
    }
    __syncthreads();
    if (warp < M) {
        const int n_vw = vt_count / KVZ_WARP;
        const float ss = kvz_warp_sum(lane < n_vw ? partial[warp][lane] : 0.f);
        if (lane == 0) inv[warp] = rsqrtf(ss / (float)p.k + p.norm_eps);
    }
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < M; ++mi) {
        const float s = inv[mi];
        for (int vt = threadIdx.x; vt < vt_count; vt += KVZ_GEMV_THREADS) {
            for (int c = vt; c < kc; c += vt_count) {
                float f[8], gw[8];
                kvz_unpack8(xs[mi * kc + c], f);
                kvz_unpack8(__ldg(g + c), gw);
                uint4 o;
                __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    h[i] = __floats2bfloat162_rn(f[2 * i] * s * (gw[2 * i] + p.norm_offset),
                                                 f[2 * i + 1] * s * (gw[2 * i + 1] + p.norm_offset));
                xs[mi * kc + c] = o;
            }
        }
    }
    __syncthreads();
}

// Weight rows per warp: KVZ_GEMV_ROWS output rows, twice that in GLU mode (gate and up row of
// each output). NORM: the input rows are RMS-normalised into shared memory first.
template <int M, bool GLU, bool NORM>
__device__ __forceinline__ void gemv_rows(const KvzGemvParams& p, const int64_t row0,
                                          const uint4* xs) {
    constexpr int R = KVZ_GEMV_ROWS, U = KVZ_GEMV_UNROLL, WR = GLU ? 2 * R : R;
    const int lane = threadIdx.x % KVZ_WARP;
    const int kc = p.k / 8;  // 16-byte chunks per row
    const uint4* w = reinterpret_cast<const uint4*>(p.w);
    const uint4* x = reinterpret_cast<const uint4*>(p.x);
    const uint4* wr[WR];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        // Rows past n re-read the last row (never stored): no branch in the loop.
        const int64_t row = row0 + r < p.n ? row0 + r : p.n - 1;
        wr[r] = w + row * kc;
        if (GLU) wr[R + r] = w + (p.n + row) * kc;
    }
    float acc[WR][M];
#pragma unroll
    for (int r = 0; r < WR; ++r)
#pragma unroll
        for (int mi = 0; mi < M; ++mi) acc[r][mi] = 0.f;

    for (int base = lane; base < kc; base += KVZ_WARP * U) {
        uint4 wv[U][WR];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = base + u * KVZ_WARP;
#pragma unroll
            for (int r = 0; r < WR; ++r)
                wv[u][r] = c < kc ? __ldcs(wr[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = base + u * KVZ_WARP;
            if (c >= kc) break;
            float wf[WR][8];
#pragma unroll
            for (int r = 0; r < WR; ++r) kvz_unpack8(wv[u][r], wf[r]);
#pragma unroll
            for (int mi = 0; mi < M; ++mi) {
                float xf[8];
                kvz_unpack8(NORM ? xs[mi * kc + c] : __ldg(x + int64_t(mi) * kc + c), xf);
#pragma unroll
                for (int r = 0; r < WR; ++r)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[r][mi] = fmaf(wf[r][i], xf[i], acc[r][mi]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < WR; ++r)
#pragma unroll
        for (int mi = 0; mi < M; ++mi) acc[r][mi] = kvz_warp_sum(acc[r][mi]);
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int64_t row = row0 + r;
        if (row >= p.n) break;
        const float b =
            !GLU && p.bias ? kvz_bf16_to_f32(reinterpret_cast<const bf16*>(p.bias)[row]) : 0.f;
#pragma unroll
        for (int mi = 0; mi < M; ++mi) {
            const int64_t o = int64_t(mi) * p.n + row;
            if (GLU) {
                // Rounded as the unfused path stores gate and up before kvz_act_mul.
                const float gate = kvz_bf16_to_f32(kvz_f32_to_bf16(acc[r][mi]));
                const float up = kvz_bf16_to_f32(kvz_f32_to_bf16(acc[R + r][mi]));
                reinterpret_cast<bf16*>(p.out)[o] = kvz_f32_to_bf16(kvz_act(gate, p.act) * up);
            }
            else if (p.out_f32)
                reinterpret_cast<float*>(p.out)[o] = acc[r][mi] + b;
            else if (p.accumulate) {
                bf16* out = reinterpret_cast<bf16*>(p.out) + o;
                const float d = kvz_bf16_to_f32(kvz_f32_to_bf16(acc[r][mi] + b));
                *out = kvz_f32_to_bf16(kvz_bf16_to_f32(*out) + d);
            } else
                reinterpret_cast<bf16*>(p.out)[o] = kvz_f32_to_bf16(acc[r][mi] + b);
        }
    }
}

// Warps own KVZ_GEMV_ROWS output rows each; blocks walk groups of 8 warps' rows grid-stride
// (the pre-norm kernels run a grid of a few blocks per SM, so each block normalises its input
// rows once; the others one group per block).
template <int M, bool GLU, bool NORM>
__device__ __forceinline__ void gemv_impl(const KvzGemvParams& p) {
    extern __shared__ uint4 kvz_gemv_xs[];
    constexpr int WARPS = KVZ_GEMV_THREADS / KVZ_WARP;
    if (NORM) gemv_norm_rows<M>(p, kvz_gemv_xs);
    const int warp = threadIdx.x / KVZ_WARP;
    for (int64_t group = blockIdx.x;; group += gridDim.x) {
        const int64_t row0 = (group * WARPS + warp) * KVZ_GEMV_ROWS;
        if (row0 >= p.n) break;
        gemv_rows<M, GLU, NORM>(p, row0, kvz_gemv_xs);
    }
}

// Spelled out (not through a macro): the build script finds entry points by their
// `__global__ ... kvz_*` declarations.
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_m1(KvzGemvParams p) {
    gemv_impl<1, false, false>(p);
}
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_m2(KvzGemvParams p) {
    gemv_impl<2, false, false>(p);
}
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_glu_m1(KvzGemvParams p) {
    gemv_impl<1, true, false>(p);
}
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_glu_m2(KvzGemvParams p) {
    gemv_impl<2, true, false>(p);
}
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_norm_m1(KvzGemvParams p) {
    gemv_impl<1, false, true>(p);
}
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_norm_m2(KvzGemvParams p) {
    gemv_impl<2, false, true>(p);
}
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_norm_glu_m1(KvzGemvParams p) {
    gemv_impl<1, true, true>(p);
}
extern "C" __global__ __launch_bounds__(KVZ_GEMV_THREADS) void kvz_gemv_norm_glu_m2(KvzGemvParams p) {
    gemv_impl<2, true, true>(p);
}
