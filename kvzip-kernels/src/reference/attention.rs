//! Reference attention over a per-KV-head variable-length cache.

use crate::{validate, KvSegments, Result};

/// Attention of `q_len` new query rows over a per-KV-head variable-length cache.
///
/// `q`, `out`: `[q_len, n_kv_heads * group, head_dim]`; query head `kv_head * group + g`.
/// See [`crate::cpu::attention`] for the full semantics (bottom-right causal alignment, sliding
/// window, softcap). Scores and softmax are computed in `f64`.
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
    let n_kv = validate::attention(
        q.len(),
        seg,
        q_len,
        group,
        head_dim,
        scale,
        window,
        softcap,
        out.len(),
    )?;
    let n_heads = n_kv * group;
    let mut scores = Vec::new();
    for h in 0..n_kv {
        let keys = seg.keys(h);
        let values = seg.values(h);
        let n_keys = seg.lens[h];
        for t in 0..q_len {
            let i_t = n_keys - q_len + t;
            let first = validate::window_start(i_t, window);
            for g in 0..group {
                let row = (t * n_heads + h * group + g) * head_dim;
                let qr = &q[row..row + head_dim];
                scores.clear();
                for j in first..=i_t {
                    let kr = &keys[j * head_dim..(j + 1) * head_dim];
                    let dot: f64 = qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mut s = dot * scale as f64;
                    if let Some(c) = softcap {
                        s = c as f64 * (s / c as f64).tanh();
                    }
                    scores.push(s);
                }
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0f64;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for d in 0..head_dim {
                    let mut acc = 0.0f64;
                    for (p, j) in scores.iter().zip(first..=i_t) {
                        acc += p * values[j * head_dim + d] as f64;
                    }
                    out[row + d] = (acc / sum) as f32;
                }
            }
        }
    }
    Ok(())
}
