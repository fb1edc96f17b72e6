//! AVX2 decode products on 8-bit activations: one 256-bit register holds a whole 32-element
//! block, so each block is one `maddubs` + one `madd` and one float multiply-add (the AVX
//! variants in `quant.rs` need two of each on 128-bit halves). Same contract and results as
//! `avx_q8::row` up to the order of float summation; chosen at run time when the CPU has AVX2.

use std::arch::x86_64::*;

use super::quant::{scale_min_k4, Q8Row};
use super::simd::x86::{f16_at, hsum};
use crate::quant::GgmlType;

/// 32 bytes at `p` (callers slice whole blocks, so 32 bytes are readable).
#[inline]
#[target_feature(enable = "avx")]
unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: see the function comment.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// 16 bytes of `b` from `at` (bounds-checked slice).
#[inline]
#[target_feature(enable = "avx")]
fn load16(b: &[u8], at: usize) -> __m128i {
    let s = &b[at..at + 16];
    // SAFETY: `s` holds 16 bytes.
    unsafe { _mm_loadu_si128(s.as_ptr() as *const __m128i) }
}

/// Eight i32 lanes of `Σ u·x` over the 32 unsigned codes `u` (0..=127) and the 32 activation
/// codes at `xq`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn udot(u: __m256i, xq: *const i8) -> __m256i {
    // SAFETY: 32 codes are readable at `xq` (callers index whole blocks).
    let x = unsafe { load32(xq as *const u8) };
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
}

/// The 32 bits of `bits` as bytes `set` (bit i set) or 0, element i = bit i.
#[inline]
#[target_feature(enable = "avx2")]
fn spread_bits(bits: u32, set: i8) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    // Byte j of the result takes byte j / 8 of `bits`, then tests bit j % 8 of it.
    let pick = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let b = _mm256_and_si256(_mm256_shuffle_epi8(v, pick), mask);
    _mm256_and_si256(_mm256_cmpeq_epi8(b, mask), _mm256_set1_epi8(set))
}

/// `Σ_i w[i] · x[i]` for one quantized row and one quantized activation row (NaN when the
/// lengths do not match or the type has no kernel).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row(ty: GgmlType, bytes: &[u8], x: &Q8Row) -> f32 {
    // Each arm checks the lengths with its block layout as constants (no division per row).
    let fits = |block: usize, size: usize| bytes.len() == x.q.len() / block * size;
    // SAFETY (all arms): the lengths were checked; block `bi` reads bytes `bi*size..(bi+1)*size`
    // of `bytes` and codes `bi*block..(bi+1)*block` of `x.q` (`x.q.len()` is a multiple of 32).
    unsafe {
        match ty {
            GgmlType::Q8_0 if fits(32, 34) => q8_0(bytes, x),
            GgmlType::Q4_0 if fits(32, 18) => q4_5::<2, 8>(bytes, x),
            GgmlType::Q4_1 if fits(32, 20) => q4_5::<4, 0>(bytes, x),
            GgmlType::Q5_0 if fits(32, 22) => q4_5::<6, 16>(bytes, x),
            GgmlType::Q4_K if x.q.len() % 256 == 0 && fits(256, 144) => q45_k::<false>(bytes, x),
            GgmlType::Q5_K if x.q.len() % 256 == 0 && fits(256, 176) => q45_k::<true>(bytes, x),
            GgmlType::Q6_K if x.q.len() % 256 == 0 && fits(256, 210) => q6_k(bytes, x),
            _ => f32::NAN,
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(bytes: &[u8], x: &Q8Row) -> f32 {
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let ones = _mm256_set1_epi16(1);
    for (bi, b) in bytes.chunks_exact(34).enumerate() {
        // SAFETY: see `row` (34-byte blocks: f16 scale + 32 codes).
        unsafe {
            let w = load32(b.as_ptr().add(2));
            let xv = load32(x.q.as_ptr().add(32 * bi) as *const u8);
            let p = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w)),
                ones,
            );
            let scale = _mm256_set1_ps(f16_at(b, 0) * *x.d.get_unchecked(bi));
            if bi % 2 == 0 {
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, a0);
            } else {
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, a1);
            }
        }
    }
    hsum(_mm256_add_ps(a0, a1))
}

