//! Compression methods compared by `kvzip eval` and how each turns scores into a keep set.
//!
//! * `kvzip`: reconstruction scores, one global budget over layers x heads x positions
//!   (KVZIP-SPEC §2.2, level pair).
//! * `kvzip-head`: context-independent head scores ([L, H] from a held-out sample), whole heads
//!   kept (KVZIP-SPEC §3, level head).
//! * `snapkv`, `h2o`, `streaming`: baseline scores from the same prefill; per-layer budget equal
//!   to `ratio` of the layer, spread non-uniformly over the layer's heads (paper App. A: the
//!   baselines get the AdaKV head allocation within their layer budget).
//! * `pyramidkv`: SnapKV scores with PyramidKV's decreasing per-layer budgets (beta 20).
//! * `tova`, `knorm`, `keydiff`, `expected-attention`: the other baselines of
//!   [`kvzip_score::baselines`], on the same per-layer budgets as SnapKV.
//! * `kvzip-plus`: KVzip scores with the KVzip+ normalisation (`× ‖W_O v‖ / ‖h‖`), pair level.

use std::fmt;
use std::str::FromStr;

use kvzip_models::engine::kvzip::Scoring;
use kvzip_score::baselines::{Baseline, ExpectedAttentionConfig, SnapKvConfig};
use kvzip_score::{select, select_pyramid, ContextScores, HeadScores, Level, Selection};
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// Attention-sink tokens kept first by StreamingLLM.
pub const STREAMING_SINKS: usize = 4;

/// One compression method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Method {
    /// KVzip pair-level (context reconstruction).
    Kvzip,
    /// KVzip head-level (context-independent head scores).
    KvzipHead,
    /// SnapKV.
    SnapKv,
    /// PyramidKV.
    PyramidKv,
    /// H2O (prefill variant, max over query rows).
    H2o,
    /// StreamingLLM (sinks + recent window).
    Streaming,
    /// TOVA (last token's attention).
    Tova,
    /// KNorm (small key norms kept).
    KNorm,
    /// KeyDiff (keys far from the mean direction kept).
    KeyDiff,
    /// Expected Attention (future-query statistics).
    ExpectedAttention,
    /// KVzip with the KVzip+ normalisation.
    KvzipPlus,
}

/// Every method in the default order.
pub const ALL_METHODS: [Method; 11] = [
    Method::Kvzip,
    Method::KvzipPlus,
    Method::KvzipHead,
    Method::SnapKv,
    Method::PyramidKv,
    Method::H2o,
    Method::Streaming,
    Method::Tova,
    Method::KNorm,
    Method::KeyDiff,
    Method::ExpectedAttention,
];

/// Which score tensor a method reads (methods sharing one are scored once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreSource {
    /// Reconstruction scores.
    Reconstruct,
    /// Head scores expanded over positions.
    Head,
    /// SnapKV window attention.
    SnapKv,
    /// H2O max attention.
    H2o,
    /// StreamingLLM position scores.
    Streaming,
    /// TOVA last-row attention.
    Tova,
    /// Key norms.
    KNorm,
    /// Key diversity.
    KeyDiff,
    /// Expected attention.
    ExpectedAttention,
    /// Reconstruction scores with the KVzip+ normalisation.
    ReconstructPlus,
}

impl Method {
    /// The CLI / JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Kvzip => "kvzip",
            Method::KvzipHead => "kvzip-head",
            Method::SnapKv => "snapkv",
            Method::PyramidKv => "pyramidkv",
            Method::H2o => "h2o",
            Method::Streaming => "streaming",
            Method::Tova => "tova",
            Method::KNorm => "knorm",
            Method::KeyDiff => "keydiff",
            Method::ExpectedAttention => "expected-attention",
            Method::KvzipPlus => "kvzip-plus",
        }
    }

    /// The score tensor this method selects from.
    pub fn source(self) -> ScoreSource {
        match self {
            Method::Kvzip => ScoreSource::Reconstruct,
            Method::KvzipHead => ScoreSource::Head,
            Method::SnapKv | Method::PyramidKv => ScoreSource::SnapKv,
            Method::H2o => ScoreSource::H2o,
            Method::Streaming => ScoreSource::Streaming,
            Method::Tova => ScoreSource::Tova,
            Method::KNorm => ScoreSource::KNorm,
            Method::KeyDiff => ScoreSource::KeyDiff,
            Method::ExpectedAttention => ScoreSource::ExpectedAttention,
            Method::KvzipPlus => ScoreSource::ReconstructPlus,
        }
    }

    /// The keep set at `ratio` from this method's scores.
    pub fn select(self, scores: &ContextScores, ratio: f64) -> Result<Selection> {
        Ok(match self {
            Method::Kvzip | Method::KvzipPlus => select(scores, ratio, Level::Pair)?,
            Method::KvzipHead => select(scores, ratio, Level::Head)?,
            Method::PyramidKv => select(scores, ratio, Level::Pyramid)?,
            // beta 1 = equal per-layer budgets, non-uniform over heads within a layer.
            Method::SnapKv
            | Method::H2o
            | Method::Streaming
            | Method::Tova
            | Method::KNorm
            | Method::KeyDiff
            | Method::ExpectedAttention => select_pyramid(scores, ratio, 1.0)?,
        })
    }
}

