// Shared core of the attention kernels (attention_prefill.cu, attention_decode.cu): one CTA of
// 4 warps computes flash attention (online softmax, FA2 style) for a block of packed query rows
// of ONE KV head over a key range of that head's segment.
//
// Packed rows: row p of a KV head is query token t = p / group, query head h * group + p % group,
// so all `group` query heads of a token share the K/V tiles (GQA packed into M).
// Warps: WM warps along M (16 rows each, BM = 16 * WM rows per CTA) x WN warps along the keys of
// a tile (each warp owns BN / WN keys of every tile, keeps its own softmax state; the WN partial
// states are merged through shared memory at the end). Prefill uses WM = 4, WN = 1; decode with
// few rows uses WN > 1 so that every warp has tensor-core work.
// Tensor cores: mma.sync m16n8k16 bf16 -> f32, operands through ldmatrix from XOR-swizzled
// shared memory; K/V tiles arrive by cp.async, double buffered.
#pragma once
#include "common.cuh"

namespace kvzattn {

constexpr int THREADS = 128;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float NEG_INF = -__builtin_huge_valf();

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; zero-fills the destination when !valid.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b for a 16x16 (row) bf16 A, 16x8 (col) bf16 B, 16x8 f32 C.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of (row, 16-byte chunk) in a swizzled [rows][D] bf16 tile: chunk ^= row % 8, so
// the 8 row addresses of one ldmatrix hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// Tile configuration. Shared memory: Q [BM][D] bf16, K and V [2 stages][BN][D] bf16; after the
// key loop the K/V region is reused to merge the WN warp states (f32, rows padded by 4 floats).
template <int D_, int BN_, int WM_, int WN_>
struct Cfg {
    static constexpr int D = D_, BN = BN_, WM = WM_, WN = WN_;
    static constexpr int BM = 16 * WM;
    static constexpr int KW = BN / WN;  // keys of a tile per warp
    static constexpr int NT = KW / 8;   // 8-key MMA tiles per warp
    static constexpr bool Q_IN_REGS = D <= 128;
    static constexpr int OPAD = D + 4;
    static constexpr int SMEM_Q = BM * D * 2;
    static constexpr int SMEM_KV = 4 * BN * D * 2;
    static constexpr int SMEM_MERGE = WN > 1 ? (WN * BM * OPAD + 2 * WN * BM) * 4 : 0;
    static constexpr int SMEM = SMEM_Q + SMEM_KV;
    static_assert(WM * WN == 4, "4 warps");
    static_assert(KW % 16 == 0, "each warp needs whole 16-key MMA steps");
    static_assert(D % 64 == 0, "swizzle needs >= 8 chunks per row");
    static_assert(SMEM_MERGE <= SMEM_KV, "merge buffer must fit in the K/V region");
};

// Where the CTA's results go. slot < 0: normalised rows to `out` (bf16, q layout); otherwise
// normalised f32 rows to part_o[slot] and natural-log LSE to part_lse[slot].
struct Dest {
    int slot;
    float* part_o;
    float* part_lse;
};

template <int D>
__device__ __forceinline__ void load_rows(uint32_t s_base, const bf16* g_rows, int row0, int nrows,
                                          int row_limit, int tid) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    for (int idx = tid; idx < nrows * CPR; idx += THREADS) {
        const int r = idx / CPR, c = idx % CPR;
        const int key = row0 + r;
        const bool valid = key < row_limit;
        const bf16* src = g_rows + (valid ? (int64_t)key * D : 0) + c * 8;
        cp_async16(s_base + swz<D>(r, c) * 2, src, valid);
    }
}

