//! Model graphs, weight loading and the KVzip engine of kvzip-rs, for every device.
//!
//! Layout:
//! - [`config`]: `config.json` → [`config::ModelSpec`] (both transformers 4.x and 5.x spellings).
//! - [`weights`]: memory-mapped safetensors, single or sharded; [`loader`]: weights onto a
//!   device (checkpoint converted per tensor, or seeded random values for benchmarks).
//! - [`layers`] / [`model`]: shared blocks, the [`model::CausalLm`] trait and the generic
//!   decoder, whose forward is written once over the `kvzip-kernels` device interface.
//! - [`models`]: one file per architecture plus the registry.
//! - [`engine`]: chunked prefill, generation, KVzip scoring, pruning and answering on any device.
//!
//! Model acquisition (fetching, GGUF import) lives in `kvzip-hub`.

pub mod batch;
pub mod config;
pub mod engine;
pub mod error;
pub mod fingerprint;
pub mod layers;
pub mod loader;
pub mod model;
pub mod models;
pub mod weights;

pub use config::{ModelSpec, RawConfig};
pub use error::{ModelError, Result};
pub use kvzip_cache::KvCache;
pub use kvzip_kernels::Device;
pub use loader::{q8_activations_from_env, HostWeights};
pub use model::{AttentionHook, CacheStep, CausalLm, ForwardOptions, LogitsMode, Scratch, StepKv};
pub use models::{load_model_dir, load_model_dir_on, load_model_dir_with};
