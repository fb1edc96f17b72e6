//! Building blocks shared by the architectures: linear layers, RMSNorm, attention over the
//! per-head KV cache, and the gated MLP. Weight names mirror HF transformers.

use kvzip_cache::KvCache;
use kvzip_kernels::cpu;

use crate::config::{Activation, LayerSpec, ModelSpec};
use crate::error::Result;
use crate::model::AttentionHook;
use crate::weights::Weights;

/// A dense projection `y = x · Wᵀ + b` with `W: [out_dim, in_dim]`.
pub struct Linear {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias` is true).
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            in_dim,
            out_dim,
        })
    }

    /// Wraps an existing `[out_dim, in_dim]` matrix (e.g. tied embeddings).
    pub fn from_matrix(weight: Vec<f32>, in_dim: usize, out_dim: usize) -> Self {
        Self {
            weight,
            bias: None,
            in_dim,
            out_dim,
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `x: [rows, in_dim]` → `[rows, out_dim]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = vec![0.0; rows * self.out_dim];
        cpu::linear(
            x,
            &self.weight,
            self.bias.as_deref(),
            rows,
            self.in_dim,
            self.out_dim,
            &mut y,
        )?;
        Ok(y)
    }
}

/// RMSNorm over the last dimension, with a weight offset (0, or 1 for Gemma's `(1 + w)`).
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
    offset: f32,
    dim: usize,
}

impl RmsNorm {
    /// Loads `{name}.weight` of length `dim`.
    pub fn load(w: &Weights, name: &str, dim: usize, spec: &ModelSpec) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[dim])?,
            eps: spec.rms_norm_eps,
            offset: spec.norm_weight_offset,
            dim,
        })
    }

    /// Normalises every row of `dim` values of `x`, returning a new buffer.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; x.len()];
        cpu::rms_norm(x, &self.weight, self.eps, self.offset, self.dim, &mut out)?;
        Ok(out)
    }

    /// Normalises in place.
    pub fn forward_inplace(&self, x: &mut [f32]) -> Result<()> {
        let out = self.forward(x)?;
        x.copy_from_slice(&out);
        Ok(())
    }
}

/// Self-attention of one layer over the flattened per-head KV cache.
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    inv_freq: Vec<f32>,
    rope_factor: f32,
}

impl Attention {
    /// Loads `{prefix}.{q,k,v,o}_proj` (+ `q_norm`/`k_norm` when the spec has qk-norm).
    pub fn load(w: &Weights, prefix: &str, spec: &ModelSpec, layer: &LayerSpec) -> Result<Self> {
        let (h, q_dim, kv_dim) = (
            spec.hidden_size,
            spec.n_heads * spec.head_dim,
            spec.n_kv_heads * spec.head_dim,
        );
        let qk_norm = |n: &str| -> Result<Option<RmsNorm>> {
            if spec.qk_norm {
                Ok(Some(RmsNorm::load(
                    w,
                    &format!("{prefix}.{n}"),
                    spec.head_dim,
                    spec,
                )?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), h, q_dim, spec.qkv_bias)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), h, kv_dim, spec.qkv_bias)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), h, kv_dim, spec.qkv_bias)?,
            o_proj: Linear::load(w, &format!("{prefix}.o_proj"), q_dim, h, spec.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            n_heads: spec.n_heads,
            n_kv_heads: spec.n_kv_heads,
            head_dim: spec.head_dim,
            scale: spec.attn_scale,
            softcap: spec.attn_softcap,
            window: layer.window,
            inv_freq: layer.rope.inv_freq(),
            rope_factor: layer.rope.attention_factor(),
        })
    }

    /// `x: [t, hidden]` normalised input → attention output `[t, hidden]`; appends this step's
    /// K/V (rotated) to `cache` layer `layer` at `positions` (the same positions as `u32` in
    /// `cache_positions`) and calls `hook` with the rotated queries once the cache holds them.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        positions: &[usize],
        cache_positions: &[u32],
        layer: usize,
        cache: &mut KvCache,
        hook: &mut Option<&mut dyn AttentionHook>,
    ) -> Result<Vec<f32>> {
        let t = positions.len();
        let d = self.head_dim;
        let mut q = self.q_proj.forward(x, t)?;
        let mut k = self.k_proj.forward(x, t)?;
        let v = self.v_proj.forward(x, t)?;
        if let Some(n) = &self.q_norm {
            n.forward_inplace(&mut q)?;
        }
        if let Some(n) = &self.k_norm {
            n.forward_inplace(&mut k)?;
        }
        cpu::rope_inplace(
            &mut q,
            positions,
            self.n_heads,
            d,
            &self.inv_freq,
            self.rope_factor,
        )?;
        cpu::rope_inplace(
            &mut k,
            positions,
            self.n_kv_heads,
            d,
            &self.inv_freq,
            self.rope_factor,
        )?;
        cache.append(layer, &k, &v, cache_positions)?;
        if let Some(h) = hook.as_deref_mut() {
            h.after_append(layer, &q, t, cache)?;
        }
        let mut out = vec![0.0; q.len()];
        cpu::attention(
            &q,
            &cache.segments(layer)?,
            t,
            self.n_heads / self.n_kv_heads,
            d,
            self.scale,
            self.window,
            self.softcap,
            &mut out,
        )?;
        self.o_proj.forward(&out, t)
    }
}

/// Gated MLP: `down(act(gate(x)) * up(x))`.
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj`.
    pub fn load(w: &Weights, prefix: &str, spec: &ModelSpec) -> Result<Self> {
        let (h, i, b) = (spec.hidden_size, spec.intermediate_size, spec.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), h, i, b)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), h, i, b)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, h, b)?,
            activation: spec.activation,
        })
    }

    /// `x: [rows, hidden]` → `[rows, hidden]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let gate = self.gate_proj.forward(x, rows)?;
        let up = self.up_proj.forward(x, rows)?;
        let mut act = vec![0.0; gate.len()];
        match self.activation {
            Activation::Silu => cpu::silu_mul(&gate, &up, &mut act)?,
            Activation::GeluTanh => cpu::gelu_tanh_mul(&gate, &up, &mut act)?,
        }
        self.down_proj.forward(&act, rows)
    }
}
