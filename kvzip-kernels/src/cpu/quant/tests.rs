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
        // 1 and 3 rows: the integer GEMV; 24 rows: the prefill GEMM on rounded activations.
        for rows in [1, 3, 24] {
            let x = x.repeat(8);
            let rounded = rounded.repeat(8);
            let mut want = vec![0.0; rows * 32];
            let mut got = vec![f32::NAN; rows * 32];
            crate::reference::linear(&rounded[..rows * cols], &w, None, rows, cols, 32, &mut want)
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
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
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
            let b = b.expect("every f32-activation block type has an AVX2 kernel");
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
