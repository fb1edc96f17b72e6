//! Weights of the building blocks every architecture shares, on any device: linear layers
//! (stacked when several projections read the same input), RMSNorm, and one decoder layer.
//! Weight names mirror HF transformers; [`DecoderNames`] lets an architecture rename or fuse
//! them.

use kvzip_kernels::{Device, LinearStore, PreNorm, Tensor, View, ViewMut, Weight};

use crate::config::{LayerSpec, ModelSpec};
use crate::error::Result;
use crate::loader::{f32_tensor, Init, WeightLoader};

/// A projection `y = x · Wᵀ (+ b)` with `W: [out_dim, in_dim]` on the device. Stacked
/// projections keep their parts' rows one after the other (q, k, v; gate, up).
pub struct Linear {
    /// `[out_dim, in_dim]`, dense or quantized as stored.
    pub weight: Weight,
    /// `[out_dim]`.
    pub bias: Option<Tensor>,
    /// Input features.
    pub in_dim: usize,
    /// Output features (all parts together when stacked).
    pub out_dim: usize,
}

/// How the checkpoint stores projections that read the same input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Projection {
    /// One tensor per part, e.g. `self_attn.{q,k,v}_proj`: names relative to the layer.
    Split(Vec<String>),
    /// One fused tensor holding the parts' rows in order, e.g. Phi-3's `self_attn.qkv_proj`.
    Fused(String),
}

impl Linear {
    /// Loads `{name}.weight` (+ `{name}.bias` when `bias`): `[out_dim, in_dim]`.
    pub fn load(
        w: &WeightLoader<'_>,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        Self::load_parts(
            w,
            &Projection::Fused(name.to_owned()),
            "",
            &[out_dim],
            in_dim,
            bias,
        )
    }

    /// Loads a stacked projection of parts with `outs[i]` output rows each, from split tensors
    /// under `prefix` or one fused tensor.
    pub fn load_parts(
        w: &WeightLoader<'_>,
        proj: &Projection,
        prefix: &str,
        outs: &[usize],
        in_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let out_dim: usize = outs.iter().sum();
        let join = |n: &str| {
            if prefix.is_empty() {
                n.to_owned()
            } else {
                format!("{prefix}.{n}")
            }
        };
        let (weights, biases): (Vec<_>, Vec<_>) = match proj {
            Projection::Split(names) => names
                .iter()
                .zip(outs)
                .map(|(n, &o)| {
                    (
                        (format!("{}.weight", join(n)), vec![o, in_dim]),
                        (format!("{}.bias", join(n)), vec![o]),
                    )
                })
                .unzip(),
            Projection::Fused(n) => (
                vec![(format!("{}.weight", join(n)), vec![out_dim, in_dim])],
                vec![(format!("{}.bias", join(n)), vec![out_dim])],
            ),
        };
        Ok(Self {
            weight: w.matrix(&weights)?,
            bias: if bias {
                Some(w.stacked(&biases, Init::Bias)?)
            } else {
                None
            },
            in_dim,
            out_dim,
        })
    }

    /// `out[rows, out_dim] = x[rows, in_dim] · Wᵀ (+ b)`.
    pub fn forward(
        &self,
        dev: &Device,
        x: &View<'_>,
        out: &mut ViewMut<'_>,
        rows: usize,
    ) -> Result<()> {
        let bias = self.bias.as_ref().map(Tensor::view);
        dev.linear_weight(
            x,
            &self.weight,
            0,
            bias.as_ref(),
            out,
            rows,
            self.out_dim,
            self.in_dim,
        )?;
        Ok(())
    }

    /// The whole projection with its neighbours fused where the device has a kernel for it
    /// (CUDA decode rows, see [`Device::linear_fused_weight`]): `norm` normalises the raw
    /// residual rows `x` first; `store` is [`LinearStore::Glu`] for a stacked gate-and-up
    /// projection (`out` then holds `out_dim / 2` columns; the layer must have no bias).
    /// `Ok(false)`: nothing done, run the unfused ops.
    pub fn forward_fused(
        &self,
        dev: &Device,
        x: &View<'_>,
        norm: Option<&Norm>,
        out: &mut ViewMut<'_>,
        rows: usize,
        store: LinearStore,
    ) -> Result<bool> {
        let glu = matches!(store, LinearStore::Glu(_));
        if glu && (self.bias.is_some() || self.out_dim % 2 != 0) {
            return Ok(false);
        }
        let n = if glu { self.out_dim / 2 } else { self.out_dim };
        let bias = self.bias.as_ref().map(Tensor::view);
        let gv = norm.map(|nm| nm.weight.view());
        let pre = norm.zip(gv.as_ref()).map(|(nm, v)| nm.pre_norm(v));
        Ok(dev.linear_fused_weight(
            x,
            &self.weight,
            bias.as_ref(),
            pre,
            out,
            rows,
            n,
            self.in_dim,
            store,
        )?)
    }

    /// Rows `start..start + n` of the stacked projection (one part) applied to `x`.
    pub fn forward_part(
        &self,
        dev: &Device,
        x: &View<'_>,
        out: &mut ViewMut<'_>,
        rows: usize,
        start: usize,
        n: usize,
    ) -> Result<()> {
        let b = self
            .bias
            .as_ref()
            .map(|b| b.slice(start..start + n))
            .transpose()?;
        dev.linear_weight(
            x,
            &self.weight,
            start,
            b.as_ref(),
            out,
            rows,
            n,
            self.in_dim,
        )?;
        Ok(())
    }

    /// Bytes of the weight and bias.
    pub fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, Tensor::bytes)
    }
}

