//! Architecture registry: one file per architecture, one line per registration.
//!
//! An architecture file provides `spec(&RawConfig) -> Result<ModelSpec>` (its config → the
//! normalised description) and `load(ModelSpec, &WeightLoader) -> Result<Box<dyn CausalLm>>`
//! (its weight names and forward graph: usually the shared [`DecoderStack`] with its
//! [`DecoderNames`]). Both devices run it: the loader puts the weights on the engine's device
//! and the forward is written against the device interface.

use std::path::Path;

use kvzip_kernels::Device;

use crate::config::{ModelSpec, RawConfig};
use crate::error::{ModelError, Result};
use crate::layers::DecoderNames;
use crate::loader::{HostWeights, WeightLoader, WeightSource};
use crate::model::{CausalLm, DecoderStack};
use crate::weights::Weights;

pub mod gemma3;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

/// Builds a model from its spec and a weight loader (checkpoint or random, any device).
pub type Loader = fn(ModelSpec, &WeightLoader<'_>) -> Result<Box<dyn CausalLm>>;

/// Derives the normalised [`ModelSpec`] from a parsed config alone.
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
    ("MistralForCausalLM", mistral::spec, mistral::load),
    ("Phi3ForCausalLM", phi3::spec, phi3::load),
];

/// The spec function for `raw.architecture` (same errors as [`loader_for`]).
pub fn spec_for(raw: &RawConfig) -> Result<SpecFn> {
    arch(&raw.architecture, &raw.path).map(|(_, s, _)| *s)
}

/// Loads only the normalised description of the model in `dir` (reads config.json only).
pub fn load_spec(dir: &Path) -> Result<ModelSpec> {
    let raw = RawConfig::load(&dir.join("config.json"))?;
    spec_for(&raw)?(&raw)
}

/// Finds the loader for `raw.architecture`, or a clear error listing the supported ones.
pub fn loader_for(raw: &RawConfig) -> Result<Loader> {
    arch(&raw.architecture, &raw.path).map(|(_, _, l)| *l)
}

fn arch(name: &str, path: &Path) -> Result<&'static (&'static str, SpecFn, Loader)> {
    REGISTRY.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
        ModelError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            name: name.to_owned(),
            supported: REGISTRY
                .iter()
                .map(|(n, _, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        }
    })
}

/// Loads the model in `dir` (config.json + safetensors weights) on the CPU.
pub fn load_model_dir(dir: &Path) -> Result<Box<dyn CausalLm>> {
    load_model_dir_on(dir, &Device::Cpu)
}

/// Loads the model in `dir` onto `device` (weights converted per tensor from the mapped file;
/// host matrices as [`HostWeights::from_env`] says).
pub fn load_model_dir_on(dir: &Path, device: &Device) -> Result<Box<dyn CausalLm>> {
    load_model_dir_with(dir, device, HostWeights::from_env())
}

/// [`load_model_dir_on`] with an explicit choice of how the host holds weight matrices.
pub fn load_model_dir_with(
    dir: &Path,
    device: &Device,
    host_weights: HostWeights,
) -> Result<Box<dyn CausalLm>> {
    let raw = RawConfig::load(&dir.join("config.json"))?;
    let (spec_fn, loader) = (spec_for(&raw)?, loader_for(&raw)?);
    let spec = spec_fn(&raw)?;
    spec.check_fits(device)?;
    let source = WeightSource::Checkpoint(Weights::open_dir(dir)?);
    loader(
        spec,
        &WeightLoader::new(device, &source).with_host_weights(host_weights),
    )
}

/// A model of `spec`'s architecture with seeded random weights on `device`.
pub fn random_model(spec: ModelSpec, device: &Device, seed: u64) -> Result<Box<dyn CausalLm>> {
    let loader = arch(&spec.architecture, Path::new("<random>"))?.2;
    let source = WeightSource::Random { seed };
    loader(spec, &WeightLoader::new(device, &source))
}

/// The shared decoder with LLaMA names under `model.` and `lm_head.weight`.
pub(crate) fn llama_stack(spec: ModelSpec, w: &WeightLoader<'_>) -> Result<DecoderStack> {
    DecoderStack::load(w, &DecoderNames::llama("model", "lm_head.weight"), spec)
}

/// Implements [`CausalLm`] for a newtype around [`DecoderStack`].
macro_rules! impl_causal_lm_for_stack {
    ($t:ty) => {
        impl $crate::model::CausalLm for $t {
            fn spec(&self) -> &$crate::config::ModelSpec {
                self.0.spec()
            }
            fn device(&self) -> &kvzip_kernels::Device {
                self.0.device()
            }
            fn forward(
                &self,
                ids: &[u32],
                cache: &mut kvzip_cache::KvCache,
                scratch: &mut $crate::model::Scratch,
                opts: $crate::model::ForwardOptions<'_>,
            ) -> $crate::error::Result<Option<kvzip_kernels::Tensor>> {
                self.0.forward(ids, cache, scratch, opts)
            }
            fn forward_step(
                &self,
                ids: &[u32],
                step: &mut dyn $crate::model::StepKv,
                scratch: &mut $crate::model::Scratch,
                opts: $crate::model::ForwardOptions<'_>,
            ) -> $crate::error::Result<Option<kvzip_kernels::Tensor>> {
                self.0.forward_step(ids, step, scratch, opts)
            }
            fn weight_bytes(&self) -> usize {
                self.0.weight_bytes()
            }
            fn layer(&self, l: usize) -> Option<&$crate::layers::DecoderLayer> {
                self.0.layer(l)
            }
        }
    };
}
pub(crate) use impl_causal_lm_for_stack;
