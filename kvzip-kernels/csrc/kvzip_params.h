/* Kernel parameter structs of kvzip-kernels, shared by the CUDA sources and Rust (bindgen).
 *
 * Every kernel takes exactly one of these structs by value. Pointers are device pointers;
 * "bf16" buffers hold __nv_bfloat16, "f32" float, "i32" int32_t, "u32" uint32_t.
 * Shapes are written [dims], row-major. Per-head KV segments: KV head h of a layer owns rows
 * offsets[h] .. offsets[h] + lens[h] of k and v ([rows, head_dim] bf16 each).
 */
#ifndef KVZIP_PARAMS_H
#define KVZIP_PARAMS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Activation kinds of KvzActMulParams. */
#define KVZ_ACT_SILU 0
#define KVZ_ACT_GELU_TANH 1

/* out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * (weight + weight_offset).
 * x, out: [rows, dim] bf16 (may alias); weight: [dim] bf16. If residual != NULL, x is first
 * replaced by x + residual (x written back, bf16) and the sum is normalised (fused add+norm). */
typedef struct KvzRmsNormParams {
    void *x;
    const void *residual;
    const void *weight;
    void *out;
    int32_t rows;
    int32_t dim;
    float eps;
    float weight_offset;
} KvzRmsNormParams;

/* In-place NeoX (rotate_half) RoPE on q [tokens, n_q_heads, head_dim] and k
 * [tokens, n_kv_heads, head_dim] (bf16; k may be NULL). Pairs (i, i + rot_half) for i < rot_half
 * rotate by positions[t] * inv_freq[i] (f32); cos/sin are scaled by attention_factor. */
typedef struct KvzRopeParams {
    void *q;
    void *k;
    const int32_t *positions;
    const float *inv_freq;
    int32_t tokens;
    int32_t n_q_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t rot_half;
    float attention_factor;
} KvzRopeParams;

/* out[r, i] = act(gate_up[r, i]) * gate_up[r, inter + i]; gate_up [rows, 2*inter] bf16,
 * out [rows, inter] bf16; act = KVZ_ACT_*. */
typedef struct KvzActMulParams {
    const void *gate_up;
    void *out;
    int32_t rows;
    int32_t inter;
    int32_t act;
} KvzActMulParams;

/* out[i, :] = table[ids[i], :] * scale; table [vocab, dim] bf16, out [n, dim] bf16. Ids >= vocab
 * write zeros (the host validates ids first). */
typedef struct KvzEmbeddingParams {
    const uint32_t *ids;
    const void *table;
    void *out;
    int32_t n;
    int32_t dim;
    int32_t vocab;
    float scale;
} KvzEmbeddingParams;

/* x[i] += y[i] (bf16, n elements); if bias != NULL: x[r, c] += bias[c] with y unused and
 * cols = the bias length (n a multiple of cols). */
typedef struct KvzAddParams {
    void *x;
    const void *y;
    const void *bias;
    int64_t n;
    int32_t cols;
} KvzAddParams;

/* x[i] = cap * tanh(x[i] / cap) over n f32 values (final-logit softcapping), cap > 0. */
typedef struct KvzSoftcapParams {
    float *x;
    int64_t n;
    float cap;
} KvzSoftcapParams;

/* Per row of logits [rows, vocab] f32: softcap (if softcap > 0: c * tanh(x / c)) in place, then
 * out[r] = argmax, or, if temperature > 0, a sample from softmax(logits / temperature) by the
 * Gumbel-max trick with a counter-based hash of (seed, step, r, index). */
typedef struct KvzSampleParams {
    float *logits;
    uint32_t *out;
    int32_t rows;
    int32_t vocab;
    float softcap;
    float temperature;
    uint64_t seed;
    uint64_t step;
} KvzSampleParams;

/* Write q_len new rows per KV head into the per-head segments: for token t and KV head h,
 * k_cache[offsets[h] + lens[h] + t, :] = k_new[t, h, :] (same for v). k_new, v_new:
 * [q_len, n_kv_heads, head_dim] bf16. The host checks the capacity. lens are the lengths
 * before the append (not updated by the kernel). */
typedef struct KvzAppendParams {
    const void *k_new;
    const void *v_new;
    void *k_cache;
    void *v_cache;
    const int64_t *offsets;
    const int32_t *lens;
    int32_t q_len;
    int32_t n_kv_heads;
    int32_t head_dim;
} KvzAppendParams;

/* Gather kept rows: for KV head h, its kept source rows are src_rows[row_starts[h] ..
 * row_starts[h+1]] (absolute row indices into k_src/v_src, ascending) and go to consecutive rows
 * starting at dst_offsets[h] of k_dst/v_dst. total_rows = row_starts[n_kv_heads]. */
typedef struct KvzCompactParams {
    const void *k_src;
    const void *v_src;
    void *k_dst;
    void *v_dst;
    const int64_t *src_rows;
    const int64_t *row_starts;
    const int64_t *dst_offsets;
    int64_t total_rows;
    int32_t n_kv_heads;
    int32_t head_dim;
} KvzCompactParams;

