//! Baselines: StreamingLLM keeps sinks + recent, SnapKV window/pooling, H2O max attention.

use kvzip_score::baselines::{
    pool1d, streaming_llm_scores, Baseline, BaselineScorer, LayerObservation, Pooling, SnapKvConfig,
};
use kvzip_score::{select, Level};

struct Rng(u64);
impl Rng {
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}

/// Dense causal attention probabilities of query head `qh` at position `p` over keys `0..=p`.
fn dense_probs(
    q: &[f32],
    keys: &[f32],
    n_q: usize,
    d: usize,
    qh: usize,
    p: usize,
    scale: f32,
) -> Vec<f32> {
    let qr = &q[(p * n_q + qh) * d..(p * n_q + qh + 1) * d];
    let logits: Vec<f32> = (0..=p)
        .map(|k| {
            qr.iter()
                .zip(&keys[k * d..(k + 1) * d])
                .map(|(a, b)| a * b)
                .sum::<f32>()
                * scale
        })
        .collect();
    let m = logits.iter().copied().fold(f32::MIN, f32::max);
    let z: f32 = logits.iter().map(|x| (x - m).exp()).sum();
    logits.iter().map(|x| (x - m).exp() / z).collect()
}

struct Prefill {
    n_sys: usize,
    n_ctx: usize,
    n_kv: usize,
    group: usize,
    d: usize,
    q: Vec<f32>,
    keys: Vec<Vec<f32>>,
}

fn prefill(n_sys: usize, n_ctx: usize, n_kv: usize, group: usize, d: usize) -> Prefill {
    let mut rng = Rng(77);
    let n = n_sys + n_ctx;
    Prefill {
        n_sys,
        n_ctx,
        n_kv,
        group,
        d,
        q: rng.vec(n * n_kv * group * d),
        keys: (0..n_kv).map(|_| rng.vec(n * d)).collect(),
    }
}

/// Feeds the prefill to the scorer in chunks, like the engine (layer 1 unscored).
fn run(kind: Baseline, pf: &Prefill, chunk: usize) -> kvzip_score::ContextScores {
    let heads = [Some(pf.n_kv), None];
    let mut sc = BaselineScorer::new(kind, pf.n_sys, pf.n_ctx, &heads).unwrap();
    let n = pf.n_sys + pf.n_ctx;
    let n_q = pf.n_kv * pf.group;
    let row = n_q * pf.d;
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let keys = |h: usize| &pf.keys[h][..end * pf.d];
        for layer in 0..2 {
            let obs = LayerObservation {
                q: &pf.q[start * row..end * row],
                n_q_heads: n_q,
                head_dim: pf.d,
                first_pos: start,
                n_kv_heads: pf.n_kv,
                head_keys: &keys,
                head_values: None,
                rope: None,
                scale: 1.0 / (pf.d as f32).sqrt(),
            };
            sc.observe_layer(layer, &obs).unwrap();
        }
    }
    sc.finish().unwrap()
}

#[test]
fn streaming_llm_keeps_sinks_and_recent_window() {
    let n_ctx = 100;
    let s = streaming_llm_scores(n_ctx, 4, &[Some(2), None, Some(2)]);
    for level in [Level::Pair, Level::PairUniform] {
        let sel = select(&s, 0.2, level).unwrap(); // 20 per head
        for l in [0, 2] {
            for h in 0..2 {
                let kept: Vec<usize> = (0..n_ctx).filter(|&p| sel.mask.is_kept(l, h, p)).collect();
                let want: Vec<usize> = (0..4).chain(84..100).collect();
                assert_eq!(kept, want, "{level}");
            }
        }
    }
    // Via the scorer (no attention needed).
    let sc =
        BaselineScorer::new(Baseline::StreamingLlm { n_sink: 4 }, 5, n_ctx, &[Some(2)]).unwrap();
    assert!(!sc.needs_attention());
    assert_eq!(
        sc.finish().unwrap(),
        streaming_llm_scores(n_ctx, 4, &[Some(2)])
    );
}

#[test]
fn pooling_max_and_avg() {
    let v = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0];
    let mx = pool1d(&v, 7, Pooling::Max);
    assert_eq!(mx, vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
    let avg = pool1d(&v, 3, Pooling::Avg);
    assert!((avg[0] - 0.0).abs() < 1e-7 && (avg[2] - 1.0 / 3.0).abs() < 1e-7);
    assert!(
        (avg[9] - 2.0 / 3.0).abs() < 1e-7,
        "padding counts toward the mean"
    );
}

