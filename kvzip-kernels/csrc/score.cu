// KVzip reconstruction score of one chunk (KVZIP-SPEC §1.2), two passes on tensor cores
// (mma.sync m16n8k16, bf16 operands, f32 accumulation); nothing of size rows x keys is stored.
//
// Query rows of KV head h are ordered r = t * group + g (t: input token, g: query head in the
// group), so the rows of one token are adjacent in memory and share the causal limit.
// Virtual key index j of head h: [0, n_sys) system rows, [n_sys, n_sys + chunk_len) the chunk's
// rows chunk_start.., then the input's own rows lens[h] - n_in ..; row r sees j < n_sys +
// chunk_len + t + 1.
//
// Pass 1 (kvz_score_lse_d*): a CTA of 8 warps owns 128 query rows (16 per warp, Q fragments in
// registers) and streams 64-key tiles of K through shared memory (cp.async, double-buffered),
// keeping a per-thread online max / sum in the log2 domain; writes row_lse (natural log).
// Pass 2 (kvz_score_max_d*): a CTA of 8 warps owns 128 chunk keys (16 per warp, K fragments in
// registers, computing S^T = K Q^T so a column max is a per-thread max) and streams 64-row tiles
// of Q and their LSE through shared memory; a row split (gridDim.y) divides the rows, and the
// per-key maxima meet in global memory through an atomic max on non-negative floats.
#include "common.cuh"

namespace {

constexpr int SC_WARPS = 8;
constexpr int SC_THREADS = SC_WARPS * KVZ_WARP;
constexpr int SC_TILE = 64;  // keys (pass 1) or query rows (pass 2) per shared-memory tile
constexpr float SC_LOG2E = 1.4426950408889634f;
constexpr float SC_LN2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t sc_smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; zero-fills when !valid (src must still be a valid address).
__device__ __forceinline__ void sc_cp_async16(void* dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sc_smem_addr(dst)),
                 "l"(src), "r"(n));
}
__device__ __forceinline__ void sc_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void sc_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void sc_ldmatrix_x4(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(sc_smem_addr(p)));
}

// c += a (16x16, row) * b (16x8, col), bf16 in, f32 accumulate.
__device__ __forceinline__ void sc_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t sc_ld32(const bf16* p) {
    return p ? *reinterpret_cast<const uint32_t*>(p) : 0u;
}

// Loads the 16 x D operand whose rows start at row_lo / row_hi (row gid and gid + 8 of the
// fragment; nullptr = zero row) as KS = D / 16 A fragments of m16n8k16.
template <int D>
__device__ __forceinline__ void sc_load_a(uint32_t a[D / 16][4], const bf16* row_lo,
                                          const bf16* row_hi, int tid4) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int c = kk * 16 + 2 * tid4;
        a[kk][0] = sc_ld32(row_lo ? row_lo + c : nullptr);
        a[kk][1] = sc_ld32(row_hi ? row_hi + c : nullptr);
        a[kk][2] = sc_ld32(row_lo ? row_lo + c + 8 : nullptr);
        a[kk][3] = sc_ld32(row_hi ? row_hi + c + 8 : nullptr);
    }
}

// acc[nt] += A (16 x D, fragments a) * tile rows nt*8 .. nt*8+8 of a [64][D + 8] smem tile
// (each tile row is one column of B), for all 8 column blocks nt.
template <int D>
__device__ __forceinline__ void sc_tile_mma(float acc[8][4], const uint32_t a[D / 16][4],
                                            const bf16* tile, int lane) {
    constexpr int LD = D + 8;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
    for (int k2 = 0; k2 < D / 32; ++k2) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            uint32_t b[4];
            sc_ldmatrix_x4(b, tile + (nt * 8 + (lane & 7)) * LD + k2 * 32 + (lane >> 3) * 8);
            sc_mma(acc[nt], a[2 * k2], b[0], b[1]);
            sc_mma(acc[nt], a[2 * k2 + 1], b[2], b[3]);
        }
    }
}

