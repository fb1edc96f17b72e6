//! Batched decode at one fixed KV memory budget (what `kvzip serve` does on a GPU): how many
//! distinct contexts fit the budget at ratio 1.0 and 0.3, and the aggregate decode tokens/s
//! when `batch` requests, each on its own context, decode together through
//! [`kvzip_models::batch`] (shared read-only context + private suffix, one batched attention
//! launch per layer). Contexts are synthesized like the single-sequence bench: random K/V and,
//! for 0.3, skewed per-head lengths with mean 0.3 × context (KVzip pair-level shape).

use std::time::Instant;

use anyhow::{Context, Result};
use kvzip_cache::KvCache;
use kvzip_kernels::{AttentionShape, DType, Device};
use kvzip_models::batch::{batch_pieces, BatchSeq, BatchStep, SuffixPool};
use kvzip_models::engine::Engine;
use kvzip_models::LogitsMode;
use serde_json::{json, Value};

use crate::gpu::{device_of, fill_random, shape_spec, skewed_lens, time_ms};
use crate::Args;

/// Rows each request may hold privately in the bench (query + answer).
const SUFFIX_ROWS: usize = 64;

/// Attention alone over the batch: every layer's one batched launch; returns (ms, bytes read).
fn attention_only(
    dev: &Device,
    engine: &Engine,
    contexts: &[KvCache],
    pool: &SuffixPool,
    slots: &[usize],
) -> Result<(f64, usize, f64)> {
    let s = engine.spec();
    let gpu = dev.cuda_backend().context("CUDA device")?.clone();
    let b = contexts.len();
    let d = s.head_dim;
    let mut q = dev.alloc(DType::Bf16, b * s.n_heads * d)?;
    dev.fill_uniform(&mut q.view_mut(), 3, -1.0, 1.0)?;
    let mut out = dev.alloc(DType::Bf16, b * s.n_heads * d)?;
    let shape = AttentionShape {
        q_len: 1,
        n_kv_heads: b * s.n_kv_heads,
        group: s.group(),
        head_dim: d,
        scale: s.attn_scale,
        window: None,
        softcap: None,
    };
    let seqs: Vec<BatchSeq<'_>> = contexts
        .iter()
        .zip(slots)
        .map(|(c, &slot)| BatchSeq { context: c, slot })
        .collect();
    let per_layer = (0..s.n_layers())
        .map(|l| batch_pieces(pool, &seqs, l, d))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let bytes: usize = per_layer
        .iter()
        .map(|kv| kv.lens.iter().sum::<usize>() * d * 2 * 2)
        .sum();
    let ms = time_ms(&gpu, 3, 10, || {
        for kv in &per_layer {
            dev.attention_pieces(&q.view(), kv, &shape, None, &mut out.view_mut())?;
        }
        Ok(())
    })?;
    // Host wall clock of the same launches, pieces prebuilt (plan building and launch cost).
    dev.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..5 {
        for kv in &per_layer {
            dev.attention_pieces(&q.view(), kv, &shape, None, &mut out.view_mut())?;
        }
    }
    dev.synchronize()?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3 / 5.0;
    Ok((ms, bytes, wall_ms))
}

