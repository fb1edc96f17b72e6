//! KVzip on top of the engine: prefill a context once, score every context KV pair (context
//! reconstruction, head scores, or a baseline), prune to a ratio, then answer any number of
//! queries from the small cache (KVZIP-SPEC §0–§3, DESIGN §2–§3).

use std::time::Instant;

use kvzip_cache::KvCache;
use kvzip_cache::KvStorage;
use kvzip_score::baselines::{Baseline, BaselineScorer};
use kvzip_score::{
    select, select_heads, ContextScores, HeadScores, Level, ScoreAccumulator, Selection,
};
use kvzip_templates::{reconstruction_inputs, PromptIds};

use super::hooks::{MultiBaselineHook, ReconstructHook};
use super::{Engine, GenerateOptions, Generation};
use crate::error::{ModelError, Result};
use crate::model::{AttentionHook, LogitsMode};

/// Context tokens per reconstruction chunk (KVZIP-SPEC §1.1).
pub const DEFAULT_SCORING_CHUNK: usize = 2000;

/// Rows reserved per head beyond the prefill when a context cache is created: room for a
/// reconstruction chunk's input and a short query before the first re-layout.
const MIN_SCORING_ROOM: usize = 256;

/// How context KV pairs are scored after the prefill.
#[derive(Debug, Clone)]
pub enum Scoring {
    /// KVzip context reconstruction with chunks of `chunk` context tokens.
    Reconstruct {
        /// Context tokens per chunk (2000 in the reference).
        chunk: usize,
    },
    /// KVzip+: reconstruction scores times `‖W_O v‖ / ‖h‖` ([`kvzip_score::kvzip_plus`]).
    ReconstructPlus {
        /// Context tokens per chunk.
        chunk: usize,
    },
    /// Context-independent head scores loaded from a file (no scoring passes).
    HeadScores(HeadScores),
    /// A baseline policy computed from the prefill's own attention.
    Baseline(Baseline),
    /// No scoring: the cache can only be used at ratio 1.
    None,
}

/// Whether pruning removes pairs for good or keeps the full cache for later re-pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// Compact the cache in place (real memory savings; prune once).
    Evict,
    /// Keep the full cache and derive a compacted copy per ratio.
    Retain,
}

/// Wall-clock timings of a context prefill, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContextTimings {
    /// Prefill of system prompt + context.
    pub prefill_ms: f64,
    /// Scoring passes (reconstruction) or baseline scoring.
    pub scoring_ms: f64,
}

/// Outcome of [`ContextCache::prune`].
#[derive(Debug, Clone, Copy)]
pub struct PruneReport {
    /// The ratio asked for.
    pub ratio_requested: f64,
    /// Kept / total context pairs over the scored layers.
    pub ratio_real: f64,
    /// Lowest kept score.
    pub threshold: f32,
    /// Context KV bytes before pruning (all layers, system prompt excluded).
    pub kv_bytes_full: usize,
    /// Context KV bytes kept.
    pub kv_bytes_kept: usize,
}

/// A prefilled (and possibly pruned) context ready to answer queries.
pub struct ContextCache {
    /// The live cache queries run on.
    pub cache: KvCache,
    full: Option<KvCache>,
    /// Per-pair scores (absent for head-score mode and `Scoring::None`).
    pub scores: Option<ContextScores>,
    head_scores: Option<HeadScores>,
    /// System-prompt tokens (never evicted).
    pub n_sys: usize,
    /// Context tokens (the evictable span).
    pub n_ctx: usize,
    /// Prefill ids: system prompt ++ context.
    pub prefill_ids: Vec<u32>,
    /// Evict or retain.
    pub kv_type: KvType,
    /// Timings of prefill and scoring.
    pub timings: ContextTimings,
    pruned: bool,
    layer_heads: Vec<Option<usize>>,
}

/// Context KV bytes of `cache` (at its storage's element size) over the layers with `Some` in
/// `layer_heads`.
fn context_bytes(cache: &KvCache, layer_heads: &[Option<usize>]) -> usize {
    cache
        .context_usage(cache.storage().elem_bytes(), |l| {
            layer_heads.get(l).is_some_and(|h| h.is_some())
        })
        .bytes_kept
}

pub(crate) fn score_err(e: kvzip_score::ScoreError) -> ModelError {
    ModelError::Input(e.to_string())
}

/// The error for an empty context.
pub(crate) fn empty_context_error() -> ModelError {
    ModelError::Input(
        "the context is empty: KVzip compresses a context, give one (e.g. --context FILE)".into(),
    )
}

