//! Token selection: greedy argmax, a deterministic seeded RNG, and temperature / top-k / top-p
//! sampling following HF transformers' logits warpers (temperature, then top-k, then top-p).

use crate::{KernelError, Result};

/// Index of the largest logit; ties go to the lowest index (like `torch.argmax`).
///
/// NaN entries are skipped. An empty slice, or one with only NaN, returns 0.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_val = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if !found || v > best_val {
            best = i;
            best_val = v;
            found = true;
        }
    }
    best
}

/// SplitMix64 step, used to expand a 64-bit seed into the xoshiro state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic pseudo-random generator (xoshiro256**, seeded through SplitMix64).
/// The same seed gives the same stream on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Creates a generator from a 64-bit seed.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    /// Next 64 uniformly random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Fills `out` with values uniform in `[lo, hi)` (test data, random weights for benchmarks).
    pub fn fill_uniform(&mut self, out: &mut [f32], lo: f32, hi: f32) {
        for v in out {
            *v = lo + (hi - lo) * self.next_f32();
        }
    }

    /// A vector of `n` values uniform in `[lo, hi)`.
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut v = vec![0.0; n];
        self.fill_uniform(&mut v, lo, hi);
        v
    }
}

/// Sampling configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 selects greedy argmax. Must be finite and >= 0.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; 1 disables top-p.
    pub top_p: f32,
    /// Keep only the `top_k` largest logits (ties at the boundary kept, like HF); 0 disables.
    pub top_k: usize,
    /// Seed of the sampler's [`Rng`].
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// Stateful sampler: same params and seed give the same token sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    scratch: Vec<(f32, usize)>,
}

impl Sampler {
    /// Validates `p` (temperature finite and >= 0, top_p in (0, 1]) and seeds the RNG.
    pub fn new(p: SamplingParams) -> Result<Self> {
        if !(p.temperature.is_finite() && p.temperature >= 0.0) {
            return Err(KernelError::InvalidArgument(format!(
                "temperature must be finite and >= 0 (0 = greedy), got {}",
                p.temperature
            )));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(KernelError::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                p.top_p
            )));
        }
        Ok(Self {
            params: p,
            rng: Rng::new(p.seed),
            scratch: Vec::new(),
        })
    }

    /// The configuration this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token index from `logits` (`[vocab]`).
    ///
    /// Temperature 0 is [`argmax`]. Otherwise logits are divided by the temperature, filtered by
    /// top-k then top-p (HF semantics: top-p drops the low-probability tail whose cumulative mass
    /// is `<= 1 - top_p`, always keeping the most likely token) and sampled. NaN logits are never
    /// sampled; if no finite candidate remains the result is [`argmax`] (0 for empty input).
    pub fn sample(&mut self, logits: &[f32]) -> usize {
        let p = self.params;
        if p.temperature == 0.0 || logits.is_empty() {
            return argmax(logits);
        }
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_nan() && **v != f32::NEG_INFINITY)
                .map(|(i, &v)| (v / p.temperature, i)),
        );
        if cand.is_empty() {
            return argmax(logits);
        }
        // Descending by value, ties by index (stable ordering for determinism).
        cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if p.top_k > 0 && p.top_k < cand.len() {
            let kth = cand[p.top_k - 1].0;
            let keep = cand.partition_point(|c| c.0 >= kth);
            cand.truncate(keep);
        }
        let max = cand[0].0 as f64;
        let mut probs: Vec<f64> = cand.iter().map(|c| (c.0 as f64 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // HF sorts ascending and removes entries whose cumulative mass is <= 1 - top_p.
            let threshold = 1.0 - p.top_p as f64;
            let mut cumulative = 0.0;
            let mut remove_from = probs.len();
            for idx in (1..probs.len()).rev() {
                cumulative += probs[idx];
                if cumulative <= threshold {
                    remove_from = idx;
                } else {
                    break;
                }
            }
            probs.truncate(remove_from);
            cand.truncate(remove_from);
        }
        let mass: f64 = probs.iter().sum();
        let u = self.rng.next_f64() * mass;
        let mut acc = 0.0;
        for (q, c) in probs.iter().zip(cand.iter()) {
            acc += q;
            if u < acc {
                return c.1;
            }
        }
        cand.last().map_or(0, |c| c.1)
    }
}
