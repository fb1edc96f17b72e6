// Element-wise and row-wise kernels: RMSNorm (+ fused residual add, Gemma's (1 + w)), RoPE,
// SwiGLU / GeGLU(tanh), embedding, residual / bias add, softcap + argmax / Gumbel sampling.
// bf16 storage, f32 arithmetic, one rounding per output.
#include "common.cuh"

// One block per row. Vector path when dim % 8 == 0.
extern "C" __global__ void kvz_rms_norm(KvzRmsNormParams p) {
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    bf16* x = reinterpret_cast<bf16*>(p.x) + (int64_t)row * p.dim;
    const bf16* res = p.residual ? reinterpret_cast<const bf16*>(p.residual) + (int64_t)row * p.dim : nullptr;
    const bf16* w = reinterpret_cast<const bf16*>(p.weight);
    bf16* out = reinterpret_cast<bf16*>(p.out) + (int64_t)row * p.dim;
    float ss = 0.f;
    if (p.dim % 8 == 0) {
        for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
            float v[8];
            kvz_load8(x + i, v);
            if (res) {
                float r[8];
                kvz_load8(res + i, r);
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = kvz_bf16_to_f32(kvz_f32_to_bf16(v[j] + r[j]));
                kvz_store8(x + i, v);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
        }
    } else {
        for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
            float v = kvz_bf16_to_f32(x[i]);
            if (res) {
                bf16 h = kvz_f32_to_bf16(v + kvz_bf16_to_f32(res[i]));
                x[i] = h;
                v = kvz_bf16_to_f32(h);
            }
            ss += v * v;
        }
    }
    ss = kvz_block_sum(ss);
    const float inv = rsqrtf(ss / (float)p.dim + p.eps);
    // Each thread re-reads only the elements it wrote itself (same index mapping): no barrier needed.
    if (p.dim % 8 == 0) {
        for (int i = threadIdx.x * 8; i < p.dim; i += blockDim.x * 8) {
            float v[8], wv[8];
            kvz_load8(x + i, v);
            kvz_load8(w + i, wv);
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = v[j] * inv * (wv[j] + p.weight_offset);
            kvz_store8(out + i, v);
        }
    } else {
        for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
            float v = kvz_bf16_to_f32(x[i]);
            out[i] = kvz_f32_to_bf16(v * inv * (kvz_bf16_to_f32(w[i]) + p.weight_offset));
        }
    }
}

// Grid (tokens, heads_q + heads_kv); each thread rotates pairs (i, i + rot_half).
extern "C" __global__ void kvz_rope(KvzRopeParams p) {
    const int t = blockIdx.x;
    int head = blockIdx.y;
    bf16* base;
    if (head < p.n_q_heads) {
        base = reinterpret_cast<bf16*>(p.q) + ((int64_t)t * p.n_q_heads + head) * p.head_dim;
    } else {
        if (!p.k) return;
        head -= p.n_q_heads;
        base = reinterpret_cast<bf16*>(p.k) + ((int64_t)t * p.n_kv_heads + head) * p.head_dim;
    }
    const float pos = (float)p.positions[t];
    for (int i = threadIdx.x; i < p.rot_half; i += blockDim.x) {
        const float angle = pos * p.inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        c *= p.attention_factor;
        s *= p.attention_factor;
        const float a = kvz_bf16_to_f32(base[i]);
        const float b = kvz_bf16_to_f32(base[i + p.rot_half]);
        base[i] = kvz_f32_to_bf16(a * c - b * s);
        base[i + p.rot_half] = kvz_f32_to_bf16(b * c + a * s);
    }
}

// Grid-stride over rows * inter elements.
extern "C" __global__ void kvz_act_mul(KvzActMulParams p) {
    const bf16* gu = reinterpret_cast<const bf16*>(p.gate_up);
    bf16* out = reinterpret_cast<bf16*>(p.out);
    const int64_t n = (int64_t)p.rows * p.inter;
    if (p.inter % 8 == 0) {
        for (int64_t e = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8; e < n;
             e += (int64_t)gridDim.x * blockDim.x * 8) {
            const int64_t r = e / p.inter, i = e % p.inter;
            float g[8], u[8], o[8];
            kvz_load8(gu + r * 2 * p.inter + i, g);
            kvz_load8(gu + r * 2 * p.inter + p.inter + i, u);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = kvz_act(g[j], p.act) * u[j];
            kvz_store8(out + e, o);
        }
    } else {
        for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n;
             e += (int64_t)gridDim.x * blockDim.x) {
            const int64_t r = e / p.inter, i = e % p.inter;
            const float g = kvz_bf16_to_f32(gu[r * 2 * p.inter + i]);
            const float u = kvz_bf16_to_f32(gu[r * 2 * p.inter + p.inter + i]);
            out[e] = kvz_f32_to_bf16(kvz_act(g, p.act) * u);
        }
    }
}

