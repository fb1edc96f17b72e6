//! The ratio sweep. [`run_all`] walks the examples, skips those already finished in the
//! results folder (resume), evaluates the rest and writes each result atomically.
//! [`ModelEvaluator`] is the real evaluator: one prefill + scoring per example (every method's
//! scores from that single prefill), full-cache answers, then for every method and ratio a
//! retain-mode view (prune, answer all questions, unprune).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use kvzip_models::batch::BatchRequest;
use kvzip_models::engine::kvzip::{KvType, DEFAULT_SCORING_CHUNK};
use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_score::HeadScores;
use kvzip_templates::{format_query, PromptIds, Task, Tokenizer};

use crate::datasets::Example;
use crate::methods::{Method, ScoreSource};
use crate::results::{
    example_path, read_json, write_json_atomic, ExampleResult, QueryRecord, RatioRecord,
};
use crate::{EvalError, Result};

/// Requests decoding together in an example's batched generation.
const GENERATE_BATCH: usize = 64;

/// Evaluates one example (the model-backed one is [`ModelEvaluator`]).
pub trait ExampleEvaluator {
    /// Runs every method and ratio on `example` (position `index` in the dataset).
    fn evaluate(&mut self, index: usize, example: &Example) -> Result<ExampleResult>;
}

/// What [`run_all`] reports after each example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEvent {
    /// Examples already finished on disk, skipped.
    Skipped(usize),
    /// Example `index` was evaluated and written.
    Done(usize),
}

/// Evaluates every example of `examples` not yet finished in `out`; returns all results
/// (old and new) in dataset order. A finished file whose id differs from the dataset's example
/// is an error (the dataset settings changed; use another `--out`).
pub fn run_all(
    out: &Path,
    examples: &[Example],
    evaluator: &mut dyn ExampleEvaluator,
    on_event: &mut dyn FnMut(RunEvent),
) -> Result<Vec<ExampleResult>> {
    let mut results = Vec::with_capacity(examples.len());
    let mut pending = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        let path = example_path(out, i);
        if path.exists() {
            let done: ExampleResult = read_json(&path)?;
            if done.id != ex.id {
                return Err(EvalError::Input(format!(
                    "{} holds example {:?} but the dataset's example {i} is {:?}: the data \
                     settings changed; pass another --out",
                    path.display(),
                    done.id,
                    ex.id
                )));
            }
            results.push(done);
        } else {
            pending.push(i);
        }
    }
    on_event(RunEvent::Skipped(results.len()));
    for i in pending {
        let result = evaluator.evaluate(i, &examples[i])?;
        write_json_atomic(&example_path(out, i), &result)?;
        results.push(result);
        on_event(RunEvent::Done(i));
    }
    results.sort_by_key(|r| r.index);
    Ok(results)
}

/// Progress of one example inside [`ModelEvaluator`]: `(stage, done, total)`, stages
/// `prefill`, `score`, `full`, and `<method> <ratio>`.
pub type StageCallback<'a> = dyn FnMut(&str, usize, usize) + 'a;

/// Evaluates examples with a loaded model.
pub struct ModelEvaluator<'a> {
    /// The engine.
    pub engine: &'a Engine,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// KVzip prompt ids for `task`.
    pub prompt: PromptIds,
    /// Query format.
    pub task: Task,
    /// Methods to evaluate.
    pub methods: Vec<Method>,
    /// Pruned ratios (descending, each in (0, 1)).
    pub ratios: Vec<f64>,
    /// Head scores for `kvzip-head`.
    pub head_scores: Option<HeadScores>,
    /// Greedy generation settings (max new tokens, stop ids).
    pub generate: GenerateOptions,
    /// Reconstruction chunk (context tokens).
    pub chunk: usize,
    /// Stage progress.
    pub on_stage: Box<StageCallback<'a>>,
}

impl<'a> ModelEvaluator<'a> {
    /// An evaluator with the default scoring chunk and a silent stage callback.
    pub fn new(
        engine: &'a Engine,
        tokenizer: &'a Tokenizer,
        prompt: PromptIds,
        task: Task,
        methods: Vec<Method>,
        ratios: Vec<f64>,
        generate: GenerateOptions,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            prompt,
            task,
            methods,
            ratios,
            head_scores: None,
            generate,
            chunk: DEFAULT_SCORING_CHUNK,
            on_stage: Box::new(|_, _, _| {}),
        }
    }
}

