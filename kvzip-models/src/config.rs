//! `config.json` parsing into a normalised [`ModelSpec`].
//!
//! Reads both spellings transformers has used: the 4.x fields (`rope_theta`, `rope_scaling`,
//! `rope_local_base_freq`, `sliding_window_pattern`) and the 5.x ones (`rope_parameters`, per layer
//! type for Gemma3, and `layer_types`). Every field that changes the math is captured; missing
//! required fields are errors naming the field. RoPE types: default, linear, llama3, yarn and
//! longrope (legacy `su`; Phi-3 keeps its `original_max_position_embeddings` at the top level),
//! with `partial_rotary_factor` from the rope object or the top level.

use std::path::{Path, PathBuf};

use kvzip_kernels::rope::{RopeParams, RopeScaling};
use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// Activation of the gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (LLaMA, Qwen).
    Silu,
    /// `gelu_tanh(gate) * up` (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// Per-layer attention settings.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// Sliding window in tokens (`None` = full/global attention).
    pub window: Option<usize>,
    /// Rotary embedding parameters of this layer.
    pub rope: RopeParams,
}

/// Normalised description of a decoder-only transformer, independent of the config spelling.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The `architectures[0]` string of the config (e.g. `LlamaForCausalLM`).
    pub architecture: String,
    /// `model_type` of the (text) config.
    pub model_type: String,
    /// Vocabulary size (rows of the embedding / logits width).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of KV heads (GQA group = n_heads / n_kv_heads).
    pub n_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Added to every RMSNorm weight (0 for LLaMA/Qwen, 1 for Gemma's `(1 + w)` form).
    pub norm_weight_offset: f32,
    /// MLP activation.
    pub activation: Activation,
    /// q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// o_proj carries a bias.
    pub o_bias: bool,
    /// MLP projections carry a bias.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma3).
    pub qk_norm: bool,
    /// Gemma-style extra norms after attention and around the MLP.
    pub sandwich_norms: bool,
    /// The output projection reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Attention logit scale (1/sqrt(head_dim), or `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f32,
    /// Attention logit soft-capping, if the config sets it.
    pub attn_softcap: Option<f32>,
    /// Final logit soft-capping, if the config sets it.
    pub final_softcap: Option<f32>,
    /// Multiplier of the token embeddings (Gemma: sqrt(hidden_size)).
    pub embed_scale: f32,
    /// Maximum positions the model supports.
    pub max_position_embeddings: usize,
    /// Per-layer settings, `num_hidden_layers` entries.
    pub layers: Vec<LayerSpec>,
    /// Beginning-of-sequence token id, if known.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
}

impl ModelSpec {
    /// Number of decoder layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// KV heads per layer that KVzip scores and evicts: every global layer (`None` for
    /// sliding-window layers, which keep their window).
    pub fn kvzip_layer_heads(&self) -> Vec<Option<usize>> {
        (0..self.n_layers())
            .map(|l| self.is_global(l).then_some(self.n_kv_heads))
            .collect()
    }

    /// Errors when `seen + extra` tokens exceed `max_position_embeddings`.
    pub fn check_length(&self, seen: usize, extra: usize) -> crate::error::Result<()> {
        let max = self.max_position_embeddings;
        let total = seen + extra;
        if total > max {
            return Err(crate::error::ModelError::Input(format!(
                "{total} tokens exceed the model's max_position_embeddings {max}; shorten the context"
            )));
        }
        Ok(())
    }

    /// Parameters the weights hold (embedding, LM head unless tied, every layer's attention
    /// and MLP projections; norms and biases are negligible and left out).
    pub fn parameter_count(&self) -> u64 {
        let (h, d, inter) = (
            self.hidden_size as u64,
            self.head_dim as u64,
            self.intermediate_size as u64,
        );
        let (nq, nkv) = (self.n_heads as u64, self.n_kv_heads as u64);
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let layer = h * (nq + 2 * nkv) * d + nq * d * h + 3 * h * inter;
        embed + head + self.n_layers() as u64 * layer
    }

