//! `kvzip profile`: the reference `test.py` — one example, timings of prefill + scoring and of
//! generation, KV bytes full vs pruned, real ratio, full vs pruned answers, and how much the
//! pruned cache changes the teacher-forced answer distribution.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kvzip_models::engine::kvzip::{ContextCache, KvType, Scoring, DEFAULT_SCORING_CHUNK};
use kvzip_models::LogitsMode;
use kvzip_score::Level;
use kvzip_templates::{format_query, Task};
use serde_json::json;

use super::generate::SamplingArgs;
use super::run::parse_task;
use crate::common::{load_model, print_json, read_text, LoadedModel, ModelArgs};

/// Arguments of `kvzip profile`.
#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset: `squad` (SQuAD v1.1 JSON); ignored when --context is given.
    #[arg(long, default_value = "squad")]
    pub data: String,
    /// Dataset file (default: ../shared/data/squad-v1.1/dev-v1.1.json when present).
    #[arg(long)]
    pub data_file: Option<PathBuf>,
    /// Which example of the dataset.
    #[arg(long, default_value_t = 0)]
    pub idx: usize,
    /// A context file instead of a dataset example.
    #[arg(long)]
    pub context: Option<PathBuf>,
    /// Queries for --context.
    #[arg(long = "query")]
    pub queries: Vec<String>,
    /// Fraction of context KV pairs kept.
    #[arg(long, default_value_t = 0.3)]
    pub ratio: f64,
    /// Selection level.
    #[arg(long, default_value = "pair")]
    pub level: Level,
    /// Task template: qa or gsm.
    #[arg(long, default_value = "qa")]
    pub task: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One SQuAD paragraph: context and its questions.
