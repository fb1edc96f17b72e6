//! The tiled reconstruction score op against the plain reference, and the accumulator.

use kvzip_score::{score_chunk, score_chunk_reference, ScoreAccumulator, ScoreError, ScoreShape};

/// Small deterministic PRNG (xorshift) giving floats in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * amp).collect()
    }
}

struct Case {
    shape: ScoreShape,
    n_ctx: usize,
    q: Vec<f32>,
    keys: Vec<Vec<f32>>,
}

fn case(
    seed: u64,
    q_len: usize,
    n_kv: usize,
    group: usize,
    d: usize,
    n_sys: usize,
    n_ctx: usize,
) -> Case {
    let mut rng = Rng(seed);
    let rows = n_sys + n_ctx + q_len;
    // Amplitude 2 gives peaky softmaxes (logits of several units), closer to real attention.
    let q = rng.vec(q_len * n_kv * group * d, 2.0);
    let keys = (0..n_kv).map(|_| rng.vec(rows * d, 2.0)).collect();
    Case {
        shape: ScoreShape {
            q_len,
            n_kv_heads: n_kv,
            group,
            head_dim: d,
            n_sys,
        },
        n_ctx,
        q,
        keys,
    }
}

fn run_both(c: &Case, chunk: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
    let n = c.shape.n_kv_heads * chunk.len();
    let (mut fast, mut slow) = (vec![0.0; n], vec![0.0; n]);
    score_chunk(
        &c.shape,
        &c.q,
        |h| c.keys[h].as_slice(),
        chunk.clone(),
        &mut fast,
    )
    .unwrap();
    score_chunk_reference(&c.shape, &c.q, |h| c.keys[h].as_slice(), chunk, &mut slow).unwrap();
    (fast, slow)
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "index {i}: fast {x} vs reference {y}"
        );
    }
}

#[test]
fn fast_matches_reference_on_random_inputs() {
    // Sizes cross the 128-row and 256-key tile boundaries; GQA groups 1..4; odd dims.
    for (seed, q_len, n_kv, group, d, n_sys, n_ctx, chunk) in [
        (1, 7, 2, 3, 16, 5, 40, 0..40),
        (2, 150, 3, 3, 64, 12, 600, 256..600),
        (3, 300, 1, 4, 32, 0, 300, 0..300),
        (4, 33, 2, 1, 8, 9, 700, 513..700),
        (5, 1, 2, 2, 24, 3, 10, 4..5),
    ] {
        let c = case(seed, q_len, n_kv, group, d, n_sys, n_ctx);
        let (fast, slow) = run_both(&c, chunk);
        assert_close(&fast, &slow, 2e-5);
        assert!(slow.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

#[test]
fn extra_rows_before_self_block_are_ignored() {
    // A cache longer than n_sys + n_ctx + q_len (e.g. rows of other chunks are all in the
    // context): keys outside [sys, chunk, self] must not change the score.
    let c = case(9, 20, 2, 2, 16, 4, 100);
    let chunk = 10..30;
    let (base, _) = run_both(&c, chunk.clone());
    let mut c2 = case(9, 20, 2, 2, 16, 4, 100);
    for k in &mut c2.keys {
        for v in &mut k[(4 + 50) * 16..(4 + 90) * 16] {
            *v *= 7.0;
        }
    }
    let (changed, slow) = run_both(&c2, chunk);
    assert_close(&changed, &base, 1e-6);
    assert_close(&slow, &base, 2e-5);
    assert_eq!(c.n_ctx, 100);
}

#[test]
fn causal_self_block_matters() {
    // With the self block fully visible the result would differ: check row t cannot see t+1
    // by making the last self key huge for every query; only the last row sees it, so
    // chunk scores from earlier rows must stay large.
    let mut c = case(11, 6, 1, 1, 8, 2, 12);
    let rows = 2 + 12 + 6;
    let d = 8;
    let last = (rows - 1) * d;
    let q0: Vec<f32> = c.q[..d].to_vec();
    for (k, q) in c.keys[0][last..last + d].iter_mut().zip(&q0) {
        *k = q * 50.0;
    }
    let (fast, slow) = run_both(&c, 0..12);
    assert_close(&fast, &slow, 2e-5);
    assert!(
        fast.iter().any(|v| *v > 1e-3),
        "earlier rows keep their probability mass"
    );
}

#[test]
fn shape_errors_are_reported() {
    let c = case(3, 4, 2, 2, 8, 2, 10);
    let mut out = vec![0.0; 2 * 10];
    let short = |_h: usize| &c.keys[0][..5 * 8];
    let err = score_chunk(&c.shape, &c.q, short, 0..10, &mut out).unwrap_err();
    assert!(matches!(err, ScoreError::Shape(m) if m.contains("need at least")));
    let err = score_chunk(
        &c.shape,
        &c.q[1..],
        |h| c.keys[h].as_slice(),
        0..10,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(err, ScoreError::Shape(m) if m.contains("queries")));
    let mut small = vec![0.0; 3];
    let err = score_chunk(&c.shape, &c.q, |h| c.keys[h].as_slice(), 0..10, &mut small).unwrap_err();
    assert!(matches!(err, ScoreError::Shape(m) if m.contains("output")));
}

#[test]
fn accumulator_assembles_chunks_and_detects_gaps() {
    let c = case(21, 16, 2, 2, 16, 3, 50);
    let heads = [Some(2), None, Some(2)];
    let mut acc = ScoreAccumulator::new(50, &heads);
    for layer in [0, 2] {
        for chunk in [0..20, 20..40, 40..50] {
            acc.score_layer_chunk(layer, &c.shape, &c.q, |h| c.keys[h].as_slice(), chunk)
                .unwrap();
        }
    }
    let scores = acc.finish().unwrap();
    assert!(scores.layer(1).is_none());
    for chunk in [0..20, 20..40, 40..50] {
        let (_, slow) = run_both(&c, chunk.clone());
        for h in 0..2 {
            let got = &scores.head(2, h).unwrap()[chunk.clone()];
            assert_close(got, &slow[h * chunk.len()..(h + 1) * chunk.len()], 2e-5);
        }
    }
    // Missing chunk -> error naming the layer.
    let mut acc = ScoreAccumulator::new(50, &heads);
    acc.insert_chunk(0, 0..50, &[0.5; 100]).unwrap();
    let err = acc.finish().unwrap_err();
    assert!(matches!(err, ScoreError::Incomplete(m) if m.contains("layer 2")));
    // Unscored layer -> error.
    let mut acc = ScoreAccumulator::new(50, &heads);
    assert!(acc.insert_chunk(1, 0..10, &[0.0; 20]).is_err());
}
