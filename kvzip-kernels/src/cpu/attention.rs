//! Tiled (flash-style) attention over a per-KV-head variable-length cache.
//!
//! Work is split into items of (KV head, block of query tokens, key chunk). Each item gathers its
//! query rows (all `group` query heads of the block's tokens, pre-multiplied by `scale`), walks the
//! visible keys in tiles of `key_tile`, computes `S = Q · K^T` and `O += P · V` with the `gemm`
//! crate and keeps an online softmax (running max `m`, running sum `l`) per row. Memory per item
//! is `O(rows * (key_tile + head_dim))`, independent of the number of keys. When there are too
//! few items to occupy every thread (decode), the key range is split into chunks whose partial
//! results are combined by log-sum-exp. Queries are processed in waves so that at most a bounded
//! number of finished blocks waits to be copied into `out`.

use super::gemm::{gemm_into, MatRef};
use super::math;
use std::ops::Range;

use crate::{validate, KernelError, KvSegments, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// Tile sizes of [`attention_tiled`]. [`Default`] is tuned for head_dim 64..256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionTiling {
    /// Target query rows per work item (`tokens * group`; at least one token per item).
    pub query_rows: usize,
    /// Keys per tile of the online softmax.
    pub key_tile: usize,
    /// Minimum keys per chunk when the key range is split across threads (decode).
    pub split_min_keys: usize,
}

impl Default for AttentionTiling {
    fn default() -> Self {
        Self {
            query_rows: 64,
            key_tile: 256,
            split_min_keys: 512,
        }
    }
}

/// Attention of `q_len` new query rows over a per-KV-head variable-length cache.
///
/// - `q`, `out`: `[q_len, n_kv_heads * group, head_dim]`; query head `kv_head * group + g`
///   (HF GQA layout); `n_kv_heads = seg.lens.len()`.
/// - KV head `h` attends to the `seg.lens[h]` key/value rows starting at row `seg.offsets[h]`.
/// - Bottom-right causal alignment: query `t` sits at key index `i_t = lens[h] - q_len + t` and
///   sees keys `j <= i_t`; with `window = Some(w)` only keys with `i_t - j < w` (HF sliding window).
/// - `scores = (q · k) * scale`, then `c * tanh(scores / c)` if `softcap = Some(c)`; softmax in
///   f32; `out = P · V`.
///
/// Errors: shape errors naming the argument; a head with `lens[h] < q_len`; `window = Some(0)`;
/// non-finite `scale` or non-positive `softcap`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    seg: &KvSegments<'_>,
    q_len: usize,
    group: usize,
    head_dim: usize,
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
    out: &mut [f32],
) -> Result<()> {
    let args = AttentionArgs {
        q_len,
        group,
        head_dim,
        scale,
        window,
        softcap,
    };
    attention_tiled(q, seg, &args, out, &AttentionTiling::default())
}

/// Scalar arguments of one attention call (see [`attention`]).
#[derive(Debug, Clone, Copy)]
pub struct AttentionArgs {
    /// New query tokens.
    pub q_len: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Floats per head row.
    pub head_dim: usize,
    /// Multiplier of `q · k`.
    pub scale: f32,
    /// Sliding window in keys (`None`: full causal).
    pub window: Option<usize>,
    /// Logit softcap `c` (`None`: off).
    pub softcap: Option<f32>,
}

/// The KVzip reconstruction score computed inside [`attention_scored`]: per KV head, the
/// softmax over key rows `0..n_sys`, `target` and the step's own rows (the last `q_len` of the
/// head; the context rows outside `target` are left out, KVZIP-SPEC §1.2), and for every key
/// of `target` the max of its probability over the group's query heads and all query rows.
#[derive(Debug, Clone)]
pub struct ScoreTarget {
    /// System-prompt key rows `0..n_sys` (in the score's key set).
    pub n_sys: usize,
    /// Key rows scored (`n_sys <= target.start`, `target.end <= lens[h] - q_len`).
    pub target: Range<usize>,
}

