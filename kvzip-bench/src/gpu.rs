//! The GPU measurements (feature `cuda`).

use std::time::Instant;

use anyhow::{Context, Result};
use kvzip_cache::KvCache;
use kvzip_kernels::cuda::{bf16, CudaBackend};
use kvzip_kernels::{AttentionShape, DType, Device, TokenSampler};
use kvzip_models::engine::Engine;
use kvzip_models::{LogitsMode, ModelSpec, RawConfig};
use kvzip_templates::PromptIds;
use serde_json::{json, Value};

use crate::Args;

/// Vendor dense bf16 rate of an H100/H200 SXM, FLOP/s (for MFU).
const PEAK_BF16: f64 = 989e12;

/// Timing with CUDA events: median of `reps` runs of `f` after `warm` warm-ups, milliseconds.
pub(crate) fn time_ms(
    gpu: &CudaBackend,
    warm: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    for _ in 0..warm {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = gpu.stream().record_event(flags)?;
        f()?;
        let end = gpu.stream().record_event(flags)?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Copy bandwidth (bytes read + written per second) and the bf16 GEMM rate of our cuBLAS path.
pub(crate) fn ceilings(gpu: &std::sync::Arc<CudaBackend>, quick: bool) -> Result<Value> {
    let n: usize = if quick { 1 << 26 } else { 1 << 31 };
    let src = gpu.upload(&vec![bf16::from_f32(0.5); 1 << 20])?;
    let mut a = gpu.alloc::<bf16>(n)?;
    let mut at = 0;
    while at < n {
        let m = (1 << 20).min(n - at);
        gpu.stream()
            .memcpy_dtod(&src.slice(..m), &mut a.slice_mut(at..at + m))?;
        at += m;
    }
    let mut b = gpu.alloc::<bf16>(n)?;
    let copy_ms = time_ms(gpu, 2, 10, || Ok(gpu.stream().memcpy_dtod(&a, &mut b)?))?;
    let copy_bps = 2.0 * (n * 2) as f64 / (copy_ms * 1e-3);
    drop((a, b));
    let g = if quick { 1024 } else { 8192 };
    let dev = device_of(gpu);
    let mut x = dev.alloc(DType::Bf16, g * g)?;
    dev.fill_uniform(&mut x.view_mut(), 1, -1.0, 1.0)?;
    let mut w = dev.alloc(DType::Bf16, g * g)?;
    dev.fill_uniform(&mut w.view_mut(), 2, -1.0, 1.0)?;
    let (x, w) = (
        x.cuda_bf16().context("bf16")?,
        w.cuda_bf16().context("bf16")?,
    );
    let mut y = gpu.alloc::<bf16>(g * g)?;
    let gemm_ms = time_ms(gpu, 3, 10, || Ok(gpu.linear(x, w, &mut y, g, g, g)?))?;
    let gemm_flops = 2.0 * (g as f64).powi(3) / (gemm_ms * 1e-3);
    Ok(json!({
        "copy_bytes_per_s": copy_bps,
        "copy_tb_per_s": copy_bps / 1e12,
        "gemm_bf16_tflop_per_s": gemm_flops / 1e12,
        "gemm_n": g,
    }))
}

/// Model spec of a named shape (HF config fields of the real model).
pub fn shape_spec(name: &str) -> Result<ModelSpec> {
    let cfg = match name {
        "llama-3.1-8b" => json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "bos_token_id": 128000, "eos_token_id": 128001
        }),
        "qwen2.5-7b-1m" => json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 1010000, "rope_theta": 10000000.0,
            "attention_bias": true, "bos_token_id": 151643, "eos_token_id": 151645
        }),
        "tiny" => json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
            "max_position_embeddings": 1 << 20, "eos_token_id": 0
        }),
        other => anyhow::bail!("unknown shape {other:?}: llama-3.1-8b, qwen2.5-7b-1m or tiny"),
    };
    let bytes = serde_json::to_vec(&cfg)?;
    let raw = RawConfig::parse(std::path::Path::new(&format!("<{name}>")), &bytes)?;
    Ok(kvzip_models::models::spec_for(&raw)?(&raw)?)
}

