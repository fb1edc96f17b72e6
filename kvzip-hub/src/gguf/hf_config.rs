//! `config.json` (HF field names, transformers 4.x spellings) from GGUF metadata.

use serde_json::{json, Value};

use super::names::Arch;
use super::reader::GgufFile;
use super::{GgufError, Result};

/// Facts about the model taken from its tensors rather than its metadata.
#[derive(Debug, Clone, Copy)]
pub struct TensorFacts {
    /// Rows of `token_embd` (the real vocabulary size of the weights).
    pub vocab_size: usize,
    /// Whether the file has a separate `output.weight` (then embeddings are not tied).
    pub has_output: bool,
    /// Whether `attn_q.bias` exists (Qwen2-style attention bias).
    pub has_qkv_bias: bool,
}

/// Every `gemma3` layer `i` with `(i + 1) % GEMMA3_GLOBAL_EVERY == 0` uses full attention.
pub const GEMMA3_GLOBAL_EVERY: usize = 6;
/// RoPE base of Gemma 3's sliding-window layers (not stored in GGUF metadata).
pub const GEMMA3_LOCAL_ROPE_BASE: f64 = 10_000.0;

/// Builds the `config.json` value for `file` of architecture `arch`.
pub fn build_config(file: &GgufFile, arch: Arch, facts: TensorFacts) -> Result<Value> {
    let p = arch.gguf_name();
    let key = |k: &str| format!("{p}.{k}");
    // Every count that sizes an allocation is bounded here, before a config is written.
    let need = |k: &str| -> Result<usize> {
        let v = file.require_u64(&key(k))?;
        let limit: u64 = match k {
            "block_count" | "attention.head_count" => 1 << 10,
            "embedding_length" => 1 << 17,
            "feed_forward_length" => 1 << 20,
            "context_length" => 1 << 24,
            _ => 1 << 32,
        };
        if v == 0 || v > limit {
            return Err(import_err(
                file,
                format!("{p}.{k} is {v}: outside 1..={limit}, the file's metadata is corrupt"),
            ));
        }
        Ok(v as usize)
    };
    let hidden = need("embedding_length")?;
    let n_layers = need("block_count")?;
    let n_heads = need("attention.head_count")?;
    let n_kv = file
        .opt_u64(&key("attention.head_count_kv"))?
        .map_or(n_heads, |v| v as usize);
    if n_heads == 0 || n_kv == 0 || n_heads % n_kv != 0 {
        return Err(import_err(
            file,
            format!("head counts {n_heads} (q) / {n_kv} (kv) are invalid"),
        ));
    }
    let head_dim = match file.opt_u64(&key("attention.key_length"))? {
        Some(d) => d as usize,
        None => hidden / n_heads,
    };
    if let Some(rot) = file.opt_u64(&key("rope.dimension_count"))? {
        if rot as usize != head_dim {
            return Err(import_err(
                file,
                format!("partial rotary embeddings (rope.dimension_count {rot} != head_dim {head_dim}) are not supported"),
            ));
        }
    }
    if let Some(v) = file.opt_u64(&key("vocab_size"))? {
        if v as usize != facts.vocab_size {
            return Err(import_err(
                file,
                format!(
                    "{p}.vocab_size is {v} but token_embd has {} rows",
                    facts.vocab_size
                ),
            ));
        }
    }
    let eps = file
        .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-6);
    let default_theta = if arch == Arch::Llama {
        10_000.0
    } else {
        1_000_000.0
    };
    let rope_theta = file
        .opt_f64(&key("rope.freq_base"))?
        .unwrap_or(default_theta);
    let ctx = file.opt_u64(&key("context_length"))?.unwrap_or(2048);
    let token_id = |k: &str| -> Result<Value> {
        Ok(file
            .opt_u64(&format!("tokenizer.ggml.{k}"))?
            .map_or(Value::Null, Value::from))
    };

    let mut c = json!({
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": round_f32(eps),
        "rope_theta": rope_theta,
        "max_position_embeddings": ctx,
        "vocab_size": facts.vocab_size,
        "tie_word_embeddings": !facts.has_output,
        "bos_token_id": token_id("bos_token_id")?,
        "eos_token_id": token_id("eos_token_id")?,
        "pad_token_id": token_id("padding_token_id")?,
        "torch_dtype": "float32",
        "rope_scaling": rope_scaling(file, p)?,
    });
    let obj = c
        .as_object_mut()
        .ok_or_else(|| import_err(file, "internal: config is not an object".into()))?;
    let mut set = |k: &str, v: Value| {
        obj.insert(k.to_string(), v);
    };
    match arch {
        Arch::Llama => {
            set("architectures", json!(["LlamaForCausalLM"]));
            set("model_type", json!("llama"));
            set("hidden_act", json!("silu"));
            set("attention_bias", json!(facts.has_qkv_bias));
            set("mlp_bias", json!(false));
        }
        Arch::Qwen2 => {
            set("architectures", json!(["Qwen2ForCausalLM"]));
            set("model_type", json!("qwen2"));
            set("hidden_act", json!("silu"));
            set("use_sliding_window", json!(false));
            set("sliding_window", Value::Null);
        }
        Arch::Qwen3 => {
            set("architectures", json!(["Qwen3ForCausalLM"]));
            set("model_type", json!("qwen3"));
            set("hidden_act", json!("silu"));
            set("attention_bias", json!(facts.has_qkv_bias));
            set("use_sliding_window", json!(false));
            set("sliding_window", Value::Null);
        }
        Arch::Gemma3 => {
            set("architectures", json!(["Gemma3ForCausalLM"]));
            set("model_type", json!("gemma3_text"));
            set("hidden_activation", json!("gelu_pytorch_tanh"));
            let window = file.opt_u64(&key("attention.sliding_window"))?;
            set("sliding_window", window.map_or(Value::Null, Value::from));
            let layer_types: Vec<&str> = (0..n_layers)
                .map(|i| {
                    if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 {
                        "full_attention"
                    } else {
                        "sliding_attention"
                    }
                })
                .collect();
            set("layer_types", json!(layer_types));
            set("sliding_window_pattern", json!(GEMMA3_GLOBAL_EVERY));
            set("rope_local_base_freq", json!(GEMMA3_LOCAL_ROPE_BASE));
            let scalar = file.opt_f64(&key("attention.query_pre_attn_scalar"))?;
            set(
                "query_pre_attn_scalar",
                scalar.map_or(json!(head_dim), |s| json!(s)),
            );
            let softcap = |k: &str| -> Result<Value> {
                Ok(file.opt_f64(&key(k))?.map_or(Value::Null, |v| json!(v)))
            };
            set(
                "final_logit_softcapping",
                softcap("final_logit_softcapping")?,
            );
            set("attn_logit_softcapping", softcap("attn_logit_softcapping")?);
            set("attention_bias", json!(false));
        }
    }
    Ok(c)
}

/// `rope_scaling` from `{arch}.rope.scaling.*`: `null` when absent or `none`, `linear` with its
/// factor; other kinds are refused rather than silently ignored.
fn rope_scaling(file: &GgufFile, p: &str) -> Result<Value> {
    match file.opt_str(&format!("{p}.rope.scaling.type"))? {
        None | Some("none") => Ok(Value::Null),
        Some("linear") => {
            let factor = file
                .opt_f64(&format!("{p}.rope.scaling.factor"))?
                .unwrap_or(1.0);
            Ok(json!({"rope_type": "linear", "factor": factor}))
        }
        Some(other) => Err(import_err(
            file,
            format!("RoPE scaling type {other:?} is not supported by the importer"),
        )),
    }
}

/// The f32 value printed with f32 precision (1e-5 rather than 9.999999747378752e-06).
fn round_f32(x: f64) -> Value {
    let short: f64 = format!("{}", x as f32).parse().unwrap_or(x);
    json!(short)
}

fn import_err(file: &GgufFile, what: String) -> GgufError {
    GgufError::Import {
        path: file.path().to_path_buf(),
        what,
    }
}
