//! KV importance scoring for kvzip-rs: KVzip context-reconstruction scores, budget selection
//! into a [`kvzip_cache::KeepMask`], context-independent head scores and baseline policies.
//!
//! An inference engine with its own forward pass uses this crate (with `kvzip-cache`) alone,
//! on the CPU, without models or tokenizers: it feeds rotated queries and the cache's keys,
//! gets one f32 score per (layer, KV head, context position), and turns them into a keep mask
//! for [`kvzip_cache::KvCache::compact`] (evict) or [`kvzip_cache::KvCache::compacted_view`]
//! (retain).
//!
//! * [`ContextScores`] / [`ScoreAccumulator`]: one f32 score per (layer, KV head, context
//!   position), assembled chunk by chunk (KVZIP-SPEC §1).
//! * [`score_chunk`]: the KVzip context-reconstruction score of one chunk on host memory (tiled
//!   two-pass softmax statistics, nothing larger than a tile materialised), plus
//!   [`score_chunk_reference`], a plain loop implementation used to test it (both from
//!   `kvzip-kernels`, which also runs the op on CUDA; [`ScoreAccumulator`] drives either).
//! * [`select()`]: budget selection (pair, pair-uniform, head, pyramid) producing a
//!   [`kvzip_cache::KeepMask`] with exactly `round(ratio * N)` kept units (DESIGN §3).
//! * [`HeadScores`]: context-independent head scores (KVZIP-SPEC §3): compute, save/load as
//!   safetensors, merge by element-wise max.
//! * [`baselines`]: SnapKV, PyramidKV, H2O, StreamingLLM, TOVA, KNorm, KeyDiff and Expected
//!   Attention scores under the same budget rules; [`kvzip_plus`]: the KVzip+ normalisation.
//!
//! # The KVzip scoring recipe (what the engine does)
//!
//! 1. Prefill `n_sys` system-prompt tokens and the `n_ctx` context tokens into a cache
//!    (positions `0..n_sys + n_ctx`) and [`set_spans`](kvzip_cache::KvCache::set_spans)`(n_sys, n_ctx)`.
//! 2. Split the context into chunks (the reference uses 2000 tokens). For each chunk build the
//!    scoring input: a "repeat the previous context" prompt (for chunks after the first, with
//!    the last 8 ids of the previous chunk as a hint), the chat template's assistant header,
//!    then the chunk's ids, i.e. the model is teacher-forced to reconstruct the chunk.
//! 3. [`mark`](kvzip_cache::KvCache::mark) the cache, run the forward over the scoring input
//!    at positions continuing after the full context, appending its K/V to the **unpruned**
//!    cache, and per layer call [`ScoreAccumulator::score_layer_chunk`] with the input's
//!    rotated queries `[q_len, n_q_heads, head_dim]`, the chunk's context range and
//!    `head_keys(h)` = every key row of KV head `h` (row `r` = position `r`, as
//!    [`KvCache::head_keys`](kvzip_cache::KvCache::head_keys) returns on an unpruned host
//!    cache); then [`rollback`](kvzip_cache::KvCache::rollback).
//! 4. [`ScoreAccumulator::finish`], then [`select()`]`(&scores, ratio, Level::Pair)` and
//!    [`compact`](kvzip_cache::KvCache::compact) with `selection.mask`. `ratio` is the fraction
//!    of context pairs kept (0.3 = evict 70%); the system prompt and anything after the
//!    context are never evicted; RoPE positions of new tokens continue from the uncompressed
//!    length.
//!
//! # Example (host storage)
//!
//! ```
//! use kvzip_cache::KvCache;
//! use kvzip_score::{select, Level, ScoreAccumulator, ScoreShape};
//!
//! // 2 layers, 1 KV head shared by a GQA group of 2 query heads, head_dim 4.
//! let (n_layers, n_kv, group, d) = (2, 1, 2, 4);
//! let (n_sys, n_ctx) = (2, 6);
//! // A stand-in for the model: `n` deterministic floats per (token, layer, kind).
//! let rows = |toks: &[u32], l: usize, kind: u32, n: usize| -> Vec<f32> {
//!     toks.iter()
//!         .flat_map(|&t| (0..n).map(move |i| ((t * 7 + kind * 3 + i as u32) as f32 + l as f32).sin()))
//!         .collect()
//! };
//!
//! // 1. Prefill system prompt + context.
//! let ids: Vec<u32> = (10..10 + (n_sys + n_ctx) as u32).collect();
//! let mut cache = KvCache::uniform(n_layers, n_kv, d)?;
//! let pos = cache.next_positions(ids.len());
//! for l in 0..n_layers {
//!     cache.append(l, &rows(&ids, l, 0, n_kv * d), &rows(&ids, l, 1, n_kv * d), &pos)?;
//! }
//! cache.set_spans(n_sys, n_ctx);
//!
//! // 2.-3. Score one chunk (the whole context): repeat prompt ++ context ids.
//! let input: Vec<u32> = [1, 2].into_iter().chain(ids[n_sys..].iter().copied()).collect();
//! let mut acc = ScoreAccumulator::new(n_ctx, &vec![Some(n_kv); n_layers]);
//! let shape = ScoreShape { q_len: input.len(), n_kv_heads: n_kv, group, head_dim: d, n_sys };
//! let mark = cache.mark();
//! let pos = cache.next_positions(input.len());
//! for l in 0..n_layers {
//!     cache.append(l, &rows(&input, l, 0, n_kv * d), &rows(&input, l, 1, n_kv * d), &pos)?;
//! }
//! for l in 0..n_layers {
//!     let q = rows(&input, l, 2, n_kv * group * d); // [q_len, n_q_heads, head_dim]
//!     let keys = (0..n_kv).map(|h| cache.head_keys(l, h)).collect::<Result<Vec<_>, _>>()?;
//!     acc.score_layer_chunk(l, &shape, &q, |h| keys[h], 0..n_ctx)?;
//! }
//! cache.rollback(&mark)?;
//! let scores = acc.finish()?;
//!
//! // 4. Keep 30% of the 12 context pairs: exactly round(3.6) = 4, then evict the rest.
//! let selection = select(&scores, 0.3, Level::Pair)?;
//! assert_eq!((selection.kept, selection.total), (4, 12));
//! cache.compact(&selection.mask)?;
//! assert_eq!(cache.context_pairs_kept(), 4);
//! # Ok::<(), kvzip_score::ScoreError>(())
//! ```
//!
//! A complete runnable version with its own attention over the compacted cache:
//! `cargo run --release -p kvzip-score --example toy_engine`.
//!
//! # Which API when
//!
//! | you have | use |
//! |---|---|
//! | a host cache and your own forward | [`ScoreAccumulator::new`] + [`ScoreAccumulator::score_layer_chunk`] (keys from [`KvCache::head_keys`](kvzip_cache::KvCache::head_keys)) |
//! | a `kvzip-cache` cache on any device (CUDA included) | [`ScoreAccumulator::on_device`] + [`ScoreAccumulator::score_layer_view`] (with [`KvCache::kv_view`](kvzip_cache::KvCache::kv_view)) |
//! | scores from your own kernel | [`ScoreAccumulator::insert_chunk`], or [`ContextScores::from_layers`] directly |
//! | one chunk's scores, no accumulation | [`score_chunk`] (tiled) / [`score_chunk_reference`] (oracle) |
//! | scores, want a keep mask | [`select()`] with [`Level::Pair`] (KVzip default: one global budget, non-uniform over layers and heads), [`Level::PairUniform`], [`Level::Head`], [`Level::Pyramid`] ([`select_pyramid`] for another beta) |
//! | no scoring pass at all (context-independent) | [`HeadScores::load`] / [`HeadScores::load_merged`] + [`select_heads`] |
//! | head scores to compute once per model | [`HeadScores::from_context_scores`], [`HeadScores::merge_max`], [`HeadScores::save`] |
//! | a baseline on the same budgets | [`baselines::BaselineScorer`] (SnapKV, H2O; fed during the prefill), [`baselines::streaming_llm_scores`] |
//!
//! Every selection keeps an exact count with a deterministic tie-break and reports the real
//! ratio ([`Selection::ratio_real`]); ratios outside `(0, 1]` are an error
//! ([`ScoreError::InvalidRatio`]).
//!
//! # Performance
//!
//! The host ops ([`score_chunk`], [`ScoreAccumulator::score_layer_chunk`], the baselines'
//! column statistics) are single-threaded reference loops unless the downstream build enables
//! the `cpu-fast` feature of `kvzip-kernels` (rayon threads + SIMD paths). This crate forwards
//! it as its own `cpu-fast` feature (`kvzip-score = { version = "0.1", features = ["cpu-fast"]
//! }`); it is off by default so that the default dependency tree has no rayon, gemm or CUDA
//! code. Scoring costs about one more prefill (O(n_ctx² + n_ctx·m) for chunk size `m`) and
//! needs O(n_heads · n_ctx) memory for the scores; [`select()`] is one O(N) partition, no full
//! sort.

