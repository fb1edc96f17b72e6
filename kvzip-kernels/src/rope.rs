//! RoPE parameter math shared by every backend: inverse frequencies and the attention factor,
//! computed exactly as HF transformers' `modeling_rope_utils.py` does (including its f32
//! rounding), so that `inv_freq` agrees with HF to within one f32 ulp.
//!
//! Resolving config defaults (e.g. YaRN's `original_max_position_embeddings` falling back to
//! `max_position_embeddings`, or `factor = max_position_embeddings / original`) is the config
//! parser's job; this module takes the resolved numbers.

use crate::{KernelError, Result};

/// RoPE scaling variants, as HF's `rope_type`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `"default"`: `inv_freq[i] = 1 / theta^(2i / rotary_dim)`.
    Default,
    /// `"linear"`: default frequencies divided by `factor`.
    Linear {
        /// Position interpolation factor.
        factor: f64,
    },
    /// `"dynamic"` (NTK-aware): theta grows with the sequence length; see [`RopeParams::inv_freq_for_seq_len`].
    Dynamic {
        /// Scaling factor.
        factor: f64,
    },
    /// `"llama3"` (Llama 3.1): low frequencies divided by `factor`, a smooth ramp in between.
    Llama3 {
        /// Scaling factor (8 for Llama 3.1).
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are untouched.
        high_freq_factor: f64,
        /// Context length of pre-training (8192 for Llama 3.1).
        original_max_position_embeddings: usize,
    },
    /// `"yarn"`: NTK-by-parts interpolation plus an attention (mscale) factor.
    Yarn {
        /// Scaling factor.
        factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: usize,
        /// Rotations at the fast boundary of the ramp (HF default 32; 0 means default).
        beta_fast: f64,
        /// Rotations at the slow boundary of the ramp (HF default 1; 0 means default).
        beta_slow: f64,
        /// DeepSeek-style mscale numerator (used only together with `mscale_all_dim`).
        mscale: Option<f64>,
        /// DeepSeek-style mscale denominator.
        mscale_all_dim: Option<f64>,
        /// Explicit attention factor; overrides the mscale formula.
        attention_factor: Option<f64>,
        /// Round the correction range outward to integers (HF default `true`).
        truncate: bool,
    },
    /// `"longrope"` (Phi-3; legacy spelling `"su"`): every frequency is divided by its own
    /// rescale factor, `inv_freq[i] = 1 / (ext[i] * theta^(2i / rotary_dim))`, where `ext` is
    /// `short_factor` or `long_factor` depending on the sequence length (see
    /// [`RopeParams::inv_freq_for_seq_len`]); cos and sin are multiplied by an attention factor.
    LongRope {
        /// Rescale factors used while `seq_len <= original_max_position_embeddings`
        /// (`rotary_dim / 2` values).
        short_factor: Vec<f64>,
        /// Rescale factors used once `seq_len > original_max_position_embeddings`
        /// (`rotary_dim / 2` values).
        long_factor: Vec<f64>,
        /// Context length of pre-training: the switch point between the two factor sets.
        original_max_position_embeddings: usize,
        /// `factor` of the rope parameters, only used for the default attention factor;
        /// `None` means `max_position_embeddings / original_max_position_embeddings` (HF's Phi-3
        /// rule).
        factor: Option<f64>,
        /// Explicit attention factor; `None` means `sqrt(1 + ln(factor) / ln(original))`
        /// (1 when `factor <= 1`).
        attention_factor: Option<f64>,
    },
}

/// Everything needed to compute RoPE inverse frequencies for one attention layer type.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    /// Base wavelength (`rope_theta`).
    pub theta: f64,
    /// Rotated dims per head (`head_dim * partial_rotary_factor`, usually `head_dim`); even, > 0.
    pub rotary_dim: usize,
    /// Scaling variant.
    pub scaling: RopeScaling,
    /// Model's `max_position_embeddings` (used by `Dynamic`, and by `LongRope`'s default factor).
    pub max_position_embeddings: usize,
}

/// `theta ** (2i / dim)` for `i < dim / 2`, as torch computes `base ** (arange(0, dim, 2).float() / dim)`:
/// exponent in f32, base rounded to f32, the power correctly rounded to f32.
fn pos_freqs(theta: f64, dim: usize) -> Vec<f32> {
    let base = theta as f32 as f64;
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            base.powf(e as f64) as f32
        })
        .collect()
}