/// [`attention`] (no window, no softcap) fused with the KVzip score of [`ScoreTarget`]: one
/// `Q·Kᵀ` and one exponential per logit serve both. `scores`: `[n_kv_heads, target.len()]`,
/// max-merged (`scores = max(scores, probability)`). Key splitting is off (each query block
/// walks all its keys).
pub fn attention_scored(
    q: &[f32],
    seg: &KvSegments<'_>,
    args: &AttentionArgs,
    score: &ScoreTarget,
    tiling: &AttentionTiling,
    out: &mut [f32],
    scores: &mut [f32],
) -> Result<()> {
    if args.window.is_some() || args.softcap.is_some() {
        return Err(KernelError::InvalidArgument(
            "attention_scored: the KVzip score is defined without window and softcap".into(),
        ));
    }
    let tlen = score.target.len();
    if scores.len() != seg.lens.len() * tlen {
        return Err(KernelError::Shape(format!(
            "attention_scored: scores holds {} floats, expected n_kv_heads {} x target {tlen}",
            scores.len(),
            seg.lens.len()
        )));
    }
    if score.n_sys > score.target.start {
        return Err(KernelError::Shape(format!(
            "attention_scored: score target {:?} starts inside the system prompt (n_sys {})",
            score.target, score.n_sys
        )));
    }
    for (h, &len) in seg.lens.iter().enumerate() {
        if score.target.end + args.q_len > len {
            return Err(KernelError::Shape(format!(
                "attention_scored: head {h} has {len} rows; score target {:?} must lie before \
                 the step's {} rows",
                score.target, args.q_len
            )));
        }
    }
    run_tiled(q, seg, args, out, tiling, Some((score, scores)))
}

/// [`attention`] with explicit tile sizes (tests use tiny tiles to exercise every edge).
pub fn attention_tiled(
    q: &[f32],
    seg: &KvSegments<'_>,
    args: &AttentionArgs,
    out: &mut [f32],
    tiling: &AttentionTiling,
) -> Result<()> {
    run_tiled(q, seg, args, out, tiling, None)
}

/// The tiled attention, with the fused score when `score` is given.
fn run_tiled(
    q: &[f32],
    seg: &KvSegments<'_>,
    args: &AttentionArgs,
    out: &mut [f32],
    tiling: &AttentionTiling,
    mut score: Option<(&ScoreTarget, &mut [f32])>,
) -> Result<()> {
    let n_kv = validate::attention(
        q.len(),
        seg,
        args.q_len,
        args.group,
        args.head_dim,
        args.scale,
        args.window,
        args.softcap,
        out.len(),
    )?;
    if tiling.query_rows == 0 || tiling.key_tile == 0 || tiling.split_min_keys == 0 {
        return Err(KernelError::InvalidArgument(format!(
            "attention tiling sizes must be > 0, got {tiling:?}"
        )));
    }
    if args.q_len == 0 || n_kv == 0 {
        return Ok(());
    }
    let (hd, group) = (args.head_dim, args.group);
    let target = score.as_ref().map(|(t, _)| *t);
    // Column maxima of log-probabilities per KV head (the fused score), exponentiated at the end.
    let tlen = target.map_or(0, |t| t.target.len());
    let mut col_max = vec![f32::NEG_INFINITY; n_kv * tlen];
    let block_tokens = (tiling.query_rows / group).max(1);
    let threads = rayon::current_num_threads().max(1);
    let wave_tokens = block_tokens * (4 * threads).div_ceil(n_kv).max(1);
    let token_stride = n_kv * group * hd;
    let mut wave_start = 0;
    while wave_start < args.q_len {
        let wave_end = (wave_start + wave_tokens).min(args.q_len);
        let blocks = plan_blocks(
            seg,
            args,
            tiling,
            wave_start,
            wave_end,
            block_tokens,
            // The fused score needs every key of a row in one item (no key splits).
            if target.is_some() { 1 } else { threads },
        );
        let mut partials: Vec<Partial> = blocks
            .par_iter()
            .map(|b| run_item(q, seg, args, tiling, b, target))
            .collect::<Result<_>>()?;
        for (b, p) in blocks.iter().zip(&partials) {
            let dst = &mut col_max[b.head * tlen..(b.head + 1) * tlen];
            dst.iter_mut()
                .zip(&p.col_max)
                .for_each(|(d, &x)| *d = d.max(x));
        }
        // Combine the key chunks of each (head, block) and scatter rows into `out`.
        let mut finished: Vec<Vec<f32>> = Vec::new();
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && blocks[j].same_block(&blocks[i]) {
                j += 1;
            }
            finished.push(combine(&mut partials[i..j], hd));
            i = j;
        }
        let n_blocks = (wave_end - wave_start).div_ceil(block_tokens);
        let out_wave = &mut out[wave_start * token_stride..wave_end * token_stride];
        out_wave
            .par_chunks_exact_mut(token_stride)
            .enumerate()
            .for_each(|(t, tok)| {
                let (b, r) = (t / block_tokens, t % block_tokens);
                for h in 0..n_kv {
                    let src = &finished[h * n_blocks + b][r * group * hd..(r + 1) * group * hd];
                    tok[h * group * hd..(h + 1) * group * hd].copy_from_slice(src);
                }
            });
        wave_start = wave_end;
    }
    if let Some((_, scores)) = score.as_mut() {
        scores
            .iter_mut()
            .zip(&col_max)
            .for_each(|(s, &lp)| *s = s.max(lp.exp()));
    }
    Ok(())
}

