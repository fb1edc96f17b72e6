//! The HTTP front: routes, authentication, body limits, per-key concurrency, and graceful
//! shutdown (SIGTERM stops accepting, running requests finish).

mod chat;
mod contexts;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::registry::{owner_of, Contexts};
use crate::text::Prompter;
use crate::worker::WorkerHandle;

/// Shared by every handler.
pub struct AppState {
    /// Settings.
    pub cfg: ServeConfig,
    /// The engine worker.
    pub worker: WorkerHandle,
    /// Context tiers and store.
    pub contexts: Contexts,
    /// Request text to ids.
    pub prompter: Prompter,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// SHA-256 of each accepted key.
    key_hashes: Vec<[u8; 32]>,
    /// Requests in flight per owner.
    in_flight: Mutex<HashMap<String, usize>>,
    /// Set once SIGTERM arrived: new requests get 503.
    pub draining: AtomicBool,
    /// `cpu` / `cuda:0`.
    pub device: String,
    /// Unix start time.
    pub started: u64,
}

impl AppState {
    /// State over a started worker.
    pub fn new(
        cfg: ServeConfig,
        worker: WorkerHandle,
        contexts: Contexts,
        prompter: Prompter,
        metrics: Arc<Metrics>,
        device: String,
    ) -> Self {
        let key_hashes = cfg
            .api_keys
            .iter()
            .map(|k| Sha256::digest(k.as_bytes()).into())
            .collect();
        Self {
            cfg,
            worker,
            contexts,
            prompter,
            metrics,
            key_hashes,
            in_flight: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            device,
            started: crate::api::unix_now(),
        }
    }

    /// Counts a request of `owner` in flight until the guard drops; `429` beyond the per-key
    /// limit.
    pub fn enter(self: &Arc<Self>, owner: &Owner) -> Result<InFlight, ApiError> {
        let mut m = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(owner.0.clone()).or_insert(0);
        if *n >= self.cfg.limits.max_concurrent_per_key {
            self.metrics
                .rejected_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError::too_many(
                format!(
                    "this key already has {} requests in flight (--max-concurrent-per-key); retry when one finishes",
                    *n
                ),
                "concurrency_limit",
                1,
            ));
        }
        *n += 1;
        Ok(InFlight {
            state: self.clone(),
            owner: owner.0.clone(),
        })
    }
}

/// A request counted against its key's concurrency limit.
pub struct InFlight {
    state: Arc<AppState>,
    owner: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self
            .state
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.owner);
            }
        }
    }
}

/// Who is asking: the owner tag of the request's key.
#[derive(Clone, Debug)]
pub struct Owner(pub String);

/// A JSON body parsed with OpenAI-style errors (`413` over the size limit, `400` naming the
/// field for malformed JSON).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(
                    "the request body is larger than the server accepts (--max-body-bytes)",
                )
            } else {
                ApiError::invalid(format!("cannot read the request body: {e}"))
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::invalid("the request needs a JSON body"));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

/// Checks the Bearer key (all routes but `/health`) and refuses new work while draining.
async fn gate(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/health" {
        return next.run(req).await;
    }
    let owner = if st.key_hashes.is_empty() {
        owner_of(None)
    } else {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(key) = given else {
            return ApiError::unauthorized(
                "missing API key: send the header `Authorization: Bearer <key>`",
            )
            .into_response();
        };
        let h: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Compare digests without early exit.
        let known = st.key_hashes.iter().fold(false, |acc, k| {
            acc | (k.iter().zip(&h).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0)
        });
        if !known {
            return ApiError::unauthorized("invalid API key").into_response();
        }
        owner_of(Some(key))
    };
    if st.draining.load(SeqCst) && path != "/metrics" {
        return ApiError::unavailable("the server is shutting down", 5).into_response();
    }
    req.extensions_mut().insert(Owner(owner));
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such endpoint; see /v1/chat/completions, /v1/contexts, /v1/models, /health, /metrics",
        "unknown_url",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid("this endpoint does not accept that method")
    }
}

/// The router with every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.limits.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/contexts", post(contexts::create).get(contexts::list))
        .route(
            "/v1/contexts/{id}",
            get(contexts::get_one).delete(contexts::delete),
        )
        .route("/v1/models", get(contexts::models))
        .route("/health", get(contexts::health))
        .route("/metrics", get(contexts::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
