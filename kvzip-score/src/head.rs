//! Context-independent head scores (KVZIP-SPEC §3): `[n_layers, n_kv_heads]` f32, the max over
//! context positions of the pair scores of one or more samples, merged by element-wise max.
//!
//! File format (safetensors): one tensor [`HEAD_SCORES_TENSOR`] `F32 [n_layers, n_kv_heads]`
//! and string metadata `format` = [`HEAD_SCORES_FORMAT`], `model` (model identity chosen by
//! the caller), `sources` (JSON list of sample descriptions), `scored_layers` (JSON list of
//! layer indices; rows of other layers are 0 and ignored, e.g. Gemma3 sliding layers).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::{ContextScores, LayerScores, Result, ScoreError};

/// Name of the tensor inside a head-score file.
pub const HEAD_SCORES_TENSOR: &str = "head_scores";
/// Value of the `format` metadata key of a head-score file.
pub const HEAD_SCORES_FORMAT: &str = "kvzip-head-scores/1";

/// Head scores `[n_layers, n_heads]` (row-major, f32), with which layers are scored.
///
/// Computed once per model from the pair scores of one or more contexts, saved, and then used
/// with [`crate::select_heads`] to prune any context without a scoring pass.
///
/// ```
/// use kvzip_score::{ContextScores, HeadScores, LayerScores};
///
/// let sample = |v: Vec<f32>| {
///     ContextScores::from_layers(2, vec![Some(LayerScores { n_heads: 2, values: v }), None])
/// };
/// // Head score = max over positions; layer 1 is not scored.
/// let a = HeadScores::from_context_scores(&sample(vec![0.1, 0.9, 0.2, 0.3])?, "toy", "doc a")?;
/// let b = HeadScores::from_context_scores(&sample(vec![0.5, 0.0, 0.6, 0.1])?, "toy", "doc b")?;
/// let merged = a.merge_max(&b)?;
/// assert_eq!(merged.values(), &[0.9, 0.6, 0.0, 0.0]);
/// assert_eq!(merged.get(1, 0), None);
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("heads.safetensors");
/// merged.save(&path)?;
/// assert_eq!(HeadScores::load(&path)?, merged);
/// # Ok::<(), kvzip_score::ScoreError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct HeadScores {
    n_layers: usize,
    n_heads: usize,
    values: Vec<f32>,
    scored: Vec<bool>,
    /// Identity of the model the scores belong to (e.g. its name and config hash).
    pub model: String,
    /// Descriptions of the samples the scores were computed from.
    pub sources: Vec<String>,
}

impl HeadScores {
    /// Builds head scores; `values` is `[n_layers, n_heads]`, `scored[l]` says whether row `l`
    /// is meaningful. Values of unscored rows are reset to 0.
    pub fn new(
        n_heads: usize,
        mut values: Vec<f32>,
        scored: Vec<bool>,
        model: impl Into<String>,
        sources: Vec<String>,
    ) -> Result<Self> {
        let n_layers = scored.len();
        if values.len() != n_layers * n_heads {
            return Err(ScoreError::Shape(format!(
                "head scores: {} values, expected n_layers {n_layers} x n_heads {n_heads}",
                values.len()
            )));
        }
        for (l, s) in scored.iter().enumerate() {
            if !s {
                values[l * n_heads..(l + 1) * n_heads].fill(0.0);
            }
        }
        Ok(Self {
            n_layers,
            n_heads,
            values,
            scored,
            model: model.into(),
            sources,
        })
    }

