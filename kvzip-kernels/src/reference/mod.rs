//! Plain single-threaded reference implementations: the oracle for tests.
//!
//! Same signatures and the same shape validation as [`crate::cpu`]. Reductions (dot products,
//! sums of squares, softmax normalisers) accumulate in `f64` so that the oracle is more accurate
//! than any fast path. Never use these on hot paths.

mod attention;
mod colstats;
mod quant;

pub use crate::pieces::attention_pieces_reference as attention_pieces;
pub use attention::attention;
pub use colstats::column_stats;
pub use quant::{dequantize_matrix, embedding_quant, linear_quant};

use half::bf16;

use crate::{validate, KernelError, Result};

/// `y[rows, out_dim] = x[rows, in_dim] · w[out_dim, in_dim]^T (+ bias[out_dim])`.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) -> Result<()> {
    linear_widened(x, w, |v| v, bias, rows, in_dim, out_dim, y)
}

/// [`linear`] with bf16 weights, widened exactly to f32 element by element.
pub fn linear_bf16(
    x: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) -> Result<()> {
    linear_widened(x, w, bf16::to_f32, bias, rows, in_dim, out_dim, y)
}

/// The body of [`linear`] for any weight element type that widens to f32.
#[allow(clippy::too_many_arguments)]
fn linear_widened<T: Copy>(
    x: &[f32],
    w: &[T],
    widen: impl Fn(T) -> f32,
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) -> Result<()> {
    validate::linear(
        x.len(),
        w.len(),
        bias.map(<[f32]>::len),
        rows,
        in_dim,
        out_dim,
        y.len(),
    )?;
    for r in 0..rows {
        let xr = &x[r * in_dim..(r + 1) * in_dim];
        for o in 0..out_dim {
            let wr = &w[o * in_dim..(o + 1) * in_dim];
            let dot: f64 = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| a as f64 * widen(b) as f64)
                .sum();
            let b = bias.map_or(0.0, |b| b[o] as f64);
            y[r * out_dim + o] = (dot + b) as f32;
        }
    }
    Ok(())
}

/// `c[m, n] = alpha * a[m, k] · b + beta * c`, with `b` `[k, n]` or, if `trans_b`, `[n, k]`.
/// With `beta == 0` the old contents of `c` are ignored (NaN in `c` does not propagate).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_b: bool,
    alpha: f32,
    beta: f32,
    c: &mut [f32],
) -> Result<()> {
    validate::matmul(a.len(), b.len(), m, k, n, c.len())?;
    for i in 0..m {
        for j in 0..n {
            let mut dot = 0.0f64;
            for kk in 0..k {
                let bv = if trans_b {
                    b[j * k + kk]
                } else {
                    b[kk * n + j]
                };
                dot += a[i * k + kk] as f64 * bv as f64;
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[i * n + j] as f64
            };
            c[i * n + j] = (alpha as f64 * dot + old) as f32;
        }
    }
    Ok(())
}

/// RMSNorm over rows of `dim`: `out = x / sqrt(mean(x^2) + eps) * (w + weight_offset)`.
pub fn rms_norm(
    x: &[f32],
    w: &[f32],
    eps: f32,
    weight_offset: f32,
    dim: usize,
    out: &mut [f32],
) -> Result<()> {
    validate::rms_norm(x.len(), w.len(), eps, dim, out.len())?;
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
        let inv = 1.0 / (ss / dim as f64 + eps as f64).sqrt();
        for i in 0..dim {
            or[i] = (xr[i] as f64 * inv) as f32 * (w[i] + weight_offset);
        }
    }
    Ok(())
}

/// `silu(x) = x / (1 + exp(-x))`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (PyTorch `approximate="tanh"`).
pub fn gelu_tanh(x: f32) -> f32 {
    let x64 = x as f64;
    let inner = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64 * x64 * x64);
    (0.5 * x64 * (1.0 + inner.tanh())) as f32
}

/// `out = silu(gate) * up`, element-wise.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    validate::binary("gate", gate.len(), "up", up.len(), out.len())?;
    for i in 0..gate.len() {
        out[i] = silu(gate[i]) * up[i];
    }
    Ok(())
}

/// `out = gelu_tanh(gate) * up`, element-wise.
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    validate::binary("gate", gate.len(), "up", up.len(), out.len())?;
    for i in 0..gate.len() {
        out[i] = gelu_tanh(gate[i]) * up[i];
    }
    Ok(())
}