impl ScoreSource {
    /// The engine scoring that produces this source (`head` needs the loaded head scores).
    pub fn scoring(self, chunk: usize, head: Option<&HeadScores>) -> Result<Scoring> {
        Ok(match self {
            ScoreSource::Reconstruct => Scoring::Reconstruct { chunk },
            ScoreSource::Head => Scoring::HeadScores(
                head.cloned()
                    .ok_or_else(|| EvalError::Input("kvzip-head needs head scores".into()))?,
            ),
            ScoreSource::SnapKv => Scoring::Baseline(Baseline::SnapKv(SnapKvConfig::default())),
            ScoreSource::H2o => Scoring::Baseline(Baseline::H2o),
            ScoreSource::Streaming => Scoring::Baseline(Baseline::StreamingLlm {
                n_sink: STREAMING_SINKS,
            }),
            ScoreSource::Tova => Scoring::Baseline(Baseline::Tova),
            ScoreSource::KNorm => Scoring::Baseline(Baseline::KNorm),
            ScoreSource::KeyDiff => Scoring::Baseline(Baseline::KeyDiff),
            ScoreSource::ExpectedAttention => Scoring::Baseline(Baseline::ExpectedAttention(
                ExpectedAttentionConfig::default(),
            )),
            ScoreSource::ReconstructPlus => Scoring::ReconstructPlus { chunk },
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        ALL_METHODS
            .iter()
            .copied()
            .find(|m| m.as_str() == s.trim())
            .ok_or_else(|| {
                EvalError::Input(format!(
                    "unknown method {s:?} in --methods: use kvzip, kvzip-plus, kvzip-head, snapkv, \
                     pyramidkv, h2o, streaming, tova, knorm, keydiff, expected-attention"
                ))
            })
    }
}

/// Parses `--methods a,b,c` (duplicates removed, order kept).
pub fn parse_methods(list: &str) -> Result<Vec<Method>> {
    let mut out: Vec<Method> = Vec::new();
    for part in list.split(',').filter(|p| !p.trim().is_empty()) {
        let m: Method = part.parse()?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        return Err(EvalError::Input(
            "--methods is empty: name at least one method".into(),
        ));
    }
    Ok(out)
}

/// Parses `--ratios 0.1,0.2,...`: each in (0, 1], sorted descending, deduplicated. Ratio 1.0
/// is the full cache, which every run evaluates anyway, so it is dropped from the list.
pub fn parse_ratios(list: &str) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.trim().is_empty()) {
        let r: f64 = part.trim().parse().map_err(|_| {
            EvalError::Input(format!(
                "--ratios: {part:?} is not a number (e.g. 0.1,0.3,0.5)"
            ))
        })?;
        if !(r.is_finite() && r > 0.0 && r <= 1.0) {
            return Err(EvalError::Input(format!(
                "--ratios: {r} is outside (0, 1]; a ratio is the fraction of context KV pairs kept"
            )));
        }
        if r < 1.0 {
            out.push(r);
        }
    }
    out.sort_by(|a, b| b.total_cmp(a));
    out.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_ratios_parse_with_clear_errors() {
        assert_eq!(
            parse_methods("kvzip,snapkv,kvzip").unwrap(),
            vec![Method::Kvzip, Method::SnapKv]
        );
        let e = parse_methods("kvzip,foo").unwrap_err().to_string();
        assert!(e.contains("foo") && e.contains("--methods"), "{e}");
        assert_eq!(parse_ratios("0.1,0.5,1.0,0.5").unwrap(), vec![0.5, 0.1]);
        let e = parse_ratios("0.3,1.5").unwrap_err().to_string();
        assert!(e.contains("1.5") && e.contains("(0, 1]"), "{e}");
        assert!(parse_ratios("0").is_err());
        assert!(parse_ratios("x")
            .unwrap_err()
            .to_string()
            .contains("not a number"));
    }
}
