//! Expected Attention (Devoto et al. 2025, kvpress's `ExpectedAttentionPress`): the attention a
//! key will receive from *future* queries, estimated from the statistics of the queries seen so
//! far. Per query head: mean `μ` and covariance `Σ` of the pre-RoPE queries of every prefilled
//! position after the first `n_sink`; both rotated by the RoPE matrix averaged over the next
//! `n_future_positions` positions (`R̄ = mean_t R(t)`, `μ' = R̄μ`, `Σ' = R̄ΣR̄ᵀ`); a key `k`
//! then expects `exp(s·μ'ᵀk + ½ s² kᵀΣ'k)` (the Gaussian moment), softmax-normalised over the
//! non-sink keys, averaged over the GQA group, times `‖v‖`. Sink positions rank first.
//!
//! The engine observes rotated queries; they are un-rotated here with the layer's RoPE
//! frequencies (rotate-half layout over the first `2 · inv_freq.len()` dims, attention factor
//! divided out).

use std::ops::Range;

use super::RopeObservation;

/// Settings of Expected Attention (kvpress defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpectedAttentionConfig {
    /// Future positions the RoPE rotation is averaged over (512).
    pub n_future_positions: usize,
    /// Leading positions excluded from the statistics and always kept (4).
    pub n_sink: usize,
    /// Use the query covariance term (true).
    pub use_covariance: bool,
    /// Multiply by the value norm (true).
    pub use_vnorm: bool,
    /// Added to the probability before the value-norm scaling (0).
    pub epsilon: f32,
}

impl Default for ExpectedAttentionConfig {
    fn default() -> Self {
        Self {
            n_future_positions: 512,
            n_sink: 4,
            use_covariance: true,
            use_vnorm: true,
            epsilon: 0.0,
        }
    }
}

/// Running sums of the pre-RoPE queries of one layer, per query head.
pub(super) struct QueryStats {
    d: usize,
    n_q: usize,
    count: usize,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
}

/// Rotation of `x` (one head, rotate-half layout over `2 * cos.len()` dims) by the angles whose
/// cosines / sines are `cos` / `sin`, scaled by `factor` on the rotated dims.
fn rotate(x: &mut [f64], cos: &[f64], sin: &[f64], factor: f64) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = factor * (a * cos[i] - b * sin[i]);
        x[i + half] = factor * (b * cos[i] + a * sin[i]);
    }
}

impl QueryStats {
    pub(super) fn new(n_q: usize, d: usize) -> Self {
        Self {
            d,
            n_q,
            count: 0,
            sum: vec![0.0; n_q * d],
            sum_sq: vec![0.0; n_q * d * d],
        }
    }

    /// Adds the rotated queries `q` (`[t, n_q, d]` of positions `first_pos..`) of the rows
    /// `rows` (absolute positions), un-rotated with `rope`.
    pub(super) fn add(
        &mut self,
        q: &[f32],
        first_pos: usize,
        rows: Range<usize>,
        rope: &RopeObservation<'_>,
    ) {
        let (d, n_q) = (self.d, self.n_q);
        let half = rope.inv_freq.len();
        let mut x = vec![0.0f64; d];
        for p in rows {
            let cos: Vec<f64> = rope
                .inv_freq
                .iter()
                .map(|f| (p as f64 * *f as f64).cos())
                .collect();
            // The inverse rotation: angle -pθ, and the attention factor divided out.
            let sin: Vec<f64> = rope
                .inv_freq
                .iter()
                .map(|f| -(p as f64 * *f as f64).sin())
                .collect();
            for h in 0..n_q {
                let off = ((p - first_pos) * n_q + h) * d;
                x.iter_mut()
                    .zip(&q[off..off + d])
                    .for_each(|(a, b)| *a = *b as f64);
                if half > 0 {
                    rotate(&mut x, &cos, &sin, 1.0 / rope.factor as f64);
                }
                let s = &mut self.sum[h * d..(h + 1) * d];
                s.iter_mut().zip(&x).for_each(|(a, b)| *a += b);
                let sq = &mut self.sum_sq[h * d * d..(h + 1) * d * d];
                for i in 0..d {
                    for j in 0..d {
                        sq[i * d + j] += x[i] * x[j];
                    }
                }
            }
            self.count += 1;
        }
    }

