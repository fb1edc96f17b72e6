//! Argmax, RNG determinism and HF-style top-k / top-p sampling.

use kvzip_kernels::sampling::{argmax, Rng, Sampler, SamplingParams};

#[test]
fn argmax_prefers_lowest_index_on_ties_and_skips_nan() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 2.0]), 3);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    assert_eq!(argmax(&[f32::NAN]), 0);
    assert_eq!(argmax(&[]), 0);
}

#[test]
fn rng_is_deterministic_and_uniform() {
    let (mut a, mut b, mut c) = (Rng::new(42), Rng::new(42), Rng::new(43));
    let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
    let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
    let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
    assert_eq!(xs, ys);
    assert_ne!(xs, zs);
    let n = 100_000;
    let mean = (0..n).map(|_| a.next_f64()).sum::<f64>() / n as f64;
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    assert!((0..1000)
        .map(|_| a.next_f64())
        .all(|x| (0.0..1.0).contains(&x)));
}

fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p,
        top_k,
        seed,
    }
}

#[test]
fn temperature_zero_is_greedy() {
    let mut s = Sampler::new(params(0.0, 0.5, 3, 1)).unwrap();
    assert_eq!(s.sample(&[0.1, 2.0, 2.0, 1.0]), 1);
}

#[test]
fn sampling_follows_softmax_frequencies() {
    let logits = [
        0.0f32,
        (2.0f32).ln(),
        f32::NEG_INFINITY,
        (3.0f32).ln(),
        f32::NAN,
    ];
    let mut s = Sampler::new(params(1.0, 1.0, 0, 7)).unwrap();
    let mut counts = [0usize; 5];
    let n = 60_000;
    for _ in 0..n {
        counts[s.sample(&logits)] += 1;
    }
    assert_eq!(
        counts[2] + counts[4],
        0,
        "masked / NaN tokens sampled: {counts:?}"
    );
    for (i, p) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (3, 3.0 / 6.0)] {
        let f = counts[i] as f64 / n as f64;
        assert!((f - p).abs() < 0.01, "token {i}: freq {f} vs {p}");
    }
}

#[test]
fn top_k_and_top_p_restrict_the_support() {
    // probs ~ [0.5, 0.25, 0.125, 0.0625, 0.0625]
    let logits: Vec<f32> = [8.0f32, 4.0, 2.0, 1.0, 1.0]
        .iter()
        .map(|v| v.ln())
        .collect();
    let support = |p: SamplingParams| {
        let mut s = Sampler::new(p).unwrap();
        let mut seen = [false; 5];
        for _ in 0..5000 {
            seen[s.sample(&logits)] = true;
        }
        seen
    };
    assert_eq!(
        support(params(1.0, 1.0, 2, 3)),
        [true, true, false, false, false]
    );
    // Ties at the k-th value are kept, like HF.
    assert_eq!(
        support(params(1.0, 1.0, 4, 3)),
        [true, true, true, true, true]
    );
    // top_p 0.7: the tail with cumulative mass <= 0.3 (0.0625 + 0.0625 + 0.125 = 0.25) is dropped.
    assert_eq!(
        support(params(1.0, 0.7, 0, 3)),
        [true, true, false, false, false]
    );
    // top_p tiny: the most likely token is always kept.
    assert_eq!(
        support(params(1.0, 1e-6, 0, 3)),
        [true, false, false, false, false]
    );
    // Same seed, same sequence.
    let draw = |seed| {
        let mut s = Sampler::new(params(0.8, 0.95, 0, seed)).unwrap();
        (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
    };
    assert_eq!(draw(9), draw(9));
}

#[test]
fn invalid_sampling_params_are_rejected() {
    assert!(Sampler::new(params(-1.0, 1.0, 0, 0)).is_err());
    assert!(Sampler::new(params(f32::NAN, 1.0, 0, 0)).is_err());
    assert!(Sampler::new(params(1.0, 0.0, 0, 0)).is_err());
    assert!(Sampler::new(params(1.0, 1.5, 0, 0)).is_err());
}
