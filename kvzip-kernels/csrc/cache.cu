// KV-cache maintenance: append new rows into per-head capacity, and gather kept rows
// (compaction after pruning). Pure copies: 16-byte vectors when head_dim % 8 == 0.
#include "common.cuh"

namespace {

// Copies element `e` (vector of 8 when vec) of a row.
template <bool VEC>
__device__ __forceinline__ void cache_copy(bf16* dst, const bf16* src, int e) {
    if (VEC) {
        *reinterpret_cast<kvz_bf16x8*>(dst + e * 8) =
            *reinterpret_cast<const kvz_bf16x8*>(src + e * 8);
    } else {
        dst[e] = src[e];
    }
}

template <bool VEC>
__device__ __forceinline__ void append_impl(const KvzAppendParams& p) {
    const int per_row = VEC ? p.head_dim / 8 : p.head_dim;
    const int64_t n = (int64_t)p.q_len * p.n_kv_heads * per_row;
    const bf16* k_new = reinterpret_cast<const bf16*>(p.k_new);
    const bf16* v_new = reinterpret_cast<const bf16*>(p.v_new);
    bf16* k_cache = reinterpret_cast<bf16*>(p.k_cache);
    bf16* v_cache = reinterpret_cast<bf16*>(p.v_cache);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t src_row = i / per_row;  // t * n_kv_heads + h
        const int e = (int)(i % per_row);
        const int h = (int)(src_row % p.n_kv_heads);
        const int t = (int)(src_row / p.n_kv_heads);
        const int64_t dst_row = p.offsets[h] + p.lens[h] + t;
        cache_copy<VEC>(k_cache + dst_row * p.head_dim, k_new + src_row * p.head_dim, e);
        cache_copy<VEC>(v_cache + dst_row * p.head_dim, v_new + src_row * p.head_dim, e);
    }
}

template <bool VEC>
__device__ __forceinline__ void compact_impl(const KvzCompactParams& p) {
    const int per_row = VEC ? p.head_dim / 8 : p.head_dim;
    const int64_t n = p.total_rows * per_row;
    const bf16* k_src = reinterpret_cast<const bf16*>(p.k_src);
    const bf16* v_src = reinterpret_cast<const bf16*>(p.v_src);
    bf16* k_dst = reinterpret_cast<bf16*>(p.k_dst);
    bf16* v_dst = reinterpret_cast<bf16*>(p.v_dst);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t kept = i / per_row;
        const int e = (int)(i % per_row);
        // Head of this kept row: the last h with row_starts[h] <= kept.
        int lo = 0, hi = p.n_kv_heads - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (p.row_starts[mid] <= kept) lo = mid;
            else hi = mid - 1;
        }
        const int64_t src_row = p.src_rows[kept];
        const int64_t dst_row = p.dst_offsets[lo] + (kept - p.row_starts[lo]);
        cache_copy<VEC>(k_dst + dst_row * p.head_dim, k_src + src_row * p.head_dim, e);
        cache_copy<VEC>(v_dst + dst_row * p.head_dim, v_src + src_row * p.head_dim, e);
    }
}

}  // namespace

// Grid-stride over q_len * n_kv_heads rows x 16-byte vectors (head_dim % 8 == 0).
extern "C" __global__ void kvz_append_vec(KvzAppendParams p) { append_impl<true>(p); }
// Same, one element per thread (any head_dim).
extern "C" __global__ void kvz_append_scalar(KvzAppendParams p) { append_impl<false>(p); }

// Grid-stride over total_rows kept rows x 16-byte vectors (head_dim % 8 == 0).
extern "C" __global__ void kvz_compact_vec(KvzCompactParams p) { compact_impl<true>(p); }
// Same, one element per thread (any head_dim).
extern "C" __global__ void kvz_compact_scalar(KvzCompactParams p) { compact_impl<false>(p); }
