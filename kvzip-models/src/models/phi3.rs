//! Phi-3 (`Phi3ForCausalLM`): LLaMA layout with FUSED projections (`self_attn.qkv_proj` =
//! q rows, then k rows, then v rows; `mlp.gate_up_proj` = gate rows, then up rows: exactly the
//! stacked layout the decoder keeps, so they load as they are), `longrope` scaling (short /
//! long factor lists, chosen per forward from its largest position) with
//! `partial_rotary_factor`, and an optional `sliding_window` applied to every layer.

use crate::config::{ModelSpec, RawConfig};
use crate::error::Result;
use crate::layers::{DecoderNames, Projection};
use crate::loader::WeightLoader;
use crate::model::{CausalLm, DecoderStack};

/// A Phi-3 model.
pub struct Phi3(DecoderStack);

/// The normalised description of a Phi-3 config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    let mut spec = raw.base_spec()?;
    raw.apply_sliding_window_to_all_layers(&mut spec)?;
    Ok(spec)
}

/// Phi-3's weight names: LLaMA's, with the fused projections.
pub fn names() -> DecoderNames {
    DecoderNames {
        qkv: Projection::Fused("self_attn.qkv_proj".into()),
        gate_up: Projection::Fused("mlp.gate_up_proj".into()),
        ..DecoderNames::llama("model", "lm_head.weight")
    }
}

/// Loads a Phi-3 model from `w` onto its device.
pub fn load(spec: ModelSpec, w: &WeightLoader<'_>) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(Phi3(DecoderStack::load(w, &names(), spec)?)))
}

super::impl_causal_lm_for_stack!(Phi3);