// One block per id.
extern "C" __global__ void kvz_embedding(KvzEmbeddingParams p) {
    const int i = blockIdx.x;
    if (i >= p.n) return;
    const uint32_t id = p.ids[i];
    bf16* out = reinterpret_cast<bf16*>(p.out) + (int64_t)i * p.dim;
    const bf16* row = reinterpret_cast<const bf16*>(p.table) + (int64_t)id * p.dim;
    for (int c = threadIdx.x; c < p.dim; c += blockDim.x) {
        out[c] = id < (uint32_t)p.vocab ? kvz_f32_to_bf16(kvz_bf16_to_f32(row[c]) * p.scale)
                                        : kvz_f32_to_bf16(0.f);
    }
}

// x += y, or x[r, c] += bias[c] when bias is set. Grid-stride.
extern "C" __global__ void kvz_add(KvzAddParams p) {
    bf16* x = reinterpret_cast<bf16*>(p.x);
    const bf16* y = reinterpret_cast<const bf16*>(p.y);
    const bf16* bias = reinterpret_cast<const bf16*>(p.bias);
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const float add = bias ? kvz_bf16_to_f32(bias[e % p.cols]) : kvz_bf16_to_f32(y[e]);
        x[e] = kvz_f32_to_bf16(kvz_bf16_to_f32(x[e]) + add);
    }
}

// SplitMix64-style finaliser: a counter-based hash giving independent uniform bits.
__device__ __forceinline__ uint64_t kvz_mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Better of two (value, index) candidates: larger value, then smaller index.
__device__ __forceinline__ void argmax_merge(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// Final-logit softcapping in place. Grid-stride.
extern "C" __global__ void kvz_softcap(KvzSoftcapParams p) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.n;
         e += (int64_t)gridDim.x * blockDim.x) {
        p.x[e] = p.cap * tanhf(p.x[e] / p.cap);
    }
}

// One block per row (blockDim 1024): softcap in place, then argmax or a Gumbel-max sample.
extern "C" __global__ void kvz_sample(KvzSampleParams p) {
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    float* logits = p.logits + (int64_t)row * p.vocab;
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    const uint64_t stream = kvz_mix(p.seed ^ kvz_mix(p.step * 0x100000001B3ull + row));
    for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
        float v = logits[i];
        if (p.softcap > 0.f) {
            v = p.softcap * tanhf(v / p.softcap);
            logits[i] = v;
        }
        if (p.temperature > 0.f) {
            const uint64_t bits = kvz_mix(stream + (uint64_t)i);
            // Uniform in (0, 1): 23 random bits offset by half a step, exact in f32 (so u < 1
            // strictly: 53 bits rounded to f32 gave u == 1 and an infinite Gumbel draw about once
            // per 3e7 elements, i.e. a uniformly random token every few hundred steps).
            const float u = ((float)(bits >> 41) + 0.5f) * (1.0f / 8388608.0f);
            v = v / p.temperature - logf(-logf(u));
        }
        if (v != v) v = -INFINITY;  // NaN never wins
        argmax_merge(best, best_i, v, i);
    }
#pragma unroll
    for (int o = KVZ_WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        argmax_merge(best, best_i, ov, oi);
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x % KVZ_WARP, warp = threadIdx.x / KVZ_WARP;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = best_i;
    }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = blockDim.x / KVZ_WARP;
        best = lane < n_warps ? sv[lane] : -INFINITY;
        best_i = lane < n_warps ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = KVZ_WARP / 2; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
            argmax_merge(best, best_i, ov, oi);
        }
        if (lane == 0) p.out[row] = best_i == 0x7fffffff ? 0u : (uint32_t)best_i;
    }
}
