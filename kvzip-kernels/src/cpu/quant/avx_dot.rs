use std::arch::x86_64::*;

use super::super::simd::x86::{f16_at, hsum};

use crate::quant::GgmlType;

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

/// [`fma16`] with AVX2's 256-bit sign extension (two conversions instead of four plus two
/// inserts).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma16_avx2(q: __m128i, x: *const f32, acc: __m256) -> __m256 {
    let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
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

/// Whether `bytes` are whole blocks of `ty` covering exactly `x`, with one `sums` value per
/// 32 elements (the contract of [`row`] and [`row_k_avx2`]).
fn row_fits(ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> bool {
    let (block, size) = ty.block_layout();
    let (block, size) = (block as usize, size as usize);
    let n = bytes.len() / size * block;
    bytes.len() % size == 0 && n == x.len() && sums.len() * 32 == n
}

/// See [`super::dot_row`]. Rows of the wrong length give NaN. One loop per block type, two
/// independent accumulators (even / odd blocks), the min terms in a third.
#[target_feature(enable = "avx,fma,f16c")]
pub(super) unsafe fn row(ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    if !row_fits(ty, bytes, x, sums) {
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
    hsum(acc) + mins
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

/// The K-quant f32-activation loops, stamped once per instruction set ([`fma16`] on AVX,
/// [`fma16_avx2`] on AVX2): Q4_K / Q5_K and Q6_K.
macro_rules! k_quant_dots {
    ($features:literal, $fma16:ident, $q45_k:ident, $q6_k:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $q45_k(ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> (__m256, f32) {
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
                            let acc = $fma16(q0, xs, _mm256_setzero_ps());
                            let acc = $fma16(q1, xs.add(16), acc);
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

        #[target_feature(enable = $features)]
        unsafe fn $q6_k(bytes: &[u8], x: &[f32]) -> __m256 {
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
                                    _mm_srl_epi16(
                                        load16(&lo_src[16 * half..16 * half + 16]),
                                        lshift,
                                    ),
                                    low4,
                                );
                                let hi = _mm_and_si128(
                                    _mm_srl_epi16(
                                        load16(&hi_src[16 * half..16 * half + 16]),
                                        hshift,
                                    ),
                                    three,
                                );
                                let q = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), m32);
                                let e = 256 * bi + 128 * h + 32 * k + 16 * half;
                                let acc = $fma16(q, x.as_ptr().add(e), _mm256_setzero_ps());
                                let sc = _mm256_set1_ps(
                                    d * (scales[(4 * h + k) * 2 + half] as i8) as f32,
                                );
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
    };
}

k_quant_dots!("avx,fma,f16c", fma16, q45_k, q6_k);
k_quant_dots!("avx2,fma,f16c", fma16_avx2, q45_k_avx2, q6_k_avx2);

/// The K-quant products of [`row`] on AVX2 (`None` for other block types); same contract.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::cpu) unsafe fn row_k_avx2(
    ty: GgmlType,
    bytes: &[u8],
    x: &[f32],
    sums: &[f32],
) -> Option<f32> {
    if !matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) {
        return None;
    }
    if !row_fits(ty, bytes, x, sums) {
        return Some(f32::NAN);
    }
    // SAFETY: lengths checked above (as in `row`).
    let (acc, mins) = unsafe {
        match ty {
            GgmlType::Q6_K => (q6_k_avx2(bytes, x), 0.0),
            _ => q45_k_avx2(ty, bytes, x, sums),
        }
    };
    Some(hsum(acc) + mins)
}
