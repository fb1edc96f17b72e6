//! LLaMA (`LlamaForCausalLM`): pre-norm decoder, SwiGLU, RoPE (default/linear/llama3/yarn).

use crate::config::{ModelSpec, RawConfig};
use crate::error::Result;
use crate::model::{CausalLm, DecoderStack};
use crate::weights::Weights;

/// A LLaMA model.
pub struct Llama(DecoderStack);

/// Loads a LLaMA checkpoint.
/// The normalised description of a LLaMA config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    raw.base_spec()
}

/// Loads a LLaMA checkpoint.
pub fn load(raw: &RawConfig, w: &Weights) -> Result<Box<dyn CausalLm>> {
    let spec = spec(raw)?;
    Ok(Box::new(Llama(DecoderStack::load(
        w,
        "model",
        "lm_head.weight",
        spec,
    )?)))
}

super::impl_causal_lm_for_stack!(Llama);