/// Decode steps of `contexts.len()` requests together; median ms per step.
fn decode_steps(
    engine: &Engine,
    contexts: &[KvCache],
    pool: &mut SuffixPool,
    slots: &[usize],
    steps: usize,
) -> Result<f64> {
    let dev = engine.device().clone();
    let b = contexts.len();
    let mut ids: Vec<u32> = (0..b as u32).map(|i| 100 + i).collect();
    let mut times = Vec::new();
    for step in 0..steps + 2 {
        let seqs: Vec<BatchSeq<'_>> = contexts
            .iter()
            .zip(slots)
            .map(|(c, &slot)| BatchSeq { context: c, slot })
            .collect();
        let t0 = Instant::now();
        let mut step_kv = BatchStep::new(pool, seqs, 1, None);
        let mut logits = engine
            .forward_step(&ids, &mut step_kv, LogitsMode::All)?
            .context("no logits")?;
        ids = kvzip_kernels::greedy_rows(&dev, &mut logits, b)?;
        if step >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// cuBLAS linears of one forward (every layer's qkv, o, gate_up, down and the LM head) at
/// `m` rows: GPU ms per `m` (isolates the GEMMs from the rest of a decode step).
fn linears_by_rows(dev: &Device, spec: &kvzip_models::ModelSpec, rows: &[usize]) -> Result<Value> {
    let gpu = dev.cuda_backend().context("CUDA device")?.clone();
    let (h, d, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let shapes = [
        (h, (spec.n_heads + 2 * spec.n_kv_heads) * d),
        (spec.n_heads * d, h),
        (h, 2 * i),
        (i, h),
    ];
    let max_m = rows.iter().copied().max().unwrap_or(1);
    let mut x = dev.alloc(DType::Bf16, max_m * h.max(i))?;
    dev.fill_uniform(&mut x.view_mut(), 1, -1.0, 1.0)?;
    let mut ws = Vec::new();
    for (k, n) in shapes {
        let mut w = dev.alloc(DType::Bf16, k * n)?;
        dev.fill_uniform(&mut w.view_mut(), 2, -0.1, 0.1)?;
        ws.push((k, n, w));
    }
    let mut out = dev.alloc(DType::Bf16, max_m * 2 * i.max(h))?;
    let mut res = Vec::new();
    for &m in rows {
        let ms = time_ms(&gpu, 2, 5, || {
            for _ in 0..spec.n_layers() {
                for (k, n, w) in &ws {
                    let xv = x.slice(0..m * k)?;
                    let mut ov = out.slice_mut(0..m * n)?;
                    dev.linear(&xv, &w.view(), None, &mut ov, m, *n, *k)?;
                }
            }
            Ok(())
        })?;
        res.push(json!({"m": m, "all_layers_ms": ms}));
        eprintln!(
            "[batch] linears of {} layers at m = {m}: {ms:.2} ms",
            spec.n_layers()
        );
    }
    Ok(json!(res))
}

/// The whole batch bench for `args.shapes[0]` at `args.contexts[0]` tokens per context.
pub fn run(args: &Args) -> Result<Value> {
    let name = args.shapes.first().context("--shapes")?;
    let ctx = *args.contexts.first().context("--contexts")?;
    let gpu = std::sync::Arc::new(kvzip_kernels::cuda::CudaBackend::new(0)?);
    let copy_bps = crate::gpu::ceilings(&gpu, args.quick)?["copy_bytes_per_s"]
        .as_f64()
        .unwrap_or(4.3e12);
    let dev = device_of(&gpu);
    let spec = shape_spec(name)?;
    let engine = Engine::random(spec.clone(), &dev, 42)?;
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let linears = linears_by_rows(&dev, &spec, &[1, 2, 8, 16, 32, 64])?;
    let mut pool = SuffixPool::new(&dev, &spec, max_batch, SUFFIX_ROWS)?;
    let budget = args.kv_budget_bytes;
    let (nl, nkv) = (spec.n_layers(), spec.n_kv_heads);
    let mut by_ratio = Vec::new();
    let mut fits = Vec::new();
    for ratio in [1.0, 0.3] {
        let lens = if ratio >= 1.0 {
            vec![vec![ctx; nkv]; nl]
        } else {
            skewed_lens(nl, nkv, ctx, ratio, 11)
        };
        let mut template = engine.new_cache_with_capacity(ctx)?;
        fill_random(&mut template, 7)?;
        template.set_head_lens(&lens, ctx)?;
        let one = template.try_clone()?;
        let context_bytes = one.bytes();
        drop(template);
        let n_fit = budget.saturating_sub(pool.bytes()) / context_bytes;
        let n_make = n_fit.min(max_batch);
        let mut contexts = vec![one];
        while contexts.len() < n_make {
            contexts.push(contexts[0].try_clone()?);
        }
        contexts.truncate(n_make.max(1));
        dev.synchronize()?;
        eprintln!(
            "[batch] ratio {ratio}: {context_bytes} bytes per context, {n_fit} fit {budget} bytes"
        );
        let mut rows = Vec::new();
        for &batch in &args.batches {
            let concurrent = batch.min(n_fit).max(1).min(contexts.len());
            let ctxs = &contexts[..concurrent];
            let slots: Vec<usize> = (0..concurrent)
                .map(|_| pool.acquire().context("slot"))
                .collect::<Result<_>>()?;
            let step_ms = decode_steps(&engine, ctxs, &mut pool, &slots, args.decode_steps)?;
            let (attn_ms, attn_bytes, attn_wall_ms) =
                attention_only(&dev, &engine, ctxs, &pool, &slots)?;
            for &s in &slots {
                pool.release(s)?;
                pool.acquire().context("slot")?;
            }
            let empties: Vec<KvCache> = (0..concurrent)
                .map(|_| engine.new_cache())
                .collect::<std::result::Result<_, _>>()?;
            let empty_ms = decode_steps(&engine, &empties, &mut pool, &slots, args.decode_steps)?;
            for s in slots {
                pool.release(s)?;
            }
            let attn_bps = attn_bytes as f64 / (attn_ms * 1e-3);
            let tps = concurrent as f64 / (step_ms * 1e-3);
            eprintln!(
                "[batch] ratio {ratio} batch {batch} (running {concurrent}): {step_ms:.2} ms/step ({empty_ms:.2} without contexts), {tps:.0} tok/s, attention {:.2} TB/s ({:.2} of copy; {attn_ms:.2} ms GPU, {attn_wall_ms:.2} ms wall)",
                attn_bps / 1e12,
                attn_bps / copy_bps
            );
            rows.push(json!({
                "batch": batch,
                "running": concurrent,
                "step_ms": step_ms,
                "tokens_per_s": tps,
                "attention_ms": attn_ms,
                "attention_bytes": attn_bytes,
                "attention_bytes_per_s": attn_bps,
                "attention_over_copy": attn_bps / copy_bps,
                "attention_host_wall_ms": attn_wall_ms,
                "step_ms_without_contexts": empty_ms,
            }));
        }
        fits.push(n_fit);
        by_ratio.push(json!({
            "ratio": ratio,
            "context_bytes": context_bytes,
            "contexts_fit": n_fit,
            "batches": rows,
        }));
    }
    let tps = |r: usize, i: usize| {
        by_ratio[r]["batches"][i]["tokens_per_s"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let gains: Vec<Value> = args
        .batches
        .iter()
        .enumerate()
        .map(|(i, b)| json!({"batch": b, "tokens_per_s_0.3_over_1.0": tps(1, i) / tps(0, i)}))
        .collect();
    Ok(json!({
        "shape": name,
        "context_tokens": ctx,
        "kv_budget_bytes": budget,
        "suffix_pool_bytes": pool.bytes(),
        "weight_bytes": engine.model().weight_bytes(),
        "copy_bytes_per_s": copy_bps,
        "linears_by_rows": linears,
        "by_ratio": by_ratio,
        "contexts_0.3_over_1.0": fits[1] as f64 / fits[0].max(1) as f64,
        "throughput_gain": gains,
    }))
}
