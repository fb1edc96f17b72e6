//! Qwen3 (`Qwen3ForCausalLM`): LLaMA layout with per-head RMSNorm on q and k before RoPE.

use crate::config::{ModelSpec, RawConfig};
use crate::error::Result;
use crate::loader::WeightLoader;
use crate::model::{CausalLm, DecoderStack};

/// A Qwen3 model.
pub struct Qwen3(DecoderStack);

/// The normalised description of a Qwen3 config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    let mut spec = raw.base_spec()?;
    spec.qk_norm = true;
    raw.apply_sliding_layers(&mut spec)?;
    Ok(spec)
}

/// Loads a Qwen3 model (HF LLaMA names) from `w` onto its device.
pub fn load(spec: ModelSpec, w: &WeightLoader<'_>) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(Qwen3(super::llama_stack(spec, w)?)))
}

super::impl_causal_lm_for_stack!(Qwen3);
