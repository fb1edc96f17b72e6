//! Budget selection: which context KV pairs survive a prune (KVZIP-SPEC §2, DESIGN §3).
//!
//! Every level keeps an **exact** count (`round(ratio * units)`, `f64::round`, halves away from
//! zero) with one deterministic order: higher score first, and among equal scores (compared
//! with `f32::total_cmp`) the lower flat index `(layer, head, position)` first — layers in
//! model order, then heads, then context positions. This replaces the reference's strict `>`
//! against a bf16 threshold, which evicts every tie and undershoots the requested ratio.

use std::fmt;
use std::str::FromStr;

use kvzip_cache::{KeepMask, LayerKeep};

use crate::head::HeadScores;
use crate::{check_ratio, ContextScores, Result, ScoreError};

/// PyramidKV's default ratio between the largest and smallest per-layer budget (`beta`).
pub const PYRAMID_BETA: f64 = 20.0;

/// How the budget is spread over layers, heads and positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// One global budget over all scored layers x heads x positions (the reference default).
    Pair,
    /// Every scored (layer, head) keeps `round(ratio * n_ctx)` positions.
    PairUniform,
    /// Whole (layer, head) context spans: keep `round(ratio * n_heads_total)` heads ranked by
    /// head score (max over positions of the pair scores).
    Head,
    /// PyramidKV: per-layer budgets decreasing linearly with depth (beta [`PYRAMID_BETA`]),
    /// same total as `Pair`; within a layer one budget over heads x positions.
    Pyramid,
}

impl Level {
    /// The CLI spelling: `pair`, `pair-uniform`, `head` or `pyramid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Pair => "pair",
            Level::PairUniform => "pair-uniform",
            Level::Head => "head",
            Level::Pyramid => "pyramid",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = ScoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pair" => Ok(Level::Pair),
            "pair-uniform" | "pair_uniform" => Ok(Level::PairUniform),
            "head" => Ok(Level::Head),
            "pyramid" => Ok(Level::Pyramid),
            other => Err(ScoreError::Shape(format!(
                "unknown level {other:?}: use pair, pair-uniform, head or pyramid"
            ))),
        }
    }
}

/// The outcome of a selection: the keep mask to apply with
/// [`kvzip_cache::KvCache::compact`] or [`kvzip_cache::KvCache::compacted_view`], and the
/// counts to report. Counts are context pairs (layer, KV head, position) over the scored
/// layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Keep bits per scored layer; unscored layers are `None` (kept whole).
    pub mask: KeepMask,
    /// Context pairs kept over the scored layers.
    pub kept: usize,
    /// Context pairs over the scored layers (`N`).
    pub total: usize,
    /// `kept / total` (1.0 when `total == 0`).
    pub ratio_real: f64,
    /// Lowest kept score (for `Head`: lowest kept head score); `+inf` when nothing is kept.
    pub threshold: f32,
}

/// `round(ratio * n)` as an exact count, clamped to `0..=n`.
pub(crate) fn budget(ratio: f64, n: usize) -> usize {
    ((ratio * n as f64).round() as usize).min(n)
}

/// Keeps the `k` best of `values` (higher first, ties by lower index). Returns the flags and
/// the lowest kept value (`+inf` if `k == 0`).
pub(crate) fn top_k(values: &[f32], k: usize) -> (Vec<bool>, f32) {
    if k == 0 {
        return (vec![false; values.len()], f32::INFINITY);
    }
    if k >= values.len() {
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        return (vec![true; values.len()], min);
    }
    let mut sorted = values.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let thr = sorted[k - 1];
    let greater = values.iter().filter(|v| v.total_cmp(&thr).is_gt()).count();
    let mut ties_left = k - greater;
    let flags = values
        .iter()
        .map(|v| match v.total_cmp(&thr) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal if ties_left > 0 => {
                ties_left -= 1;
                true
            }
            _ => false,
        })
        .collect();
    (flags, thr)
}

