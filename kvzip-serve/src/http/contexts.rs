//! Context endpoints (`/v1/contexts`), `/v1/models`, `/health` and `/metrics`.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kvzip_models::engine::kvzip::KvType;
use kvzip_score::Level;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{AppState, JsonBody, Owner};
use crate::api::{random_id, unix_now, ApiError, CreateContextRequest};
use crate::store::{sha256_hex, ContextInfo};
use crate::worker::{Command, CreateJob};

/// The public view of a context.
fn context_json(i: &ContextInfo) -> Value {
    json!({
        "id": i.id,
        "object": "context",
        "created": i.created,
        "model": i.model_id,
        "tokens": i.tokens,
        "ratio": i.ratio,
        "ratio_real": i.ratio_real,
        "level": i.level,
        "kv_type": i.kv_type,
        "kv_bytes_full": i.kv_bytes_full,
        "kv_bytes_kept": i.kv_bytes_kept,
        "size_bytes": i.size_bytes,
        "timings_ms": i.timings_ms,
    })
}

/// `POST /v1/contexts`: prefill, reconstruction scoring and pruning, once; the compressed
/// cache goes to the store and the host tier (and stays on the device while it fits).
pub async fn create(
    State(st): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    JsonBody(req): JsonBody<CreateContextRequest>,
) -> Result<Response, ApiError> {
    let _guard = st.enter(&owner)?;
    let ratio = req.ratio.unwrap_or(st.cfg.default_ratio);
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(ApiError::invalid_param(
            "ratio",
            format!("ratio {ratio} is outside (0, 1]: it is the fraction of context KV pairs kept"),
        ));
    }
    let level: Level = req
        .level
        .as_deref()
        .unwrap_or("pair")
        .parse()
        .map_err(|e: kvzip_score::ScoreError| ApiError::invalid_param("level", e.to_string()))?;
    match req.kv_type.as_deref().unwrap_or("evict") {
        "evict" => {}
        "retain" => {
            return Err(ApiError::invalid_param(
                "kv_type",
                "kv_type retain (full cache kept for re-pruning at other ratios) is not served: \
                 a served context is compressed once; use \"evict\", or `kvzip eval` for ratio sweeps",
            ))
        }
        other => {
            return Err(ApiError::invalid_param(
                "kv_type",
                format!("kv_type {other:?}: expected \"evict\""),
            ))
        }
    }
    let ids = st
        .prompter
        .context_ids(req.text.as_deref(), req.messages.as_deref())?;
    let limit = st.cfg.limits.max_context_tokens;
    if ids.len() > limit {
        return Err(ApiError::invalid_param(
            if req.text.is_some() { "text" } else { "messages" },
            format!(
                "the context has {} tokens, more than the server's limit of {limit} (--max-context-tokens)",
                ids.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let id = random_id("ctx-")?;
    let (tx, rx) = oneshot::channel();
    let timeout = st.cfg.limits.request_timeout;
    let n_ctx = ids.len();
    st.worker.send(Command::Create(Box::new(CreateJob {
        id: id.clone(),
        context_ids: ids,
        ratio,
        level,
        kv_type: KvType::Evict,
        deadline: Instant::now() + timeout,
        reply: tx,
    })))?;
    let created = match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
        Ok(Ok(r)) => r?,
        Ok(Err(_)) => {
            return Err(ApiError::timeout(
                "the context was not compressed within the request timeout (--request-timeout)",
            ))
        }
        Err(_) => return Err(ApiError::timeout("compressing the context timed out")),
    };
    let info = ContextInfo {
        id,
        owner: owner.0.clone(),
        model_id: st.cfg.model_id.clone(),
        created: unix_now(),
        tokens: n_ctx,
        n_sys: created.n_sys,
        ratio,
        ratio_real: created.ratio_real,
        level: level.to_string(),
        kv_type: "evict".into(),
        kv_bytes_full: created.kv_bytes_full,
        kv_bytes_kept: created.kv_bytes_kept,
        timings_ms: created.timings,
        size_bytes: created.bytes.len(),
        sha256: sha256_hex(&created.bytes),
    };
    st.contexts
        .put(info.clone(), Arc::new(created.bytes))
        .await?;
    Ok(Json(context_json(&info)).into_response())
}

/// `GET /v1/contexts`: this key's contexts.
pub async fn list(
    State(st): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
) -> Result<Json<Value>, ApiError> {
    let all = st.contexts.list(&owner.0).await?;
    Ok(Json(json!({
        "object": "list",
        "data": all.iter().map(context_json).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/contexts/{id}`.
pub async fn get_one(
    State(st): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let info = st.contexts.lookup(&id, &owner.0).await?;
    Ok(Json(context_json(&info)))
}

/// `DELETE /v1/contexts/{id}`: removed from the store and every tier of this server.
pub async fn delete(
    State(st): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    st.contexts.delete(&id, &owner.0).await?;
    st.worker.send(Command::Forget(id.clone()))?;
    Ok(Json(
        json!({"id": id, "object": "context.deleted", "deleted": true}),
    ))
}

/// `GET /v1/models`: the one served model.
pub async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_name,
            "object": "model",
            "created": st.started,
            "owned_by": "kvzip",
        }],
    }))
}

/// `GET /health` (no key needed): `200 {"status": "ok"}`, or `503` while draining.
pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    let draining = st.draining.load(SeqCst);
    let body = Json(json!({
        "status": if draining { "draining" } else { "ok" },
        "model": st.cfg.model_name,
        "device": st.device,
        "store": st.contexts.describe(),
    }));
    if draining {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        body.into_response()
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let store = st.contexts.store_stats().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(store),
    )
        .into_response()
}
