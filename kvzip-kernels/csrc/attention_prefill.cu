// Flash-attention prefill over per-KV-head segments (semantics: KvzAttentionParams).
//
// One CTA of 4 warps per (KV head, BM = 64 * RG packed query rows); each warp owns RG groups of
// 16 rows, so every K / V fragment read from shared memory by ldmatrix feeds RG tensor-core MMAs
// (FA2 layout). d = 64, 128: RG = 2 (half the shared-memory traffic per MMA of 16 rows per warp,
// half the global K/V reads per query row; H200 at 32K: d = 128 236 -> 297 TFLOP/s, d = 64
// 191 -> 230). d = 256: RG = 1 (an RG = 2 O accumulator alone would need 256 registers).
// Uses the shared helpers of attention_core.cuh (cp.async, ldmatrix, mma, swizzle) but not its
// attend(), so the decode kernel is unaffected by prefill tuning.
// Grid: (ceil(q_len * group / BM), n_kv_heads); block: 128 threads. blockIdx.x is reversed so
// that the row blocks with the most causal keys start first.
// Dynamic shared memory: Q [BM][D] + K, V [2 stages][BN][D] bf16 (the host mirrors the formula:
// BM = 128, BN = 64 for d = 64, 128; BM = 64, BN = 32 for d = 256).
#include "attention_core.cuh"

namespace {
using namespace kvzattn;

// 2^x by the SFU (flushes denormal results to zero; 2^-inf = 0), no range fix-up code.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

template <int D_, int BN_, int RG_, bool FAST_>
struct WideCfg {
    static constexpr int D = D_, BN = BN_, RG = RG_;
    // FAST: the scale folds into the exponent's FMA and 2^x is one ex2.approx.ftz (H200: d = 128
    // 297 -> 303 TFLOP/s, d = 256 (with RG = 1) 219 -> 252; d = 64 measured slower, 230 -> 221).
    static constexpr bool FAST = FAST_;
    static constexpr int BM = 4 * 16 * RG;  // packed rows per CTA
    static constexpr int NT = BN / 8;       // 8-key MMA tiles per key tile
    // Q fragments stay in registers when they are few (d = 64); otherwise ldmatrix per step.
    static constexpr bool Q_IN_REGS = RG * D <= 128 && BN <= 64;
    static_assert(BN % 16 == 0 && D % 64 == 0, "tile shape");
};

// Flash attention of packed rows [mb * BM, mb * BM + BM) of KV head h over its whole segment
// (bottom-right causal, window, softcap as in KvzAttentionParams); normalised bf16 rows to out.
template <class C>
__device__ __forceinline__ void attend_wide(const KvzAttentionParams& p, int h, int mb) {
    constexpr int D = C::D, BN = C::BN, BM = C::BM, NT = C::NT, RG = C::RG;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sK = sQ + BM * D;
    bf16* sV = sK + 2 * BN * D;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = p.group, n_q = p.n_kv_heads * p.group;
    const int rows_total = p.q_len * group;
    const int row0 = mb * BM;
    if (row0 >= rows_total) return;
    const int L = p.lens[h];
    const int64_t seg = p.offsets[h];
    const bf16* kh = reinterpret_cast<const bf16*>(p.k) + seg * D;
    const bf16* vh = reinterpret_cast<const bf16*>(p.v) + seg * D;
    const int last_row = min(row0 + BM, rows_total) - 1;
    const int i_min = L - p.q_len + row0 / group;
    const int i_max = L - p.q_len + last_row / group;
    const int window = p.window;
    const int key_hi = min(L, i_max + 1);
    const int first_key = window > 0 ? max(0, i_min - window + 1) : 0;
    const int first_tile = first_key / BN;
    const int n_tiles = key_hi > 0 ? (key_hi + BN - 1) / BN : 0;

    // This thread's rows: warp * 16 * RG + rg * 16 + lane / 4 (+ 8), and their key index i_t.
    const int wrow = warp * 16 * RG;
    int irow[RG][2];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = wrow + rg * 16 + (lane >> 2) + hf * 8;
            irow[rg][hf] = L - p.q_len + min(row0 + r, rows_total - 1) / group;
        }

    // Q rows (zero-filled past rows_total).
    const bf16* q = reinterpret_cast<const bf16*>(p.q);
    const uint32_t sq = smem_addr(sQ);
    {
        constexpr int CPR = D / 8;
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
        const int k0 = first_tile * BN;
        load_rows<D>(sk0, kh, k0, BN, key_hi, tid);
        load_rows<D>(sv0, vh, k0, BN, key_hi, tid);
    }
    cp_async_commit();