// Flash attention of packed rows [mb * BM, mb * BM + BM) of KV head h over keys
// [key_lo, key_hi) of its segment (bottom-right causal, window, softcap as in KvzAttentionParams).
// Key index `key` of head h lives at kh / vh + key * D (the caller resolves where).
template <class C>
__device__ __forceinline__ void attend(const KvzAttentionParams& p, int h, int mb, int key_lo,
                                       int key_hi_in, const Dest& dst, const bf16* kh,
                                       const bf16* vh) {
    constexpr int D = C::D, BN = C::BN, BM = C::BM, KW = C::KW, NT = C::NT;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sK = sQ + BM * D;
    bf16* sV = sK + 2 * BN * D;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % C::WM, wn = warp / C::WM;
    const int group = p.group, n_q = p.n_kv_heads * p.group;
    const int rows_total = p.q_len * group;
    const int row0 = mb * BM;
    if (row0 >= rows_total) return;
    const int L = p.lens[h];
    const int last_row = min(row0 + BM, rows_total) - 1;
    const int i_min = L - p.q_len + row0 / group;
    const int i_max = L - p.q_len + last_row / group;
    const int window = p.window;
    const int key_hi = min(key_hi_in, min(L, i_max + 1));
    int first_key = key_lo;
    if (window > 0) first_key = max(first_key, i_min - window + 1);
    const int first_tile = first_key > key_lo ? (first_key - key_lo) / BN : 0;
    const int n_tiles = key_hi > key_lo ? (key_hi - key_lo + BN - 1) / BN : 0;

    // This thread's two rows (g and g + 8 of the warp's 16) and their key index i_t.
    const int ra = wm * 16 + (lane >> 2), rb = ra + 8;
    const int ia = L - p.q_len + min(row0 + ra, rows_total - 1) / group;
    const int ib = L - p.q_len + min(row0 + rb, rows_total - 1) / group;

    // Q rows (zero-filled past rows_total).
    const bf16* q = reinterpret_cast<const bf16*>(p.q);
    {
        constexpr int CPR = D / 8;
        const uint32_t sq = smem_addr(sQ);
        for (int idx = tid; idx < BM * CPR; idx += THREADS) {
            const int r = idx / CPR, c = idx % CPR;
            const int pr = row0 + r;
            const bool valid = pr < rows_total;
            const int t = valid ? pr / group : 0, g = valid ? pr % group : 0;
            const bf16* src = q + ((int64_t)t * n_q + (int64_t)h * group + g) * D + c * 8;
            cp_async16(sq + swz<D>(r, c) * 2, src, valid);
        }
    }
    const uint32_t sk0 = smem_addr(sK), sv0 = smem_addr(sV);
    if (first_tile < n_tiles) {
        const int k0 = key_lo + first_tile * BN;
        load_rows<D>(sk0, kh, k0, BN, key_hi, tid);
        load_rows<D>(sv0, vh, k0, BN, key_hi, tid);
    }
    cp_async_commit();

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    uint32_t qf[C::Q_IN_REGS ? D / 16 : 1][4];
    const uint32_t sq = smem_addr(sQ);
    const int q_row = wm * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
    const bool capped = p.softcap > 0.f;
    const float s_mul = capped ? p.scale / p.softcap : p.scale * LOG2E;
    const float cap_mul = p.softcap * LOG2E;

    for (int it = first_tile; it < n_tiles; ++it) {
        const int stage = (it - first_tile) & 1;
        if (it + 1 < n_tiles) {
            const int k1 = key_lo + (it + 1) * BN;
            load_rows<D>(sk0 + (stage ^ 1) * BN * D * 2, kh, k1, BN, key_hi, tid);
            load_rows<D>(sv0 + (stage ^ 1) * BN * D * 2, vh, k1, BN, key_hi, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (C::Q_IN_REGS && it == first_tile) {
#pragma unroll
            for (int kk = 0; kk < (C::Q_IN_REGS ? D / 16 : 1); ++kk)
                ldsm_x4(sq + swz<D>(q_row, 2 * kk + (lane >> 4)) * 2, qf[kk]);
        }
        // S = Q K^T for this warp's KW keys.
        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        const uint32_t sk = sk0 + stage * BN * D * 2;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            if constexpr (C::Q_IN_REGS) {
#pragma unroll
                for (int j = 0; j < 4; ++j) a[j] = qf[kk][j];
            } else {
                ldsm_x4(sq + swz<D>(q_row, 2 * kk + (lane >> 4)) * 2, a);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t b[4];
                const int kr = wn * KW + np * 16 + (lane >> 4) * 8 + (lane & 7);
                ldsm_x4(sk + swz<D>(kr, 2 * kk + ((lane >> 3) & 1)) * 2, b);
                mma_bf16(s[2 * np], a, b[0], b[1]);
                mma_bf16(s[2 * np + 1], a, b[2], b[3]);
            }
        }
        // Logits in log2 units; mask only tiles that straddle a boundary.
        const int tile_k0 = key_lo + it * BN;
        const bool full = tile_k0 + BN <= key_hi && tile_k0 + BN - 1 <= i_min &&
                          (window <= 0 || i_max - tile_k0 < window);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * s_mul;
                if (capped) x = cap_mul * tanhf(x);
                if (!full) {
                    const int j = tile_k0 + wn * KW + nt * 8 + 2 * (lane & 3) + (e & 1);
                    const int i = e < 2 ? ia : ib;
                    const bool vis = j < key_hi && j <= i && (window <= 0 || i - j < window);
                    x = vis ? x : NEG_INF;
                }
                s[nt][e] = x;
            }
        }
        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
        }
