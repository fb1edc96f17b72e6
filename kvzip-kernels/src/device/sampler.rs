//! Picking the next token from a logits row on any device.

use super::{DType, Device, Tensor, ViewMut};
use crate::sampling::{Sampler, SamplingParams};
use crate::Result;

/// Chooses each generated token from an f32 logits row that lives on a device.
///
/// On CUDA, greedy and plain-temperature decoding run on the device (argmax / Gumbel-max with
/// a counter-based hash of `(seed, step)`), so per token only the id crosses to the host;
/// top-k / top-p copy the row to the host. On the CPU the host [`Sampler`] picks (seeded RNG,
/// HF warper semantics).
pub struct TokenSampler {
    params: SamplingParams,
    host: Sampler,
    ids: Option<Tensor>,
}

impl TokenSampler {
    /// A sampler for `params` (validated: temperature finite and >= 0, top_p in (0, 1]).
    pub fn new(params: SamplingParams) -> Result<Self> {
        Ok(Self {
            params,
            host: Sampler::new(params)?,
            ids: None,
        })
    }

    /// The next token from `logits` (`[vocab]` f32 on `device`) at generation step `step`.
    pub fn next(&mut self, device: &Device, logits: &mut Tensor, step: u64) -> Result<u32> {
        self.next_in(device, &mut logits.view_mut(), step)
    }

    /// [`next`](Self::next) on a view: one row of a batch's `[batch, vocab]` logits.
    pub fn next_in(&mut self, device: &Device, logits: &mut ViewMut<'_>, step: u64) -> Result<u32> {
        let p = self.params;
        let vocab = logits.len();
        let on_device = device.supports_device_sampling() && p.top_k == 0 && p.top_p >= 1.0;
        if !on_device && p.temperature > 0.0 {
            let row = device.host_f32_cow(&logits.as_view())?;
            return Ok(self.host.sample(&row) as u32);
        }
        if self.ids.is_none() {
            self.ids = Some(device.alloc(DType::U32, 1)?);
        }
        let ids = self.ids.as_mut().ok_or_else(|| {
            crate::KernelError::InvalidArgument("sampler id buffer missing".into())
        })?;
        let temperature = if on_device { p.temperature } else { 0.0 };
        device.sample(
            logits,
            &mut ids.view_mut(),
            1,
            vocab,
            temperature,
            p.seed,
            step,
        )?;
        Ok(device.to_host_u32(&ids.view())?[0])
    }

    /// Whether this sampler takes the argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }
}

/// Argmax of each of the `rows` rows of `logits` (`[rows, vocab]` f32 on `device`) in one
/// launch, with one copy of the `rows` ids to the host: greedy decoding of a whole batch.
pub fn greedy_rows(device: &Device, logits: &mut Tensor, rows: usize) -> Result<Vec<u32>> {
    if rows == 0 {
        return Ok(Vec::new());
    }
    let vocab = logits.len() / rows;
    let mut ids = device.alloc(DType::U32, rows)?;
    device.sample(
        &mut logits.view_mut(),
        &mut ids.view_mut(),
        rows,
        vocab,
        0.0,
        0,
        0,
    )?;
    device.to_host_u32(&ids.view())
}
