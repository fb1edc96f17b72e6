//! `kvzip run`: compress a context once, answer several queries from the compressed cache.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kvzip_cache::{CacheFileMeta, DeviceKv, KvCache};
use kvzip_models::engine::kvzip::{ContextCache, KvType, Scoring, DEFAULT_SCORING_CHUNK};
use kvzip_score::Level;
use kvzip_templates::{format_query, PromptIds, Task};
use serde_json::json;

use super::generate::SamplingArgs;
use crate::common::{load_model, peak_rss_bytes, print_json, read_text, LoadedModel, ModelArgs};

/// Arguments of `kvzip run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file holding the context (not with --load-cache).
    #[arg(long, conflicts_with = "load_cache")]
    pub context: Option<PathBuf>,
    /// A question about the context; repeat for several.
    #[arg(long = "query", required = true)]
    pub queries: Vec<String>,
    /// Fraction of context KV pairs to keep, in (0, 1] (not with --load-cache: a loaded cache
    /// keeps the ratio it was saved with).
    #[arg(long, default_value_t = 0.3, value_parser = parse_ratio, conflicts_with = "load_cache")]
    pub ratio: f64,
    /// Selection level: pair, pair-uniform, head (or pyramid).
    #[arg(long, default_value = "pair", conflicts_with = "load_cache")]
    pub level: Level,
    /// Context-independent head scores (safetensors [layers, kv-heads]); skips scoring.
    #[arg(long)]
    pub head_scores: Vec<PathBuf>,
    /// evict (compact once) or retain (keep the full cache).
    #[arg(long, default_value = "evict", conflicts_with = "load_cache")]
    pub kv_type: String,
    /// Save the compressed cache to this file.
    #[arg(long, conflicts_with = "load_cache")]
    pub save_cache: Option<PathBuf>,
    /// Answer from a cache saved earlier with --save-cache (no prefill, no scoring).
    #[arg(long)]
    pub load_cache: Option<PathBuf>,
    /// Reconstruction chunk size in context tokens. Scoring feeds one chunk (plus a few prompt
    /// tokens) after the whole context, so context + chunk must fit the model's window.
    #[arg(long, default_value_t = DEFAULT_SCORING_CHUNK)]
    pub chunk: usize,
    /// Task format (KVZIP-SPEC §6): qa or gsm. Without it each query is sent exactly as
    /// written (after the QA system prompt), as the reference's quick start does; with it the
    /// task's query format applies (`qa`: `Q: …`).
    #[arg(long)]
    pub task: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Parses a `--ratio`: a number in (0, 1] (NaN, infinities, 0 and > 1 are refused).
pub fn parse_ratio(s: &str) -> std::result::Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|_| {
        format!(
            "{s:?} is not a number; a ratio is the fraction of context KV pairs kept, in (0, 1]"
        )
    })?;
    if r.is_finite() && r > 0.0 && r <= 1.0 {
        Ok(r)
    } else {
        Err(format!(
            "{r} is outside (0, 1]: a ratio is the fraction of context KV pairs kept"
        ))
    }
}

/// Parses a `--kv-type` value.
pub fn parse_kv_type(s: &str) -> Result<KvType> {
    match s {
        "evict" => Ok(KvType::Evict),
        "retain" => Ok(KvType::Retain),
        other => bail!("--kv-type {other:?}: expected evict or retain"),
    }
}

/// Parses a `--task` value.
pub fn parse_task(s: &str) -> Result<Task> {
    match s {
        "qa" => Ok(Task::Qa),
        "gsm" | "gsm8k" => Ok(Task::from_dataset_name("gsm8k")),
        other => bail!("--task {other:?}: expected qa or gsm"),
    }
}