/// Checks a prune request and selects the pairs to keep: ratio in
/// (0, 1], not a second prune of an evicted cache, scores present; head scores (whole heads)
/// take precedence over per-pair scores.
pub(crate) fn select_for_prune(
    ratio: f64,
    level: Level,
    already_evicted: bool,
    head_scores: Option<&HeadScores>,
    scores: Option<&ContextScores>,
    n_ctx: usize,
    layer_heads: &[Option<usize>],
) -> Result<kvzip_score::Selection> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(ModelError::Input(format!(
            "ratio {ratio} is outside (0, 1]: it is the fraction of context KV pairs kept"
        )));
    }
    if already_evicted {
        return Err(ModelError::Input(
            "this cache was already pruned in evict mode; use kv-type retain to re-prune".into(),
        ));
    }
    match (head_scores, scores) {
        (Some(hs), _) => select_heads(hs, ratio, n_ctx, layer_heads),
        (None, Some(scores)) => select(scores, ratio, level),
        (None, None) => {
            return Err(ModelError::Input(
                "the context was prefilled without scoring; nothing to prune by".into(),
            ))
        }
    }
    .map_err(score_err)
}

impl Engine {
    /// KV heads per layer that KVzip scores and evicts: every global layer (`None` for
    /// sliding-window layers, which keep their window).
    pub fn scored_layer_heads(&self) -> Vec<Option<usize>> {
        self.spec().kvzip_layer_heads()
    }