    /// Refuses a model whose weights cannot fit `device` (f32 on the CPU, bf16 on CUDA) before
    /// anything is allocated, naming the config fields that size them.
    pub fn check_fits(&self, device: &kvzip_kernels::Device) -> crate::error::Result<()> {
        let per = if device.is_cuda() { 2 } else { 4 };
        let need = self.parameter_count().saturating_mul(per);
        if let Some(avail) = device.memory_available() {
            if need > avail {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                return Err(crate::error::ModelError::Input(format!(
                    "the weights need {:.1} GiB on {} ({} layers x hidden_size {} x \
                     intermediate_size {}, vocab_size {}), only {:.1} GiB are available; check \
                     config.json or use a machine with more memory",
                    gib(need),
                    device.name(),
                    self.n_layers(),
                    self.hidden_size,
                    self.intermediate_size,
                    self.vocab_size,
                    gib(avail)
                )));
            }
        }
        Ok(())
    }

    /// Whether layer `l` uses global (full) attention: these are the layers KVzip scores and evicts.
    pub fn is_global(&self, l: usize) -> bool {
        self.layers.get(l).is_some_and(|s| s.window.is_none())
    }
}

/// A parsed config file: the raw JSON of the text model plus where it came from.
#[derive(Debug, Clone)]
pub struct RawConfig {
    /// Path of the config file (for error messages).
    pub path: PathBuf,
    /// `architectures[0]` of the top-level config.
    pub architecture: String,
    /// The text-model config object (`text_config` for multimodal wrappers, else the top level).
    pub text: Map<String, Value>,
    /// The top-level object.
    pub top: Map<String, Value>,
}

/// Upper bound of an integer config field (far above every released model): layers 1,024,
/// heads 1,024, head_dim 1,024, hidden 131,072, intermediate 1,048,576, vocabulary 4,194,304,
/// positions 16,777,216; other fields 2^32.
pub fn field_limit(field: &str) -> u64 {
    let name = field.rsplit('.').next().unwrap_or(field);
    match name {
        "num_hidden_layers" | "n_layer" | "num_layers" => 1 << 10,
        "num_attention_heads" | "num_key_value_heads" | "n_head" => 1 << 10,
        "head_dim" => 1 << 10,
        "hidden_size" | "n_embd" => 1 << 17,
        "intermediate_size" => 1 << 20,
        "vocab_size" => 1 << 22,
        "max_position_embeddings" | "original_max_position_embeddings" | "sliding_window" => {
            1 << 24
        }
        _ => 1 << 32,
    }
}

