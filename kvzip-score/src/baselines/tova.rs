//! TOVA (Oren et al. 2024), query-agnostic prefill form (as kvpress's `TOVAPress`): the
//! attention probabilities of the last context token's query at every earlier key, averaged
//! over all query heads of the layer, the same for every KV head; the last token itself ranks
//! first.

/// TOVA scores `[n_kv, n_ctx]` of one layer from the last row's probabilities per query head
/// (`probs`: `[n_q_heads, n_ctx]`).
pub(super) fn tova_layer(probs: &[f32], n_q_heads: usize, n_kv: usize, n_ctx: usize) -> Vec<f32> {
    let mut mean = vec![0.0f32; n_ctx];
    for qh in 0..n_q_heads {
        for (m, p) in mean.iter_mut().zip(&probs[qh * n_ctx..(qh + 1) * n_ctx]) {
            *m += p / n_q_heads as f32;
        }
    }
    if let Some(last) = mean.last_mut() {
        *last = f32::MAX;
    }
    mean.repeat(n_kv)
}

#[cfg(test)]
mod tests {
    use super::tova_layer;

    #[test]
    fn mean_over_all_query_heads_and_last_token_first() {
        // 2 query heads, 2 KV heads, 3 context tokens.
        let probs = [0.2, 0.5, 0.3, 0.4, 0.1, 0.5];
        let s = tova_layer(&probs, 2, 2, 3);
        assert_eq!(s.len(), 6);
        assert!((s[0] - 0.3).abs() < 1e-6 && (s[1] - 0.3).abs() < 1e-6);
        assert_eq!(s[2], f32::MAX);
        assert_eq!(&s[..3], &s[3..]);
    }
}
