//! Rotary position embedding, applied in place.

use super::PAR_MIN_ELEMS;
use crate::reference::rope_cos_sin;
use crate::{validate, Result};
use rayon::prelude::*;

/// Rotary embedding in place, HF `rotate_half` (NeoX) convention.
///
/// `x`: `[tokens, n_heads, head_dim]`; `positions`: `[tokens]` absolute positions. For each head
/// row, pairs `(i, i + rot/2)` for `i < rot/2` are rotated by `angle = pos * inv_freq[i]` (f32
/// product, as HF computes it), where `rot = 2 * inv_freq.len() <= head_dim`; dims `>= rot` are
/// untouched. Cos / sin are multiplied by `attention_factor` (YaRN mscale; 1.0 otherwise).
/// Cos / sin are computed once per token and shared by all heads; tokens run in parallel.
pub fn rope_inplace(
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    attention_factor: f32,
) -> Result<()> {
    let rot = validate::rope(x.len(), positions.len(), n_heads, head_dim, inv_freq.len())?;
    let half = rot / 2;
    if half == 0 || positions.is_empty() {
        return Ok(());
    }
    let token_stride = n_heads * head_dim;
    let rotate_token =
        |(tok, &pos): (&mut [f32], &usize), cos: &mut Vec<f32>, sin: &mut Vec<f32>| {
            cos.clear();
            sin.clear();
            for &f in inv_freq {
                let (c, s) = rope_cos_sin(pos, f, attention_factor);
                cos.push(c);
                sin.push(s);
            }
            for head in tok.chunks_exact_mut(head_dim) {
                let (lo, hi) = head[..rot].split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (lo[i], hi[i]);
                    lo[i] = x1 * cos[i] - x2 * sin[i];
                    hi[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        };
    if x.len() < PAR_MIN_ELEMS {
        let (mut cos, mut sin) = (Vec::with_capacity(half), Vec::with_capacity(half));
        x.chunks_exact_mut(token_stride)
            .zip(positions)
            .for_each(|item| rotate_token(item, &mut cos, &mut sin));
    } else {
        x.par_chunks_exact_mut(token_stride)
            .zip(positions)
            .for_each_init(
                || (Vec::with_capacity(half), Vec::with_capacity(half)),
                |(cos, sin), item| rotate_token(item, cos, sin),
            );
    }
    Ok(())
}
