//! `kvzip run --device cuda`: the same flow as the CPU `run` on the GPU engine (bf16).

use anyhow::Result;

use super::run::RunArgs;

/// Runs `kvzip run` on GPU 0.
#[cfg(feature = "cuda")]
pub fn run_gpu(args: &RunArgs) -> Result<()> {
    use std::time::Instant;

    use anyhow::bail;
    use kvzip_models::engine::kvzip::Scoring;
    use kvzip_models::gpu::GpuEngine;
    use kvzip_score::HeadScores;
    use kvzip_templates::format_query;
    use serde_json::json;

    use super::run::{parse_kv_type, parse_task};
    use crate::common::{load_model, read_text};

    if args.save_cache.is_some() || args.load_cache.is_some() {
        bail!("--save-cache / --load-cache run on the CPU engine only for now; drop --device cuda");
    }
    let Some(path) = &args.context else {
        bail!("give --context FILE");
    };
    let model = load_model(&args.model)?;
    let engine = GpuEngine::load(&model.dir, 0)?;
    let task = parse_task(&args.task)?;
    let kv_type = parse_kv_type(&args.kv_type)?;
    let prompt = model.prompt_ids(task)?;
    let t_all = Instant::now();
    let context_ids = model.tokenizer.encode(&read_text(path)?)?;
    let scoring = if !args.head_scores.is_empty() {
        let paths: Vec<&std::path::Path> = args.head_scores.iter().map(|p| p.as_path()).collect();
        Scoring::HeadScores(HeadScores::load_merged(&paths)?)
    } else if args.ratio < 1.0 {
        Scoring::Reconstruct { chunk: args.chunk }
    } else {
        Scoring::None
    };
    let mut ctx =
        engine.prefill_context(&prompt, &context_ids, &scoring, kv_type, &mut |_, _, _| {})?;
    let kv_full = ctx.kv_bytes_context();
    let t0 = Instant::now();
    let (ratio_real, kv_kept) = if args.ratio < 1.0 {
        let r = ctx.prune(engine.gpu(), args.ratio, args.level)?;
        (r.ratio_real, r.kv_bytes_kept)
    } else {
        (1.0, kv_full)
    };
    engine.gpu().synchronize()?;
    let prune_ms = t0.elapsed().as_secs_f64() * 1e3;
    let opts = args.sampling.options(&model);
    let mut answers = Vec::new();
    let mut gen_ms = Vec::new();
    for q in &args.queries {
        let ids = prompt.query_input_ids(&model.tokenizer, &format_query(task, q))?;
        let t = Instant::now();
        let gen = ctx.answer(&engine, &ids, &opts, false, &mut |_| true)?;
        gen_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let answer = model.tokenizer.decode(&gen.tokens, true)?.trim().to_owned();
        if !args.json {
            println!("Q: {q}\nA: {answer}\n");
        }
        answers.push(json!({"query": q, "answer": answer, "tokens": gen.tokens.len()}));
    }
    super::run::RunSummary {
        device: "cuda",
        model: &model,
        answers,
        n_sys: ctx.n_sys,
        n_ctx: ctx.n_ctx,
        ratio_requested: args.ratio,
        ratio_real,
        kv_bytes: (kv_full, kv_kept),
        timings: ctx.timings,
        prune_ms,
        gen_ms,
        total_ms: t_all.elapsed().as_secs_f64() * 1e3,
    }
    .print(args)
}

/// Without the `cuda` feature `--device cuda` is a clear error.
#[cfg(not(feature = "cuda"))]
pub fn run_gpu(_args: &RunArgs) -> Result<()> {
    anyhow::bail!(
        "this kvzip was built without CUDA support: rebuild with `cargo build --release -p kvzip-cli --features cuda`"
    )
}
