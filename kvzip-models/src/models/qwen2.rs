//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): LLaMA layout with q/k/v biases (o_proj has none).

use crate::config::{ModelSpec, RawConfig};
use crate::error::Result;
use crate::model::{CausalLm, DecoderStack};
use crate::weights::Weights;

/// A Qwen2 model.
pub struct Qwen2(DecoderStack);

/// Loads a Qwen2 checkpoint.
/// The normalised description of a Qwen2 config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    let mut spec = raw.base_spec()?;
    spec.qkv_bias = true;
    spec.o_bias = false;
    raw.apply_sliding_layers(&mut spec)?;
    Ok(spec)
}

/// Loads a Qwen2 checkpoint.
pub fn load(raw: &RawConfig, w: &Weights) -> Result<Box<dyn CausalLm>> {
    let spec = spec(raw)?;
    Ok(Box::new(Qwen2(DecoderStack::load(
        w,
        "model",
        "lm_head.weight",
        spec,
    )?)))
}

super::impl_causal_lm_for_stack!(Qwen2);
