//! Element-wise, normalisation, projection, RoPE and sampling ops of [`Device`].
//!
//! Each op checks that its arguments live on the device and have the element type that device
//! computes in (host f32 activations with f32 or bf16 weights; CUDA bf16 activations, f32
//! logits), then runs [`crate::host`] or the
//! CUDA kernel. Shapes are arguments, as in the backends.

use super::tensor::wrong;
use super::{DType, Device, View, ViewMut};
use crate::{host, KernelError, Result};

#[cfg(feature = "cuda")]
use super::cuda_err;

/// Gated-MLP activation: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(g) * u` (SwiGLU: LLaMA, Qwen, Mistral, Phi-3).
    Silu,
    /// `gelu_tanh(g) * u` (GeGLU: Gemma).
    GeluTanh,
}

/// Shape and scalars of one attention call over per-KV-head segments.
///
/// `q`, `out`: `[q_len, n_kv_heads * group, head_dim]` (query head `h * group + g`); bottom-right
/// causal alignment (query `t` sits at key index `lens[h] - q_len + t`), optional sliding window
/// and logit softcap, f32 softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// New query tokens per call (>= 1 for work to happen).
    pub q_len: usize,
    /// KV heads of the layer (= length of `offsets` / `lens`).
    pub n_kv_heads: usize,
    /// Query heads per KV head (GQA group).
    pub group: usize,
    /// Elements per head row (CUDA: 64, 128 or 256).
    pub head_dim: usize,
    /// Multiplier of `q . k` (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Sliding window in keys (`None`: full causal).
    pub window: Option<usize>,
    /// Logit softcap `c`: logits become `c * tanh(logits / c)` (`None`: off).
    pub softcap: Option<f32>,
}

impl AttentionShape {
    /// Elements of `q` / `out`: `q_len * n_kv_heads * group * head_dim`.
    pub fn q_elems(&self) -> usize {
        self.q_len * self.n_kv_heads * self.group * self.head_dim
    }

    /// Packed query rows per KV head: `q_len * group`.
    pub fn rows_per_head(&self) -> usize {
        self.q_len * self.group
    }

    /// Device-independent checks (the CUDA backend adds its head-dim and i32 limits).
    pub fn validate(&self) -> Result<()> {
        if self.group == 0 || self.head_dim == 0 {
            return Err(KernelError::Shape(format!(
                "attention group ({}) and head_dim ({}) must be >= 1",
                self.group, self.head_dim
            )));
        }
        if !self.scale.is_finite() {
            return Err(KernelError::Shape(format!(
                "attention scale {} is not finite",
                self.scale
            )));
        }
        if let Some(c) = self.softcap {
            if !(c > 0.0 && c.is_finite()) {
                return Err(KernelError::Shape(format!(
                    "attention softcap {c} must be finite and > 0 (use None to disable)"
                )));
            }
        }
        if self.window == Some(0) {
            return Err(KernelError::Shape(
                "attention window Some(0) sees no key; use None for full causal".into(),
            ));
        }
        Ok(())
    }
}

/// Geometry of one KVzip score call ([`Device::score_chunk`]). Rows are absolute row indices
/// inside each KV head's segment of the unpruned cache (row 0 = first system token).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreChunkShape {
    /// Rows of the scoring input (repeat prompt + hint + postfix + chunk tokens), >= 1; its keys
    /// are the last `n_in` rows of every head's segment.
    pub n_in: usize,
    /// KV heads of the layer.
    pub n_kv_heads: usize,
    /// Query heads per KV head; query head index = `kv_head * group + g`.
    pub group: usize,
    /// Head dimension (CUDA: 64, 128 or 256).
    pub head_dim: usize,
    /// System-prompt rows `0..n_sys` of every head (always in the softmax key set).
    pub n_sys: usize,
    /// First row of the chunk (absolute, >= `n_sys`); its context position is `chunk_start - n_sys`.
    pub chunk_start: usize,
    /// Rows of the chunk (may be 0: nothing to do).
    pub chunk_len: usize,
    /// Floats per KV head in `scores` (>= the context length).
    pub score_stride: usize,
    /// Logit scale, `1 / sqrt(head_dim)` for the reference method.
    pub scale: f32,
}

impl ScoreChunkShape {
    /// Query rows per KV head (`n_in * group`).
    pub fn rows_per_head(&self) -> usize {
        self.n_in * self.group
    }

    /// Floats of the `row_lse` scratch buffer (`n_kv_heads * n_in * group`).
    pub fn lse_len(&self) -> usize {
        self.n_kv_heads * self.rows_per_head()
    }

