//! Architecture registry: one file per architecture, one line per registration.

use std::path::Path;

use crate::config::{ModelSpec, RawConfig};
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use crate::weights::Weights;

pub mod gemma3;
pub mod llama;
pub mod qwen2;
pub mod qwen3;

/// Builds a model from its parsed config and weights.
pub type Loader = fn(&RawConfig, &Weights) -> Result<Box<dyn CausalLm>>;

/// Derives the normalised [`ModelSpec`] from a parsed config alone (the GPU path loads its
/// own weights and needs only this).
pub type SpecFn = fn(&RawConfig) -> Result<ModelSpec>;

/// `(architectures[0] name, spec, loader)` for every supported architecture.
/// Adding a model: write `models/<name>.rs` with `spec` and `load` functions and add one line
/// here.
pub const REGISTRY: &[(&str, SpecFn, Loader)] = &[
    ("LlamaForCausalLM", llama::spec, llama::load),
    ("Qwen2ForCausalLM", qwen2::spec, qwen2::load),
    ("Qwen3ForCausalLM", qwen3::spec, qwen3::load),
    ("Gemma3ForCausalLM", gemma3::spec, gemma3::load),
    ("Gemma3ForConditionalGeneration", gemma3::spec, gemma3::load),
];

/// The spec function for `raw.architecture` (same errors as [`loader_for`]).
pub fn spec_for(raw: &RawConfig) -> Result<SpecFn> {
    arch(raw).map(|(_, s, _)| *s)
}

/// Loads only the normalised description of the model in `dir` (reads config.json only).
pub fn load_spec(dir: &Path) -> Result<ModelSpec> {
    let raw = RawConfig::load(&dir.join("config.json"))?;
    spec_for(&raw)?(&raw)
}

/// Finds the loader for `raw.architecture`, or a clear error listing the supported ones.
pub fn loader_for(raw: &RawConfig) -> Result<Loader> {
    arch(raw).map(|(_, _, l)| *l)
}

fn arch(raw: &RawConfig) -> Result<&'static (&'static str, SpecFn, Loader)> {
    REGISTRY
        .iter()
        .find(|(name, _, _)| *name == raw.architecture)
        .ok_or_else(|| ModelError::UnsupportedArchitecture {
            path: raw.path.clone(),
            name: raw.architecture.clone(),
            supported: REGISTRY
                .iter()
                .map(|(n, _, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Loads the model in `dir` (config.json + safetensors weights) on the CPU.
pub fn load_model_dir(dir: &Path) -> Result<Box<dyn CausalLm>> {
    let raw = RawConfig::load(&dir.join("config.json"))?;
    let loader = loader_for(&raw)?;
    let weights = Weights::open_dir(dir)?;
    loader(&raw, &weights)
}

/// Implements [`CausalLm`] for a newtype around [`crate::model::DecoderStack`].
macro_rules! impl_causal_lm_for_stack {
    ($t:ty) => {
        impl $crate::model::CausalLm for $t {
            fn spec(&self) -> &$crate::config::ModelSpec {
                self.0.spec()
            }
            fn forward(
                &self,
                ids: &[u32],
                cache: &mut kvzip_cache::KvCache,
                opts: $crate::model::ForwardOptions<'_>,
            ) -> $crate::error::Result<Vec<f32>> {
                self.0.forward(ids, cache, opts)
            }
        }
    };
}
pub(crate) use impl_causal_lm_for_stack;
