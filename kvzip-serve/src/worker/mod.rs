//! The engine worker: one OS thread owns the model, the device tier of compressed contexts and
//! the batch's suffix pool, and runs the scheduler loop (continuous batching). HTTP handlers
//! talk to it through [`WorkerHandle`] with [`Command`]s and get tokens back on per-request
//! channels.

mod sched;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kvzip_kernels::sampling::SamplingParams;
use kvzip_models::engine::kvzip::KvType;
use kvzip_models::engine::Engine;
use kvzip_score::Level;
use kvzip_templates::PromptIds;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::registry::HostTier;
use crate::store::ContextTimingsMs;

pub use sched::SchedulerConfig;

/// Why a completion ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (end of turn) or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a running request hears from the worker.
#[derive(Debug)]
pub enum GenEvent {
    /// The next generated token id.
    Token(u32),
    /// Generation ended normally.
    Done(FinishReason),
    /// The context was evicted from every in-process tier between lookup and admission; the
    /// handler fetches it again and resubmits.
    NeedContext,
    /// Generation failed.
    Failed(ApiError),
}

/// The compressed context a request continues.
#[derive(Clone)]
pub struct ContextRef {
    /// Context id.
    pub id: String,
    /// Its serialized cache, when the handler already holds it (the worker loads it if the
    /// context is not resident on the device).
    pub bytes: Option<Arc<Vec<u8>>>,
}

/// A completion to run.
pub struct GenJob {
    /// The shared context, or `None` for a plain chat completion.
    pub context: Option<ContextRef>,
    /// Tokens to feed (the formatted query).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Token ids that end generation (the model's end-of-turn ids).
    pub stop_tokens: Vec<u32>,
    /// Where tokens go; a closed channel cancels the request.
    pub events: tmpsc::UnboundedSender<GenEvent>,
    /// Set by the handler to stop generation early (stop string seen, client gone).
    pub cancel: Arc<AtomicBool>,
    /// When the request arrived.
    pub arrived: Instant,
    /// When it must be finished.
    pub deadline: Instant,
}

/// A context to compress.
pub struct CreateJob {
    /// Id the context will have.
    pub id: String,
    /// Context token ids (without the system prompt).
    pub context_ids: Vec<u32>,
    /// Fraction of context KV pairs kept, in `(0, 1]`.
    pub ratio: f64,
    /// Selection level.
    pub level: Level,
    /// Evict (the served kind).
    pub kv_type: KvType,
    /// When it must be finished.
    pub deadline: Instant,
    /// The result.
    pub reply: oneshot::Sender<Result<Created, ApiError>>,
}

/// A compressed context, serialized for the host tier and the store.
pub struct Created {
    /// The cache in the file format ([`kvzip_cache::KvCache::to_bytes`]).
    pub bytes: Vec<u8>,
    /// System-prompt tokens.
    pub n_sys: usize,
    /// Context tokens.
    pub n_ctx: usize,
    /// Kept / total context pairs.
    pub ratio_real: f64,
    /// Context KV bytes before pruning.
    pub kv_bytes_full: usize,
    /// Context KV bytes kept.
    pub kv_bytes_kept: usize,
    /// Prefill, scoring and prune time (decode steps run in between are not counted).
    pub timings: ContextTimingsMs,
}

/// Messages to the worker.
pub enum Command {
    /// Run a completion.
    Generate(Box<GenJob>),
    /// Compress a context.
    Create(Box<CreateJob>),
    /// Drop a context from the device tier (it was deleted).
    Forget(String),
    /// Finish queued and running work, then stop.
    Shutdown,
}

/// The handlers' side of the worker.
pub struct WorkerHandle {
    tx: mpsc::Sender<Command>,
    join: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl WorkerHandle {
    /// Starts the worker thread owning `engine`.
    pub fn spawn(
        engine: Engine,
        prompt: PromptIds,
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
        host: Arc<HostTier>,
    ) -> Result<Self, ApiError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name("kvzip-engine".into())
            .spawn(
                move || match sched::Scheduler::new(engine, prompt, config, metrics, host, rx) {
                    Ok(mut s) => {
                        let _ = ready_tx.send(Ok(()));
                        s.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            )
            .map_err(|e| ApiError::internal(format!("cannot start the engine thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| ApiError::internal("the engine thread died while starting"))??;
        Ok(Self {
            tx,
            join: std::sync::Mutex::new(Some(join)),
        })
    }

    /// Sends a command; fails once the worker has stopped.
    pub fn send(&self, cmd: Command) -> Result<(), ApiError> {
        self.tx
            .send(cmd)
            .map_err(|_| ApiError::unavailable("the engine has stopped", 5))
    }

    /// Asks the worker to finish its work and waits for it (blocking).
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        let join = self.join.lock().ok().and_then(|mut j| j.take());
        if let Some(j) = join {
            let _ = j.join();
        }
    }
}
