//! Row-wise normalisations: RMSNorm and softmax.

use super::{math, PAR_MIN_ELEMS};
use crate::{validate, Result};
use rayon::prelude::*;

/// Rows per rayon task so that each task handles at least `PAR_MIN_ELEMS / 4` elements.
fn rows_per_task(dim: usize) -> usize {
    (PAR_MIN_ELEMS / 4 / dim.max(1)).max(1)
}

/// RMSNorm over rows of `dim`: `out = x / sqrt(mean(x^2) + eps) * (w + weight_offset)`.
///
/// `x`, `out`: `[rows, dim]`; `w`: `[dim]`. `weight_offset` is 0 for LLaMA-style norms and 1 for
/// Gemma's `(1 + w)`. Rows are processed in parallel.
pub fn rms_norm(
    x: &[f32],
    w: &[f32],
    eps: f32,
    weight_offset: f32,
    dim: usize,
    out: &mut [f32],
) -> Result<()> {
    validate::rms_norm(x.len(), w.len(), eps, dim, out.len())?;
    let norm_row = |xr: &[f32], or: &mut [f32]| {
        let mean = math::sum_squares(xr) / dim as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = (xv * inv) * (wv + weight_offset);
        }
    };
    if x.len() < PAR_MIN_ELEMS {
        for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            norm_row(xr, or);
        }
    } else {
        let step = rows_per_task(dim) * dim;
        x.par_chunks(step)
            .zip(out.par_chunks_mut(step))
            .for_each(|(xs, os)| {
                for (xr, or) in xs.chunks_exact(dim).zip(os.chunks_exact_mut(dim)) {
                    norm_row(xr, or);
                }
            });
    }
    Ok(())
}

/// Softmax of one row in place; a row whose maximum is `-inf` (fully masked) becomes zeros.
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = math::exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Softmax in place over rows of `dim` (`x`: `[rows, dim]`). A row whose maximum is `-inf`
/// (fully masked) becomes zeros. Rows are processed in parallel.
pub fn softmax_rows(x: &mut [f32], dim: usize) -> Result<()> {
    validate::rows_of("x", x.len(), dim)?;
    if x.len() < PAR_MIN_ELEMS {
        x.chunks_exact_mut(dim).for_each(softmax_row);
    } else {
        x.par_chunks_mut(rows_per_task(dim) * dim)
            .for_each(|rows| rows.chunks_exact_mut(dim).for_each(softmax_row));
    }
    Ok(())
}