fn finish(
    scores: &ContextScores,
    layers: Vec<Option<LayerKeep>>,
    threshold: f32,
) -> Result<Selection> {
    let mask = KeepMask::from_layers(scores.n_ctx(), layers)?;
    let (kept, total) = mask.counts();
    Ok(Selection {
        mask,
        kept,
        total,
        ratio_real: if total == 0 {
            1.0
        } else {
            kept as f64 / total as f64
        },
        threshold,
    })
}

/// Selects the context pairs to keep at `ratio` (fraction of context pairs kept, in
/// `(0, 1]`; 0.3 = evict 70%).
///
/// Exact counts: `Pair` keeps `round(ratio * N)` pairs, `PairUniform`
/// `round(ratio * n_ctx)` per (layer, head), `Head` `round(ratio * n_heads_total)` whole heads,
/// `Pyramid` `round(ratio * N)` split by [`pyramid_layer_budgets`]. Ties: higher score first,
/// then the lower `(layer, head, position)`. Unscored layers (`None`) stay `None` in the mask
/// (kept whole). Errors: ratio outside `(0, 1]` ([`ScoreError::InvalidRatio`]), NaN scores
/// ([`ScoreError::InvalidScore`]).
///
/// ```
/// use kvzip_score::{select, ContextScores, Level, LayerScores};
///
/// // 2 layers x 1 KV head x 4 context positions.
/// let layer = |v: [f32; 4]| Some(LayerScores { n_heads: 1, values: v.to_vec() });
/// let scores = ContextScores::from_layers(4, vec![layer([0.9, 0.1, 0.7, 0.1]), layer([0.2, 0.8, 0.1, 0.1])])?;
///
/// // Pair: one global budget of round(0.5 * 8) = 4 pairs, uneven over layers.
/// let sel = select(&scores, 0.5, Level::Pair)?;
/// assert_eq!((sel.kept, sel.total, sel.ratio_real), (4, 8, 0.5));
/// assert_eq!(sel.threshold, 0.2);
/// assert_eq!(sel.mask.layer(0).unwrap().bits, [true, false, true, false]);
/// assert_eq!(sel.mask.layer(1).unwrap().bits, [true, true, false, false]);
///
/// // PairUniform: round(0.25 * 4) = 1 position per (layer, head).
/// let sel = select(&scores, 0.25, Level::PairUniform)?;
/// assert!(sel.mask.is_kept(0, 0, 0) && sel.mask.is_kept(1, 0, 1));
/// assert_eq!(sel.kept, 2);
///
/// // 6 of 8: four 0.1s tie for the last 2 places; the lower (layer, head, position) wins.
/// let sel = select(&scores, 0.75, Level::Pair)?;
/// assert_eq!(sel.mask.layer(0).unwrap().bits, [true; 4]);
/// assert_eq!(sel.mask.layer(1).unwrap().bits, [true, true, false, false]);
/// assert!(select(&scores, 0.0, Level::Pair).is_err());
/// # Ok::<(), kvzip_score::ScoreError>(())
/// ```
pub fn select(scores: &ContextScores, ratio: f64, level: Level) -> Result<Selection> {
    check_ratio(ratio)?;
    scores.check_no_nan()?;
    match level {
        Level::Pair => select_layer_budgets(scores, None, budget(ratio, scores.total_pairs())),
        Level::Pyramid => select_pyramid(scores, ratio, PYRAMID_BETA),
        Level::PairUniform => select_uniform(scores, ratio),
        Level::Head => select_whole_heads(scores, ratio),
    }
}

