//! [`Weight`]: a weight matrix on a device, dense or (host only) quantized as stored, and the
//! ops that read one (projection, embedding lookup, dense copy).

use std::borrow::Cow;
use std::sync::Arc;

use super::{Device, Tensor, View, ViewMut};
use crate::host;
use crate::quant::QuantMatrix;
use crate::{KernelError, Result};

/// A `[rows, cols]` weight matrix on a device.
#[derive(Debug)]
pub enum Weight {
    /// A dense tensor: f32 or bf16 on the host, bf16 on CUDA.
    Dense(Tensor),
    /// ggml blocks kept as stored (host only): the CPU kernels decode them on the fly.
    Quant(Arc<QuantMatrix>),
}

impl Weight {
    /// Elements (`rows * cols`).
    pub fn len(&self) -> usize {
        match self {
            Weight::Dense(t) => t.len(),
            Weight::Quant(m) => m.len(),
        }
    }

    /// Whether the matrix has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.bytes(),
            Weight::Quant(m) => m.stored_bytes(),
        }
    }

    /// The dense tensor, if this is one.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        }
    }

    /// Short description of the storage (`f32`, `bf16`, `Q5_0`, `Q5_0+Q8_0`, …).
    pub fn storage(&self) -> String {
        match self {
            Weight::Dense(t) => t.dtype().to_string(),
            Weight::Quant(m) => {
                let mut names: Vec<&str> = m.parts().iter().map(|p| p.ty.name()).collect();
                names.dedup();
                names.join("+")
            }
        }
    }
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Weight::Dense(t)
    }
}

/// What [`Device::linear_fused_weight`] writes to its output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinearStore {
    /// `out = x · Wᵀ (+ bias)`, the output's dtype (bf16 on CUDA).
    Output,
    /// `out = x · Wᵀ` in f32 (logits; no bias).
    OutputF32,
    /// `out += x · Wᵀ (+ bias)`: the residual add folded into the product.
    AddInto,
    /// `out = act(x · gateᵀ) * (x · upᵀ)` of a stacked gate-and-up weight (no bias).
    Glu(super::Activation),
}

/// The RMSNorm a fused linear layer applies to its input rows first.
#[derive(Clone, Copy)]
pub struct PreNorm<'a> {
    /// `[k]` norm weight.
    pub weight: &'a View<'a>,
    /// Epsilon inside the square root.
    pub eps: f32,
    /// Added to the weight (Gemma's `1 + w`).
    pub offset: f32,
}

fn host_only(what: &str) -> KernelError {
    KernelError::Device(format!(
        "`{what}`: quantized weights are host-only (the loader gives CUDA dequantized bf16)"
    ))
}

