//! Linear layers and embeddings over bf16 weights kept as stored (half the bytes of f32), with
//! f32 activations and f32 accumulation.
//!
//! - Decode (few rows): a fused widen-and-dot GEMV that streams each weight row once for all
//!   rows of `x` (AVX + FMA at run time, a scalar reference otherwise).
//! - Prefill (many rows): the weight matrix is widened in blocks of output features into a
//!   small per-thread f32 panel (sized to stay in L2) and multiplied with the `gemm` crate, so
//!   no f32 copy of the whole matrix ever exists.
//!
//! bf16 → f32 is exact, so both paths equal [`super::linear`] on the widened weights up to the
//! order of summation.

use gemm::Parallelism;
use half::bf16;
use rayon::prelude::*;

use super::gemm::{gemm_into, MatRef};
use super::simd::multiversion;
use crate::{validate, Result};

/// Rows at or below which [`linear_bf16`] uses the fused GEMV (each weight row is read once and
/// dotted with every row of `x` while it sits in L1).
const GEMV_MAX_ROWS: usize = 8;

/// Target f32 panel size of the prefill path, in elements (4 MiB: large enough that the GEMM's
/// own blocking works on whole panels, small next to the f32 copy of a whole matrix).
const PANEL_ELEMS: usize = 1 << 20;

/// Output features per rayon task of the GEMV (amortises task overhead, keeps writes local).
const GEMV_CHUNK: usize = 32;

/// `Σ x[i] · w[i]` with `w` widened from bf16, scalar reference (any CPU).
pub fn dot_bf16_reference(x: &[f32], w: &[bf16]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, wc) = (x.chunks_exact(8), w.chunks_exact(8));
    let (xt, wt) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l].to_f32();
        }
    }
    let mut tail = 0.0f32;
    for (a, b) in xt.iter().zip(wt) {
        tail += a * b.to_f32();
    }
    acc.iter().sum::<f32>() + tail
}

/// [`dot_bf16_reference`] with AVX + FMA: 16 bf16 per step, widened by interleaving zero
/// halves below them (128-bit integer unpacks, so AVX2 is not needed), two 8-lane FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn dot_bf16_avx(x: &[f32], w: &[bf16]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(w.len());
    let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
    let zero = _mm_setzero_si128();
    let widen8 = |raw: __m128i| -> __m256 {
        let lo = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, raw));
        let hi = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, raw));
        _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1)
    };
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, so both 16-element reads are inside the slices.
        let (r0, r1) = unsafe {
            (
                _mm_loadu_si128(wp.add(i) as *const __m128i),
                _mm_loadu_si128(wp.add(i + 8) as *const __m128i),
            )
        };
        let (x0, x1) = unsafe { (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8))) };
        acc0 = _mm256_fmadd_ps(x0, widen8(r0), acc0);
        acc1 = _mm256_fmadd_ps(x1, widen8(r1), acc1);
        i += 16;
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut total: f32 = lanes.iter().sum();
    while i < n {
        total += x[i] * w[i].to_f32();
        i += 1;
    }
    total
}

/// `Σ x[i] · w[i]` over the common length, `w` widened from bf16 (AVX + FMA when present).
#[inline]
pub fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::has_avx_fma() {
            // SAFETY: the required CPU features were detected at run time.
            return unsafe { dot_bf16_avx(x, w) };
        }
    }
    dot_bf16_reference(x, w)
}

multiversion! {
    /// Widens `src` into `dst` (same length); exact (bf16 is the top half of an f32).
    fn widen<M>(src: &[bf16], dst: &mut [f32]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = f32::from_bits((s.to_bits() as u32) << 16));
    }
}

/// `y[rows, out_dim] = x[rows, in_dim] · w[out_dim, in_dim]ᵀ (+ bias[out_dim])` with bf16 `w`.
///
/// Same contract and validation as [`super::linear`]; `w` is never widened as a whole.
pub fn linear_bf16(
    x: &[f32],
    w: &[bf16],
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
    if rows == 0 || out_dim == 0 {
        return Ok(());
    }
    let x = &x[..rows * in_dim];
    let w = &w[..out_dim * in_dim];
    let y = &mut y[..rows * out_dim];
    if rows <= GEMV_MAX_ROWS {
        gemv(x, w, bias, rows, in_dim, out_dim, y);
        return Ok(());
    }
    panel_gemm(
        x,
        &|o, dst| widen(&w[o * in_dim..(o + 1) * in_dim], dst),
        bias,
        rows,
        in_dim,
        out_dim,
        y,
    )
}