    /// Multiply-add FLOPs of one call (both passes, `2 * head_dim` per logit, causal half of the
    /// self block): for throughput reports.
    pub fn flops(&self) -> f64 {
        let rows = self.n_in as f64 * self.group as f64 * self.n_kv_heads as f64;
        let keys_p1 = (self.n_sys + self.chunk_len) as f64 + (self.n_in as f64 + 1.0) / 2.0;
        2.0 * self.head_dim as f64 * rows * (keys_p1 + self.chunk_len as f64)
    }

    /// Checks the per-head segments on the host: every head `h` must hold `lens[h] >=
    /// chunk_start + chunk_len + n_in` rows, within the `k_rows` rows of the key buffer.
    pub fn check_segments(&self, offsets: &[usize], lens: &[usize], k_rows: usize) -> Result<()> {
        if offsets.len() < self.n_kv_heads || lens.len() < self.n_kv_heads {
            return Err(KernelError::Shape(format!(
                "score: {} offsets / {} lens for {} KV heads",
                offsets.len(),
                lens.len(),
                self.n_kv_heads
            )));
        }
        let need = self.chunk_start + self.chunk_len + self.n_in;
        for h in 0..self.n_kv_heads {
            let (off, len) = (offsets[h], lens[h]);
            if len < need {
                return Err(KernelError::Shape(format!(
                    "score: head {h} has {len} rows; it needs len >= chunk_start + chunk_len + \
                     n_in = {need} (append the scoring input before scoring)"
                )));
            }
            if off + len > k_rows {
                return Err(KernelError::Shape(format!(
                    "score: head {h} rows {off}..{} exceed the {k_rows} rows of k",
                    off + len
                )));
            }
        }
        Ok(())
    }

    /// Device-independent checks (the CUDA backend adds its head-dim and i32 limits).
    pub fn validate(&self) -> Result<()> {
        if self.n_in == 0 || self.group == 0 || self.head_dim == 0 {
            return Err(KernelError::Shape(format!(
                "score: n_in ({}), group ({}) and head_dim ({}) must be >= 1",
                self.n_in, self.group, self.head_dim
            )));
        }
        if self.chunk_start < self.n_sys {
            return Err(KernelError::Shape(format!(
                "score: chunk_start {} lies inside the system prompt (n_sys {})",
                self.chunk_start, self.n_sys
            )));
        }
        if self.chunk_start - self.n_sys + self.chunk_len > self.score_stride {
            return Err(KernelError::Shape(format!(
                "score: context positions up to {} exceed score_stride {}",
                self.chunk_start - self.n_sys + self.chunk_len,
                self.score_stride
            )));
        }
        if !self.scale.is_finite() {
            return Err(KernelError::Shape(format!(
                "score: scale {} is not finite",
                self.scale
            )));
        }
        Ok(())
    }
}

pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(KernelError::Shape(format!(
            "`{what}` holds {have} elements, the op needs {need}"
        )));
    }
    Ok(())
}

