//! Criterion benchmarks of CUDA kernels (feature `cuda`, needs a GPU), timed with CUDA events:
//! the fused KVzip score kernel at a Llama-3.1-8B layer shape (FLOP/s), compaction and RMSNorm
//! (bytes/s), plus the two ceilings (cuBLAS bf16 GEMM FLOP/s, device copy bytes/s) measured in
//! the same run. Each group also prints one `SUMMARY` line (median of 30 event-timed runs).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use kvzip_kernels::cuda::score::ScoreChunkShape;
use kvzip_kernels::cuda::CudaBackend;
use kvzip_kernels::sampling::Rng;
use kvzip_kernels::GatherPlan;

fn backend() -> CudaBackend {
    CudaBackend::new(0).expect("the CUDA benchmarks need a CUDA GPU")
}

fn rand_dev(
    be: &CudaBackend,
    rng: &mut Rng,
    n: usize,
    amp: f32,
) -> kvzip_kernels::cuda::CudaSlice<bf16> {
    be.upload_bf16(&rng.uniform_vec(n, -amp, amp))
        .expect("upload")
}

/// Event-timed duration of `iters` back-to-back runs of `f`.
fn time_gpu(be: &CudaBackend, iters: u64, f: &mut dyn FnMut()) -> Duration {
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = be.stream().record_event(timing).expect("event");
    for _ in 0..iters {
        f();
    }
    let end = be.stream().record_event(timing).expect("event");
    let ms = start.elapsed_ms(&end).expect("elapsed");
    Duration::from_secs_f64(ms as f64 * 1e-3)
}

/// Median seconds of one run over 30 timed runs (after 5 warm-up runs).
fn median_s(be: &CudaBackend, f: &mut dyn FnMut()) -> f64 {
    time_gpu(be, 5, f);
    let mut v: Vec<f64> = (0..30).map(|_| time_gpu(be, 1, f).as_secs_f64()).collect();
    v.sort_by(f64::total_cmp);
    v[15]
}

fn bench(
    c: &mut Criterion,
    name: &str,
    throughput: Throughput,
    be: &CudaBackend,
    f: &mut dyn FnMut(),
) {
    let mut g = c.benchmark_group(name);
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(throughput);
    g.bench_function("cuda", |b| b.iter_custom(|iters| time_gpu(be, iters, f)));
    g.finish();
}

fn ceilings(c: &mut Criterion) {
    let be = backend();
    let mut rng = Rng::new(1);
    let n = 8192;
    let x = rand_dev(&be, &mut rng, n * n, 1.0);
    let w = rand_dev(&be, &mut rng, n * n, 1.0);
    let mut y = be.alloc::<bf16>(n * n).expect("alloc");
    let flops = 2.0 * (n as f64).powi(3);
    let mut gemm = || be.linear(&x, &w, &mut y, n, n, n).expect("linear");
    let s = median_s(&be, &mut gemm);
    println!(
        "SUMMARY gemm bf16 {n}^3 (cuBLAS): {:.3} ms, {:.1} TFLOP/s",
        s * 1e3,
        flops / s / 1e12
    );
    bench(
        c,
        "gemm_bf16_8192",
        Throughput::Elements(flops as u64),
        &be,
        &mut gemm,
    );
    let bytes = 512usize << 20;
    let src = be.zeros::<u8>(bytes).expect("alloc");
    let mut dst = be.zeros::<u8>(bytes).expect("alloc");
    let mut copy = || be.stream().memcpy_dtod(&src, &mut dst).expect("copy");
    let s = median_s(&be, &mut copy);
    println!(
        "SUMMARY copy 512 MiB d2d: {:.3} ms, {:.2} TB/s (read + write)",
        s * 1e3,
        2.0 * bytes as f64 / s / 1e12
    );
    bench(
        c,
        "copy_512MiB",
        Throughput::Bytes(2 * bytes as u64),
        &be,
        &mut copy,
    );
}

