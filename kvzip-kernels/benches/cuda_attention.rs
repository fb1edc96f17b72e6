//! CUDA attention benchmarks (feature `cuda`, GPU required).
//!
//! - `cargo bench -p kvzip-kernels --features cuda --bench cuda_attention`: criterion benches of
//!   decode (Llama-3.1-8B layer, 32K, full and KVzip-0.3 ragged) and prefill (4K), timed with CUDA
//!   events.
//! - `... --bench cuda_attention -- --json [out.json]`: the report mode. Measures the copy
//!   ceiling (device-to-device memcpy, bytes read + written), decode at 32K and 128K context
//!   (Llama-3.1-8B shape: 8 KV heads x group 4, d = 128; full cache and ratio-0.3 skewed per-head
//!   lengths; per-layer calls rotating over 32 layers and one call batching all 32 layers),
//!   reporting K+V bytes read / time; and prefill TFLOP/s at 32K (causal FLOPs only). Prints JSON.

use std::time::Duration;

use criterion::Criterion;
use kvzip_kernels::cuda::attention::{AttentionShape, DecodePlan};
use kvzip_kernels::cuda::{bf16, CudaBackend, CudaSlice};
use kvzip_kernels::sampling::Rng;

const D: usize = 128;
const GROUP: usize = 4;
const KV_HEADS: usize = 8;
const LAYERS: usize = 32;

/// K/V storage for `LAYERS * KV_HEADS` heads of capacity `ctx`, filled with random bf16.
struct Cache {
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    ctx: usize,
}

fn fill_random(be: &CudaBackend, n: usize, seed: u64) -> CudaSlice<bf16> {
    let block = (1 << 24).min(n);
    let src = be
        .upload_bf16(&Rng::new(seed).uniform_vec(block, -1.0, 1.0))
        .expect("upload");
    let mut dst = be.alloc::<bf16>(n).expect("alloc");
    let mut at = 0;
    while at < n {
        let m = block.min(n - at);
        let mut view = dst.slice_mut(at..at + m);
        be.stream()
            .memcpy_dtod(&src.slice(0..m), &mut view)
            .expect("dtod");
        at += m;
    }
    dst
}

impl Cache {
    fn new(be: &CudaBackend, ctx: usize) -> Self {
        let n = LAYERS * KV_HEADS * ctx * D;
        Self {
            k: fill_random(be, n, 1),
            v: fill_random(be, n, 2),
            ctx,
        }
    }
}

/// KVzip-ratio-like per-head lengths: log-normal weights (sigma 1) scaled so the mean is
/// `ratio * ctx`, clamped to [1, ctx].
fn skewed_lens(rng: &mut Rng, heads: usize, ctx: usize, ratio: f64) -> Vec<usize> {
    let w: Vec<f64> = (0..heads)
        .map(|_| {
            let (u1, u2) = (rng.next_f64().max(1e-12), rng.next_f64());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()).exp()
        })
        .collect();
    let mean = w.iter().sum::<f64>() / heads as f64;
    w.iter()
        .map(|x| ((x / mean * ratio * ctx as f64) as usize).clamp(1, ctx))
        .collect()
}

fn shape(q_len: usize, n_kv: usize) -> AttentionShape {
    AttentionShape {
        q_len,
        n_kv_heads: n_kv,
        group: GROUP,
        head_dim: D,
        scale: 1.0 / (D as f32).sqrt(),
        window: None,
        softcap: None,
    }
}

