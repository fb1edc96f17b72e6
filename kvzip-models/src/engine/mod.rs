//! The runtime, written once for every device: chunked prefill into the per-head KV cache and
//! greedy or sampled generation; [`kvzip`] adds context scoring, pruning and query answering.

mod hooks;
pub mod kvzip;

use std::path::Path;
use std::sync::Mutex;

use kvzip_cache::KvCache;
use kvzip_kernels::sampling::SamplingParams;
use kvzip_kernels::{Device, Tensor, TokenSampler};

use crate::config::ModelSpec;
use crate::error::{ModelError, Result};
use crate::model::{AttentionHook, CausalLm, ForwardOptions, LogitsMode, Scratch, StepKv};

/// Default prefill chunk in tokens (the reference uses 16000 on GPU; smaller chunks bound the
/// activation memory without changing results).
pub const DEFAULT_PREFILL_CHUNK: usize = 4096;

/// How to pick each generated token.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Maximum number of tokens to generate.
    pub max_new_tokens: usize,
    /// Sampling; `temperature == 0` means greedy argmax.
    pub sampling: SamplingParams,
    /// Generation stops after emitting any of these ids (defaults to the model's EOS ids).
    pub stop_tokens: Vec<u32>,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`, stopping at the model's EOS ids.
    pub fn greedy(spec: &ModelSpec, max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 0,
            },
            stop_tokens: spec.eos_token_ids.clone(),
        }
    }
}

/// Result of a generation.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// Generated ids, including a final stop token if one was produced.
    pub tokens: Vec<u32>,
    /// Whether generation ended on a stop token (vs the length limit or the callback).
    pub stopped: bool,
    /// Logits of every generation step (`[vocab]` each) when requested.
    pub step_logits: Vec<Vec<f32>>,
}

/// A loaded model on one device plus run-time settings.
pub struct Engine {
    model: Box<dyn CausalLm>,
    scratch: Mutex<Scratch>,
    /// Tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Keys per work item of the CUDA decode plans (`None`: the planner's default).
    pub decode_chunk_keys: Option<usize>,
}

impl Engine {
    /// Wraps a loaded model.
    pub fn new(model: Box<dyn CausalLm>) -> Self {
        Self {
            model,
            scratch: Mutex::new(Scratch::default()),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            decode_chunk_keys: None,
        }
    }

    /// Loads the model directory `dir` (config.json + safetensors) on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, &Device::Cpu)
    }

    /// Loads the model directory `dir` onto `device` (weights converted per tensor straight
    /// from the memory-mapped checkpoint into the device's compute type).
    pub fn load_on(dir: &Path, device: &Device) -> Result<Self> {
        Ok(Self::new(crate::models::load_model_dir_on(dir, device)?))
    }

    /// A model of `spec`'s architecture and shapes with seeded random weights on `device`
    /// (benchmarks: speed does not depend on weight values).
    pub fn random(spec: ModelSpec, device: &Device, seed: u64) -> Result<Self> {
        spec.check_fits(device)?;
        Ok(Self::new(crate::models::random_model(spec, device, seed)?))
    }

    /// The model description.
    pub fn spec(&self) -> &ModelSpec {
        self.model.spec()
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// The model itself.
    pub fn model(&self) -> &dyn CausalLm {
        self.model.as_ref()
    }

    /// An empty KV cache on the model's device (grows on demand).
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_cache_with_capacity(0)
    }

    /// An empty KV cache with `rows` rows reserved per head (no re-layout until exceeded).
    pub fn new_cache_with_capacity(&self, rows: usize) -> Result<KvCache> {
        let s = self.spec();
        Ok(KvCache::on_device(
            self.device(),
            &vec![(s.n_kv_heads, s.head_dim); s.n_layers()],
            rows,
        )?)
    }

    /// Checks that `extra` more tokens fit the model's position range.
    pub(crate) fn check_length(&self, cache: &KvCache, extra: usize) -> Result<()> {
        self.spec().check_length(cache.seen_tokens(), extra)
    }

    /// One forward call of `ids` (see [`CausalLm::forward`]): logits stay on the device.
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        logits: LogitsMode,
        hook: Option<&mut dyn AttentionHook>,
    ) -> Result<Option<Tensor>> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.model.forward(
            ids,
            cache,
            &mut scratch,
            ForwardOptions {
                logits,
                hook,
                decode_chunk_keys: self.decode_chunk_keys,
            },
        )
    }

    /// One forward call of `ids` over any [`StepKv`] (e.g. a [`crate::batch::BatchStep`] of
    /// many sequences on shared contexts); logits stay on the device.
    pub fn forward_step(
        &self,
        ids: &[u32],
        step: &mut dyn StepKv,
        logits: LogitsMode,
    ) -> Result<Option<Tensor>> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.model.forward_step(
            ids,
            step,
            &mut scratch,
            ForwardOptions {
                logits,
                hook: None,
                decode_chunk_keys: self.decode_chunk_keys,
            },
        )
    }

    /// Runs `ids` through the model in chunks of [`Engine::prefill_chunk`], appending to `cache`,
    /// then commits (trims sliding-window layers). Returns logits per `mode` on the host (`All`
    /// concatenates every chunk's rows).
    pub fn prefill(&self, cache: &mut KvCache, ids: &[u32], mode: LogitsMode) -> Result<Vec<f32>> {
        self.prefill_with(cache, ids, mode, &mut |_, _| {})
    }

    /// [`Engine::prefill`] with a progress callback `(done_tokens, total_tokens)`.
    pub fn prefill_with(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        mode: LogitsMode,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        let out = self.feed(cache, ids, mode, progress)?;
        self.commit_windows(cache)?;
        Ok(out)
    }

    /// Chunked forward of `ids` without committing (the rows can still be rolled back); logits
    /// per `mode` on the host.
    pub fn feed(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        mode: LogitsMode,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.feed_chunks(cache, ids, mode, None, progress, &mut |logits| {
            out.extend(self.device().to_host_f32(&logits.view())?);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Engine::feed`] with an optional attention hook called in every layer of every chunk,
    /// returning the last chunk's logits on the device.
    pub fn feed_observed(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        mode: LogitsMode,
        hook: Option<&mut dyn AttentionHook>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Option<Tensor>> {
        let mut last = None;
        self.feed_chunks(cache, ids, mode, hook, progress, &mut |logits| {
            last = Some(logits);
            Ok(())
        })?;
        Ok(last)
    }

    /// The chunk loop: `sink` receives each chunk's logits (`All`: every chunk; `Last`: the
    /// final chunk's last row).
    fn feed_chunks(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        mode: LogitsMode,
        mut hook: Option<&mut dyn AttentionHook>,
        progress: &mut dyn FnMut(usize, usize),
        sink: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        if ids.is_empty() {
            return Err(ModelError::Input("prefill called with no tokens".into()));
        }
        self.check_length(cache, ids.len())?;
        let chunk = self.prefill_chunk.max(1);
        let n_chunks = ids.len().div_ceil(chunk);
        for (i, piece) in ids.chunks(chunk).enumerate() {
            let last = i + 1 == n_chunks;
            let piece_mode = match mode {
                LogitsMode::All => LogitsMode::All,
                LogitsMode::Last if last => LogitsMode::Last,
                _ => LogitsMode::None,
            };
            let hook = hook.as_mut().map(|h| &mut **h as &mut dyn AttentionHook);
            if let Some(logits) = self.forward(piece, cache, piece_mode, hook)? {
                sink(logits)?;
            }
            progress(((i + 1) * chunk).min(ids.len()), ids.len());
        }
        Ok(())
    }

    /// Drops rows that sliding-window layers can never attend to again (keeps `window - 1`,
    /// freeing the memory). Called only at commit points (after prefill, after a kept turn),
    /// never inside a query that will be rolled back.
    pub fn commit_windows(&self, cache: &mut KvCache) -> Result<()> {
        for (l, layer) in self.spec().layers.iter().enumerate() {
            if let Some(w) = layer.window {
                cache.trim_front(l, w.saturating_sub(1))?;
            }
        }
        Ok(())
    }

    /// Feeds `prompt` and generates up to `opts.max_new_tokens` tokens, leaving the prompt and
    /// generated K/V in the cache (uncommitted: roll back with a [`kvzip_cache::CacheMark`] or
    /// call [`Engine::commit_windows`] to keep them). `on_token` sees each new id and may
    /// return `false` to stop early. When `keep_logits` is set, every step's logits are
    /// returned. Per token only the chosen id reaches the host (unless logits are kept or
    /// top-k / top-p need the row).
    pub fn generate(
        &self,
        cache: &mut KvCache,
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
        cache.reserve(prompt.len() + opts.max_new_tokens)?;
        let mut sampler = TokenSampler::new(opts.sampling)?;
        let dev = self.device().clone();
        let mut logits =
            self.feed_observed(cache, prompt, LogitsMode::Last, None, &mut |_, _| {})?;
        let mut gen = Generation::default();
        let mut prev = None;
        for step in 0..opts.max_new_tokens {
            if let Some(token) = prev {
                logits = self.forward(&[token], cache, LogitsMode::Last, None)?;
            }
            let row = logits
                .as_mut()
                .ok_or_else(|| ModelError::Input("forward returned no logits".into()))?;
            if keep_logits {
                gen.step_logits.push(dev.to_host_f32(&row.view())?);
            }
            let next = sampler.next(&dev, row, step as u64)?;
            gen.tokens.push(next);
            let go_on = on_token(next);
            if opts.stop_tokens.contains(&next) {
                gen.stopped = true;
                break;
            }
            if !go_on {
                break;
            }
            prev = Some(next);
        }
        Ok(gen)
    }
}