/// HF YaRN `get_mscale`.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeParams {
    /// Checks that the parameters can produce frequencies.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(KernelError::InvalidArgument(m));
        if self.rotary_dim == 0 || self.rotary_dim % 2 != 0 {
            return bad(format!(
                "rope rotary_dim must be even and > 0, got {} (check head_dim / partial_rotary_factor)",
                self.rotary_dim
            ));
        }
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return bad(format!(
                "rope_theta must be finite and > 0, got {}",
                self.theta
            ));
        }
        let factor = match &self.scaling {
            RopeScaling::Default => 1.0,
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => *factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                if low_freq_factor == high_freq_factor || *original_max_position_embeddings == 0 {
                    return bad(format!(
                        "llama3 rope_scaling needs low_freq_factor != high_freq_factor (got {low_freq_factor}, {high_freq_factor}) and original_max_position_embeddings > 0"
                    ));
                }
                *factor
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => {
                if *original_max_position_embeddings == 0 {
                    return bad(
                        "yarn rope_scaling needs original_max_position_embeddings > 0".into(),
                    );
                }
                *factor
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                factor,
                attention_factor,
            } => {
                let half = self.rotary_dim / 2;
                for (name, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if list.len() != half {
                        return bad(format!(
                            "longrope {name} has {} values, expected rotary_dim / 2 = {half}",
                            list.len()
                        ));
                    }
                    if let Some(x) = list.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                        return bad(format!(
                            "longrope {name} values must be finite and > 0, got {x}"
                        ));
                    }
                }
                if *original_max_position_embeddings == 0 {
                    return bad(
                        "longrope rope_scaling needs original_max_position_embeddings > 0".into(),
                    );
                }
                if let Some(a) = attention_factor {
                    if !(a.is_finite() && *a > 0.0) {
                        return bad(format!(
                            "longrope attention_factor must be finite and > 0, got {a}"
                        ));
                    }
                }
                factor.unwrap_or(1.0)
            }
        };
        if !(factor.is_finite() && factor > 0.0) {
            return bad(format!(
                "rope_scaling factor must be finite and > 0, got {factor}"
            ));
        }
        Ok(())
    }

    /// Inverse frequencies, `[rotary_dim / 2]`, as HF computes them at model initialisation
    /// (`seq_len = None`): `Dynamic` as the default rope, `LongRope` with its SHORT factors.
    /// Models whose frequencies change with the sequence length ([`Self::depends_on_seq_len`])
    /// must use [`Self::inv_freq_for_seq_len`] per forward instead.
    pub fn inv_freq(&self) -> Vec<f32> {
        // seq_len 0 plays HF's `seq_len=None`: Dynamic clamps it up to max_position_embeddings,
        // LongRope treats it as short.
        self.inv_freq_for_seq_len(0)
    }

    /// Whether the frequencies depend on the length of the sequence being processed, i.e.
    /// whether a forward pass must call [`Self::inv_freq_for_seq_len`] rather than reuse
    /// [`Self::inv_freq`]: true for `Dynamic` and `LongRope`.
    pub fn depends_on_seq_len(&self) -> bool {
        matches!(
            self.scaling,
            RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
        )
    }

    /// Inverse frequencies for a forward pass whose largest position is `seq_len - 1` (HF's
    /// `dynamic_rope_update`: `seq_len = max(position_ids) + 1`, for the positions of the
    /// CURRENT forward only, so a decode step at position `p` has `seq_len = p + 1`).
    ///
    /// * `Dynamic`: theta grows once `seq_len > max_position_embeddings`.
    /// * `LongRope`: `long_factor` when `seq_len > original_max_position_embeddings`, else
    ///   `short_factor` (HF `longrope_frequency_update`; keys already in a KV cache keep the
    ///   rotation they were given).
    /// * every other variant: independent of `seq_len`.
    pub fn inv_freq_for_seq_len(&self, seq_len: usize) -> Vec<f32> {
        let dim = self.rotary_dim;
        match &self.scaling {
            RopeScaling::Default => pos_freqs(self.theta, dim)
                .iter()
                .map(|&p| 1.0 / p)
                .collect(),
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                pos_freqs(self.theta, dim)
                    .iter()
                    .map(|&p| (1.0 / p) / f)
                    .collect()
            }
            RopeScaling::Dynamic { factor } => {
                let max_pos = self.max_position_embeddings.max(1) as f64;
                let seq = (seq_len as f64).max(max_pos);
                let ratio = factor * seq / max_pos - (factor - 1.0);
                let theta = self.theta * ratio.powf(dim as f64 / (dim as f64 - 2.0));
                pos_freqs(theta, dim).iter().map(|&p| 1.0 / p).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => llama3_inv_freq(
                self.theta,
                dim,
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max_position_embeddings,
            ),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => yarn_inv_freq(
                self.theta,
                dim,
                *factor,
                *original_max_position_embeddings,
                *beta_fast,
                *beta_slow,
                *truncate,
            ),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                ..
            } => {
                let ext = if seq_len > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                // HF: 1.0 / (ext_factors * base ** inv_freq_shape), ext_factors an f32 tensor.
                pos_freqs(self.theta, dim)
                    .iter()
                    .zip(ext)
                    .map(|(&p, &e)| 1.0 / (e as f32 * p))
                    .collect()
            }
        }
    }

    /// Factor multiplying cos / sin (YaRN's mscale, LongRope's attention factor; 1.0 for every
    /// other variant). Never depends on the sequence length.
    pub fn attention_factor(&self) -> f32 {
        match &self.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                factor,
                attention_factor,
                ..
            } => {
                if let Some(a) = attention_factor {
                    return *a as f32;
                }
                let original = *original_max_position_embeddings as f64;
                let factor = factor.unwrap_or(self.max_position_embeddings as f64 / original);
                if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / original.ln()).sqrt() as f32
                }
            }
            RopeScaling::Yarn {
                factor,
                mscale,
                mscale_all_dim,
                attention_factor,
                ..
            } => {
                if let Some(a) = attention_factor {
                    return *a as f32;
                }
                // HF tests Python truthiness: a zero mscale counts as absent.
                match (mscale, mscale_all_dim) {
                    (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => {
                        (yarn_mscale(*factor, *m) / yarn_mscale(*factor, *a)) as f32
                    }
                    _ => yarn_mscale(*factor, 1.0) as f32,
                }
            }
            _ => 1.0,
        }
    }
}