fn score(c: &mut Criterion) {
    let be = backend();
    let mut rng = Rng::new(2);
    // Llama-3.1-8B layer: 32 query / 8 KV heads, d = 128; 32K context in the cache, a 2000-token
    // chunk in the middle, scoring input = 2000 chunk tokens + ~40 prompt / hint / template tokens.
    for (ctx, chunk, n_in) in [(32768usize, 2000usize, 2040usize), (32768, 1000, 1040)] {
        let (n_kv, group, d, n_sys) = (8usize, 4usize, 128usize, 24usize);
        let len = n_sys + ctx + n_in;
        let q = rand_dev(&be, &mut rng, n_in * n_kv * group * d, 3.0);
        let k = rand_dev(&be, &mut rng, n_kv * len * d, 1.0);
        let offsets: Vec<i64> = (0..n_kv).map(|h| (h * len) as i64).collect();
        let od = be.upload(&offsets).expect("upload");
        let ld = be.upload(&vec![len as i32; n_kv]).expect("upload");
        let shape = ScoreChunkShape {
            n_in,
            n_kv_heads: n_kv,
            group,
            head_dim: d,
            n_sys,
            chunk_start: n_sys + ctx / 2,
            chunk_len: chunk,
            score_stride: ctx,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let mut lse = be.alloc::<f32>(shape.lse_len()).expect("alloc");
        let mut scores = be.zeros::<f32>(n_kv * ctx).expect("alloc");
        let mut run = || {
            be.score_chunk(&q, &k, &od, &ld, &shape, &mut lse, &mut scores)
                .expect("score")
        };
        let s = median_s(&be, &mut run);
        println!(
            "SUMMARY score llama8b chunk {chunk} n_in {n_in}: {:.1} us, {:.1} TFLOP/s ({:.2} GFLOP)",
            s * 1e6,
            shape.flops() / s / 1e12,
            shape.flops() / 1e9
        );
        bench(
            c,
            &format!("score_llama8b_chunk{chunk}"),
            Throughput::Elements(shape.flops() as u64),
            &be,
            &mut run,
        );
    }
}

fn compaction(c: &mut Criterion) {
    let be = backend();
    let mut rng = Rng::new(3);
    // One Llama-3.1-8B layer at 128K context, ~30 % of each head kept (ratio 0.3, skewed per head).
    let (n_kv, d, ctx) = (8usize, 128usize, 131072usize);
    let rows: Vec<Vec<usize>> = (0..n_kv)
        .map(|h| {
            let p = 0.1 + 0.4 * h as f64 / (n_kv - 1) as f64;
            (0..ctx)
                .filter(|_| rng.next_f64() < p)
                .map(|pos| h * ctx + pos)
                .collect()
        })
        .collect();
    let mut dst_offsets = Vec::with_capacity(n_kv);
    let mut at = 0;
    for r in &rows {
        dst_offsets.push(at);
        at += r.len();
    }
    let plan = GatherPlan::from_rows(&rows, &dst_offsets).expect("plan");
    let dplan = be.upload_gather_plan(&plan).expect("upload plan");
    let k = rand_dev(&be, &mut rng, n_kv * ctx * d, 1.0);
    let v = rand_dev(&be, &mut rng, n_kv * ctx * d, 1.0);
    let kept = plan.total_rows();
    let mut kd = be.alloc::<bf16>(kept * d).expect("alloc");
    let mut vd = be.alloc::<bf16>(kept * d).expect("alloc");
    // Bytes: kept rows of K and V read once and written once.
    let bytes = (4 * kept * d * 2) as u64;
    let mut run = || {
        be.compact(&k, &v, &mut kd, &mut vd, &dplan, d)
            .expect("compact")
    };
    let s = median_s(&be, &mut run);
    println!(
        "SUMMARY compact 128K ctx, {kept} kept rows x 8 heads... : {:.1} us, {:.2} TB/s",
        s * 1e6,
        bytes as f64 / s / 1e12
    );
    bench(
        c,
        "compact_llama8b_128k",
        Throughput::Bytes(bytes),
        &be,
        &mut run,
    );
}

fn rms_norm(c: &mut Criterion) {
    let be = backend();
    let mut rng = Rng::new(4);
    let (rows, dim) = (8192usize, 4096usize);
    let mut x = rand_dev(&be, &mut rng, rows * dim, 2.0);
    let res = rand_dev(&be, &mut rng, rows * dim, 2.0);
    let w = rand_dev(&be, &mut rng, dim, 1.0);
    let mut out = be.alloc::<bf16>(rows * dim).expect("alloc");
    let plain = (2 * rows * dim * 2) as u64;
    let mut run = || {
        be.rms_norm(&mut x, None, &w, &mut out, rows, dim, 1e-5, 0.0)
            .expect("norm")
    };
    let s = median_s(&be, &mut run);
    println!(
        "SUMMARY rms_norm {rows}x{dim}: {:.1} us, {:.2} TB/s",
        s * 1e6,
        plain as f64 / s / 1e12
    );
    bench(
        c,
        "rms_norm_8192x4096",
        Throughput::Bytes(plain),
        &be,
        &mut run,
    );
    // Fused residual: read x and residual, write x and out.
    let fused = 2 * plain;
    let mut x2 = rand_dev(&be, &mut rng, rows * dim, 2.0);
    let mut run = || {
        be.rms_norm(&mut x2, Some(&res), &w, &mut out, rows, dim, 1e-5, 0.0)
            .expect("norm")
    };
    let s = median_s(&be, &mut run);
    println!(
        "SUMMARY rms_norm+residual {rows}x{dim}: {:.1} us, {:.2} TB/s",
        s * 1e6,
        fused as f64 / s / 1e12
    );
    bench(
        c,
        "rms_norm_residual_8192x4096",
        Throughput::Bytes(fused),
        &be,
        &mut run,
    );
}

criterion_group!(benches, ceilings, compaction, rms_norm, score);
criterion_main!(benches);