/// Decode path: output features split over threads, each weight row dotted with every `x` row.
/// Results are computed feature-major (`[out_dim, rows]`), which for one row is `y` itself (no
/// allocation on the per-token path); more rows go through one buffer, transposed into `y`.
fn gemv(
    x: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) {
    // `dst` holds outputs `first..` as `[n, rows]`.
    let fill = |first: usize, dst: &mut [f32]| {
        for (i, cell) in dst.chunks_exact_mut(rows).enumerate() {
            let o = first + i;
            let wo = &w[o * in_dim..(o + 1) * in_dim];
            let b = bias.map_or(0.0, |b| b[o]);
            for (r, c) in cell.iter_mut().enumerate() {
                *c = dot_bf16(&x[r * in_dim..(r + 1) * in_dim], wo) + b;
            }
        }
    };
    let run = |dst: &mut [f32]| {
        dst.par_chunks_mut(GEMV_CHUNK * rows)
            .enumerate()
            .for_each(|(c, d)| fill(c * GEMV_CHUNK, d));
    };
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

/// Prefill path over compact weights: blocks of output features decoded into an f32 panel (in
/// parallel; `decode_row(o, dst)` writes weight row `o` into `dst`, `in_dim` floats), then one
/// multi-threaded GEMM per panel writing its columns of `y` in place. No f32 copy of the whole
/// matrix ever exists.
pub(crate) fn panel_gemm(
    x: &[f32],
    decode_row: &(dyn Fn(usize, &mut [f32]) + Sync),
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) -> Result<()> {
    let block = (PANEL_ELEMS / in_dim.max(1)).clamp(16, out_dim.max(16)) / 16 * 16;
    let accumulate = bias.map(|b| {
        for row in y.chunks_exact_mut(out_dim) {
            row.copy_from_slice(b);
        }
        1.0
    });
    let lhs = MatRef {
        data: x,
        rows,
        cols: in_dim,
        row_stride: in_dim,
        col_stride: 1,
    };
    let mut panel = vec![0.0f32; block.min(out_dim) * in_dim];
    let mut start = 0;
    while start < out_dim {
        let end = (start + block).min(out_dim);
        let width = end - start;
        let panel = &mut panel[..width * in_dim];
        panel
            .par_chunks_mut(in_dim * 16)
            .enumerate()
            .for_each(|(c, d)| {
                for (i, row) in d.chunks_exact_mut(in_dim).enumerate() {
                    decode_row(start + c * 16 + i, row);
                }
            });
        let rhs = MatRef {
            data: panel,
            rows: in_dim,
            cols: width,
            row_stride: 1,
            col_stride: in_dim,
        };
        // y's columns start..end: row stride out_dim, starting at element `start`.
        gemm_into(
            &mut y[start..],
            out_dim,
            lhs,
            rhs,
            accumulate,
            1.0,
            Parallelism::Rayon(0),
        )?;
        start = end;
    }
    Ok(())
}

/// `out[i, :] = table[ids[i], :] * scale` with a bf16 table (see [`super::embedding`]).
pub fn embedding_bf16(
    ids: &[u32],
    table: &[bf16],
    dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    super::act::embedding_widened(ids, table, bf16::to_f32, dim, scale, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (v >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn bf16_linear_equals_f32_linear_on_widened_weights() {
        let (in_dim, out_dim) = (77, 131);
        let wf = data(in_dim * out_dim, 3);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let widened: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let bias = data(out_dim, 9);
        for rows in [1, 2, 5, 8, 9, 40] {
            let x = data(rows * in_dim, rows as u32);
            let mut want = vec![0.0; rows * out_dim];
            let mut got = vec![f32::NAN; rows * out_dim];
            super::super::linear(&x, &widened, Some(&bias), rows, in_dim, out_dim, &mut want)
                .unwrap();
            linear_bf16(&x, &wb, Some(&bias), rows, in_dim, out_dim, &mut got).unwrap();
            for (a, b) in want.iter().zip(&got) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "rows {rows}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn simd_dot_equals_reference() {
        for n in [0, 1, 15, 16, 17, 100, 896] {
            let x = data(n, 1);
            let w: Vec<bf16> = data(n, 2).iter().map(|&v| bf16::from_f32(v)).collect();
            let (a, b) = (dot_bf16(&x, &w), dot_bf16_reference(&x, &w));
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "n {n}: {a} vs {b}");
        }
    }

    #[test]
    fn bf16_embedding_widens_rows_and_refuses_bad_ids() {
        let table: Vec<bf16> = (0..12).map(|v| bf16::from_f32(v as f32)).collect();
        let mut out = vec![0.0; 6];
        embedding_bf16(&[2, 0], &table, 3, 2.0, &mut out).unwrap();
        assert_eq!(out, vec![12.0, 14.0, 16.0, 0.0, 2.0, 4.0]);
        assert!(embedding_bf16(&[4], &table, 3, 1.0, &mut out[..3]).is_err());
    }
}