impl Device {
    /// `out[i, :] = table[ids[i], :] * scale`. `ids`: `[n]` u32 (host or device per the device);
    /// `table`: `[vocab, dim]`; `out`: `[n, dim]`. An id `>= vocab` is an error on the host; on
    /// CUDA the caller checks ids before uploading them (the kernel writes zero rows).
    pub fn embedding(
        &self,
        ids: &View<'_>,
        table: &View<'_>,
        out: &mut ViewMut<'_>,
        dim: usize,
        scale: f32,
    ) -> Result<()> {
        match self {
            Device::Cpu => {
                let ids = ids.host_u32("embedding ids")?;
                let n = ids.len() * dim;
                check_len("embedding out", out.len(), n)?;
                let out = &mut out.host_f32("embedding out")?[..n];
                match table.dtype() {
                    DType::Bf16 => host::embedding_bf16(
                        ids,
                        table.host_bf16("embedding table")?,
                        dim,
                        scale,
                        out,
                    ),
                    _ => host::embedding(ids, table.host_f32("embedding table")?, dim, scale, out),
                }
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => g
                .embedding(
                    &ids.cuda_u32("embedding ids")?,
                    &table.cuda_bf16("embedding table")?,
                    out.cuda_bf16("embedding out")?,
                    dim,
                    scale,
                )
                .map_err(cuda_err),
        }
    }

    /// RMSNorm of `rows` rows of `dim`: `out = x / sqrt(mean(x²) + eps) * (weight + offset)`.
    /// With `residual`, `x` first becomes `x + residual` (written back) and that sum is
    /// normalised: the fused "add then norm" of a decoder block. `x`, `residual`, `out`:
    /// `[rows, dim]` (at least); `weight`: `[dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        x: &mut ViewMut<'_>,
        residual: Option<&View<'_>>,
        weight: &View<'_>,
        out: &mut ViewMut<'_>,
        rows: usize,
        dim: usize,
        eps: f32,
        offset: f32,
    ) -> Result<()> {
        let n = rows * dim;
        check_len("rms_norm x", x.len(), n)?;
        check_len("rms_norm out", out.len(), n)?;
        match self {
            Device::Cpu => {
                let x = &mut x.host_f32("rms_norm x")?[..n];
                if let Some(r) = residual {
                    check_len("rms_norm residual", r.len(), n)?;
                    host::add_assign(x, &r.host_f32("rms_norm residual")?[..n])?;
                }
                host::rms_norm(
                    x,
                    weight.host_f32("rms_norm weight")?,
                    eps,
                    offset,
                    dim,
                    &mut out.host_f32("rms_norm out")?[..n],
                )
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let res = residual
                    .map(|r| r.cuda_bf16("rms_norm residual"))
                    .transpose()?;
                g.rms_norm(
                    x.cuda_bf16("rms_norm x")?,
                    res.as_ref()
                        .map(|r| r as &dyn cudarc::driver::DevicePtr<half::bf16>),
                    &weight.cuda_bf16("rms_norm weight")?,
                    out.cuda_bf16("rms_norm out")?,
                    rows,
                    dim,
                    eps,
                    offset,
                )
                .map_err(cuda_err)
            }
        }
    }

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n])`: a linear layer with HF `[out, in]` weights.
    /// `out` is a float tensor of the device (f32 on the host; bf16 or f32 — logits — on CUDA).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &View<'_>,
        w: &View<'_>,
        bias: Option<&View<'_>>,
        out: &mut ViewMut<'_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        check_len("linear x", x.len(), m * k)?;
        check_len("linear w", w.len(), n * k)?;
        check_len("linear out", out.len(), m * n)?;
        match self {
            Device::Cpu => {
                let x = &x.host_f32("linear x")?[..m * k];
                let bias = bias.map(|b| b.host_f32("linear bias")).transpose()?;
                let out = &mut out.host_f32("linear out")?[..m * n];
                match w.dtype() {
                    // Weights kept as stored: widened on the fly, f32 accumulation.
                    DType::Bf16 => {
                        host::linear_bf16(x, &w.host_bf16("linear w")?[..n * k], bias, m, k, n, out)
                    }
                    _ => host::linear(x, &w.host_f32("linear w")?[..n * k], bias, m, k, n, out),
                }
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let (xv, wv) = (x.cuda_bf16("linear x")?, w.cuda_bf16("linear w")?);
                match out.dtype() {
                    DType::F32 => {
                        if bias.is_some() {
                            return Err(KernelError::InvalidArgument(
                                "linear: a bias with an f32 output is not supported on CUDA".into(),
                            ));
                        }
                        g.linear_f32(&xv, &wv, out.cuda_f32("linear out")?, m, n, k)
                            .map_err(cuda_err)
                    }
                    _ => {
                        let o = out.cuda_bf16("linear out")?;
                        let b = bias.map(|b| b.cuda_bf16("linear bias")).transpose()?;
                        g.linear_bias(&xv, &wv, b.as_ref(), o, m, n, k)
                            .map_err(cuda_err)
                    }
                }
            }
        }
    }

    /// NeoX RoPE in place on `q` `[tokens, n_q_heads, head_dim]` and, if given, `k`
    /// `[tokens, n_kv_heads, head_dim]`. `positions`: `[tokens]` i32; `inv_freq`: `[rot / 2]`
    /// f32 (both on this device); cos/sin scaled by `attention_factor`; dims past `rot` are
    /// untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        q: &mut ViewMut<'_>,
        k: Option<&mut ViewMut<'_>>,
        positions: &View<'_>,
        inv_freq: &View<'_>,
        tokens: usize,
        n_q_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        attention_factor: f32,
    ) -> Result<()> {
        match self {
            Device::Cpu => {
                let pos: Vec<usize> = positions.host_i32("rope positions")?[..tokens]
                    .iter()
                    .map(|&p| p.max(0) as usize)
                    .collect();
                let freq = inv_freq.host_f32("rope inv_freq")?;
                let nq = tokens * n_q_heads * head_dim;
                check_len("rope q", q.len(), nq)?;
                host::rope_inplace(
                    &mut q.host_f32("rope q")?[..nq],
                    &pos,
                    n_q_heads,
                    head_dim,
                    freq,
                    attention_factor,
                )?;
                if let Some(k) = k {
                    let nk = tokens * n_kv_heads * head_dim;
                    check_len("rope k", k.len(), nk)?;
                    host::rope_inplace(
                        &mut k.host_f32("rope k")?[..nk],
                        &pos,
                        n_kv_heads,
                        head_dim,
                        freq,
                        attention_factor,
                    )?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let k = match k {
                    Some(k) => Some(k.cuda_bf16("rope k")?),
                    None => None,
                };
                g.rope(
                    q.cuda_bf16("rope q")?,
                    k.map(|k| k as &mut dyn cudarc::driver::DevicePtrMut<half::bf16>),
                    &positions.cuda_i32("rope positions")?,
                    &inv_freq.cuda_f32("rope inv_freq")?,
                    tokens,
                    n_q_heads,
                    n_kv_heads,
                    head_dim,
                    attention_factor,
                )
                .map_err(cuda_err)
            }
        }
    }

    /// `out[r, i] = act(gate_up[r, i]) * gate_up[r, inter + i]`; `gate_up`: `[rows, 2 * inter]`
    /// (gate rows first, as the stacked gate/up projection writes them); `out`: `[rows, inter]`.
    pub fn act_mul(
        &self,
        gate_up: &View<'_>,
        out: &mut ViewMut<'_>,
        rows: usize,
        inter: usize,
        act: Activation,
    ) -> Result<()> {
        check_len("act_mul gate_up", gate_up.len(), rows * 2 * inter)?;
        check_len("act_mul out", out.len(), rows * inter)?;
        match self {
            Device::Cpu => host::act_mul_rows(
                &gate_up.host_f32("act_mul gate_up")?[..rows * 2 * inter],
                &mut out.host_f32("act_mul out")?[..rows * inter],
                rows,
                inter,
                act,
            ),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => g
                .act_mul(
                    &gate_up.cuda_bf16("act_mul gate_up")?,
                    out.cuda_bf16("act_mul out")?,
                    rows,
                    inter,
                    act,
                )
                .map_err(cuda_err),
        }
    }

    /// Softcapping in place: `x = cap * tanh(x / cap)` over an f32 view (final logits).
    pub fn softcap(&self, x: &mut ViewMut<'_>, cap: f32) -> Result<()> {
        if !(cap > 0.0 && cap.is_finite()) {
            return Err(KernelError::InvalidArgument(format!(
                "softcap {cap} must be finite and > 0"
            )));
        }
        match self {
            Device::Cpu => {
                host::softcap_inplace(x.host_f32("softcap x")?, cap);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let n = x.len();
                g.softcap(x.cuda_f32("softcap x")?, n, cap)
                    .map_err(cuda_err)
            }
        }
    }

    /// Per row of `logits` `[rows, vocab]` (f32): the argmax (`temperature <= 0`) or a sample
    /// of `softmax(logits / temperature)` by the Gumbel-max trick with a counter-based hash of
    /// `(seed, step, row, index)`, written to `out` `[rows]` u32. Ties go to the lowest index.
    /// The host implementation is the argmax only (host sampling with temperature, top-k and
    /// top-p is [`crate::sampling::Sampler`]); use [`Device::supports_device_sampling`].
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        logits: &mut ViewMut<'_>,
        out: &mut ViewMut<'_>,
        rows: usize,
        vocab: usize,
        temperature: f32,
        seed: u64,
        step: u64,
    ) -> Result<()> {
        check_len("sample logits", logits.len(), rows * vocab)?;
        check_len("sample out", out.len(), rows)?;
        match self {
            Device::Cpu => {
                let _ = (seed, step);
                if temperature > 0.0 {
                    return Err(KernelError::InvalidArgument(
                        "host sampling with a temperature goes through sampling::Sampler".into(),
                    ));
                }
                let l = logits.host_f32("sample logits")?;
                let o = out.host_u32("sample out")?;
                for r in 0..rows {
                    o[r] = crate::sampling::argmax(&l[r * vocab..(r + 1) * vocab]) as u32;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => g
                .sample(
                    logits.cuda_f32("sample logits")?,
                    out.cuda_u32("sample out")?,
                    rows,
                    vocab,
                    0.0,
                    temperature,
                    seed,
                    step,
                )
                .map_err(cuda_err),
        }
    }

    /// Whether [`Device::sample`] draws with a temperature on this device (CUDA: yes; the host
    /// samples with [`crate::sampling::Sampler`]).
    pub fn supports_device_sampling(&self) -> bool {
        self.is_cuda()
    }

    /// Checks `v` is a float tensor of this device's compute type, naming it otherwise.
    pub fn check_float(&self, what: &str, v: &View<'_>) -> Result<()> {
        if v.is_cuda() != self.is_cuda() || v.dtype() != self.float_dtype() {
            return Err(wrong(
                what,
                &format!("a {} tensor of {}", self.float_dtype(), self.name()),
                v.dtype(),
                v.is_cuda(),
            ));
        }
        Ok(())
    }
}