/// One work item: KV head, query tokens `[t0, t1)`, keys `[k0, k1)`.
#[derive(Debug, Clone, Copy)]
struct Item {
    head: usize,
    t0: usize,
    t1: usize,
    k0: usize,
    k1: usize,
}

impl Item {
    fn same_block(&self, other: &Item) -> bool {
        self.head == other.head && self.t0 == other.t0
    }
}

/// Unnormalised output of one item: `o` `[rows, head_dim]`, running max `m` and sum `l` per
/// row; with a fused score, the max over the item's rows of each target key's log-probability.
struct Partial {
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    col_max: Vec<f32>,
}

/// Lists the items of tokens `[w0, w1)`, ordered by head then block, key chunks adjacent.
fn plan_blocks(
    seg: &KvSegments<'_>,
    args: &AttentionArgs,
    tiling: &AttentionTiling,
    w0: usize,
    w1: usize,
    block_tokens: usize,
    threads: usize,
) -> Vec<Item> {
    let n_kv = seg.lens.len();
    let n_blocks = (w1 - w0).div_ceil(block_tokens);
    let base_items = n_kv * n_blocks;
    let want_splits = (2 * threads).div_ceil(base_items).max(1);
    let mut items = Vec::with_capacity(base_items);
    for head in 0..n_kv {
        let len = seg.lens[head];
        for b in 0..n_blocks {
            let t0 = w0 + b * block_tokens;
            let t1 = (t0 + block_tokens).min(w1);
            let first_i = len - args.q_len + t0;
            let last_i = len - args.q_len + t1 - 1;
            let k0 = validate::window_start(first_i, args.window);
            let k1 = last_i + 1;
            let span = k1 - k0;
            let splits = want_splits.min(span / tiling.split_min_keys).max(1);
            let chunk = span.div_ceil(splits);
            let mut start = k0;
            while start < k1 {
                let end = (start + chunk).min(k1);
                items.push(Item {
                    head,
                    t0,
                    t1,
                    k0: start,
                    k1: end,
                });
                start = end;
            }
        }
    }
    items
}

