//! The softmax exp loops written with AVX + FMA intrinsics: [`super::math::exp_with`] on eight
//! lanes at a time, the same operations in the same order (bit-identical to the scalar fused
//! version), for the loops the compiler would otherwise leave partly scalar.

use std::arch::x86_64::*;

use super::simd::x86::hsum;

/// `exp` of eight lanes (see [`super::math::exp_with`] for the method and constants).
#[inline]
#[target_feature(enable = "avx,fma")]
fn exp8(x: __m256) -> __m256 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND_MAGIC: f32 = 12_582_912.0;
    const LOW: f32 = -87.336_55;
    const HIGH: f32 = 88.3;
    let set = _mm256_set1_ps;
    // `maxps` returns its second operand when the first is NaN: `xc` is never NaN.
    let xc = _mm256_min_ps(_mm256_max_ps(x, set(LOW)), set(HIGH));
    let n = _mm256_sub_ps(
        _mm256_fmadd_ps(xc, set(LOG2E), set(ROUND_MAGIC)),
        set(ROUND_MAGIC),
    );
    let r = _mm256_fmadd_ps(n, set(-LN2_LO), _mm256_fmadd_ps(n, set(-LN2_HI), xc));
    let mut p = set(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, set(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, set(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, set(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, set(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, set(0.5));
    let poly = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, set(1.0)));
    // (n + 127) · 2^23 is the bit pattern of 2^n (n in [-126, 128]).
    let bits = _mm256_cvttps_epi32(_mm256_mul_ps(
        _mm256_add_ps(n, set(127.0)),
        set(8_388_608.0),
    ));
    let y = _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
    // 0 below LOW (and for NaN, put back just after), NaN stays NaN.
    let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_GE_OQ>(x, set(LOW)));
    _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
}

/// `Σ exp(x_i − shift)`.
#[target_feature(enable = "avx,fma")]
pub(super) fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    let s = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` holds 8 floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(v, s)));
    }
    let mut total = hsum(acc);
    for &v in tail {
        total += super::math::exp_with::<super::simd::Fused>(v - shift);
    }
    total
}

/// `x_i ← exp(x_i − shift)`, returning `Σ x_i`.
#[target_feature(enable = "avx,fma")]
pub(super) fn exp_shift_in_place(x: &mut [f32], shift: f32) -> f32 {
    let s = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds 8 floats.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    let mut total = hsum(acc);
    for v in chunks.into_remainder() {
        *v = super::math::exp_with::<super::simd::Fused>(*v - shift);
        total += *v;
    }
    total
}

/// `acc_i += exp(x_i − shift)` over the common length.
#[target_feature(enable = "avx,fma")]
pub(super) fn add_exp_shifted(acc: &mut [f32], x: &[f32], shift: f32) {
    let n = acc.len().min(x.len());
    let (acc, x) = (&mut acc[..n], &x[..n]);
    let s = _mm256_set1_ps(shift);
    let mut a = acc.chunks_exact_mut(8);
    let mut b = x.chunks_exact(8);
    for (ac, xc) in (&mut a).zip(&mut b) {
        // SAFETY: both chunks hold 8 floats.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xc.as_ptr()), s));
            _mm256_storeu_ps(
                ac.as_mut_ptr(),
                _mm256_add_ps(_mm256_loadu_ps(ac.as_ptr()), e),
            );
        }
    }
    for (o, &v) in a.into_remainder().iter_mut().zip(b.remainder()) {
        *o += super::math::exp_with::<super::simd::Fused>(v - shift);
    }
}

/// `out_i = silu(gate_i) · up_i = gate_i / (1 + exp(−gate_i)) · up_i` over the common length.
#[target_feature(enable = "avx,fma")]
pub(super) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len().min(gate.len()).min(up.len());
    let (gate, up, out) = (&gate[..n], &up[..n], &mut out[..n]);
    let one = _mm256_set1_ps(1.0);
    let zero = _mm256_setzero_ps();
    let mut o = out.chunks_exact_mut(8);
    let mut g = gate.chunks_exact(8);
    let mut u = up.chunks_exact(8);
    for ((oc, gc), uc) in (&mut o).zip(&mut g).zip(&mut u) {
        // SAFETY: every chunk holds 8 floats.
        unsafe {
            let gv = _mm256_loadu_ps(gc.as_ptr());
            let e = exp8(_mm256_sub_ps(zero, gv));
            let y = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(
                oc.as_mut_ptr(),
                _mm256_mul_ps(y, _mm256_loadu_ps(uc.as_ptr())),
            );
        }
    }
    for ((ov, &gv), &uv) in o
        .into_remainder()
        .iter_mut()
        .zip(g.remainder())
        .zip(u.remainder())
    {
        *ov = gv / (1.0 + super::math::exp_with::<super::simd::Fused>(-gv)) * uv;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{math::exp_with, simd::Fused};

    /// The eight-lane exp equals the scalar fused one bit for bit, specials included.
    #[test]
    fn exp8_equals_the_scalar_fused_exp() {
        if !super::super::simd::has_avx_fma() {
            return;
        }
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        xs.extend([
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            -87.4,
            -87.3,
            88.2,
            88.4,
            0.0,
        ]);
        while xs.len() % 8 != 0 {
            xs.push(1.0);
        }
        let mut got = xs.clone();
        // SAFETY: AVX + FMA were detected.
        let sum = unsafe { super::exp_shift_in_place(&mut got, 0.0) };
        for (x, g) in xs.iter().zip(&got) {
            let want = exp_with::<Fused>(*x);
            assert!(
                want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                "exp({x}): scalar {want} vs lanes {g}"
            );
        }
        assert!(sum.is_nan());
        let finite: Vec<f32> = xs.iter().copied().filter(|v| v.abs() < 40.0).collect();
        // SAFETY: as above.
        let s = unsafe { super::sum_exp_shifted(&finite, 3.0) } as f64;
        let want: f64 = finite
            .iter()
            .map(|&v| exp_with::<Fused>(v - 3.0) as f64)
            .sum();
        assert!((s - want).abs() <= 1e-5 * want, "{s} vs {want}");
    }
}
