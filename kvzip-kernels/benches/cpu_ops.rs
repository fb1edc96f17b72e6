//! Criterion benchmarks of the CPU fast paths at real model shapes (Llama-3-8B-like where it fits
//! a 2-core machine). Throughput is reported in bytes read (memory-bound ops) or elements.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvzip_kernels::sampling::Rng;
use kvzip_kernels::{cpu, KvSegments};
use std::hint::black_box;

const F32: u64 = 4;

fn bench_linear(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("linear");
    g.sample_size(10);
    for &(rows, in_dim, out_dim) in &[(1usize, 4096usize, 4096usize), (64, 2048, 2048)] {
        let x = rng.uniform_vec(rows * in_dim, -1.0, 1.0);
        let w = rng.uniform_vec(out_dim * in_dim, -1.0, 1.0);
        let mut y = vec![0.0; rows * out_dim];
        if rows == 1 {
            // Decode: bound by streaming the weights.
            g.throughput(Throughput::Bytes((out_dim * in_dim) as u64 * F32));
        } else {
            // Prefill: report multiply-adds as elements.
            g.throughput(Throughput::Elements((rows * in_dim * out_dim) as u64));
        }
        let id = BenchmarkId::from_parameter(format!("{rows}x{in_dim}->{out_dim}"));
        g.bench_function(id, |b| {
            b.iter(|| cpu::linear(black_box(&x), &w, None, rows, in_dim, out_dim, &mut y).unwrap())
        });
    }
    g.finish();
}

/// One layer's cache of `n_kv` heads with `keys` rows each.
fn cache(
    rng: &mut Rng,
    n_kv: usize,
    keys: usize,
    head_dim: usize,
) -> (Vec<f32>, Vec<f32>, Vec<usize>, Vec<usize>) {
    let k = rng.uniform_vec(n_kv * keys * head_dim, -1.0, 1.0);
    let v = rng.uniform_vec(n_kv * keys * head_dim, -1.0, 1.0);
    let offsets = (0..n_kv).map(|h| h * keys).collect();
    (k, v, offsets, vec![keys; n_kv])
}

fn bench_attention(c: &mut Criterion) {
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    let head_dim = 128;
    // (label, n_kv, group, q_len, keys)
    for &(label, n_kv, group, q_len, keys) in &[
        ("decode_q1_k4096_8kv_g4", 8usize, 4usize, 1usize, 4096usize),
        ("prefill_q256_k2048_2kv_g4", 2, 4, 256, 2048),
    ] {
        let (k, v, offsets, lens) = cache(&mut rng, n_kv, keys, head_dim);
        let seg = KvSegments {
            k: &k,
            v: &v,
            offsets: &offsets,
            lens: &lens,
            head_dim,
        };
        let q = rng.uniform_vec(q_len * n_kv * group * head_dim, -1.0, 1.0);
        let mut out = vec![0.0; q.len()];
        if q_len == 1 {
            // Decode reads the whole K and V cache once.
            g.throughput(Throughput::Bytes((k.len() + v.len()) as u64 * F32));
        } else {
            // Elements = (query row, key) score pairs computed.
            g.throughput(Throughput::Elements((q_len * keys * n_kv * group) as u64));
        }
        let scale = 1.0 / (head_dim as f32).sqrt();
        g.bench_function(label, |b| {
            b.iter(|| {
                cpu::attention(
                    black_box(&q),
                    &seg,
                    q_len,
                    group,
                    head_dim,
                    scale,
                    None,
                    None,
                    &mut out,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn bench_rms_norm(c: &mut Criterion) {
    let mut rng = Rng::new(3);
    let mut g = c.benchmark_group("rms_norm");
    let (rows, dim) = (128, 4096);
    let x = rng.uniform_vec(rows * dim, -1.0, 1.0);
    let w = rng.uniform_vec(dim, -1.0, 1.0);
    let mut out = vec![0.0; rows * dim];
    g.throughput(Throughput::Bytes((2 * rows * dim) as u64 * F32));
    g.bench_function("128x4096", |b| {
        b.iter(|| cpu::rms_norm(black_box(&x), &w, 1e-5, 0.0, dim, &mut out).unwrap())
    });
    g.finish();
}

fn bench_rope(c: &mut Criterion) {
    let mut rng = Rng::new(4);
    let mut g = c.benchmark_group("rope");
    let (tokens, heads, head_dim) = (128, 32, 128);
    let mut x = rng.uniform_vec(tokens * heads * head_dim, -1.0, 1.0);
    let positions: Vec<usize> = (0..tokens).map(|t| 4000 + t).collect();
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 500000f32.powf(-2.0 * i as f32 / head_dim as f32))
        .collect();
    g.throughput(Throughput::Elements(x.len() as u64));
    g.bench_function("128tok_32h_128d", |b| {
        b.iter(|| {
            cpu::rope_inplace(
                black_box(&mut x),
                &positions,
                heads,
                head_dim,
                &inv_freq,
                1.0,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_linear,
    bench_attention,
    bench_rms_norm,
    bench_rope
);
criterion_main!(benches);
