//! Fused KVzip score kernel vs an f64 reference (the loop of
//! `kvzip_score::score_chunk_reference`, replicated here: kvzip-kernels cannot depend on
//! kvzip-score). GPU only: run with `--features cuda` on a machine with a CUDA GPU.
#![cfg(feature = "cuda")]

use half::bf16;
use kvzip_kernels::cuda::score::ScoreChunkShape;
use kvzip_kernels::cuda::{CudaBackend, CudaError};
use kvzip_kernels::sampling::Rng;
use rayon::prelude::*;

fn backend() -> CudaBackend {
    CudaBackend::new(0).expect("these tests need a CUDA GPU (run them on the GPU machine)")
}

fn round_bf16(v: &mut [f32]) {
    for x in v {
        *x = bf16::from_f32(*x).to_f32();
    }
}

/// A random layer cache: per head `[n_sys | context (chunk somewhere inside) | n_in self rows]`,
/// heads stored ragged with gaps between segments.
struct Case {
    shape: ScoreChunkShape,
    q: Vec<f32>,
    k: Vec<f32>,
    offsets: Vec<i64>,
    lens: Vec<i32>,
}

fn make_case(
    rng: &mut Rng,
    d: usize,
    group: usize,
    n_kv: usize,
    n_sys: usize,
    chunk: usize,
    n_in: usize,
) -> Case {
    let before = 1 + (rng.next_u64() % 300) as usize;
    let chunk_start = n_sys + before;
    let mut offsets = Vec::new();
    let mut lens = Vec::new();
    let mut rows = 0usize;
    for _ in 0..n_kv {
        rows += (rng.next_u64() % 50) as usize; // gap
        let after = (rng.next_u64() % 200) as usize;
        let len = chunk_start + chunk + after + n_in;
        offsets.push(rows as i64);
        lens.push(len as i32);
        rows += len;
    }
    // Peaky logits: q scaled so that softmax is far from uniform; keys with varied norms.
    let mut q = rng.uniform_vec(n_in * n_kv * group * d, -3.0, 3.0);
    let mut k = rng.uniform_vec(rows * d, -1.0, 1.0);
    for (r, row) in k.chunks_mut(d).enumerate() {
        let s = 0.5 + (r % 7) as f32 * 0.25;
        row.iter_mut().for_each(|x| *x *= s);
    }
    round_bf16(&mut q);
    round_bf16(&mut k);
    let shape = ScoreChunkShape {
        n_in,
        n_kv_heads: n_kv,
        group,
        head_dim: d,
        n_sys,
        chunk_start,
        chunk_len: chunk,
        score_stride: chunk_start - n_sys + chunk + 5,
        scale: 1.0 / (d as f32).sqrt(),
    };
    Case {
        shape,
        q,
        k,
        offsets,
        lens,
    }
}

/// f64 reference: (scores [n_kv, chunk], lse [n_kv, n_in * group] with row t * group + g).
fn reference(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let s = &c.shape;
    let d = s.head_dim;
    let n_q = s.n_kv_heads * s.group;
    let per_row: Vec<(usize, usize, f64, Vec<f64>)> = (0..s.n_kv_heads * s.n_in * s.group)
        .into_par_iter()
        .map(|i| {
            let h = i / (s.n_in * s.group);
            let r = i % (s.n_in * s.group);
            let (t, g) = (r / s.group, r % s.group);
            let off = c.offsets[h] as usize;
            let self_start = c.lens[h] as usize - s.n_in;
            let keys: Vec<usize> = (0..s.n_sys)
                .chain(s.chunk_start..s.chunk_start + s.chunk_len)
                .chain(self_start..self_start + t + 1)
                .collect();
            let qo = (t * n_q + h * s.group + g) * d;
            let qr = &c.q[qo..qo + d];
            let logits: Vec<f64> = keys
                .iter()
                .map(|&row| {
                    let kr = &c.k[(off + row) * d..(off + row + 1) * d];
                    qr.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * s.scale as f64
                })
                .collect();
            let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|x| (x - mx).exp()).sum();
            let lse = mx + sum.ln();
            let probs = logits[s.n_sys..s.n_sys + s.chunk_len]
                .iter()
                .map(|x| (x - lse).exp())
                .collect();
            (h, r, lse, probs)
        })
        .collect();
    let mut scores = vec![0f64; s.n_kv_heads * s.chunk_len];
    let mut lse = vec![0f64; s.n_kv_heads * s.n_in * s.group];
    for (h, r, l, probs) in per_row {
        lse[h * s.n_in * s.group + r] = l;
        for (j, p) in probs.into_iter().enumerate() {
            let o = &mut scores[h * s.chunk_len + j];
            *o = o.max(p);
        }
    }
    (scores, lse)
}

