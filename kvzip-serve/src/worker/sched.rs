//! The scheduler loop: admission by KV memory budget, prompt prefill of newly admitted
//! requests, one batched decode step over every running request per iteration (requests join
//! and leave at every step), the device tier of compressed contexts (LRU, pinned while a
//! request reads them) and context compression with decode steps interleaved between its
//! prefill and scoring chunks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvzip_cache::{CacheFileMeta, DeviceKv, KvCache};
use kvzip_kernels::{greedy_rows, TokenSampler};
use kvzip_models::batch::{BatchSeq, BatchStep, SuffixPool};
use kvzip_models::engine::kvzip::Scoring;
use kvzip_models::engine::Engine;
use kvzip_models::{LogitsMode, ModelError};
use kvzip_templates::PromptIds;

use super::{Command, ContextRef, CreateJob, Created, FinishReason, GenEvent, GenJob};
use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::registry::HostTier;
use crate::store::ContextTimingsMs;

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most requests decoding together (suffix pool slots).
    pub max_batch: usize,
    /// Rows of private KV reserved per slot (query + generated tokens).
    pub max_suffix_tokens: usize,
    /// Device KV budget, bytes: resident contexts + suffix pool + a context being compressed.
    pub device_kv_budget: usize,
    /// Model identity; contexts of other models are refused.
    pub model_id: String,
    /// Reconstruction chunk, context tokens.
    pub scoring_chunk: usize,
    /// Most prompt tokens prefilled between two decode steps.
    pub prefill_tokens_per_step: usize,
}

/// A compressed context on the device.
struct Resident {
    cache: KvCache,
    bytes: usize,
    last_used: u64,
    pins: usize,
}

/// A request in the decode batch.
struct Running {
    job: Box<GenJob>,
    slot: usize,
    context: Option<String>,
    /// Last sampled token (fed at the next step).
    next: u32,
    generated: usize,
    sampler: TokenSampler,
}

/// Everything the loop mutates besides the engine.
struct State {
    pool: SuffixPool,
    empty: KvCache,
    contexts: HashMap<String, Resident>,
    running: Vec<Running>,
    queue: VecDeque<Box<GenJob>>,
    creates: VecDeque<Box<CreateJob>>,
    /// Device bytes held by a context being compressed.
    creating_bytes: usize,
    tick: u64,
    shutting_down: bool,
    token_bytes: usize,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
    host: Arc<HostTier>,
    rx: Receiver<Command>,
    window: (Instant, u64),
}

/// The worker's loop and its state.
pub(super) struct Scheduler {
    engine: Engine,
    prompt: PromptIds,
    state: State,
}

fn engine_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("engine: {e}"))
}

/// Model errors about the input (too long for the model, ...) are the client's `400`.
fn model_err(e: ModelError) -> ApiError {
    match e {
        ModelError::Input(m) => ApiError::invalid(m),
        other => engine_err(other),
    }
}

impl Scheduler {
    /// Allocates the suffix pool (`max_batch × max_suffix_tokens` rows), checked against the
    /// budget.
    pub(super) fn new(
        engine: Engine,
        prompt: PromptIds,
        cfg: SchedulerConfig,
        metrics: Arc<Metrics>,
        host: Arc<HostTier>,
        rx: Receiver<Command>,
    ) -> Result<Self, ApiError> {
        let dev = engine.device().clone();
        let pool = SuffixPool::new(&dev, engine.spec(), cfg.max_batch, cfg.max_suffix_tokens)
            .map_err(engine_err)?;
        if pool.bytes() >= cfg.device_kv_budget {
            return Err(ApiError::invalid(format!(
                "the suffix pool ({} slots x {} tokens = {} bytes) does not fit --kv-budget ({} bytes); \
                 raise --kv-budget or lower --max-batch / --max-suffix-tokens",
                cfg.max_batch,
                cfg.max_suffix_tokens,
                pool.bytes(),
                cfg.device_kv_budget
            )));
        }
        let empty = engine.new_cache().map_err(engine_err)?;
        metrics
            .device_kv_budget
            .store(cfg.device_kv_budget as u64, Relaxed);
        let token_bytes = pool.token_bytes();
        let state = State {
            pool,
            empty,
            contexts: HashMap::new(),
            running: Vec::new(),
            queue: VecDeque::new(),
            creates: VecDeque::new(),
            creating_bytes: 0,
            tick: 0,
            shutting_down: false,
            token_bytes,
            cfg,
            metrics,
            host,
            rx,
            window: (Instant::now(), 0),
        };
        state.publish();
        Ok(Self {
            engine,
            prompt,
            state,
        })
    }

