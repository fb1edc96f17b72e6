//! KVzip+ normalisation: a pair's reconstruction score times how much its value can move the
//! residual stream, `‖W_O v‖ / ‖h‖` — the norm of the value after the output projection of
//! the query heads that read it (mean over the GQA group), over the norm of the hidden state
//! (residual stream entering the layer) at the pair's position. Independent of the selection
//! level: it rescales scores before any [`crate::select()`].
//!
//! `‖W_g v‖² = vᵀ (W_gᵀ W_g) v` with the `d x d` Gram matrix of query head `g`'s slice of `W_O`,
//! so the cost is `O(d²)` per pair and head instead of `O(hidden · d)`.

use crate::{Result, ScoreError};

/// Gram matrices `W_gᵀ W_g` (`[n_q_heads, d, d]`) of the per-head column slices of an output
/// projection `w_o` (`[hidden, n_q_heads * d]`, row-major as HF stores `o_proj.weight`).
pub fn output_grams(w_o: &[f32], hidden: usize, n_q_heads: usize, d: usize) -> Result<Vec<f64>> {
    if w_o.len() != hidden * n_q_heads * d {
        return Err(ScoreError::Shape(format!(
            "KVzip+: W_O has {} values, expected {hidden} x {n_q_heads} x {d}",
            w_o.len()
        )));
    }
    let cols = n_q_heads * d;
    let mut grams = vec![0.0f64; n_q_heads * d * d];
    for row in w_o.chunks(cols) {
        for g in 0..n_q_heads {
            let r = &row[g * d..(g + 1) * d];
            let gram = &mut grams[g * d * d..(g + 1) * d * d];
            for i in 0..d {
                let ri = r[i] as f64;
                for j in 0..d {
                    gram[i * d + j] += ri * r[j] as f64;
                }
            }
        }
    }
    Ok(grams)
}

/// Multiplies one layer's scores (`[n_kv, n_ctx]`) by `mean_g ‖W_g v‖ / ‖h‖`: `values(h)` are
/// KV head `h`'s value rows of the context positions (`[n_ctx, d]`), `grams` from
/// [`output_grams`], `hidden_norms` the residual-stream norm per context position.
pub fn kvzip_plus_layer(
    scores: &mut [f32],
    values: &dyn Fn(usize) -> Vec<f32>,
    grams: &[f64],
    n_kv: usize,
    group: usize,
    d: usize,
    hidden_norms: &[f32],
) -> Result<()> {
    let n_ctx = hidden_norms.len();
    if scores.len() != n_kv * n_ctx || grams.len() != n_kv * group * d * d {
        return Err(ScoreError::Shape(format!(
            "KVzip+: {} scores / {} Gram entries for {n_kv} KV heads x {group} x {n_ctx} positions, d {d}",
            scores.len(),
            grams.len()
        )));
    }
    for h in 0..n_kv {
        let v = values(h);
        if v.len() != n_ctx * d {
            return Err(ScoreError::Shape(format!(
                "KVzip+: head {h} has {} value floats, expected {n_ctx} x {d}",
                v.len()
            )));
        }
        for p in 0..n_ctx {
            let vp = &v[p * d..(p + 1) * d];
            let mut moved = 0.0f64;
            for g in 0..group {
                let gram = &grams[(h * group + g) * d * d..(h * group + g + 1) * d * d];
                let mut q = 0.0f64;
                for i in 0..d {
                    let gi: f64 = gram[i * d..(i + 1) * d]
                        .iter()
                        .zip(vp)
                        .map(|(a, b)| a * *b as f64)
                        .sum();
                    q += vp[i] as f64 * gi;
                }
                moved += q.max(0.0).sqrt() / group as f64;
            }
            let s = &mut scores[h * n_ctx + p];
            *s = (*s as f64 * moved / (hidden_norms[p] as f64).max(1e-12)) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_direct_norm_ratio() {
        // hidden 3, 2 query heads sharing 1 KV head, d 2, 2 context positions.
        let w_o = [
            1.0, 2.0, 0.0, 1.0, /* row 1 */ 0.0, 1.0, 3.0, 0.0, /* row 2 */ 2.0, 0.0,
            1.0, 1.0,
        ];
        let grams = output_grams(&w_o, 3, 2, 2).unwrap();
        let v = vec![1.0f32, -1.0, 0.5, 2.0];
        let mut scores = vec![2.0f32, 3.0];
        let norms = [2.0f32, 4.0];
        kvzip_plus_layer(&mut scores, &|_| v.clone(), &grams, 1, 2, 2, &norms).unwrap();
        // Direct: W_g v for each head, norms, mean, times score, over ‖h‖.
        let direct = |p: usize| -> f32 {
            let vp = &v[p * 2..p * 2 + 2];
            let mut m = 0.0;
            for g in 0..2 {
                let y: Vec<f32> = (0..3)
                    .map(|r| w_o[r * 4 + g * 2] * vp[0] + w_o[r * 4 + g * 2 + 1] * vp[1])
                    .collect();
                m += y.iter().map(|x| x * x).sum::<f32>().sqrt() / 2.0;
            }
            m
        };
        assert!(
            (scores[0] - 2.0 * direct(0) / 2.0).abs() < 1e-5,
            "{scores:?}"
        );
        assert!(
            (scores[1] - 3.0 * direct(1) / 4.0).abs() < 1e-5,
            "{scores:?}"
        );
    }
}
