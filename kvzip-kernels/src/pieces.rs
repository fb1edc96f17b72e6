//! Attention over keys that live in pieces of several buffers (host implementations).
//!
//! A batch of sequences is a set of virtual KV heads (one per sequence and KV head); virtual
//! head `h` has `lens[h]` keys, held by one or more pieces in key order (e.g. the rows of a
//! shared, compressed context cache, then the rows of the sequence's own suffix). Queries and
//! outputs are `[q_len, n_heads * group, head_dim]` (query head `h * group + g`), with the same
//! bottom-right causal alignment, window and softcap as [`crate::cpu::attention`]: query `t`
//! sits at key index `i_t = lens[h] - q_len + t` and sees keys `j <= i_t` (and `i_t - j < w`).

use crate::{validate, KernelError, Result};

/// One piece of a virtual head's keys: `k`, `v` are `[n, head_dim]` rows holding key indices
/// `key_start .. key_start + n` of virtual head `head`.
#[derive(Debug, Clone, Copy)]
pub struct HostPiece<'a> {
    /// Virtual head.
    pub head: usize,
    /// Key rows `[n, head_dim]`.
    pub k: &'a [f32],
    /// Value rows `[n, head_dim]`.
    pub v: &'a [f32],
    /// Key index of the first row.
    pub key_start: usize,
}

/// Scalars of an attention-over-pieces call.
#[derive(Debug, Clone, Copy)]
pub struct PiecesArgs {
    /// Query tokens per virtual head.
    pub q_len: usize,
    /// Query heads per virtual (KV) head.
    pub group: usize,
    /// Elements per row.
    pub head_dim: usize,
    /// Multiplier of `q . k`.
    pub scale: f32,
    /// Sliding window in keys (`None`: full causal).
    pub window: Option<usize>,
    /// Logit softcap (`None`: off).
    pub softcap: Option<f32>,
}

/// Checks shapes; returns, per virtual head, the indices of its pieces in key order.
pub(crate) fn validate_pieces(
    q: usize,
    pieces: &[HostPiece<'_>],
    lens: &[usize],
    a: &PiecesArgs,
    out: usize,
) -> Result<Vec<Vec<usize>>> {
    validate::positive("head_dim", a.head_dim)?;
    validate::positive("group", a.group)?;
    if a.window == Some(0)
        || !a.scale.is_finite()
        || a.softcap.is_some_and(|c| c.is_nan() || c <= 0.0)
    {
        return Err(KernelError::InvalidArgument(format!(
            "attention: window {:?}, scale {}, softcap {:?} (window > 0, finite scale, softcap > 0)",
            a.window, a.scale, a.softcap
        )));
    }
    let n_heads = lens.len();
    let need = a.q_len * n_heads * a.group * a.head_dim;
    validate::len("q", q, need, "[q_len, n_heads * group, head_dim]")?;
    validate::len("out", out, need, "same as q")?;
    let mut per_head = vec![Vec::new(); n_heads];
    let mut next = vec![0usize; n_heads];
    for (i, p) in pieces.iter().enumerate() {
        let n = validate::rows_of("piece k", p.k.len(), a.head_dim)?;
        validate::len("piece v", p.v.len(), p.k.len(), "same as piece k")?;
        if p.head >= n_heads || p.key_start != next[p.head] {
            return Err(KernelError::Shape(format!(
                "piece {i} (head {}, keys {}..{}) does not continue its head's keys in order",
                p.head,
                p.key_start,
                p.key_start + n
            )));
        }
        next[p.head] += n;
        per_head[p.head].push(i);
    }
    for h in 0..n_heads {
        if next[h] != lens[h] || lens[h] < a.q_len {
            return Err(KernelError::Shape(format!(
                "virtual head {h}: pieces hold {} keys, its length is {} (>= q_len {})",
                next[h], lens[h], a.q_len
            )));
        }
    }
    Ok(per_head)
}

/// Whether key `j` is visible to a query at key index `i` (causal, window).
#[inline]
pub(crate) fn visible(i: usize, j: usize, window: Option<usize>) -> bool {
    j <= i && window.is_none_or(|w| i - j < w)
}

/// Plain-loop reference (f64 softmax): the oracle of the fast path and the CUDA kernel.
pub fn attention_pieces_reference(
    q: &[f32],
    pieces: &[HostPiece<'_>],
    lens: &[usize],
    a: &PiecesArgs,
    out: &mut [f32],
) -> Result<()> {
    let per_head = validate_pieces(q.len(), pieces, lens, a, out.len())?;
    let (d, n_heads) = (a.head_dim, lens.len());
    let n_q = n_heads * a.group;
    for (h, idx) in per_head.iter().enumerate() {
        for t in 0..a.q_len {
            let i = lens[h] - a.q_len + t;
            for g in 0..a.group {
                let qo = (t * n_q + h * a.group + g) * d;
                let qr = &q[qo..qo + d];
                let mut logits: Vec<(f64, &[f32])> = Vec::new();
                for &pi in idx {
                    let p = &pieces[pi];
                    for r in 0..p.k.len() / d {
                        let j = p.key_start + r;
                        if !visible(i, j, a.window) {
                            continue;
                        }
                        let k = &p.k[r * d..(r + 1) * d];
                        let mut s = qr
                            .iter()
                            .zip(k)
                            .map(|(x, y)| *x as f64 * *y as f64)
                            .sum::<f64>()
                            * a.scale as f64;
                        if let Some(c) = a.softcap {
                            s = c as f64 * (s / c as f64).tanh();
                        }
                        logits.push((s, &p.v[r * d..(r + 1) * d]));
                    }
                }
                let mx = logits.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
                let den: f64 = logits.iter().map(|x| (x.0 - mx).exp()).sum();
                let o = &mut out[qo..qo + d];
                o.fill(0.0);
                if den > 0.0 {
                    let mut acc = vec![0.0f64; d];
                    for (s, v) in &logits {
                        let w = (s - mx).exp() / den;
                        acc.iter_mut()
                            .zip(*v)
                            .for_each(|(a, &x)| *a += w * x as f64);
                    }
                    o.iter_mut().zip(acc).for_each(|(o, a)| *o = a as f32);
                }
            }
        }
    }
    Ok(())
}