/// Q4_0 (`QS_AT` 2, `OFFSET` 8), Q4_1 (4, 0: a min per block instead) and Q5_0 (6, 16).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_5<const QS_AT: usize, const OFFSET: i32>(bytes: &[u8], x: &Q8Row) -> f32 {
    let size = QS_AT + 16;
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut m0, mut m1) = (0.0f32, 0.0f32);
    let low4 = _mm256_set1_epi8(0x0F);
    for (bi, b) in bytes.chunks_exact(size).enumerate() {
        let raw = load16(b, QS_AT);
        // Elements 0..16 are the low nibbles, 16..32 the high ones.
        let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        let mut u = _mm256_and_si256(both, low4);
        if OFFSET == 16 {
            u = _mm256_or_si256(
                u,
                spread_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), 0x10),
            );
        }
        // SAFETY: see `row`.
        let (mut p, dx, xs) = unsafe {
            (
                udot(u, x.q.as_ptr().add(32 * bi)),
                *x.d.get_unchecked(bi),
                *x.s16.get_unchecked(2 * bi) + *x.s16.get_unchecked(2 * bi + 1),
            )
        };
        if OFFSET == 0 {
            // Q4_1: w = d·u + m, so Σ w·x adds m·dx·Σx (two accumulators: no serial chain).
            if bi % 2 == 0 {
                m0 = f16_at(b, 2).mul_add(dx * xs as f32, m0);
            } else {
                m1 = f16_at(b, 2).mul_add(dx * xs as f32, m1);
            }
        } else {
            // Σ (u - offset)·x = Σ u·x - offset·Σx, exact in the integer lanes.
            p = _mm256_sub_epi32(p, _mm256_setr_epi32(OFFSET * xs, 0, 0, 0, 0, 0, 0, 0));
        }
        let scale = _mm256_set1_ps(f16_at(b, 0) * dx);
        if bi % 2 == 0 {
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, a0);
        } else {
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, a1);
        }
    }
    hsum(_mm256_add_ps(a0, a1)) + m0 + m1
}

