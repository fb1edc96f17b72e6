//! The runtime: chunked prefill into the per-head KV cache, greedy or seeded sampling
//! generation; [`kvzip`] adds context scoring, pruning and query answering.

mod hooks;
pub mod kvzip;

use std::path::Path;

use kvzip_cache::KvCache;
use kvzip_kernels::sampling::{Sampler, SamplingParams};

use crate::config::ModelSpec;
use crate::error::{ModelError, Result};
use crate::model::{AttentionHook, CausalLm, ForwardOptions, LogitsMode};

/// Default prefill chunk in tokens (the reference uses 16000 on GPU; smaller chunks bound the
/// CPU activation memory without changing results).
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

/// A loaded model plus run-time settings.
pub struct Engine {
    model: Box<dyn CausalLm>,
    /// Tokens per prefill chunk.
    pub prefill_chunk: usize,
}

impl Engine {
    /// Wraps a loaded model.
    pub fn new(model: Box<dyn CausalLm>) -> Self {
        Self {
            model,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }

    /// Loads the model directory `dir` (config.json + safetensors) on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Ok(Self::new(crate::models::load_model_dir(dir)?))
    }

    /// The model description.
    pub fn spec(&self) -> &ModelSpec {
        self.model.spec()
    }

    /// The model itself.
    pub fn model(&self) -> &dyn CausalLm {
        self.model.as_ref()
    }

    /// An empty KV cache shaped for this model.
    pub fn new_cache(&self) -> Result<KvCache> {
        let s = self.spec();
        Ok(KvCache::uniform(s.n_layers(), s.n_kv_heads, s.head_dim)?)
    }

    /// Checks that `extra` more tokens fit the model's position range.
    pub(crate) fn check_length(&self, cache: &KvCache, extra: usize) -> Result<()> {
        self.spec().check_length(cache.seen_tokens(), extra)
    }

    /// Runs `ids` through the model in chunks of [`Engine::prefill_chunk`], appending to `cache`,
    /// then commits (trims sliding-window layers). Returns logits per `mode` (`All` concatenates
    /// every chunk's rows).
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

    /// Chunked forward of `ids` without committing (the rows can still be rolled back).
    pub fn feed(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        mode: LogitsMode,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        self.feed_observed(cache, ids, mode, None, progress)
    }

    /// [`Engine::feed`] with an optional attention hook called in every layer of every chunk.
    pub fn feed_observed(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        mode: LogitsMode,
        mut hook: Option<&mut dyn AttentionHook>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(ModelError::Input("prefill called with no tokens".into()));
        }
        self.check_length(cache, ids.len())?;
        let chunk = self.prefill_chunk.max(1);
        let n_chunks = ids.len().div_ceil(chunk);
        let mut out = Vec::new();
        for (i, piece) in ids.chunks(chunk).enumerate() {
            let last = i + 1 == n_chunks;
            let piece_mode = match mode {
                LogitsMode::All => LogitsMode::All,
                LogitsMode::Last if last => LogitsMode::Last,
                _ => LogitsMode::None,
            };
            let opts = ForwardOptions {
                logits: piece_mode,
                hook: hook.as_mut().map(|h| &mut **h as &mut dyn AttentionHook),
            };
            let logits = self.model.forward(piece, cache, opts)?;
            out.extend_from_slice(&logits);
            progress(((i + 1) * chunk).min(ids.len()), ids.len());
        }
        Ok(out)
    }

    /// Drops rows that sliding-window layers can never attend to again (keeps `window - 1`).
    /// Called only at commit points (after prefill, after a kept turn), never inside a query
    /// that will be rolled back.
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
    /// call [`Engine::commit_windows`] to keep them).
    /// `on_token` sees each new id and may return `false` to stop early.
    /// When `keep_logits` is set, every step's logits are returned.
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
        let mut sampler = Sampler::new(opts.sampling)?;
        let mut logits = self.feed(cache, prompt, LogitsMode::Last, &mut |_, _| {})?;
        decode_loop(opts, on_token, |_, prev| {
            if let Some(token) = prev {
                logits = self.model.forward(
                    &[token],
                    cache,
                    ForwardOptions::logits(LogitsMode::Last),
                )?;
            }
            let next = sampler.sample(&logits) as u32;
            Ok((next, keep_logits.then(|| std::mem::take(&mut logits))))
        })
    }
}

/// The token loop shared by the CPU and GPU engines. `step(i, prev)` feeds `prev` (the token
/// chosen at step `i - 1`; `None` at step 0, whose logits come from the prompt) and returns the
/// next token, with that step's logits when they are to be kept. Stops at a stop token (kept,
/// `stopped = true`), when `on_token` returns false, or after `max_new_tokens`; the last token
/// is never fed.
pub(crate) fn decode_loop(
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> bool,
    mut step: impl FnMut(usize, Option<u32>) -> Result<(u32, Option<Vec<f32>>)>,
) -> Result<Generation> {
    let mut gen = Generation::default();
    let mut prev = None;
    for i in 0..opts.max_new_tokens {
        let (next, logits) = step(i, prev)?;
        gen.step_logits.extend(logits);
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
