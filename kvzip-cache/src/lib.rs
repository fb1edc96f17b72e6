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
//! Operations: [`KvCache::append`] / [`KvCache::append_rows`] (token-major
//! `[t, n_kv_heads, head_dim]` input, geometric growth per layer; engines stepping every layer
//! use [`KvCache::begin_step`] + [`KvCache::write_step`]), [`KvCache::mark`] /
//! [`KvCache::rollback`] (exact slice-back after an
//! `update_cache = false` query, earlier kept turns included), [`KvCache::compact`] (evict mode)
//! and [`KvCache::compacted_view`] (retain mode) from a [`KeepMask`], [`KvCache::trim_front`]
//! (sliding-window layers), memory accounting ([`KvCache::bytes`], [`KvCache::kv_bytes_used`],
//! [`KvCache::context_usage`]) and [`KvCache::save`] / [`KvCache::load`] (one safetensors file,
//! see [`mod@file`]).

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
