//! `kvzip eval`: the KVzip evaluation sweep (KVZIP-SPEC §6) over a dataset: one prefill and
//! scoring per example, full-cache answers, then every method at every ratio in retain mode.
//! Results go to `--out` (one JSON per example, resumable) and a summary.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kvzip_eval::datasets::{self, DataOptions, DatasetName, TokenCount};
use kvzip_eval::methods::{parse_methods, parse_ratios, Method};
use kvzip_eval::results::{prepare_out_dir, write_json_atomic, RunConfig};
use kvzip_eval::runner::{run_all, ModelEvaluator, RunEvent};
use kvzip_eval::summary::summarize;
use kvzip_eval::{generated, EvalError};
use kvzip_models::engine::kvzip::{KvType, Scoring, DEFAULT_SCORING_CHUNK};
use kvzip_models::engine::GenerateOptions;
use kvzip_score::HeadScores;
use kvzip_templates::{Task, Tokenizer};

use crate::common::{load_model, print_json, LoadedModel, ModelArgs};

/// Arguments of `kvzip eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset: squad, gsm8k, needle, needle-multikey, kv-retrieval, passkey.
    #[arg(long)]
    pub data: String,
    /// Data file (squad JSON, gsm8k JSONL) or essay folder (needle tasks); default under
    /// --data-dir.
    #[arg(long)]
    pub data_file: Option<PathBuf>,
    /// Data folder with squad-v1.1/, gsm8k/, pg-essays/ (default: $KVZIP_DATA, else
    /// $KVZIP_HOME/data, downloading the official files there with pinned checksums on first use).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Number of examples (contexts).
    #[arg(long, default_value_t = 100)]
    pub num: usize,
    /// Keep ratios; 1.0 (the full cache) is always evaluated.
    #[arg(long, default_value = "0.1,0.2,0.3,0.5,0.7,1.0")]
    pub ratios: String,
    /// Methods: kvzip, kvzip-head, snapkv, pyramidkv, h2o, streaming.
    #[arg(
        long,
        default_value = "kvzip,kvzip-plus,kvzip-head,snapkv,pyramidkv,h2o,streaming,tova,knorm,keydiff,expected-attention"
    )]
    pub methods: String,
    /// Results folder (default results/<model>/<data>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Context lengths in tokens for needle / generated tasks (comma separated).
    #[arg(long, default_value = "500,2000,8000")]
    pub context_tokens: String,
    /// Needle depths in percent (comma separated).
    #[arg(long, default_value = "0,10,20,30,40,50,60,70,80,90,100")]
    pub depths: String,
    /// Questions (keys) per context for needle-multikey and kv-retrieval.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// At most this many questions per context (default: all).
    #[arg(long)]
    pub max_questions: Option<usize>,
    /// Seed of the generated tasks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override the task's max new tokens (KVZIP-SPEC §6.2 values by default).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Reconstruction chunk size in context tokens.
    #[arg(long, default_value_t = DEFAULT_SCORING_CHUNK)]
    pub chunk: usize,
    /// Head-score files for kvzip-head (default: computed once from a held-out essay sample and
    /// cached as <out>/head-scores.safetensors).
    #[arg(long)]
    pub head_scores: Vec<PathBuf>,
    /// Tokens of the held-out essay sample used to compute head scores.
    #[arg(long, default_value_t = 2000)]
    pub head_sample_tokens: usize,
    /// Print the summary as one JSON object: {method: [{"ratio", "score"}, ...]}.
    #[arg(long)]
    pub json: bool,
}

/// Token counts with the model's tokenizer.
struct TokCount<'a>(&'a Tokenizer);

impl TokenCount for TokCount<'_> {
    fn count(&self, text: &str) -> kvzip_eval::Result<usize> {
        Ok(self.0.encode(text)?.len())
    }
}

fn parse_list(flag: &str, list: &str) -> Result<Vec<usize>> {
    list.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse()
                .with_context(|| format!("{flag}: {p:?} is not a whole number"))
        })
        .collect()
}

/// Head scores for kvzip-head: the given files, else `<out>/head-scores.safetensors`, else
/// computed from a held-out essay sample and saved there.
fn head_scores(
    args: &EvalArgs,
    model: &LoadedModel,
    out: &std::path::Path,
    data_dir: Option<PathBuf>,
) -> Result<HeadScores> {
    if !args.head_scores.is_empty() {
        return model.load_head_scores(&args.head_scores);
    }
    let path = out.join("head-scores.safetensors");
    if path.exists() {
        // A cached file of other weights (or an older identity scheme) is recomputed.
        let hs = HeadScores::load(&path)?;
        if hs.model == model.model_id {
            return Ok(hs);
        }
    }
    let opts = DataOptions {
        data_dir,
        ..DataOptions::default()
    };
    let dir = generated::essay_dir(&opts).context(
        "kvzip-head needs head scores: pass --head-scores FILE or make the essays available",
    )?;
    let text =
        generated::head_sample_text(&dir, args.head_sample_tokens, &TokCount(&model.tokenizer))?;
    let ids = model.tokenizer.encode(&text)?;
    eprintln!(
        "computing head scores from a held-out essay sample ({} tokens)",
        ids.len()
    );
    let prompt = model.prompt_ids(Task::Qa)?;
    let ctx = model.prefill_context(
        &prompt,
        &ids,
        &Scoring::Reconstruct { chunk: args.chunk },
        KvType::Evict,
        false,
    )?;
    let scores = ctx.scores().context("reconstruction produced no scores")?;
    let hs = HeadScores::from_context_scores(
        scores,
        &model.model_id,
        format!("held-out essays {} ({} tokens)", dir.display(), ids.len()),
    )?;
    hs.save(&path)?;
    Ok(hs)
}

