// Varlen split-K decode over per-KV-head segments (semantics: KvzDecodeParams), or over
// per-item pieces in any buffers (KvzDecodeParams.segments: batched decode of many sequences
// whose keys are a shared context cache plus a private suffix).
// Run kernels kvz_attn_decode_d{D}_r{R}: grid (n_items, ceil(q_len * group / R)), 128 threads;
// R = 16 (1 warp of rows x 4 warps splitting each 64-key tile), 32 (2 x 2) or 64 (4 x 1).
// Dynamic shared memory: kvzattn::Cfg<D, 64, R / 16, 64 / R>::SMEM bytes (mirrored by the host).
// Combine kernel kvz_attn_decode_combine: grid (n_kv_heads, q_len * group), head_dim / 4 threads.
#include "attention_core.cuh"

namespace {
template <int D, int WM>
__device__ __forceinline__ void decode_body(const KvzDecodeParams& p) {
    using C = kvzattn::Cfg<D, 64, WM, 4 / WM>;
    const KvzDecodeWorkItem it = p.items[blockIdx.x];
    const kvzattn::Dest dst{it.partial, p.partial_out, p.partial_lse};
    const bf16 *kh, *vh;
    if (p.segments != nullptr) {
        // The item's piece: key index `key` is row key - key_base of its own buffers.
        const KvzDecodeSegment sg = p.segments[blockIdx.x];
        kh = reinterpret_cast<const bf16*>(sg.k) - sg.key_base * (int64_t)D;
        vh = reinterpret_cast<const bf16*>(sg.v) - sg.key_base * (int64_t)D;
    } else {
        const int64_t seg = p.attn.offsets[it.head];
        kh = reinterpret_cast<const bf16*>(p.attn.k) + seg * D;
        vh = reinterpret_cast<const bf16*>(p.attn.v) + seg * D;
    }
    kvzattn::attend<C>(p.attn, it.head, blockIdx.y, it.key_start, it.key_end, dst, kh, vh);
}
}  // namespace

extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d64_r16(KvzDecodeParams p) {
    decode_body<64, 1>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d64_r32(KvzDecodeParams p) {
    decode_body<64, 2>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d64_r64(KvzDecodeParams p) {
    decode_body<64, 4>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d128_r16(KvzDecodeParams p) {
    decode_body<128, 1>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d128_r32(KvzDecodeParams p) {
    decode_body<128, 2>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d128_r64(KvzDecodeParams p) {
    decode_body<128, 4>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d256_r16(KvzDecodeParams p) {
    decode_body<256, 1>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d256_r32(KvzDecodeParams p) {
    decode_body<256, 2>(p);
}
extern "C" __global__ __launch_bounds__(128) void kvz_attn_decode_d256_r64(KvzDecodeParams p) {
    decode_body<256, 4>(p);
}

// Merges the partial slots of each head by log-sum-exp; heads without slots (single work item,
// written directly by the run kernel) are skipped. Each thread owns 4 output columns.
extern "C" __global__ void kvz_attn_decode_combine(KvzDecodeParams p) {
    const int h = blockIdx.x, pr = blockIdx.y;
    const KvzAttentionParams& a = p.attn;
    const int s0 = p.head_partials[h], s1 = p.head_partials[h + 1];
    if (s1 <= s0) return;
    const int rows = a.q_len * a.group, d = a.head_dim;
    const int c = threadIdx.x * 4;
    if (c >= d) return;
    float mx = kvzattn::NEG_INF;
    for (int s = s0; s < s1; ++s) mx = fmaxf(mx, p.partial_lse[(int64_t)s * rows + pr]);
    float acc[4] = {0.f, 0.f, 0.f, 0.f}, total = 0.f;
    if (mx != kvzattn::NEG_INF) {
        for (int s = s0; s < s1; ++s) {
            const int64_t prow = (int64_t)s * rows + pr;
            const float lse = p.partial_lse[prow];
            if (lse == kvzattn::NEG_INF) continue;
            const float w = __expf(lse - mx);
            total += w;
            const float4 v = *reinterpret_cast<const float4*>(p.partial_out + prow * d + c);
            acc[0] += w * v.x;
            acc[1] += w * v.y;
            acc[2] += w * v.z;
            acc[3] += w * v.w;
        }
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    const int t = pr / a.group, g = pr % a.group;
    bf16* out = reinterpret_cast<bf16*>(a.out) +
                ((int64_t)t * a.n_kv_heads * a.group + (int64_t)h * a.group + g) * d + c;
    uint2 pk;
    pk.x = kvzattn::pack_bf16x2(acc[0] * inv, acc[1] * inv);
    pk.y = kvzattn::pack_bf16x2(acc[2] * inv, acc[3] * inv);
    *reinterpret_cast<uint2*>(out) = pk;
}
