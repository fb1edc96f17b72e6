//! The generic decoder on the GPU: bf16 weights on the device, one forward pass per step.
//!
//! Every architecture of [`crate::models`] is the same decoder with different
//! [`ModelSpec`] switches, so the GPU path needs no per-architecture code: a contributor's
//! model file (which builds the spec) works here unchanged, as long as its weights follow the
//! HF names the CPU loader reads.

use std::path::Path;

use kvzip_kernels::cuda::ops::Activation as GpuActivation;
use kvzip_kernels::cuda::{bf16, CudaBackend, CudaSlice};

use crate::config::{Activation, ModelSpec};
use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// A projection `y = x · Wᵀ (+ b)` with `W: [out_dim, in_dim]` bf16 on the device.
pub struct GpuLinear {
    /// `[out_dim, in_dim]`.
    pub weight: CudaSlice<bf16>,
    /// `[out_dim]`.
    pub bias: Option<CudaSlice<bf16>>,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
}

/// RMSNorm weights `[dim]` with the model's epsilon and weight offset (1 for Gemma).
pub struct GpuNorm {
    /// `[dim]`.
    pub weight: CudaSlice<bf16>,
    /// Epsilon inside the square root.
    pub eps: f32,
    /// Added to the weight (`(1 + w)` for Gemma).
    pub offset: f32,
}

impl GpuNorm {
    /// `out = norm(x)` over `rows` rows of `weight.len()`; with `residual`, `x` first becomes
    /// `x + residual` (written back) and the sum is normalised (the fused add + norm).
    pub fn apply(
        &self,
        gpu: &CudaBackend,
        x: &mut impl kvzip_kernels::cuda::DevicePtrMut<bf16>,
        residual: Option<&dyn kvzip_kernels::cuda::DevicePtr<bf16>>,
        out: &mut impl kvzip_kernels::cuda::DevicePtrMut<bf16>,
        rows: usize,
    ) -> Result<()> {
        let dim = self.weight.len();
        gpu.rms_norm(
            x,
            residual,
            &self.weight,
            out,
            rows,
            dim,
            self.eps,
            self.offset,
        )?;
        Ok(())
    }
}

/// One decoder layer's weights on the device.
pub struct GpuLayer {
    /// Before attention.
    pub input_norm: GpuNorm,
    /// Gemma: after attention.
    pub post_attention_norm: Option<GpuNorm>,
    /// Before the MLP (`post_attention_layernorm` for LLaMA/Qwen, `pre_feedforward_layernorm`
    /// for Gemma).
    pub pre_mlp_norm: GpuNorm,
    /// Gemma: after the MLP.
    pub post_mlp_norm: Option<GpuNorm>,
    /// `q_proj`, `k_proj`, `v_proj` stacked: `[(n_heads + 2 * n_kv_heads) * head_dim, hidden]`
    /// (q rows, then k, then v; bias likewise). Decode runs one GEMM over it; prefill runs
    /// three over its row blocks so q, k and v land in separate buffers.
    pub qkv: GpuLinear,
    /// Output projection.
    pub o: GpuLinear,
    /// Qwen3/Gemma3 per-head norms.
    pub q_norm: Option<GpuNorm>,
    /// Key per-head norm.
    pub k_norm: Option<GpuNorm>,
    /// `gate_proj` and `up_proj` stacked: `[2 * inter, hidden]` (gate rows first).
    pub gate_up: GpuLinear,
    /// `down_proj`.
    pub down: GpuLinear,
    /// RoPE inverse frequencies `[rot / 2]` f32.
    pub inv_freq: CudaSlice<f32>,
    /// RoPE cos/sin factor.
    pub rope_factor: f32,
    /// Sliding window (`None`: global).
    pub window: Option<usize>,
}

/// The whole decoder on the device.
pub struct GpuModel {
    /// The model description.
    pub spec: ModelSpec,
    /// `[vocab, hidden]`.
    pub embed: CudaSlice<bf16>,
    /// Decoder layers.
    pub layers: Vec<GpuLayer>,
    /// Final norm.
    pub norm: GpuNorm,
    /// `[vocab, hidden]`, `None` when tied to `embed`.
    pub lm_head: Option<CudaSlice<bf16>>,
    /// Keys per work item of the split-K decode plan (`None`: the planner's default).
    pub decode_chunk_keys: Option<usize>,
}

/// Source of weight values: a checkpoint or seeded random values (benchmarks).
enum Source<'a> {
    Checkpoint(&'a Weights),
    Random(std::cell::Cell<u64>),
}

