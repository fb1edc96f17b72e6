use std::arch::x86_64::*;

use super::super::simd::x86::f16_at;

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