    /// Head scores of one sample: max over context positions of every scored (layer, head).
    /// All scored layers must have the same head count. `model` identifies the model,
    /// `source` describes the sample.
    pub fn from_context_scores(
        scores: &ContextScores,
        model: impl Into<String>,
        source: impl Into<String>,
    ) -> Result<Self> {
        let mut n_heads = None;
        for (l, ls) in scores.scored_layers() {
            if *n_heads.get_or_insert(ls.n_heads) != ls.n_heads {
                return Err(ScoreError::Shape(format!(
                    "layer {l} has {} KV heads, earlier layers {}; head scores need one head count",
                    ls.n_heads,
                    n_heads.unwrap_or(0)
                )));
            }
        }
        let n_heads = n_heads.unwrap_or(0);
        let n_ctx = scores.n_ctx();
        let mut values = vec![0.0f32; scores.n_layers() * n_heads];
        let mut scored = vec![false; scores.n_layers()];
        for (l, ls) in scores.scored_layers() {
            scored[l] = true;
            for h in 0..n_heads {
                values[l * n_heads + h] = ls.values[h * n_ctx..(h + 1) * n_ctx]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
            }
        }
        Self::new(n_heads, values, scored, model, vec![source.into()])
    }

    /// Number of layers (rows).
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// KV heads per layer (columns).
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// All values, `[n_layers, n_heads]` row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Whether layer `l` is scored.
    pub fn is_scored(&self, l: usize) -> bool {
        self.scored.get(l).copied().unwrap_or(false)
    }

    /// Score of (`layer`, `head`), `None` if out of range or the layer is not scored.
    pub fn get(&self, layer: usize, head: usize) -> Option<f32> {
        (self.is_scored(layer) && head < self.n_heads)
            .then(|| self.values[layer * self.n_heads + head])
    }

    /// Element-wise max of two head-score sets of the same model and shape (sources joined).
    pub fn merge_max(&self, other: &HeadScores) -> Result<HeadScores> {
        if self.model != other.model {
            return Err(ScoreError::Shape(format!(
                "cannot merge head scores of model {:?} with model {:?}",
                self.model, other.model
            )));
        }
        if (self.n_layers, self.n_heads) != (other.n_layers, other.n_heads)
            || self.scored != other.scored
        {
            return Err(ScoreError::Shape(format!(
                "cannot merge head scores of shape [{}, {}] with [{}, {}] (or different scored layers)",
                self.n_layers, self.n_heads, other.n_layers, other.n_heads
            )));
        }
        let values = self
            .values
            .iter()
            .zip(&other.values)
            .map(|(a, b)| a.max(*b))
            .collect();
        let mut sources = self.sources.clone();
        sources.extend(other.sources.iter().cloned());
        Self::new(
            self.n_heads,
            values,
            self.scored.clone(),
            self.model.clone(),
            sources,
        )
    }

