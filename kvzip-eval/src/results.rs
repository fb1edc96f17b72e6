//! Results on disk: the run configuration, one JSON file per finished example (written
//! atomically: temp file in the same folder, then rename) and resume support.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::metrics::Metric;
use crate::{io_err, EvalError, Result};

/// Settings of a run, stored as `config.json`; a rerun into the same folder must agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Model name.
    pub model: String,
    /// Dataset name.
    pub data: String,
    /// Methods evaluated (CLI names).
    pub methods: Vec<String>,
    /// Pruned ratios evaluated (the full cache, ratio 1.0, is always evaluated too).
    pub ratios: Vec<f64>,
    /// Task metric.
    pub metric: Metric,
    /// Max new tokens per answer.
    pub max_new_tokens: usize,
    /// Dataset settings (lengths, depths, seed, ...), for the record.
    #[serde(default)]
    pub data_options: serde_json::Value,
}

impl RunConfig {
    /// Whether `other` asks for the same work (model, data, methods, ratios, metric, length,
    /// data settings); the example count `num` may differ, so a run can be extended.
    pub fn same_work(&self, other: &RunConfig) -> bool {
        let without_num = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("num");
            }
            v
        };
        self.model == other.model
            && self.data == other.data
            && self.methods == other.methods
            && self.ratios == other.ratios
            && self.metric == other.metric
            && self.max_new_tokens == other.max_new_tokens
            && without_num(&self.data_options) == without_num(&other.data_options)
    }
}

/// One question of an example: gold and the full-cache answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRecord {
    /// The question text (before query formatting).
    pub question: String,
    /// Gold answer.
    pub gold: String,
    /// Answer from the unpruned cache (ratio 1.0).
    pub full: String,
}

/// Answers of one method at one ratio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatioRecord {
    /// Requested keep ratio.
    pub ratio: f64,
    /// Kept / total context pairs actually selected.
    pub ratio_real: f64,
    /// One answer per question, in question order.
    pub answers: Vec<String>,
}

/// Everything recorded for one example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleResult {
    /// Example id (checked against the dataset on resume).
    pub id: String,
    /// Position in the dataset.
    pub index: usize,
    /// System-prompt tokens.
    pub n_sys: usize,
    /// Context tokens.
    pub n_ctx: usize,
    /// Questions, golds and full-cache answers.
    pub queries: Vec<QueryRecord>,
    /// Per method: answers at each pruned ratio (descending ratio).
    pub methods: BTreeMap<String, Vec<RatioRecord>>,
    /// Wall-clock timings in milliseconds (prefill, scoring, generation).
    #[serde(default)]
    pub timings_ms: BTreeMap<String, f64>,
}

/// Serialises `value` as pretty JSON into `path` atomically (temp file + rename).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    let text = serde_json::to_vec_pretty(value).map_err(|e| EvalError::Parse {
        path: path.to_owned(),
        line: None,
        problem: format!("cannot serialise: {e}"),
    })?;
    tmp.write_all(&text).map_err(io_err(path))?;
    tmp.write_all(b"\n").map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| EvalError::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Reads and parses a JSON file, naming it in errors.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| EvalError::Parse {
        path: path.to_owned(),
        line: Some(e.line()),
        problem: format!("{e}; delete the file to recompute it"),
    })
}

/// `DIR/config.json`.
pub fn config_path(out: &Path) -> PathBuf {
    out.join("config.json")
}

/// `DIR/examples/NNNNN.json` of example `index`.
pub fn example_path(out: &Path, index: usize) -> PathBuf {
    out.join("examples").join(format!("{index:05}.json"))
}

/// Writes `config` into `out`, or checks that the one already there asks for the same work
/// (otherwise the results could not be mixed: use another `--out`). A different example count
/// is allowed (the run is extended or read partially) and recorded.
pub fn prepare_out_dir(out: &Path, config: &RunConfig) -> Result<()> {
    let path = config_path(out);
    if path.exists() {
        let old: RunConfig = read_json(&path)?;
        if !old.same_work(config) {
            return Err(EvalError::Input(format!(
                "{} holds a run with other settings (model {}, data {}, methods {:?}, ratios {:?}); \
                 pass another --out or delete that folder",
                out.display(),
                old.model,
                old.data,
                old.methods,
                old.ratios
            )));
        }
        if old == *config {
            return Ok(());
        }
    }
    write_json_atomic(&path, config)
}

/// Loads every finished example of `out` (sorted by index).
pub fn load_finished(out: &Path) -> Result<Vec<ExampleResult>> {
    let dir = out.join("examples");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out: Vec<ExampleResult> = files.iter().map(|p| read_json(p)).collect::<Result<_>>()?;
    out.sort_by_key(|r| r.index);
    Ok(out)
}