/// Computes one item with an online softmax over key tiles; with `score`, also keeps the
/// target keys' logits and a second running sum over the score's key set.
fn run_item(
    q: &[f32],
    seg: &KvSegments<'_>,
    args: &AttentionArgs,
    tiling: &AttentionTiling,
    item: &Item,
    score: Option<&ScoreTarget>,
) -> Result<Partial> {
    let (hd, group) = (args.head_dim, args.group);
    let n_heads = seg.lens.len() * group;
    let rows = (item.t1 - item.t0) * group;
    let mut qb = vec![0.0f32; rows * hd];
    for (r_tok, t) in (item.t0..item.t1).enumerate() {
        let src = (t * n_heads + item.head * group) * hd;
        let dst = &mut qb[r_tok * group * hd..(r_tok + 1) * group * hd];
        for (d, &s) in dst.iter_mut().zip(&q[src..src + group * hd]) {
            *d = s * args.scale;
        }
    }
    let keys = seg.keys(item.head);
    let values = seg.values(item.head);
    let first_index = seg.lens[item.head] - args.q_len;
    let tile = tiling.key_tile.min(item.k1 - item.k0).max(1);
    let mut s = vec![0.0f32; rows * tile];
    let mut o = vec![0.0f32; rows * hd];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0.0f32; rows];
    let target = score.map_or(0..0, |sc| sc.target.clone());
    let tlen = target.len();
    // Score state: target logits per row, running sum over the score's key set per row.
    let mut kept = vec![0.0f32; rows * tlen];
    let mut l_score = vec![0.0f32; if score.is_some() { rows } else { 0 }];
    let mut start = item.k0;
    while start < item.k1 {
        let end = (start + tile).min(item.k1);
        let nk = end - start;
        let s_tile = &mut s[..rows * nk];
        scores_tile(&qb, rows, hd, &keys[start * hd..end * hd], s_tile)?;
        let (lo, hi) = (start.max(target.start), end.min(target.end));
        if lo < hi {
            for r in 0..rows {
                kept[r * tlen + lo - target.start..r * tlen + hi - target.start]
                    .copy_from_slice(&s_tile[r * nk + lo - start..r * nk + hi - start]);
            }
        }
        // Keys of this tile outside the score's key set: context rows between the system
        // prompt and the target, and between the target and the step's own rows.
        let outside = score.map(|sc| {
            let own = first_index;
            [(sc.n_sys, target.start), (target.end, own)]
                .map(|(a, b)| (a.max(start) - start, b.min(end).max(start) - start))
        });
        for r in 0..rows {
            let i_t = first_index + item.t0 + r / group;
            let vis_lo = validate::window_start(i_t, args.window).max(start) - start;
            let vis_hi = (i_t + 1).min(end).saturating_sub(start);
            let srow = &mut s_tile[r * nk..(r + 1) * nk];
            if vis_lo >= vis_hi {
                srow.fill(0.0);
                continue;
            }
            if let Some(c) = args.softcap {
                for v in &mut srow[vis_lo..vis_hi] {
                    *v = c * (*v / c).tanh();
                }
            }
            let tile_max = math::max_value(&srow[vis_lo..vis_hi]);
            let m_new = m[r].max(tile_max);
            let correction = math::exp(m[r] - m_new);
            let sum = math::exp_shift_in_place(&mut srow[vis_lo..vis_hi], m_new);
            srow[..vis_lo].fill(0.0);
            srow[vis_hi..].fill(0.0);
            if correction != 1.0 {
                o[r * hd..(r + 1) * hd]
                    .iter_mut()
                    .for_each(|v| *v *= correction);
            }
            l[r] = l[r] * correction + sum;
            m[r] = m_new;
            if let Some(out_ranges) = &outside {
                let sub = if out_ranges.iter().all(|&(a, b)| a >= b) {
                    sum
                } else {
                    sum_outside_excluded(srow, vis_lo..vis_hi, out_ranges)
                };
                l_score[r] = l_score[r] * correction + sub;
            }
        }
        pv_tile(s_tile, rows, &values[start * hd..end * hd], hd, &mut o)?;
        start = end;
    }
    // Max over rows of log p = s - (m + ln l_score) at every target key (all rows see them).
    let mut col_max = vec![f32::NEG_INFINITY; tlen];
    for r in 0..l_score.len() {
        let lse = m[r] + l_score[r].ln();
        let row = &kept[r * tlen..(r + 1) * tlen];
        col_max
            .iter_mut()
            .zip(row)
            .for_each(|(c, &x)| *c = c.max(x - lse));
    }
    Ok(Partial { o, m, l, col_max })
}

