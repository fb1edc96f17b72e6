//! Summaries: per method, the task metric x100 averaged over all queries of all finished
//! examples at every ratio, with the full-cache answers as ratio 1.0 (KVZIP-SPEC §6.4), and a
//! 95 % bootstrap confidence interval per point: examples (contexts, with all their questions)
//! are resampled with replacement [`BOOTSTRAP_SAMPLES`] times with a fixed seed, since questions
//! on one context are not independent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::generated::SplitMix64;
use crate::results::{ExampleResult, RunConfig};

/// Bootstrap resamples per confidence interval.
pub const BOOTSTRAP_SAMPLES: usize = 1000;

/// One point of a score curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RatioScore {
    /// Requested keep ratio (1.0 = full cache).
    pub ratio: f64,
    /// Metric x100, mean over all queries.
    pub score: f64,
    /// 2.5th percentile of the bootstrap distribution of `score` (absent for real ratios).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_low: Option<f64>,
    /// 97.5th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_high: Option<f64>,
}

impl RatioScore {
    /// A point without an interval.
    pub fn new(ratio: f64, score: f64) -> Self {
        Self {
            ratio,
            score,
            ci_low: None,
            ci_high: None,
        }
    }
}

/// Pooled mean x100 of per-example `(score sum, query count)` and its 95 % bootstrap interval
/// over examples (seeded, so summaries are reproducible).
pub fn bootstrap_mean(per_example: &[(f64, usize)]) -> (f64, Option<(f64, f64)>) {
    let pooled = |it: &mut dyn Iterator<Item = (f64, usize)>| {
        let (s, n) = it.fold((0.0, 0usize), |(a, b), (s, n)| (a + s, b + n));
        if n == 0 {
            0.0
        } else {
            100.0 * s / n as f64
        }
    };
    let mean = pooled(&mut per_example.iter().copied());
    let k = per_example.len();
    if k < 2 {
        return (mean, None);
    }
    let mut rng = SplitMix64::new(0x5eed_b007);
    let mut stats: Vec<f64> = (0..BOOTSTRAP_SAMPLES)
        .map(|_| pooled(&mut (0..k).map(|_| per_example[rng.below(k as u64) as usize])))
        .collect();
    stats.sort_by(f64::total_cmp);
    let at = |q: f64| stats[((stats.len() - 1) as f64 * q).round() as usize];
    (mean, Some((at(0.025), at(0.975))))
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
    let mut full: Vec<(f64, usize)> = Vec::new();
    // (method, ratio key) -> (per-example (score sum, count), real-ratio sum, real count)
    type Acc = (Vec<(f64, usize)>, f64, usize);
    let mut acc: BTreeMap<(String, i64), Acc> = BTreeMap::new();
    let key = |r: f64| (r * 1e6).round() as i64;
    for ex in results {
        let sum: f64 = ex
            .queries
            .iter()
            .map(|q| metric.score(&q.full, &q.gold))
            .sum();
        full.push((sum, ex.queries.len()));
        for (method, records) in &ex.methods {
            for rec in records {
                let e = acc.entry((method.clone(), key(rec.ratio))).or_default();
                let sum: f64 = ex
                    .queries
                    .iter()
                    .zip(&rec.answers)
                    .map(|(q, answer)| metric.score(answer, &q.gold))
                    .sum();
                e.0.push((sum, ex.queries.len().min(rec.answers.len())));
                e.1 += rec.ratio_real;
                e.2 += 1;
            }
        }
    }
    let point = |ratio: f64, per_example: &[(f64, usize)]| {
        let (score, ci) = bootstrap_mean(per_example);
        RatioScore {
            ratio,
            score,
            ci_low: ci.map(|c| c.0),
            ci_high: ci.map(|c| c.1),
        }
    };
    let full_point = point(1.0, &full);
    let mut methods: BTreeMap<String, Vec<RatioScore>> = BTreeMap::new();
    let mut ratio_real: BTreeMap<String, Vec<RatioScore>> = BTreeMap::new();
    for m in &config.methods {
        methods.insert(m.clone(), Vec::new());
        ratio_real.insert(m.clone(), Vec::new());
    }
    for ((method, r), (per_example, real, n_real)) in acc {
        let ratio = r as f64 / 1e6;
        methods
            .entry(method.clone())
            .or_default()
            .push(point(ratio, &per_example));
        let real = if n_real == 0 {
            0.0
        } else {
            real / n_real as f64
        };
        ratio_real
            .entry(method)
            .or_default()
            .push(RatioScore::new(ratio, real));
    }
    for pts in methods.values_mut() {
        pts.push(full_point);
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
        n_queries: full.iter().map(|f| f.1).sum(),
        methods,
        ratio_real,
    }
}

#[cfg(test)]
mod tests {
    use super::bootstrap_mean;

    #[test]
    fn bootstrap_interval_brackets_the_mean_and_narrows_with_more_examples() {
        let small: Vec<(f64, usize)> = (0..10).map(|i| ((i % 2) as f64, 1)).collect();
        let (m, ci) = bootstrap_mean(&small);
        let (lo, hi) = ci.unwrap();
        assert!((m - 50.0).abs() < 1e-9 && lo < m && m < hi, "{lo} {m} {hi}");
        let big: Vec<(f64, usize)> = (0..400).map(|i| ((i % 2) as f64, 1)).collect();
        let (_, ci2) = bootstrap_mean(&big);
        let (lo2, hi2) = ci2.unwrap();
        assert!(hi2 - lo2 < hi - lo, "{lo2}..{hi2} vs {lo}..{hi}");
        assert_eq!(bootstrap_mean(&[(3.0, 4)]), (75.0, None));
    }
}
