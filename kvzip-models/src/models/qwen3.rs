//! Qwen3 (`Qwen3ForCausalLM`): LLaMA layout with per-head RMSNorm on q and k before RoPE.

use crate::config::{ModelSpec, RawConfig};
use crate::error::Result;
use crate::model::{CausalLm, DecoderStack};
use crate::weights::Weights;

/// A Qwen3 model.
pub struct Qwen3(DecoderStack);

/// Loads a Qwen3 checkpoint.
/// The normalised description of a Qwen3 config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    let mut spec = raw.base_spec()?;
    spec.qk_norm = true;
    raw.apply_sliding_layers(&mut spec)?;
    Ok(spec)
}

/// Loads a Qwen3 checkpoint.
pub fn load(raw: &RawConfig, w: &Weights) -> Result<Box<dyn CausalLm>> {
    let spec = spec(raw)?;
    Ok(Box::new(Qwen3(DecoderStack::load(
        w,
        "model",
        "lm_head.weight",
        spec,
    )?)))
}

super::impl_causal_lm_for_stack!(Qwen3);
