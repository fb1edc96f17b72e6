//! Architecture registry: one file per architecture, one line per registration.

use std::path::Path;

use crate::config::RawConfig;
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use crate::weights::Weights;

pub mod gemma3;
pub mod llama;
pub mod qwen2;
pub mod qwen3;

/// Builds a model from its parsed config and weights.
pub type Loader = fn(&RawConfig, &Weights) -> Result<Box<dyn CausalLm>>;

/// `(architectures[0] name, loader)` for every supported architecture.
/// Adding a model: write `models/<name>.rs` with a `load` function and add one line here.
pub const REGISTRY: &[(&str, Loader)] = &[
    ("LlamaForCausalLM", llama::load),
    ("Qwen2ForCausalLM", qwen2::load),
    ("Qwen3ForCausalLM", qwen3::load),
    ("Gemma3ForCausalLM", gemma3::load),
    ("Gemma3ForConditionalGeneration", gemma3::load),
];

/// Finds the loader for `raw.architecture`, or a clear error listing the supported ones.
pub fn loader_for(raw: &RawConfig) -> Result<Loader> {
    REGISTRY
        .iter()
        .find(|(name, _)| *name == raw.architecture)
        .map(|(_, l)| *l)
        .ok_or_else(|| ModelError::UnsupportedArchitecture {
            path: raw.path.clone(),
            name: raw.architecture.clone(),
            supported: REGISTRY
                .iter()
                .map(|(n, _)| *n)
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
