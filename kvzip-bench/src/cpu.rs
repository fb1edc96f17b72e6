//! `kvzip-bench --cpu-engine MODEL_DIR`: one CPU measurement of the engine on a real model, the
//! child process that `cargo xtask cpu-bench` runs beside llama.cpp (one process per figure,
//! so peak RSS is that of the measured work alone).
//!
//! Prefills `--prompt-tokens` seeded pseudo-random token ids (ids below the special-token
//! range, as llama-bench feeds random tokens), then decodes `--new-tokens` greedily; with
//! `--score` instead prefills the same ids as a KVzip context and runs reconstruction scoring.
//! Prints one JSON object: prefill/decode tokens per second, scoring over prefill time, and
//! the process's peak RSS (`VmHWM`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use kvzip_models::engine::kvzip::{KvType, Scoring, DEFAULT_SCORING_CHUNK};
use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_models::LogitsMode;
use kvzip_templates::PromptIds;
use serde_json::json;

/// Options of one CPU measurement.
#[derive(Debug, Clone)]
pub struct CpuArgs {
    /// Model directory (an imported GGUF or HF safetensors).
    pub model: PathBuf,
    /// Prompt (context) tokens.
    pub prompt_tokens: usize,
    /// Greedy decode steps after the prompt.
    pub new_tokens: usize,
    /// Measure KVzip scoring instead of decode.
    pub score: bool,
}

/// Deterministic ids in `[0, vocab * 3 / 4)` (xorshift), away from special tokens at the top.
fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    let range = (vocab * 3 / 4).max(1) as u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % range) as u32
        })
        .collect()
}

/// Peak resident set of this process in bytes (`VmHWM` of /proc/self/status; 0 elsewhere).
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Runs one measurement and returns its JSON figures.
pub fn run(args: &CpuArgs) -> Result<serde_json::Value> {
    let t_load = Instant::now();
    let engine = Engine::load(&args.model)
        .with_context(|| format!("load model {}", args.model.display()))?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let vocab = engine.spec().vocab_size;
    let ids = token_ids(args.prompt_tokens, vocab, 0x5EED);
    let threads = rayon_threads();
    if args.score {
        let prompt = PromptIds {
            system_ids: token_ids(8, vocab, 1),
            postfix_ids: token_ids(6, vocab, 2),
            repeat_first_ids: token_ids(12, vocab, 3),
            repeat_next_ids: token_ids(14, vocab, 4),
        };
        let ctx = engine.prefill_context(
            &prompt,
            &ids,
            &Scoring::Reconstruct {
                chunk: DEFAULT_SCORING_CHUNK,
            },
            KvType::Evict,
            &mut |_, _, _| {},
        )?;
        let (prefill_ms, scoring_ms) = (ctx.timings.prefill_ms, ctx.timings.scoring_ms);
        return Ok(json!({
            "engine": "kvzip-rs", "model": args.model.display().to_string(),
            "threads": threads, "prompt_tokens": args.prompt_tokens,
            "weights": weight_form(),
            "prefill_ms": prefill_ms, "scoring_ms": scoring_ms,
            "scoring_over_prefill": scoring_ms / prefill_ms.max(1e-9),
            "load_ms": load_ms, "peak_rss_bytes": peak_rss_bytes(),
        }));
    }
    let mut cache = engine.new_cache_with_capacity(args.prompt_tokens + args.new_tokens + 1)?;
    let t0 = Instant::now();
    let logits = engine.prefill(&mut cache, &ids, LogitsMode::Last)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let first = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32);
    let mut opts = GenerateOptions::greedy(engine.spec(), args.new_tokens);
    opts.stop_tokens.clear();
    let t1 = Instant::now();
    let gen = engine.generate(&mut cache, &[first], &opts, false, &mut |_| true)?;
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(json!({
        "engine": "kvzip-rs", "model": args.model.display().to_string(),
        "threads": threads, "prompt_tokens": args.prompt_tokens,
        "new_tokens": gen.tokens.len(), "weights": weight_form(),
        "prefill_tok_s": args.prompt_tokens as f64 / prefill_s,
        "decode_tok_s": gen.tokens.len() as f64 / decode_s,
        "load_ms": load_ms, "peak_rss_bytes": peak_rss_bytes(),
    }))
}

/// How host weights are held (`KVZIP_HOST_WEIGHTS`) and activations multiplied
/// (`KVZIP_ACTIVATIONS`).
fn weight_form() -> &'static str {
    match (
        kvzip_models::HostWeights::from_env(),
        kvzip_models::q8_activations_from_env(),
    ) {
        (kvzip_models::HostWeights::AsStored, false)
        | (kvzip_models::HostWeights::AsStoredExact, _) => "as-stored",
        (kvzip_models::HostWeights::AsStored, true) => "as-stored+q8-activations",
        (kvzip_models::HostWeights::F32, _) => "f32",
        (kvzip_models::HostWeights::Bf16, _) => "bf16",
    }
}

/// Threads of the global rayon pool (`RAYON_NUM_THREADS` or the core count).
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