// Head geometry shared by both passes.
struct ScHead {
    const bf16* q;  // query head h * group of token 0
    const bf16* k;  // row 0 of the head's segment
    int n_rows, n_q, group, n_sys, chunk_start, chunk_len, self_start;

    __device__ ScHead(const KvzScoreParams& p, int h, int d) {
        n_rows = p.n_in * p.group;
        n_q = p.n_kv_heads * p.group;
        group = p.group;
        n_sys = p.n_sys;
        chunk_start = p.chunk_start;
        chunk_len = p.chunk_len;
        self_start = p.lens[h] - p.n_in;
        q = reinterpret_cast<const bf16*>(p.q) + (int64_t)h * p.group * d;
        k = reinterpret_cast<const bf16*>(p.k) + p.offsets[h] * d;
    }
    // Query row r (< n_rows) of this head.
    __device__ __forceinline__ const bf16* q_row(int r, int d) const {
        return q + ((int64_t)(r / group) * n_q + r % group) * d;
    }
    // Key of virtual index j.
    __device__ __forceinline__ const bf16* key(int j, int d) const {
        int row;
        if (j < n_sys) row = j;
        else if (j < n_sys + chunk_len) row = chunk_start + (j - n_sys);
        else row = self_start + (j - n_sys - chunk_len);
        return k + (int64_t)row * d;
    }
};

template <int D>
__device__ __forceinline__ void score_lse(const KvzScoreParams& p) {
    constexpr int KS = D / 16, LD = D + 8, CH = D / 8;
    extern __shared__ __align__(16) unsigned char sc_smem[];
    bf16* ktiles = reinterpret_cast<bf16*>(sc_smem);  // [2][SC_TILE][LD]
    const int h = blockIdx.y;
    const ScHead hd(p, h, D);
    const int warp = threadIdx.x / KVZ_WARP, lane = threadIdx.x % KVZ_WARP;
    const int gid = lane >> 2, tid4 = lane & 3;
    const int row0 = blockIdx.x * (SC_WARPS * 16);
    if (row0 >= hd.n_rows) return;
    const int ra = row0 + warp * 16 + gid, rb = ra + 8;
    const int n_ctx = hd.n_sys + hd.chunk_len;
    uint32_t qa[KS][4];
    sc_load_a<D>(qa, ra < hd.n_rows ? hd.q_row(ra, D) : nullptr,
                 rb < hd.n_rows ? hd.q_row(rb, D) : nullptr, tid4);
    const int vis_a = ra < hd.n_rows ? n_ctx + ra / hd.group + 1 : 0;
    const int vis_b = rb < hd.n_rows ? n_ctx + rb / hd.group + 1 : 0;
    const int last_row = min(row0 + SC_WARPS * 16, hd.n_rows) - 1;
    const int n_keys = n_ctx + last_row / hd.group + 1;
    const int n_tiles = (n_keys + SC_TILE - 1) / SC_TILE;
    const float sl2 = p.scale * SC_LOG2E;

    auto load_tile = [&](int tile, int buf) {
        bf16* dst = ktiles + buf * SC_TILE * LD;
        for (int i = threadIdx.x; i < SC_TILE * CH; i += SC_THREADS) {
            const int r = i / CH, c = i % CH, j = tile * SC_TILE + r;
            const bool valid = j < n_keys;
            sc_cp_async16(dst + r * LD + c * 8, valid ? hd.key(j, D) + c * 8 : hd.k, valid);
        }
        sc_cp_commit();
    };

    float m_a = -1e30f, m_b = -1e30f, l_a = 0.f, l_b = 0.f;
    load_tile(0, 0);
    for (int tile = 0; tile < n_tiles; ++tile) {
        if (tile + 1 < n_tiles) {
            load_tile(tile + 1, (tile + 1) & 1);
            sc_cp_wait<1>();
        } else {
            sc_cp_wait<0>();
        }
        __syncthreads();
        float s[8][4];
        sc_tile_mma<D>(s, qa, ktiles + (tile & 1) * SC_TILE * LD, lane);
        const int kbase = tile * SC_TILE;
        float t_a = -INFINITY, t_b = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = kbase + nt * 8 + 2 * tid4 + e;
                s[nt][e] = col < vis_a ? s[nt][e] * sl2 : -INFINITY;
                s[nt][2 + e] = col < vis_b ? s[nt][2 + e] * sl2 : -INFINITY;
                t_a = fmaxf(t_a, s[nt][e]);
                t_b = fmaxf(t_b, s[nt][2 + e]);
            }
        const float n_a = fmaxf(m_a, t_a), n_b = fmaxf(m_b, t_b);
        l_a *= exp2f(m_a - n_a);
        l_b *= exp2f(m_b - n_b);
        m_a = n_a;
        m_b = n_b;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                l_a += exp2f(s[nt][e] - m_a);
                l_b += exp2f(s[nt][2 + e] - m_b);
            }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    // Merge the four lanes that share a row.
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        const float om_a = __shfl_xor_sync(0xffffffffu, m_a, o);
        const float ol_a = __shfl_xor_sync(0xffffffffu, l_a, o);
        const float om_b = __shfl_xor_sync(0xffffffffu, m_b, o);
        const float ol_b = __shfl_xor_sync(0xffffffffu, l_b, o);
        const float n_a = fmaxf(m_a, om_a), n_b = fmaxf(m_b, om_b);
        l_a = l_a * exp2f(m_a - n_a) + ol_a * exp2f(om_a - n_a);
        l_b = l_b * exp2f(m_b - n_b) + ol_b * exp2f(om_b - n_b);
        m_a = n_a;
        m_b = n_b;
    }
    if (tid4 == 0) {
        float* lse = p.row_lse + (int64_t)h * hd.n_rows;
        if (ra < hd.n_rows) lse[ra] = (m_a + log2f(l_a)) * SC_LN2;
        if (rb < hd.n_rows) lse[rb] = (m_b + log2f(l_b)) * SC_LN2;
    }
}