impl Source<'_> {
    /// The tensor `name` of `shape` as bf16 on the device. Random weights are uniform in
    /// `±1/sqrt(in_dim)` (norm weights around 1 / 0 for Gemma) so activations stay finite.
    fn tensor(
        &self,
        gpu: &CudaBackend,
        name: &str,
        shape: &[usize],
        kind: Kind,
    ) -> Result<CudaSlice<bf16>> {
        match self {
            Source::Checkpoint(w) => Ok(gpu.upload_bf16(&w.get(name, shape)?)?),
            Source::Random(seed) => {
                let n: usize = shape.iter().product();
                let s = seed.get();
                seed.set(s.wrapping_add(0x9E37_79B9_7F4A_7C15));
                let (lo, hi) = match kind {
                    Kind::Matrix => {
                        let a = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
                        (-a, a)
                    }
                    Kind::NormWeight => (0.9, 1.1),
                    Kind::Bias => (-0.02, 0.02),
                };
                Ok(gpu.upload(&random_bf16(n, s, lo, hi))?)
            }
        }
    }
}

/// Projections `parts` (`(name, out_dim)`, all with `in_dim` inputs) stacked row-wise into one
/// device matrix (and bias): one GEMM computes all of them.
fn stacked(
    src: &Source<'_>,
    gpu: &CudaBackend,
    parts: &[(String, usize)],
    in_dim: usize,
    bias: bool,
) -> Result<GpuLinear> {
    let out_dim: usize = parts.iter().map(|(_, n)| n).sum();
    let (weight, b) = match src {
        Source::Checkpoint(w) => {
            let mut m = Vec::with_capacity(out_dim * in_dim);
            let mut bv = Vec::new();
            for (name, n) in parts {
                m.extend(w.get(&format!("{name}.weight"), &[*n, in_dim])?);
                if bias {
                    bv.extend(w.get(&format!("{name}.bias"), &[*n])?);
                }
            }
            (
                gpu.upload_bf16(&m)?,
                if bias {
                    Some(gpu.upload_bf16(&bv)?)
                } else {
                    None
                },
            )
        }
        Source::Random(_) => {
            let name = parts
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join("+");
            (
                src.tensor(
                    gpu,
                    &format!("{name}.weight"),
                    &[out_dim, in_dim],
                    Kind::Matrix,
                )?,
                if bias {
                    Some(src.tensor(gpu, &format!("{name}.bias"), &[out_dim], Kind::Bias)?)
                } else {
                    None
                },
            )
        }
    };
    Ok(GpuLinear {
        weight,
        bias: b,
        in_dim,
        out_dim,
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Matrix,
    NormWeight,
    Bias,
}

/// `n` uniform bf16 values in `[lo, hi)` from a counter-based hash (parallel, reproducible).
pub fn random_bf16(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<bf16> {
    use rayon::prelude::*;
    let mut out = vec![bf16::ZERO; n];
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut z = seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            for x in chunk {
                z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut y = z;
                y = (y ^ (y >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                y = (y ^ (y >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                y ^= y >> 31;
                let u = (y >> 40) as f32 / (1u64 << 24) as f32;
                *x = bf16::from_f32(lo + (hi - lo) * u);
            }
        });
    out
}

impl GpuModel {
    /// Loads the model in `dir` (config.json + safetensors, any registered architecture) onto
    /// the GPU as bf16.
    pub fn load(gpu: &CudaBackend, dir: &Path) -> Result<Self> {
        let spec = crate::models::load_spec(dir)?;
        let weights = Weights::open_dir(dir)?;
        Self::build(gpu, spec, &Source::Checkpoint(&weights))
    }

    /// A model of `spec`'s shapes with seeded random weights (for benchmarks: speed does not
    /// depend on weight values).
    pub fn random(gpu: &CudaBackend, spec: ModelSpec, seed: u64) -> Result<Self> {
        Self::build(gpu, spec, &Source::Random(std::cell::Cell::new(seed)))
    }

    fn build(gpu: &CudaBackend, spec: ModelSpec, src: &Source<'_>) -> Result<Self> {
        let prefix = match src {
            Source::Checkpoint(w) => ["model", "model.language_model", "language_model.model"]
                .into_iter()
                .find(|p| w.contains(&format!("{p}.embed_tokens.weight")))
                .ok_or_else(|| ModelError::Input(
                    "no `*.embed_tokens.weight` tensor under model / model.language_model / language_model.model".into(),
                ))?,
            Source::Random(_) => "model",
        };
        let lm_head_name = if prefix == "language_model.model" {
            "language_model.lm_head.weight"
        } else {
            "lm_head.weight"
        };
        let (v, h, d, i) = (
            spec.vocab_size,
            spec.hidden_size,
            spec.head_dim,
            spec.intermediate_size,
        );
        let (q_dim, kv_dim) = (spec.n_heads * d, spec.n_kv_heads * d);
        let norm = |name: &str, dim: usize| -> Result<GpuNorm> {
            Ok(GpuNorm {
                weight: src.tensor(gpu, &format!("{name}.weight"), &[dim], Kind::NormWeight)?,
                eps: spec.rms_norm_eps,
                offset: spec.norm_weight_offset,
            })
        };
        let linear = |name: &str, in_dim: usize, out_dim: usize, bias: bool| -> Result<GpuLinear> {
            Ok(GpuLinear {
                weight: src.tensor(
                    gpu,
                    &format!("{name}.weight"),
                    &[out_dim, in_dim],
                    Kind::Matrix,
                )?,
                bias: if bias {
                    Some(src.tensor(gpu, &format!("{name}.bias"), &[out_dim], Kind::Bias)?)
                } else {
                    None
                },
                in_dim,
                out_dim,
            })
        };
        let embed = src.tensor(
            gpu,
            &format!("{prefix}.embed_tokens.weight"),
            &[v, h],
            Kind::Matrix,
        )?;
        let mut layers = Vec::with_capacity(spec.n_layers());
        for (l, ls) in spec.layers.iter().enumerate() {
            let p = format!("{prefix}.layers.{l}");
            let (post_attention_norm, pre_mlp_norm, post_mlp_norm) = if spec.sandwich_norms {
                (
                    Some(norm(&format!("{p}.post_attention_layernorm"), h)?),
                    norm(&format!("{p}.pre_feedforward_layernorm"), h)?,
                    Some(norm(&format!("{p}.post_feedforward_layernorm"), h)?),
                )
            } else {
                (
                    None,
                    norm(&format!("{p}.post_attention_layernorm"), h)?,
                    None,
                )
            };
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let gate_up = stacked(
                src,
                gpu,
                &[(format!("{m}.gate_proj"), i), (format!("{m}.up_proj"), i)],
                h,
                spec.mlp_bias,
            )?;
            layers.push(GpuLayer {
                input_norm: norm(&format!("{p}.input_layernorm"), h)?,
                post_attention_norm,
                pre_mlp_norm,
                post_mlp_norm,
                qkv: stacked(
                    src,
                    gpu,
                    &[
                        (format!("{a}.q_proj"), q_dim),
                        (format!("{a}.k_proj"), kv_dim),
                        (format!("{a}.v_proj"), kv_dim),
                    ],
                    h,
                    spec.qkv_bias,
                )?,
                o: linear(&format!("{a}.o_proj"), q_dim, h, spec.o_bias)?,
                q_norm: if spec.qk_norm {
                    Some(norm(&format!("{a}.q_norm"), d)?)
                } else {
                    None
                },
                k_norm: if spec.qk_norm {
                    Some(norm(&format!("{a}.k_norm"), d)?)
                } else {
                    None
                },
                gate_up,
                down: linear(&format!("{m}.down_proj"), i, h, spec.mlp_bias)?,
                inv_freq: gpu.upload(&ls.rope.inv_freq())?,
                rope_factor: ls.rope.attention_factor(),
                window: ls.window,
            });
        }
        let final_norm = norm(&format!("{prefix}.norm"), h)?;
        let lm_head = match src {
            Source::Checkpoint(w) if spec.tie_word_embeddings && !w.contains(lm_head_name) => None,
            Source::Checkpoint(_) => Some(src.tensor(gpu, lm_head_name, &[v, h], Kind::Matrix)?),
            Source::Random(_) if spec.tie_word_embeddings => None,
            Source::Random(_) => Some(src.tensor(gpu, "lm_head.weight", &[v, h], Kind::Matrix)?),
        };
        Ok(Self {
            spec,
            embed,
            layers,
            norm: final_norm,
            lm_head,
            decode_chunk_keys: None,
        })
    }

    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> &CudaSlice<bf16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weights one decode step reads (every layer, the final norm and the LM head;
    /// embedding rows are negligible): the weight term of the decode bandwidth floor.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &GpuLinear| l.weight.len() + l.bias.as_ref().map_or(0, |b| b.len());
        let norm = |n: &GpuNorm| n.weight.len();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                lin(&l.qkv)
                    + lin(&l.o)
                    + lin(&l.gate_up)
                    + lin(&l.down)
                    + norm(&l.input_norm)
                    + norm(&l.pre_mlp_norm)
                    + l.post_attention_norm.as_ref().map_or(0, norm)
                    + l.post_mlp_norm.as_ref().map_or(0, norm)
                    + l.q_norm.as_ref().map_or(0, norm)
                    + l.k_norm.as_ref().map_or(0, norm)
            })
            .sum();
        2 * (layers + self.lm_head().len() + norm(&self.norm))
    }

    /// The activation kernel of this model.
    pub fn activation(&self) -> GpuActivation {
        match self.spec.activation {
            Activation::Silu => GpuActivation::Silu,
            Activation::GeluTanh => GpuActivation::GeluTanh,
        }
    }
}
