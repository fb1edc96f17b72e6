//! Flattened variable-length per-head KV cache for kvzip-rs, over any storage.
//!
//! After KVzip pruning every (layer, KV head) keeps a different number of context rows, so the
//! cache stores each layer as per-head segments of one flat buffer (the layout varlen
//! attention kernels consume), with spare capacity per head so appends stay O(new tokens).
//! The layout (offsets, lengths, capacities, positions, marks, compaction plans, retain views,
//! window trims, accounting, the file format) lives here once; the rows live in a
//! [`KvStorage`]: host memory or CUDA buffers through [`DeviceKv`] (the default), or a storage
//! of a downstream engine's own.
//!
//! This crate has no model, tokenizer or scoring code: an inference engine with its own
//! attention can use it alone, on the CPU. The scores and keep masks usually come from the
//! `kvzip-score` crate (`kvzip_score::select` returns a [`KeepMask`]).
//!
//! ```text
//!  layer l, n_kv_heads = 3, rows of head_dim f32 (K and V share the layout; a parallel u32
//!  array holds every row's absolute token position)
//!
//!  row:    0        offsets[1]          offsets[2]                      capacity_rows
//!          |        |                   |                               |
//!          [h0 h0 h0 .  .][h1 h1 h1 h1 h1 .][h2 h2 .  .  .  .  .  .  .  ]
//!          \_lens[0]_/                        \_____ caps[2] ____________/
//!          '.' = free capacity; offsets[h+1] = offsets[h] + caps[h]
//!
//!  positions:  [0, n_sys)            system prompt, never evicted
//!              [n_sys, n_sys+n_ctx)  context, evictable by a KeepMask
//!              [n_sys+n_ctx, ...)    queries / answers / kept turns, never evicted
//!  seen_tokens = uncompressed length = RoPE position of the next token
//! ```
//!
//! Units: lengths, offsets and capacities count *rows* (one row = one token of one KV head,
//! `head_dim` elements of K and the same of V); positions are absolute token indices (`u32`);
//! bytes are K+V bytes.
//!
//! # Example (host storage)
//!
//! ```
//! use kvzip_cache::{KeepMask, KvCache, LayerKeep};
//!
//! // 2 layers of 2 KV heads with head_dim 4, host f32 storage.
//! let (n_layers, n_kv, d) = (2, 2, 4);
//! let mut cache = KvCache::uniform(n_layers, n_kv, d)?;
//!
//! // Prefill 2 system-prompt tokens + 6 context tokens, one append per layer;
//! // K and V are token-major [t, n_kv_heads, head_dim] (after RoPE, for K).
//! let (n_sys, n_ctx) = (2, 6);
//! let pos = cache.next_positions(n_sys + n_ctx); // 0..8
//! let k: Vec<f32> = (0..pos.len() * n_kv * d).map(|i| i as f32).collect();
//! for l in 0..n_layers {
//!     cache.append(l, &k, &k, &pos)?;
//! }
//! cache.set_spans(n_sys, n_ctx);
//!
//! // A query that must not stay in the cache (update_cache = false): mark, append, roll back.
//! let mark = cache.mark();
//! let q_pos = cache.next_positions(1); // [8]
//! for l in 0..n_layers {
//!     cache.append(l, &[0.5; 2 * 4], &[0.5; 2 * 4], &q_pos)?;
//! }
//! // ... attend over the cache, generate ...
//! cache.rollback(&mark)?;
//! assert_eq!(cache.seen_tokens(), 8);
//!
//! // Prune: keep every other context position in every head (normally the mask comes from
//! // `kvzip_score::select(&scores, ratio, level)?.mask`).
//! let bits: Vec<bool> = (0..n_kv * n_ctx).map(|i| i % 2 == 0).collect();
//! let layer = LayerKeep { n_heads: n_kv, bits };
//! let mask = KeepMask::from_layers(n_ctx, vec![Some(layer.clone()), Some(layer)])?;
//! cache.compact(&mask)?;
//!
//! let usage = cache.context_usage(4, |_| true); // f32 = 4 bytes per element
//! assert_eq!((usage.pairs_kept, usage.pairs_full), (12, 24));
//! assert_eq!(usage.bytes_kept, 12 * 2 * d * 4);
//! // Own attention code reads each head's live rows (and their absolute positions).
//! assert_eq!(cache.head_positions(0, 1)?, &[0, 1, 2, 4, 6]);
//! assert_eq!(cache.head_keys(0, 1)?.len(), 5 * d); // [len, head_dim]
//! assert_eq!(cache.seen_tokens(), 8); // RoPE positions continue from the uncompressed length
//! # Ok::<(), kvzip_cache::CacheError>(())
//! ```
//!
//! Runnable end-to-end examples (a toy engine with its own attention that scores, compresses,
//! saves and reloads): `cargo run --release -p kvzip-cache --example cache_tour` and
//! `cargo run --release -p kvzip-score --example toy_engine`.
//!
//! # Which API when
//!
//! | you want to | use |
//! |---|---|
//! | a host (f32) cache | [`KvCache::new`] (one `(n_kv_heads, head_dim)` per layer) or [`KvCache::uniform`] |
//! | a CUDA cache (bf16) | [`KvCache::on_device`] with a `kvzip_kernels::Device` (feature `cuda` of `kvzip-kernels`) |
//! | your own memory (paged pool, other GPU runtime, quantized rows) | implement [`KvStorage`], then [`KvCache::new_in`] / [`KvCache::with_capacity_in`] |
//! | append host f32 rows, layer by layer | [`KvCache::append`] |
//! | append rows already on the storage's device | [`KvCache::append_rows`] |
//! | append every layer of one forward step (one layout sync per step; best on CUDA) | [`KvCache::begin_step`], then [`KvCache::write_step`] per layer |
//! | run your own CPU attention | [`KvCache::segments`] (whole layer, varlen), [`KvCache::head_keys`] / [`KvCache::head_values`] / [`KvCache::head_positions`] (one head) |
//! | run `kvzip-kernels`' attention / score ops on any device | [`KvCache::kv_view`] |
//! | answer a query and forget it (`update_cache = false`) | [`KvCache::mark`] before, [`KvCache::rollback`] after |
//! | keep a turn (`update_cache = true`) | just do not roll back |
//! | evict mode: free the memory of pruned pairs | [`KvCache::compact`] / [`KvCache::compact_with_slack`] |
//! | retain mode: keep the full cache, try several ratios | [`KvCache::compacted_view`] (a new compacted cache per mask) |
//! | sliding-window layers | [`KvCache::trim_front`] |
//! | memory accounting | [`KvCache::bytes`] (allocated), [`KvCache::kv_bytes_live`] (live rows), [`KvCache::context_usage`] (context pairs kept vs full) |
//! | compress once, reuse later | [`KvCache::save`] + [`KvCache::load`] / [`KvCache::load_in`], checked with [`CacheFileMeta::check`]; format in [`mod@file`] |
//!
//! Marks are invalidated by structural changes ([`KvCache::compact`], a [`KvCache::trim_front`]
//! that drops rows): take a new [`KvCache::mark`] afterwards; [`KvCache::rollback`] refuses a
//! stale mark. Growth re-layouts during appends keep marks valid.
//!
//! # Performance
//!
//! The cache's own host work (appends, growth, compaction, views, file I/O) is plain
//! single-threaded row copies, O(rows moved). Appends are O(new tokens) amortized: each head
//! has spare capacity, and a layer is re-laid out (copied once) only when a head runs out of
//! it. The host ops of `kvzip-kernels` that *read* the cache (attention through
//! [`KvCache::kv_view`], the KVzip score op used by `kvzip-score`) are single-threaded
//! reference loops unless the downstream build enables the `cpu-fast` feature of
//! `kvzip-kernels` (rayon threads + a SIMD GEMM). This crate forwards it as its own `cpu-fast`
//! feature (`kvzip-cache = { version = "0.1", features = ["cpu-fast"] }`); it is off by
//! default so that the default dependency tree has no rayon, gemm or CUDA code.

