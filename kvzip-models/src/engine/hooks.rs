//! Attention hooks of the KVzip engine: reconstruction scoring and the baseline observers,
//! called inside every layer once the step's K/V are in the cache. Written once: the score op
//! runs on the cache's device; the baselines read host copies of queries and keys (borrowed
//! on the CPU, downloaded from a GPU).

use std::borrow::Cow;

use kvzip_cache::KvCache;
use kvzip_kernels::{Device, ScoreChunkShape, View};
use kvzip_score::baselines::{BaselineScorer, LayerObservation};
use kvzip_score::ScoreAccumulator;

use super::kvzip::score_err;
use crate::error::Result;
use crate::model::AttentionHook;

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
    fn after_append(
        &mut self,
        _device: &Device,
        layer: usize,
        q: &View<'_>,
        q_len: usize,
        cache: &KvCache,
    ) -> Result<()> {
        let Some(Some(n_kv)) = self.layer_heads.get(layer).copied() else {
            return Ok(());
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
        self.acc
            .score_layer_view(layer, q, &cache.kv_view(layer)?, &shape)
            .map_err(score_err)
    }
}

/// Hook that feeds the prefill's queries to several baseline scorers at once.
pub(super) struct MultiBaselineHook<'a> {
    pub(super) scorers: Vec<&'a mut BaselineScorer>,
    pub(super) layer_heads: &'a [Option<usize>],
    pub(super) n_q_heads: usize,
    pub(super) head_dim: usize,
    pub(super) scale: f32,
}

impl AttentionHook for MultiBaselineHook<'_> {
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
        let nq = q_len * self.n_q_heads * self.head_dim;
        let q_host = device.host_f32_cow(&q.slice(0..nq)?)?;
        let keys: Vec<Cow<'_, [f32]>> = (0..n_kv)
            .map(|h| cache.head_keys_host(layer, h))
            .collect::<std::result::Result<_, _>>()?;
        let head_keys = |h: usize| -> &[f32] { &keys[h] };
        let obs = LayerObservation {
            q: &q_host,
            n_q_heads: self.n_q_heads,
            head_dim: self.head_dim,
            // The step's rows are already appended, so they end at `seen_tokens`.
            first_pos: cache.seen_tokens() - q_len,
            n_kv_heads: n_kv,
            head_keys: &head_keys,
            scale: self.scale,
        };
        for scorer in self.scorers.iter_mut() {
            scorer.observe_layer(layer, &obs).map_err(score_err)?;
        }
        Ok(())
    }
}