/* A linear layer at decode batch sizes: out[r, j] = x[r, :] . w[j, :] (+ bias[j]) for rows
 * r < m (m = 1 or 2: kernels kvz_gemv_m1 / kvz_gemv_m2). x: [m, k] bf16; w: [n, k] bf16 (HF
 * [out, in]); bias: NULL or [n] bf16; out: [m, n] bf16, or f32 when out_f32 != 0. k % 8 == 0
 * and x, w 16-byte aligned (the host checks). f32 accumulation.
 * GLU MLP (kernels kvz_gemv_glu_m1 / _m2): w is the stacked [2 n, k] gate-and-up projection
 * (gate rows 0..n, up rows n..2n) and out[r, j] = act(x[r] . w[j]) * (x[r] . w[n + j]) in bf16,
 * act = KVZ_ACT_* (bias NULL, out_f32 0).
 * Pre-norm (kernels kvz_gemv_norm_*): x is the raw residual stream and each row is first
 * RMS-normalised as kvz_rms_norm does, x' = bf16(x * rsqrt(mean(x^2) + norm_eps) * (norm_w +
 * norm_offset)), norm_w [k] bf16; the normalised rows live in dynamic shared memory (m * k * 2
 * bytes). accumulate != 0 (bf16 out, no GLU): out[r, j] = bf16(out[r, j] + bf16(product + bias)),
 * the residual add of kvz_rms_norm's fused form. */
typedef struct KvzGemvParams {
    const void *x;
    const void *w;
    const void *bias;
    void *out;
    const void *norm_w;
    float norm_eps;
    float norm_offset;
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t out_f32;
    int32_t act;
    int32_t accumulate;
} KvzGemvParams;

/* Attention of q_len query tokens over per-head KV segments (prefill and decode share it).
 * q, out: [q_len, n_kv_heads * group, head_dim] bf16 (query head h * group + g).
 * Bottom-right causal: query t sits at key index i_t = lens[h] - q_len + t, sees keys j <= i_t,
 * and, if window > 0, only i_t - j < window. logits = (q . k) * scale, then softcap if > 0. */
typedef struct KvzAttentionParams {
    const void *q;
    const void *k;
    const void *v;
    void *out;
    const int64_t *offsets;
    const int32_t *lens;
    int32_t q_len;
    int32_t n_kv_heads;
    int32_t group;
    int32_t head_dim;
    float scale;
    float softcap;
    int32_t window;
} KvzAttentionParams;

/* One work item of the split-K decode plan: KV head `head`, keys [key_start, key_end) of that
 * head's segment, partial results at slot `partial`. */
typedef struct KvzDecodeWorkItem {
    int32_t head;
    int32_t key_start;
    int32_t key_end;
    int32_t partial;
} KvzDecodeWorkItem;

/* Where the keys of one decode work item live when they are not rows offsets[head] .. of the
 * shared k / v buffers (KvzDecodeParams.segments != NULL): key index `key` of the item's head is
 * row `key - key_base` of k / v (bf16 [rows, head_dim] each). Lets one launch attend over
 * pieces in different buffers: shared context caches plus per-request suffixes. */
typedef struct KvzDecodeSegment {
    const void *k;
    const void *v;
    int64_t key_base;
} KvzDecodeSegment;

/* Varlen decode (run phase). Same semantics as KvzAttentionParams (q_len >= 1 small). Each CTA
 * runs one work item for the whole GQA group and writes un-normalised partial outputs
 * partial_out [n_partials, q_len * group, head_dim] f32 and partial_lse [n_partials, q_len * group]
 * f32; the combine kernel merges the partials of each head (head_partials[h] ..
 * head_partials[h+1]) by log-sum-exp into out. */
typedef struct KvzDecodeParams {
    KvzAttentionParams attn;
    const KvzDecodeWorkItem *items;
    /* NULL, or one segment per item (attn.k / attn.v / attn.offsets are then unused). */
    const KvzDecodeSegment *segments;
    int32_t n_items;
    const int32_t *head_partials;
    float *partial_out;
    float *partial_lse;
} KvzDecodeParams;

/* KVzip score (KVZIP-SPEC §1.2), one chunk. q: [n_in, n_kv_heads * group, head_dim] bf16, the
 * scoring input's queries. Each KV head's segment holds [system (n_sys) | context ... | input
 * (n_in)] rows: system rows at 0..n_sys, this chunk's context rows at chunk_start ..
 * chunk_start + chunk_len, the input's own rows at lens[h] - n_in .. lens[h] (causal among
 * themselves). Pass 1 computes each query row's log-sum-exp (natural log) over exactly those
 * keys (row_lse [n_kv_heads, n_in * group] f32, row r = t * group + g for input token t and
 * query head kv_head * group + g); pass 2 writes, for each chunk key c,
 * scores[h * score_stride + chunk_start - n_sys + c] = max(previous, max over rows and group of
 * exp(logit - lse)) by an atomic max on the float bits (previous must be >= 0, or negative to be
 * overwritten). logits = (q . k) * scale. Needs n_sys <= chunk_start and chunk_start +
 * chunk_len <= lens[h] - n_in. */
typedef struct KvzScoreParams {
    const void *q;
    const void *k;
    const int64_t *offsets;
    const int32_t *lens;
    float *row_lse;
    float *scores;
    int64_t score_stride;
    int32_t n_in;
    int32_t n_kv_heads;
    int32_t group;
    int32_t head_dim;
    int32_t n_sys;
    int32_t chunk_start;
    int32_t chunk_len;
    float scale;
} KvzScoreParams;

#ifdef __cplusplus
}
#endif

#endif /* KVZIP_PARAMS_H */
