// Shared device helpers of the kvzip kernels: bf16 conversion, vector loads, warp/block
// reductions. Kernels are `extern "C" __global__ void kvz_*(Kvz*Params p)`.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>
#include "kvzip_params.h"

#define KVZ_WARP 32

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float kvz_bf16_to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 kvz_f32_to_bf16(float x) { return __float2bfloat16_rn(x); }

// 8 bf16 (16 bytes) as one vector load/store.
struct __align__(16) kvz_bf16x8 {
    __nv_bfloat162 h[4];
};

__device__ __forceinline__ void kvz_load8(const bf16* p, float out[8]) {
    kvz_bf16x8 v = *reinterpret_cast<const kvz_bf16x8*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(v.h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ void kvz_store8(bf16* p, const float in[8]) {
    kvz_bf16x8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) v.h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    *reinterpret_cast<kvz_bf16x8*>(p) = v;
}

__device__ __forceinline__ float kvz_warp_sum(float v) {
#pragma unroll
    for (int o = KVZ_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float kvz_warp_max(float v) {
#pragma unroll
    for (int o = KVZ_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float kvz_block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % KVZ_WARP, warp = threadIdx.x / KVZ_WARP;
    v = kvz_warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int n_warps = blockDim.x / KVZ_WARP;
    float t = lane < n_warps ? partial[lane] : 0.f;
    return kvz_warp_sum(t);
}

// The gate activation of a GLU MLP (KVZ_ACT_SILU or KVZ_ACT_GELU_TANH).
__device__ __forceinline__ float kvz_act(float g, int act) {
    if (act == KVZ_ACT_GELU_TANH) {
        const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
        return 0.5f * g * (1.f + tanhf(k0 * (g + 0.044715f * g * g * g)));
    }
    return g / (1.f + __expf(-g));
}

// Positive-float atomic max through the integer order of IEEE floats (valid for x >= 0).
__device__ __forceinline__ void kvz_atomic_max_pos(float* addr, float x) {
    atomicMax(reinterpret_cast<int*>(addr), __float_as_int(x));
}
