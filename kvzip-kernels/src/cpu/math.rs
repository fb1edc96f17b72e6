//! Vectorisable scalar math shared by the CPU fast paths.

use super::simd::{multiversion, MulAdd};

/// Natural exponential, branch-free and auto-vectorisable (Cephes-style range reduction with a
/// degree-6 polynomial), max relative error about 2e-7 over the normal range.
///
/// Inputs below about -87.3 (including `-inf`) return exactly 0; inputs above 88.3 saturate to
/// `exp(88.3)`; NaN propagates.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_with::<super::simd::Split>(x)
}

/// [`exp`] with the multiply-adds of `M` (fused inside [`multiversion!`] bodies). `2^n` is
/// built with float operations and one float→int conversion (no integer shift), so the whole
/// function vectorises on AVX without AVX2.
#[inline(always)]
pub(crate) fn exp_with<M: MulAdd>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND_MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LOW: f32 = -87.336_55;
    const HIGH: f32 = 88.3;
    // Not `clamp`: `max` maps a NaN input to LOW, so nothing below sees a NaN.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(LOW).min(HIGH);
    let n = M::mul_add(xc, LOG2E, ROUND_MAGIC) - ROUND_MAGIC;
    let r = M::mul_add(n, -LN2_LO, M::mul_add(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4f32;
    p = M::mul_add(p, r, 1.398_199_9e-3);
    p = M::mul_add(p, r, 8.333_452e-3);
    p = M::mul_add(p, r, 4.166_579_6e-2);
    p = M::mul_add(p, r, 1.666_666_5e-1);
    p = M::mul_add(p, r, 0.5);
    let poly = M::mul_add(p * r, r, r + 1.0);
    // (n + 127) · 2^23 is the bit pattern of 2^n; it is exact in f32 for the clamped range.
    // SAFETY: `xc` is never NaN (`max` drops a NaN operand) and lies in [LOW, HIGH], so n is an
    // integer in [-126, 128] and (n + 127) · 2^23 is in [2^23, 255 · 2^23], inside i32. The
    // unchecked conversion is one `cvttps2dq` per lane: the saturating `as` would keep the loop
    // scalar.
    let bits = unsafe { ((n + 127.0) * 8_388_608.0).to_int_unchecked::<i32>() };
    let y = poly * f32::from_bits(bits as u32);
    // Selects, not branches, so the loops around this vectorise.
    let y = if x < LOW { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Lanes of the vectorised reductions below (one AVX register of f32).
const LANES: usize = 8;

multiversion! {
/// `Σ exp(x_i − shift)` with [`exp`], accumulated in [`LANES`] independent lanes so the compiler
/// vectorises it (AVX + FMA when present). Relative error about 2e-7 per term; `-inf` terms
/// contribute 0.
fn sum_exp_shifted_portable<M>(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp_with::<M>(v - shift);
        }
    }
    let mut total: f32 = acc.iter().sum();
    for &v in tail {
        total += exp_with::<M>(v - shift);
    }
    total
}
}

multiversion! {
/// `x_i ← exp(x_i − shift)` in place with [`exp`], returning `Σ x_i` (lane-wise, AVX + FMA when
/// present): the probability step of an online softmax.
fn exp_shift_in_place_portable<M>(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp_with::<M>(*v - shift);
            *a += *v;
        }
    }
    let mut total: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_with::<M>(*v - shift);
        total += *v;
    }
    total
}
}

multiversion! {
/// `acc_i += exp(x_i − shift)` over the common length with [`exp`] (AVX + FMA when present).
fn add_exp_shifted_portable<M>(acc: &mut [f32], x: &[f32], shift: f32) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += exp_with::<M>(v - shift);
    }
}
}

/// `Σ exp(x_i − shift)` with [`exp`] (AVX + FMA intrinsics on eight lanes when present,
/// otherwise a lane-wise portable loop). Relative error about 2e-7 per term; `-inf` terms
/// contribute 0.
pub fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx_fma() {
        // SAFETY: AVX and FMA were detected at run time.
        return unsafe { super::exp_avx::sum_exp_shifted(x, shift) };
    }
    sum_exp_shifted_portable(x, shift)
}

/// `x_i ← exp(x_i − shift)` in place with [`exp`], returning `Σ x_i` (AVX + FMA intrinsics when
/// present): the probability step of an online softmax.
pub fn exp_shift_in_place(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx_fma() {
        // SAFETY: AVX and FMA were detected at run time.
        return unsafe { super::exp_avx::exp_shift_in_place(x, shift) };
    }
    exp_shift_in_place_portable(x, shift)
}

