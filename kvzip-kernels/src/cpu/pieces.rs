//! Attention over pieces (see [`crate::pieces`]): parallel over virtual heads, tiles of keys
//! through the SIMD GEMM, online softmax across tiles and pieces.

use rayon::prelude::*;

use super::gemm::matmul;
use crate::pieces::{validate_pieces, visible, HostPiece, PiecesArgs};
use crate::Result;

/// Keys per tile.
const KEY_TILE: usize = 512;

/// Fast path of [`crate::pieces::attention_pieces_reference`] (same contract).
pub fn attention_pieces(
    q: &[f32],
    pieces: &[HostPiece<'_>],
    lens: &[usize],
    a: &PiecesArgs,
    out: &mut [f32],
) -> Result<()> {
    let per_head = validate_pieces(q.len(), pieces, lens, a, out.len())?;
    let (d, n_heads, rows) = (a.head_dim, lens.len(), a.q_len * a.group);
    let n_q = n_heads * a.group;
    let results: Vec<Vec<f32>> = per_head
        .par_iter()
        .enumerate()
        .map(|(h, idx)| -> Result<Vec<f32>> {
            // The head's query rows, ordered (t, g), pre-scaled.
            let mut qh = vec![0.0f32; rows * d];
            for t in 0..a.q_len {
                for g in 0..a.group {
                    let src = (t * n_q + h * a.group + g) * d;
                    let dst = (t * a.group + g) * d;
                    qh[dst..dst + d].copy_from_slice(&q[src..src + d]);
                }
            }
            let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0.0f32; rows]);
            let mut acc = vec![0.0f32; rows * d];
            let mut s = vec![0.0f32; rows * KEY_TILE];
            let mut pv = vec![0.0f32; rows * d];
            let first_i = lens[h] - a.q_len;
            for &pi in idx {
                let p = &pieces[pi];
                let n = p.k.len() / d;
                let mut k0 = 0;
                while k0 < n {
                    let k1 = (k0 + KEY_TILE).min(n);
                    let nk = k1 - k0;
                    let tile = &mut s[..rows * nk];
                    matmul(
                        &qh,
                        &p.k[k0 * d..k1 * d],
                        rows,
                        d,
                        nk,
                        true,
                        a.scale,
                        0.0,
                        tile,
                    )?;
                    for r in 0..rows {
                        let i = first_i + r / a.group;
                        let row = &mut tile[r * nk..(r + 1) * nk];
                        let mut tmax = f32::NEG_INFINITY;
                        for (c, x) in row.iter_mut().enumerate() {
                            if !visible(i, p.key_start + k0 + c, a.window) {
                                *x = f32::NEG_INFINITY;
                                continue;
                            }
                            if let Some(cap) = a.softcap {
                                *x = cap * (*x / cap).tanh();
                            }
                            tmax = tmax.max(*x);
                        }
                        let new_m = m[r].max(tmax);
                        if new_m == f32::NEG_INFINITY {
                            row.fill(0.0);
                            continue;
                        }
                        let rescale = super::math::exp(m[r] - new_m);
                        let sum = super::math::exp_shift_in_place(row, new_m);
                        l[r] = l[r] * rescale + sum;
                        acc[r * d..(r + 1) * d]
                            .iter_mut()
                            .for_each(|o| *o *= rescale);
                        m[r] = new_m;
                    }
                    matmul(
                        tile,
                        &p.v[k0 * d..k1 * d],
                        rows,
                        nk,
                        d,
                        false,
                        1.0,
                        0.0,
                        &mut pv,
                    )?;
                    acc.iter_mut().zip(&pv).for_each(|(o, x)| *o += x);
                    k0 = k1;
                }
            }
            for r in 0..rows {
                let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
                acc[r * d..(r + 1) * d].iter_mut().for_each(|o| *o *= inv);
            }
            Ok(acc)
        })
        .collect::<Result<_>>()?;
    for (h, acc) in results.iter().enumerate() {
        for t in 0..a.q_len {
            for g in 0..a.group {
                let src = (t * a.group + g) * d;
                let dst = (t * n_q + h * a.group + g) * d;
                out[dst..dst + d].copy_from_slice(&acc[src..src + d]);
            }
        }
    }
    Ok(())
}
