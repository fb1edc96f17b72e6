//! CPU tiled attention vs the reference, a masked dense oracle, and argument errors.

mod common;

use common::{assert_close, rand_vec};
use kvzip_kernels::cpu::{self, AttentionArgs, AttentionTiling};
use kvzip_kernels::sampling::Rng;
use kvzip_kernels::{reference, KernelError, KvSegments};

/// A ragged per-head cache with gaps between segments: `(k, v, offsets)` for `lens`.
fn build_cache(rng: &mut Rng, lens: &[usize], head_dim: usize) -> (Vec<f32>, Vec<f32>, Vec<usize>) {
    let mut offsets = Vec::new();
    let mut rows = 0;
    for &n in lens {
        offsets.push(rows);
        rows += n + 3; // spare capacity, filled with garbage that must never be read
    }
    let k = rng.uniform_vec(rows * head_dim, -1.0, 1.0);
    let v = rng.uniform_vec(rows * head_dim, -1.0, 1.0);
    (k, v, offsets)
}

struct Case {
    lens: Vec<usize>,
    q_len: usize,
    group: usize,
    head_dim: usize,
    window: Option<usize>,
    softcap: Option<f32>,
}

fn check_case(rng: &mut Rng, c: &Case, tilings: &[AttentionTiling]) {
    let (k, v, offsets) = build_cache(rng, &c.lens, c.head_dim);
    let seg = KvSegments {
        k: &k,
        v: &v,
        offsets: &offsets,
        lens: &c.lens,
        head_dim: c.head_dim,
    };
    let n_heads = c.lens.len() * c.group;
    // Larger q values make the softmax peaky, which stresses the online rescaling.
    let q = rng.uniform_vec(c.q_len * n_heads * c.head_dim, -3.0, 3.0);
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let mut want = vec![0.0; q.len()];
    reference::attention(
        &q, &seg, c.q_len, c.group, c.head_dim, scale, c.window, c.softcap, &mut want,
    )
    .unwrap();
    let what = format!(
        "lens {:?} q_len {} group {} hd {} window {:?} softcap {:?}",
        c.lens, c.q_len, c.group, c.head_dim, c.window, c.softcap
    );
    let mut got = vec![f32::NAN; q.len()];
    cpu::attention(
        &q, &seg, c.q_len, c.group, c.head_dim, scale, c.window, c.softcap, &mut got,
    )
    .unwrap();
    assert_close(&format!("{what} default tiling"), &got, &want, 1e-4, 2e-5);
    let args = AttentionArgs {
        q_len: c.q_len,
        group: c.group,
        head_dim: c.head_dim,
        scale,
        window: c.window,
        softcap: c.softcap,
    };
    for t in tilings {
        got.fill(f32::NAN);
        cpu::attention_tiled(&q, &seg, &args, &mut got, t).unwrap();
        assert_close(&format!("{what} {t:?}"), &got, &want, 1e-4, 2e-5);
    }
}

const SMALL_TILES: [AttentionTiling; 3] = [
    AttentionTiling {
        query_rows: 1,
        key_tile: 1,
        split_min_keys: 1,
    },
    AttentionTiling {
        query_rows: 5,
        key_tile: 7,
        split_min_keys: 3,
    },
    AttentionTiling {
        query_rows: 16,
        key_tile: 32,
        split_min_keys: 1000,
    },
];

#[test]
fn decode_single_query_matches_reference() {
    let mut rng = Rng::new(10);
    for head_dim in [64, 128, 256] {
        for group in [1, 4] {
            let c = Case {
                lens: vec![37, 1, 90],
                q_len: 1,
                group,
                head_dim,
                window: None,
                softcap: None,
            };
            check_case(&mut rng, &c, &SMALL_TILES);
        }
    }
}

#[test]
fn prefill_ragged_heads_matches_reference() {
    let mut rng = Rng::new(11);
    for head_dim in [64, 128] {
        for group in [1, 3] {
            // lens == q_len (fresh prefill) on one head, longer caches on the others.
            let c = Case {
                lens: vec![23, 40, 61],
                q_len: 23,
                group,
                head_dim,
                window: None,
                softcap: None,
            };
            check_case(&mut rng, &c, &SMALL_TILES);
        }
    }
}