    /// Mean and (population) covariance of query head `h`, rotated by the RoPE matrix averaged
    /// over positions `future` (and the attention factor).
    fn future_moments(
        &self,
        h: usize,
        rope: &RopeObservation<'_>,
        future: Range<usize>,
    ) -> (Vec<f64>, Vec<f64>) {
        let d = self.d;
        let n = self.count.max(1) as f64;
        let mut mu: Vec<f64> = self.sum[h * d..(h + 1) * d].iter().map(|s| s / n).collect();
        let mut cov: Vec<f64> = (0..d * d)
            .map(|ij| self.sum_sq[h * d * d + ij] / n - mu[ij / d] * mu[ij % d])
            .collect();
        let half = rope.inv_freq.len();
        if half == 0 {
            return (mu, cov);
        }
        let m = future.len().max(1) as f64;
        let cos: Vec<f64> = rope
            .inv_freq
            .iter()
            .map(|f| {
                future
                    .clone()
                    .map(|t| (t as f64 * *f as f64).cos())
                    .sum::<f64>()
                    / m
            })
            .collect();
        let sin: Vec<f64> = rope
            .inv_freq
            .iter()
            .map(|f| {
                future
                    .clone()
                    .map(|t| (t as f64 * *f as f64).sin())
                    .sum::<f64>()
                    / m
            })
            .collect();
        let factor = rope.factor as f64;
        rotate(&mut mu, &cos, &sin, factor);
        // Σ' = R̄ Σ R̄ᵀ: rotate every column, then every row.
        let mut col = vec![0.0f64; d];
        for j in 0..d {
            (0..d).for_each(|i| col[i] = cov[i * d + j]);
            rotate(&mut col, &cos, &sin, factor);
            (0..d).for_each(|i| cov[i * d + j] = col[i]);
        }
        for i in 0..d {
            rotate(&mut cov[i * d..(i + 1) * d], &cos, &sin, factor);
        }
        (mu, cov)
    }