/// Answers one query (formatted for `task` when one is given, else as written); returns
/// (answer text, tokens, ms, the query's input ids).
pub fn answer_query(
    model: &LoadedModel,
    prompt: &PromptIds,
    ctx: &mut ContextCache,
    task: Option<Task>,
    question: &str,
    sampling: &SamplingArgs,
) -> Result<(String, usize, f64, Vec<u32>)> {
    let query = match task {
        Some(t) => format_query(t, question),
        None => question.to_owned(),
    };
    let ids = prompt.query_input_ids(&model.tokenizer, &query)?;
    let opts = sampling.options(model);
    let t0 = Instant::now();
    let gen = model
        .engine
        .answer(ctx, &ids, &opts, false, &mut |_| true)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let text = model.tokenizer.decode(&gen.tokens, true)?;
    Ok((text.trim().to_owned(), gen.tokens.len(), ms, ids))
}

/// Loads a saved cache onto the model's device (a cache saved from either device loads on
/// either: rows are converted to the device's type) and checks it belongs to `model` and
/// `prompt`.
fn load_saved(
    model: &LoadedModel,
    path: &PathBuf,
    prompt: &PromptIds,
) -> Result<(ContextCache, CacheFileMeta)> {
    let storage = DeviceKv::new(model.engine.device().clone());
    let (cache, meta): (KvCache, CacheFileMeta) = KvCache::load_in(storage, path)?;
    meta.check(path, &model.model_id, None)?;
    if !meta.token_ids.starts_with(&prompt.system_ids) {
        bail!(
            "{}: the cache was made with a different system prompt / task; re-create it with --save-cache",
            path.display()
        );
    }
    let ctx = ContextCache::from_saved(cache, meta.token_ids.clone())?;
    Ok((ctx, meta))
}

/// What `kvzip run` reports, on either device.
pub(super) struct RunSummary<'a> {
    /// `cpu` or `cuda`.
    pub device: &'static str,
    /// The model (name and directory).
    pub model: &'a LoadedModel,
    /// `{query, answer, tokens}` per query.
    pub answers: Vec<serde_json::Value>,
    /// System-prompt tokens.
    pub n_sys: usize,
    /// Context tokens.
    pub n_ctx: usize,
    /// The ratio asked for (or the loaded cache's).
    pub ratio_requested: f64,
    /// Selection level (the flag, or the loaded cache's).
    pub level: String,
    /// `evict` / `retain` (a loaded cache is always compacted: `evict`).
    pub kv_type: String,
    /// Kept / total context pairs.
    pub ratio_real: f64,
    /// Context KV bytes (full, kept).
    pub kv_bytes: (usize, usize),
    /// Prefill and scoring times.
    pub timings: kvzip_models::engine::kvzip::ContextTimings,
    /// Pruning time, ms.
    pub prune_ms: f64,
    /// Generation time per query, ms.
    pub gen_ms: Vec<f64>,
    /// Wall time of the whole run, ms.
    pub total_ms: f64,
}

impl RunSummary<'_> {
    /// Prints the `--json` object, or a one-line summary on stderr.
    pub fn print(self, args: &RunArgs) -> Result<()> {
        let (kv_full, kv_kept) = self.kv_bytes;
        if !args.json {
            eprintln!(
                "[{}] ratio {:.3} (requested {}), context KV {kv_full} -> {kv_kept} bytes; prefill {:.0} ms, scoring {:.0} ms",
                self.device, self.ratio_real, self.ratio_requested, self.timings.prefill_ms, self.timings.scoring_ms
            );
            return Ok(());
        }
        print_json(&json!({
            "model": self.model.name,
            "model_dir": self.model.dir.display().to_string(),
            "device": self.device,
            "answers": self.answers,
            "n_sys": self.n_sys,
            "n_ctx": self.n_ctx,
            "ratio_requested": self.ratio_requested,
            "ratio_real": self.ratio_real,
            "level": self.level,
            "kv_type": self.kv_type,
            "kv_bytes_full": kv_full,
            "kv_bytes_kept": kv_kept,
            "peak_rss_bytes": peak_rss_bytes(),
            "timings_ms": {
                "prefill": self.timings.prefill_ms,
                "scoring": self.timings.scoring_ms,
                "prune": self.prune_ms,
                "generate": self.gen_ms,
                "total": self.total_ms,
            },
        }))
    }
}

