//! KNorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
//! Compression"): keys with a small L2 norm draw attention, so a pair scores `-‖k‖₂`.

use std::ops::Range;

/// `-‖k_p‖₂` for the positions `rows` of one head's key rows (`keys`: `[n, head_dim]`).
pub fn knorm_scores(keys: &[f32], head_dim: usize, rows: Range<usize>) -> Vec<f32> {
    rows.map(|p| {
        let k = &keys[p * head_dim..(p + 1) * head_dim];
        -k.iter().map(|x| x * x).sum::<f32>().sqrt()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::knorm_scores;

    #[test]
    fn smaller_keys_score_higher() {
        let keys = [3.0, 4.0, 0.0, 1.0, 6.0, 8.0];
        assert_eq!(knorm_scores(&keys, 2, 0..3), vec![-5.0, -1.0, -10.0]);
        assert_eq!(knorm_scores(&keys, 2, 1..3), vec![-1.0, -10.0]);
    }
}