/// `kvzip eval`.
pub fn eval(args: &EvalArgs) -> Result<()> {
    let data: DatasetName = args.data.parse()?;
    let methods = parse_methods(&args.methods)?;
    let ratios = parse_ratios(&args.ratios)?;
    let model = load_model(&args.model)?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("results")
            .join(&model.name)
            .join(data.as_str())
    });
    let opts = DataOptions {
        data_file: args.data_file.clone(),
        data_dir: args.data_dir.clone(),
        num: args.num,
        context_tokens: parse_list("--context-tokens", &args.context_tokens)?,
        depths: parse_list("--depths", &args.depths)?,
        keys: args.keys as usize,
        max_questions: args.max_questions,
        seed: args.seed,
    };
    let examples = datasets::load(data, &opts, &TokCount(&model.tokenizer))?;
    if examples.is_empty() {
        return Err(
            EvalError::Input(format!("{data}: no examples loaded; check --data-file")).into(),
        );
    }
    let max_new_tokens = args.max_new_tokens.unwrap_or(data.max_new_tokens());
    let config = RunConfig {
        model: model.name.clone(),
        data: data.as_str().to_owned(),
        methods: methods.iter().map(|m| m.as_str().to_owned()).collect(),
        ratios: ratios.clone(),
        metric: data.metric(),
        max_new_tokens,
        data_options: serde_json::json!({
            "num": examples.len(),
            "context_tokens": if matches!(data, DatasetName::Squad | DatasetName::Gsm8k) { serde_json::Value::Null } else { serde_json::json!(opts.context_tokens) },
            "depths": if data == DatasetName::Needle { serde_json::json!(opts.depths) } else { serde_json::Value::Null },
            "keys": opts.keys,
            "max_questions": opts.max_questions,
            "seed": opts.seed,
            "chunk": args.chunk,
        }),
    };
    prepare_out_dir(&out, &config)?;
    let head = if methods.contains(&Method::KvzipHead) {
        let dir = match &opts.data_dir {
            Some(d) => Some(d.clone()),
            None => Some(kvzip_eval::download::data_root(DatasetName::Needle)?),
        };
        Some(head_scores(args, &model, &out, dir)?)
    } else {
        None
    };

    let prompt = model.prompt_ids(data.task())?;
    let generate = GenerateOptions {
        max_new_tokens,
        ..GenerateOptions::greedy(model.engine.spec(), max_new_tokens)
    };
    let generate = GenerateOptions {
        stop_tokens: model.stop_tokens(),
        ..generate
    };
    let pb = ProgressBar::new(examples.len() as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>6} [{bar:30}] {pos}/{len} elapsed {elapsed} eta {eta} | {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix("eval");
    let stage_pb = pb.clone();
    let mut evaluator = ModelEvaluator::new(
        &model.engine,
        &model.tokenizer,
        prompt,
        data.task(),
        methods,
        ratios,
        generate,
    );
    evaluator.chunk = args.chunk;
    evaluator.head_scores = head;
    evaluator.on_stage = Box::new(move |stage, done, total| {
        stage_pb.set_message(format!("{stage} {done}/{total}"));
    });
    // indicatif draws nothing (println included) when stderr is not a terminal: log lines then.
    let log = |pb: &ProgressBar, line: String| {
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
    };
    let t0 = Instant::now();
    let mut last = Instant::now();
    let results = run_all(&out, &examples, &mut evaluator, &mut |ev| match ev {
        RunEvent::Skipped(n) => {
            if n > 0 {
                pb.println(format!(
                    "resuming: {n} example(s) already in {}",
                    out.display()
                ));
                pb.set_position(n as u64);
                pb.reset_eta();
            }
        }
        RunEvent::Done(i) => {
            pb.inc(1);
            log(
                &pb,
                format!(
                    "example {i} ({}) done in {:.1} s; {} of {} finished",
                    examples[i].id,
                    last.elapsed().as_secs_f64(),
                    pb.position(),
                    examples.len()
                ),
            );
            last = Instant::now();
        }
    })?;
    pb.finish_and_clear();
    let summary = summarize(&config, &results);
    write_json_atomic(&out.join("summary.json"), &summary)?;
    if args.json {
        print_json(&summary.methods_json())?;
    } else {
        println!(
            "{} on {}: {} examples, {} queries, {:.0} s -> {}",
            summary.model,
            summary.data,
            summary.n_examples,
            summary.n_queries,
            t0.elapsed().as_secs_f64(),
            out.display()
        );
        println!("{}", kvzip_eval::report::markdown_table(&summary));
    }
    Ok(())
}
