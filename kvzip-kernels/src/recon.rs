//! The KVzip context-reconstruction score of one chunk (KVZIP-SPEC §1.2) on host memory:
//! [`score_chunk`] (tiled, through [`crate::host::column_stats`]) and its plain-loop oracle
//! [`score_chunk_reference`]. The device-generic entry point is
//! [`crate::Device::score_chunk`], which runs this on the CPU and `csrc/score.cu` on CUDA.

use std::ops::Range;

use crate::colstats::{ColReduce, ColumnUnit as Unit};
use crate::host::column_stats;
use crate::{KernelError, Result};

/// Geometry of one scoring call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreShape {
    /// Rows of the scoring input (repeat prompt + hint + postfix + chunk tokens).
    pub q_len: usize,
    /// KV heads of the layer.
    pub n_kv_heads: usize,
    /// Query heads per KV head (GQA group); query head index = `kv_head * group + g`.
    pub group: usize,
    /// Head dimension `d`; logits are scaled by `1 / sqrt(d)` (the reference's fixed scale).
    pub head_dim: usize,
    /// System-prompt tokens (rows `0..n_sys` of every head: always in the softmax key set).
    pub n_sys: usize,
}

impl ScoreShape {
    fn check<'k>(
        &self,
        q: &[f32],
        head_keys: &impl Fn(usize) -> &'k [f32],
        chunk: &Range<usize>,
        out: &[f32],
    ) -> Result<usize> {
        let s = self;
        if s.q_len == 0 || s.head_dim == 0 || s.group == 0 {
            return Err(KernelError::Shape(format!(
                "score_chunk needs q_len, head_dim and group >= 1 (got {}, {}, {})",
                s.q_len, s.head_dim, s.group
            )));
        }
        let q_expected = s.q_len * s.n_kv_heads * s.group * s.head_dim;
        if q.len() != q_expected {
            return Err(KernelError::Shape(format!(
                "queries: {} floats, expected q_len {} x heads {} x head_dim {}",
                q.len(),
                s.q_len,
                s.n_kv_heads * s.group,
                s.head_dim
            )));
        }
        if chunk.start > chunk.end {
            return Err(KernelError::Shape(format!("chunk {chunk:?} is reversed")));
        }
        if out.len() != s.n_kv_heads * chunk.len() {
            return Err(KernelError::Shape(format!(
                "output: {} floats, expected n_kv_heads {} x chunk length {}",
                out.len(),
                s.n_kv_heads,
                chunk.len()
            )));
        }
        let mut n_rows = None;
        for h in 0..s.n_kv_heads {
            let keys = head_keys(h);
            if keys.len() % s.head_dim != 0 {
                return Err(KernelError::Shape(format!(
                    "keys of head {h}: {} floats is not a multiple of head_dim {}",
                    keys.len(),
                    s.head_dim
                )));
            }
            let rows = keys.len() / s.head_dim;
            if rows < s.n_sys + chunk.end + s.q_len {
                return Err(KernelError::Shape(format!(
                    "keys of head {h}: {rows} rows, need at least n_sys {} + chunk end {} + q_len {} \
                     (pass the whole unpruned cache after appending the scoring input)",
                    s.n_sys, chunk.end, s.q_len
                )));
            }
            if *n_rows.get_or_insert(rows) != rows {
                return Err(KernelError::Shape(format!(
                    "keys of head {h}: {rows} rows, other heads have {}",
                    n_rows.unwrap_or(0)
                )));
            }
        }
        Ok(n_rows.unwrap_or(0))
    }
}

/// Gathers the queries of KV head `h` into `[group * q_len, d]`, rows ordered `(g, t)`.
fn gather_head_queries(shape: &ScoreShape, q: &[f32], h: usize) -> Vec<f32> {
    let (d, g_n, t_n) = (shape.head_dim, shape.group, shape.q_len);
    let n_q_heads = shape.n_kv_heads * g_n;
    let mut out = Vec::with_capacity(g_n * t_n * d);
    for g in 0..g_n {
        for t in 0..t_n {
            let off = (t * n_q_heads + h * g_n + g) * d;
            out.extend_from_slice(&q[off..off + d]);
        }
    }
    out
}