#pragma unroll
        for (int o_ = 1; o_ <= 2; o_ <<= 1) {
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, o_));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, o_));
        }
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        const float base_a = mn_a == NEG_INF ? 0.f : mn_a;
        const float base_b = mn_b == NEG_INF ? 0.f : mn_b;
        const float al_a = exp2f(m_a - base_a), al_b = exp2f(m_b - base_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - base_a);
            s[nt][1] = exp2f(s[nt][1] - base_a);
            s[nt][2] = exp2f(s[nt][2] - base_b);
            s[nt][3] = exp2f(s[nt][3] - base_b);
            sum_a += s[nt][0] + s[nt][1];
            sum_b += s[nt][2] + s[nt][3];
        }
        l_a = l_a * al_a + sum_a;
        l_b = l_b * al_b + sum_b;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][0] *= al_a;
            o[dt][1] *= al_a;
            o[dt][2] *= al_b;
            o[dt][3] *= al_b;
        }
        // O += P V (P re-packed from the S accumulators as the A operand).
        const uint32_t sv = sv0 + stage * BN * D * 2;
#pragma unroll
        for (int kk = 0; kk < KW / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const int vr = wn * KW + kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b[4];
                ldsm_x4_trans(sv + swz<D>(vr, 2 * dp + (lane >> 4)) * 2, b);
                mma_bf16(o[2 * dp], a, b[0], b[1]);
                mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, o_);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, o_);
    }

    bf16* out = reinterpret_cast<bf16*>(p.out);
    auto out_row = [&](int pr) -> int64_t {
        const int t = pr / group, g = pr % group;
        return ((int64_t)t * n_q + (int64_t)h * group + g) * D;
    };
    if constexpr (C::WN == 1) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int pr = row0 + (half ? rb : ra);
            if (pr >= rows_total) continue;
            const float l = half ? l_b : l_a, m = half ? m_b : m_a;
            const float inv = l > 0.f ? 1.f / l : 0.f;
            if (dst.slot < 0) {
                bf16* orow = out + out_row(pr);
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    const int c = dt * 8 + 2 * (lane & 3);
                    *reinterpret_cast<uint32_t*>(orow + c) =
                        pack_bf16x2(o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv);
                }
            } else {
                const int64_t prow = (int64_t)dst.slot * rows_total + pr;
                float* orow = dst.part_o + prow * D;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    const int c = dt * 8 + 2 * (lane & 3);
                    *reinterpret_cast<float2*>(orow + c) =
                        make_float2(o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv);
                }
                if ((lane & 3) == 0) dst.part_lse[prow] = l > 0.f ? (m + log2f(l)) * LN2 : NEG_INF;
            }
        }
    } else {
        // Merge the WN warp states of each row through shared memory (K/V region is free).
        float* so = reinterpret_cast<float*>(sK);
        float* sm = so + C::WN * BM * C::OPAD;
        float* sl = sm + C::WN * BM;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = half ? rb : ra;
            float* orow = so + (wn * BM + r) * C::OPAD;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const int c = dt * 8 + 2 * (lane & 3);
                *reinterpret_cast<float2*>(orow + c) = make_float2(o[dt][2 * half], o[dt][2 * half + 1]);
            }
            if ((lane & 3) == 0) {
                sm[wn * BM + r] = half ? m_b : m_a;
                sl[wn * BM + r] = half ? l_b : l_a;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < BM * (D / 4); idx += THREADS) {
            const int r = idx / (D / 4), c = (idx % (D / 4)) * 4;
            const int pr = row0 + r;
            if (pr >= rows_total) continue;
            float mx = NEG_INF;
#pragma unroll
            for (int w = 0; w < C::WN; ++w) mx = fmaxf(mx, sm[w * BM + r]);
            float acc[4] = {0.f, 0.f, 0.f, 0.f}, l = 0.f;
#pragma unroll
            for (int w = 0; w < C::WN; ++w) {
                const float mw = sm[w * BM + r];
                const float sc = mw == NEG_INF ? 0.f : exp2f(mw - mx);
                l += sl[w * BM + r] * sc;
                const float4 v = *reinterpret_cast<const float4*>(so + (w * BM + r) * C::OPAD + c);
                acc[0] += v.x * sc;
                acc[1] += v.y * sc;
                acc[2] += v.z * sc;
                acc[3] += v.w * sc;
            }
            const float inv = l > 0.f ? 1.f / l : 0.f;
            if (dst.slot < 0) {
                bf16* orow = out + out_row(pr) + c;
                uint2 pk;
                pk.x = pack_bf16x2(acc[0] * inv, acc[1] * inv);
                pk.y = pack_bf16x2(acc[2] * inv, acc[3] * inv);
                *reinterpret_cast<uint2*>(orow) = pk;
            } else {
                const int64_t prow = (int64_t)dst.slot * rows_total + pr;
                *reinterpret_cast<float4*>(dst.part_o + prow * D + c) =
                    make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
                if (c == 0) dst.part_lse[prow] = l > 0.f ? (mx + log2f(l)) * LN2 : NEG_INF;
            }
        }
    }
}

}  // namespace kvzattn
