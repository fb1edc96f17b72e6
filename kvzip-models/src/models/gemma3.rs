//! Gemma 3 text model (`Gemma3ForCausalLM`, and the text tower of
//! `Gemma3ForConditionalGeneration`): sandwich norms with `(1 + w)` weights, GeGLU (tanh),
//! q/k-norm, `query_pre_attn_scalar` scaling, scaled embeddings, and interleaved sliding-window
//! (local RoPE base) and global layers.

use crate::config::{Activation, ModelSpec, RawConfig};
use crate::error::{ModelError, Result};
use crate::layers::DecoderNames;
use crate::loader::WeightLoader;
use crate::model::{CausalLm, DecoderStack};

/// A Gemma 3 text model.
pub struct Gemma3(DecoderStack);

/// The normalised description of a Gemma 3 config (no weights read).
pub fn spec(raw: &RawConfig) -> Result<ModelSpec> {
    let mut spec = raw.base_spec()?;
    spec.norm_weight_offset = 1.0;
    spec.qk_norm = true;
    spec.sandwich_norms = true;
    spec.tie_word_embeddings = raw.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    spec.activation = match raw
        .get("hidden_activation")
        .or_else(|| raw.get("hidden_act"))
        .and_then(|v| v.as_str())
        .unwrap_or("gelu_pytorch_tanh")
    {
        "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
        other => {
            return Err(ModelError::Config {
                path: raw.path.clone(),
                field: "hidden_activation".into(),
                msg: format!("{other:?} is not supported for gemma3; expected gelu_pytorch_tanh"),
            })
        }
    };
    let qpas = raw.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
    spec.attn_scale = (qpas as f32).powf(-0.5);
    spec.embed_scale = (spec.hidden_size as f64).sqrt() as f32;

    let pattern = raw
        .opt_usize("sliding_window_pattern")?
        .or(raw.opt_usize("_sliding_window_pattern")?)
        .or(Some(6));
    let sliding = raw.layer_is_sliding(spec.n_layers(), pattern)?;
    let window = raw.opt_usize("sliding_window")?.unwrap_or(4096);
    let d = spec.head_dim;
    let global_rope = raw.rope_for("full_attention", 1_000_000.0, d)?;
    let local_rope = if raw
        .get("rope_parameters")
        .and_then(|p| p.get("sliding_attention"))
        .is_some()
    {
        raw.rope_for("sliding_attention", 10_000.0, d)?
    } else {
        let base = raw.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0);
        raw.rope_from_object("rope_local_base_freq", None, base, d)?
    };
    for (l, s) in sliding.into_iter().enumerate() {
        let layer = &mut spec.layers[l];
        if s {
            layer.window = Some(window);
            layer.rope = local_rope.clone();
        } else {
            layer.window = None;
            layer.rope = global_rope.clone();
        }
    }
    if spec.eos_token_ids.is_empty() {
        spec.eos_token_ids = vec![1, 106];
    }
    Ok(spec)
}

/// Loads a Gemma 3 model (text-only, or the language tower of a multimodal checkpoint, whose
/// decoder is nested under `model.language_model` or `language_model.model`).
pub fn load(spec: ModelSpec, w: &WeightLoader<'_>) -> Result<Box<dyn CausalLm>> {
    let names = if w.contains("model.embed_tokens.weight", true) {
        DecoderNames::llama("model", "lm_head.weight")
    } else if w.contains("model.language_model.embed_tokens.weight", false) {
        DecoderNames::llama("model.language_model", "lm_head.weight")
    } else {
        DecoderNames::llama("language_model.model", "language_model.lm_head.weight")
    };
    Ok(Box::new(Gemma3(DecoderStack::load(w, &names, spec)?)))
}

super::impl_causal_lm_for_stack!(Gemma3);
