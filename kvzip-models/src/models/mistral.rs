//! Mistral (`MistralForCausalLM`): LLaMA layout (no biases) where a non-null `sliding_window`
//! makes every layer a sliding-window layer (query `q` sees keys `q - window < k <= q`).

use crate::config::{ModelSpec, RawConfig};
use crate::error::Result;
use crate::loader::WeightLoader;
use crate::model::{CausalLm, DecoderStack};

/// A Mistral model.
pub struct Mistral(DecoderStack);

/// The normalised description of a Mistral config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    let mut spec = raw.base_spec()?;
    // HF's Mistral ignores `layer_types`: one window (or none) for all layers.
    raw.apply_sliding_window_to_all_layers(&mut spec)?;
    Ok(spec)
}

/// Loads a Mistral model (HF LLaMA names) from `w` onto its device.
pub fn load(spec: ModelSpec, w: &WeightLoader<'_>) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(Mistral(super::llama_stack(spec, w)?)))
}

super::impl_causal_lm_for_stack!(Mistral);
