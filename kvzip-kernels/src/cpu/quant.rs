//! Linear layers and embeddings over ggml-quantized weights kept as stored ([`QuantMatrix`]),
//! with f32 activations and f32 accumulation.
//!
//! - Decode (few rows): each weight row is decoded block by block into an L1-resident f32 row
//!   and dotted with every row of `x` while it is there; the matrix is read once, in its
//!   compact form (4.5–8.5 bits per weight instead of 32).
//! - Prefill (many rows): blocks of output features are decoded into a per-call f32 panel sized
//!   to stay in L2 and multiplied with the SIMD GEMM (the bf16 path's panel GEMM).
//!
//! The block decoders here are written so that they vectorise (AVX + FMA at run time through
//! [`multiversion!`]); they compute exactly what the scalar reference of
//! [`crate::quant::format`] computes (same operations, same order), so both paths equal
//! [`super::linear`] on the dequantized weights up to the order of summation.

use half::f16;
use rayon::prelude::*;

use super::bf16::panel_gemm;
use super::math::dot;
use super::simd::multiversion;
use crate::quant::{GgmlType, QuantMatrix, QK_K};
use crate::{validate, KernelError, Result};

/// Rows at or below which [`linear_quant`] decodes each weight row once for all rows of `x`.
const GEMV_MAX_ROWS: usize = 8;

/// Output features per rayon task of the GEMV.
const GEMV_CHUNK: usize = 32;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Bit `k` of byte `b` for each `k` in 0..8, as bytes of 0 or 16 (the 5th bit of a 5-bit value).
const HIGH_BIT_BYTES: [[u8; 8]; 256] = {
    let mut t = [[0u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 8 {
            t[b][k] = (((b >> k) & 1) << 4) as u8;
            k += 1;
        }
        b += 1;
    }
    t
};

#[inline(always)]
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    let (lo, hi) = y[..32].split_at_mut(16);
    for j in 0..16 {
        lo[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
        hi[j] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

#[inline(always)]
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    let (lo, hi) = y[..32].split_at_mut(16);
    for j in 0..16 {
        lo[j] = d * (qs[j] & 0x0F) as f32 + m;
        hi[j] = d * (qs[j] >> 4) as f32 + m;
    }
}

#[inline(always)]
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    // The 32 fifth bits as bytes of 0/16: element j's bit is bit j of the little-endian qh.
    let mut high = [0u8; 32];
    for (i, chunk) in high.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&HIGH_BIT_BYTES[b[2 + i] as usize]);
    }
    let qs = &b[6..22];
    let (lo, hi) = y[..32].split_at_mut(16);
    for j in 0..16 {
        let l = (qs[j] & 0x0F) | high[j];
        let h = (qs[j] >> 4) | high[j + 16];
        lo[j] = d * (l as i32 - 16) as f32;
        hi[j] = d * (h as i32 - 16) as f32;
    }
}

#[inline(always)]
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y[..32].iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K / Q5_K.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (s, out) in y[..QK_K].chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(s, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (src, shift) = (&qs[(s / 2) * 32..(s / 2) * 32 + 32], 4 * (s % 2));
        for (o, &q) in out.iter_mut().zip(src) {
            *o = d1 * ((q >> shift) & 0x0F) as f32 - m1;
        }
    }
}

#[inline(always)]
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (s, out) in y[..QK_K].chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(s, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (src, shift) = (&qs[(s / 2) * 32..(s / 2) * 32 + 32], 4 * (s % 2));
        for ((o, &q), &h) in out.iter_mut().zip(src).zip(qh) {
            let v = ((q >> shift) & 0x0F) | (((h >> s) & 1) << 4);
            *o = d1 * v as f32 - m1;
        }
    }
}