impl RawConfig {
    /// Reads and parses `path` (a `config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &bytes)
    }

    /// Parses config JSON bytes; `path` is used in error messages only.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            field: "<root>".into(),
            msg: format!("not valid JSON ({e}); regenerate the file with save_pretrained"),
        })?;
        let Value::Object(top) = value else {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                field: "<root>".into(),
                msg: "expected a JSON object".into(),
            });
        };
        let architecture = match top.get("architectures") {
            Some(Value::Array(a)) => a.first().and_then(|v| v.as_str()).map(str::to_owned),
            _ => None,
        }
        .ok_or_else(|| ModelError::Config {
            path: path.to_path_buf(),
            field: "architectures".into(),
            msg: "missing or empty; add e.g. [\"LlamaForCausalLM\"]".into(),
        })?;
        let text = match top.get("text_config") {
            Some(Value::Object(t)) => t.clone(),
            _ => top.clone(),
        };
        Ok(Self {
            path: path.to_path_buf(),
            architecture,
            text,
            top,
        })
    }

    fn err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: self.path.clone(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// The value of `field` in the text config, falling back to the top level.
    pub fn get(&self, field: &str) -> Option<&Value> {
        match self.text.get(field) {
            Some(Value::Null) | None => match self.top.get(field) {
                Some(Value::Null) | None => None,
                v => v,
            },
            v => v,
        }
    }

    /// A required non-negative integer field, within [`field_limit`].
    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "required field is missing"))
    }

    /// An optional non-negative integer field, within [`field_limit`]: sizes that come from a
    /// file are bounded before anything is allocated from them.
    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => {
                let x = v.as_u64().ok_or_else(|| {
                    self.err(field, format!("expected a non-negative integer, got {v}"))
                })?;
                let limit = field_limit(field);
                if x > limit {
                    return Err(self.err(
                        field,
                        format!(
                            "{x} is beyond any real model (at most {limit}); the config is corrupt"
                        ),
                    ));
                }
                Ok(Some(x as usize))
            }
        }
    }

    /// An optional number field.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }

    /// An optional boolean field.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true/false, got {v}"))),
        }
    }

    /// Token id list from a field that is either an integer or a list of integers.
    pub fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| self.err(field, format!("expected token ids, got {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| self.err(field, format!("expected a token id, got {v}"))),
        }
    }

    /// Parses one RoPE parameter object (`rope_parameters`, `rope_scaling`, or a per-layer-type
    /// entry). `theta_fallback` is used when the object has no `rope_theta`. `head_dim` is
    /// scaled by `partial_rotary_factor` (from the object, else the top level; default 1) to
    /// give the rotated dims, `int(head_dim * partial_rotary_factor)` as HF computes it.
    pub fn rope_from_object(
        &self,
        field: &str,
        obj: Option<&Map<String, Value>>,
        theta_fallback: f64,
        head_dim: usize,
    ) -> Result<RopeParams> {
        let max_pos = self.opt_usize("max_position_embeddings")?.unwrap_or(8192);
        let num = |k: &str| -> Result<Option<f64>> {
            let x = match obj.and_then(|o| o.get(k)) {
                None | Some(Value::Null) => return Ok(None),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| self.err(&format!("{field}.{k}"), "expected a number"))?,
            };
            // Frequencies and scale factors must be positive: 0 or NaN gives NaN rotations and
            // empty answers instead of an error.
            let positive = k == "rope_theta" || k.ends_with("factor") || k.starts_with("beta_");
            if !x.is_finite() || (positive && x <= 0.0) {
                return Err(self.err(
                    &format!("{field}.{k}"),
                    format!(
                        "must be a finite number{} (got {x})",
                        if positive { " > 0" } else { "" }
                    ),
                ));
            }
            Ok(Some(x))
        };
        let theta = num("rope_theta")?.unwrap_or(theta_fallback);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(self.err(
                "rope_theta",
                format!("must be a finite number > 0 (got {theta})"),
            ));
        }
        let (prf_field, prf) = match num("partial_rotary_factor")? {
            Some(p) => (format!("{field}.partial_rotary_factor"), p),
            None => (
                "partial_rotary_factor".to_owned(),
                self.opt_f64("partial_rotary_factor")?.unwrap_or(1.0),
            ),
        };
        if !(prf > 0.0 && prf <= 1.0) {
            return Err(self.err(&prf_field, format!("must be in (0, 1], got {prf}")));
        }
        let rotary_dim = (head_dim as f64 * prf) as usize;
        if rotary_dim == 0 || rotary_dim % 2 != 0 {
            return Err(self.err(
                &prf_field,
                format!(
                    "head_dim {head_dim} * {prf} gives {rotary_dim} rotated dims; it must be even and > 0"
                ),
            ));
        }
        let kind = obj
            .and_then(|o| o.get("rope_type").or_else(|| o.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let need = |k: &str| -> Result<f64> {
            num(k)?.ok_or_else(|| {
                self.err(
                    &format!("{field}.{k}"),
                    format!("required for rope_type {kind:?}"),
                )
            })
        };
        let orig_max = |fallback: usize| -> Result<usize> {
            Ok(num("original_max_position_embeddings")?
                .map(|x| x as usize)
                .unwrap_or(fallback))
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: need("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?
                    as usize,
            },
            "yarn" => RopeScaling::Yarn {
                factor: need("factor")?,
                original_max_position_embeddings: orig_max(max_pos)?,
                beta_fast: num("beta_fast")?.unwrap_or(32.0),
                beta_slow: num("beta_slow")?.unwrap_or(1.0),
                mscale: num("mscale")?,
                mscale_all_dim: num("mscale_all_dim")?,
                attention_factor: num("attention_factor")?,
                truncate: obj
                    .and_then(|o| o.get("truncate"))
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true),
            },
            // "su" is the name Phi-3 checkpoints used before "longrope".
            "longrope" | "su" => {
                let factors = |k: &str| -> Result<Vec<f64>> {
                    let key = format!("{field}.{k}");
                    let half = rotary_dim / 2;
                    let want = format!(
                        "a list of rotary_dim / 2 = {half} numbers (rotary_dim = head_dim {head_dim} * partial_rotary_factor {prf})"
                    );
                    let list = match obj.and_then(|o| o.get(k)) {
                        None | Some(Value::Null) => {
                            return Err(self.err(&key, format!("required for longrope: {want}")))
                        }
                        Some(Value::Array(a)) => a,
                        Some(v) => return Err(self.err(&key, format!("expected {want}, got {v}"))),
                    };
                    if list.len() != half {
                        return Err(self.err(
                            &key,
                            format!("has {} values; expected {want}", list.len()),
                        ));
                    }
                    list.iter()
                        .enumerate()
                        .map(|(i, v)| match v.as_f64() {
                            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                            _ => Err(self.err(
                                &format!("{key}[{i}]"),
                                format!("expected a positive number, got {v}"),
                            )),
                        })
                        .collect()
                };
                // HF gives a top-level `original_max_position_embeddings` (where Phi-3 keeps
                // it) priority over the one inside the rope object.
                let original = match self.opt_usize("original_max_position_embeddings")? {
                    Some(o) => o,
                    None => orig_max(max_pos)?,
                };
                if original == 0 {
                    return Err(self.err(
                        "original_max_position_embeddings",
                        "must be > 0 for longrope",
                    ));
                }
                RopeScaling::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    original_max_position_embeddings: original,
                    factor: num("factor")?,
                    attention_factor: num("attention_factor")?,
                }
            }
            other => {
                return Err(self.err(
                    &format!("{field}.rope_type"),
                    format!(
                        "unsupported rope type {other:?}; supported: default, linear, llama3, yarn, longrope (su)"
                    ),
                ))
            }
        };
        let params = RopeParams {
            theta,
            rotary_dim,
            scaling,
            max_position_embeddings: max_pos,
        };
        params
            .validate()
            .map_err(|e| self.err(field, e.to_string()))?;
        Ok(params)
    }

    fn object(&self, field: &str) -> Result<Option<&Map<String, Value>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(self.err(field, format!("expected an object, got {v}"))),
        }
    }

    /// Layer types from `layer_types` (`"full_attention"` / `"sliding_attention"`), or from a
    /// sliding-window pattern (every `pattern`-th layer global) when the list is absent.
    pub fn layer_is_sliding(&self, n_layers: usize, pattern: Option<usize>) -> Result<Vec<bool>> {
        if let Some(v) = self.get("layer_types") {
            let arr = v
                .as_array()
                .ok_or_else(|| self.err("layer_types", "expected a list of strings"))?;
            if arr.len() != n_layers {
                return Err(self.err(
                    "layer_types",
                    format!(
                        "has {} entries but num_hidden_layers is {n_layers}",
                        arr.len()
                    ),
                ));
            }
            return arr
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    _ => Err(self.err(
                        &format!("layer_types[{i}]"),
                        format!("expected \"full_attention\" or \"sliding_attention\", got {t}"),
                    )),
                })
                .collect();
        }
        Ok((0..n_layers)
            .map(|i| pattern.is_some_and(|p| p > 0 && (i + 1) % p != 0))
            .collect())
    }

    /// Global RoPE parameters: `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x).
    /// For per-layer-type dictionaries, `layer_type` selects the entry.
    pub fn rope_for(
        &self,
        layer_type: &str,
        default_theta: f64,
        head_dim: usize,
    ) -> Result<RopeParams> {
        let theta = self.opt_f64("rope_theta")?.unwrap_or(default_theta);
        if let Some(params) = self.object("rope_parameters")? {
            if let Some(Value::Object(per_type)) = params.get(layer_type) {
                let field = format!("rope_parameters.{layer_type}");
                return self.rope_from_object(&field, Some(per_type), theta, head_dim);
            }
            if params.values().all(|v| v.is_object()) && !params.is_empty() {
                return Err(self.err(
                    "rope_parameters",
                    format!("has per-layer-type entries but none for {layer_type:?}"),
                ));
            }
            return self.rope_from_object("rope_parameters", Some(params), theta, head_dim);
        }
        let scaling = self.object("rope_scaling")?;
        self.rope_from_object("rope_scaling", scaling, theta, head_dim)
    }
}