impl ExampleEvaluator for ModelEvaluator<'_> {
    fn evaluate(&mut self, index: usize, example: &Example) -> Result<ExampleResult> {
        let context_ids = self.tokenizer.encode(&example.context)?;
        let queries: Vec<Vec<u32>> = example
            .questions
            .iter()
            .map(|q| {
                self.prompt
                    .query_input_ids(self.tokenizer, &format_query(self.task, q))
            })
            .collect::<std::result::Result<_, _>>()?;
        // One scoring per distinct score source, all from one prefill.
        let mut sources: Vec<ScoreSource> = Vec::new();
        for m in &self.methods {
            if !sources.contains(&m.source()) {
                sources.push(m.source());
            }
        }
        let scorings = sources
            .iter()
            .map(|s| s.scoring(self.chunk, self.head_scores.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let on_stage = &mut self.on_stage;
        let (ctx, scores) = self.engine.prefill_context_multi(
            &self.prompt,
            &context_ids,
            &scorings,
            KvType::Retain,
            &mut |stage, done, total| on_stage(stage, done, total),
        )?;
        // Every (method, ratio) as its own compacted copy of the full cache, then all of them
        // (and the full cache) answer every question in one continuously batched generation:
        // per request the same greedy answer as answering alone, at a fraction of the time.
        let mut views = Vec::new();
        for m in &self.methods {
            let src = sources.iter().position(|s| *s == m.source()).unwrap_or(0);
            for &ratio in &self.ratios {
                let selection = m.select(&scores[src], ratio)?;
                let view = ctx
                    .cache
                    .compacted_view(&selection.mask)
                    .map_err(kvzip_models::ModelError::from)?;
                views.push((*m, ratio, selection.ratio_real, view));
            }
        }
        let caches: Vec<&kvzip_models::KvCache> = std::iter::once(&ctx.cache)
            .chain(views.iter().map(|v| &v.3))
            .collect();
        let requests: Vec<BatchRequest<'_>> = caches
            .iter()
            .flat_map(|c| {
                queries.iter().map(move |q| BatchRequest {
                    context: c,
                    prompt: q,
                })
            })
            .collect();
        let t0 = Instant::now();
        let on_stage = &mut self.on_stage;
        let gens = self.engine.generate_batch(
            &requests,
            &self.generate,
            GENERATE_BATCH,
            &mut |done, total| on_stage("generate", done, total),
        )?;
        let gen_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut texts = gens
            .iter()
            .map(|g| Ok(self.tokenizer.decode(&g.tokens, true)?.trim().to_owned()))
            .collect::<Result<Vec<String>>>()?
            .into_iter();
        let nq = queries.len();
        let full: Vec<String> = texts.by_ref().take(nq).collect();
        let mut methods: BTreeMap<String, Vec<RatioRecord>> = BTreeMap::new();
        for (m, ratio, ratio_real, _) in &views {
            methods
                .entry(m.as_str().to_owned())
                .or_default()
                .push(RatioRecord {
                    ratio: *ratio,
                    ratio_real: *ratio_real,
                    answers: texts.by_ref().take(nq).collect(),
                });
        }
        let timings_ms = BTreeMap::from([
            ("prefill".to_owned(), ctx.timings.prefill_ms),
            ("scoring".to_owned(), ctx.timings.scoring_ms),
            ("generate".to_owned(), gen_ms),
        ]);
        Ok(ExampleResult {
            id: example.id.clone(),
            index,
            n_sys: ctx.n_sys,
            n_ctx: ctx.n_ctx,
            queries: example
                .questions
                .iter()
                .zip(&example.answers)
                .zip(full)
                .map(|((q, g), f)| QueryRecord {
                    question: q.clone(),
                    gold: g.clone(),
                    full: f,
                })
                .collect(),
            methods,
            timings_ms,
        })
    }
}