/// KVzip reconstruction score of one context chunk (fast tiled CPU path).
///
/// * `q`: `[q_len, n_kv_heads * group, head_dim]` rotated queries of the scoring input.
/// * `head_keys(h)`: every key row of KV head `h` in the **unpruned** cache after appending
///   the scoring input, row r = position r (`head_dim` floats each); the last `q_len` rows are
///   the scoring input's own keys.
/// * `chunk`: context positions of the chunk relative to the context start (key rows
///   `n_sys + chunk.start .. n_sys + chunk.end`).
/// * `out`: `[n_kv_heads, chunk.len()]`.
///
/// Per KV head the key set is `[rows 0..n_sys, the chunk rows, the last q_len rows]`;
/// logits `q·k / sqrt(head_dim)`; the self block is causal (input row t sees self keys
/// `0..=t`); softmax in f32 over that set; the score of a chunk key is the max of its
/// probability over the group's query heads and all `q_len` rows.
pub fn score_chunk<'k, F>(
    shape: &ScoreShape,
    q: &[f32],
    head_keys: F,
    chunk: Range<usize>,
    out: &mut [f32],
) -> Result<()>
where
    F: Fn(usize) -> &'k [f32] + Sync,
{
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    score_chunk_scaled(shape, q, head_keys, chunk, scale, out)
}

/// [`score_chunk`] with an explicit logit scale (the method uses `1 / sqrt(head_dim)`).
pub fn score_chunk_scaled<'k, F>(
    shape: &ScoreShape,
    q: &[f32],
    head_keys: F,
    chunk: Range<usize>,
    scale: f32,
    out: &mut [f32],
) -> Result<()>
where
    F: Fn(usize) -> &'k [f32] + Sync,
{
    let total_rows = shape.check(q, &head_keys, &chunk, out)?;
    if chunk.is_empty() || shape.n_kv_heads == 0 {
        return Ok(());
    }
    let self_start = total_rows - shape.q_len;
    let target = shape.n_sys + chunk.start..shape.n_sys + chunk.end;
    let segments = [0..shape.n_sys, target.clone(), self_start..total_rows];
    let gathered: Vec<Vec<f32>> = (0..shape.n_kv_heads)
        .map(|h| gather_head_queries(shape, q, h))
        .collect();
    let units: Vec<Unit<'_>> = gathered
        .iter()
        .enumerate()
        .map(|(h, gq)| Unit {
            q: gq,
            keys: head_keys(h),
            period: shape.q_len,
            first_pos: self_start,
        })
        .collect();
    column_stats(
        &units,
        shape.head_dim,
        scale,
        &segments,
        target,
        ColReduce::Max,
        out,
    )?;
    Ok(())
}

/// Plain-loop reference of [`score_chunk`] (same contract): materialises each row's logits
/// over the whole key set and applies a textbook softmax. Slow; for tests and debugging.
pub fn score_chunk_reference<'k, F>(
    shape: &ScoreShape,
    q: &[f32],
    head_keys: F,
    chunk: Range<usize>,
    out: &mut [f32],
) -> Result<()>
where
    F: Fn(usize) -> &'k [f32],
{
    let total_rows = shape.check(q, &head_keys, &chunk, out)?;
    let (d, n_sys, q_len) = (shape.head_dim, shape.n_sys, shape.q_len);
    let m = chunk.len();
    let n_q_heads = shape.n_kv_heads * shape.group;
    let scale = 1.0 / (d as f64).sqrt();
    out.fill(0.0);
    for h in 0..shape.n_kv_heads {
        let keys = head_keys(h);
        let self_start = total_rows - q_len;
        let key_rows: Vec<usize> = (0..n_sys)
            .chain(n_sys + chunk.start..n_sys + chunk.end)
            .chain(self_start..total_rows)
            .collect();
        for g in 0..shape.group {
            for t in 0..q_len {
                let qo = (t * n_q_heads + h * shape.group + g) * d;
                let qrow = &q[qo..qo + d];
                // Visible keys: sys + chunk + self keys 0..=t.
                let n_visible = n_sys + m + t + 1;
                let logits: Vec<f64> = key_rows[..n_visible]
                    .iter()
                    .map(|&r| {
                        let k = &keys[r * d..(r + 1) * d];
                        qrow.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let denom: f64 = logits.iter().map(|x| (x - mx).exp()).sum();
                for j in 0..m {
                    let p = ((logits[n_sys + j] - mx).exp() / denom) as f32;
                    let o = &mut out[h * m + j];
                    *o = o.max(p);
                }
            }
        }
    }
    Ok(())
}