/// Q4_K (`FIVE` false) and Q5_K (true).
#[allow(clippy::needless_range_loop)] // `half` picks the code nibble and the accumulator
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q45_k<const FIVE: bool>(bytes: &[u8], x: &Q8Row) -> f32 {
    let size = if FIVE { 176 } else { 144 };
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut mins = [0.0f32; 2];
    let low4 = _mm256_set1_epi8(0x0F);
    let five = FIVE;
    for (bi, b) in bytes.chunks_exact(size).enumerate() {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qs_at = if five { 48 } else { 16 };
        // SAFETY: the block holds 32 bytes of high bits at 16 (Q5_K) and 128 code bytes at
        // `qs_at`.
        let qh = if five {
            unsafe { load32(b.as_ptr().add(16)) }
        } else {
            _mm256_setzero_si256()
        };
        for pair in 0..4 {
            // SAFETY: see above.
            let raw = unsafe { load32(b.as_ptr().add(qs_at + 32 * pair)) };
            for half in 0..2 {
                let s = 2 * pair + half;
                let (sc, m) = scale_min_k4(s, scales);
                let mut u = if half == 0 {
                    _mm256_and_si256(raw, low4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)
                };
                if five {
                    let bit = _mm256_set1_epi8(1 << s);
                    let h = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                    u = _mm256_or_si256(u, _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
                }
                let xb = 8 * bi + s;
                // SAFETY: see `row`.
                let (p, dx, xs) = unsafe {
                    (
                        udot(u, x.q.as_ptr().add(32 * xb)),
                        *x.d.get_unchecked(xb),
                        *x.s16.get_unchecked(2 * xb) + *x.s16.get_unchecked(2 * xb + 1),
                    )
                };
                mins[half] = (-dmin * m as f32 * dx).mul_add(xs as f32, mins[half]);
                let scale = _mm256_set1_ps(d * sc as f32 * dx);
                if half == 0 {
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, a0);
                } else {
                    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, a1);
                }
            }
        }
    }
    hsum(_mm256_add_ps(a0, a1)) + mins[0] + mins[1]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(bytes: &[u8], x: &Q8Row) -> f32 {
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let low4 = _mm256_set1_epi8(0x0F);
    let three = _mm256_set1_epi8(3);
    for (bi, b) in bytes.chunks_exact(210).enumerate() {
        let scales = &b[192..208];
        let d = f16_at(b, 208);
        for h in 0..2 {
            // SAFETY: 128 low-bit bytes at 0 and 64 high-bit bytes at 128 in the block.
            let (ql0, ql1, qh) = unsafe {
                (
                    load32(b.as_ptr().add(64 * h)),
                    load32(b.as_ptr().add(64 * h + 32)),
                    load32(b.as_ptr().add(128 + 32 * h)),
                )
            };
            for k in 0..4 {
                let ql = if k % 2 == 0 { ql0 } else { ql1 };
                let lo = if k < 2 {
                    _mm256_and_si256(ql, low4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(ql, 4), low4)
                };
                let hi =
                    _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32)), three);
                let u = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                let xb = 8 * bi + 4 * h + k;
                // Per-16 signed scales applied in the integer madd; codes are u - 32.
                let (s0, s1) = (
                    scales[(4 * h + k) * 2] as i8 as i16,
                    scales[(4 * h + k) * 2 + 1] as i8 as i16,
                );
                let sc = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                // SAFETY: see `row`.
                let (xv, dx, xs0, xs1) = unsafe {
                    (
                        load32(x.q.as_ptr().add(32 * xb) as *const u8),
                        *x.d.get_unchecked(xb),
                        *x.s16.get_unchecked(2 * xb),
                        *x.s16.get_unchecked(2 * xb + 1),
                    )
                };
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), sc);
                let offset = 32 * (s0 as i32 * xs0 + s1 as i32 * xs1);
                let p = _mm256_sub_epi32(p, _mm256_setr_epi32(offset, 0, 0, 0, 0, 0, 0, 0));
                let scale = _mm256_set1_ps(d * dx);
                if k % 2 == 0 {
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, a0);
                } else {
                    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, a1);
                }
            }
        }
    }
    hsum(_mm256_add_ps(a0, a1))
}

/// `Σ_i w[i] · x[i]` with f32 activations for the legacy block types (Q8_0, Q4_0, Q4_1, Q5_0):
/// codes widened straight to eight i32 lanes (`vpmovzxbd` / `vpmovsxbd`), converted and
/// multiplied into the block accumulator; `sums[j] = Σ x[32j..32j+32]` carries the offset and
/// min terms. `None` for the other types (the AVX kernels take them) and NaN for rows of the
/// wrong length.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row_f32(ty: GgmlType, bytes: &[u8], x: &[f32], sums: &[f32]) -> Option<f32> {
    let size = match ty {
        GgmlType::Q8_0 => 34,
        GgmlType::Q4_0 => 18,
        GgmlType::Q4_1 => 20,
        GgmlType::Q5_0 => 22,
        // SAFETY: AVX2, FMA and F16C (this function's contract); it checks lengths.
        _ => return unsafe { super::quant::row_k_avx2(ty, bytes, x, sums) },
    };
    if bytes.len() / size * 32 != x.len() || bytes.len() % size != 0 || sums.len() * 32 != x.len() {
        return Some(f32::NAN);
    }
    // SAFETY: lengths checked; block `bi` reads bytes `bi*size..(bi+1)*size` and floats
    // `32*bi..32*bi+32` of `x`.
    Some(unsafe {
        match ty {
            GgmlType::Q8_0 => f32_q8_0(bytes, x),
            GgmlType::Q4_0 => f32_q4_5::<2, 8>(bytes, x, sums),
            GgmlType::Q4_1 => f32_q4_5::<4, 0>(bytes, x, sums),
            _ => f32_q4_5::<6, 16>(bytes, x, sums),
        }
    })
}