#[inline(always)]
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for h in 0..2 {
        for k in 0..4 {
            let lo_src = &ql[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
            let hi_src = &qh[32 * h..32 * h + 32];
            let base = 128 * h + 32 * k;
            for half in 0..2 {
                let sc = d * (scales[(base + 16 * half) / 16] as i8) as f32;
                let range = 16 * half..16 * half + 16;
                let out = &mut y[base + range.start..base + range.end];
                for ((o, &l), &hb) in out
                    .iter_mut()
                    .zip(&lo_src[range.clone()])
                    .zip(&hi_src[range])
                {
                    let lo = (l >> (4 * (k / 2))) & 0x0F;
                    let hi = (hb >> (2 * k)) & 0x03;
                    *o = sc * ((lo | (hi << 4)) as i32 - 32) as f32;
                }
            }
        }
    }
}

multiversion! {
    /// Decodes one row (`bytes` = a whole number of `ty` blocks) into `out` (its elements).
    /// `ty` must be one of [`crate::quant::KERNEL_TYPES`].
    fn decode_row<M>(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
        macro_rules! run {
            ($f:ident, $block:expr, $size:expr) => {
                for (y, b) in out.chunks_exact_mut($block).zip(bytes.chunks_exact($size)) {
                    $f(b, y);
                }
            };
        }
        match ty {
            GgmlType::Q4_0 => run!(block_q4_0, 32, 18),
            GgmlType::Q4_1 => run!(block_q4_1, 32, 20),
            GgmlType::Q5_0 => run!(block_q5_0, 32, 22),
            GgmlType::Q8_0 => run!(block_q8_0, 32, 34),
            GgmlType::Q4_K => run!(block_q4_k, QK_K, 144),
            GgmlType::Q5_K => run!(block_q5_k, QK_K, 176),
            GgmlType::Q6_K => run!(block_q6_k, QK_K, 210),
            _ => out.fill(f32::NAN),
        }
    }
}

/// Row `r` of `m` decoded into `out` (`m.cols()` floats) with the vectorised decoders.
fn decode(m: &QuantMatrix, r: usize, out: &mut [f32]) {
    if let Some((ty, bytes)) = m.row(r) {
        decode_row(ty, bytes, out);
    }
}

/// `y[rows, out_dim] = x[rows, in_dim] · W[first_row.., :]ᵀ (+ bias[out_dim])` where `W` is the
/// quantized `m` (`in_dim == m.cols()`) and only its rows `first_row..first_row + out_dim` are
/// used (one part of a stacked projection).
///
/// Same validation as [`super::linear`]; `m` is never expanded as a whole.
#[allow(clippy::too_many_arguments)]
pub fn linear_quant(
    x: &[f32],
    m: &QuantMatrix,
    first_row: usize,
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) -> Result<()> {
    validate::quant_rows(m.rows(), m.cols(), first_row, out_dim, in_dim)?;
    validate::linear(
        x.len(),
        out_dim * in_dim,
        bias.map(<[f32]>::len),
        rows,
        in_dim,
        out_dim,
        y.len(),
    )?;
    if rows == 0 || out_dim == 0 {
        return Ok(());
    }
    let x = &x[..rows * in_dim];
    let y = &mut y[..rows * out_dim];
    let integer_gemv =
        rows <= GEMV_MAX_ROWS && cfg!(target_arch = "x86_64") && super::simd::has_avx_fma();
    // With 8-bit activations every path computes with the same activations: the integer GEMV
    // quantizes them itself; the f32 paths (prefill GEMM, CPUs without AVX) get them rounded to
    // the q8 grid first, so a row's result does not depend on how many rows share the product
    // (batched and single decoding agree up to summation order).
    let rounded;
    let x = if m.q8_activations() && !integer_gemv {
        rounded = round_to_q8(x);
        &rounded[..]
    } else {
        x
    };
    if rows <= GEMV_MAX_ROWS {
        gemv(x, m, first_row, bias, rows, in_dim, out_dim, y);
        return Ok(());
    }
    panel_gemm(
        x,
        &|o, dst| decode(m, first_row + o, dst),
        bias,
        rows,
        in_dim,
        out_dim,
        y,
    )
}