#[test]
fn sliding_window_and_softcap_match_reference() {
    let mut rng = Rng::new(12);
    for window in [1, 5, 16, 200] {
        let c = Case {
            lens: vec![50, 31],
            q_len: 17,
            group: 2,
            head_dim: 64,
            window: Some(window),
            softcap: None,
        };
        check_case(&mut rng, &c, &SMALL_TILES);
    }
    let c = Case {
        lens: vec![45, 12],
        q_len: 9,
        group: 2,
        head_dim: 256,
        window: Some(8),
        softcap: Some(5.0),
    };
    check_case(&mut rng, &c, &SMALL_TILES);
    let c = Case {
        lens: vec![45],
        q_len: 1,
        group: 8,
        head_dim: 128,
        window: None,
        softcap: Some(50.0),
    };
    check_case(&mut rng, &c, &SMALL_TILES);
}

#[test]
fn long_prefill_spans_many_tiles_and_waves() {
    let mut rng = Rng::new(13);
    let c = Case {
        lens: vec![700, 640],
        q_len: 640,
        group: 2,
        head_dim: 64,
        window: None,
        softcap: None,
    };
    check_case(&mut rng, &c, &[]);
    let c = Case {
        lens: vec![3000],
        q_len: 1,
        group: 4,
        head_dim: 128,
        window: None,
        softcap: None,
    };
    check_case(
        &mut rng,
        &c,
        &[AttentionTiling {
            query_rows: 4,
            key_tile: 128,
            split_min_keys: 256,
        }],
    );
}