/// `kvzip run`: the same flow on every device.
pub fn run(args: &RunArgs) -> Result<()> {
    if let Some(i) = args.queries.iter().position(|q| q.trim().is_empty()) {
        bail!("--query number {} is empty; ask a question", i + 1);
    }
    let model = load_model(&args.model)?;
    let query_task = args.task.as_deref().map(parse_task).transpose()?;
    let task = query_task.unwrap_or(Task::Qa);
    let kv_type = parse_kv_type(&args.kv_type)?;
    let prompt = model.prompt_ids(task)?;
    let t_all = Instant::now();

    let mut ratio_requested = args.ratio;
    let mut level = args.level.to_string();
    let mut kv_type_name = args.kv_type.clone();
    let (mut ctx, ratio_real, kv_full, kv_kept, prune_ms) = if let Some(path) = &args.load_cache {
        let (ctx, meta) = load_saved(&model, path, &prompt)?;
        ratio_requested = meta.ratio_requested.unwrap_or(1.0);
        level = meta.level.clone().unwrap_or_else(|| "pair".into());
        kv_type_name = "evict".into();
        let kept = ctx.kv_bytes_context();
        let full = meta
            .extra
            .get("kv_bytes_full")
            .and_then(|s| s.parse().ok())
            .unwrap_or(kept);
        (ctx, meta.ratio_real.unwrap_or(1.0), full, kept, 0.0)
    } else {
        let Some(path) = &args.context else {
            bail!("give --context FILE (or --load-cache FILE)");
        };
        let text = read_text(path)?;
        if text.trim().is_empty() {
            bail!(
                "{}: the context is empty (only whitespace); give a file with text",
                path.display()
            );
        }
        let context_ids = model.tokenizer.encode(&text)?;
        let scoring = if !args.head_scores.is_empty() {
            Scoring::HeadScores(model.load_head_scores(&args.head_scores)?)
        } else if args.ratio < 1.0 {
            Scoring::Reconstruct { chunk: args.chunk }
        } else {
            Scoring::None
        };
        let mut ctx = model.prefill_context(&prompt, &context_ids, &scoring, kv_type, args.json)?;
        let t0 = Instant::now();
        let full = ctx.kv_bytes_context();
        let (ratio_real, kept) = if args.ratio < 1.0 {
            let report = ctx.prune(args.ratio, args.level)?;
            (report.ratio_real, report.kv_bytes_kept)
        } else {
            (1.0, full)
        };
        model.engine.device().synchronize()?;
        (
            ctx,
            ratio_real,
            full,
            kept,
            t0.elapsed().as_secs_f64() * 1e3,
        )
    };

    if let Some(path) = &args.save_cache {
        let mut meta = CacheFileMeta {
            model_id: model.model_id.clone(),
            ratio_requested: Some(args.ratio),
            ratio_real: Some(ratio_real),
            level: Some(args.level.to_string()),
            token_ids: ctx.prefill_ids.clone(),
            extra: Default::default(),
        };
        meta.extra
            .insert("kv_bytes_full".into(), kv_full.to_string());
        meta.extra.insert(
            "task".into(),
            args.task.clone().unwrap_or_else(|| "qa".into()),
        );
        ctx.cache
            .save(path, &meta)
            .with_context(|| format!("saving the cache to {}", path.display()))?;
    }

    let mut answers = Vec::new();
    let mut gen_ms = Vec::new();
    for q in &args.queries {
        let (answer, n_tokens, ms, query_ids) =
            answer_query(&model, &prompt, &mut ctx, query_task, q, &args.sampling)?;
        if !args.json {
            println!("Q: {q}\nA: {answer}\n");
        }
        gen_ms.push(ms);
        answers.push(
            json!({"query": q, "answer": answer, "tokens": n_tokens, "query_ids": query_ids}),
        );
    }
    RunSummary {
        device: model.device_kind(),
        model: &model,
        answers,
        n_sys: ctx.n_sys,
        n_ctx: ctx.n_ctx,
        ratio_requested,
        level,
        kv_type: kv_type_name,
        ratio_real,
        kv_bytes: (kv_full, kv_kept),
        timings: ctx.timings,
        prune_ms,
        gen_ms,
        total_ms: t_all.elapsed().as_secs_f64() * 1e3,
    }
    .print(args)?;
    Ok(())
}
