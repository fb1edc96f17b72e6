//! Criterion benchmarks of the CPU fast paths at real model shapes (Llama-3-8B-like where it fits
//! a 2-core machine). Throughput is reported in bytes read (memory-bound ops) or elements.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvzip_kernels::quant::{row_bytes, GgmlType, QuantMatrix, QuantPart, SharedBytes};
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

/// Decode-time products with GGUF-quantized weights (one activation row; `f32` and `q8`
/// activations), at a cache-resident size and a memory-streaming size: throughput in weight
/// bytes read, to set against the machine's copy bandwidth.
fn bench_linear_quant(c: &mut Criterion) {
    let mut rng = Rng::new(5);
    let mut g = c.benchmark_group("linear_quant");
    g.sample_size(10);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let (block, size) = ty.block_layout();
        // Qwen2.5-0.5B shapes: 896 inputs (attention, up/gate, lm_head) and 4864 (down; the
        // K-quants' 256-element blocks need it).
        let cols = if block == 256 { 4864 } else { 896 };
        let x = rng.uniform_vec(cols, -1.0, 1.0);
        for rows in [1024usize, 65536 * 896 / cols] {
            let rb = row_bytes(ty, cols).expect("whole blocks");
            // Random codes; each block's leading f16 scale set to a small normal value.
            let mut bytes: Vec<u8> = (0..rows * rb).map(|_| rng.next_u64() as u8).collect();
            for b in bytes.chunks_exact_mut(size as usize) {
                let at = if ty == GgmlType::Q6_K { 208 } else { 0 };
                b[at..at + 2].copy_from_slice(&0x2000u16.to_le_bytes());
            }
            let part = QuantPart {
                ty,
                rows,
                data: SharedBytes::owned(bytes),
            };
            let m = QuantMatrix::new(cols, vec![part], "bench").expect("matrix");
            let mut y = vec![0.0; rows];
            g.throughput(Throughput::Bytes((rows * rb) as u64));
            for q8 in [false, true] {
                let m = m.clone().with_q8_activations(q8);
                let act = if q8 { "q8" } else { "f32" };
                let id = BenchmarkId::from_parameter(format!("{}-{rows}x{cols}-{act}", ty.name()));
                g.bench_function(id, |b| {
                    b.iter(|| {
                        cpu::linear_quant(black_box(&x), &m, 0, None, 1, cols, rows, &mut y)
                            .unwrap()
                    })
                });
            }
        }
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
    bench_linear_quant,
    bench_attention,
    bench_rms_norm,
    bench_rope
);
criterion_main!(benches);
