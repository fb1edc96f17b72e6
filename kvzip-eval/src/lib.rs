//! Evaluation harness of kvzip-rs (KVZIP-SPEC §6): datasets and query formats, task metrics,
//! a resumable ratio sweep that scores KVzip and the baselines from one prefill per example,
//! summaries (score x100 vs KV ratio per method), markdown reports and score-vs-ratio plots.
//!
//! Layout of a results directory (`kvzip eval --out DIR`):
//! * `DIR/config.json`: the run's settings ([`results::RunConfig`]); a rerun must match it.
//! * `DIR/examples/NNNNN.json`: one [`results::ExampleResult`] per finished example (written
//!   atomically; present files are skipped on a rerun, which is how a run resumes).
//! * `DIR/head-scores.safetensors`: head scores used by `kvzip-head` (computed once).
//! * `DIR/summary.json`: the [`summary::Summary`] of the finished examples.

pub mod datasets;
pub mod download;
pub mod generated;
pub mod methods;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod results;
pub mod runner;
pub mod summary;

use std::path::PathBuf;

/// Errors of the evaluation harness; every variant names the file, field or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A data or results file has the wrong content.
    #[error("{}{}: {problem}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number for line-oriented files.
        line: Option<usize>,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// A bad option value (unknown dataset or method, ratio outside (0, 1], ...).
    #[error("{0}")]
    Input(String),
    /// A model / engine error.
    #[error(transparent)]
    Model(#[from] kvzip_models::ModelError),
    /// A tokenizer or template error.
    #[error(transparent)]
    Template(#[from] kvzip_templates::TemplateError),
    /// A scoring / selection error.
    #[error(transparent)]
    Score(#[from] kvzip_score::ScoreError),
    /// Drawing a plot failed.
    #[error("plot {}: {problem}", path.display())]
    Plot {
        /// The plot file.
        path: PathBuf,
        /// The drawing error.
        problem: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;

/// Wraps an I/O error with its path.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EvalError {
    let path = path.into();
    move |source| EvalError::Io { path, source }
}