/// `acc + codes · x[0..8]` for eight i32 codes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma8(codes: __m256i, x: *const f32, acc: __m256) -> __m256 {
    // SAFETY: the caller guarantees 8 readable floats at `x`.
    unsafe { _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), _mm256_loadu_ps(x), acc) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_q8_0(bytes: &[u8], x: &[f32]) -> f32 {
    let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (bi, b) in bytes.chunks_exact(34).enumerate() {
        // SAFETY: see `row_f32`; 32 code bytes at 2.
        unsafe {
            let (p, xb) = (b.as_ptr().add(2), x.as_ptr().add(32 * bi));
            let mut acc = _mm256_setzero_ps();
            for k in 0..4 {
                let c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k) as *const __m128i));
                acc = fma8(c, xb.add(8 * k), acc);
            }
            // Two accumulators in registers (an array indexed by `bi % 2` would live on the stack).
            let d = _mm256_set1_ps(f16_at(b, 0));
            if bi % 2 == 0 {
                t0 = _mm256_fmadd_ps(d, acc, t0);
            } else {
                t1 = _mm256_fmadd_ps(d, acc, t1);
            }
        }
    }
    hsum(_mm256_add_ps(t0, t1))
}

/// Q4_0 (`QS_AT` 2, `OFFSET` 8), Q4_1 (4, 0: a min per block) and Q5_0 (6, 16).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_q4_5<const QS_AT: usize, const OFFSET: i32>(
    bytes: &[u8],
    x: &[f32],
    sums: &[f32],
) -> f32 {
    let size = QS_AT + 16;
    let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut c0, mut c1) = (0.0f32, 0.0f32);
    let low4 = _mm256_set1_epi32(0x0F);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (bi, b) in bytes.chunks_exact(size).enumerate() {
        let raw = load16(b, QS_AT);
        // Elements 0..8 / 8..16 are the low nibbles of bytes 0..8 / 8..16, 16..24 / 24..32 the
        // high ones.
        let w0 = _mm256_cvtepu8_epi32(raw);
        let w1 = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(raw));
        let mut c = [
            _mm256_and_si256(w0, low4),
            _mm256_and_si256(w1, low4),
            _mm256_srli_epi32::<4>(w0),
            _mm256_srli_epi32::<4>(w1),
        ];
        if OFFSET == 16 {
            // Fifth bit of element j is bit j of `qh`.
            let qh = _mm256_set1_epi32(i32::from_le_bytes([b[2], b[3], b[4], b[5]]));
            for (k, ck) in c.iter_mut().enumerate() {
                let shift = _mm256_add_epi32(lane, _mm256_set1_epi32(8 * k as i32));
                let bit = _mm256_and_si256(_mm256_srlv_epi32(qh, shift), _mm256_set1_epi32(1));
                *ck = _mm256_or_si256(*ck, _mm256_slli_epi32::<4>(bit));
            }
        }
        // SAFETY: see `row_f32`.
        let xb = unsafe { x.as_ptr().add(32 * bi) };
        let mut acc = _mm256_setzero_ps();
        for (k, ck) in c.iter().enumerate() {
            // SAFETY: 32 floats at `xb`.
            acc = unsafe { fma8(*ck, xb.add(8 * k), acc) };
        }
        let d = f16_at(b, 0);
        // SAFETY: `sums` holds one value per block (checked in `row_f32`).
        let sx = unsafe { *sums.get_unchecked(bi) };
        let k = if OFFSET == 0 {
            f16_at(b, 2)
        } else {
            -d * OFFSET as f32
        };
        if bi % 2 == 0 {
            c0 = k.mul_add(sx, c0);
            t0 = _mm256_fmadd_ps(_mm256_set1_ps(d), acc, t0);
        } else {
            c1 = k.mul_add(sx, c1);
            t1 = _mm256_fmadd_ps(_mm256_set1_ps(d), acc, t1);
        }
    }
    hsum(_mm256_add_ps(t0, t1)) + c0 + c1
}