    float o[RG][D / 8][4];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[rg][i][0] = o[rg][i][1] = o[rg][i][2] = o[rg][i][3] = 0.f;
    float m[RG][2], l[RG][2];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg) {
        m[rg][0] = m[rg][1] = NEG_INF;
        l[rg][0] = l[rg][1] = 0.f;
    }
    uint32_t qf[C::Q_IN_REGS ? RG : 1][C::Q_IN_REGS ? D / 16 : 1][4];
    const int q_row = wrow + ((lane >> 3) & 1) * 8 + (lane & 7);  // + rg * 16
    // Swizzled byte offsets: every ldmatrix row of this lane has row % 8 == lane % 8, so chunk
    // 2 * kk + c lands at ((2 * (kk % 4) + c) ^ lane % 8) * 16 + (kk / 4) * 128 bytes: four
    // per-lane values per pattern, the rest immediates (keeps address registers few).
    uint32_t xa[4], xb[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        xa[j] = ((2 * j + (lane >> 4)) ^ (lane & 7)) << 4;
        xb[j] = ((2 * j + ((lane >> 3) & 1)) ^ (lane & 7)) << 4;
    }
    const uint32_t q_base = sq + q_row * D * 2;
    const uint32_t k_lane = ((lane >> 4) * 8 + (lane & 7)) * D * 2;
    const uint32_t v_lane = (((lane >> 3) & 1) * 8 + (lane & 7)) * D * 2;
    const bool capped = p.softcap > 0.f;
    const float s_mul = capped ? p.scale / p.softcap : p.scale * LOG2E;
    const float cap_mul = p.softcap * LOG2E;
    // Without softcap and with a positive scale, logits stay raw (max commutes with the scale)
    // and the scale folds into the exponent's FMA: exp2(s * mul - m), m in log2 units.
    const bool fold = C::FAST && !capped && s_mul > 0.f;
    const float mul = fold ? s_mul : 1.f;

    for (int it = first_tile; it < n_tiles; ++it) {
        const int stage = (it - first_tile) & 1;
        if (it + 1 < n_tiles) {
            const int k1 = (it + 1) * BN;
            load_rows<D>(sk0 + (stage ^ 1) * BN * D * 2, kh, k1, BN, key_hi, tid);
            load_rows<D>(sv0 + (stage ^ 1) * BN * D * 2, vh, k1, BN, key_hi, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if constexpr (C::Q_IN_REGS) {
            if (it == first_tile) {
#pragma unroll
                for (int rg = 0; rg < (C::Q_IN_REGS ? RG : 1); ++rg)
#pragma unroll
                    for (int kk = 0; kk < (C::Q_IN_REGS ? D / 16 : 1); ++kk)
                        ldsm_x4(q_base + rg * 16 * D * 2 + xa[kk & 3] + (kk >> 2) * 128,
                                qf[rg][kk]);
            }
        }
        // S = Q K^T: each K fragment feeds RG MMAs.
        float s[RG][NT][4];
#pragma unroll
        for (int rg = 0; rg < RG; ++rg)
#pragma unroll
            for (int i = 0; i < NT; ++i) s[rg][i][0] = s[rg][i][1] = s[rg][i][2] = s[rg][i][3] = 0.f;
        const uint32_t sk = sk0 + stage * BN * D * 2 + k_lane;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[RG][4];
#pragma unroll
            for (int rg = 0; rg < RG; ++rg) {
                if constexpr (C::Q_IN_REGS) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) a[rg][j] = qf[rg][kk][j];
                } else {
                    ldsm_x4(q_base + rg * 16 * D * 2 + xa[kk & 3] + (kk >> 2) * 128, a[rg]);
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t b[4];
                ldsm_x4(sk + np * 16 * D * 2 + xb[kk & 3] + (kk >> 2) * 128, b);
#pragma unroll
                for (int rg = 0; rg < RG; ++rg) {
                    mma_bf16(s[rg][2 * np], a[rg], b[0], b[1]);
                    mma_bf16(s[rg][2 * np + 1], a[rg], b[2], b[3]);
                }
            }
        }
        // Logits in log2 units; mask only tiles that straddle a boundary.
        const int tile_k0 = it * BN;
        const bool full = tile_k0 + BN <= key_hi && tile_k0 + BN - 1 <= i_min &&
                          (window <= 0 || i_max - tile_k0 < window);
#pragma unroll
        for (int rg = 0; rg < RG; ++rg) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[rg][nt][e];
                    if (!fold) {
                        x *= s_mul;
                        if (capped) x = cap_mul * tanhf(x);
                    }
                    if (!full) {
                        const int j = tile_k0 + nt * 8 + 2 * (lane & 3) + (e & 1);
                        const int i = irow[rg][e >> 1];
                        const bool vis = j < key_hi && j <= i && (window <= 0 || i - j < window);
                        x = vis ? x : NEG_INF;
                    }
                    s[rg][nt][e] = x;
                }
            }
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                mx[0] = fmaxf(mx[0], fmaxf(s[rg][nt][0], s[rg][nt][1]));
                mx[1] = fmaxf(mx[1], fmaxf(s[rg][nt][2], s[rg][nt][3]));
            }
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
                for (int o_ = 1; o_ <= 2; o_ <<= 1)
                    mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], o_));
            }
            float base[2], alpha[2], sum[2] = {0.f, 0.f};
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const float mn = fmaxf(m[rg][hf], C::FAST ? mx[hf] * mul : mx[hf]);
                base[hf] = mn == NEG_INF ? 0.f : mn;
                alpha[hf] = C::FAST ? fast_exp2(m[rg][hf] - base[hf]) : exp2f(m[rg][hf] - base[hf]);
                m[rg][hf] = mn;
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float x = s[rg][nt][e];
                    s[rg][nt][e] = C::FAST ? fast_exp2(fmaf(x, mul, -base[e >> 1]))
                                           : exp2f(x - base[e >> 1]);
                    sum[e >> 1] += s[rg][nt][e];
                }
            }
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) l[rg][hf] = l[rg][hf] * alpha[hf] + sum[hf];
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[rg][dt][0] *= alpha[0];
                o[rg][dt][1] *= alpha[0];
                o[rg][dt][2] *= alpha[1];
                o[rg][dt][3] *= alpha[1];
            }
        }
        // O += P V (P re-packed from the S accumulators as the A operand); each V fragment
        // feeds RG MMAs.
        const uint32_t sv = sv0 + stage * BN * D * 2 + v_lane;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[RG][4];
