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
    if m.cols() != in_dim || first_row.checked_add(out_dim).is_none_or(|e| e > m.rows()) {
        return Err(KernelError::Shape(format!(
            "linear_quant: rows {first_row}..{} of a [{}, {}] quantized matrix with in_dim {in_dim}",
            first_row.saturating_add(out_dim),
            m.rows(),
            m.cols()
        )));
    }
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
    // Σx over every 32-element sub-block of every x row (the `- m·Σx` term of Q4_1 / K-quants).
    let sums: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum::<f32>()).collect();
    let per_row = in_dim / 32;
    let fused = super::simd::has_avx_fma();
    #[cfg(target_arch = "x86_64")]
    if fused && m.q8_activations() {
        let xq: Vec<Q8Row> = x.chunks_exact(in_dim).map(Q8Row::new).collect();
        let avx2 = super::simd::has_avx2();
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
                    *c = dot_row(ty, bytes, xr, sr) + b;
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
/// `sums[j] = Σ x[32j..32j+32]`. Only called when [`super::simd::has_avx_fma`].
#[inline]
fn dot_row(ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::has_avx2() {
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
        let _ = sums;
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
mod avx_dot {
    use std::arch::x86_64::*;

    use crate::quant::GgmlType;

    /// The f16 at byte `i` of `b`, converted with F16C (no run-time feature test per call).
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    fn f16_at(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([b[i], b[i + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// `acc + q[0..16] · x[0..16]` with `q` 16 signed bytes.
    #[inline]
    #[target_feature(enable = "avx,fma")]
    unsafe fn fma16(q: __m128i, x: *const f32, acc: __m256) -> __m256 {
        let lo = _mm_cvtepi8_epi32(q);
        let lo2 = _mm_cvtepi8_epi32(_mm_srli_si128(q, 4));
        let hi = _mm_cvtepi8_epi32(_mm_srli_si128(q, 8));
        let hi2 = _mm_cvtepi8_epi32(_mm_srli_si128(q, 12));
        let a = _mm256_cvtepi32_ps(_mm256_insertf128_si256(_mm256_castsi128_si256(lo), lo2, 1));
        let b = _mm256_cvtepi32_ps(_mm256_insertf128_si256(_mm256_castsi128_si256(hi), hi2, 1));
        // SAFETY: the caller guarantees 16 readable floats at `x`.
        let acc = unsafe { _mm256_fmadd_ps(a, _mm256_loadu_ps(x), acc) };
        unsafe { _mm256_fmadd_ps(b, _mm256_loadu_ps(x.add(8)), acc) }
    }

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load16(p: &[u8]) -> __m128i {
        debug_assert!(p.len() >= 16);
        // SAFETY: 16 bytes are readable (checked by the slice length in debug builds; every
        // caller slices whole blocks).
        unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) }
    }

    /// The 32 fifth bits of Q5_0 (`qh`, little-endian) as bytes of 0x10 / 0, elements 0..16 and
    /// 16..32.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn high_bits(qh: u32) -> (__m128i, __m128i) {
        let bits = _mm_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let v = _mm_cvtsi32_si128(qh as i32);
        let lo = _mm_shuffle_epi8(
            v,
            _mm_set_epi8(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        );
        let hi = _mm_shuffle_epi8(
            v,
            _mm_set_epi8(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
        );
        let set = |m: __m128i| {
            _mm_and_si128(
                _mm_cmpeq_epi8(_mm_and_si128(m, bits), bits),
                _mm_set1_epi8(0x10),
            )
        };
        (set(lo), set(hi))
    }

    /// Horizontal sum of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// See [`super::dot_row`]. Rows of the wrong length give NaN. One loop per block type, two
    /// independent accumulators (even / odd blocks), the min terms in a third.
    #[target_feature(enable = "avx,fma,f16c")]
    pub(super) unsafe fn row(ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let (block, size) = ty.block_layout();
        let (block, size) = (block as usize, size as usize);
        let n = bytes.len() / size * block;
        if bytes.len() % size != 0 || n != x.len() || sums.len() * 32 != n {
            return f32::NAN;
        }
        // SAFETY (all arms): lengths checked above; block `bi` reads bytes
        // `bi*size..(bi+1)*size` and floats `bi*block..(bi+1)*block` of `x`.
        let (acc, mins) = unsafe {
            match ty {
                GgmlType::Q8_0 => (q8_0(bytes, x), 0.0),
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 => q4_5(ty, bytes, x, sums),
                GgmlType::Q4_K | GgmlType::Q5_K => q45_k(ty, bytes, x, sums),
                GgmlType::Q6_K => (q6_k(bytes, x), 0.0),
                _ => return f32::NAN,
            }
        };
        // SAFETY: AVX is enabled in this function.
        unsafe { hsum(acc) + mins }
    }

    #[target_feature(enable = "avx,fma,f16c")]
    unsafe fn q8_0(bytes: &[u8], x: &[f32]) -> __m256 {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (bi, b) in bytes.chunks_exact(34).enumerate() {
            // SAFETY: see `row`.
            unsafe {
                let xb = x.as_ptr().add(32 * bi);
                let acc = fma16(load16(&b[2..18]), xb, _mm256_setzero_ps());
                let acc = fma16(load16(&b[18..34]), xb.add(16), acc);
                let d = _mm256_set1_ps(f16_at(b, 0));
                if bi % 2 == 0 {
                    a0 = _mm256_fmadd_ps(d, acc, a0);
                } else {
                    a1 = _mm256_fmadd_ps(d, acc, a1);
                }
            }
        }
        _mm256_add_ps(a0, a1)
    }

    #[target_feature(enable = "avx,fma,f16c")]
    unsafe fn q4_5(ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> (__m256, f32) {
        let size = ty.block_layout().1 as usize;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut mins = _mm_setzero_ps();
        let low4 = _mm_set1_epi8(0x0F);
        let (qs_at, offset) = match ty {
            GgmlType::Q4_0 => (2, 8),
            GgmlType::Q4_1 => (4, 0),
            _ => (6, 16),
        };
        let sub = _mm_set1_epi8(offset);
        for (bi, b) in bytes.chunks_exact(size).enumerate() {
            // SAFETY: see `row`.
            unsafe {
                let raw = load16(&b[qs_at..qs_at + 16]);
                let mut lo = _mm_and_si128(raw, low4);
                let mut hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
                if offset == 16 {
                    let (h0, h1) = high_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
                    lo = _mm_or_si128(lo, h0);
                    hi = _mm_or_si128(hi, h1);
                }
                let xb = x.as_ptr().add(32 * bi);
                let acc = fma16(_mm_sub_epi8(lo, sub), xb, _mm256_setzero_ps());
                let acc = fma16(_mm_sub_epi8(hi, sub), xb.add(16), acc);
                let d = _mm256_set1_ps(f16_at(b, 0));
                if bi % 2 == 0 {
                    a0 = _mm256_fmadd_ps(d, acc, a0);
                } else {
                    a1 = _mm256_fmadd_ps(d, acc, a1);
                }
                if offset == 0 {
                    mins = _mm_fmadd_ss(
                        _mm_set_ss(f16_at(b, 2)),
                        _mm_set_ss(*sums.get_unchecked(bi)),
                        mins,
                    );
                }
            }
        }
        (_mm256_add_ps(a0, a1), _mm_cvtss_f32(mins))
    }

    #[target_feature(enable = "avx,fma,f16c")]
    unsafe fn q45_k(ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> (__m256, f32) {
        let size = ty.block_layout().1 as usize;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut mins = _mm_setzero_ps();
        let low4 = _mm_set1_epi8(0x0F);
        let five = ty == GgmlType::Q5_K;
        for (bi, b) in bytes.chunks_exact(size).enumerate() {
            // SAFETY: see `row`.
            unsafe {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[16..16], &b[16..144])
                };
                for pair in 0..4 {
                    let r0 = load16(&qs[32 * pair..32 * pair + 16]);
                    let r1 = load16(&qs[32 * pair + 16..32 * pair + 32]);
                    for half in 0..2 {
                        let s = 2 * pair + half;
                        let (sc, m) = super::scale_min_k4(s, scales);
                        let (mut q0, mut q1) = if half == 0 {
                            (_mm_and_si128(r0, low4), _mm_and_si128(r1, low4))
                        } else {
                            (
                                _mm_and_si128(_mm_srli_epi16(r0, 4), low4),
                                _mm_and_si128(_mm_srli_epi16(r1, 4), low4),
                            )
                        };
                        if five {
                            let bit = _mm_set1_epi8(1 << s);
                            let h = |v: __m128i| {
                                _mm_and_si128(
                                    _mm_cmpeq_epi8(_mm_and_si128(v, bit), bit),
                                    _mm_set1_epi8(0x10),
                                )
                            };
                            q0 = _mm_or_si128(q0, h(load16(&qh[..16])));
                            q1 = _mm_or_si128(q1, h(load16(&qh[16..32])));
                        }
                        let xs = x.as_ptr().add(256 * bi + 32 * s);
                        let acc = fma16(q0, xs, _mm256_setzero_ps());
                        let acc = fma16(q1, xs.add(16), acc);
                        let scale = _mm256_set1_ps(d * sc as f32);
                        if half == 0 {
                            a0 = _mm256_fmadd_ps(scale, acc, a0);
                        } else {
                            a1 = _mm256_fmadd_ps(scale, acc, a1);
                        }
                        mins = _mm_fmadd_ss(
                            _mm_set_ss(-dmin * m as f32),
                            _mm_set_ss(*sums.get_unchecked(8 * bi + s)),
                            mins,
                        );
                    }
                }
            }
        }
        (_mm256_add_ps(a0, a1), _mm_cvtss_f32(mins))
    }

    #[target_feature(enable = "avx,fma,f16c")]
    unsafe fn q6_k(bytes: &[u8], x: &[f32]) -> __m256 {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let low4 = _mm_set1_epi8(0x0F);
        let three = _mm_set1_epi8(3);
        let m32 = _mm_set1_epi8(32);
        for (bi, b) in bytes.chunks_exact(210).enumerate() {
            // SAFETY: see `row`.
            unsafe {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for h in 0..2 {
                    for k in 0..4 {
                        let lo_src = &ql[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
                        let hi_src = &qh[32 * h..32 * h + 32];
                        let lshift = _mm_cvtsi32_si128(4 * (k / 2) as i32);
                        let hshift = _mm_cvtsi32_si128(2 * k as i32);
                        for half in 0..2 {
                            let lo = _mm_and_si128(
                                _mm_srl_epi16(load16(&lo_src[16 * half..16 * half + 16]), lshift),
                                low4,
                            );
                            let hi = _mm_and_si128(
                                _mm_srl_epi16(load16(&hi_src[16 * half..16 * half + 16]), hshift),
                                three,
                            );
                            let q = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), m32);
                            let e = 256 * bi + 128 * h + 32 * k + 16 * half;
                            let acc = fma16(q, x.as_ptr().add(e), _mm256_setzero_ps());
                            let sc =
                                _mm256_set1_ps(d * (scales[(4 * h + k) * 2 + half] as i8) as f32);
                            if half == 0 {
                                a0 = _mm256_fmadd_ps(sc, acc, a0);
                            } else {
                                a1 = _mm256_fmadd_ps(sc, acc, a1);
                            }
                        }
                    }
                }
            }
        }
        _mm256_add_ps(a0, a1)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx_q8::Q8Row;

/// Decode products on 8-bit activations ([`QuantMatrix::with_q8_activations`]): each x row is
/// quantized once per call to blocks of 32 (`d = max|x| / 127`, `q = round(x / d)`), and each
/// weight block is multiplied with integer instructions (`pmaddubsw` on unsigned weight codes ×
/// signed activation codes, `pmaddwd` to 32-bit), scaled once per block; codes with an offset
/// (`q − 8`, `q − 16`, `q − 32`, mins) use the per-16 activation-code sums.
#[cfg(target_arch = "x86_64")]
mod avx_q8 {
    use std::arch::x86_64::*;

    use crate::quant::GgmlType;

    /// One activation row quantized to blocks of 32.
    pub(crate) struct Q8Row {
        /// Scale per block.
        pub(crate) d: Vec<f32>,
        /// Codes, `[len]`.
        pub(crate) q: Vec<i8>,
        /// Sum of the codes of each 16 elements.
        pub(crate) s16: Vec<i32>,
    }

    impl Q8Row {
        /// Quantizes `x` (a whole number of 32-blocks).
        pub(crate) fn new(x: &[f32]) -> Self {
            let mut d = Vec::with_capacity(x.len() / 32);
            let mut q = Vec::with_capacity(x.len());
            let mut s16 = Vec::with_capacity(x.len() / 16);
            for b in x.chunks_exact(32) {
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                d.push(scale);
                for half in b.chunks_exact(16) {
                    let mut sum = 0i32;
                    for &v in half {
                        let c = (v * inv).round().clamp(-127.0, 127.0) as i8;
                        sum += c as i32;
                        q.push(c);
                    }
                    s16.push(sum);
                }
            }
            Self { d, q, s16 }
        }
    }

    /// The f16 at byte `i` of `b`, converted with F16C (no run-time feature test per call).
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    fn f16_at(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([b[i], b[i + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load16(p: &[u8]) -> __m128i {
        debug_assert!(p.len() >= 16);
        // SAFETY: every caller slices at least 16 bytes inside one block.
        unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) }
    }

    /// The 32 fifth bits of Q5_0 (`qh`) as bytes of 0x10 / 0 (elements 0..16, 16..32).
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn high_bits(qh: u32) -> (__m128i, __m128i) {
        let bits = _mm_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let v = _mm_cvtsi32_si128(qh as i32);
        let lo = _mm_shuffle_epi8(
            v,
            _mm_set_epi8(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        );
        let hi = _mm_shuffle_epi8(
            v,
            _mm_set_epi8(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
        );
        let set = |m: __m128i| {
            _mm_and_si128(
                _mm_cmpeq_epi8(_mm_and_si128(m, bits), bits),
                _mm_set1_epi8(0x10),
            )
        };
        (set(lo), set(hi))
    }

    /// `Σ_i w[i] · x[i]` for one quantized row and one quantized activation row (NaN when the
    /// lengths do not match). One loop per block type; the integer block sums stay in vector
    /// lanes and are scaled into two independent float accumulators (no per-block horizontal
    /// sum, no serial scalar chain).
    #[target_feature(enable = "avx,fma,f16c")]
    pub(super) unsafe fn row(ty: GgmlType, bytes: &[u8], x: &Q8Row) -> f32 {
        let (block, size) = ty.block_layout();
        let (block, size) = (block as usize, size as usize);
        if bytes.len() % size != 0 || bytes.len() / size * block != x.q.len() {
            return f32::NAN;
        }
        // SAFETY (all arms): lengths checked above; every block `bi` reads bytes
        // `bi*size..(bi+1)*size` of `bytes` and codes `bi*block..(bi+1)*block` of `x.q`.
        let acc = unsafe {
            match ty {
                GgmlType::Q8_0 => q8_0(bytes, x),
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 => q4_5(ty, bytes, x),
                GgmlType::Q4_K | GgmlType::Q5_K => q45_k(ty, bytes, x),
                GgmlType::Q6_K => q6_k(bytes, x),
                _ => return f32::NAN,
            }
        };
        let s = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Four i32 lanes of `Σ u·x` over 32 codes (`u` in two registers, `x` at `xq`).
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn udot32(u0: __m128i, u1: __m128i, xq: *const i8) -> __m128i {
        let ones = _mm_set1_epi16(1);
        // SAFETY: 32 codes are readable at `xq` (callers index whole blocks).
        let (x0, x1) = unsafe {
            (
                _mm_loadu_si128(xq as *const __m128i),
                _mm_loadu_si128(xq.add(16) as *const __m128i),
            )
        };
        let p0 = _mm_madd_epi16(_mm_maddubs_epi16(u0, x0), ones);
        let p1 = _mm_madd_epi16(_mm_maddubs_epi16(u1, x1), ones);
        _mm_add_epi32(p0, p1)
    }

    #[inline]
    #[target_feature(enable = "avx,fma")]
    unsafe fn scale_into(isum: __m128i, scale: f32, acc: __m128) -> __m128 {
        _mm_fmadd_ps(_mm_cvtepi32_ps(isum), _mm_set1_ps(scale), acc)
    }

    #[target_feature(enable = "avx,fma,f16c")]
    unsafe fn q8_0(bytes: &[u8], x: &Q8Row) -> __m128 {
        let (mut a0, mut a1) = (_mm_setzero_ps(), _mm_setzero_ps());
        let ones = _mm_set1_epi16(1);
        for (bi, b) in bytes.chunks_exact(34).enumerate() {
            // SAFETY: see `row`.
            unsafe {
                let w0 = load16(&b[2..18]);
                let w1 = load16(&b[18..34]);
                let xq = x.q.as_ptr().add(32 * bi);
                let x0 = _mm_loadu_si128(xq as *const __m128i);
                let x1 = _mm_loadu_si128(xq.add(16) as *const __m128i);
                let p0 = _mm_madd_epi16(
                    _mm_maddubs_epi16(_mm_abs_epi8(w0), _mm_sign_epi8(x0, w0)),
                    ones,
                );
                let p1 = _mm_madd_epi16(
                    _mm_maddubs_epi16(_mm_abs_epi8(w1), _mm_sign_epi8(x1, w1)),
                    ones,
                );
                let scale = f16_at(b, 0) * *x.d.get_unchecked(bi);
                if bi % 2 == 0 {
                    a0 = scale_into(_mm_add_epi32(p0, p1), scale, a0);
                } else {
                    a1 = scale_into(_mm_add_epi32(p0, p1), scale, a1);
                }
            }
        }
        _mm_add_ps(a0, a1)
    }

    #[target_feature(enable = "avx,fma,f16c")]
    unsafe fn q4_5(ty: GgmlType, bytes: &[u8], x: &Q8Row) -> __m128 {
        let size = ty.block_layout().1 as usize;
        let (mut a0, mut a1) = (_mm_setzero_ps(), _mm_setzero_ps());
        let mut mins = _mm_setzero_ps();
        let low4 = _mm_set1_epi8(0x0F);
        let (qs_at, offset) = match ty {
            GgmlType::Q4_0 => (2, 8),
            GgmlType::Q4_1 => (4, 0),
            _ => (6, 16),
        };
        for (bi, b) in bytes.chunks_exact(size).enumerate() {
            // SAFETY: see `row`.
            unsafe {
                let raw = load16(&b[qs_at..qs_at + 16]);
                let mut lo = _mm_and_si128(raw, low4);
                let mut hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
                if offset == 16 {
                    let (h0, h1) = high_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
                    lo = _mm_or_si128(lo, h0);
                    hi = _mm_or_si128(hi, h1);
                }
                let xs = *x.s16.get_unchecked(2 * bi) + *x.s16.get_unchecked(2 * bi + 1);
                // Σ (u - offset)·x = Σ u·x - offset·Σx: the correction goes into lane 0.
                let isum = _mm_sub_epi32(
                    udot32(lo, hi, x.q.as_ptr().add(32 * bi)),
                    _mm_cvtsi32_si128(offset * xs),
                );
                let dx = *x.d.get_unchecked(bi);
                if bi % 2 == 0 {
                    a0 = scale_into(isum, f16_at(b, 0) * dx, a0);
                } else {
                    a1 = scale_into(isum, f16_at(b, 0) * dx, a1);
                }
                if offset == 0 {
                    mins = _mm_fmadd_ss(_mm_set_ss(f16_at(b, 2) * dx), _mm_set_ss(xs as f32), mins);
                }
            }
        }
        _mm_add_ps(_mm_add_ps(a0, a1), mins)
    }

    #[target_feature(enable = "avx,fma,f16c")]
    unsafe fn q45_k(ty: GgmlType, bytes: &[u8], x: &Q8Row) -> __m128 {
        let size = ty.block_layout().1 as usize;
        let (mut a0, mut a1) = (_mm_setzero_ps(), _mm_setzero_ps());
        let mut mins = _mm_setzero_ps();
        let low4 = _mm_set1_epi8(0x0F);
        let five = ty == GgmlType::Q5_K;
        for (bi, b) in bytes.chunks_exact(size).enumerate() {
            // SAFETY: see `row`.
            unsafe {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[16..16], &b[16..144])
                };
                for pair in 0..4 {
                    let r0 = load16(&qs[32 * pair..32 * pair + 16]);
                    let r1 = load16(&qs[32 * pair + 16..32 * pair + 32]);
                    for half in 0..2 {
                        let s = 2 * pair + half;
                        let (sc, m) = super::scale_min_k4(s, scales);
                        let (mut q0, mut q1) = if half == 0 {
                            (_mm_and_si128(r0, low4), _mm_and_si128(r1, low4))
                        } else {
                            (
                                _mm_and_si128(_mm_srli_epi16(r0, 4), low4),
                                _mm_and_si128(_mm_srli_epi16(r1, 4), low4),
                            )
                        };
                        if five {
                            let bit = _mm_set1_epi8(1 << s);
                            let h = |v: __m128i| {
                                _mm_and_si128(
                                    _mm_cmpeq_epi8(_mm_and_si128(v, bit), bit),
                                    _mm_set1_epi8(0x10),
                                )
                            };
                            q0 = _mm_or_si128(q0, h(load16(&qh[..16])));
                            q1 = _mm_or_si128(q1, h(load16(&qh[16..32])));
                        }
                        let xb = 8 * bi + s;
                        let isum = udot32(q0, q1, x.q.as_ptr().add(32 * xb));
                        let dx = *x.d.get_unchecked(xb);
                        let xs = *x.s16.get_unchecked(2 * xb) + *x.s16.get_unchecked(2 * xb + 1);
                        if half == 0 {
                            a0 = scale_into(isum, d * sc as f32 * dx, a0);
                        } else {
                            a1 = scale_into(isum, d * sc as f32 * dx, a1);
                        }
                        mins = _mm_fmadd_ss(
                            _mm_set_ss(-dmin * m as f32 * dx),
                            _mm_set_ss(xs as f32),
                            mins,
                        );
                    }
                }
            }
        }
        _mm_add_ps(_mm_add_ps(a0, a1), mins)
    }

    #[target_feature(enable = "avx,fma,f16c")]
    unsafe fn q6_k(bytes: &[u8], x: &Q8Row) -> __m128 {
        let (mut a0, mut a1) = (_mm_setzero_ps(), _mm_setzero_ps());
        let low4 = _mm_set1_epi8(0x0F);
        let three = _mm_set1_epi8(3);
        let ones = _mm_set1_epi16(1);
        for (bi, b) in bytes.chunks_exact(210).enumerate() {
            // SAFETY: see `row`.
            unsafe {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for h in 0..2 {
                    for k in 0..4 {
                        let lo_src = &ql[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
                        let hi_src = &qh[32 * h..32 * h + 32];
                        let lshift = _mm_cvtsi32_si128(4 * (k / 2) as i32);
                        let hshift = _mm_cvtsi32_si128(2 * k as i32);
                        let xb = 8 * bi + 4 * h + k;
                        let dx = *x.d.get_unchecked(xb);
                        for half in 0..2 {
                            let lo = _mm_and_si128(
                                _mm_srl_epi16(load16(&lo_src[16 * half..16 * half + 16]), lshift),
                                low4,
                            );
                            let hi = _mm_and_si128(
                                _mm_srl_epi16(load16(&hi_src[16 * half..16 * half + 16]), hshift),
                                three,
                            );
                            let u = _mm_or_si128(lo, _mm_slli_epi16(hi, 4));
                            let xq = x.q.as_ptr().add(32 * xb + 16 * half);
                            let xv = _mm_loadu_si128(xq as *const __m128i);
                            let p = _mm_madd_epi16(_mm_maddubs_epi16(u, xv), ones);
                            let xs = *x.s16.get_unchecked(2 * xb + half);
                            let isum = _mm_sub_epi32(p, _mm_cvtsi32_si128(32 * xs));
                            let sc = d * (scales[(4 * h + k) * 2 + half] as i8) as f32 * dx;
                            if half == 0 {
                                a0 = scale_into(isum, sc, a0);
                            } else {
                                a1 = scale_into(isum, sc, a1);
                            }
                        }
                    }
                }
            }
        }
        _mm_add_ps(a0, a1)
    }
}

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
mod tests {
    use super::*;
    use crate::quant::{row_bytes, QuantPart, SharedBytes, KERNEL_TYPES};

    /// Deterministic pseudo-random bytes.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Offsets of the f16 scale fields of one block of `ty`.
    fn scale_offsets(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            _ => &[0],
        }
    }

    /// `rows` random rows of `ty` with finite, small scales (valid blocks).
    fn random_rows(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let rb = row_bytes(ty, cols).unwrap();
        let mut b = bytes(rows * rb, seed);
        let size = ty.block_layout().1 as usize;
        for (i, block) in b.chunks_exact_mut(size).enumerate() {
            for (j, &off) in scale_offsets(ty).iter().enumerate() {
                let v = 0.001 + 0.01 * ((i * 7 + j * 3) % 11) as f32;
                let v = if (i + j) % 3 == 0 { -v } else { v };
                block[off..off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        b
    }

    fn matrix(parts: &[(GgmlType, usize)], cols: usize) -> QuantMatrix {
        let parts = parts
            .iter()
            .enumerate()
            .map(|(i, &(ty, rows))| QuantPart {
                ty,
                rows,
                data: SharedBytes::owned(random_rows(ty, rows, cols, 17 + i as u64)),
            })
            .collect();
        QuantMatrix::new(cols, parts, "test").unwrap()
    }

    fn dense(m: &QuantMatrix) -> Vec<f32> {
        let mut out = vec![0.0; m.len()];
        for r in 0..m.rows() {
            m.dequantize_row_reference(r, &mut out[r * m.cols()..(r + 1) * m.cols()])
                .unwrap();
        }
        out
    }

    #[test]
    fn vectorised_decoders_equal_the_reference_bit_for_bit() {
        for ty in KERNEL_TYPES {
            let m = matrix(&[(ty, 3)], 512);
            let want = dense(&m);
            let got = dequantize_matrix(&m);
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{} element {i}: {a} vs {b}",
                    ty.name()
                );
            }
        }
    }

    #[test]
    fn quantized_linear_equals_f32_linear_on_dequantized_weights() {
        let cols = 512;
        for ty in KERNEL_TYPES {
            // A stacked projection whose parts were quantized differently (as in real GGUFs).
            let m = matrix(&[(ty, 40), (GgmlType::Q8_0, 24)], cols);
            let w = dense(&m);
            let x: Vec<f32> = bytes(40 * cols, 5)
                .iter()
                .map(|&b| b as f32 / 255.0 - 0.5)
                .collect();
            let bias: Vec<f32> = (0..64).map(|i| i as f32 * 0.01).collect();
            for rows in [1, 2, 5, 8, 9, 40] {
                for (first, n) in [(0, 64), (8, 40), (40, 24)] {
                    let xs = &x[..rows * cols];
                    let mut want = vec![0.0; rows * n];
                    let mut got = vec![f32::NAN; rows * n];
                    let b = Some(&bias[first..first + n]);
                    crate::reference::linear(
                        xs,
                        &w[first * cols..(first + n) * cols],
                        b,
                        rows,
                        cols,
                        n,
                        &mut want,
                    )
                    .unwrap();
                    linear_quant(xs, &m, first, b, rows, cols, n, &mut got).unwrap();
                    for (a, g) in want.iter().zip(&got) {
                        assert!(
                            (a - g).abs() <= 1e-4 * (1.0 + a.abs()),
                            "{} rows {rows} part {first}..{}: {a} vs {g}",
                            ty.name(),
                            first + n
                        );
                    }
                }
            }
        }
    }

    /// The 8-bit activation path equals the f32 product of the same weights with the
    /// activations rounded the way it rounds them (q8 blocks of 32): the integer arithmetic is
    /// exact, so only the order of summation differs.
    #[test]
    fn q8_activation_products_equal_f32_products_of_rounded_activations() {
        if !super::super::simd::has_avx_fma() {
            return;
        }
        let cols = 512;
        for ty in KERNEL_TYPES {
            let m = matrix(&[(ty, 24), (GgmlType::Q8_0, 8)], cols).with_q8_activations(true);
            let w = dense(&m);
            let x: Vec<f32> = bytes(3 * cols, 9)
                .iter()
                .map(|&b| b as f32 / 255.0 - 0.5)
                .collect();
            let rounded: Vec<f32> = x
                .chunks_exact(32)
                .flat_map(|b| {
                    let d = b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    b.iter()
                        .map(move |v| (v * inv).round().clamp(-127.0, 127.0) * d)
                        .collect::<Vec<_>>()
                })
                .collect();
            for rows in [1, 3] {
                let mut want = vec![0.0; rows * 32];
                let mut got = vec![f32::NAN; rows * 32];
                crate::reference::linear(
                    &rounded[..rows * cols],
                    &w,
                    None,
                    rows,
                    cols,
                    32,
                    &mut want,
                )
                .unwrap();
                linear_quant(&x[..rows * cols], &m, 0, None, rows, cols, 32, &mut got).unwrap();
                for (a, g) in want.iter().zip(&got) {
                    assert!(
                        (a - g).abs() <= 1e-4 * (1.0 + a.abs()),
                        "{} rows {rows}: {a} vs {g}",
                        ty.name()
                    );
                }
            }
        }
    }

    /// The AVX2 and AVX variants of the 8-bit activation products agree on every kernel type
    /// (the dispatch picks one per CPU, so the other would otherwise go untested here).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_avx_q8_products_agree() {
        if !super::super::simd::has_avx2() {
            return;
        }
        let cols = 512;
        for ty in KERNEL_TYPES {
            let m = matrix(&[(ty, 16)], cols);
            for seed in 0..3u64 {
                let x: Vec<f32> = bytes(cols, 20 + seed)
                    .iter()
                    .map(|&b| b as f32 / 127.0 - 1.0)
                    .collect();
                let xq = Q8Row::new(&x);
                for r in 0..16 {
                    let (t, row) = m.row(r).unwrap();
                    // SAFETY: AVX2 (and so AVX, FMA, F16C) was detected.
                    let (a, b) = unsafe {
                        (
                            avx_q8::row(t, row, &xq),
                            super::super::quant_avx2::row(t, row, &xq),
                        )
                    };
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                        "{} row {r}: avx {a} vs avx2 {b}",
                        ty.name()
                    );
                }
            }
        }
    }

    /// The AVX2 f32-activation kernels (legacy block types) agree with the AVX ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_avx_f32_products_agree() {
        if !super::super::simd::has_avx2() {
            return;
        }
        let cols = 512;
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
        ] {
            let m = matrix(&[(ty, 16)], cols);
            let x: Vec<f32> = bytes(cols, 31)
                .iter()
                .map(|&b| b as f32 / 127.0 - 1.0)
                .collect();
            let sums: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
            for r in 0..16 {
                let (t, row) = m.row(r).unwrap();
                // SAFETY: AVX2 (and so AVX, FMA, F16C) was detected.
                let (a, b) = unsafe {
                    (
                        avx_dot::row(t, row, &x, &sums),
                        super::super::quant_avx2::row_f32(t, row, &x, &sums),
                    )
                };
                let b = b.expect("legacy types have an AVX2 kernel");
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{} row {r}: avx {a} vs avx2 {b}",
                    ty.name()
                );
            }
        }
    }

    #[test]
    fn quantized_embedding_decodes_rows_and_refuses_bad_ids() {
        let m = matrix(&[(GgmlType::Q5_0, 6)], 64);
        let w = dense(&m);
        let mut out = vec![0.0; 128];
        embedding_quant(&[4, 1], &m, 64, 2.0, &mut out).unwrap();
        for j in 0..64 {
            assert_eq!(out[j], w[4 * 64 + j] * 2.0);
            assert_eq!(out[64 + j], w[64 + j] * 2.0);
        }
        assert!(embedding_quant(&[6], &m, 64, 1.0, &mut out[..64]).is_err());
    }

    #[test]
    fn out_of_range_rows_and_bad_parts_are_errors() {
        let m = matrix(&[(GgmlType::Q8_0, 4)], 32);
        let mut y = vec![0.0; 4];
        assert!(linear_quant(&[0.0; 32], &m, 2, None, 1, 32, 4, &mut y).is_err());
        let short = QuantPart {
            ty: GgmlType::Q8_0,
            rows: 2,
            data: SharedBytes::owned(vec![0; 34]),
        };
        assert!(QuantMatrix::new(32, vec![short], "t").is_err());
        let odd = QuantPart {
            ty: GgmlType::Q4_K,
            rows: 1,
            data: SharedBytes::owned(vec![0; 144]),
        };
        assert!(QuantMatrix::new(100, vec![odd], "t").is_err());
    }
}
