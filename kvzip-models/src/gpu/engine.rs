//! The KVzip engine on a CUDA device: the CPU [`crate::engine::Engine`] API (prefill a context
//! once, score it, prune, answer many queries) with prefill, scoring, pruning and generation
//! on the GPU. The host sees only the sampled token id per step (and, once per prune, the
//! scores for selection, which reuses `kvzip-score`'s exact selection rules).

use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use kvzip_kernels::cuda::score::ScoreChunkShape;
use kvzip_kernels::cuda::{bf16, CudaBackend, CudaSlice, CudaViewMut};
use kvzip_kernels::sampling::Sampler;
use kvzip_score::{ContextScores, HeadScores, LayerScores, Level};
use kvzip_templates::{reconstruction_inputs, PromptIds};

use super::cache::{GpuKvCache, HEAD_SLACK};
use super::forward::{GpuAttentionHook, Scratch};
use super::model::GpuModel;
use crate::config::ModelSpec;
use crate::engine::kvzip::{
    empty_context_error, score_err, select_for_prune, ContextTimings, KvType, PruneReport, Scoring,
};
use crate::engine::{decode_loop, GenerateOptions, Generation, DEFAULT_PREFILL_CHUNK};
use crate::error::{ModelError, Result};
use crate::model::LogitsMode;

/// A model on a GPU, ready to prefill, score, prune and generate.
pub struct GpuEngine {
    gpu: CudaBackend,
    model: GpuModel,
    scratch: RefCell<Scratch>,
    /// Tokens per forward call during prefill.
    pub prefill_chunk: usize,
}

/// A prefilled (and possibly pruned) context on the GPU.
pub struct GpuContextCache {
    /// The live cache queries run on.
    pub cache: GpuKvCache,
    full: Option<GpuKvCache>,
    /// Per-pair scores (host), absent for head-score mode.
    pub scores: Option<ContextScores>,
    head_scores: Option<HeadScores>,
    /// System-prompt tokens (never evicted).
    pub n_sys: usize,
    /// Context tokens.
    pub n_ctx: usize,
    /// Evict or retain.
    pub kv_type: KvType,
    /// Prefill and scoring wall time.
    pub timings: ContextTimings,
    layer_heads: Vec<Option<usize>>,
    pruned: bool,
}

impl GpuEngine {
    /// Opens GPU `ordinal` and loads the model in `dir` as bf16.
    pub fn load(dir: &Path, ordinal: usize) -> Result<Self> {
        let gpu = CudaBackend::new(ordinal)?;
        let model = GpuModel::load(&gpu, dir)?;
        Ok(Self::new(gpu, model))
    }

    /// Wraps a loaded model.
    pub fn new(gpu: CudaBackend, model: GpuModel) -> Self {
        Self {
            gpu,
            model,
            scratch: RefCell::new(Scratch::default()),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }

    /// The model description.
    pub fn spec(&self) -> &ModelSpec {
        &self.model.spec
    }

    /// The device backend.
    pub fn gpu(&self) -> &CudaBackend {
        &self.gpu
    }

    /// Sets the keys per work item of the decode plans (`None`: the planner's default).
    pub fn set_decode_chunk_keys(&mut self, chunk: Option<usize>) {
        self.model.decode_chunk_keys = chunk;
    }

    /// The model's weights on the device.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// An empty cache with `capacity` rows reserved per head (it grows as needed).
    pub fn new_cache(&self, capacity: usize) -> Result<GpuKvCache> {
        let s = self.spec();
        GpuKvCache::new(&self.gpu, s.n_layers(), s.n_kv_heads, s.head_dim, capacity)
    }

    fn check_length(&self, cache: &GpuKvCache, extra: usize) -> Result<()> {
        self.spec().check_length(cache.seen_tokens, extra)
    }

    /// One forward step (see [`GpuModel::forward`]).
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut GpuKvCache,
        mode: LogitsMode,
        hook: Option<&mut dyn GpuAttentionHook>,
    ) -> Result<Option<CudaSlice<f32>>> {
        let mut scratch = self.scratch.borrow_mut();
        self.model
            .forward(&self.gpu, ids, cache, &mut scratch, mode, hook)
    }

