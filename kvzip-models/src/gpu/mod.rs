//! The CUDA path (feature `cuda`): the same decoder and KVzip engine on a GPU, bf16 weights and
//! cache, f32 accumulation.
//!
//! - [`model`]: weights on the device ([`GpuModel`]), loaded from any registered architecture's
//!   checkpoint or filled with seeded random values for benchmarks.
//! - [`cache`]: the per-head variable-length KV cache on the device ([`GpuKvCache`]).
//! - [`forward`]: one forward step; decode steps use the split-K varlen kernel.
//! - [`engine`]: [`GpuEngine`] / [`GpuContextCache`], mirroring the CPU engine's API.

pub mod cache;
pub mod engine;
pub mod forward;
pub mod model;

pub use cache::GpuKvCache;
pub use engine::{GpuContextCache, GpuEngine};
pub use model::GpuModel;
