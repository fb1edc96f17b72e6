//! `kvzip serve`: an OpenAI-compatible HTTP server that compresses a long context once with
//! KVzip and answers many requests from the compressed cache at once.
//!
//! Architecture:
//! - [`http`]: axum routes (`/v1/contexts`, `/v1/chat/completions`, `/v1/models`, `/health`,
//!   `/metrics`), Bearer keys, body and per-key limits, server-sent events, SIGTERM drain.
//! - [`worker`]: one engine thread owning the model, the device tier of compressed contexts and
//!   the suffix pool; continuous batching — every decode step runs all running requests in one
//!   forward, each attending over its shared read-only context plus its private suffix
//!   ([`kvzip_models::batch`]), with admission by the device KV budget.
//! - [`registry`]: the host tier (serialized caches, LRU) and ownership checks in front of the
//!   [`store`] (a directory, or Redis shared by several servers).
//!
//! A request never changes the shared context: its query and answer live in its own slot.

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod store;
pub mod testing;
pub mod text;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use kvzip_models::engine::Engine;
use kvzip_templates::{PromptIds, Tokenizer};

pub use api::ApiError;
pub use config::{Budgets, Limits, ServeConfig};
pub use store::{open_store, ContextStore};

use crate::http::AppState;
use crate::metrics::Metrics;
use crate::registry::{Contexts, HostTier};
use crate::text::Prompter;
use crate::worker::{SchedulerConfig, WorkerHandle};

/// The model a server runs, with its text side.
pub struct ServedModel {
    /// The engine (any device).
    pub engine: Engine,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// KVzip prompt pieces of the QA task, as `kvzip run` uses them.
    pub prompt: PromptIds,
    /// Ids that end a turn (the model's EOS and end-of-turn tokens).
    pub stop_tokens: Vec<u32>,
}

/// A server ready to listen: the engine worker is running.
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    /// Starts the engine worker for `model` and wires the tiers over `store`.
    pub fn new(
        model: ServedModel,
        store: Box<dyn ContextStore>,
        cfg: ServeConfig,
    ) -> Result<Self, ApiError> {
        let ServedModel {
            engine,
            tokenizer,
            prompt,
            stop_tokens,
        } = model;
        let metrics = Arc::new(Metrics::default());
        let host = Arc::new(HostTier::new(cfg.budgets.host_cache_bytes, metrics.clone()));
        let device = engine.device().name();
        let sched = SchedulerConfig {
            max_batch: cfg.max_batch,
            max_suffix_tokens: cfg.limits.max_suffix_tokens,
            device_kv_budget: cfg.budgets.device_kv_bytes,
            model_id: cfg.model_id.clone(),
            scoring_chunk: cfg.scoring_chunk,
            prefill_tokens_per_step: 2048,
        };
        let worker =
            WorkerHandle::spawn(engine, prompt.clone(), sched, metrics.clone(), host.clone())?;
        let contexts = Contexts::new(
            Arc::from(store),
            host,
            cfg.model_id.clone(),
            metrics.clone(),
        );
        let prompter = Prompter {
            tokenizer: Arc::new(tokenizer),
            prompt,
            stop_tokens,
        };
        Ok(Self {
            state: Arc::new(AppState::new(
                cfg, worker, contexts, prompter, metrics, device,
            )),
        })
    }

    /// The router (for embedding in another axum app or for tests).
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves; then stops accepting, lets running
    /// requests finish (at most the configured drain timeout), and stops the engine.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let signalled = async move {
            shutdown.await;
            st.draining.store(true, SeqCst);
            eprintln!("kvzip serve: shutting down; finishing running requests");
            let _ = drain_tx.send(());
        };
        let app = http::router(state.clone());
        let server = axum::serve(listener, app).with_graceful_shutdown(signalled);
        let drain_timeout = state.cfg.drain_timeout;
        let deadline = async move {
            if drain_rx.await.is_ok() {
                tokio::time::sleep(drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let res = tokio::select! {
            r = server => r,
            _ = deadline => {
                eprintln!("kvzip serve: drain timeout reached; exiting with requests still running");
                Ok(())
            }
        };
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || st.worker.shutdown()).await;
        res
    }

    /// Binds `addr` and [`run`](Self::run)s until SIGTERM or Ctrl-C.
    pub async fn run_until_signal(self, addr: SocketAddr) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let st = &self.state;
        eprintln!(
            "kvzip serve: http://{} — model {} on {}, store {}, device KV budget {} bytes, batch {}",
            listener.local_addr()?,
            st.cfg.model_name,
            st.device,
            st.contexts.describe(),
            st.cfg.budgets.device_kv_bytes,
            st.cfg.max_batch
        );
        self.run(listener, shutdown_signal()).await
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