#pragma unroll
            for (int rg = 0; rg < RG; ++rg) {
                a[rg][0] = pack_bf16x2(s[rg][2 * kk][0], s[rg][2 * kk][1]);
                a[rg][1] = pack_bf16x2(s[rg][2 * kk][2], s[rg][2 * kk][3]);
                a[rg][2] = pack_bf16x2(s[rg][2 * kk + 1][0], s[rg][2 * kk + 1][1]);
                a[rg][3] = pack_bf16x2(s[rg][2 * kk + 1][2], s[rg][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b[4];
                ldsm_x4_trans(sv + kk * 16 * D * 2 + xa[dp & 3] + (dp >> 2) * 128, b);
#pragma unroll
                for (int rg = 0; rg < RG; ++rg) {
                    mma_bf16(o[rg][2 * dp], a[rg], b[0], b[1]);
                    mma_bf16(o[rg][2 * dp + 1], a[rg], b[2], b[3]);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    bf16* out = reinterpret_cast<bf16*>(p.out);
#pragma unroll
    for (int rg = 0; rg < RG; ++rg) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float lt = l[rg][hf];
#pragma unroll
            for (int o_ = 1; o_ <= 2; o_ <<= 1) lt += __shfl_xor_sync(0xffffffffu, lt, o_);
            const int pr = row0 + wrow + rg * 16 + (lane >> 2) + hf * 8;
            if (pr >= rows_total) continue;
            const float inv = lt > 0.f ? 1.f / lt : 0.f;
            const int t = pr / group, g = pr % group;
            bf16* orow = out + ((int64_t)t * n_q + (int64_t)h * group + g) * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const int c = dt * 8 + 2 * (lane & 3);
                *reinterpret_cast<uint32_t*>(orow + c) =
                    pack_bf16x2(o[rg][dt][2 * hf] * inv, o[rg][dt][2 * hf + 1] * inv);
            }
        }
    }
}

template <int D, int BN, int RG, bool FAST>
__device__ __forceinline__ void prefill_wide(const KvzAttentionParams& p) {
    attend_wide<WideCfg<D, BN, RG, FAST>>(p, blockIdx.y, gridDim.x - 1 - blockIdx.x);
}
}  // namespace

extern "C" __global__ __launch_bounds__(128, 2) void kvz_attn_prefill_d64(KvzAttentionParams p) {
    prefill_wide<64, 64, 2, false>(p);
}
extern "C" __global__ __launch_bounds__(128, 2) void kvz_attn_prefill_d128(KvzAttentionParams p) {
    prefill_wide<128, 64, 2, true>(p);
}
extern "C" __global__ __launch_bounds__(128, 2) void kvz_attn_prefill_d256(KvzAttentionParams p) {
    prefill_wide<256, 32, 1, true>(p);
}