/// RMSNorm weights `[dim]` with the model's epsilon and weight offset (1 for Gemma's `(1 + w)`).
pub struct Norm {
    /// `[dim]`.
    pub weight: Tensor,
    /// Epsilon inside the square root.
    pub eps: f32,
    /// Added to the weight.
    pub offset: f32,
    /// Normalised width.
    pub dim: usize,
}

impl Norm {
    /// Loads `{name}.weight` of length `dim`.
    pub fn load(w: &WeightLoader<'_>, name: &str, dim: usize, spec: &ModelSpec) -> Result<Self> {
        Ok(Self {
            weight: w.tensor(&format!("{name}.weight"), &[dim], Init::Norm)?,
            eps: spec.rms_norm_eps,
            offset: spec.norm_weight_offset,
            dim,
        })
    }

    /// `out = norm(x)` over `rows` rows; with `residual`, `x` first becomes `x + residual`
    /// (written back) and the sum is normalised (the fused add + norm).
    pub fn apply(
        &self,
        dev: &Device,
        x: &mut ViewMut<'_>,
        residual: Option<&View<'_>>,
        out: &mut ViewMut<'_>,
        rows: usize,
    ) -> Result<()> {
        dev.rms_norm(
            x,
            residual,
            &self.weight.view(),
            out,
            rows,
            self.dim,
            self.eps,
            self.offset,
        )?;
        Ok(())
    }

    /// This norm as the pre-norm of a fused linear layer ([`Linear::forward_fused`]), given
    /// a view of its weight.
    pub fn pre_norm<'a>(&self, weight: &'a View<'a>) -> PreNorm<'a> {
        PreNorm {
            weight,
            eps: self.eps,
            offset: self.offset,
        }
    }

    /// Bytes of the weight.
    pub fn bytes(&self) -> usize {
        self.weight.bytes()
    }
}

/// HF weight names of a decoder, relative to each layer `{prefix}.layers.{l}` unless noted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderNames {
    /// Prefix of the decoder (`model`; Gemma 3 multimodal checkpoints nest it).
    pub prefix: String,
    /// Full name of the LM head weight (absent when tied).
    pub lm_head: String,
    /// The q, k, v projections.
    pub qkv: Projection,
    /// The gate and up projections.
    pub gate_up: Projection,
}

impl DecoderNames {
    /// The LLaMA / Qwen / Gemma names under `prefix`: separate `self_attn.{q,k,v}_proj` and
    /// `mlp.{gate,up}_proj`.
    pub fn llama(prefix: &str, lm_head: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            lm_head: lm_head.to_owned(),
            qkv: Projection::Split(
                ["q_proj", "k_proj", "v_proj"]
                    .map(|n| format!("self_attn.{n}"))
                    .to_vec(),
            ),
            gate_up: Projection::Split(
                ["gate_proj", "up_proj"]
                    .map(|n| format!("mlp.{n}"))
                    .to_vec(),
            ),
        }
    }
}