template <int D>
__device__ __forceinline__ void score_max(const KvzScoreParams& p) {
    constexpr int KS = D / 16, LD = D + 8, CH = D / 8;
    extern __shared__ __align__(16) unsigned char sc_smem[];
    bf16* qtiles = reinterpret_cast<bf16*>(sc_smem);                          // [2][SC_TILE][LD]
    float* lse2 = reinterpret_cast<float*>(qtiles + 2 * SC_TILE * LD);       // [2][SC_TILE]
    const int h = blockIdx.z;
    const ScHead hd(p, h, D);
    const int warp = threadIdx.x / KVZ_WARP, lane = threadIdx.x % KVZ_WARP;
    const int gid = lane >> 2, tid4 = lane & 3;
    const int n_row_tiles = (hd.n_rows + SC_TILE - 1) / SC_TILE;
    const int per_split = (n_row_tiles + gridDim.y - 1) / gridDim.y;
    const int t0 = blockIdx.y * per_split, t1 = min(t0 + per_split, n_row_tiles);
    if (t0 >= t1) return;
    const int ca = blockIdx.x * (SC_WARPS * 16) + warp * 16 + gid, cb = ca + 8;
    uint32_t ka[KS][4];
    sc_load_a<D>(ka, ca < hd.chunk_len ? hd.k + (int64_t)(hd.chunk_start + ca) * D : nullptr,
                 cb < hd.chunk_len ? hd.k + (int64_t)(hd.chunk_start + cb) * D : nullptr, tid4);
    const float* row_lse = p.row_lse + (int64_t)h * hd.n_rows;
    const float sl2 = p.scale * SC_LOG2E;

    auto load_tile = [&](int tile, int buf) {
        bf16* dst = qtiles + buf * SC_TILE * LD;
        for (int i = threadIdx.x; i < SC_TILE * CH; i += SC_THREADS) {
            const int r = i / CH, c = i % CH, row = tile * SC_TILE + r;
            const bool valid = row < hd.n_rows;
            sc_cp_async16(dst + r * LD + c * 8, valid ? hd.q_row(row, D) + c * 8 : hd.q, valid);
        }
        sc_cp_commit();
        for (int i = threadIdx.x; i < SC_TILE; i += SC_THREADS) {
            const int row = tile * SC_TILE + i;
            // Padding rows get +inf so that their probabilities are exactly 0.
            lse2[buf * SC_TILE + i] = row < hd.n_rows ? row_lse[row] * SC_LOG2E : INFINITY;
        }
    };

    float cm_a = 0.f, cm_b = 0.f;
    load_tile(t0, 0);
    for (int tile = t0; tile < t1; ++tile) {
        const int buf = (tile - t0) & 1;
        if (tile + 1 < t1) {
            load_tile(tile + 1, buf ^ 1);
            sc_cp_wait<1>();
        } else {
            sc_cp_wait<0>();
        }
        __syncthreads();
        float s[8][4];
        sc_tile_mma<D>(s, ka, qtiles + buf * SC_TILE * LD, lane);
        const float* l2 = lse2 + buf * SC_TILE;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            const float la = l2[nt * 8 + 2 * tid4], lb = l2[nt * 8 + 2 * tid4 + 1];
            cm_a = fmaxf(cm_a, fmaxf(exp2f(s[nt][0] * sl2 - la), exp2f(s[nt][1] * sl2 - lb)));
            cm_b = fmaxf(cm_b, fmaxf(exp2f(s[nt][2] * sl2 - la), exp2f(s[nt][3] * sl2 - lb)));
        }
        __syncthreads();
    }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        cm_a = fmaxf(cm_a, __shfl_xor_sync(0xffffffffu, cm_a, o));
        cm_b = fmaxf(cm_b, __shfl_xor_sync(0xffffffffu, cm_b, o));
    }
    if (tid4 == 0) {
        float* out = p.scores + (int64_t)h * p.score_stride + (hd.chunk_start - hd.n_sys);
        if (ca < hd.chunk_len) kvz_atomic_max_pos(out + ca, cm_a);
        if (cb < hd.chunk_len) kvz_atomic_max_pos(out + cb, cm_b);
    }
}

}  // namespace