    /// Scores `[n_kv, n_ctx]` of the context positions `ctx` (absolute) of one layer whose keys
    /// and values (rotated cache rows of positions `0..n_rows`) are `keys(h)` / `values(h)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_layer(
        &self,
        cfg: &ExpectedAttentionConfig,
        rope: &RopeObservation<'_>,
        keys: &dyn Fn(usize) -> Vec<f32>,
        values: &dyn Fn(usize) -> Vec<f32>,
        n_kv: usize,
        n_rows: usize,
        ctx: Range<usize>,
        scale: f32,
    ) -> Vec<f32> {
        let d = self.d;
        let group = self.n_q / n_kv.max(1);
        let sink = cfg.n_sink.min(n_rows);
        let s = scale as f64;
        let n_ctx = ctx.len();
        let mut out = vec![0.0f32; n_kv * n_ctx];
        for kh in 0..n_kv {
            let k = keys(kh);
            let v = values(kh);
            let mut mean_probs = vec![0.0f64; n_rows - sink];
            for g in 0..group {
                let (mu, cov) = self.future_moments(
                    kh * group + g,
                    rope,
                    n_rows..n_rows + cfg.n_future_positions,
                );
                let logits: Vec<f64> = (sink..n_rows)
                    .map(|p| {
                        let kp = &k[p * d..(p + 1) * d];
                        let mut l = s * kp.iter().zip(&mu).map(|(a, b)| *a as f64 * b).sum::<f64>();
                        if cfg.use_covariance {
                            let mut quad = 0.0;
                            for i in 0..d {
                                let row = &cov[i * d..(i + 1) * d];
                                let ci: f64 = row.iter().zip(kp).map(|(c, x)| c * *x as f64).sum();
                                quad += kp[i] as f64 * ci;
                            }
                            l += 0.5 * s * s * quad;
                        }
                        l
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                for (m, l) in mean_probs.iter_mut().zip(&logits) {
                    *m += (l - max).exp() / z / group as f64;
                }
            }
            for (c, p) in ctx.clone().enumerate() {
                out[kh * n_ctx + c] = if p < sink {
                    f32::MAX
                } else {
                    let mut score = mean_probs[p - sink] + cfg.epsilon as f64;
                    if cfg.use_vnorm {
                        let vp = &v[p * d..(p + 1) * d];
                        score *= vp.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    }
                    score as f32
                };
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full `d x d` RoPE matrix of position `t` (rotate-half layout), as a reference.
    fn rope_matrix(inv_freq: &[f32], d: usize, t: f64) -> Vec<f64> {
        let half = inv_freq.len();
        let mut r = vec![0.0; d * d];
        for i in 0..d {
            r[i * d + i] = 1.0;
        }
        for (i, f) in inv_freq.iter().enumerate() {
            let (c, s) = ((t * *f as f64).cos(), (t * *f as f64).sin());
            r[i * d + i] = c;
            r[i * d + i + half] = -s;
            r[(i + half) * d + i + half] = c;
            r[(i + half) * d + i] = s;
        }
        r
    }

    fn matvec(m: &[f64], x: &[f64], d: usize) -> Vec<f64> {
        (0..d)
            .map(|i| (0..d).map(|j| m[i * d + j] * x[j]).sum())
            .collect()
    }

    #[test]
    fn matches_a_dense_matrix_reference() {
        // One layer, 2 query heads sharing 1 KV head, head_dim 4, 10 prefilled positions, the
        // context = positions 3..10, 2 sinks, 6 future positions.
        let (d, n_q, n_rows) = (4, 2, 10);
        let inv_freq = [0.9f32, 0.05];
        let rope = RopeObservation {
            inv_freq: &inv_freq,
            factor: 1.0,
        };
        let cfg = ExpectedAttentionConfig {
            n_future_positions: 6,
            n_sink: 2,
            ..Default::default()
        };
        let mut gen = kvzip_kernels::sampling::Rng::new(7);
        let mut rng = || gen.next_f64() * 2.0 - 1.0;
        let raw_q: Vec<f64> = (0..n_rows * n_q * d).map(|_| rng()).collect();
        let keys: Vec<f32> = (0..n_rows * d).map(|_| rng() as f32).collect();
        let values: Vec<f32> = (0..n_rows * d).map(|_| rng() as f32).collect();
        // Observed queries are rotated by their own position.
        let mut q_rot = vec![0.0f32; n_rows * n_q * d];
        for p in 0..n_rows {
            let r = rope_matrix(&inv_freq, d, p as f64);
            for h in 0..n_q {
                let off = (p * n_q + h) * d;
                let y = matvec(&r, &raw_q[off..off + d], d);
                for i in 0..d {
                    q_rot[off + i] = y[i] as f32;
                }
            }
        }
        let mut stats = QueryStats::new(n_q, d);
        stats.add(&q_rot, 0, 2..n_rows, &rope);
        let scale = 0.5f32;
        let got = stats.finish_layer(
            &cfg,
            &rope,
            &|_| keys.clone(),
            &|_| values.clone(),
            1,
            n_rows,
            3..n_rows,
            scale,
        );
        // Dense reference.
        let mut rbar = vec![0.0; d * d];
        for t in n_rows..n_rows + 6 {
            let r = rope_matrix(&inv_freq, d, t as f64);
            rbar.iter_mut().zip(&r).for_each(|(a, b)| *a += b / 6.0);
        }
        let mut expected = vec![0.0f64; n_rows - 2];
        for h in 0..n_q {
            let rows: Vec<&[f64]> = (2..n_rows)
                .map(|p| &raw_q[(p * n_q + h) * d..(p * n_q + h + 1) * d])
                .collect();
            let n = rows.len() as f64;
            let mu: Vec<f64> = (0..d)
                .map(|i| rows.iter().map(|r| r[i]).sum::<f64>() / n)
                .collect();
            let cov: Vec<f64> = (0..d * d)
                .map(|ij| {
                    rows.iter()
                        .map(|r| (r[ij / d] - mu[ij / d]) * (r[ij % d] - mu[ij % d]))
                        .sum::<f64>()
                        / n
                })
                .collect();
            let mu2 = matvec(&rbar, &mu, d);
            // Σ' = R̄ Σ R̄ᵀ
            let mut rs = vec![0.0; d * d];
            for i in 0..d {
                for j in 0..d {
                    rs[i * d + j] = (0..d).map(|k| rbar[i * d + k] * cov[k * d + j]).sum();
                }
            }
            let mut cov2 = vec![0.0; d * d];
            for i in 0..d {
                for j in 0..d {
                    cov2[i * d + j] = (0..d).map(|k| rs[i * d + k] * rbar[j * d + k]).sum();
                }
            }
            let s = scale as f64;
            let logits: Vec<f64> = (2..n_rows)
                .map(|p| {
                    let k: Vec<f64> = keys[p * d..(p + 1) * d].iter().map(|x| *x as f64).collect();
                    let lin: f64 = (0..d).map(|i| mu2[i] * k[i]).sum();
                    let quad: f64 = (0..d)
                        .map(|i| k[i] * (0..d).map(|j| cov2[i * d + j] * k[j]).sum::<f64>())
                        .sum();
                    s * lin + 0.5 * s * s * quad
                })
                .collect();
            let z: f64 = logits.iter().map(|l| l.exp()).sum();
            for (e, l) in expected.iter_mut().zip(&logits) {
                *e += l.exp() / z / n_q as f64;
            }
        }
        for (c, p) in (3..n_rows).enumerate() {
            let vn: f64 = values[p * d..(p + 1) * d]
                .iter()
                .map(|x| (*x as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let want = expected[p - 2] * vn;
            assert!(
                (got[c] as f64 - want).abs() < 1e-5 * want.abs().max(1e-3),
                "pos {p}: {} vs {want}",
                got[c]
            );
        }
    }
}
