//! Tiled causal-softmax column statistics (fast path; types in [`crate::colstats`]): for a block of query rows and a set of key segments,
//! the max (or sum) over rows of the softmax probability at each key of a target range.
//!
//! Two passes per row tile: pass 1 computes each row's log-sum-exp over all visible keys
//! (online max/sum over `ROW_TILE x KEY_TILE` logit tiles) and keeps the logits of the target
//! keys (`ROW_TILE x target` floats), pass 2 reduces `exp(s - lse)` of those over rows (no
//! second GEMM).
//! Visibility is causal by position: a key at position `kp` is visible to a row at position
//! `p` iff `kp <= p`.

use std::ops::Range;

use rayon::prelude::*;

use crate::colstats::{ColReduce, ColumnUnit as Unit};
use crate::Result;

/// Query rows per tile.
const ROW_TILE: usize = 128;
/// Key rows per tile.
const KEY_TILE: usize = 256;

/// `c[m, n] = alpha * a[m, k] · b[n, k]^T` (slices cut to exactly those sizes), through the
/// workspace GEMM of `kvzip-kernels`.
fn matmul_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    alpha: f32,
) -> Result<()> {
    super::gemm::matmul(
        &a[..m * k],
        &b[..n * k],
        m,
        k,
        n,
        true,
        alpha,
        0.0,
        &mut c[..m * n],
    )?;
    Ok(())
}

/// Column statistics for several units, parallel over (unit, row tile).
///
/// `segments` are disjoint ascending key-position ranges forming the softmax key set;
/// `target` (inside the segments) is the range whose statistics are written to
/// `out[u * target.len() + (kp - target.start)]`. `Max` outputs are overwritten; `Sum` outputs
/// are overwritten with the sum.
pub fn column_stats(
    units: &[Unit<'_>],
    d: usize,
    scale: f32,
    segments: &[Range<usize>],
    target: Range<usize>,
    reduce: ColReduce,
    out: &mut [f32],
) -> Result<()> {
    crate::colstats::validate(units, d, segments, &target, out.len())?;
    let tlen = target.len();
    let jobs: Vec<(usize, usize)> = units
        .iter()
        .enumerate()
        .flat_map(|(u, unit)| {
            let n_rows = unit.q.len() / d.max(1);
            (0..n_rows.div_ceil(ROW_TILE)).map(move |t| (u, t * ROW_TILE))
        })
        .collect();
    let partials: Vec<(usize, Vec<f32>)> = jobs
        .par_iter()
        .map(|&(u, r0)| {
            let unit = &units[u];
            let n_rows = unit.q.len() / d;
            let r1 = (r0 + ROW_TILE).min(n_rows);
            let mut acc = vec![reduce.identity(); tlen];
            row_tile_stats(
                unit,
                r0..r1,
                d,
                scale,
                segments,
                target.clone(),
                reduce,
                &mut acc,
            )?;
            Ok((u, acc))
        })
        .collect::<Result<_>>()?;
    let out = &mut out[..units.len() * tlen];
    out.fill(reduce.identity());
    for (u, acc) in partials {
        let dst = &mut out[u * tlen..(u + 1) * tlen];
        match reduce {
            ColReduce::Max => dst.iter_mut().zip(&acc).for_each(|(o, a)| *o = o.max(*a)),
            ColReduce::Sum => dst.iter_mut().zip(&acc).for_each(|(o, a)| *o += *a),
        }
    }
    if reduce == ColReduce::Max {
        // Max mode reduced log-probabilities; exp is monotonic, so the max probability is the
        // exp of the max log-probability (one exp per key instead of one per row and key).
        out.iter_mut().for_each(|o| *o = o.exp());
    }
    Ok(())
}

/// Both passes for rows `rows` of one unit; reduces into `acc` (`target.len()` floats): the max
/// over rows of the log-probability `s - lse` for `Max` (exponentiated by the caller), the sum
/// of probabilities for `Sum`.
#[allow(clippy::too_many_arguments)]
fn row_tile_stats(
    unit: &Unit<'_>,
    rows: Range<usize>,
    d: usize,
    scale: f32,
    segments: &[Range<usize>],
    target: Range<usize>,
    reduce: ColReduce,
    acc: &mut [f32],
) -> Result<()> {
    let nr = rows.len();
    let q = &unit.q[rows.start * d..rows.end * d];
    let pos: Vec<usize> = rows
        .clone()
        .map(|r| unit.first_pos + r % unit.period)
        .collect();
    let max_pos = pos.iter().copied().max().unwrap_or(0);
    let mut tile = vec![0.0f32; nr * KEY_TILE];
    let mut run_max = vec![f32::NEG_INFINITY; nr];
    let mut run_sum = vec![0.0f32; nr];
    // Logits of the target keys any row can see, kept from pass 1 for pass 2.
    let t_end = target.end.min(max_pos + 1);
    let t_len = t_end.saturating_sub(target.start);
    let mut kept = vec![0.0f32; nr * t_len];

    // Pass 1: online log-sum-exp over every visible key of every segment.
    for seg in segments {
        let mut k0 = seg.start;
        while k0 < seg.end && k0 <= max_pos {
            let k1 = (k0 + KEY_TILE).min(seg.end);
            let nk = k1 - k0;
            matmul_nt(nr, nk, d, q, &unit.keys[k0 * d..k1 * d], &mut tile, scale)?;
            let (lo, hi) = (k0.max(target.start), k1.min(t_end));
            if lo < hi {
                for i in 0..nr {
                    let dst = i * t_len + lo - target.start;
                    kept[dst..dst + hi - lo]
                        .copy_from_slice(&tile[i * nk + lo - k0..i * nk + hi - k0]);
                }
            }
            for (i, &p) in pos.iter().enumerate() {
                let visible = nk.min((p + 1).saturating_sub(k0));
                if visible == 0 {
                    continue;
                }
                let s = &tile[i * nk..i * nk + visible];
                let tile_max = super::math::max_value(s);
                let new_max = run_max[i].max(tile_max);
                let mut sum = run_sum[i] * (run_max[i] - new_max).exp();
                sum += super::math::sum_exp_shifted(s, new_max);
                run_max[i] = new_max;
                run_sum[i] = sum;
            }
            k0 = k1;
        }
    }
    let lse: Vec<f32> = run_max
        .iter()
        .zip(&run_sum)
        .map(|(&m, &s)| if s > 0.0 { m + s.ln() } else { f32::INFINITY })
        .collect();

    // Pass 2: probabilities at the target keys, reduced over rows.
    for (i, &p) in pos.iter().enumerate() {
        let visible = t_len.min((p + 1).saturating_sub(target.start));
        let s = &kept[i * t_len..i * t_len + visible];
        let dst = &mut acc[..visible];
        match reduce {
            ColReduce::Max => {
                let l = lse[i];
                for (o, &x) in dst.iter_mut().zip(s) {
                    *o = o.max(x - l);
                }
            }
            ColReduce::Sum => super::math::add_exp_shifted(dst, s, lse[i]),
        }
    }
    Ok(())
}