// Pass 1: grid (ceil(n_in * group / 128), n_kv_heads), 256 threads,
// dynamic smem 2 * 64 * (D + 8) * 2 bytes.
extern "C" __global__ __launch_bounds__(SC_THREADS, 2) void kvz_score_lse_d64(KvzScoreParams p) {
    score_lse<64>(p);
}
extern "C" __global__ __launch_bounds__(SC_THREADS, 2) void kvz_score_lse_d128(KvzScoreParams p) {
    score_lse<128>(p);
}
extern "C" __global__ __launch_bounds__(SC_THREADS) void kvz_score_lse_d256(KvzScoreParams p) {
    score_lse<256>(p);
}

// Pass 2: grid (ceil(chunk_len / 128), row splits, n_kv_heads), 256 threads,
// dynamic smem 2 * 64 * (D + 8) * 2 + 2 * 64 * 4 bytes.
extern "C" __global__ __launch_bounds__(SC_THREADS) void kvz_score_max_d64(KvzScoreParams p) {
    score_max<64>(p);
}
extern "C" __global__ __launch_bounds__(SC_THREADS) void kvz_score_max_d128(KvzScoreParams p) {
    score_max<128>(p);
}
extern "C" __global__ __launch_bounds__(SC_THREADS) void kvz_score_max_d256(KvzScoreParams p) {
    score_max<256>(p);
}