#[test]
fn snapkv_matches_dense_window_attention_and_keeps_window() {
    let pf = prefill(6, 60, 2, 2, 16);
    let cfg = SnapKvConfig {
        window: 8,
        short_window: 8,
        short_context: 0,
        kernel: 3,
        pooling: Pooling::Avg,
    };
    // Chunks of 13 split the window (positions 58..66) across two prefill chunks.
    let s = run(Baseline::SnapKv(cfg), &pf, 13);
    let n_q = pf.n_kv * pf.group;
    let scale = 1.0 / (pf.d as f32).sqrt();
    let prefix = pf.n_ctx - 8;
    for h in 0..pf.n_kv {
        let mut want = vec![0.0f32; prefix];
        for g in 0..pf.group {
            let qh = h * pf.group + g;
            let mut mean = vec![0.0f32; prefix];
            for p in pf.n_sys + prefix..pf.n_sys + pf.n_ctx {
                let probs = dense_probs(&pf.q, &pf.keys[h], n_q, pf.d, qh, p, scale);
                for (c, m) in mean.iter_mut().enumerate() {
                    *m += probs[pf.n_sys + c] / 8.0;
                }
            }
            for (w, p) in want.iter_mut().zip(pool1d(&mean, 3, Pooling::Avg)) {
                *w += p / pf.group as f32;
            }
        }
        let got = s.head(0, h).unwrap();
        for c in 0..prefix {
            assert!(
                (got[c] - want[c]).abs() < 1e-5,
                "head {h} pos {c}: {} vs {}",
                got[c],
                want[c]
            );
        }
        assert!(
            got[prefix..].iter().all(|v| *v == f32::MAX),
            "window keys always rank first"
        );
    }
    assert!(s.layer(1).is_none());
    // The window survives any level at a budget at least the window size.
    let sel = select(&s, 0.2, Level::Pair).unwrap();
    for h in 0..pf.n_kv {
        assert!((prefix..pf.n_ctx).all(|p| sel.mask.is_kept(0, h, p)));
    }
}

#[test]
fn snapkv_window_defaults() {
    let sc = BaselineScorer::new(
        Baseline::SnapKv(SnapKvConfig::default()),
        3,
        500,
        &[Some(1)],
    )
    .unwrap();
    assert_eq!(sc.window(), 484..500, "16 below 1K tokens");
    let sc = BaselineScorer::new(
        Baseline::SnapKv(SnapKvConfig::default()),
        3,
        2000,
        &[Some(1)],
    )
    .unwrap();
    assert_eq!(sc.window(), 1968..2000);
    let bad = SnapKvConfig {
        kernel: 4,
        ..SnapKvConfig::default()
    };
    assert!(BaselineScorer::new(Baseline::SnapKv(bad), 3, 2000, &[Some(1)]).is_err());
}

#[test]
fn h2o_is_max_attention_over_context_rows() {
    let pf = prefill(5, 70, 2, 3, 8);
    let s = run(Baseline::H2o, &pf, 23);
    let n_q = pf.n_kv * pf.group;
    let scale = 1.0 / (pf.d as f32).sqrt();
    for h in 0..pf.n_kv {
        let mut want = vec![0.0f32; pf.n_ctx];
        for g in 0..pf.group {
            for p in pf.n_sys..pf.n_sys + pf.n_ctx {
                let probs = dense_probs(&pf.q, &pf.keys[h], n_q, pf.d, h * pf.group + g, p, scale);
                for c in 0..=(p - pf.n_sys) {
                    want[c] = want[c].max(probs[pf.n_sys + c]);
                }
            }
        }
        let got = s.head(0, h).unwrap();
        for c in 0..pf.n_ctx {
            assert!((got[c] - want[c]).abs() < 1e-5, "head {h} pos {c}");
        }
        // The last context key is seen only by itself: probability from one row, still > 0.
        assert!(got[pf.n_ctx - 1] > 0.0);
    }
}

#[test]
fn missing_chunks_are_an_error() {
    let pf = prefill(4, 30, 1, 1, 8);
    let mut sc = BaselineScorer::new(Baseline::H2o, 4, 30, &[Some(1)]).unwrap();
    let keys = |h: usize| &pf.keys[h][..20 * 8];
    let obs = LayerObservation {
        q: &pf.q[..20 * 8],
        n_q_heads: 1,
        head_dim: 8,
        first_pos: 0,
        n_kv_heads: 1,
        head_keys: &keys,
        head_values: None,
        rope: None,
        scale: 0.35,
    };
    sc.observe_layer(0, &obs).unwrap();
    let err = sc.finish().unwrap_err().to_string();
    assert!(err.contains("observed 16 query rows, expected 30"), "{err}");
}