/// Runs the kernel on a poisoned (-1) score buffer; returns (scores [n_kv, chunk], lse, full
/// score buffer).
fn run_gpu(be: &CudaBackend, c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = &c.shape;
    let q = be.upload_bf16(&c.q).unwrap();
    let k = be.upload_bf16(&c.k).unwrap();
    let offsets = be.upload(&c.offsets).unwrap();
    let lens = be.upload(&c.lens).unwrap();
    let off: Vec<usize> = c.offsets.iter().map(|&x| x as usize).collect();
    let lens_host: Vec<usize> = c.lens.iter().map(|&x| x as usize).collect();
    s.check_segments(&off, &lens_host, c.k.len() / s.head_dim)
        .unwrap();
    let mut lse = be.upload(&vec![f32::NAN; s.lse_len()]).unwrap();
    let mut scores = be
        .upload(&vec![-1f32; s.n_kv_heads * s.score_stride])
        .unwrap();
    be.score_chunk(&q, &k, &offsets, &lens, s, &mut lse, &mut scores)
        .unwrap();
    be.synchronize().unwrap();
    let all = be.download(&scores).unwrap();
    let pos0 = s.chunk_start - s.n_sys;
    let mut out = Vec::new();
    for h in 0..s.n_kv_heads {
        let row = &all[h * s.score_stride..(h + 1) * s.score_stride];
        out.extend_from_slice(&row[pos0..pos0 + s.chunk_len]);
        assert!(
            row[..pos0]
                .iter()
                .chain(&row[pos0 + s.chunk_len..])
                .all(|&x| x == -1.0),
            "head {h}: positions outside the chunk were written"
        );
    }
    (out, be.download(&lse).unwrap(), all)
}

/// Fraction of the reference's top-`frac` positions (per head) that the GPU also selects.
fn top_overlap(got: &[f32], want: &[f64], n_heads: usize, frac: f64) -> f64 {
    let m = want.len() / n_heads;
    let n_top = ((m as f64 * frac).ceil() as usize).max(1);
    let top = |v: Vec<(usize, f64)>| {
        let mut v = v;
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n_top);
        v.into_iter()
            .map(|x| x.0)
            .collect::<std::collections::HashSet<_>>()
    };
    let mut hit = 0;
    for h in 0..n_heads {
        let a = top((0..m).map(|j| (j, got[h * m + j] as f64)).collect());
        let b = top((0..m).map(|j| (j, want[h * m + j])).collect());
        hit += a.intersection(&b).count();
    }
    hit as f64 / (n_top * n_heads) as f64
}

#[allow(clippy::too_many_arguments)]
fn check(
    be: &CudaBackend,
    seed: u64,
    d: usize,
    group: usize,
    n_kv: usize,
    n_sys: usize,
    chunk: usize,
    n_in: usize,
) {
    let mut rng = Rng::new(seed);
    let c = make_case(&mut rng, d, group, n_kv, n_sys, chunk, n_in);
    let (got, got_lse, _) = run_gpu(be, &c);
    let (want, want_lse) = reference(&c);
    let what = format!("d={d} group={group} n_kv={n_kv} n_sys={n_sys} chunk={chunk} n_in={n_in}");
    assert!(
        got.iter().all(|x| x.is_finite() && *x >= 0.0),
        "{what}: unwritten or bad score"
    );
    let num: f64 = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    let rel = (num / den).sqrt();
    let max_abs = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    let lse_err = got_lse
        .iter()
        .zip(&want_lse)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    let overlap = top_overlap(&got, &want, n_kv, 0.3);
    println!("{what}: rel {rel:.2e}, max abs {max_abs:.2e}, lse max abs {lse_err:.2e}, top-30% overlap {overlap:.4}");
    assert!(rel < 5e-4, "{what}: relative error {rel}");
    assert!(max_abs < 1e-4, "{what}: max abs diff {max_abs}");
    assert!(lse_err < 1e-3, "{what}: lse max abs diff {lse_err}");
    assert!(overlap > 0.99, "{what}: top-30% overlap {overlap}");
}