/// `Pair` (when `per_layer` is `None`: one budget `k` over everything) or per-layer budgets.
fn select_layer_budgets(
    scores: &ContextScores,
    per_layer: Option<&[usize]>,
    k: usize,
) -> Result<Selection> {
    let n_ctx = scores.n_ctx();
    let mut layers: Vec<Option<LayerKeep>> = vec![None; scores.n_layers()];
    let mut threshold = f32::INFINITY;
    match per_layer {
        None => {
            let flat: Vec<f32> = scores
                .scored_layers()
                .flat_map(|(_, ls)| ls.values.iter().copied())
                .collect();
            let (flags, thr) = top_k(&flat, k);
            threshold = thr;
            let mut off = 0;
            for (l, ls) in scores.scored_layers() {
                let n = ls.n_heads * n_ctx;
                layers[l] = Some(LayerKeep {
                    n_heads: ls.n_heads,
                    bits: flags[off..off + n].to_vec(),
                });
                off += n;
            }
        }
        Some(budgets) => {
            for ((l, ls), &b) in scores.scored_layers().zip(budgets) {
                let (bits, thr) = top_k(&ls.values, b);
                threshold = threshold.min(thr);
                layers[l] = Some(LayerKeep {
                    n_heads: ls.n_heads,
                    bits,
                });
            }
        }
    }
    finish(scores, layers, threshold)
}

fn select_uniform(scores: &ContextScores, ratio: f64) -> Result<Selection> {
    let n_ctx = scores.n_ctx();
    let k = budget(ratio, n_ctx);
    let mut layers: Vec<Option<LayerKeep>> = vec![None; scores.n_layers()];
    let mut threshold = f32::INFINITY;
    for (l, ls) in scores.scored_layers() {
        let mut bits = Vec::with_capacity(ls.values.len());
        for h in 0..ls.n_heads {
            let (flags, thr) = top_k(&ls.values[h * n_ctx..(h + 1) * n_ctx], k);
            threshold = threshold.min(thr);
            bits.extend(flags);
        }
        layers[l] = Some(LayerKeep {
            n_heads: ls.n_heads,
            bits,
        });
    }
    finish(scores, layers, threshold)
}

fn select_whole_heads(scores: &ContextScores, ratio: f64) -> Result<Selection> {
    let n_ctx = scores.n_ctx();
    let head_max: Vec<f32> = scores
        .scored_layers()
        .flat_map(|(_, ls)| {
            (0..ls.n_heads).map(move |h| {
                ls.values[h * n_ctx..(h + 1) * n_ctx]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max)
            })
        })
        .collect();
    let (flags, threshold) = top_k(&head_max, budget(ratio, head_max.len()));
    let mut layers: Vec<Option<LayerKeep>> = vec![None; scores.n_layers()];
    let mut off = 0;
    for (l, ls) in scores.scored_layers() {
        let bits = flags[off..off + ls.n_heads]
            .iter()
            .flat_map(|&keep| std::iter::repeat_n(keep, n_ctx))
            .collect();
        off += ls.n_heads;
        layers[l] = Some(LayerKeep {
            n_heads: ls.n_heads,
            bits,
        });
    }
    finish(scores, layers, threshold)
}

/// Head-level selection from stored head scores (`--head-scores FILE`): expands them to the
/// model's layers (`n_heads[l]`, `None` = not scored) over `n_ctx` positions and keeps
/// `round(ratio * n_heads_total)` whole heads (each keeps its whole context span or none of
/// it). No scoring pass over the context is needed. Errors on a shape mismatch with the model.
///
/// ```
/// use kvzip_score::{select_heads, HeadScores};
///
/// // 2 layers x 2 KV heads, both layers scored.
/// let hs = HeadScores::new(2, vec![0.9, 0.1, 0.3, 0.7], vec![true, true], "toy", vec![])?;
/// let sel = select_heads(&hs, 0.5, 100, &[Some(2), Some(2)])?;
/// assert_eq!((sel.kept, sel.total), (200, 400)); // 2 of 4 heads, 100 positions each
/// assert!(sel.mask.is_kept(0, 0, 42) && sel.mask.is_kept(1, 1, 42));
/// assert!(!sel.mask.is_kept(0, 1, 0));
/// # Ok::<(), kvzip_score::ScoreError>(())
/// ```
pub fn select_heads(
    head_scores: &HeadScores,
    ratio: f64,
    n_ctx: usize,
    n_heads: &[Option<usize>],
) -> Result<Selection> {
    check_ratio(ratio)?;
    let expanded = head_scores.to_context_scores(n_ctx, n_heads)?;
    select(&expanded, ratio, Level::Head)
}

