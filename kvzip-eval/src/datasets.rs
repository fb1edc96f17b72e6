//! Datasets (KVZIP-SPEC §6.1): every example is one context with one or more questions and
//! their gold answers. File-backed: `squad` (SQuAD v1.1 JSON), `gsm8k` (JSONL); built from the
//! Paul Graham essays: `needle`; generated (see [`crate::generated`]): `needle-multikey`,
//! `kv-retrieval`, `passkey`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use kvzip_templates::Task;
use serde::{Deserialize, Serialize};

use crate::metrics::{gsm_gold, Metric};
use crate::{generated, io_err, EvalError, Result};

/// One evaluation example: a context and its questions (`answers[i]` is the gold of
/// `questions[i]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Stable identifier (e.g. `squad-12`, `needle-2000-50`), checked on resume.
    pub id: String,
    /// The context text that is prefilled and compressed.
    pub context: String,
    /// The questions asked about the context.
    pub questions: Vec<String>,
    /// Gold answer per question.
    pub answers: Vec<String>,
}

/// The datasets `kvzip eval --data` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DatasetName {
    /// SQuAD v1.1 (contexts grouped with all their questions).
    Squad,
    /// GSM8K test: context = all sentences but the last, question = the last.
    Gsm8k,
    /// Needle in a haystack of Paul Graham essays, lengths x depths.
    Needle,
    /// Several key -> number needles in the essays; one question per key.
    NeedleMultikey,
    /// SCBench-kv style: a JSON object of UUID pairs; questions ask for values of keys.
    KvRetrieval,
    /// Passkey retrieval in repeated filler text.
    Passkey,
}

/// Every dataset name, for error messages.
pub const DATASET_NAMES: &str = "squad, gsm8k, needle, needle-multikey, kv-retrieval, passkey";

impl DatasetName {
    /// The canonical CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::Squad => "squad",
            DatasetName::Gsm8k => "gsm8k",
            DatasetName::Needle => "needle",
            DatasetName::NeedleMultikey => "needle-multikey",
            DatasetName::KvRetrieval => "kv-retrieval",
            DatasetName::Passkey => "passkey",
        }
    }

    /// The prompt task (system-prompt line and query format, KVZIP-SPEC §6.2).
    pub fn task(self) -> Task {
        Task::from_dataset_name(self.as_str())
    }

    /// Max new tokens per answer (KVZIP-SPEC §6.2, `set_gen_length`): needle tasks 32, squad 256,
    /// gsm 512, everything else 96.
    pub fn max_new_tokens(self) -> usize {
        let name = self.as_str();
        if name.contains("needle") {
            32
        } else if name.contains("squad") {
            256
        } else if name.starts_with("gsm") {
            512
        } else {
            96
        }
    }

    /// The task metric (KVZIP-SPEC §6.4): gsm for GSM8K, include for the others.
    pub fn metric(self) -> Metric {
        match self {
            DatasetName::Gsm8k => Metric::Gsm,
            _ => Metric::Include,
        }
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetName {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "squad" => DatasetName::Squad,
            "gsm8k" | "gsm" => DatasetName::Gsm8k,
            "needle" => DatasetName::Needle,
            "needle-multikey" | "multikey-needle" | "multikey" => DatasetName::NeedleMultikey,
            "kv-retrieval" | "kv" | "scbench_kv" => DatasetName::KvRetrieval,
            "passkey" => DatasetName::Passkey,
            other => {
                return Err(EvalError::Input(format!(
                    "unknown dataset {other:?} for --data: use one of {DATASET_NAMES}"
                )))
            }
        })
    }
}

/// Token counter used to size generated contexts (the model's tokenizer in real runs).
pub trait TokenCount {
    /// Number of tokens of `text` (no special tokens).
    fn count(&self, text: &str) -> Result<usize>;
}

/// Counts whitespace-separated words; a stand-in tokenizer for tests.
pub struct WordCount;

impl TokenCount for WordCount {
    fn count(&self, text: &str) -> Result<usize> {
        Ok(text.split_whitespace().count())
    }
}

