//! The model trait every architecture implements, and the generic decoder stack that the
//! LLaMA-family architectures share.

use kvzip_cache::KvCache;
use kvzip_kernels::cpu;

use crate::config::ModelSpec;
use crate::error::{ModelError, Result};
use crate::layers::{Attention, Linear, Mlp, RmsNorm};
use crate::weights::Weights;

/// Which logits a forward pass should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// No logits (cache fill only, e.g. prefill of a context or scoring passes).
    None,
    /// Logits of the last input token only: `[vocab]`.
    Last,
    /// Logits of every input token: `[t, vocab]`.
    All,
}

/// Observer called inside every attention layer once the step's K/V are in the cache.
///
/// KVzip scoring and the baseline scorers use it to see the rotated queries together with the
/// full cache (keys of the system prompt, the context and the current input).
pub trait AttentionHook {
    /// `q`: rotated queries `[q_len, n_heads, head_dim]` of layer `layer`; `cache` already holds
    /// the K/V of these `q_len` tokens at the end of every head's segment.
    fn after_append(
        &mut self,
        layer: usize,
        q: &[f32],
        q_len: usize,
        cache: &KvCache,
    ) -> Result<()>;
}

/// Options of one forward pass.
pub struct ForwardOptions<'a> {
    /// Which logits to compute.
    pub logits: LogitsMode,
    /// Optional attention observer (scoring).
    pub hook: Option<&'a mut dyn AttentionHook>,
}

impl ForwardOptions<'_> {
    /// Options returning logits per `mode`, without a hook.
    pub fn logits(mode: LogitsMode) -> Self {
        Self {
            logits: mode,
            hook: None,
        }
    }
}

/// A causal language model running on the flattened per-head KV cache.
///
/// Implementations live one file per architecture in `models/`; registration is one line in
/// `models/mod.rs`.
pub trait CausalLm: Send + Sync {
    /// The normalised model description.
    fn spec(&self) -> &ModelSpec;

    /// Runs `ids` at positions `cache.seen_tokens()..+ids.len()`, appending their K/V to the
    /// cache and advancing `seen_tokens`. Returns logits per `opts.logits` (empty for `None`).
    fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        opts: ForwardOptions<'_>,
    ) -> Result<Vec<f32>>;
}

/// Norm layout of a decoder layer.
pub enum NormLayout {
    /// LLaMA/Qwen: `input_layernorm` before attention, `post_attention_layernorm` before the MLP.
    PreNorm {
        /// Before attention.
        input: RmsNorm,
        /// Before the MLP.
        post_attention: RmsNorm,
    },
    /// Gemma: norms before and after both attention and MLP.
    Sandwich {
        /// Before attention (`input_layernorm`).
        input: RmsNorm,
        /// After attention (`post_attention_layernorm`).
        post_attention: RmsNorm,
        /// Before the MLP (`pre_feedforward_layernorm`).
        pre_feedforward: RmsNorm,
        /// After the MLP (`post_feedforward_layernorm`).
        post_feedforward: RmsNorm,
    },
}