/// HF `_compute_llama3_parameters`, reproducing its f32 tensor arithmetic.
fn llama3_inv_freq(
    theta: f64,
    dim: usize,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    old_context_len: usize,
) -> Vec<f32> {
    let low_freq_wavelen = (old_context_len as f64 / low_freq_factor) as f32;
    let high_freq_wavelen = (old_context_len as f64 / high_freq_factor) as f32;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    let (factor32, low32) = (factor as f32, low_freq_factor as f32);
    let ramp_den = (high_freq_factor - low_freq_factor) as f32;
    let old32 = old_context_len as f32;
    pos_freqs(theta, dim)
        .iter()
        .map(|&p| {
            let inv = 1.0 / p;
            let wavelen = two_pi / inv;
            let scaled = if wavelen > low_freq_wavelen {
                inv / factor32
            } else {
                inv
            };
            // HF: ~(wavelen < high) * ~(wavelen > low); wavelen is never NaN here.
            let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if is_medium {
                let smooth = (old32 / wavelen - low32) / ramp_den;
                (1.0 - smooth) * scaled / factor32 + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// HF `_compute_yarn_parameters` inverse frequencies, reproducing its f32 tensor arithmetic.
fn yarn_inv_freq(
    theta: f64,
    dim: usize,
    factor: f64,
    original_max_position_embeddings: usize,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
) -> Vec<f32> {
    // HF uses `beta or default`, so 0 selects the default.
    let beta_fast = if beta_fast == 0.0 { 32.0 } else { beta_fast };
    let beta_slow = if beta_slow == 0.0 { 1.0 } else { beta_slow };
    let correction_dim = |rotations: f64| {
        (dim as f64
            * (original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
                .ln())
            / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    let (low32, span32) = (low as f32, (high - low) as f32);
    let factor32 = factor as f32;
    pos_freqs(theta, dim)
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let extrapolation = 1.0 / p;
            let interpolation = 1.0 / (factor32 * p);
            let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}