/// Where and how much data to load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataOptions {
    /// The data file (squad JSON, gsm8k JSONL) or essay folder (needle tasks); `None` = the
    /// default under `data_dir`.
    pub data_file: Option<PathBuf>,
    /// The shared data folder (holds `squad-v1.1/`, `gsm8k/`, `pg-essays/`).
    pub data_dir: Option<PathBuf>,
    /// Number of examples (contexts) to load.
    pub num: usize,
    /// Context lengths in tokens for the needle and generated tasks.
    pub context_tokens: Vec<usize>,
    /// Needle depths in percent (needle task).
    pub depths: Vec<usize>,
    /// Questions (keys) per context for `needle-multikey` and `kv-retrieval`.
    pub keys: usize,
    /// At most this many questions per context (`None` = all).
    pub max_questions: Option<usize>,
    /// Seed of the generated tasks.
    pub seed: u64,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            data_file: None,
            data_dir: None,
            num: 100,
            context_tokens: vec![500, 2000, 8000],
            depths: (0..=100).step_by(10).collect(),
            keys: 4,
            max_questions: None,
            seed: 0,
        }
    }
}

impl DataOptions {
    /// The file to read: `data_file`, else `data_dir/rel`; errors name `--data-file`.
    fn resolve(&self, name: DatasetName, rel: &str, what: &str) -> Result<PathBuf> {
        let path = match (&self.data_file, &self.data_dir) {
            (Some(f), _) => f.clone(),
            (None, Some(d)) => d.join(rel),
            (None, None) => crate::download::data_root(name)?.join(rel),
        };
        if !path.exists() {
            return Err(EvalError::Input(format!(
                "{}: not found; pass --data-file PATH to {what}",
                path.display()
            )));
        }
        Ok(path)
    }
}