impl Device {
    /// `out[m, n] = x[m, k] · W[first_row..first_row + n, :]ᵀ (+ bias[n])`: rows
    /// `first_row..first_row + n` of `w` (one part of a stacked projection; `0` and all rows for
    /// the whole matrix), dense or quantized.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_weight(
        &self,
        x: &View<'_>,
        w: &Weight,
        first_row: usize,
        bias: Option<&View<'_>>,
        out: &mut ViewMut<'_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        match w {
            Weight::Dense(t) => {
                let end = first_row
                    .checked_add(n)
                    .and_then(|e| e.checked_mul(k))
                    .ok_or_else(|| KernelError::Shape("linear: row range overflows".into()))?;
                let rows = t.slice(first_row * k..end)?;
                self.linear(x, &rows, bias, out, m, n, k)
            }
            Weight::Quant(q) => {
                if self.is_cuda() {
                    return Err(host_only("linear w"));
                }
                super::ops::check_len("linear x", x.len(), m * k)?;
                super::ops::check_len("linear out", out.len(), m * n)?;
                let x = &x.host_f32("linear x")?[..m * k];
                let bias = bias.map(|b| b.host_f32("linear bias")).transpose()?;
                let out = &mut out.host_f32("linear out")?[..m * n];
                host::linear_quant(x, q, first_row, bias, m, k, n, out)
            }
        }
    }

    /// Most rows [`Self::linear_fused_weight`] can fuse (0 where it never does).
    pub fn fused_linear_max_rows(&self) -> usize {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => crate::cuda::gemm::GEMV_MAX_ROWS,
            _ => 0,
        }
    }

    /// A decode-row linear layer with its neighbours fused, where the device has a kernel for
    /// it (CUDA, dense weights, 1-2 rows): `norm` RMS-normalises each `[k]` row of `x` first
    /// (`x` is then the raw residual stream and no normalised copy is stored), `store` picks
    /// what is written to `out` (`[m, n]`; for [`LinearStore::Glu`], `w` is the stacked
    /// `[2 n, k]` gate-and-up projection, gate rows first, and `n` the intermediate size).
    /// Rounding as the unfused ops (bf16 normalised inputs, bf16 product before a residual
    /// add). `Ok(false)` (nothing done) elsewhere: the caller runs the unfused ops.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_fused_weight(
        &self,
        x: &View<'_>,
        w: &Weight,
        bias: Option<&View<'_>>,
        norm: Option<PreNorm<'_>>,
        out: &mut ViewMut<'_>,
        m: usize,
        n: usize,
        k: usize,
        store: LinearStore,
    ) -> Result<bool> {
        match (self, w) {
            #[cfg(feature = "cuda")]
            (Device::Cuda(g), Weight::Dense(t)) => {
                use crate::cuda::gemm::{GemvNorm, GemvStore};
                let (xv, wv) = (x.cuda_bf16("linear x")?, t.view().cuda_bf16("linear w")?);
                let bv = bias.map(|b| b.cuda_bf16("linear bias")).transpose()?;
                let gv = norm
                    .as_ref()
                    .map(|nm| nm.weight.cuda_bf16("norm weight"))
                    .transpose()?;
                let gnorm = norm.zip(gv.as_ref()).map(|(nm, v)| GemvNorm {
                    weight: v,
                    eps: nm.eps,
                    offset: nm.offset,
                });
                let store = match store {
                    LinearStore::Output => GemvStore::Bf16,
                    LinearStore::AddInto => GemvStore::Accumulate,
                    LinearStore::Glu(a) => GemvStore::Glu(a),
                    LinearStore::OutputF32 => {
                        if bias.is_some() {
                            return Ok(false);
                        }
                        let o = out.cuda_f32("linear out")?;
                        return g
                            .linear_fused_f32(&xv, &wv, gnorm, o, m, n, k)
                            .map_err(super::cuda_err);
                    }
                };
                let o = out.cuda_bf16("linear out")?;
                g.linear_fused(&xv, &wv, bv.as_ref(), gnorm, o, m, n, k, store)
                    .map_err(super::cuda_err)
            }
            _ => {
                let _ = (x, bias, norm, out, m, n, k, store);
                Ok(false)
            }
        }
    }

    /// `out[i, :] = table[ids[i], :] * scale` for a dense or quantized `table` `[vocab, dim]`.
    pub fn embedding_weight(
        &self,
        ids: &View<'_>,
        table: &Weight,
        out: &mut ViewMut<'_>,
        dim: usize,
        scale: f32,
    ) -> Result<()> {
        match table {
            Weight::Dense(t) => self.embedding(ids, &t.view(), out, dim, scale),
            Weight::Quant(q) => {
                if self.is_cuda() {
                    return Err(host_only("embedding table"));
                }
                let ids = ids.host_u32("embedding ids")?;
                let n = ids.len() * dim;
                super::ops::check_len("embedding out", out.len(), n)?;
                let out = &mut out.host_f32("embedding out")?[..n];
                host::embedding_quant(ids, q, dim, scale, out)
            }
        }
    }

    /// The weight as host f32 `[rows, cols]` (borrowed when it already is).
    pub fn weight_f32<'a>(&self, w: &'a Weight) -> Result<Cow<'a, [f32]>> {
        match w {
            Weight::Dense(t) => self.host_f32_cow(&t.view()),
            Weight::Quant(q) => Ok(Cow::Owned(host::dequantize_matrix(q))),
        }
    }
}