/// `x` (a whole number of 32-blocks) rounded the way the 8-bit activation products quantize it:
/// per block `d = max|x| / 127`, each value becomes `round(x / d) · d` (codes within ±127).
pub(crate) fn round_to_q8(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks_exact(32) {
        let d = b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(b.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) * d));
    }
    out
}

/// Decode path: output features split over threads. Each weight row is dotted with every `x`
/// row straight from its blocks ([`dot_row`]: AVX + FMA, nothing written but the result), or on
/// other CPUs decoded once into a per-task f32 row and dotted. Feature-major results as in the
/// bf16 GEMV.
#[allow(clippy::too_many_arguments)]
fn gemv(
    x: &[f32],
    m: &QuantMatrix,
    first_row: usize,
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) {
    let fused = super::simd::has_avx_fma();
    let avx2 = super::simd::has_avx2();
    #[cfg(target_arch = "x86_64")]
    if fused && m.q8_activations() {
        let xq: Vec<Q8Row> = x.chunks_exact(in_dim).map(Q8Row::new).collect();
        let fill = |first: usize, dst: &mut [f32]| {
            let cells = dst.chunks_exact_mut(rows).enumerate();
            for ((i, cell), (ty, bytes)) in cells.zip(m.rows_from(first_row + first)) {
                let b = bias.map_or(0.0, |b| b[first + i]);
                for (c, xr) in cell.iter_mut().zip(&xq) {
                    // SAFETY: AVX2 / AVX + FMA + F16C were detected; `row` checks lengths.
                    *c = if avx2 {
                        unsafe { super::quant_avx2::row(ty, bytes, xr) }
                    } else {
                        unsafe { avx_q8::row(ty, bytes, xr) }
                    } + b;
                }
            }
        };
        return feature_major(y, rows, out_dim, |dst| {
            dst.par_chunks_mut(GEMV_CHUNK * rows)
                .enumerate()
                .for_each(|(c, d)| fill(c * GEMV_CHUNK, d))
        });
    }
    // Σx over every 32-element sub-block of every x row (the `- m·Σx` term of Q4_1 / K-quants),
    // used by the fused f32 kernels only.
    let sums: Vec<f32> = if fused {
        x.chunks_exact(32).map(|c| c.iter().sum::<f32>()).collect()
    } else {
        Vec::new()
    };
    let per_row = in_dim / 32;
    let fill = |first: usize, dst: &mut [f32]| {
        let mut w = if fused {
            Vec::new()
        } else {
            vec![0.0f32; in_dim]
        };
        let cells = dst.chunks_exact_mut(rows).enumerate();
        for ((i, cell), (ty, bytes)) in cells.zip(m.rows_from(first_row + first)) {
            let b = bias.map_or(0.0, |b| b[first + i]);
            if fused {
                for (r, c) in cell.iter_mut().enumerate() {
                    let xr = &x[r * in_dim..(r + 1) * in_dim];
                    let sr = &sums[r * per_row..(r + 1) * per_row];
                    *c = dot_row(avx2, ty, bytes, xr, sr) + b;
                }
            } else {
                decode_row(ty, bytes, &mut w);
                for (r, c) in cell.iter_mut().enumerate() {
                    *c = dot(&x[r * in_dim..(r + 1) * in_dim], &w) + b;
                }
            }
        }
    };
    feature_major(y, rows, out_dim, |dst| {
        dst.par_chunks_mut(GEMV_CHUNK * rows)
            .enumerate()
            .for_each(|(c, d)| fill(c * GEMV_CHUNK, d))
    });
}

