//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): LLaMA layout with q/k/v biases (o_proj has none).

use crate::config::{ModelSpec, RawConfig};
use crate::error::Result;
use crate::loader::WeightLoader;
use crate::model::{CausalLm, DecoderStack};

/// A Qwen2 model.
pub struct Qwen2(DecoderStack);

/// The normalised description of a Qwen2 config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    let mut spec = raw.base_spec()?;
    spec.qkv_bias = true;
    spec.o_bias = false;
    raw.apply_sliding_layers(&mut spec)?;
    Ok(spec)
}

/// Loads a Qwen2 model (HF LLaMA names) from `w` onto its device.
pub fn load(spec: ModelSpec, w: &WeightLoader<'_>) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(Qwen2(super::llama_stack(spec, w)?)))
}

super::impl_causal_lm_for_stack!(Qwen2);