    /// Runs until a shutdown command has been received and all work is done.
    pub(super) fn run(&mut self) {
        loop {
            let s = &mut self.state;
            if s.idle() {
                if s.shutting_down {
                    return;
                }
                s.metrics.tokens_per_second_milli.store(0, Relaxed);
                match s.rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(cmd) => s.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            s.drain();
            s.expire();
            if let Some(job) = s.creates.pop_front() {
                self.create(job);
            }
            let s = &mut self.state;
            s.admit(&self.engine);
            if s.running.is_empty() {
                // Waiting for memory (or for nothing): do not spin.
                if let Ok(cmd) = s.rx.recv_timeout(Duration::from_millis(5)) {
                    s.handle(cmd);
                }
                continue;
            }
            s.decode(&self.engine);
        }
    }

    /// Compresses one context (or puts the job back while the memory it needs is in use).
    /// Decode steps of the running batch continue between prefill and scoring chunks.
    fn create(&mut self, job: Box<CreateJob>) {
        let Self {
            engine,
            prompt,
            state,
        } = self;
        let n_sys = prompt.system_ids.len();
        let n_ctx = job.context_ids.len();
        let need = (n_sys + n_ctx + 2 * state.cfg.scoring_chunk + 512) * state.token_bytes;
        if !state.make_room(need) {
            if state.running.is_empty() && state.creating_bytes == 0 {
                let msg = format!(
                    "compressing {n_ctx} context tokens needs about {need} bytes of device KV memory, \
                     more than --kv-budget allows next to the suffix pool; raise --kv-budget or send a shorter context"
                );
                let _ = job.reply.send(Err(ApiError::too_large(msg)));
            } else {
                state.creates.push_front(job);
            }
            return;
        }
        state.creating_bytes = need;
        state.publish();
        let scoring = if job.ratio < 1.0 {
            Scoring::Reconstruct {
                chunk: state.cfg.scoring_chunk,
            }
        } else {
            Scoring::None
        };
        let mut stolen = [Duration::ZERO; 2];
        let result = engine.prefill_context(
            prompt,
            &job.context_ids,
            &scoring,
            job.kv_type,
            &mut |stage, _, _| {
                let t0 = Instant::now();
                state.drain();
                state.admit(engine);
                state.decode(engine);
                stolen[usize::from(stage != "prefill")] += t0.elapsed();
            },
        );
        let out = result.map_err(model_err).and_then(|mut ctx| {
            let t0 = Instant::now();
            let full = ctx.kv_bytes_context();
            let (ratio_real, kept) = if job.ratio < 1.0 {
                let r = ctx
                    .prune(job.ratio, job.level)
                    .map_err(|e| ApiError::invalid(e.to_string()))?;
                (r.ratio_real, r.kv_bytes_kept)
            } else {
                (1.0, full)
            };
            engine.device().synchronize().map_err(engine_err)?;
            let prune_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut meta = CacheFileMeta {
                model_id: state.cfg.model_id.clone(),
                ratio_requested: Some(job.ratio),
                ratio_real: Some(ratio_real),
                level: Some(job.level.to_string()),
                token_ids: ctx.prefill_ids.clone(),
                extra: Default::default(),
            };
            meta.extra.insert("kv_bytes_full".into(), full.to_string());
            meta.extra.insert("task".into(), "qa".into());
            let bytes = ctx
                .cache
                .to_bytes(&job.id, &meta)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let timings = ContextTimingsMs {
                prefill: (ctx.timings.prefill_ms - ms(stolen[0])).max(0.0),
                scoring: (ctx.timings.scoring_ms - ms(stolen[1])).max(0.0),
                prune: prune_ms,
            };
            Ok((
                ctx.cache,
                Created {
                    bytes,
                    n_sys: ctx.n_sys,
                    n_ctx: ctx.n_ctx,
                    ratio_real,
                    kv_bytes_full: full,
                    kv_bytes_kept: kept,
                    timings,
                },
            ))
        });
        state.creating_bytes = 0;
        let reply = match out {
            Ok((cache, created)) => {
                let m = &state.metrics;
                m.contexts_created_total.fetch_add(1, Relaxed);
                m.prefill_micros_total
                    .fetch_add((created.timings.prefill * 1e3) as u64, Relaxed);
                m.scoring_micros_total
                    .fetch_add((created.timings.scoring * 1e3) as u64, Relaxed);
                // Keep it resident when it fits without evicting anything.
                let bytes = cache.bytes();
                if state.device_bytes() + bytes <= state.cfg.device_kv_budget {
                    state.tick += 1;
                    state.contexts.insert(
                        job.id.clone(),
                        Resident {
                            cache,
                            bytes,
                            last_used: state.tick,
                            pins: 0,
                        },
                    );
                }
                Ok(created)
            }
            Err(e) => Err(e),
        };
        state.publish();
        let _ = job.reply.send(reply);
    }
}

impl State {
    fn idle(&self) -> bool {
        self.running.is_empty() && self.queue.is_empty() && self.creates.is_empty()
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Generate(job) => self.queue.push_back(job),
            Command::Create(job) => self.creates.push_back(job),
            Command::Forget(id) => {
                if self.contexts.get(&id).is_some_and(|r| r.pins == 0) {
                    self.contexts.remove(&id);
                    self.publish();
                }
            }
            Command::Shutdown => self.shutting_down = true,
        }
    }