/// Loads `num` examples of dataset `name`. `counter` sizes generated contexts and filters
/// short GSM8K contexts.
pub fn load(
    name: DatasetName,
    opts: &DataOptions,
    counter: &dyn TokenCount,
) -> Result<Vec<Example>> {
    if opts.num == 0 {
        return Err(EvalError::Input("--num must be at least 1".into()));
    }
    let mut examples = match name {
        DatasetName::Squad => {
            let path = opts.resolve(
                name,
                "squad-v1.1/dev-v1.1.json",
                "the SQuAD v1.1 JSON (data[].paragraphs[].{context,qas})",
            )?;
            load_squad(&path, opts.num)?
        }
        DatasetName::Gsm8k => {
            let path = opts.resolve(
                name,
                "gsm8k/test.jsonl",
                "the GSM8K JSONL (one {\"question\",\"answer\"} per line)",
            )?;
            load_gsm8k(&path, opts.num, counter)?
        }
        DatasetName::Needle
        | DatasetName::NeedleMultikey
        | DatasetName::KvRetrieval
        | DatasetName::Passkey => {
            if opts.context_tokens.is_empty() || opts.context_tokens.contains(&0) {
                return Err(EvalError::Input(
                    "--context-tokens needs positive lengths, e.g. 500,2000".into(),
                ));
            }
            generated::load_generated(name, opts, counter)?
        }
    };
    if let Some(q) = opts.max_questions {
        for ex in &mut examples {
            ex.questions.truncate(q.max(1));
            ex.answers.truncate(q.max(1));
        }
    }
    Ok(examples)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

fn parse_err(path: &Path, line: Option<usize>, problem: impl Into<String>) -> EvalError {
    EvalError::Parse {
        path: path.to_owned(),
        line,
        problem: problem.into(),
    }
}

/// SQuAD v1.1: each paragraph is one example (contexts in file order, first `num`), with every
/// question and the first gold answer text of each.
pub fn load_squad(path: &Path, num: usize) -> Result<Vec<Example>> {
    let json: serde_json::Value = serde_json::from_str(&read(path)?).map_err(|e| {
        parse_err(
            path,
            None,
            format!("not valid JSON ({e}); expected SQuAD v1.1 JSON"),
        )
    })?;
    let articles = json.get("data").and_then(|d| d.as_array()).ok_or_else(|| {
        parse_err(
            path,
            None,
            "missing array field \"data\" (SQuAD v1.1 format expected)",
        )
    })?;
    let mut out = Vec::new();
    for (a, article) in articles.iter().enumerate() {
        let paragraphs = article
            .get("paragraphs")
            .and_then(|p| p.as_array())
            .ok_or_else(|| {
                parse_err(path, None, format!("data[{a}] has no \"paragraphs\" array"))
            })?;
        for (p, para) in paragraphs.iter().enumerate() {
            if out.len() == num {
                return Ok(out);
            }
            let field = format!("data[{a}].paragraphs[{p}]");
            let context = para
                .get("context")
                .and_then(|c| c.as_str())
                .ok_or_else(|| parse_err(path, None, format!("{field}.context missing")))?;
            let qas = para
                .get("qas")
                .and_then(|q| q.as_array())
                .ok_or_else(|| parse_err(path, None, format!("{field}.qas missing")))?;
            let mut questions = Vec::new();
            let mut answers = Vec::new();
            for (i, qa) in qas.iter().enumerate() {
                let q = qa.get("question").and_then(|q| q.as_str());
                let a = qa
                    .get("answers")
                    .and_then(|a| a.as_array())
                    .and_then(|a| a.first())
                    .and_then(|a| a.get("text"))
                    .and_then(|t| t.as_str());
                match (q, a) {
                    (Some(q), Some(a)) => {
                        questions.push(q.to_owned());
                        answers.push(a.to_owned());
                    }
                    _ => {
                        return Err(parse_err(
                            path,
                            None,
                            format!("{field}.qas[{i}] needs \"question\" and answers[0].text"),
                        ))
                    }
                }
            }
            if !questions.is_empty() {
                out.push(Example {
                    id: format!("squad-{}", out.len()),
                    context: context.to_owned(),
                    questions,
                    answers,
                });
            }
        }
    }
    Ok(out)
}

/// Contexts shorter than this many tokens are skipped (KVZIP-SPEC §6.1).
pub const GSM_MIN_CONTEXT_TOKENS: usize = 72;

/// GSM8K JSONL: the problem is split on `". "`; context = all sentences but the last (joined
/// back, ending with "."), question = the last sentence; gold = text after `#### `. Problems
/// whose context has fewer than [`GSM_MIN_CONTEXT_TOKENS`] tokens are skipped.
pub fn load_gsm8k(path: &Path, num: usize, counter: &dyn TokenCount) -> Result<Vec<Example>> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if out.len() == num {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            parse_err(
                path,
                Some(i + 1),
                format!("malformed JSON ({e}); each line must be {{\"question\": ..., \"answer\": ...}}"),
            )
        })?;
        let field = |name: &str| {
            v.get(name).and_then(|x| x.as_str()).ok_or_else(|| {
                parse_err(path, Some(i + 1), format!("missing string field {name:?}"))
            })
        };
        let (problem, solution) = (field("question")?, field("answer")?);
        if !solution.contains("####") {
            return Err(parse_err(
                path,
                Some(i + 1),
                "field \"answer\" has no \"#### <number>\" final answer",
            ));
        }
        let Some((context, question)) = split_gsm_problem(problem) else {
            continue;
        };
        if counter.count(&context)? < GSM_MIN_CONTEXT_TOKENS {
            continue;
        }
        out.push(Example {
            id: format!("gsm8k-{i}"),
            context,
            questions: vec![question],
            answers: vec![gsm_gold(solution).to_owned()],
        });
    }
    Ok(out)
}

/// Splits a GSM8K problem on `". "` into (context, question); `None` for a single sentence.
pub fn split_gsm_problem(problem: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = problem.trim().split(". ").collect();
    let (last, rest) = parts.split_last()?;
    if rest.is_empty() {
        return None;
    }
    Some((format!("{}.", rest.join(". ")), (*last).to_owned()))
}
