//! Plain-loop reference of the causal-softmax column statistics (see [`crate::colstats`]).

use std::ops::Range;

use crate::colstats::{ColReduce, ColumnUnit};
use crate::Result;

/// Same contract as [`crate::cpu::column_stats`]: for every unit and every query row, a
/// softmax (f64) over the visible keys of `segments` (key position `kp` visible to a row at
/// position `p` iff `kp <= p`), then the max or sum over rows of the probabilities of the
/// `target` keys, written to `out[u * target.len() + (kp - target.start)]`.
pub fn column_stats(
    units: &[ColumnUnit<'_>],
    d: usize,
    scale: f32,
    segments: &[Range<usize>],
    target: Range<usize>,
    reduce: ColReduce,
    out: &mut [f32],
) -> Result<()> {
    crate::colstats::validate(units, d, segments, &target, out.len())?;
    let tlen = target.len();
    for (u, unit) in units.iter().enumerate() {
        let acc = &mut out[u * tlen..(u + 1) * tlen];
        acc.fill(0.0);
        let n_rows = unit.q.len() / d;
        for r in 0..n_rows {
            let pos = unit.first_pos + r % unit.period;
            let q = &unit.q[r * d..(r + 1) * d];
            let keys: Vec<usize> = segments
                .iter()
                .flat_map(|s| s.clone())
                .filter(|&kp| kp <= pos)
                .collect();
            let logits: Vec<f64> = keys
                .iter()
                .map(|&kp| {
                    let k = &unit.keys[kp * d..(kp + 1) * d];
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let denom: f64 = logits.iter().map(|x| (x - mx).exp()).sum();
            for (&kp, &l) in keys.iter().zip(&logits) {
                if !target.contains(&kp) {
                    continue;
                }
                let p = ((l - mx).exp() / denom) as f32;
                let o = &mut acc[kp - target.start];
                match reduce {
                    ColReduce::Max => *o = o.max(p),
                    ColReduce::Sum => *o += p,
                }
            }
        }
    }
    Ok(())
}