    /// Feeds `ids` in chunks of [`Self::prefill_chunk`]; returns the last chunk's logits per
    /// `mode` (`Last`: `[vocab]` of the final token) on the device.
    pub fn feed(
        &self,
        cache: &mut GpuKvCache,
        ids: &[u32],
        mode: LogitsMode,
        mut hook: Option<&mut dyn GpuAttentionHook>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Option<CudaSlice<f32>>> {
        if ids.is_empty() {
            return Err(ModelError::Input("prefill called with no tokens".into()));
        }
        self.check_length(cache, ids.len())?;
        let chunk = self.prefill_chunk.max(1);
        let n = ids.len().div_ceil(chunk);
        let mut out = None;
        for (i, piece) in ids.chunks(chunk).enumerate() {
            let m = if i + 1 == n { mode } else { LogitsMode::None };
            out = self.forward(
                piece,
                cache,
                m,
                hook.as_mut().map(|h| &mut **h as &mut dyn GpuAttentionHook),
            )?;
            progress(((i + 1) * chunk).min(ids.len()), ids.len());
        }
        Ok(out)
    }

    /// Generates after feeding `prompt` (same contract as [`crate::engine::Engine::generate`]).
    /// Greedy and plain temperature sampling run on the device (argmax / Gumbel-max); top-k /
    /// top-p copy the logits row to the host and use the CPU sampler.
    pub fn generate(
        &self,
        cache: &mut GpuKvCache,
        prompt: &[u32],
        opts: &GenerateOptions,
        keep_logits: bool,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(ModelError::Input(
                "generate needs at least one prompt token".into(),
            ));
        }
        self.check_length(cache, prompt.len() + opts.max_new_tokens)?;
        cache.reserve(&self.gpu, prompt.len() + opts.max_new_tokens)?;
        let p = opts.sampling;
        let on_device = p.top_k == 0 && p.top_p >= 1.0;
        let mut host_sampler = Sampler::new(p)?;
        let softcap = self.spec().final_softcap.unwrap_or(0.0);
        let vocab = self.spec().vocab_size;
        let mut ids_dev = self.gpu.alloc::<u32>(1)?;
        let mut logits = self.feed(cache, prompt, LogitsMode::Last, None, &mut |_, _| {})?;
        decode_loop(opts, on_token, |step, prev| {
            if let Some(token) = prev {
                logits = self.forward(&[token], cache, LogitsMode::Last, None)?;
            }
            let l = logits
                .as_mut()
                .ok_or_else(|| ModelError::Input("forward returned no logits".into()))?;
            // Softcap (and argmax / Gumbel-max when sampling on the device) in one kernel.
            let (temperature, seed) = if on_device {
                (p.temperature, p.seed)
            } else {
                (0.0, 0)
            };
            self.gpu.sample(
                l,
                &mut ids_dev,
                1,
                vocab,
                softcap,
                temperature,
                seed,
                step as u64,
            )?;
            let host = (keep_logits || !on_device)
                .then(|| self.gpu.download(l))
                .transpose()?;
            let next = match &host {
                Some(row) if !on_device => host_sampler.sample(row) as u32,
                _ => self.gpu.download(&ids_dev)?[0],
            };
            Ok((next, host.filter(|_| keep_logits)))
        })
    }

    /// Layers KVzip scores and evicts (`Some(kv heads)`; Gemma's sliding layers are `None`).
    pub fn scored_layer_heads(&self) -> Vec<Option<usize>> {
        self.spec().kvzip_layer_heads()
    }

