//! Model graphs, weight loading and the KVzip engine of kvzip-rs.
//!
//! Layout:
//! - [`config`]: `config.json` → [`config::ModelSpec`] (both transformers 4.x and 5.x spellings).
//! - [`weights`]: memory-mapped safetensors, single or sharded.
//! - [`layers`] / [`model`]: shared blocks, the [`model::CausalLm`] trait and the generic decoder.
//! - [`models`]: one file per architecture plus the registry.
//! - [`engine`]: chunked prefill, generation, KVzip scoring and pruning.

pub mod config;
pub mod engine;
pub mod error;
pub mod layers;
pub mod model;
pub mod models;
pub mod weights;

pub use config::{ModelSpec, RawConfig};
pub use error::{ModelError, Result};
pub use model::{AttentionHook, CausalLm, ForwardOptions, LogitsMode};
pub use models::load_model_dir;

#[cfg(feature = "cuda")]
pub mod gpu;