    /// Prefills `prompt.system_ids ++ context_ids`, then scores the context per `scoring`.
    /// `progress(stage, done, total)` reports prefill (`"prefill"`) and scoring (`"score"`).
    /// One scoring of [`Engine::prefill_context_multi`], kept as the cache's active scores;
    /// head scores stay per head (pruned whole heads), `Scoring::None` scores nothing.
    pub fn prefill_context(
        &self,
        prompt: &PromptIds,
        context_ids: &[u32],
        scoring: &Scoring,
        kv_type: KvType,
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<ContextCache> {
        let per_pair = match scoring {
            Scoring::Reconstruct { .. }
            | Scoring::ReconstructPlus { .. }
            | Scoring::Baseline(_) => std::slice::from_ref(scoring),
            Scoring::HeadScores(_) | Scoring::None => &[],
        };
        let (mut ctx, mut scores) =
            self.prefill_context_multi(prompt, context_ids, per_pair, kv_type, progress)?;
        ctx.scores = scores.pop();
        if let Scoring::HeadScores(hs) = scoring {
            hs.check_model(&ctx.layer_heads).map_err(score_err)?;
            ctx.head_scores = Some(hs.clone());
        }
        Ok(ctx)
    }

    /// Prefills `prompt.system_ids ++ context_ids` once and computes one [`ContextScores`] per
    /// entry of `scorings`, in order, from that single prefill: every baseline observes the same
    /// prefill pass, reconstruction runs its passes afterwards, head scores are expanded to
    /// head-constant `[layer][head, n_ctx]` scores (prune them with [`Level::Head`]).
    /// The returned cache holds no active scores: prune it with
    /// [`ContextCache::prune_with_selection`]. `Scoring::None` is rejected.
    pub fn prefill_context_multi(
        &self,
        prompt: &PromptIds,
        context_ids: &[u32],
        scorings: &[Scoring],
        kv_type: KvType,
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<(ContextCache, Vec<ContextScores>)> {
        if context_ids.is_empty() {
            return Err(empty_context_error());
        }
        if scorings.iter().any(|s| matches!(s, Scoring::None)) {
            return Err(ModelError::Input(
                "prefill_context_multi needs real scorings; drop Scoring::None".into(),
            ));
        }
        let n_sys = prompt.system_ids.len();
        let n_ctx = context_ids.len();
        self.check_context_fits(prompt, context_ids, scorings)?;
        let layer_heads = self.scored_layer_heads();
        let mut baselines: Vec<Option<BaselineScorer>> = scorings
            .iter()
            .map(|s| match s {
                Scoring::Baseline(kind) => BaselineScorer::new(*kind, n_sys, n_ctx, &layer_heads)
                    .map(Some)
                    .map_err(score_err),
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let spec = self.spec();
        let prefill_ids = prompt.prefill_ids(context_ids);
        // Room for the whole prefill plus one reconstruction chunk: no re-layout on the way.
        let mut cache = self.new_cache_with_capacity(prefill_ids.len() + MIN_SCORING_ROOM)?;
        cache.set_spans(n_sys, n_ctx);
        let t0 = Instant::now();
        let mut hook = MultiBaselineHook {
            scorers: baselines
                .iter_mut()
                .flatten()
                .filter(|b| b.needs_attention())
                .collect(),
            layer_heads: &layer_heads,
            n_q_heads: spec.n_heads,
            head_dim: spec.head_dim,
            scale: spec.attn_scale,
            model: self.model(),
            total_len: n_sys + n_ctx,
            hidden_norms: scorings
                .iter()
                .any(|s| matches!(s, Scoring::ReconstructPlus { .. }))
                .then(|| vec![Vec::new(); spec.n_layers()]),
        };
        let observe = !hook.scorers.is_empty() || hook.hidden_norms.is_some();
        self.feed_observed(
            &mut cache,
            &prefill_ids,
            LogitsMode::None,
            observe.then_some(&mut hook as &mut dyn AttentionHook),
            &mut |done, total| progress("prefill", done, total),
        )?;
        let hidden_norms = hook.hidden_norms.take();
        drop(hook);
        self.commit_windows(&mut cache)?;
        self.device().synchronize()?;
        let mut ctx = ContextCache::unpruned(cache, prefill_ids, kv_type, layer_heads.clone());
        ctx.timings.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let mut out = Vec::with_capacity(scorings.len());
        let mut recon: Option<(usize, ContextScores)> = None;
        for (scoring, baseline) in scorings.iter().zip(baselines) {
            let scores = match scoring {
                Scoring::Reconstruct { chunk } => {
                    let scores = self.reconstruction_scores(
                        &mut ctx.cache,
                        prompt,
                        context_ids,
                        *chunk,
                        progress,
                    )?;
                    recon = Some((*chunk, scores.clone()));
                    scores
                }
                Scoring::ReconstructPlus { chunk } => {
                    // Reuse the plain reconstruction scores of the same chunking if computed.
                    let mut scores = match &recon {
                        Some((c, s)) if c == chunk => s.clone(),
                        _ => self.reconstruction_scores(
                            &mut ctx.cache,
                            prompt,
                            context_ids,
                            *chunk,
                            progress,
                        )?,
                    };
                    let norms = hidden_norms.as_deref().ok_or_else(|| {
                        ModelError::Input("KVzip+ needs the prefill's hidden norms".into())
                    })?;
                    self.kvzip_plus(&mut scores, &ctx.cache, norms, n_sys, n_ctx)?;
                    scores
                }
                Scoring::HeadScores(hs) => hs
                    .to_context_scores(n_ctx, &layer_heads)
                    .map_err(score_err)?,
                Scoring::Baseline(_) => baseline
                    .ok_or_else(|| ModelError::Input("baseline scorer missing".into()))?
                    .finish()
                    .map_err(score_err)?,
                Scoring::None => {
                    return Err(ModelError::Input("Scoring::None has no scores".into()))
                }
            };
            out.push(scores);
        }
        // The scoring passes grew every layer by a chunk's input; give sliding-window layers
        // back their window-sized memory.
        self.commit_windows(&mut ctx.cache)?;
        self.device().synchronize()?;
        ctx.timings.scoring_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok((ctx, out))
    }

    /// Refuses, before any prefill, a context that cannot fit the model's positions: the
    /// system prompt + context, plus for reconstruction scoring the longest chunk input fed
    /// after them (so `--chunk` counts against the window).
    pub fn check_context_fits(
        &self,
        prompt: &PromptIds,
        context_ids: &[u32],
        scorings: &[Scoring],
    ) -> Result<()> {
        let max = self.spec().max_position_embeddings;
        let base = prompt.system_ids.len() + context_ids.len();
        if base > max {
            return Err(ModelError::Input(format!(
                "system prompt ({}) + context ({}) = {base} tokens exceed the model's \
                 max_position_embeddings {max}; shorten the context",
                prompt.system_ids.len(),
                context_ids.len()
            )));
        }
        for s in scorings {
            let chunk = match s {
                Scoring::Reconstruct { chunk } | Scoring::ReconstructPlus { chunk } => *chunk,
                _ => continue,
            };
            let longest = reconstruction_inputs(
                context_ids,
                &prompt.postfix_ids,
                &prompt.repeat_first_ids,
                &prompt.repeat_next_ids,
                chunk,
            )
            .map_err(|e| ModelError::Input(e.to_string()))?
            .iter()
            .map(|c| c.input_ids.len())
            .max()
            .unwrap_or(0);
            if base + longest > max {
                let room = max.saturating_sub(base + (longest - chunk.min(context_ids.len())));
                return Err(ModelError::Input(format!(
                    "the context ({} tokens after a {}-token system prompt) fits, but KVzip \
                     scoring feeds one reconstruction chunk of up to {longest} tokens after it \
                     (--chunk {chunk}): {} > max_position_embeddings {max}; use --chunk {} or \
                     less, or a shorter context",
                    context_ids.len(),
                    prompt.system_ids.len(),
                    base + longest,
                    room.max(1)
                )));
            }
        }
        Ok(())
    }

    /// Runs the reconstruction passes over an unpruned cache holding exactly system prompt +
    /// context, returning per-pair scores. The cache is left as it was.
    pub fn reconstruction_scores(
        &self,
        cache: &mut KvCache,
        prompt: &PromptIds,
        context_ids: &[u32],
        chunk: usize,
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<ContextScores> {
        let spec = self.spec();
        let layer_heads = self.scored_layer_heads();
        let inputs = reconstruction_inputs(
            context_ids,
            &prompt.postfix_ids,
            &prompt.repeat_first_ids,
            &prompt.repeat_next_ids,
            chunk,
        )
        .map_err(|e| ModelError::Input(e.to_string()))?;
        let mut acc = ScoreAccumulator::on_device(self.device(), context_ids.len(), &layer_heads)
            .map_err(score_err)?;
        let longest = inputs.iter().map(|c| c.input_ids.len()).max().unwrap_or(0);
        self.check_length(cache, longest)?;
        cache.reserve(longest)?;
        for (i, input) in inputs.iter().enumerate() {
            let mark = cache.mark();
            let mut hook = ReconstructHook {
                acc: &mut acc,
                layer_heads: &layer_heads,
                group: spec.group(),
                head_dim: spec.head_dim,
                n_sys: prompt.system_ids.len(),
                chunk: input.ctx_range.clone(),
            };
            let res = self.forward(&input.input_ids, cache, LogitsMode::None, Some(&mut hook));
            cache.rollback(&mark)?;
            res?;
            progress("score", i + 1, inputs.len());
        }
        acc.finish().map_err(score_err)
    }

    /// KVzip+ normalisation of reconstruction `scores` in place: per scored layer, the output
    /// projection's per-head Gram matrices, the context rows' values and the residual-stream
    /// norms of the prefill (`norms[layer][position]`).
    fn kvzip_plus(
        &self,
        scores: &mut ContextScores,
        cache: &KvCache,
        norms: &[Vec<f32>],
        n_sys: usize,
        n_ctx: usize,
    ) -> Result<()> {
        let spec = self.spec();
        let (d, group) = (spec.head_dim, spec.group());
        for (l, heads) in self.scored_layer_heads().iter().enumerate() {
            let Some(n_kv) = *heads else { continue };
            let layer = self.model().layer(l).ok_or_else(|| {
                ModelError::Input("KVzip+ needs a model built on the shared decoder".into())
            })?;
            let w_o = self.device().weight_f32(&layer.o.weight)?;
            let grams =
                kvzip_score::kvzip_plus::output_grams(&w_o, layer.o.out_dim, n_kv * group, d)
                    .map_err(score_err)?;
            let hidden = norms
                .get(l)
                .and_then(|n| n.get(n_sys..n_sys + n_ctx))
                .ok_or_else(|| {
                    ModelError::Input(format!("KVzip+: layer {l} has no hidden norms"))
                })?;
            let values = |h: usize| -> Vec<f32> {
                cache
                    .head_values_host(l, h)
                    .map(|v| v[n_sys * d..(n_sys + n_ctx) * d].to_vec())
                    .unwrap_or_default()
            };
            let layer_scores = scores
                .layer_mut(l)
                .ok_or_else(|| ModelError::Input(format!("KVzip+: layer {l} has no scores")))?;
            kvzip_score::kvzip_plus::kvzip_plus_layer(
                &mut layer_scores.values,
                &values,
                &grams,
                n_kv,
                group,
                d,
                hidden,
            )
            .map_err(score_err)?;
        }
        Ok(())
    }

    /// Answers one query from the context cache: feeds `query_ids` (query piece + postfix),
    /// generates, then either keeps the turn (`update_cache`) or restores the cache exactly.
    pub fn answer(
        &self,
        ctx: &mut ContextCache,
        query_ids: &[u32],
        opts: &GenerateOptions,
        update_cache: bool,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        let mark = ctx.cache.mark();
        let gen = self.generate(&mut ctx.cache, query_ids, opts, false, on_token);
        match (&gen, update_cache) {
            (Ok(_), true) => self.commit_windows(&mut ctx.cache)?,
            _ => ctx.cache.rollback(&mark)?,
        }
        gen
    }
}

impl ContextCache {
    /// Wraps a cache loaded from disk (already pruned; evict mode, no scores). `prefill_ids`
    /// are the system prompt + context ids recorded with it.
    pub fn from_saved(cache: KvCache, prefill_ids: Vec<u32>) -> Result<Self> {
        let (n_sys, n_ctx) = (cache.n_sys(), cache.n_ctx());
        if prefill_ids.len() != n_sys + n_ctx {
            return Err(ModelError::Input(format!(
                "saved cache records {} prefill ids but spans {n_sys} system + {n_ctx} context tokens",
                prefill_ids.len()
            )));
        }
        let layer_heads = cache
            .layers()
            .iter()
            .map(|l| Some(l.n_kv_heads()))
            .collect();
        let mut ctx = Self::unpruned(cache, prefill_ids, KvType::Evict, layer_heads);
        ctx.pruned = true;
        Ok(ctx)
    }

    /// A context over `cache` (spans taken from it) with no scores and zero timings.
    fn unpruned(
        cache: KvCache,
        prefill_ids: Vec<u32>,
        kv_type: KvType,
        layer_heads: Vec<Option<usize>>,
    ) -> Self {
        Self {
            n_sys: cache.n_sys(),
            n_ctx: cache.n_ctx(),
            cache,
            full: None,
            scores: None,
            head_scores: None,
            prefill_ids,
            kv_type,
            timings: ContextTimings::default(),
            pruned: false,
            layer_heads,
        }
    }

    /// Context KV bytes currently held in the evictable (scored) layers; the system prompt,
    /// later tokens and sliding-window layers (which only ever hold their window) are excluded.
    pub fn kv_bytes_context(&self) -> usize {
        context_bytes(&self.cache, &self.layer_heads)
    }

    /// Scores of the context pairs (pair-level policies).
    pub fn scores(&self) -> Option<&ContextScores> {
        self.scores.as_ref()
    }

    /// Keeps `ratio` of the context KV pairs at `level` (ratio in (0, 1]). Evict mode compacts
    /// the live cache once; retain mode keeps the full cache and can be re-pruned at any ratio.
    pub fn prune(&mut self, ratio: f64, level: Level) -> Result<PruneReport> {
        let selection = select_for_prune(
            ratio,
            level,
            self.pruned && self.kv_type == KvType::Evict,
            self.head_scores.as_ref(),
            self.scores.as_ref(),
            self.n_ctx,
            &self.layer_heads,
        )?;
        self.prune_with_selection(ratio, &selection)
    }

    /// Applies a selection computed elsewhere (e.g. by [`kvzip_score::select_pyramid`] on
    /// scores from [`Engine::prefill_context_multi`]); `ratio` is only reported back. The mask
    /// must match this cache's layers, heads and context length.
    pub fn prune_with_selection(
        &mut self,
        ratio: f64,
        selection: &Selection,
    ) -> Result<PruneReport> {
        if self.pruned && self.kv_type == KvType::Evict {
            return Err(ModelError::Input(
                "this cache was already pruned in evict mode; use kv-type retain to re-prune"
                    .into(),
            ));
        }
        let full = self.full.as_ref().unwrap_or(&self.cache);
        let kv_bytes_full = context_bytes(full, &self.layer_heads);
        match self.kv_type {
            KvType::Evict => self.cache.compact(&selection.mask)?,
            KvType::Retain => {
                let full = match self.full.take() {
                    Some(full) => full,
                    None => {
                        let empty = KvCache::new_in(self.cache.storage().clone(), &[])?;
                        std::mem::replace(&mut self.cache, empty)
                    }
                };
                self.cache = full.compacted_view(&selection.mask)?;
                self.full = Some(full);
            }
        }
        self.pruned = true;
        Ok(PruneReport {
            ratio_requested: ratio,
            ratio_real: selection.ratio_real,
            threshold: selection.threshold,
            kv_bytes_full,
            kv_bytes_kept: self.kv_bytes_context(),
        })
    }

    /// KV heads per layer that are scored and evictable (`None` = sliding-window layer).
    pub fn layer_heads(&self) -> &[Option<usize>] {
        &self.layer_heads
    }

    /// Restores the full (unpruned) cache in retain mode.
    pub fn unprune(&mut self) -> Result<()> {
        match self.full.take() {
            Some(full) => {
                self.cache = full;
                self.pruned = false;
                Ok(())
            }
            None if !self.pruned => Ok(()),
            None => Err(ModelError::Input(
                "an evicted cache cannot be restored; use kv-type retain".into(),
            )),
        }
    }
}