/// One decoder layer: attention and MLP with residuals.
pub struct DecoderLayer {
    /// Norms around the sub-blocks.
    pub norms: NormLayout,
    /// Self-attention.
    pub attn: Attention,
    /// Gated MLP.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// Loads layer `l` with HF names under `{prefix}.layers.{l}`.
    pub fn load(w: &Weights, prefix: &str, l: usize, spec: &ModelSpec) -> Result<Self> {
        let p = format!("{prefix}.layers.{l}");
        let h = spec.hidden_size;
        let norm = |n: &str| RmsNorm::load(w, &format!("{p}.{n}"), h, spec);
        let norms = if spec.sandwich_norms {
            NormLayout::Sandwich {
                input: norm("input_layernorm")?,
                post_attention: norm("post_attention_layernorm")?,
                pre_feedforward: norm("pre_feedforward_layernorm")?,
                post_feedforward: norm("post_feedforward_layernorm")?,
            }
        } else {
            NormLayout::PreNorm {
                input: norm("input_layernorm")?,
                post_attention: norm("post_attention_layernorm")?,
            }
        };
        Ok(Self {
            norms,
            attn: Attention::load(w, &format!("{p}.self_attn"), spec, &spec.layers[l])?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), spec)?,
        })
    }

    /// Updates the residual stream `x: [t, hidden]` in place; `positions` and `cache_positions`
    /// are the step's absolute positions (as `usize` for RoPE, as `u32` for the cache).
    pub fn forward(
        &self,
        x: &mut [f32],
        positions: &[usize],
        cache_positions: &[u32],
        layer: usize,
        cache: &mut KvCache,
        hook: &mut Option<&mut dyn AttentionHook>,
    ) -> Result<()> {
        let t = positions.len();
        let (input, post_attn, pre_ff, post_ff) = match &self.norms {
            NormLayout::PreNorm {
                input,
                post_attention,
            } => (input, None, post_attention, None),
            NormLayout::Sandwich {
                input,
                post_attention,
                pre_feedforward,
                post_feedforward,
            } => (
                input,
                Some(post_attention),
                pre_feedforward,
                Some(post_feedforward),
            ),
        };
        let h = input.forward(x)?;
        let mut a = self
            .attn
            .forward(&h, positions, cache_positions, layer, cache, hook)?;
        if let Some(n) = post_attn {
            n.forward_inplace(&mut a)?;
        }
        cpu::add_assign(x, &a)?;
        let h = pre_ff.forward(x)?;
        let mut m = self.mlp.forward(&h, t)?;
        if let Some(n) = post_ff {
            n.forward_inplace(&mut m)?;
        }
        cpu::add_assign(x, &m)?;
        Ok(())
    }
}

/// The generic decoder: embedding, layers, final norm, LM head. LLaMA, Qwen2, Qwen3 and Gemma3
/// are all this stack with different [`ModelSpec`] switches.
pub struct DecoderStack {
    spec: ModelSpec,
    embed: Vec<f32>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
}

impl DecoderStack {
    /// Loads every weight under `prefix` (usually `model`); `lm_head.weight` unless tied.
    pub fn load(w: &Weights, prefix: &str, lm_head_name: &str, spec: ModelSpec) -> Result<Self> {
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let embed = w.get(&format!("{prefix}.embed_tokens.weight"), &[v, h])?;
        let layers = (0..spec.n_layers())
            .map(|l| DecoderLayer::load(w, prefix, l, &spec))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, &format!("{prefix}.norm"), h, &spec)?;
        let lm_head = if spec.tie_word_embeddings && !w.contains(lm_head_name) {
            None
        } else {
            Some(Linear::from_matrix(w.get(lm_head_name, &[v, h])?, h, v))
        };
        Ok(Self {
            spec,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// The model description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// See [`CausalLm::forward`].
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        mut opts: ForwardOptions<'_>,
    ) -> Result<Vec<f32>> {
        let t = ids.len();
        if t == 0 {
            return Err(ModelError::Input("forward called with no tokens".into()));
        }
        let h = self.spec.hidden_size;
        let start = cache.seen_tokens();
        let cache_positions = cache.next_positions(t);
        let positions: Vec<usize> = (start..start + t).collect();
        let mut x = vec![0.0; t * h];
        cpu::embedding(ids, &self.embed, h, self.spec.embed_scale, &mut x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(
                &mut x,
                &positions,
                &cache_positions,
                l,
                cache,
                &mut opts.hook,
            )?;
        }
        cache.set_seen_tokens(start + t);
        let rows = match opts.logits {
            LogitsMode::None => return Ok(Vec::new()),
            LogitsMode::Last => &x[(t - 1) * h..],
            LogitsMode::All => &x[..],
        };
        let n = rows.len() / h;
        let normed = self.norm.forward(rows)?;
        let mut logits = match &self.lm_head {
            Some(head) => head.forward(&normed, n)?,
            None => {
                let v = self.spec.vocab_size;
                let mut y = vec![0.0; n * v];
                cpu::linear(&normed, &self.embed, None, n, h, v, &mut y)?;
                y
            }
        };
        if let Some(cap) = self.spec.final_softcap {
            cpu::softcap_inplace(&mut logits, cap);
        }
        Ok(logits)
    }
}