/// `acc += x`, element-wise.
pub fn add_assign(acc: &mut [f32], x: &[f32]) -> Result<()> {
    validate::len("x", x.len(), acc.len(), "same as acc")?;
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
    Ok(())
}

/// `out[i, :] = table[ids[i], :] * scale`; `table` is `[vocab, dim]`, `out` is `[ids.len(), dim]`.
pub fn embedding(
    ids: &[u32],
    table: &[f32],
    dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    embedding_widened(ids, table, |v| v, dim, scale, out)
}

/// [`embedding`] with a bf16 table.
pub fn embedding_bf16(
    ids: &[u32],
    table: &[bf16],
    dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    embedding_widened(ids, table, bf16::to_f32, dim, scale, out)
}

fn embedding_widened<T: Copy>(
    ids: &[u32],
    table: &[T],
    widen: impl Fn(T) -> f32,
    dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let vocab = validate::embedding(ids.len(), table.len(), dim, out.len())?;
    for (position, &id) in ids.iter().enumerate() {
        let row = id as usize;
        if row >= vocab {
            return Err(KernelError::TokenOutOfRange {
                id,
                position,
                vocab,
            });
        }
        for d in 0..dim {
            out[position * dim + d] = widen(table[row * dim + d]) * scale;
        }
    }
    Ok(())
}

/// Cos and sin of `pos * inv_freq` (angle computed in f32 like HF), times `attention_factor`.
pub(crate) fn rope_cos_sin(pos: usize, inv_freq: f32, attention_factor: f32) -> (f32, f32) {
    let angle = pos as f32 * inv_freq;
    let a = angle as f64;
    (
        a.cos() as f32 * attention_factor,
        a.sin() as f32 * attention_factor,
    )
}

/// Rotary embedding in place, HF `rotate_half` convention; `x` is `[tokens, n_heads, head_dim]`,
/// `positions` `[tokens]`; the first `2 * inv_freq.len()` dims of each head are rotated.
pub fn rope_inplace(
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    attention_factor: f32,
) -> Result<()> {
    let rot = validate::rope(x.len(), positions.len(), n_heads, head_dim, inv_freq.len())?;
    let half = rot / 2;
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let base = (t * n_heads + h) * head_dim;
            for i in 0..half {
                let (cos, sin) = rope_cos_sin(pos, inv_freq[i], attention_factor);
                let x1 = x[base + i];
                let x2 = x[base + i + half];
                x[base + i] = x1 * cos - x2 * sin;
                x[base + i + half] = x2 * cos + x1 * sin;
            }
        }
    }
    Ok(())
}

/// Softmax in place over rows of `dim`. A row whose maximum is `-inf` (fully masked) becomes zeros.
pub fn softmax_rows(x: &mut [f32], dim: usize) -> Result<()> {
    validate::rows_of("x", x.len(), dim)?;
    for row in x.chunks_exact_mut(dim) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        for v in row.iter_mut() {
            *v = (((*v - max) as f64).exp() / sum) as f32;
        }
    }
    Ok(())
}

/// Element-wise softcapping in place: `x = cap * tanh(x / cap)`.
pub fn softcap_inplace(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

/// Gated activation over stacked `[gate | up]` rows (`gate_up`: `[rows, 2 * inter]`, `out`:
/// `[rows, inter]`): `out[r, i] = act(gate_up[r, i]) * gate_up[r, inter + i]`.
pub fn act_mul_rows(
    gate_up: &[f32],
    out: &mut [f32],
    rows: usize,
    inter: usize,
    act: crate::Activation,
) -> Result<()> {
    validate::len(
        "gate_up",
        gate_up.len(),
        rows * 2 * inter,
        "[rows, 2 * inter]",
    )?;
    validate::len("out", out.len(), rows * inter, "[rows, inter]")?;
    for r in 0..rows {
        for i in 0..inter {
            let (g, u) = (
                gate_up[r * 2 * inter + i],
                gate_up[r * 2 * inter + inter + i],
            );
            out[r * inter + i] = match act {
                crate::Activation::Silu => silu(g),
                crate::Activation::GeluTanh => gelu_tanh(g),
            } * u;
        }
    }
    Ok(())
}

/// Largest value of `x` (`-inf` for an empty slice).
pub fn max_value(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `sum(exp(x - shift))`, accumulated in f64.
pub fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    x.iter().map(|&v| ((v - shift) as f64).exp()).sum::<f64>() as f32
}