/// FLOPs of a causal prefill of `t` tokens: 2 × matmul params × t plus attention
/// (`QKᵀ` and `PV`, causal half).
fn prefill_flops(s: &ModelSpec, t: usize) -> f64 {
    let (h, d, i) = (
        s.hidden_size as f64,
        s.head_dim as f64,
        s.intermediate_size as f64,
    );
    let (nq, nkv) = (s.n_heads as f64, s.n_kv_heads as f64);
    let per_layer = h * nq * d * 2.0 + h * nkv * d * 2.0 + 3.0 * h * i;
    let linear = 2.0 * per_layer * s.n_layers() as f64 * t as f64;
    let attn = 2.0 * 2.0 * s.n_layers() as f64 * nq * d * (t as f64).powi(2) / 2.0;
    linear + attn
}

/// Per-(layer, head) lengths with mean `ratio * ctx`, skewed (log-normal-like factors from a
/// seeded hash), clamped to `[1, ctx]`.
pub(crate) fn skewed_lens(
    n_layers: usize,
    n_kv: usize,
    ctx: usize,
    ratio: f64,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = kvzip_kernels::sampling::Rng::new(seed);
    let raw: Vec<f64> = (0..n_layers * n_kv)
        .map(|_| {
            // Box-Muller normal, sigma 0.8.
            let (u, v) = (rng.next_f64().max(1e-12), rng.next_f64());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 0.8).exp()
        })
        .collect();
    let mean = raw.iter().sum::<f64>() / raw.len() as f64;
    raw.chunks(n_kv)
        .map(|c| {
            c.iter()
                .map(|f| ((f / mean * ratio * ctx as f64).round() as usize).clamp(1, ctx))
                .collect()
        })
        .collect()
}

/// Head-level selection: a `ratio` fraction of all (layer, head) keep the whole context,
/// the rest keep only `n_sys` rows.
fn head_level_lens(
    n_layers: usize,
    n_kv: usize,
    ctx: usize,
    ratio: f64,
    n_sys: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = kvzip_kernels::sampling::Rng::new(seed);
    let mut idx: Vec<(u64, usize)> = (0..n_layers * n_kv).map(|i| (rng.next_u64(), i)).collect();
    idx.sort_unstable();
    let keep = (ratio * idx.len() as f64).round() as usize;
    let mut lens = vec![vec![n_sys; n_kv]; n_layers];
    for &(_, i) in &idx[..keep] {
        lens[i / n_kv][i % n_kv] = ctx;
    }
    lens
}

/// The CUDA device a backend belongs to (the bench keeps one backend per shape).
pub(crate) fn device_of(gpu: &std::sync::Arc<CudaBackend>) -> Device {
    Device::Cuda(gpu.clone())
}

/// Decode figures for one cache layout: ms/token end to end, attention-only bandwidth, floor.
fn decode_case(
    engine: &mut Engine,
    cache: &mut KvCache,
    lens: &[Vec<usize>],
    ctx: usize,
    steps: usize,
    copy_bps: f64,
) -> Result<Value> {
    let dev = engine.device().clone();
    let gpu = dev
        .cuda_backend()
        .context("the bench needs a CUDA device")?
        .clone();
    let s = engine.spec().clone();
    cache.set_head_lens(lens, ctx)?;
    let kv_bytes = cache.kv_bytes_live();
    let weight_bytes = engine.model().weight_bytes();
    // Attention only: every layer's decode kernel over this cache (plans prebuilt).
    let d = s.head_dim;
    let mut q = dev.alloc(DType::Bf16, s.n_heads * d)?;
    dev.fill_uniform(&mut q.view_mut(), 9, -1.0, 1.0)?;
    let mut out = dev.alloc(DType::Bf16, s.n_heads * d)?;
    let shape = AttentionShape {
        q_len: 1,
        n_kv_heads: s.n_kv_heads,
        group: s.group(),
        head_dim: d,
        scale: s.attn_scale,
        window: None,
        softcap: None,
    };
    // Attention only, per planner chunk size (None = the planner's default); the best one is
    // used for the end-to-end steps below.
    let mut sweep = Vec::new();
    let mut best: (Option<usize>, f64) = (None, f64::INFINITY);
    for chunk in [
        None,
        Some(128),
        Some(256),
        Some(512),
        Some(1024),
        Some(2048),
    ] {
        let plans = (0..s.n_layers())
            .map(|l| dev.attention_plan(&lens[l], 1, chunk))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let ms = time_ms(&gpu, 3, 20, || {
            for (l, plan) in plans.iter().enumerate() {
                let kv = cache.kv_view(l)?;
                dev.attention(&q.view(), &kv, &shape, plan.as_ref(), &mut out.view_mut())?;
            }
            Ok(())
        })?;
        sweep.push(
            json!({"chunk_keys": chunk, "ms": ms, "bytes_per_s": kv_bytes as f64 / (ms * 1e-3)}),
        );
        if ms < best.1 {
            best = (chunk, ms);
        }
    }
    let (best_chunk, attn_ms) = best;
    drop((q, out));
    engine.decode_chunk_keys = best_chunk;
    // End to end: one token per step through the whole model, sampled on the device.
    let mark = cache.mark();
    let mut times = Vec::new();
    let mut tok = 1u32;
    let mut sampler = TokenSampler::new(kvzip_kernels::sampling::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    })?;
    for step in 0..steps + 2 {
        let t0 = Instant::now();
        let mut logits = engine
            .forward(&[tok], cache, LogitsMode::Last, None)?
            .context("no logits")?;
        tok = sampler.next(&dev, &mut logits, step as u64)?;
        if step >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    cache.rollback(&mark)?;
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    let floor_ms = (weight_bytes + kv_bytes) as f64 / copy_bps * 1e3;
    let attn_bps = kv_bytes as f64 / (attn_ms * 1e-3);
    Ok(json!({
        "context": ctx,
        "kv_bytes": kv_bytes,
        "weight_bytes": weight_bytes,
        "decode_ms_per_token": ms,
        "bandwidth_floor_ms": floor_ms,
        "ms_over_floor": ms / floor_ms,
        "attention_all_layers_ms": attn_ms,
        "attention_bytes_per_s": attn_bps,
        "attention_over_copy": attn_bps / copy_bps,
        "attention_chunk_keys_best": best_chunk,
        "attention_chunk_sweep": sweep,
    }))
}

