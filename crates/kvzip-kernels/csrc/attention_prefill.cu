// Flash-attention prefill over per-KV-head segments (semantics: KvzAttentionParams).
// Grid: (ceil(q_len * group / 64), n_kv_heads); block: 128 threads (4 warps x 16 packed rows).
// blockIdx.x is reversed so that the row blocks with the most causal keys start first.
// Dynamic shared memory: kvzattn::Cfg<D, BN, 4, 1>::SMEM bytes (the host mirrors the formula).
#include "attention_core.cuh"

namespace {
template <int D, int BN>
__device__ __forceinline__ void prefill_body(const KvzAttentionParams& p) {
    using C = kvzattn::Cfg<D, BN, 4, 1>;
    const int mb = gridDim.x - 1 - blockIdx.x;
    const kvzattn::Dest dst{-1, nullptr, nullptr};
    kvzattn::attend<C>(p, blockIdx.y, mb, 0, 0x7fffffff, dst);
}
}  // namespace

extern "C" __global__ __launch_bounds__(128) void kvz_attn_prefill_d64(KvzAttentionParams p) {
    prefill_body<64, 64>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_prefill_d128(KvzAttentionParams p) {
    prefill_body<128, 64>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_prefill_d256(KvzAttentionParams p) {
    prefill_body<256, 32>(p);
}
