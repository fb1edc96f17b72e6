//! Attention fused with the KVzip score: the reconstruction forward attends its queries over the
//! whole cache and the score op reads the same logits, so where the device has a fused kernel
//! (the CPU) one pass computes both; elsewhere the two ops run one after the other.

use super::{AttentionShape, Device, KvView, ScoreChunkShape, View, ViewMut};
use crate::Result;
#[cfg(feature = "cpu-fast")]
use crate::{cpu, KernelError};

impl Device {
    /// [`Device::attention`] (prefill kernel, no decode plan) of `attn` plus
    /// [`Device::score_chunk`] of `score` on the same queries and cache layer, in one pass where
    /// the device can: on the CPU when the layer has no window or softcap and both use the same
    /// logit scale (the reference scale `1 / sqrt(head_dim)`), otherwise as the two ops.
    /// Arguments as for the two ops; `scores` is max-merged as by `score_chunk`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_scored(
        &self,
        q: &View<'_>,
        kv: &KvView<'_>,
        attn: &AttentionShape,
        score: &ScoreChunkShape,
        row_lse: &mut ViewMut<'_>,
        scores: &mut ViewMut<'_>,
        out: &mut ViewMut<'_>,
    ) -> Result<()> {
        let fusable = cfg!(feature = "cpu-fast")
            && matches!(self, Device::Cpu)
            && attn.window.is_none()
            && attn.softcap.is_none()
            && attn.scale.to_bits() == score.scale.to_bits()
            && attn.q_len == score.n_in
            && attn.n_kv_heads == score.n_kv_heads
            && attn.group == score.group
            && attn.head_dim == score.head_dim
            && score.chunk_len > 0;
        if !fusable {
            self.score_chunk(q, kv, score, row_lse, scores)?;
            return self.attention(q, kv, attn, None, out);
        }
        #[cfg(feature = "cpu-fast")]
        return fused_on_host(q, kv, attn, score, scores, out);
        #[cfg(not(feature = "cpu-fast"))]
        unreachable!("fusable is false without the fast CPU backend")
    }
}

/// The fused CPU path of [`Device::attention_scored`].
#[cfg(feature = "cpu-fast")]
fn fused_on_host(
    q: &View<'_>,
    kv: &KvView<'_>,
    attn: &AttentionShape,
    score: &ScoreChunkShape,
    scores: &mut ViewMut<'_>,
    out: &mut ViewMut<'_>,
) -> Result<()> {
    attn.validate()?;
    super::kv::check_score_call(score, kv, scores.len())?;
    let n = attn.q_elems();
    if q.len() < n || out.len() < n {
        return Err(KernelError::Shape(format!(
            "attention_scored: q ({}) and out ({}) need {n} elements",
            q.len(),
            out.len()
        )));
    }
    let args = cpu::AttentionArgs {
        q_len: attn.q_len,
        group: attn.group,
        head_dim: attn.head_dim,
        scale: attn.scale,
        window: None,
        softcap: None,
    };
    let target = cpu::ScoreTarget {
        n_sys: score.n_sys,
        target: score.chunk_start..score.chunk_start + score.chunk_len,
    };
    let mut chunk_scores = vec![0.0f32; score.n_kv_heads * score.chunk_len];
    cpu::attention_scored(
        &q.host_f32("attention q")?[..n],
        &kv.segments()?,
        &args,
        &target,
        &cpu::AttentionTiling::default(),
        &mut out.host_f32("attention out")?[..n],
        &mut chunk_scores,
    )?;
    super::kv::merge_chunk_scores(score, &chunk_scores, scores.host_f32("score scores")?);
    Ok(())
}