/// RoPE of one layer: the inverse frequencies on the device and the cos/sin factor.
pub struct LayerRope {
    /// `[rot / 2]` f32 on the device (for the seq-len-independent variants).
    pub inv_freq: Tensor,
    /// Attention factor multiplying cos and sin.
    pub factor: f32,
    /// The parameters (seq-len-dependent variants recompute `inv_freq` per forward).
    pub params: kvzip_kernels::rope::RopeParams,
}

/// One decoder layer's weights.
pub struct DecoderLayer {
    /// Before attention (`input_layernorm`).
    pub input_norm: Norm,
    /// Gemma: after attention (`post_attention_layernorm`).
    pub post_attention_norm: Option<Norm>,
    /// Before the MLP (`post_attention_layernorm` for LLaMA/Qwen, `pre_feedforward_layernorm`
    /// for Gemma).
    pub pre_mlp_norm: Norm,
    /// Gemma: after the MLP (`post_feedforward_layernorm`).
    pub post_mlp_norm: Option<Norm>,
    /// q, k, v stacked: `[(n_heads + 2 * n_kv_heads) * head_dim, hidden]`.
    pub qkv: Linear,
    /// Output projection.
    pub o: Linear,
    /// Per-head q norm (Qwen3, Gemma3).
    pub q_norm: Option<Norm>,
    /// Per-head k norm.
    pub k_norm: Option<Norm>,
    /// gate and up stacked: `[2 * intermediate, hidden]` (gate rows first).
    pub gate_up: Linear,
    /// `down_proj`.
    pub down: Linear,
    /// RoPE of this layer.
    pub rope: LayerRope,
    /// Sliding window (`None`: global).
    pub window: Option<usize>,
}

impl DecoderLayer {
    /// Loads layer `l` with the names of `names`.
    pub fn load(
        w: &WeightLoader<'_>,
        names: &DecoderNames,
        l: usize,
        spec: &ModelSpec,
        ls: &LayerSpec,
    ) -> Result<Self> {
        let p = format!("{}.layers.{l}", names.prefix);
        let (h, d, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
        let (q_dim, kv_dim) = (spec.n_heads * d, spec.n_kv_heads * d);
        let norm = |n: &str, dim: usize| Norm::load(w, &format!("{p}.{n}"), dim, spec);
        let (post_attention_norm, pre_mlp_norm, post_mlp_norm) = if spec.sandwich_norms {
            (
                Some(norm("post_attention_layernorm", h)?),
                norm("pre_feedforward_layernorm", h)?,
                Some(norm("post_feedforward_layernorm", h)?),
            )
        } else {
            (None, norm("post_attention_layernorm", h)?, None)
        };
        let qk_norm = |n: &str| -> Result<Option<Norm>> {
            spec.qk_norm
                .then(|| norm(&format!("self_attn.{n}"), d))
                .transpose()
        };
        Ok(Self {
            input_norm: norm("input_layernorm", h)?,
            post_attention_norm,
            pre_mlp_norm,
            post_mlp_norm,
            qkv: Linear::load_parts(
                w,
                &names.qkv,
                &p,
                &[q_dim, kv_dim, kv_dim],
                h,
                spec.qkv_bias,
            )?,
            o: Linear::load(w, &format!("{p}.self_attn.o_proj"), q_dim, h, spec.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            gate_up: Linear::load_parts(w, &names.gate_up, &p, &[i, i], h, spec.mlp_bias)?,
            down: Linear::load(w, &format!("{p}.mlp.down_proj"), i, h, spec.mlp_bias)?,
            rope: LayerRope {
                inv_freq: f32_tensor(w.device(), &ls.rope.inv_freq())?,
                factor: ls.rope.attention_factor(),
                params: ls.rope.clone(),
            },
            window: ls.window,
        })
    }

    /// Bytes of weights one token reads in this layer.
    pub fn bytes(&self) -> usize {
        let norms = [
            Some(&self.input_norm),
            self.post_attention_norm.as_ref(),
            Some(&self.pre_mlp_norm),
            self.post_mlp_norm.as_ref(),
            self.q_norm.as_ref(),
            self.k_norm.as_ref(),
        ];
        self.qkv.bytes()
            + self.o.bytes()
            + self.gate_up.bytes()
            + self.down.bytes()
            + norms.iter().flatten().map(|n| n.bytes()).sum::<usize>()
    }
}
