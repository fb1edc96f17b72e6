//! KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction"): keys that
//! differ most from the head's mean direction are kept. Anchor = mean of the L2-normalised
//! keys of every prefilled position; a pair scores `-cos(k, anchor)` (as kvpress's
//! `KeyDiffPress`, with torch's epsilons: normalise by `max(‖k‖, 1e-12)`, cosine by
//! `max(‖k‖·‖a‖, 1e-8)`).

use std::ops::Range;

/// KeyDiff scores of positions `rows` of one head whose first `n_rows` key rows (`keys`:
/// `[>= n_rows, head_dim]`) form the anchor.
pub fn keydiff_scores(
    keys: &[f32],
    head_dim: usize,
    n_rows: usize,
    rows: Range<usize>,
) -> Vec<f32> {
    let d = head_dim;
    let norm = |k: &[f32]| k.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let mut anchor = vec![0.0f64; d];
    for p in 0..n_rows {
        let k = &keys[p * d..(p + 1) * d];
        let n = norm(k).max(1e-12);
        for (a, x) in anchor.iter_mut().zip(k) {
            *a += *x as f64 / n;
        }
    }
    anchor.iter_mut().for_each(|a| *a /= n_rows.max(1) as f64);
    let na = anchor.iter().map(|a| a * a).sum::<f64>().sqrt();
    rows.map(|p| {
        let k = &keys[p * d..(p + 1) * d];
        let dot: f64 = k.iter().zip(&anchor).map(|(x, a)| *x as f64 * a).sum();
        (-dot / (norm(k) * na).max(1e-8)) as f32
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::keydiff_scores;

    #[test]
    fn outlier_direction_scores_highest() {
        // Three keys along x, one along y: the anchor leans to x, so the y key differs most.
        let keys = [1.0, 0.0, 2.0, 0.0, 0.5, 0.0, 0.0, 3.0];
        let s = keydiff_scores(&keys, 2, 4, 0..4);
        // anchor = (0.75, 0.25); cos(x, a) = 0.75 / 0.7906 = 0.9487, cos(y, a) = 0.3162.
        assert!((s[0] + 0.948_683).abs() < 1e-5, "{s:?}");
        assert!((s[3] + 0.316_228).abs() < 1e-5, "{s:?}");
        assert!(s[3] > s[0] && s[0] == s[1] && s[1] == s[2]);
    }
}