fn squad_example(path: &std::path::Path, idx: usize) -> Result<(String, Vec<String>)> {
    let text = read_text(path)?;
    let root: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let paragraphs = root["data"]
        .as_array()
        .with_context(|| {
            format!(
                "{}: missing `data` list (SQuAD v1.1 format)",
                path.display()
            )
        })?
        .iter()
        .flat_map(|a| a["paragraphs"].as_array().cloned().unwrap_or_default());
    let Some(p) = paragraphs.into_iter().nth(idx) else {
        bail!("{}: no paragraph with index {idx}", path.display());
    };
    let context = p["context"].as_str().unwrap_or_default().to_owned();
    let questions = p["qas"]
        .as_array()
        .map(|q| {
            q.iter()
                .filter_map(|x| x["question"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok((context, questions))
}

/// Default location of the shared SQuAD file, relative to the working directory.
fn default_squad() -> Option<PathBuf> {
    [
        "../shared/data/squad-v1.1/dev-v1.1.json",
        "shared/data/squad-v1.1/dev-v1.1.json",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Teacher-forced logits of `answer` after `query_ids` on the cache (rolled back afterwards):
/// row i predicts answer token i.
fn forced_logits(
    model: &LoadedModel,
    ctx: &mut ContextCache,
    query_ids: &[u32],
    answer: &[u32],
) -> Result<Vec<f32>> {
    let mut ids = query_ids.to_vec();
    ids.extend_from_slice(&answer[..answer.len().saturating_sub(1)]);
    let mark = ctx.cache.mark();
    let out = model
        .engine
        .feed(&mut ctx.cache, &ids, LogitsMode::All, &mut |_, _| {});
    ctx.cache.rollback(&mark)?;
    let out = out?;
    let v = model.engine.spec().vocab_size;
    Ok(out[(query_ids.len() - 1) * v..].to_vec())
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn top2(p: &[f32]) -> (usize, f32, f32) {
    let (mut i1, mut a, mut b) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in p.iter().enumerate() {
        if v > a {
            b = a;
            a = v;
            i1 = i;
        } else if v > b {
            b = v;
        }
    }
    (i1, a, b)
}

/// (min, mean |x|, max) of a series.
fn stats(x: &[f32]) -> [f32; 3] {
    if x.is_empty() {
        return [0.0; 3];
    }
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mean = x.iter().map(|v| v.abs()).sum::<f32>() / x.len() as f32;
    [min, mean, max]
}

/// `kvzip profile`.
pub fn profile(args: &ProfileArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let task: Task = parse_task(&args.task)?;
    let (context, questions) = match &args.context {
        Some(p) => (read_text(p)?, args.queries.clone()),
        None => {
            if args.data != "squad" {
                bail!(
                    "profile reads --data squad or --context FILE (got --data {})",
                    args.data
                );
            }
            let path = args.data_file.clone().or_else(default_squad).context(
                "SQuAD file not found; pass --data-file PATH/dev-v1.1.json or --context FILE",
            )?;
            squad_example(&path, args.idx)?
        }
    };
    if questions.is_empty() {
        bail!("no queries: pass --query with --context");
    }
    let prompt = model.prompt_ids(task)?;
    let context_ids = model.tokenizer.encode(&context)?;
    let mut ctx = model.prefill_context(
        &prompt,
        &context_ids,
        &Scoring::Reconstruct {
            chunk: DEFAULT_SCORING_CHUNK,
        },
        KvType::Retain,
        args.json,
    )?;
    let opts = args.sampling.options(&model);

    let mut rows = Vec::new();
    let mut full_answers = Vec::new();
    let t_full = Instant::now();
    for q in &questions {
        let ids = prompt.query_input_ids(&model.tokenizer, &format_query(task, q))?;
        // The generation's own step logits are the full cache's teacher-forced logits.
        let mark = ctx.cache.mark();
        let gen = model
            .engine
            .generate(&mut ctx.cache, &ids, &opts, true, &mut |_| true);
        ctx.cache.rollback(&mark)?;
        let gen = gen?;
        full_answers.push((ids, gen.tokens, gen.step_logits.concat()));
    }
    let full_ms = t_full.elapsed().as_secs_f64() * 1e3;
    let kv_full = ctx.kv_bytes_context();
    let report = ctx.prune(args.ratio, args.level)?;
    let t_pruned = Instant::now();
    let v = model.engine.spec().vocab_size;
    let (mut d_pans, mut d_margin, mut d_p, mut flips) = (vec![], vec![], vec![], 0usize);
    for (q, (ids, full_tokens, full_forced)) in questions.iter().zip(&full_answers) {
        let gen = model
            .engine
            .answer(&mut ctx, ids, &opts, false, &mut |_| true)?;
        let pruned_forced = forced_logits(&model, &mut ctx, ids, full_tokens)?;
        for (i, &tok) in full_tokens.iter().enumerate() {
            let pf = softmax(&full_forced[i * v..(i + 1) * v]);
            let pp = softmax(&pruned_forced[i * v..(i + 1) * v]);
            d_pans.push(pp[tok as usize] - pf[tok as usize]);
            let (af, f1, f2) = top2(&pf);
            let (ap, p1, p2) = top2(&pp);
            d_margin.push((p1 - p2) - (f1 - f2));
            d_p.push(
                pf.iter()
                    .zip(&pp)
                    .map(|(a, b)| (b - a).abs())
                    .fold(0.0, f32::max),
            );
            flips += usize::from(af != ap);
        }
        let full_text = model.tokenizer.decode(full_tokens, true)?.trim().to_owned();
        let pruned_text = model.tokenizer.decode(&gen.tokens, true)?.trim().to_owned();
        rows.push(json!({"query": q, "full": full_text, "pruned": pruned_text}));
    }
    let pruned_ms = t_pruned.elapsed().as_secs_f64() * 1e3;
    let table = json!({
        "p_ans": stats(&d_pans), "margin": stats(&d_margin), "p": stats(&d_p),
        "flipped_argmax": flips, "positions": d_pans.len(),
    });
    let summary = json!({
        "model": model.name,
        "n_sys": ctx.n_sys, "n_ctx": ctx.n_ctx,
        "ratio_requested": args.ratio, "ratio_real": report.ratio_real,
        "threshold": report.threshold,
        "kv_bytes_full": kv_full, "kv_bytes_kept": report.kv_bytes_kept,
        "timings_ms": {
            "prefill": ctx.timings.prefill_ms, "scoring": ctx.timings.scoring_ms,
            "generate_full": full_ms, "generate_pruned": pruned_ms,
        },
        "answers": rows,
        "pruned_minus_full": table,
    });
    if args.json {
        return print_json(&summary);
    }
    println!(
        "# prefill {}: {} tokens ({} system + {} context), context KV {:.3} MB f32",
        model.name,
        ctx.n_sys + ctx.n_ctx,
        ctx.n_sys,
        ctx.n_ctx,
        kv_full as f64 / 1e6
    );
    println!(
        "## Time: prefill {:.0} ms + scoring {:.0} ms; generation full {:.0} ms, pruned {:.0} ms",
        ctx.timings.prefill_ms, ctx.timings.scoring_ms, full_ms, pruned_ms
    );
    println!(
        "ratio {:.3} ({}), context KV {:.3} MB (threshold {:.4})",
        report.ratio_real,
        args.level,
        report.kv_bytes_kept as f64 / 1e6,
        report.threshold
    );
    for r in &rows {
        if r["full"] != r["pruned"] {
            println!(
                "Q: {}\n  full:   {}\n  pruned: {}",
                r["query"], r["full"], r["pruned"]
            );
        }
    }
    println!("pruned_kv - full_kv   (min, mean|.|, max)");
    for key in ["p_ans", "margin", "p"] {
        let s = &table[key];
        println!(
            "  {key:<7} {:>9.4} {:>9.4} {:>9.4}",
            s[0].as_f64().unwrap_or(0.0),
            s[1].as_f64().unwrap_or(0.0),
            s[2].as_f64().unwrap_or(0.0)
        );
    }
    println!("  flipped argmax: {flips} of {} positions", d_pans.len());
    Ok(())
}
