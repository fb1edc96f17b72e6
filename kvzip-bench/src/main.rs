//! `kvzip-bench`: end-to-end GPU figures of kvzip-rs (what `cargo xtask bench` runs).
//!
//! On random weights at real model shapes (speed does not depend on weight values): copy and
//! GEMM ceilings; prefill tokens/s and MFU; KVzip scoring time over prefill time; decode
//! ms/token with the full cache, KVzip pair-level 0.3 (skewed per-head lengths) and head-level
//! 0.6 at each context, against the bandwidth floor (weight + KV bytes over copy bandwidth); and
//! the decode attention's achieved bandwidth over the copy bandwidth. Writes one JSON file.
//!
//! `--serve-batch` instead measures batched decode of many requests on distinct contexts at
//! one KV memory budget, ratio 1.0 vs 0.3 (what `kvzip serve` does), see `batch.rs`.
//!
//! `--cpu-engine MODEL_DIR` instead measures the CPU engine on a real model (prefill and
//! decode tokens/s, or `--score` KVzip scoring time, and peak RSS), see `cpu.rs`; it is the
//! child process of `cargo xtask cpu-bench` and needs no CUDA.
//!
//! ```text
//! kvzip-bench --cpu-engine DIR [--prompt-tokens 512] [--new-tokens 64] [--score]
//! kvzip-bench --out bench/gpu/kvzip.json [--shapes llama-3.1-8b,qwen2.5-7b-1m]
//!             [--contexts 32768,131072] [--prefill-tokens 32768] [--decode-steps 16] [--quick]
//! ```

#[cfg(feature = "cuda")]
mod batch;
mod cpu;
#[cfg(feature = "cuda")]
mod gpu;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Parsed command line.
#[derive(Debug, Clone)]
pub struct Args {
    out: PathBuf,
    shapes: Vec<String>,
    contexts: Vec<usize>,
    prefill_tokens: usize,
    prefill_chunk: usize,
    decode_steps: usize,
    skip_scoring: bool,
    quick: bool,
    /// `--serve-batch`: run only the batched-decode bench at a fixed KV budget.
    serve_batch: bool,
    /// Batch sizes of `--serve-batch`.
    batches: Vec<usize>,
    /// KV memory budget of `--serve-batch`, bytes.
    kv_budget_bytes: usize,
    /// `--cpu-engine DIR`: one CPU measurement of the engine (see `cpu.rs`).
    cpu: Option<cpu::CpuArgs>,
}

fn list(flag: &str, v: String) -> Result<Vec<usize>> {
    v.split(',')
        .map(|s| {
            s.parse()
                .with_context(|| format!("{flag}: {s:?} is not a number"))
        })
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        out: PathBuf::from("bench/gpu/kvzip.json"),
        shapes: vec!["llama-3.1-8b".into(), "qwen2.5-7b-1m".into()],
        contexts: vec![32768, 131072],
        prefill_tokens: 32768,
        prefill_chunk: 8192,
        decode_steps: 16,
        skip_scoring: false,
        quick: false,
        serve_batch: false,
        batches: vec![1, 8, 32, 64],
        kv_budget_bytes: 48 << 30,
        cpu: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => a.out = PathBuf::from(value()?),
            "--shapes" => a.shapes = value()?.split(',').map(str::to_owned).collect(),
            "--contexts" => a.contexts = list("--contexts", value()?)?,
            "--batches" => a.batches = list("--batches", value()?)?,
            "--kv-budget-gib" => {
                let gib: f64 = value()?.parse().context("--kv-budget-gib")?;
                a.kv_budget_bytes = (gib * (1u64 << 30) as f64) as usize;
            }
            "--serve-batch" => a.serve_batch = true,
            "--cpu-engine" => {
                let dir = PathBuf::from(value()?);
                a.cpu = Some(cpu_args(a.cpu.take(), |c| c.model = dir));
            }
            "--new-tokens" => {
                let n = value()?.parse().context("--new-tokens")?;
                a.cpu = Some(cpu_args(a.cpu.take(), |c| c.new_tokens = n));
            }
            "--score" => a.cpu = Some(cpu_args(a.cpu.take(), |c| c.score = true)),
            "--prefill-tokens" => {
                a.prefill_tokens = value()?.parse().context("--prefill-tokens")?
            }
            "--prompt-tokens" => {
                let n = value()?.parse().context("--prompt-tokens")?;
                a.cpu = Some(cpu_args(a.cpu.take(), |c| c.prompt_tokens = n));
            }
            "--prefill-chunk" => a.prefill_chunk = value()?.parse().context("--prefill-chunk")?,
            "--decode-steps" => a.decode_steps = value()?.parse().context("--decode-steps")?,
            "--skip-scoring" => a.skip_scoring = true,
            "--quick" => {
                a.quick = true;
                a.shapes = vec!["tiny".into()];
                a.contexts = vec![4096];
                a.prefill_tokens = 4096;
                a.decode_steps = 4;
            }
            "-h" | "--help" => {
                println!("kvzip-bench --cpu-engine MODEL_DIR [--prompt-tokens 512] [--new-tokens 64] [--score]\nkvzip-bench --out FILE [--shapes a,b] [--contexts 32768,131072] [--prefill-tokens N] [--prefill-chunk N] [--decode-steps N] [--skip-scoring] [--quick]\n            [--serve-batch [--batches 1,8,32,64] [--kv-budget-gib 48]]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(a)
}

/// Applies `set` to the CPU options (created with defaults on first use).
fn cpu_args(current: Option<cpu::CpuArgs>, set: impl FnOnce(&mut cpu::CpuArgs)) -> cpu::CpuArgs {
    let mut c = current.unwrap_or(cpu::CpuArgs {
        model: PathBuf::new(),
        prompt_tokens: 512,
        new_tokens: 64,
        score: false,
    });
    set(&mut c);
    c
}

fn write_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

#[cfg(feature = "cuda")]
fn run(args: &Args) -> Result<serde_json::Value> {
    if args.serve_batch {
        batch::run(args)
    } else {
        gpu::run(args)
    }
}

#[cfg(not(feature = "cuda"))]
fn run(_args: &Args) -> Result<serde_json::Value> {
    bail!("kvzip-bench measures the CUDA backend: build it with --features cuda (cargo xtask bench does)")
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(c) = &args.cpu {
        if c.model.as_os_str().is_empty() {
            bail!("--prompt-tokens / --new-tokens / --score need --cpu-engine MODEL_DIR");
        }
        println!("{}", serde_json::to_string(&cpu::run(c)?)?);
        return Ok(());
    }
    let report = run(&args)?;
    let text = serde_json::to_string_pretty(&report)?;
    write_atomic(&args.out, &text)?;
    println!("{text}");
    eprintln!("[bench] wrote {}", args.out.display());
    Ok(())
}