    fn drain(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            self.handle(cmd);
        }
    }

    /// Fails queued jobs whose deadline passed or whose client is gone.
    fn expire(&mut self) {
        let now = Instant::now();
        let metrics = self.metrics.clone();
        self.queue.retain(|job| {
            let gone = job.events.is_closed() || job.cancel.load(SeqCst);
            if gone || now >= job.deadline {
                metrics.queue_depth.fetch_sub(1, Relaxed);
                if !gone {
                    metrics.failed_total.fetch_add(1, Relaxed);
                    let _ = job.events.send(GenEvent::Failed(ApiError::timeout(
                        "the request waited in the queue past the request timeout (--request-timeout)",
                    )));
                }
                return false;
            }
            true
        });
        self.creates.retain(|job| now < job.deadline);
    }

    fn device_bytes(&self) -> usize {
        self.contexts.values().map(|r| r.bytes).sum::<usize>()
            + self.pool.bytes()
            + self.creating_bytes
    }

    /// Evicts unpinned contexts, least recently used first, until `need` more bytes fit the
    /// budget; `false` if they cannot.
    fn make_room(&mut self, need: usize) -> bool {
        loop {
            if self.device_bytes() + need <= self.cfg.device_kv_budget {
                return true;
            }
            let victim = self
                .contexts
                .iter()
                .filter(|(_, r)| r.pins == 0)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(id, _)| id.clone());
            match victim {
                Some(id) => {
                    self.contexts.remove(&id);
                }
                None => return false,
            }
        }
    }

    /// Publishes the memory gauges.
    fn publish(&self) {
        self.metrics
            .set_device_kv(self.device_bytes(), self.pool.bytes(), self.contexts.len());
        self.metrics
            .batch_size
            .store(self.running.len() as u64, Relaxed);
    }

    /// Makes `ctx` resident (loading it from the bytes the handler sent or from the host
    /// tier). `Ok(false)`: not enough memory now.
    fn ensure_resident(
        &mut self,
        dev: &kvzip_kernels::Device,
        ctx: &ContextRef,
    ) -> Result<bool, GenEvent> {
        self.tick += 1;
        if let Some(r) = self.contexts.get_mut(&ctx.id) {
            r.last_used = self.tick;
            return Ok(true);
        }
        let bytes = match ctx.bytes.clone().or_else(|| self.host.get(&ctx.id)) {
            Some(b) => b,
            None => return Err(GenEvent::NeedContext),
        };
        if !self.make_room(bytes.len()) {
            return Ok(false);
        }
        let (cache, meta) = KvCache::from_bytes_in(DeviceKv::new(dev.clone()), &ctx.id, &bytes)
            .map_err(|e| GenEvent::Failed(ApiError::internal(format!("loading context: {e}"))))?;
        if meta.model_id != self.cfg.model_id {
            return Err(GenEvent::Failed(ApiError::not_found(
                format!(
                    "context {} was compressed by model {}, this server runs {}",
                    ctx.id, meta.model_id, self.cfg.model_id
                ),
                "context_not_found",
            )));
        }
        let bytes = cache.bytes();
        self.contexts.insert(
            ctx.id.clone(),
            Resident {
                cache,
                bytes,
                last_used: self.tick,
                pins: 0,
            },
        );
        Ok(true)
    }

    /// Moves queued jobs into the batch while slots, memory and the prefill allowance last;
    /// each admitted job's query is prefilled and its first token sampled.
    fn admit(&mut self, engine: &Engine) {
        let dev = engine.device().clone();
        let mut prefilled = 0;
        while let Some(job) = self.queue.front() {
            if self.pool.in_use() == self.pool.n_slots()
                || prefilled >= self.cfg.prefill_tokens_per_step
            {
                break;
            }
            let ctx = job.context.clone();
            if let Some(c) = &ctx {
                match self.ensure_resident(&dev, c) {
                    Ok(true) => {}
                    Ok(false) => {
                        if self.running.is_empty() && self.creating_bytes == 0 {
                            let job = self.pop_front();
                            let need = c.bytes.as_ref().map_or(0, |b| b.len());
                            self.finish_unadmitted(&job, GenEvent::Failed(ApiError::too_large(format!(
                                "context {} needs {need} bytes of device KV memory, more than --kv-budget allows next to the suffix pool",
                                c.id
                            ))));
                            continue;
                        }
                        break;
                    }
                    Err(ev) => {
                        let job = self.pop_front();
                        self.finish_unadmitted(&job, ev);
                        continue;
                    }
                }
            }
            let job = self.pop_front();
            let Some(slot) = self.pool.acquire() else {
                self.queue.push_front(job);
                self.metrics.queue_depth.fetch_add(1, Relaxed);
                break;
            };
            prefilled += job.prompt.len();
            match self.start(engine, job, slot, ctx.map(|c| c.id)) {
                Ok(()) => {}
                Err((job, e)) => {
                    let _ = self.pool.release(slot);
                    self.finish_unadmitted(&job, GenEvent::Failed(e));
                }
            }
        }
        self.publish();
    }

    fn pop_front(&mut self) -> Box<GenJob> {
        self.metrics.queue_depth.fetch_sub(1, Relaxed);
        self.queue.pop_front().expect("queue checked non-empty")
    }

    fn finish_unadmitted(&self, job: &GenJob, ev: GenEvent) {
        if matches!(ev, GenEvent::Failed(_)) {
            self.metrics.failed_total.fetch_add(1, Relaxed);
        }
        let _ = job.events.send(ev);
    }

    /// Prefills `job`'s query in `slot` on its context and emits its first token.
    fn start(
        &mut self,
        engine: &Engine,
        job: Box<GenJob>,
        slot: usize,
        context: Option<String>,
    ) -> Result<(), (Box<GenJob>, ApiError)> {
        let dev = engine.device().clone();
        let mut sampler = match TokenSampler::new(job.sampling) {
            Ok(s) => s,
            Err(e) => return Err((job, ApiError::invalid(e.to_string()))),
        };
        let ctx_cache = match &context {
            Some(id) => match self.contexts.get(id) {
                Some(r) => &r.cache,
                None => return Err((job, ApiError::internal("context vanished"))),
            },
            None => &self.empty,
        };
        let seqs = vec![BatchSeq {
            context: ctx_cache,
            slot,
        }];
        let mut step = BatchStep::new(&mut self.pool, seqs, job.prompt.len(), None);
        let first = engine
            .forward_step(&job.prompt, &mut step, LogitsMode::Last)
            .and_then(|l| l.ok_or_else(|| ModelError::Input("no logits".into())))
            .map_err(model_err)
            .and_then(|mut logits| sampler.next(&dev, &mut logits, 0).map_err(engine_err));
        let first = match first {
            Ok(t) => t,
            Err(e) => return Err((job, e)),
        };
        if let Some(id) = &context {
            if let Some(r) = self.contexts.get_mut(id) {
                r.pins += 1;
            }
        }
        self.metrics.observe_ttft(job.arrived.elapsed());
        self.metrics
            .prompt_tokens_total
            .fetch_add(job.prompt.len() as u64, Relaxed);
        self.running.push(Running {
            job,
            slot,
            context,
            next: first,
            generated: 0,
            sampler,
        });
        let i = self.running.len() - 1;
        if self.emit(i, first) {
            self.retire(i);
        }
        Ok(())
    }

    /// Sends token `tok` of running request `i`; `true` when the request is finished.
    fn emit(&mut self, i: usize, tok: u32) -> bool {
        let r = &mut self.running[i];
        r.next = tok;
        r.generated += 1;
        self.metrics.generated_tokens_total.fetch_add(1, Relaxed);
        self.window.1 += 1;
        let job = &r.job;
        if job.events.send(GenEvent::Token(tok)).is_err() || job.cancel.load(SeqCst) {
            return true;
        }
        let done = if job.stop_tokens.contains(&tok) {
            Some(GenEvent::Done(FinishReason::Stop))
        } else if r.generated >= job.max_tokens {
            Some(GenEvent::Done(FinishReason::Length))
        } else if Instant::now() >= job.deadline {
            self.metrics.failed_total.fetch_add(1, Relaxed);
            Some(GenEvent::Failed(ApiError::timeout(
                "the request ran past the request timeout (--request-timeout)",
            )))
        } else {
            None
        };
        match done {
            Some(ev) => {
                let _ = job.events.send(ev);
                true
            }
            None => false,
        }
    }

    /// Removes running request `i` from the batch: frees its slot and unpins its context.
    fn retire(&mut self, i: usize) {
        let r = self.running.swap_remove(i);
        let _ = self.pool.release(r.slot);
        if let Some(id) = &r.context {
            if let Some(c) = self.contexts.get_mut(id) {
                c.pins = c.pins.saturating_sub(1);
            }
        }
    }

    /// One decode step of every running request: one forward over the whole batch (each
    /// sequence attends to its shared context and its private suffix), one token each.
    fn decode(&mut self, engine: &Engine) {
        if self.running.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let dev = engine.device().clone();
        let ids: Vec<u32> = self.running.iter().map(|r| r.next).collect();
        let seqs: Vec<BatchSeq<'_>> = self
            .running
            .iter()
            .map(|r| BatchSeq {
                context: r
                    .context
                    .as_ref()
                    .and_then(|id| self.contexts.get(id))
                    .map_or(&self.empty, |c| &c.cache),
                slot: r.slot,
            })
            .collect();
        let b = seqs.len();
        let mut step = BatchStep::new(&mut self.pool, seqs, 1, None);
        let sampled = engine
            .forward_step(&ids, &mut step, LogitsMode::All)
            .and_then(|l| l.ok_or_else(|| ModelError::Input("no logits".into())))
            .map_err(engine_err)
            .and_then(|mut logits| {
                if self.running.iter().all(|r| r.sampler.is_greedy()) {
                    return greedy_rows(&dev, &mut logits, b).map_err(engine_err);
                }
                let vocab = logits.len() / b;
                let mut out = Vec::with_capacity(b);
                for (i, r) in self.running.iter_mut().enumerate() {
                    let mut row = logits
                        .slice_mut(i * vocab..(i + 1) * vocab)
                        .map_err(engine_err)?;
                    out.push(
                        r.sampler
                            .next_in(&dev, &mut row, r.generated as u64)
                            .map_err(engine_err)?,
                    );
                }
                Ok(out)
            });
        match sampled {
            Ok(tokens) => {
                let mut finished = Vec::new();
                for (i, tok) in tokens.into_iter().enumerate() {
                    if self.emit(i, tok) {
                        finished.push(i);
                    }
                }
                for i in finished.into_iter().rev() {
                    self.retire(i);
                }
            }
            Err(e) => {
                // A failed step leaves every suffix in an unknown state: end them all.
                while !self.running.is_empty() {
                    let _ = self.running[0].job.events.send(GenEvent::Failed(e.clone()));
                    self.metrics.failed_total.fetch_add(1, Relaxed);
                    self.retire(0);
                }
            }
        }
        let m = &self.metrics;
        m.decode_steps_total.fetch_add(1, Relaxed);
        m.decode_micros_total
            .fetch_add(t0.elapsed().as_micros() as u64, Relaxed);
        let elapsed = self.window.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let tps = self.window.1 as f64 / elapsed.as_secs_f64();
            m.tokens_per_second_milli.store((tps * 1e3) as u64, Relaxed);
            self.window = (Instant::now(), 0);
        }
        self.publish();
    }
}