#![warn(missing_docs)]

pub mod baselines;
mod head;
pub mod kvzip_plus;
mod recon;
mod scores;
mod select;

pub use head::{HeadScores, HEAD_SCORES_FORMAT, HEAD_SCORES_TENSOR};
pub use recon::{score_chunk, score_chunk_reference, ScoreShape};
pub use scores::{ContextScores, LayerScores, ScoreAccumulator};
pub use select::{
    pyramid_layer_budgets, select, select_heads, select_pyramid, Level, Selection, PYRAMID_BETA,
};

use std::path::PathBuf;

/// Errors of the scoring crate.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// A compression ratio outside `(0, 1]` (or not a number).
    #[error(
        "ratio {0} is outside (0, 1]: pass the fraction of context KV pairs to keep, e.g. 0.3"
    )]
    InvalidRatio(f64),
    /// Inputs of the wrong shape or length; the message names the argument.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A score is NaN (or otherwise unusable); the message names layer, head and position.
    #[error("invalid score: {0}")]
    InvalidScore(String),
    /// Scores were finished before every scored position was filled.
    #[error("incomplete scores: {0}")]
    Incomplete(String),
    /// A head-score file exists but its content is wrong (names the file and the problem).
    #[error("head-score file {}: {problem}", path.display())]
    File {
        /// The file being read or written.
        path: PathBuf,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// An I/O error while reading or writing a file.
    #[error("head-score file {}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A compute-kernel error from `kvzip-kernels`.
    #[error(transparent)]
    Kernel(#[from] kvzip_kernels::KernelError),
    /// A keep-mask error from `kvzip-cache`.
    #[error(transparent)]
    Cache(#[from] kvzip_cache::CacheError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ScoreError>;

/// Checks a keep ratio (fraction of context pairs kept): finite and in `(0, 1]`; otherwise
/// [`ScoreError::InvalidRatio`].
pub fn check_ratio(ratio: f64) -> Result<()> {
    if ratio.is_finite() && ratio > 0.0 && ratio <= 1.0 {
        Ok(())
    } else {
        Err(ScoreError::InvalidRatio(ratio))
    }
}
