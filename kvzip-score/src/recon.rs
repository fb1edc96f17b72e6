//! The KVzip context-reconstruction score of one chunk on host key slices (KVZIP-SPEC §1.2):
//! thin wrappers over `kvzip_kernels::recon` reporting this crate's errors. The same op on a
//! cache layer of any device is [`crate::ScoreAccumulator::score_layer_view`].

use std::ops::Range;

pub use kvzip_kernels::recon::ScoreShape;

use crate::{Result, ScoreError};

fn score_err(e: kvzip_kernels::KernelError) -> ScoreError {
    match e {
        kvzip_kernels::KernelError::Shape(m) => ScoreError::Shape(m),
        other => ScoreError::Kernel(other),
    }
}

/// KVzip reconstruction score of one context chunk (fast tiled path).
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
///
/// ```
/// use kvzip_score::{score_chunk, ScoreShape};
///
/// // 1 KV head, group 2, head_dim 2; keys: 1 system row, 2 chunk rows, 1 input row.
/// let keys = [0.0, 0.0, /* chunk */ 2.0, 0.0, 0.0, 2.0, /* input */ 0.0, 0.0];
/// let shape = ScoreShape { q_len: 1, n_kv_heads: 1, group: 2, head_dim: 2, n_sys: 1 };
/// let q = [1.0, 0.0, /* query head 1 */ 0.0, 1.0]; // [q_len, n_kv_heads * group, head_dim]
/// let mut out = [0.0f32; 2]; // [n_kv_heads, chunk.len()]
/// score_chunk(&shape, &q, |_| &keys[..], 0..2, &mut out)?;
/// // Query head 0 favours chunk key 0 and head 1 chunk key 1: the max over the group.
/// assert!((out[0] - out[1]).abs() < 1e-6 && out[0] > 0.5);
/// # Ok::<(), kvzip_score::ScoreError>(())
/// ```
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
    kvzip_kernels::recon::score_chunk(shape, q, head_keys, chunk, out).map_err(score_err)
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
    kvzip_kernels::recon::score_chunk_reference(shape, q, head_keys, chunk, out).map_err(score_err)
}