/// Everything for one model shape.
fn shape_bench(
    gpu_ordinal: usize,
    name: &str,
    args: &Args,
    copy_bps: f64,
    gemm_flops: f64,
) -> Result<Value> {
    let spec = shape_spec(name)?;
    let dev = Device::cuda(gpu_ordinal)?;
    let t0 = Instant::now();
    let mut engine = Engine::random(spec.clone(), &dev, 42)?;
    dev.synchronize()?;
    eprintln!(
        "[bench] {name}: random weights in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    engine.prefill_chunk = args.prefill_chunk;
    let mut out = json!({"shape": name, "n_layers": spec.n_layers(), "hidden": spec.hidden_size,
                         "n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim});

    // Prefill + KVzip scoring at `prefill_tokens`.
    let t = args.prefill_tokens;
    let mut rng = kvzip_kernels::sampling::Rng::new(5);
    let ids: Vec<u32> = (0..t)
        .map(|_| 10 + (rng.next_u64() % (spec.vocab_size as u64 - 10)) as u32)
        .collect();
    let prompt = PromptIds {
        system_ids: ids[..16].to_vec(),
        postfix_ids: vec![3, 4, 5],
        repeat_first_ids: vec![6, 7, 8, 9],
        repeat_next_ids: vec![6, 7, 9],
    };
    {
        let mut warm = engine.new_cache_with_capacity(4096 + 64)?;
        engine.feed_observed(
            &mut warm,
            &ids[..4096.min(t)],
            LogitsMode::Last,
            None,
            &mut |_, _| {},
        )?;
        dev.synchronize()?;
    }
    let mut prefill_ms = f64::INFINITY;
    for _ in 0..2 {
        let mut cache = engine.new_cache_with_capacity(t + 4096)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        engine.feed_observed(&mut cache, &ids, LogitsMode::Last, None, &mut |_, _| {})?;
        dev.synchronize()?;
        prefill_ms = prefill_ms.min(t1.elapsed().as_secs_f64() * 1e3);
    }
    let flops = prefill_flops(&spec, t);
    out["prefill"] = json!({
        "tokens": t, "ms": prefill_ms, "tokens_per_s": t as f64 / (prefill_ms * 1e-3),
        "flops": flops, "mfu_vs_989": flops / (prefill_ms * 1e-3) / PEAK_BF16,
        "mfu_vs_measured_gemm": flops / (prefill_ms * 1e-3) / gemm_flops,
    });
    eprintln!("[bench] {name}: prefill {t} tokens {prefill_ms:.0} ms");
    if !args.skip_scoring {
        let ctx_ids = &ids[16..];
        let t2 = Instant::now();
        let ctx = engine.prefill_context(
            &prompt,
            ctx_ids,
            &kvzip_models::engine::kvzip::Scoring::Reconstruct { chunk: 2000 },
            kvzip_models::engine::kvzip::KvType::Evict,
            &mut |_, _, _| {},
        )?;
        dev.synchronize()?;
        let total = t2.elapsed().as_secs_f64() * 1e3;
        out["scoring"] = json!({
            "context_tokens": ctx_ids.len(),
            "prefill_ms": ctx.timings.prefill_ms,
            "scoring_ms": ctx.timings.scoring_ms,
            "scoring_over_prefill": ctx.timings.scoring_ms / ctx.timings.prefill_ms,
            "total_ms": total,
        });
        eprintln!(
            "[bench] {name}: scoring {:.0} ms vs prefill {:.0} ms",
            ctx.timings.scoring_ms, ctx.timings.prefill_ms
        );
    }

    // Decode at each context: full cache, KVzip pair-level 0.3 (skewed per head), head-level 0.6.
    let mut decode = Vec::new();
    for &ctx in &args.contexts {
        let n_sys = 16;
        let mut cache = engine.new_cache_with_capacity(ctx + args.decode_steps + 64)?;
        fill_random(&mut cache, 7)?;
        let (nl, nkv) = (spec.n_layers(), spec.n_kv_heads);
        let cases = [
            ("full", vec![vec![ctx; nkv]; nl]),
            ("kvzip_pair_0.3", skewed_lens(nl, nkv, ctx, 0.3, 11)),
            (
                "kvzip_head_0.6",
                head_level_lens(nl, nkv, ctx, 0.6, n_sys, 13),
            ),
        ];
        let mut row = json!({"context": ctx});
        for (label, lens) in cases {
            let r = decode_case(
                &mut engine,
                &mut cache,
                &lens,
                ctx,
                args.decode_steps,
                copy_bps,
            )?;
            eprintln!("[bench] {name} ctx {ctx} {label}: {:.2} ms/token (floor {:.2}), attention {:.2} TB/s",
                r["decode_ms_per_token"].as_f64().unwrap_or(0.0), r["bandwidth_floor_ms"].as_f64().unwrap_or(0.0),
                r["attention_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e12);
            row[label] = r;
        }
        let (full, pair) = (&row["full"], &row["kvzip_pair_0.3"]);
        let measured = full["decode_ms_per_token"].as_f64().unwrap_or(f64::NAN)
            / pair["decode_ms_per_token"].as_f64().unwrap_or(f64::NAN);
        let predicted = full["bandwidth_floor_ms"].as_f64().unwrap_or(f64::NAN)
            / pair["bandwidth_floor_ms"].as_f64().unwrap_or(f64::NAN);
        row["speedup_0.3_measured"] = json!(measured);
        row["speedup_0.3_floor_predicted"] = json!(predicted);
        row["speedup_fraction_of_floor"] = json!(measured / predicted);
        decode.push(row);
    }
    out["decode"] = json!(decode);
    Ok(out)
}

/// Fills every K/V buffer of the cache with seeded random values in [-1, 1) (decode speed does
/// not depend on values, but zeros can run faster than real data).
pub(crate) fn fill_random(cache: &mut KvCache, seed: u64) -> Result<()> {
    let dev = cache.device().clone();
    for l in 0..cache.n_layers() {
        let layer = cache.layer_mut_data(l).context("layer")?;
        dev.fill_uniform(
            &mut layer.k.view_mut(),
            seed ^ ((l * 2) as u64) << 20,
            -1.0,
            1.0,
        )?;
        dev.fill_uniform(
            &mut layer.v.view_mut(),
            seed ^ ((l * 2 + 1) as u64) << 20,
            -1.0,
            1.0,
        )?;
    }
    Ok(())
}

/// Runs every measurement and returns the JSON report.
pub fn run(args: &Args) -> Result<Value> {
    let gpu = std::sync::Arc::new(CudaBackend::new(0)?);
    let ceil = ceilings(&gpu, args.quick)?;
    drop(gpu);
    let copy_bps = ceil["copy_bytes_per_s"].as_f64().unwrap_or(4.3e12);
    let gemm = ceil["gemm_bf16_tflop_per_s"].as_f64().unwrap_or(800.0) * 1e12;
    eprintln!(
        "[bench] copy {:.2} TB/s, GEMM {:.0} TFLOP/s",
        copy_bps / 1e12,
        gemm / 1e12
    );
    let mut shapes = Vec::new();
    for name in &args.shapes {
        match shape_bench(0, name, args, copy_bps, gemm) {
            Ok(v) => shapes.push(v),
            Err(e) => {
                eprintln!("[bench] {name}: FAILED: {e:#}");
                shapes.push(json!({"shape": name, "error": format!("{e:#}")}));
            }
        }
    }
    Ok(json!({"ceilings": ceil, "shapes": shapes}))
}
