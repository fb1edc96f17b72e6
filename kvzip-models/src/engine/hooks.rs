//! Attention hooks of the KVzip engine: reconstruction scoring and the baseline observers,
//! called inside every layer once the step's K/V are in the cache. Written once: the score op
//! runs on the cache's device; the baselines read host copies of queries and keys (borrowed
//! on the CPU, downloaded from a GPU).

use std::borrow::Cow;

use kvzip_cache::KvCache;
use kvzip_kernels::{AttentionShape, Device, ScoreChunkShape, View, ViewMut};
use kvzip_score::baselines::{BaselineScorer, LayerObservation, RopeObservation};
use kvzip_score::ScoreAccumulator;

use super::kvzip::score_err;
use crate::error::Result;
use crate::model::{AttentionHook, CausalLm};

/// Hook that runs the reconstruction score op in every scored layer.
pub(super) struct ReconstructHook<'a> {
    pub(super) acc: &'a mut ScoreAccumulator,
    pub(super) layer_heads: &'a [Option<usize>],
    pub(super) group: usize,
    pub(super) head_dim: usize,
    pub(super) n_sys: usize,
    pub(super) chunk: std::ops::Range<usize>,
}

impl AttentionHook for ReconstructHook<'_> {
    /// The score op of scored layers, fused with the layer's attention where the device can.
    fn attend(
        &mut self,
        _device: &Device,
        layer: usize,
        q: &View<'_>,
        q_len: usize,
        cache: &KvCache,
        attn: &AttentionShape,
        out: Option<&mut ViewMut<'_>>,
    ) -> Result<bool> {
        let Some(Some(n_kv)) = self.layer_heads.get(layer).copied() else {
            return Ok(false);
        };
        let shape = ScoreChunkShape {
            n_in: q_len,
            n_kv_heads: n_kv,
            group: self.group,
            head_dim: self.head_dim,
            n_sys: self.n_sys,
            chunk_start: self.n_sys + self.chunk.start,
            chunk_len: self.chunk.len(),
            score_stride: self.acc.n_ctx(),
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        };
        let kv = cache.kv_view(layer)?;
        let out_is_some = out.is_some();
        let attended = match out {
            Some(out) => self
                .acc
                .score_layer_attention(layer, q, &kv, &shape, attn, out),
            None => self.acc.score_layer_view(layer, q, &kv, &shape),
        };
        attended.map_err(score_err)?;
        Ok(out_is_some)
    }
}

/// Hook that feeds the prefill's queries to several baseline scorers at once.
pub(super) struct MultiBaselineHook<'a> {
    pub(super) scorers: Vec<&'a mut BaselineScorer>,
    pub(super) layer_heads: &'a [Option<usize>],
    pub(super) n_q_heads: usize,
    pub(super) head_dim: usize,
    pub(super) scale: f32,
    /// The model (per-layer RoPE for scorers that un-rotate queries).
    pub(super) model: &'a dyn CausalLm,
    /// Tokens of the whole prefill (the RoPE frequencies of length-dependent variants).
    pub(super) total_len: usize,
    /// KVzip+: `‖x_p‖` of the residual stream entering each layer, per absolute position
    /// (`[layer][position]`), recorded when `Some`.
    pub(super) hidden_norms: Option<Vec<Vec<f32>>>,
}

impl AttentionHook for MultiBaselineHook<'_> {
    fn layer_input(
        &mut self,
        device: &Device,
        layer: usize,
        x: &View<'_>,
        rows: usize,
        first_pos: usize,
    ) -> Result<()> {
        let Some(norms) = self.hidden_norms.as_mut() else {
            return Ok(());
        };
        if self.layer_heads.get(layer).is_none_or(|h| h.is_none()) {
            return Ok(());
        }
        let host = device.host_f32_cow(x)?;
        let hidden = host.len() / rows.max(1);
        let out = &mut norms[layer];
        if out.len() < first_pos + rows {
            out.resize(first_pos + rows, 0.0);
        }
        for (r, row) in host.chunks(hidden.max(1)).enumerate().take(rows) {
            out[first_pos + r] = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        }
        Ok(())
    }

    fn after_append(
        &mut self,
        device: &Device,
        layer: usize,
        q: &View<'_>,
        q_len: usize,
        cache: &KvCache,
    ) -> Result<()> {
        let Some(Some(n_kv)) = self.layer_heads.get(layer).copied() else {
            return Ok(());
        };
        if self.scorers.is_empty() {
            return Ok(());
        }
        let nq = q_len * self.n_q_heads * self.head_dim;
        let q_host = device.host_f32_cow(&q.slice(0..nq)?)?;
        let keys: Vec<Cow<'_, [f32]>> = (0..n_kv)
            .map(|h| cache.head_keys_host(layer, h))
            .collect::<std::result::Result<_, _>>()?;
        let head_keys = |h: usize| -> &[f32] { &keys[h] };
        let extras = self.scorers.iter().any(|s| s.needs_values_and_rope());
        let values: Vec<Cow<'_, [f32]>> = if extras {
            (0..n_kv)
                .map(|h| cache.head_values_host(layer, h))
                .collect::<std::result::Result<_, _>>()?
        } else {
            Vec::new()
        };
        let head_values = |h: usize| -> &[f32] { &values[h] };
        let rope = self.model.layer(layer).map(|l| {
            let p = &l.rope.params;
            let freq = if p.depends_on_seq_len() {
                p.inv_freq_for_seq_len(self.total_len)
            } else {
                p.inv_freq()
            };
            (freq, l.rope.factor)
        });
        let obs = LayerObservation {
            q: &q_host,
            n_q_heads: self.n_q_heads,
            head_dim: self.head_dim,
            // The step's rows are already appended, so they end at `seen_tokens`.
            first_pos: cache.seen_tokens() - q_len,
            n_kv_heads: n_kv,
            head_keys: &head_keys,
            head_values: extras.then_some(&head_values as _),
            rope: rope.as_ref().map(|(f, factor)| RopeObservation {
                inv_freq: f,
                factor: *factor,
            }),
            scale: self.scale,
        };
        for scorer in self.scorers.iter_mut() {
            scorer.observe_layer(layer, &obs).map_err(score_err)?;
        }
        Ok(())
    }
}
