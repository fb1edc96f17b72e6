//! Run-time SIMD dispatch for the CPU hot loops.
//!
//! The crate is compiled for the baseline target (SSE2 on x86-64), so a hot loop is compiled a
//! second time with the wider instruction set enabled and chosen at run time:
//!
//! - x86-64 with AVX + FMA (256-bit float lanes; integer work stays 128-bit, so AVX2 is not
//!   needed — common on virtual machines that mask AVX2),
//! - x86-64 with AVX2 as well ([`has_avx2`]): the 8-bit activation products of quantized
//!   weights take 256-bit integer lanes (`quant_avx2.rs`; `KVZIP_NO_AVX2=1` forces the AVX
//!   variants, for comparison),
//! - everything else: the portable body (NEON is the aarch64 baseline, so it is used there).
//!
//! [`multiversion!`] declares such a function once; [`has_avx_fma`] is the cached test.

use std::sync::OnceLock;

/// Whether the CPU has AVX, FMA and F16C (cached after the first call; every x86-64 CPU with
/// FMA has F16C).
#[inline]
pub(crate) fn has_avx_fma() -> bool {
    static LEVEL: OnceLock<bool> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the CPU has AVX2 besides [`has_avx_fma`]'s features (cached): 256-bit integer lanes
/// for the 8-bit activation products.
#[inline]
pub(crate) fn has_avx2() -> bool {
    static LEVEL: OnceLock<bool> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx_fma()
                && std::arch::is_x86_feature_detected!("avx2")
                && std::env::var("KVZIP_NO_AVX2").is_err()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `a * b + c`, as one fused instruction where the enclosing [`multiversion!`] variant has FMA
/// (`Fused`) and as a multiply then an add otherwise (`Split`: never a slow software `fmaf`).
pub(crate) trait MulAdd {
    /// `a * b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// [`MulAdd`] with a fused multiply-add instruction (only used inside FMA-enabled code).
pub(crate) struct Fused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// [`MulAdd`] as a multiply and an add (baseline targets).
pub(crate) struct Split;

impl MulAdd for Split {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Declares `fn name<M>(args) -> ret { body }` whose body is compiled twice: once with AVX + FMA
/// enabled and `M = Fused` (used when [`has_avx_fma`]) and once for the baseline target with
/// `M = Split`. The body is safe, portable Rust that writes `M::mul_add(a, b, c)` for `a * b + c`;
/// the wider instruction set only changes how it is vectorised.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$m:ident>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[inline]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::needless_lifetimes)]
            fn body<$m: $crate::cpu::simd::MulAdd>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    body::<$crate::cpu::simd::Fused>($($arg),*)
                }
                if $crate::cpu::simd::has_avx_fma() {
                    // SAFETY: AVX and FMA were detected at run time.
                    return unsafe { wide($($arg),*) };
                }
            }
            body::<$crate::cpu::simd::Split>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Small AVX helpers shared by the hand-written x86 kernels (`quant.rs`, `quant_avx2.rs`,
/// `exp_avx.rs`).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The little-endian f16 at byte `i` of `b`, converted with F16C (no run-time feature test
    /// per call).
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([b[i], b[i + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The sum of the eight lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}