/// Runs `run` on a feature-major `[out_dim, rows]` buffer and stores it into `y`
/// (`[rows, out_dim]`); one row needs no buffer.
fn feature_major(y: &mut [f32], rows: usize, out_dim: usize, run: impl Fn(&mut [f32])) {
    if rows == 1 {
        run(y);
        return;
    }
    let mut by_feature = vec![0.0f32; out_dim * rows];
    run(&mut by_feature);
    for (o, cell) in by_feature.chunks_exact(rows).enumerate() {
        for (r, &v) in cell.iter().enumerate() {
            y[r * out_dim + o] = v;
        }
    }
}

/// `Σ_i w[i] · x[i]` for one quantized row (`bytes`, type `ty`) and one f32 row `x`, with
/// `sums[j] = Σ x[32j..32j+32]`. Only called when [`super::simd::has_avx_fma`]; `avx2` is
/// [`super::simd::has_avx2`], read once per product by the caller.
#[inline]
fn dot_row(avx2: bool, ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: AVX2 (with FMA and F16C) was detected; `row_f32` checks lengths.
            if let Some(v) = unsafe { super::quant_avx2::row_f32(ty, bytes, x, sums) } {
                return v;
            }
        }
        // SAFETY: callers checked AVX + FMA at run time; `avx_dot::row` checks lengths.
        unsafe { avx_dot::row(ty, bytes, x, sums) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (avx2, sums);
        let mut w = vec![0.0f32; x.len()];
        decode_row(ty, bytes, &mut w);
        dot(x, &w)
    }
}

/// Fused decode-and-dot over ggml blocks with AVX + FMA (128-bit integer unpacking, so AVX2 is
/// not needed): 16 quantized values become two 8-lane float vectors that are multiplied into
/// the block's accumulator; the block scale is applied once per block (`d · Σ q·x`, and
/// `- m · Σx` for the types with a min).
#[cfg(target_arch = "x86_64")]
mod avx_dot;
#[cfg(target_arch = "x86_64")]
pub(super) use avx_dot::row_k_avx2;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx_q8::Q8Row;

/// Decode products on 8-bit activations ([`QuantMatrix::with_q8_activations`]): each x row is
/// quantized once per call to blocks of 32 (`d = max|x| / 127`, `q = round(x / d)`), and each
/// weight block is multiplied with integer instructions (`pmaddubsw` on unsigned weight codes ×
/// signed activation codes, `pmaddwd` to 32-bit), scaled once per block; codes with an offset
/// (`q − 8`, `q − 16`, `q − 32`, mins) use the per-16 activation-code sums.
#[cfg(target_arch = "x86_64")]
mod avx_q8;

/// `out[i, :] = table[ids[i], :] * scale` with a quantized table `[vocab, dim]` (see
/// [`super::embedding`]): only the looked-up rows are decoded.
pub fn embedding_quant(
    ids: &[u32],
    table: &QuantMatrix,
    dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    if table.cols() != dim {
        return Err(KernelError::Shape(format!(
            "embedding_quant: table has {} columns, dim is {dim}",
            table.cols()
        )));
    }
    validate::len("embedding out", out.len(), ids.len() * dim, "ids * dim")?;
    let vocab = table.rows();
    if let Some((position, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(KernelError::TokenOutOfRange {
            id,
            position,
            vocab,
        });
    }
    if dim == 0 {
        return Ok(());
    }
    for (o, &id) in out.chunks_exact_mut(dim).zip(ids) {
        decode(table, id as usize, o);
        if scale != 1.0 {
            o.iter_mut().for_each(|v| *v *= scale);
        }
    }
    Ok(())
}

/// The whole matrix dequantized to f32 `[rows, cols]` with the vectorised decoders (for
/// consumers that need dense f32 weights, e.g. head-level scoring's output projection).
pub fn dequantize_matrix(m: &QuantMatrix) -> Vec<f32> {
    let cols = m.cols();
    let mut out = vec![0.0f32; m.len()];
    if cols > 0 {
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| decode(m, r, row));
    }
    out
}

#[cfg(test)]
mod tests;