/// Sum of `row[range]` without the ascending, disjoint `(start, end)` ranges of `outside`.
fn sum_outside_excluded(row: &[f32], range: Range<usize>, outside: &[(usize, usize)]) -> f32 {
    let (mut cur, mut total) = (range.start, 0.0f32);
    for &(a, b) in outside {
        let a = a.clamp(cur, range.end);
        let b = b.clamp(a, range.end);
        total += row[cur..a].iter().sum::<f32>();
        cur = b;
    }
    total + row[cur..range.end].iter().sum::<f32>()
}

/// Query rows at or below which tiles use dot / axpy loops instead of GEMM (decode: the
/// work is streaming K and V once; GEMM packing overhead would dominate).
const SMALL_ROWS: usize = 8;

/// `s[rows, nk] = qb[rows, hd] · keys[nk, hd]^T`.
fn scores_tile(qb: &[f32], rows: usize, hd: usize, keys: &[f32], s: &mut [f32]) -> Result<()> {
    let nk = keys.len() / hd;
    if rows <= SMALL_ROWS {
        math::dot_rows(&qb[..rows * hd], keys, hd, &mut s[..rows * nk]);
        return Ok(());
    }
    let lhs = MatRef {
        data: qb,
        rows,
        cols: hd,
        row_stride: hd,
        col_stride: 1,
    };
    let k_t = MatRef {
        data: keys,
        rows: hd,
        cols: nk,
        row_stride: 1,
        col_stride: hd,
    };
    gemm_into(s, nk, lhs, k_t, None, 1.0, Parallelism::None)
}

/// `o[rows, hd] += p[rows, nk] · values[nk, hd]`.
fn pv_tile(p: &[f32], rows: usize, values: &[f32], hd: usize, o: &mut [f32]) -> Result<()> {
    let nk = values.len() / hd;
    if rows <= SMALL_ROWS {
        math::axpy_rows(&p[..rows * nk], values, hd, &mut o[..rows * hd]);
        return Ok(());
    }
    let p = MatRef {
        data: p,
        rows,
        cols: nk,
        row_stride: nk,
        col_stride: 1,
    };
    let v = MatRef {
        data: values,
        rows: nk,
        cols: hd,
        row_stride: hd,
        col_stride: 1,
    };
    gemm_into(o, hd, p, v, Some(1.0), 1.0, Parallelism::None)
}

/// Merges the key chunks of one (head, block) by log-sum-exp and normalises: `[rows, head_dim]`.
fn combine(parts: &mut [Partial], hd: usize) -> Vec<f32> {
    let n_parts = parts.len();
    let Some(first) = parts.first_mut() else {
        return Vec::new();
    };
    let rows = first.m.len();
    if n_parts == 1 {
        let mut o = std::mem::take(&mut first.o);
        for (r, orow) in o.chunks_exact_mut(hd).enumerate() {
            let inv = 1.0 / first.l[r];
            orow.iter_mut().for_each(|v| *v *= inv);
        }
        return o;
    }
    let mut o = vec![0.0f32; rows * hd];
    for r in 0..rows {
        let m_all = parts
            .iter()
            .map(|p| p.m[r])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut l_all = 0.0f32;
        let orow = &mut o[r * hd..(r + 1) * hd];
        for p in parts.iter() {
            let w = math::exp(p.m[r] - m_all);
            if w == 0.0 {
                continue;
            }
            l_all += w * p.l[r];
            for (dst, &src) in orow.iter_mut().zip(&p.o[r * hd..(r + 1) * hd]) {
                *dst += w * src;
            }
        }
        let inv = 1.0 / l_all;
        orow.iter_mut().for_each(|v| *v *= inv);
    }
    o
}