/// PyramidKV selection with an explicit `beta` (>= 1, the ratio between the first and the
/// last layer's budget): per-layer budgets from [`pyramid_layer_budgets`], then the top pairs
/// of each layer over heads x positions. `select(.., Level::Pyramid)` uses [`PYRAMID_BETA`].
pub fn select_pyramid(scores: &ContextScores, ratio: f64, beta: f64) -> Result<Selection> {
    check_ratio(ratio)?;
    scores.check_no_nan()?;
    let sizes: Vec<(usize, usize)> = scores
        .scored_layers()
        .map(|(_, ls)| (ls.n_heads, scores.n_ctx()))
        .collect();
    let budgets = pyramid_layer_budgets(&sizes, ratio, beta)?;
    select_layer_budgets(scores, Some(&budgets), 0)
}

/// PyramidKV per-layer pair budgets for scored layers given as `(n_heads, n_ctx)` in order.
///
/// Per-head budget of scored layer `i` of `n`: linear from `max` (first layer) to `min` (last),
/// with `b = ratio * n_ctx`, `min = b / beta`, `max = 2b - min`; if `max > n_ctx` then
/// `max = n_ctx`, `min = 2b - n_ctx` (as PyramidKV). Layer budgets are these times `n_heads`,
/// rescaled to sum to exactly `round(ratio * N)`, rounded by largest remainder (ties: lower
/// layer first) and clamped to each layer's size. Returns one pair budget per entry of
/// `sizes`.
///
/// ```
/// use kvzip_score::pyramid_layer_budgets;
///
/// // 3 layers of 2 heads x 100 positions, keep 30%: 180 pairs, most in the first layer.
/// let b = pyramid_layer_budgets(&[(2, 100); 3], 0.3, 20.0)?;
/// assert_eq!(b.iter().sum::<usize>(), 180);
/// assert!(b[0] > b[1] && b[1] > b[2]);
/// # Ok::<(), kvzip_score::ScoreError>(())
/// ```
pub fn pyramid_layer_budgets(
    sizes: &[(usize, usize)],
    ratio: f64,
    beta: f64,
) -> Result<Vec<usize>> {
    check_ratio(ratio)?;
    if !(beta.is_finite() && beta >= 1.0) {
        return Err(ScoreError::Shape(format!(
            "pyramid beta {beta} must be >= 1 (default 20)"
        )));
    }
    let n = sizes.len();
    let caps: Vec<usize> = sizes.iter().map(|(h, c)| h * c).collect();
    let total = budget(ratio, caps.iter().sum());
    let weights: Vec<f64> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(h, c))| {
            let b = ratio * c as f64;
            let (mut lo, mut hi) = (b / beta, 2.0 * b - b / beta);
            if hi > c as f64 {
                hi = c as f64;
                lo = (2.0 * b - hi).max(0.0);
            }
            let per_head = if n <= 1 {
                b
            } else {
                hi - (hi - lo) * i as f64 / (n - 1) as f64
            };
            per_head * h as f64
        })
        .collect();
    let wsum: f64 = weights.iter().sum();
    let ideal: Vec<f64> = weights
        .iter()
        .map(|w| {
            if wsum > 0.0 {
                w * total as f64 / wsum
            } else {
                0.0
            }
        })
        .collect();
    let mut out: Vec<usize> = ideal
        .iter()
        .zip(&caps)
        .map(|(x, &cap)| (x.floor() as usize).min(cap))
        .collect();
    let mut left = total.saturating_sub(out.iter().sum());
    // Largest remainder first (ties: lower layer), then any layer with room, in order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let fa = ideal[a] - ideal[a].floor();
        let fb = ideal[b] - ideal[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in &order {
        if left > 0 && out[i] < caps[i] {
            out[i] += 1;
            left -= 1;
        }
    }
    for i in 0..n {
        let add = left.min(caps[i] - out[i]);
        out[i] += add;
        left -= add;
    }
    Ok(out)
}