    /// Checks the scores fit a model with `n_heads[l]` KV heads per layer (`None` = not scored).
    pub fn check_model(&self, n_heads: &[Option<usize>]) -> Result<()> {
        if n_heads.len() != self.n_layers {
            return Err(ScoreError::Shape(format!(
                "head scores cover {} layers but the model has {}; compute head scores for this model",
                self.n_layers,
                n_heads.len()
            )));
        }
        for (l, h) in n_heads.iter().enumerate() {
            match (h, self.scored[l]) {
                (Some(h), true) if *h != self.n_heads => {
                    return Err(ScoreError::Shape(format!(
                        "layer {l}: model has {h} KV heads, head scores have {}",
                        self.n_heads
                    )))
                }
                (Some(_), false) => {
                    return Err(ScoreError::Shape(format!(
                        "layer {l} is evictable in the model but not scored in the head scores"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Expands to head-constant [`ContextScores`] over `n_ctx` positions for a model with
    /// `n_heads[l]` KV heads per layer (`None` layers stay unscored).
    pub fn to_context_scores(
        &self,
        n_ctx: usize,
        n_heads: &[Option<usize>],
    ) -> Result<ContextScores> {
        self.check_model(n_heads)?;
        let layers = n_heads
            .iter()
            .enumerate()
            .map(|(l, h)| {
                h.map(|h| LayerScores {
                    n_heads: h,
                    values: (0..h)
                        .flat_map(|i| std::iter::repeat_n(self.values[l * self.n_heads + i], n_ctx))
                        .collect(),
                })
            })
            .collect();
        ContextScores::from_layers(n_ctx, layers)
    }

    /// Writes the scores as safetensors, atomically (temp file in the same folder, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| ScoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bytes: Vec<u8> = self.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![self.n_layers, self.n_heads], &bytes)
            .map_err(|e| self.file_err(path, format!("cannot build tensor: {e}")))?;
        let scored: Vec<usize> = (0..self.n_layers).filter(|&l| self.scored[l]).collect();
        let meta: HashMap<String, String> = [
            ("format".to_string(), HEAD_SCORES_FORMAT.to_string()),
            ("model".to_string(), self.model.clone()),
            ("sources".to_string(), json(&self.sources)),
            ("scored_layers".to_string(), json(&scored)),
        ]
        .into_iter()
        .collect();
        let data = safetensors::serialize([(HEAD_SCORES_TENSOR, view)], &Some(meta))
            .map_err(|e| self.file_err(path, format!("cannot serialise: {e}")))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        tmp.write_all(&data).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    fn file_err(&self, path: &Path, problem: String) -> ScoreError {
        ScoreError::File {
            path: path.to_path_buf(),
            problem,
        }
    }

    /// Reads a file written by [`HeadScores::save`]; errors name the file and the problem.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |problem: String| ScoreError::File {
            path: path.to_path_buf(),
            problem,
        };
        let data = std::fs::read(path).map_err(|source| ScoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, header) = SafeTensors::read_metadata(&data).map_err(|e| {
            bad(format!(
                "not a safetensors file ({e}); write it with `kvzip head-scores`"
            ))
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get("format") {
            Some(f) if f == HEAD_SCORES_FORMAT => {}
            Some(f) => {
                return Err(bad(format!(
                    "format {f:?}, expected {HEAD_SCORES_FORMAT:?}"
                )))
            }
            None => {
                return Err(bad(
                    "no `format` metadata: not a kvzip head-score file".into()
                ))
            }
        }
        let st = SafeTensors::deserialize(&data)
            .map_err(|e| bad(format!("corrupt safetensors: {e}")))?;
        let t = st
            .tensor(HEAD_SCORES_TENSOR)
            .map_err(|_| bad(format!("missing tensor {HEAD_SCORES_TENSOR:?}")))?;
        if t.dtype() != Dtype::F32 || t.shape().len() != 2 {
            return Err(bad(format!(
                "tensor {HEAD_SCORES_TENSOR:?} is {:?} {:?}, expected F32 [n_layers, n_kv_heads]",
                t.dtype(),
                t.shape()
            )));
        }
        let (n_layers, n_heads) = (t.shape()[0], t.shape()[1]);
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if values.iter().any(|v| v.is_nan()) {
            return Err(bad("contains NaN scores".into()));
        }
        let model = meta.get("model").cloned().unwrap_or_default();
        let sources: Vec<String> = parse_json(meta.get("sources"), "sources").map_err(bad)?;
        let scored_idx: Vec<usize> =
            parse_json(meta.get("scored_layers"), "scored_layers").map_err(bad)?;
        let mut scored = vec![false; n_layers];
        for l in scored_idx {
            *scored
                .get_mut(l)
                .ok_or_else(|| bad(format!("scored layer {l} >= n_layers {n_layers}")))? = true;
        }
        Self::new(n_heads, values, scored, model, sources)
    }

    /// Loads several files and merges them by element-wise max (the reference's behaviour for
    /// multiple head-score files of one model). Fails on an empty list.
    pub fn load_merged(paths: &[&Path]) -> Result<Self> {
        let mut it = paths.iter();
        let first = it
            .next()
            .ok_or_else(|| ScoreError::Shape("no head-score files given".into()))?;
        let mut acc = Self::load(first)?;
        for p in it {
            acc = acc
                .merge_max(&Self::load(p)?)
                .map_err(|e| ScoreError::File {
                    path: p.to_path_buf(),
                    problem: e.to_string(),
                })?;
        }
        Ok(acc)
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".to_string())
}

fn parse_json<T: serde::de::DeserializeOwned>(
    s: Option<&String>,
    key: &str,
) -> std::result::Result<T, String> {
    let s = s.ok_or_else(|| format!("missing `{key}` metadata"))?;
    serde_json::from_str(s).map_err(|e| format!("metadata `{key}` is not valid JSON: {e}"))
}
