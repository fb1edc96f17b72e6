//! Attention hooks of the CPU KVzip engine: reconstruction scoring and the baseline
//! observers, called inside every layer once the step's K/V are in the cache.

use kvzip_cache::{KvCache, LayerCache};
use kvzip_score::baselines::{BaselineScorer, LayerObservation};
use kvzip_score::{ScoreAccumulator, ScoreShape};

use super::kvzip::score_err;
use crate::error::{ModelError, Result};
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
        layer: usize,
        q: &[f32],
        q_len: usize,
        cache: &KvCache,
    ) -> Result<()> {
        let Some((n_kv, lc)) = scored_layer(self.layer_heads, cache, layer)? else {
            return Ok(());
        };
        let shape = ScoreShape {
            q_len,
            n_kv_heads: n_kv,
            group: self.group,
            head_dim: self.head_dim,
            n_sys: self.n_sys,
        };
        self.acc
            .score_layer_chunk(layer, &shape, q, |h| lc.head_keys(h), self.chunk.clone())
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
        layer: usize,
        q: &[f32],
        q_len: usize,
        cache: &KvCache,
    ) -> Result<()> {
        let Some((n_kv, lc)) = scored_layer(self.layer_heads, cache, layer)? else {
            return Ok(());
        };
        let keys = |h: usize| lc.head_keys(h);
        let obs = LayerObservation {
            q,
            n_q_heads: self.n_q_heads,
            head_dim: self.head_dim,
            // The step's rows are already appended, so they end at `seen_tokens`.
            first_pos: cache.seen_tokens() - q_len,
            n_kv_heads: n_kv,
            head_keys: &keys,
            scale: self.scale,
        };
        for scorer in self.scorers.iter_mut() {
            scorer.observe_layer(layer, &obs).map_err(score_err)?;
        }
        Ok(())
    }
}

/// The KV head count and cache layer of `layer` if it is scored (`None` for sliding layers).
pub(super) fn scored_layer<'c>(
    layer_heads: &[Option<usize>],
    cache: &'c KvCache,
    layer: usize,
) -> Result<Option<(usize, &'c LayerCache)>> {
    let Some(Some(n_kv)) = layer_heads.get(layer).copied() else {
        return Ok(None);
    };
    let lc = cache
        .layer(layer)
        .ok_or_else(|| ModelError::Input(format!("cache has no layer {layer}")))?;
    Ok(Some((n_kv, lc)))
}