    /// Prefills `prompt.system_ids ++ context_ids` and scores the context per `scoring`
    /// (reconstruction or head scores; baselines run on the CPU engine).
    pub fn prefill_context(
        &self,
        prompt: &PromptIds,
        context_ids: &[u32],
        scoring: &Scoring,
        kv_type: KvType,
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<GpuContextCache> {
        if context_ids.is_empty() {
            return Err(empty_context_error());
        }
        let n_sys = prompt.system_ids.len();
        let n_ctx = context_ids.len();
        let ids = prompt.prefill_ids(context_ids);
        let mut cache = self.new_cache(ids.len() + HEAD_SLACK)?;
        let t0 = Instant::now();
        self.feed(&mut cache, &ids, LogitsMode::None, None, &mut |d, t| {
            progress("prefill", d, t)
        })?;
        self.gpu.synchronize()?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let layer_heads = self.scored_layer_heads();
        let t1 = Instant::now();
        let (scores, head_scores) = match scoring {
            Scoring::Reconstruct { chunk } => (
                Some(self.reconstruction_scores(
                    &mut cache,
                    prompt,
                    context_ids,
                    *chunk,
                    progress,
                )?),
                None,
            ),
            Scoring::HeadScores(hs) => {
                hs.check_model(&layer_heads).map_err(score_err)?;
                (None, Some(hs.clone()))
            }
            Scoring::Baseline(b) => {
                return Err(ModelError::Input(format!(
                    "baseline {b:?} scoring runs on the CPU engine only; use --device cpu"
                )))
            }
            Scoring::None => (None, None),
        };
        let scoring_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(GpuContextCache {
            cache,
            full: None,
            scores,
            head_scores,
            n_sys,
            n_ctx,
            kv_type,
            timings: ContextTimings {
                prefill_ms,
                scoring_ms,
            },
            layer_heads,
            pruned: false,
        })
    }

    /// KVzip reconstruction scores of the context in `cache` (system prompt + context only),
    /// with the fused score kernel; the cache is sliced back after every chunk.
    pub fn reconstruction_scores(
        &self,
        cache: &mut GpuKvCache,
        prompt: &PromptIds,
        context_ids: &[u32],
        chunk: usize,
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<ContextScores> {
        let s = self.spec();
        let n_ctx = context_ids.len();
        let n_sys = prompt.system_ids.len();
        let inputs = reconstruction_inputs(
            context_ids,
            &prompt.postfix_ids,
            &prompt.repeat_first_ids,
            &prompt.repeat_next_ids,
            chunk,
        )
        .map_err(|e| ModelError::Input(e.to_string()))?;
        let longest = inputs.iter().map(|c| c.input_ids.len()).max().unwrap_or(0);
        self.check_length(cache, longest)?;
        cache.reserve(&self.gpu, longest)?;
        let layer_heads = self.scored_layer_heads();
        let mut hook = ScoreHook {
            scores: layer_heads
                .iter()
                .map(|h| h.map(|n| self.gpu.zeros::<f32>(n * n_ctx)).transpose())
                .collect::<std::result::Result<Vec<_>, _>>()?,
            row_lse: self.gpu.alloc::<f32>(s.n_heads * longest)?,
            n_sys,
            n_ctx,
            chunk_start: 0,
            chunk_len: 0,
            group: s.group(),
            head_dim: s.head_dim,
        };
        for (i, input) in inputs.iter().enumerate() {
            let mark = cache.mark();
            hook.chunk_start = input.ctx_range.start;
            hook.chunk_len = input.ctx_range.len();
            let res = self.forward(&input.input_ids, cache, LogitsMode::None, Some(&mut hook));
            cache.rollback(&self.gpu, &mark)?;
            res?;
            progress("score", i + 1, inputs.len());
        }
        let layers = hook
            .scores
            .iter()
            .zip(&layer_heads)
            .map(|(buf, heads)| match (buf, heads) {
                (Some(b), Some(n)) => Ok(Some(LayerScores {
                    n_heads: *n,
                    values: self.gpu.download(b)?,
                })),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        ContextScores::from_layers(n_ctx, layers).map_err(score_err)
    }
}

/// Runs the fused score kernel in every scored layer.
struct ScoreHook {
    scores: Vec<Option<CudaSlice<f32>>>,
    row_lse: CudaSlice<f32>,
    n_sys: usize,
    n_ctx: usize,
    chunk_start: usize,
    chunk_len: usize,
    group: usize,
    head_dim: usize,
}

impl GpuAttentionHook for ScoreHook {
    fn after_append(
        &mut self,
        gpu: &CudaBackend,
        layer: usize,
        q: &CudaViewMut<'_, bf16>,
        q_len: usize,
        cache: &GpuKvCache,
    ) -> Result<()> {
        let Some(scores) = self.scores[layer].as_mut() else {
            return Ok(());
        };
        let (lens, _, offsets) = cache.layer_meta(layer);
        let shape = ScoreChunkShape {
            n_in: q_len,
            n_kv_heads: cache.n_kv,
            group: self.group,
            head_dim: self.head_dim,
            n_sys: self.n_sys,
            chunk_start: self.n_sys + self.chunk_start,
            chunk_len: self.chunk_len,
            score_stride: self.n_ctx,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        };
        gpu.score_chunk(
            q,
            &cache.layers[layer].k,
            &offsets,
            &lens,
            &shape,
            &mut self.row_lse,
            scores,
        )?;
        Ok(())
    }
}

impl GpuContextCache {
    /// Valid context K/V bytes (bf16) of the live cache over the scored layers, system prompt
    /// and later turns excluded.
    pub fn kv_bytes_context(&self) -> usize {
        context_bytes(&self.cache, &self.layer_heads, self.n_sys, self.n_ctx)
    }

    /// Keeps a `ratio` of the context pairs per `level` (same selection as the CPU engine) and
    /// compacts on the device: in place for evict, a compacted view of the kept full cache for
    /// retain (re-prunable).
    pub fn prune(&mut self, gpu: &CudaBackend, ratio: f64, level: Level) -> Result<PruneReport> {
        let selection = select_for_prune(
            ratio,
            level,
            self.pruned && self.kv_type == KvType::Evict,
            self.head_scores.as_ref(),
            self.scores.as_ref(),
            self.n_ctx,
            &self.layer_heads,
        )?;
        let source = self.full.as_ref().unwrap_or(&self.cache);
        let kv_bytes_full = context_bytes(source, &self.layer_heads, self.n_sys, self.n_ctx);
        let compacted = source.compacted(gpu, &selection.mask, self.n_sys)?;
        if self.kv_type == KvType::Retain && self.full.is_none() {
            self.full = Some(std::mem::replace(&mut self.cache, compacted));
        } else {
            self.cache = compacted;
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

    /// Answers `query_ids` from the cache; with `update_cache = false` the cache is sliced back
    /// to exactly its state before the query.
    pub fn answer(
        &mut self,
        engine: &GpuEngine,
        query_ids: &[u32],
        opts: &GenerateOptions,
        update_cache: bool,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        let mark = self.cache.mark();
        let out = engine.generate(&mut self.cache, query_ids, opts, false, on_token);
        if !update_cache || out.is_err() {
            self.cache.rollback(engine.gpu(), &mark)?;
        }
        out
    }
}

/// Context bytes over scored layers: per head, the valid rows minus the system prompt and the
/// turns appended after the context (`seen_tokens - n_sys - n_ctx`, the same for every head).
fn context_bytes(
    cache: &GpuKvCache,
    layer_heads: &[Option<usize>],
    n_sys: usize,
    n_ctx: usize,
) -> usize {
    let turns = cache.seen_tokens.saturating_sub(n_sys + n_ctx);
    let rows: usize = cache
        .layers
        .iter()
        .zip(layer_heads)
        .filter(|(_, h)| h.is_some())
        .flat_map(|(l, _)| l.lens.iter().map(|&len| len.saturating_sub(n_sys + turns)))
        .sum();
    rows * cache.head_dim * 2 * 2
}
