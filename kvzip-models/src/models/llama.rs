//! LLaMA (`LlamaForCausalLM`): pre-norm decoder, SwiGLU, RoPE (default/linear/llama3/yarn).

use crate::config::{ModelSpec, RawConfig};
use crate::error::Result;
use crate::loader::WeightLoader;
use crate::model::{CausalLm, DecoderStack};

/// A LLaMA model.
pub struct Llama(DecoderStack);

/// The normalised description of a LLaMA config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    raw.base_spec()
}

/// Loads a LLaMA model (HF LLaMA names) from `w` onto its device.
pub fn load(spec: ModelSpec, w: &WeightLoader<'_>) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(Llama(super::llama_stack(spec, w)?)))
}

super::impl_causal_lm_for_stack!(Llama);