impl RawConfig {
    /// The fields every decoder shares, with LLaMA defaults for the switches; architecture files
    /// start from this and override what differs.
    pub fn base_spec(&self) -> Result<ModelSpec> {
        let hidden_size = self.usize("hidden_size")?;
        let n_heads = self.usize("num_attention_heads")?;
        let n_kv_heads = self.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(self.err(
                "num_key_value_heads",
                format!("{n_kv_heads} must be positive and divide num_attention_heads {n_heads}"),
            ));
        }
        let head_dim = match self.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % n_heads != 0 {
                    return Err(self.err(
                        "head_dim",
                        "missing and hidden_size is not divisible by num_attention_heads",
                    ));
                }
                hidden_size / n_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(self.err("head_dim", format!("{head_dim} must be even and positive")));
        }
        let n_layers = self.usize("num_hidden_layers")?;
        if n_layers == 0 {
            return Err(self.err("num_hidden_layers", "must be at least 1"));
        }
        let rope = self.rope_for("full_attention", 10000.0, head_dim)?;
        let attention_bias = self.opt_bool("attention_bias")?.unwrap_or(false);
        let eps = self
            .opt_f64("rms_norm_eps")?
            .or(self.opt_f64("layer_norm_epsilon")?)
            .unwrap_or(1e-6) as f32;
        let model_type = self
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        Ok(ModelSpec {
            architecture: self.architecture.clone(),
            model_type,
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            intermediate_size: self.usize("intermediate_size")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: eps,
            norm_weight_offset: 0.0,
            activation: Activation::Silu,
            qkv_bias: attention_bias,
            o_bias: attention_bias,
            mlp_bias: self.opt_bool("mlp_bias")?.unwrap_or(false),
            qk_norm: false,
            sandwich_norms: false,
            tie_word_embeddings: self.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: self.opt_f64("attn_logit_softcapping")?.map(|x| x as f32),
            final_softcap: self.opt_f64("final_logit_softcapping")?.map(|x| x as f32),
            embed_scale: 1.0,
            max_position_embeddings: self.opt_usize("max_position_embeddings")?.unwrap_or(8192),
            layers: vec![LayerSpec { window: None, rope }; n_layers],
            bos_token_id: self.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: self.token_ids("eos_token_id")?,
        })
    }

    /// Mistral / Phi-3 style: a non-null `sliding_window` makes EVERY layer slide with that
    /// window (these models have no per-layer types); `null` or absent means full attention.
    pub fn apply_sliding_window_to_all_layers(&self, spec: &mut ModelSpec) -> Result<()> {
        if let Some(w) = self.opt_usize("sliding_window")? {
            if w == 0 {
                return Err(self.err("sliding_window", "must be > 0 (or null for no window)"));
            }
            for layer in &mut spec.layers {
                layer.window = Some(w);
            }
        }
        Ok(())
    }

    /// Applies `layer_types` / `use_sliding_window` sliding windows to `spec` (Qwen-style configs).
    pub fn apply_sliding_layers(&self, spec: &mut ModelSpec) -> Result<()> {
        if self.get("layer_types").is_none()
            && !self.opt_bool("use_sliding_window")?.unwrap_or(false)
        {
            return Ok(());
        }
        let sliding = self.layer_is_sliding(spec.n_layers(), None)?;
        if sliding.iter().any(|s| *s) {
            let w = self
                .opt_usize("sliding_window")?
                .ok_or_else(|| self.err("sliding_window", "required when layers slide"))?;
            for (l, s) in sliding.into_iter().enumerate() {
                if s {
                    spec.layers[l].window = Some(w);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Phi-3 style config (head_dim 128 / 4 = 32) with `extra` merged in at the top level.
    fn phi3(extra: Value) -> Result<ModelSpec> {
        let mut cfg = serde_json::json!({
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "vocab_size": 256,
            "hidden_size": 128,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let raw = RawConfig::parse(Path::new("config.json"), cfg.to_string().as_bytes())?;
        raw.base_spec()
    }

    fn field_of(e: ModelError) -> String {
        match e {
            ModelError::Config { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    fn factors(n: usize, start: f64) -> Vec<f64> {
        (0..n).map(|i| start + 0.5 * i as f64).collect()
    }

    #[test]
    fn longrope_legacy_su_spelling_with_partial_rotary() {
        let spec = phi3(serde_json::json!({
            "partial_rotary_factor": 0.5,
            "rope_scaling": {"type": "su", "short_factor": factors(8, 1.0), "long_factor": factors(8, 2.0)},
        }))
        .unwrap();
        let rope = &spec.layers[0].rope;
        assert_eq!(rope.rotary_dim, 16);
        assert_eq!(
            rope.scaling,
            RopeScaling::LongRope {
                short_factor: factors(8, 1.0),
                long_factor: factors(8, 2.0),
                original_max_position_embeddings: 64,
                factor: None,
                attention_factor: None,
            }
        );
        assert!(rope.depends_on_seq_len());
        // sqrt(1 + ln(1024 / 64) / ln(64))
        let want = (1.0 + 16f64.ln() / 64f64.ln()).sqrt() as f32;
        assert_eq!(rope.attention_factor(), want);
    }

    #[test]
    fn longrope_top_level_original_wins_and_rope_parameters_keys_are_read() {
        let spec = phi3(serde_json::json!({
            "rope_parameters": {
                "rope_type": "longrope", "rope_theta": 5e5, "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 128, "factor": 4.0, "attention_factor": 1.5,
                "short_factor": factors(12, 1.0), "long_factor": factors(12, 3.0),
            },
        }))
        .unwrap();
        let rope = &spec.layers[1].rope;
        assert_eq!((rope.theta, rope.rotary_dim), (5e5, 24));
        match &rope.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                factor,
                attention_factor,
                ..
            } => {
                assert_eq!(*original_max_position_embeddings, 64);
                assert_eq!((*factor, *attention_factor), (Some(4.0), Some(1.5)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_longrope_values_name_the_field() {
        let cases = [
            (
                serde_json::json!({"rope_scaling": {"type": "longrope", "short_factor": factors(16, 1.0), "long_factor": factors(15, 1.0)}}),
                "rope_scaling.long_factor",
            ),
            (
                serde_json::json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0, "x"], "long_factor": factors(16, 1.0)}}),
                "rope_scaling.short_factor",
            ),
            (
                serde_json::json!({"rope_scaling": {"type": "longrope", "short_factor": factors(16, 1.0), "long_factor": 2.0}}),
                "rope_scaling.long_factor",
            ),
            (
                serde_json::json!({"rope_scaling": {"type": "longrope", "short_factor": factors(16, 1.0)}}),
                "rope_scaling.long_factor",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "longrope", "short_factor": factors(16, 1.0), "long_factor": factors(16, 1.0), "attention_factor": "big"}}),
                "rope_parameters.attention_factor",
            ),
            (
                serde_json::json!({"partial_rotary_factor": 1.5}),
                "partial_rotary_factor",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.01}}),
                "rope_parameters.partial_rotary_factor",
            ),
        ];
        for (extra, field) in cases {
            let e = phi3(extra.clone()).expect_err(field);
            let msg = e.to_string();
            assert_eq!(field_of(e), field, "{extra}: {msg}");
        }
        // A non-number inside a list names the element.
        let e = phi3(serde_json::json!({"rope_scaling": {"type": "longrope",
            "short_factor": [1.0, 1.0, "x", 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            "long_factor": factors(16, 1.0)}}))
        .unwrap_err();
        assert_eq!(field_of(e), "rope_scaling.short_factor[2]");
    }
}