/// Attention over a compacted per-head cache (evicted keys removed) must equal dense attention
/// over the full cache with those keys masked out. The dense oracle here is written
/// independently of the crate: full-length causal scores with a boolean keep mask.
#[test]
fn compacted_cache_equals_dense_attention_with_mask() {
    let mut rng = Rng::new(14);
    let (n_kv, group, head_dim, dense_len, q_len) = (3, 2, 64, 80, 6);
    let n_heads = n_kv * group;
    let scale = 0.125f32;
    let dense_k = rand_vec(&mut rng, n_kv * dense_len * head_dim);
    let dense_v = rand_vec(&mut rng, n_kv * dense_len * head_dim);
    // keep[h][j]: per-head eviction; the q_len newest positions (the queries) are always kept.
    let keep: Vec<Vec<bool>> = (0..n_kv)
        .map(|h| {
            (0..dense_len)
                .map(|j| j >= dense_len - q_len || rng.next_f64() < [0.3, 0.6, 0.95][h])
                .collect()
        })
        .collect();
    let q = rng.uniform_vec(q_len * n_heads * head_dim, -2.0, 2.0);

    // Dense masked oracle.
    let mut want = vec![0.0f32; q.len()];
    for h in 0..n_kv {
        for t in 0..q_len {
            let pos = dense_len - q_len + t;
            for g in 0..group {
                let row = (t * n_heads + h * group + g) * head_dim;
                let scores: Vec<f64> = (0..dense_len)
                    .map(|j| {
                        if j > pos || !keep[h][j] {
                            return f64::NEG_INFINITY;
                        }
                        let kr = &dense_k[(h * dense_len + j) * head_dim..][..head_dim];
                        let dot: f64 = q[row..row + head_dim]
                            .iter()
                            .zip(kr)
                            .map(|(a, b)| (a * b) as f64)
                            .sum();
                        dot * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = w.iter().sum();
                for d in 0..head_dim {
                    let acc: f64 = (0..dense_len)
                        .map(|j| w[j] * dense_v[(h * dense_len + j) * head_dim + d] as f64)
                        .sum();
                    want[row + d] = (acc / total) as f32;
                }
            }
        }
    }

    // Compacted cache: kept rows of each head, stored head after head.
    let (mut k, mut v, mut offsets, mut lens) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for h in 0..n_kv {
        offsets.push(k.len() / head_dim);
        let mut n = 0;
        for j in (0..dense_len).filter(|&j| keep[h][j]) {
            k.extend_from_slice(&dense_k[(h * dense_len + j) * head_dim..][..head_dim]);
            v.extend_from_slice(&dense_v[(h * dense_len + j) * head_dim..][..head_dim]);
            n += 1;
        }
        lens.push(n);
    }
    assert!(lens[0] < lens[2], "heads must be ragged: {lens:?}");
    let seg = KvSegments {
        k: &k,
        v: &v,
        offsets: &offsets,
        lens: &lens,
        head_dim,
    };
    let mut got = vec![0.0; q.len()];
    cpu::attention(
        &q, &seg, q_len, group, head_dim, scale, None, None, &mut got,
    )
    .unwrap();
    assert_close("cpu compacted vs dense masked", &got, &want, 1e-4, 2e-5);
    reference::attention(
        &q, &seg, q_len, group, head_dim, scale, None, None, &mut got,
    )
    .unwrap();
    assert_close(
        "reference compacted vs dense masked",
        &got,
        &want,
        1e-5,
        1e-6,
    );
}

#[test]
fn attention_argument_errors() {
    let k = vec![0.0f32; 10 * 4];
    let offsets = [0usize, 5];
    let lens = [5usize, 5];
    let seg = KvSegments {
        k: &k,
        v: &k,
        offsets: &offsets,
        lens: &lens,
        head_dim: 4,
    };
    let q = vec![0.0f32; 2 * 2 * 4];
    let mut out = vec![0.0f32; q.len()];
    let ok = cpu::attention(&q, &seg, 2, 1, 4, 0.5, None, None, &mut out);
    assert!(ok.is_ok());
    let shape_err = |r: kvzip_kernels::Result<()>, name: &str| {
        assert!(
            matches!(&r, Err(KernelError::Shape(m)) if m.contains(name)),
            "{name}: {r:?}"
        );
    };
    shape_err(
        cpu::attention(&q[..15], &seg, 2, 1, 4, 0.5, None, None, &mut out),
        "`q`",
    );
    shape_err(
        cpu::attention(&q, &seg, 2, 1, 4, 0.5, None, None, &mut out[..3]),
        "`out`",
    );
    shape_err(
        cpu::attention(&q, &seg, 2, 1, 8, 0.5, None, None, &mut out),
        "head_dim",
    );
    let short = [5usize, 1];
    let seg_short = KvSegments {
        lens: &short,
        ..seg
    };
    shape_err(
        cpu::attention(&q, &seg_short, 2, 1, 4, 0.5, None, None, &mut out),
        "KV head 1",
    );
    let past = [0usize, 6];
    let seg_past = KvSegments {
        offsets: &past,
        ..seg
    };
    shape_err(
        reference::attention(&q, &seg_past, 2, 1, 4, 0.5, None, None, &mut out),
        "KV head 1",
    );
    let one_offset = [0usize];
    let seg_bad = KvSegments {
        offsets: &one_offset,
        ..seg
    };
    shape_err(
        cpu::attention(&q, &seg_bad, 2, 1, 4, 0.5, None, None, &mut out),
        "`seg.offsets`",
    );
    assert!(matches!(
        cpu::attention(&q, &seg, 2, 1, 4, 0.5, Some(0), None, &mut out),
        Err(KernelError::InvalidArgument(_))
    ));
    assert!(matches!(
        cpu::attention(&q, &seg, 2, 1, 4, 0.5, None, Some(-1.0), &mut out),
        Err(KernelError::InvalidArgument(_))
    ));
}

/// The fused attention + KVzip score equals the attention reference and the score's plain-loop
/// oracle, for a chunk covering the whole context and for a middle chunk (context keys outside
/// the score's key set), across tilings.
#[test]
fn attention_scored_equals_attention_and_score_reference() {
    use kvzip_kernels::recon::{score_chunk_reference, ScoreShape};
    let mut rng = Rng::new(21);
    for (head_dim, group, n_sys, n_ctx, chunk, q_len) in [
        (64, 3, 5, 300, 0..300, 40),
        (64, 3, 5, 700, 200..500, 40),
        (16, 2, 0, 90, 30..31, 7),
        (128, 1, 3, 260, 0..130, 300),
    ] {
        let rows = n_sys + n_ctx + q_len;
        let n_kv = 2;
        let lens = vec![rows; n_kv];
        let (k, v, offsets) = build_cache(&mut rng, &lens, head_dim);
        let seg = KvSegments {
            k: &k,
            v: &v,
            offsets: &offsets,
            lens: &lens,
            head_dim,
        };
        let q = rng.uniform_vec(q_len * n_kv * group * head_dim, -3.0, 3.0);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let what =
            format!("hd {head_dim} group {group} n_ctx {n_ctx} chunk {chunk:?} q_len {q_len}");
        let mut want = vec![0.0; q.len()];
        reference::attention(
            &q, &seg, q_len, group, head_dim, scale, None, None, &mut want,
        )
        .unwrap();
        let shape = ScoreShape {
            q_len,
            n_kv_heads: n_kv,
            group,
            head_dim,
            n_sys,
        };
        let head_keys =
            |h: usize| -> &[f32] { &k[offsets[h] * head_dim..(offsets[h] + rows) * head_dim] };
        let mut want_scores = vec![0.0; n_kv * chunk.len()];
        score_chunk_reference(&shape, &q, head_keys, chunk.clone(), &mut want_scores).unwrap();
        let args = AttentionArgs {
            q_len,
            group,
            head_dim,
            scale,
            window: None,
            softcap: None,
        };
        let target = cpu::ScoreTarget {
            n_sys,
            target: n_sys + chunk.start..n_sys + chunk.end,
        };
        for t in [AttentionTiling::default(), SMALL_TILES[1], SMALL_TILES[2]] {
            let mut got = vec![f32::NAN; q.len()];
            let mut scores = vec![0.0; n_kv * chunk.len()];
            cpu::attention_scored(&q, &seg, &args, &target, &t, &mut got, &mut scores).unwrap();
            assert_close(&format!("{what} {t:?} output"), &got, &want, 1e-4, 2e-5);
            assert_close(
                &format!("{what} {t:?} scores"),
                &scores,
                &want_scores,
                1e-4,
                1e-6,
            );
        }
    }
}

#[test]
fn attention_scored_rejects_window_softcap_and_bad_targets() {
    let lens = [50usize];
    let (k, v, offsets) = build_cache(&mut Rng::new(3), &lens, 16);
    let seg = KvSegments {
        k: &k,
        v: &v,
        offsets: &offsets,
        lens: &lens,
        head_dim: 16,
    };
    let q = vec![0.1; 10 * 16];
    let mut out = vec![0.0; q.len()];
    let mut args = AttentionArgs {
        q_len: 10,
        group: 1,
        head_dim: 16,
        scale: 0.25,
        window: Some(4),
        softcap: None,
    };
    let target = cpu::ScoreTarget {
        n_sys: 2,
        target: 2..30,
    };
    let t = AttentionTiling::default();
    let mut scores = vec![0.0; 28];
    let err = cpu::attention_scored(&q, &seg, &args, &target, &t, &mut out, &mut scores);
    assert!(
        matches!(err, Err(KernelError::InvalidArgument(_))),
        "{err:?}"
    );
    args.window = None;
    // The target runs into the step's own rows (50 - 10 = 40 is the first).
    let late = cpu::ScoreTarget {
        n_sys: 2,
        target: 2..45,
    };
    let mut scores = vec![0.0; 43];
    let err = cpu::attention_scored(&q, &seg, &args, &late, &t, &mut out, &mut scores);
    assert!(matches!(err, Err(KernelError::Shape(_))), "{err:?}");
    let err = cpu::attention_scored(&q, &seg, &args, &target, &t, &mut out, &mut scores);
    assert!(
        matches!(err, Err(KernelError::Shape(_))),
        "wrong scores length: {err:?}"
    );
}