/// `out_i = silu(gate_i) · up_i` over the common length (AVX + FMA intrinsics when present).
pub(crate) fn silu_mul_slice(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx_fma() {
        // SAFETY: AVX and FMA were detected at run time.
        return unsafe { super::exp_avx::silu_mul(gate, up, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// `acc_i += exp(x_i − shift)` over the common length with [`exp`] (AVX + FMA intrinsics when
/// present).
pub fn add_exp_shifted(acc: &mut [f32], x: &[f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx_fma() {
        // SAFETY: AVX and FMA were detected at run time.
        return unsafe { super::exp_avx::add_exp_shifted(acc, x, shift) };
    }
    add_exp_shifted_portable(acc, x, shift)
}

multiversion! {
/// Largest element of `x` (`-inf` for an empty slice); lane-wise so it vectorises (AVX when
/// present). NaN inputs are ignored.
pub fn max_value<M>(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        m = m.max(v);
    }
    m
}
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))`, computed as `x * sigmoid(2 * inner)`.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * inner))
}

multiversion! {
    /// Sum of `a[i] * b[i]` over the common length: 32 independent lanes (four AVX registers)
    /// so that it vectorises; AVX + FMA when the CPU has them.
    pub(crate) fn dot<M>(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0.0f32; 32];
        let (ac, bc) = (a.chunks_exact(32), b.chunks_exact(32));
        let (ta, tb) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for l in 0..32 {
                acc[l] = M::mul_add(x[l], y[l], acc[l]);
            }
        }
        let mut tail = 0.0f32;
        for (x, y) in ta.iter().zip(tb) {
            tail = M::mul_add(*x, *y, tail);
        }
        acc.iter().sum::<f32>() + tail
    }
}

/// `Σ a[i]·b[i]` in 16 lanes, inlined into the [`multiversion!`] bodies that loop over rows.
#[inline(always)]
fn dot16<M: MulAdd>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ta, tb) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] = M::mul_add(x[l], y[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ta.iter().zip(tb) {
        tail = M::mul_add(*x, *y, tail);
    }
    acc.iter().sum::<f32>() + tail
}

multiversion! {
    /// `s[r * nk + j] = q_r · k_j` for the `q.len() / d` rows of `q` (`[rows, d]`) and the
    /// `nk = keys.len() / d` rows of `keys`: a few query rows against a tile of keys in one
    /// call (decode attention scores; each key row is read once for all query rows).
    pub(crate) fn dot_rows<M>(q: &[f32], keys: &[f32], d: usize, s: &mut [f32]) {
        let nk = keys.len() / d.max(1);
        for (j, kr) in keys.chunks_exact(d.max(1)).enumerate() {
            for (r, qr) in q.chunks_exact(d.max(1)).enumerate() {
                s[r * nk + j] = dot16::<M>(qr, kr);
            }
        }
    }
}

multiversion! {
    /// `o_r += Σ_j p[r * nk + j] · v_j` for the `o.len() / d` rows of `o` (`[rows, d]`) and
    /// the `nk = values.len() / d` value rows (decode attention: probabilities times values;
    /// zero probabilities are skipped).
    pub(crate) fn axpy_rows<M>(p: &[f32], values: &[f32], d: usize, o: &mut [f32]) {
        let nk = values.len() / d.max(1);
        for (j, vr) in values.chunks_exact(d.max(1)).enumerate() {
            for (r, orow) in o.chunks_exact_mut(d.max(1)).enumerate() {
                let pj = p[r * nk + j];
                if pj != 0.0 {
                    for (y, &x) in orow.iter_mut().zip(vr) {
                        *y = M::mul_add(pj, x, *y);
                    }
                }
            }
        }
    }
}

/// Sum of squares with 8 independent accumulators.
#[inline]
pub(crate) fn sum_squares(a: &[f32]) -> f32 {
    dot(a, a)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_std_over_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            let fused = super::exp_with::<super::super::simd::Fused>(x) as f64;
            worst = worst.max(((fused - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-200.0), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(f32::NAN).is_nan());
        assert!(super::exp(1000.0).is_finite());
    }

    #[test]
    fn reductions_match_scalar_loops() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 * 0.173 - 8.0)
            .collect();
        for n in [0, 1, 7, 8, 9, 37] {
            let s = &x[..n];
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max_value(s), m);
            let want: f64 = s.iter().map(|&v| ((v - 1.5) as f64).exp()).sum();
            let got = super::sum_exp_shifted(s, 1.5) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1e-30),
                "n {n}: {got} vs {want}"
            );
        }
        assert_eq!(super::sum_exp_shifted(&[f32::NEG_INFINITY], 0.0), 0.0);
    }
}