#![warn(missing_docs)]

mod cache;
mod device_cache;
pub mod file;
mod keep;
mod layer;
pub mod storage;

use std::path::PathBuf;

pub use cache::{CacheMark, ContextUsage, KvCache};
pub use file::{CacheFileMeta, FORMAT_NAME, FORMAT_VERSION};
pub use keep::{KeepMask, LayerKeep};
pub use layer::{LayerCache, MIN_HEAD_SLACK};
pub use storage::{AppendAt, DeviceKv, KvBuffers, KvStorage};

/// Errors of the KV cache crate.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A tensor or mask has the wrong shape, or an index is out of range; the message names it.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The storage failed (device error, out of memory, an argument on the wrong device).
    #[error("KV cache storage: {0}")]
    Device(String),
    /// A [`CacheMark`] does not fit the cache it is applied to.
    #[error("invalid cache mark: {0}")]
    InvalidMark(String),
    /// Reading or writing a cache file failed.
    #[error("KV cache file {path}: {source}")]
    Io {
        /// The file (or directory) involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A cache file is truncated, foreign, of another version or internally inconsistent.
    #[error("KV cache file {path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// A valid cache file made for another model or another prompt/context.
    #[error("KV cache file {path} does not match: {msg}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs and how to fix it.
        msg: String,
    },
}