/// Median milliseconds of `reps` timed runs of `f` (after `warm` untimed ones), CUDA events.
fn time_ms(be: &CudaBackend, warm: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warm {
        f();
    }
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let a = be.stream().record_event(flags).expect("event");
            f();
            let b = be.stream().record_event(flags).expect("event");
            a.elapsed_ms(&b).expect("elapsed") as f64
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// Decode over the cache with per-head `lens` (`LAYERS * KV_HEADS` of them): returns
/// (per-layer ms, per-layer TB/s, batched all-layer ms, batched TB/s).
fn decode_case(be: &CudaBackend, cache: &Cache, lens: &[usize]) -> (f64, f64, f64, f64) {
    let n_heads = LAYERS * KV_HEADS;
    let offsets: Vec<i64> = (0..n_heads).map(|h| (h * cache.ctx) as i64).collect();
    let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let d_off = be.upload(&offsets).unwrap();
    let d_lens = be.upload(&lens_i32).unwrap();
    let q = fill_random(be, n_heads * GROUP * D, 3);
    let mut out = be.alloc::<bf16>(n_heads * GROUP * D).unwrap();
    let bytes = lens.iter().sum::<usize>() as f64 * D as f64 * 2.0 * 2.0;
    // Per-layer calls, rotating over the layers so the L2 never holds the next layer's K/V.
    let plans: Vec<DecodePlan> = (0..LAYERS)
        .map(|l| DecodePlan::new(be, &lens[l * KV_HEADS..(l + 1) * KV_HEADS], 1, None).unwrap())
        .collect();
    let sh = shape(1, KV_HEADS);
    let per_layer = time_ms(be, 2, 15, || {
        for (l, plan) in plans.iter().enumerate() {
            let hs = l * KV_HEADS..(l + 1) * KV_HEADS;
            let q_l = q.slice(hs.start * GROUP * D..hs.end * GROUP * D);
            let mut o_l = out.slice_mut(hs.start * GROUP * D..hs.end * GROUP * D);
            be.attention_decode(
                plan,
                &q_l,
                &cache.k,
                &cache.v,
                &d_off.slice(hs.clone()),
                &d_lens.slice(hs.clone()),
                &sh,
                &mut o_l,
            )
            .unwrap();
        }
    });
    let plan_all = DecodePlan::new(be, lens, 1, None).unwrap();
    let sh_all = shape(1, n_heads);
    let batched = time_ms(be, 2, 15, || {
        be.attention_decode(
            &plan_all, &q, &cache.k, &cache.v, &d_off, &d_lens, &sh_all, &mut out,
        )
        .unwrap();
    });
    (
        per_layer / LAYERS as f64,
        bytes / (per_layer * 1e-3) / 1e12,
        batched,
        bytes / (batched * 1e-3) / 1e12,
    )
}

fn prefill_tflops(be: &CudaBackend, ctx: usize, head_dim: usize) -> (f64, f64) {
    let sh = AttentionShape {
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        ..shape(ctx, KV_HEADS)
    };
    let q = fill_random(be, sh.q_elems(), 4);
    let k = fill_random(be, KV_HEADS * ctx * head_dim, 5);
    let v = fill_random(be, KV_HEADS * ctx * head_dim, 6);
    let off: Vec<i64> = (0..KV_HEADS).map(|h| (h * ctx) as i64).collect();
    let d_off = be.upload(&off).unwrap();
    let d_lens = be.upload(&[ctx as i32; KV_HEADS]).unwrap();
    let mut out = be.alloc::<bf16>(sh.q_elems()).unwrap();
    let ms = time_ms(be, 1, 5, || {
        be.attention_prefill(&q, &k, &v, &d_off, &d_lens, &sh, &mut out)
            .unwrap();
    });
    let visible = (ctx * (ctx + 1) / 2) as f64;
    let flops = 4.0 * head_dim as f64 * visible * (KV_HEADS * GROUP) as f64;
    (ms, flops / (ms * 1e-3) / 1e12)
}

fn copy_tb_s(be: &CudaBackend) -> f64 {
    let n = 1usize << 30; // 2 GiB of bf16
    let src = fill_random(be, n, 7);
    let mut dst = be.alloc::<bf16>(n).unwrap();
    let ms = time_ms(be, 2, 10, || {
        be.stream().memcpy_dtod(&src, &mut dst).unwrap();
    });
    (2 * n * 2) as f64 / (ms * 1e-3) / 1e12
}

fn json_report(path: Option<String>) {
    let be = CudaBackend::new(0).expect("a CUDA GPU");
    let copy = copy_tb_s(&be);
    let mut rows = Vec::new();
    for ctx in [32 * 1024, 128 * 1024] {
        let cache = Cache::new(&be, ctx);
        let mut rng = Rng::new(ctx as u64);
        let full = vec![ctx; LAYERS * KV_HEADS];
        let ragged = skewed_lens(&mut rng, LAYERS * KV_HEADS, ctx, 0.3);
        for (name, lens) in [("full", &full), ("kvzip_0.3", &ragged)] {
            let (pl_ms, pl_bw, b_ms, b_bw) = decode_case(&be, &cache, lens);
            let kept = lens.iter().sum::<usize>() as f64 / (ctx * lens.len()) as f64;
            rows.push(format!(
                "{{\"kind\":\"decode\",\"ctx\":{ctx},\"cache\":\"{name}\",\"kept\":{kept:.3},\
                 \"per_layer_ms\":{pl_ms:.4},\"per_layer_tb_s\":{pl_bw:.3},\
                 \"per_layer_frac_copy\":{:.3},\"all_layers_ms\":{b_ms:.4},\
                 \"all_layers_tb_s\":{b_bw:.3},\"all_layers_frac_copy\":{:.3}}}",
                pl_bw / copy,
                b_bw / copy
            ));
            eprintln!("{}", rows.last().unwrap());
        }
    }
    for (ctx, d) in [(32 * 1024, 128), (32 * 1024, 64), (16 * 1024, 256)] {
        let (ms, tf) = prefill_tflops(&be, ctx, d);
        rows.push(format!(
            "{{\"kind\":\"prefill\",\"ctx\":{ctx},\"head_dim\":{d},\"kv_heads\":{KV_HEADS},\
             \"group\":{GROUP},\"ms\":{ms:.3},\"tflop_s\":{tf:.1},\"frac_800\":{:.3}}}",
            tf / 800.0
        ));
        eprintln!("{}", rows.last().unwrap());
    }
    let json = format!(
        "{{\"copy_tb_s\":{copy:.3},\"results\":[\n{}\n]}}\n",
        rows.join(",\n")
    );
    print!("{json}");
    if let Some(p) = path {
        let tmp = format!("{p}.tmp");
        std::fs::write(&tmp, &json).expect("write json");
        std::fs::rename(&tmp, &p).expect("rename json");
    }
}

fn criterion_benches(c: &mut Criterion) {
    let be = CudaBackend::new(0).expect("a CUDA GPU");
    let ctx = 32 * 1024;
    let cache = Cache::new(&be, ctx);
    let mut rng = Rng::new(9);
    let full = vec![ctx; LAYERS * KV_HEADS];
    let ragged = skewed_lens(&mut rng, LAYERS * KV_HEADS, ctx, 0.3);
    let mut g = c.benchmark_group("cuda_attention_decode_32k_layer");
    for (name, lens) in [("full", &full), ("kvzip_0.3", &ragged)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (ms, ..) = decode_case(&be, &cache, lens);
                Duration::from_secs_f64(ms * 1e-3 * iters as f64)
            })
        });
    }
    g.finish();
    c.bench_function("cuda_attention_prefill_4k_d128", |b| {
        b.iter_custom(|iters| {
            let (ms, _) = prefill_tflops(&be, 4096, 128);
            Duration::from_secs_f64(ms * 1e-3 * iters as f64)
        })
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--json") {
        json_report(args.get(i + 1).filter(|a| !a.starts_with('-')).cloned());
        return;
    }
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    criterion_benches(&mut c);
    c.final_summary();
}
