//! Summaries: per method, the task metric x100 averaged over all queries of all finished
//! examples at every ratio, with the full-cache answers as ratio 1.0 (KVZIP-SPEC §6.4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::results::{ExampleResult, RunConfig};

/// One point of a score curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RatioScore {
    /// Requested keep ratio (1.0 = full cache).
    pub ratio: f64,
    /// Metric x100, mean over all queries.
    pub score: f64,
}

/// The summary of a results folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Model name.
    pub model: String,
    /// Dataset name.
    pub data: String,
    /// Metric name.
    pub metric: String,
    /// Finished examples.
    pub n_examples: usize,
    /// Queries over those examples.
    pub n_queries: usize,
    /// Per method: points sorted by ascending ratio, the last one the full cache (1.0).
    pub methods: BTreeMap<String, Vec<RatioScore>>,
    /// Per method: mean real keep ratio at each requested ratio (ascending, without 1.0).
    pub ratio_real: BTreeMap<String, Vec<RatioScore>>,
}

impl Summary {
    /// The `--json` object of `kvzip eval`: `{method: [{"ratio", "score"}, ...]}`.
    pub fn methods_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.methods).unwrap_or(serde_json::Value::Null)
    }

    /// Full-cache score (identical for every method).
    pub fn full_score(&self) -> Option<f64> {
        self.methods
            .values()
            .next()
            .and_then(|pts| pts.iter().find(|p| p.ratio >= 1.0))
            .map(|p| p.score)
    }

    /// Score of `method` at `ratio` (within 1e-6).
    pub fn score_at(&self, method: &str, ratio: f64) -> Option<f64> {
        self.methods
            .get(method)?
            .iter()
            .find(|p| (p.ratio - ratio).abs() < 1e-6)
            .map(|p| p.score)
    }
}

/// Builds the summary of `results` run with `config`; the metric is recomputed from the
/// stored answers. Methods missing in an example are skipped for that example.
pub fn summarize(config: &RunConfig, results: &[ExampleResult]) -> Summary {
    let metric = config.metric;
    let mut full = (0.0, 0usize);
    // (method, ratio key) -> (score sum, count, real-ratio sum, real count)
    let mut acc: BTreeMap<(String, i64), (f64, usize, f64, usize)> = BTreeMap::new();
    let key = |r: f64| (r * 1e6).round() as i64;
    for ex in results {
        for q in &ex.queries {
            full.0 += metric.score(&q.full, &q.gold);
            full.1 += 1;
        }
        for (method, records) in &ex.methods {
            for rec in records {
                let e = acc.entry((method.clone(), key(rec.ratio))).or_default();
                for (q, answer) in ex.queries.iter().zip(&rec.answers) {
                    e.0 += metric.score(answer, &q.gold);
                    e.1 += 1;
                }
                e.2 += rec.ratio_real;
                e.3 += 1;
            }
        }
    }
    let full_score = if full.1 == 0 {
        0.0
    } else {
        100.0 * full.0 / full.1 as f64
    };
    let mut methods: BTreeMap<String, Vec<RatioScore>> = BTreeMap::new();
    let mut ratio_real: BTreeMap<String, Vec<RatioScore>> = BTreeMap::new();
    for m in &config.methods {
        methods.insert(m.clone(), Vec::new());
        ratio_real.insert(m.clone(), Vec::new());
    }
    for ((method, r), (sum, n, real, n_real)) in acc {
        let ratio = r as f64 / 1e6;
        let score = if n == 0 { 0.0 } else { 100.0 * sum / n as f64 };
        methods
            .entry(method.clone())
            .or_default()
            .push(RatioScore { ratio, score });
        let real = if n_real == 0 {
            0.0
        } else {
            real / n_real as f64
        };
        ratio_real
            .entry(method)
            .or_default()
            .push(RatioScore { ratio, score: real });
    }
    for pts in methods.values_mut() {
        pts.push(RatioScore {
            ratio: 1.0,
            score: full_score,
        });
        pts.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
    }
    for pts in ratio_real.values_mut() {
        pts.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
    }
    Summary {
        model: config.model.clone(),
        data: config.data.clone(),
        metric: metric.as_str().to_owned(),
        n_examples: results.len(),
        n_queries: full.1,
        methods,
        ratio_real,
    }
}