#[test]
fn score_small_shapes() {
    let be = backend();
    check(&be, 1, 64, 1, 1, 0, 1, 1);
    check(&be, 2, 64, 3, 2, 37, 130, 7);
    check(&be, 3, 128, 1, 3, 0, 777, 200);
    check(&be, 4, 256, 4, 2, 12, 500, 300);
    check(&be, 5, 128, 4, 2, 5, 1, 129);
    check(&be, 6, 256, 3, 1, 0, 65, 2);
}

#[test]
fn score_long_chunks_and_inputs() {
    let be = backend();
    check(&be, 11, 128, 4, 2, 37, 2000, 2100);
    check(&be, 12, 64, 4, 2, 100, 1999, 2048);
    check(&be, 13, 256, 3, 1, 0, 2000, 64);
    check(&be, 14, 128, 3, 2, 5, 1, 2000);
}

#[test]
fn score_chunks_accumulate_into_one_buffer() {
    // Two chunks scored into one buffer land at their own context positions and leave the rest.
    let be = backend();
    let mut rng = Rng::new(21);
    let (d, group, n_kv, n_sys, n_in) = (128, 2, 2, 9, 40);
    let ctx = 300;
    let len = n_sys + ctx + n_in;
    let q = rng.uniform_vec(n_in * n_kv * group * d, -3.0, 3.0);
    let k = rng.uniform_vec(n_kv * len * d, -1.0, 1.0);
    let offsets: Vec<i64> = (0..n_kv).map(|h| (h * len) as i64).collect();
    let lens = vec![len as i32; n_kv];
    let (qd, kd) = (be.upload_bf16(&q).unwrap(), be.upload_bf16(&k).unwrap());
    let (od, ld) = (be.upload(&offsets).unwrap(), be.upload(&lens).unwrap());
    let mut scores = be.zeros::<f32>(n_kv * ctx).unwrap();
    let mut lse = be.alloc::<f32>(n_in * group * n_kv).unwrap();
    let chunks = [(0usize, 120usize), (120, 150)];
    for &(start, m) in &chunks {
        let shape = ScoreChunkShape {
            n_in,
            n_kv_heads: n_kv,
            group,
            head_dim: d,
            n_sys,
            chunk_start: n_sys + start,
            chunk_len: m,
            score_stride: ctx,
            scale: 1.0 / (d as f32).sqrt(),
        };
        be.score_chunk(&qd, &kd, &od, &ld, &shape, &mut lse, &mut scores)
            .unwrap();
    }
    let got = be.download(&scores).unwrap();
    for h in 0..n_kv {
        let row = &got[h * ctx..(h + 1) * ctx];
        assert!(
            row[..270].iter().all(|&x| x > 0.0),
            "head {h}: a chunk position stayed 0"
        );
        assert!(
            row[270..].iter().all(|&x| x == 0.0),
            "head {h}: an unscored position changed"
        );
    }
}

#[test]
fn score_rejects_bad_shapes() {
    let be = backend();
    let q = be.zeros::<bf16>(64 * 96).unwrap();
    let k = be.zeros::<bf16>(64 * 96 * 4).unwrap();
    let o = be.upload(&[0i64]).unwrap();
    let l = be.upload(&[100i32]).unwrap();
    let mut lse = be.zeros::<f32>(64).unwrap();
    let mut scores = be.zeros::<f32>(256).unwrap();
    let mut shape = ScoreChunkShape {
        n_in: 1,
        n_kv_heads: 1,
        group: 1,
        head_dim: 96,
        n_sys: 4,
        chunk_start: 4,
        chunk_len: 10,
        score_stride: 256,
        scale: 0.1,
    };
    let err = be.score_chunk(&q, &k, &o, &l, &shape, &mut lse, &mut scores);
    assert!(matches!(err, Err(CudaError::Shape(m)) if m.contains("head_dim")));
    shape.head_dim = 64;
    shape.chunk_start = 2;
    let err = be.score_chunk(&q, &k, &o, &l, &shape, &mut lse, &mut scores);
    assert!(matches!(err, Err(CudaError::Shape(m)) if m.contains("system prompt")));
    shape.chunk_start = 4;
    assert!(
        shape.check_segments(&[0], &[10], 1000).is_err(),
        "too-short head accepted"
    );
    assert!(
        shape.check_segments(&[990], &[20], 1000).is_err(),
        "head past k accepted"
    );
    assert!(shape.check_segments(&[0], &[20], 1000).is_ok());
}
