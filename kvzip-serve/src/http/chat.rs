//! `POST /v1/chat/completions`: validation, submission to the engine worker, and the
//! response as one JSON object or as server-sent events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::{self, Stream};
use kvzip_kernels::sampling::SamplingParams;
use kvzip_templates::{DecodeStream, Tokenizer};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{AppState, InFlight, JsonBody, Owner};
use crate::api::{random_id, unix_now, ApiError, ChatRequest, StopField, Usage};
use crate::text::StopMatcher;
use crate::worker::{Command, ContextRef, FinishReason, GenEvent, GenJob};

/// A validated request, ready to submit (again, if its context must be re-fetched).
struct Prepared {
    context: Option<ContextRef>,
    context_info: Option<crate::store::ContextInfo>,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    arrived: Instant,
    deadline: Instant,
}

/// Sets the cancel flag when the response (or its stream) is dropped: a client that goes away
/// frees its batch slot at the next step.
struct CancelOnDrop(Option<Arc<AtomicBool>>);

impl CancelOnDrop {
    fn new(flag: Arc<AtomicBool>) -> Self {
        Self(Some(flag))
    }

    /// Sets the flag now.
    fn cancel(&self) {
        if let Some(f) = &self.0 {
            f.store(true, SeqCst);
        }
    }

    /// Drops the guard without cancelling.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.cancel();
    }
}

fn validate(
    st: &AppState,
    req: &ChatRequest,
) -> Result<(usize, SamplingParams, Vec<String>), ApiError> {
    if req.model != st.cfg.model_name {
        return Err(ApiError::not_found(
            format!(
                "model {:?} is not served here; this server runs {:?} (GET /v1/models)",
                req.model, st.cfg.model_name
            ),
            "model_not_found",
        )
        .with_param("model"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param("n", "only n = 1 is served"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid_param(
            "logprobs",
            "logprobs are not served",
        ));
    }
    if req
        .tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::invalid_param("tools", "tools are not served"));
    }
    let limit = st.cfg.limits.max_tokens;
    let (param, asked) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match asked {
        None => limit,
        Some(m) if m >= 1 && (m as u64) <= limit as u64 => m as usize,
        Some(m) => {
            return Err(ApiError::invalid_param(
                param,
                format!("{param} = {m} is outside 1..={limit} (--max-tokens)"),
            ))
        }
    };
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("temperature {temperature} is outside [0, 2]"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("top_p {top_p} is outside (0, 1]"),
        ));
    }
    let seed = match req.seed {
        Some(s) => s as u64,
        None => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b)
                .map_err(|e| ApiError::internal(format!("the OS random source failed: {e}")))?;
            u64::from_le_bytes(b)
        }
    };
    let stops = match &req.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stops.len() > st.cfg.limits.max_stop {
        return Err(ApiError::invalid_param(
            "stop",
            format!("at most {} stop strings", st.cfg.limits.max_stop),
        ));
    }
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: 0,
        seed,
    };
    Ok((max_tokens, sampling, stops))
}

/// `POST /v1/chat/completions`.
pub async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    st.metrics.requests_total.fetch_add(1, Relaxed);
    let arrived = Instant::now();
    let (mut max_tokens, sampling, stops) = validate(&st, &req)?;
    let guard = st.enter(&owner)?;
    let (prompt, context_info) = match &req.context_id {
        Some(id) => {
            let info = st.contexts.lookup(id, &owner.0).await?;
            (st.prompter.query_ids(&req.messages)?, Some(info))
        }
        None => (st.prompter.chat_ids(&req.messages)?, None),
    };
    let room = st.cfg.limits.max_suffix_tokens.saturating_sub(prompt.len());
    let explicit = req.max_tokens.is_some() || req.max_completion_tokens.is_some();
    if room == 0 || (explicit && max_tokens > room) {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "the query has {} tokens and asks for {max_tokens} more: a request may hold {} tokens \
                 (--max-suffix-tokens); shorten the messages or lower max_tokens",
                prompt.len(),
                st.cfg.limits.max_suffix_tokens
            ),
        )
        .with_code("context_length_exceeded"));
    }
    max_tokens = max_tokens.min(room);
    let context = context_info.as_ref().map(|i| ContextRef {
        id: i.id.clone(),
        bytes: st.contexts.host.get(&i.id),
    });
    let p = Prepared {
        context,
        context_info,
        prompt,
        max_tokens,
        sampling,
        stops,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        arrived,
        deadline: arrived + st.cfg.limits.request_timeout,
    };
    let (rx, cancel, first) = submit_until_admitted(&st, &p).await?;
    let gen = Generation {
        rx,
        cancel: CancelOnDrop::new(cancel),
        _guard: guard,
        decoder: DecodeStream::new(st.prompter.tokenizer.clone(), true),
        stop: StopMatcher::new(p.stops.clone()),
        first: Some(first),
        completion_tokens: 0,
        deadline: p.deadline.into(),
        finished: false,
    };
    let id = random_id("chatcmpl-")?;
    let meta = ResponseMeta {
        id,
        created: unix_now(),
        model: st.cfg.model_name.clone(),
        prompt_tokens: p.prompt.len(),
    };
    if p.stream {
        Ok(stream_response(gen, meta, p.include_usage).into_response())
    } else {
        collect_response(gen, meta).await
    }
}

/// Queues the request (`429` when the queue is full) and waits for its first event; a
/// context evicted from every tier in between is fetched from the store and the request
/// resubmitted once.
async fn submit_until_admitted(
    st: &Arc<AppState>,
    p: &Prepared,
) -> Result<(mpsc::UnboundedReceiver<GenEvent>, Arc<AtomicBool>, GenEvent), ApiError> {
    let mut context = p.context.clone();
    for attempt in 0..2 {
        let depth = st.metrics.queue_depth.fetch_add(1, Relaxed);
        if depth as usize >= st.cfg.max_queue {
            st.metrics.queue_depth.fetch_sub(1, Relaxed);
            st.metrics.rejected_total.fetch_add(1, Relaxed);
            return Err(ApiError::too_many(
                format!(
                    "the request queue is full ({} waiting, --max-queue); retry shortly",
                    depth
                ),
                "queue_full",
                1,
            ));
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = GenJob {
            context: context.clone(),
            prompt: p.prompt.clone(),
            max_tokens: p.max_tokens,
            sampling: p.sampling,
            stop_tokens: st.prompter.stop_tokens.clone(),
            events: tx,
            cancel: cancel.clone(),
            arrived: p.arrived,
            deadline: p.deadline,
        };
        if let Err(e) = st.worker.send(Command::Generate(Box::new(job))) {
            st.metrics.queue_depth.fetch_sub(1, Relaxed);
            return Err(e);
        }
        let guard = CancelOnDrop::new(cancel.clone());
        let first = tokio::time::timeout_at(p.deadline.into(), rx.recv()).await;
        guard.disarm();
        let first = match first {
            Ok(Some(ev)) => ev,
            Ok(None) => return Err(ApiError::internal("the engine dropped the request")),
            Err(_) => {
                cancel.store(true, SeqCst);
                return Err(ApiError::timeout(
                    "no token within the request timeout (--request-timeout); the server is overloaded",
                ));
            }
        };
        match first {
            GenEvent::NeedContext if attempt == 0 => {
                let info = p
                    .context_info
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("context request without a context"))?;
                context = Some(ContextRef {
                    id: info.id.clone(),
                    bytes: Some(st.contexts.bytes(info).await?),
                });
            }
            GenEvent::NeedContext => {
                return Err(ApiError::unavailable(
                    "the context could not be kept in memory; retry",
                    1,
                ))
            }
            GenEvent::Failed(e) => return Err(e),
            ev => return Ok((rx, cancel, ev)),
        }
    }
    Err(ApiError::internal("unreachable: admission loop ended"))
}

/// What the response carries besides the text.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

/// One piece of a completion as the client sees it.
enum Piece {
    Text(String),
    End(FinishReason),
    Error(ApiError),
}

/// Turns the worker's token events into text pieces: detokenization, stop strings, deadline.
struct Generation {
    rx: mpsc::UnboundedReceiver<GenEvent>,
    cancel: CancelOnDrop,
    _guard: InFlight,
    decoder: DecodeStream<Arc<Tokenizer>>,
    stop: StopMatcher,
    first: Option<GenEvent>,
    completion_tokens: usize,
    deadline: tokio::time::Instant,
    finished: bool,
}

impl Generation {
    async fn next_piece(&mut self) -> Option<Piece> {
        if self.finished {
            return None;
        }
        loop {
            let ev = match self.first.take() {
                Some(ev) => ev,
                None => match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => {
                        self.finished = true;
                        return Some(Piece::Error(ApiError::internal(
                            "the engine ended the request without a result",
                        )));
                    }
                    Err(_) => {
                        self.finished = true;
                        return Some(Piece::Error(ApiError::timeout(
                            "the request ran past the request timeout (--request-timeout)",
                        )));
                    }
                },
            };
            match ev {
                GenEvent::Token(t) => {
                    self.completion_tokens += 1;
                    let delta = match self.decoder.step(t) {
                        Ok(d) => d.unwrap_or_default(),
                        Err(e) => return Some(Piece::Error(ApiError::internal(e.to_string()))),
                    };
                    let text = self.stop.push(&delta);
                    if self.stop.stopped() {
                        self.cancel.cancel();
                        self.first = Some(GenEvent::Done(FinishReason::Stop));
                        if !text.is_empty() {
                            return Some(Piece::Text(text));
                        }
                        continue;
                    }
                    if !text.is_empty() {
                        return Some(Piece::Text(text));
                    }
                }
                GenEvent::Done(reason) => {
                    let mut tail = String::new();
                    if !self.stop.stopped() {
                        if let Ok(Some(d)) = self.decoder.flush() {
                            tail = self.stop.push(&d);
                        }
                        if !self.stop.stopped() {
                            tail += &self.stop.finish();
                        }
                    }
                    let reason = if self.stop.stopped() {
                        FinishReason::Stop
                    } else {
                        reason
                    };
                    if !tail.is_empty() {
                        // Decoder and matcher are drained: the replayed event only ends.
                        self.first = Some(GenEvent::Done(reason));
                        return Some(Piece::Text(tail));
                    }
                    self.finished = true;
                    return Some(Piece::End(reason));
                }
                GenEvent::Failed(e) => {
                    self.finished = true;
                    return Some(Piece::Error(e));
                }
                GenEvent::NeedContext => {
                    self.finished = true;
                    return Some(Piece::Error(ApiError::internal("context lost mid-request")));
                }
            }
        }
    }

    fn usage(&self, prompt_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: prompt_tokens + self.completion_tokens,
        }
    }
}

async fn collect_response(mut gen: Generation, meta: ResponseMeta) -> Result<Response, ApiError> {
    let mut text = String::new();
    let reason = loop {
        match gen.next_piece().await {
            Some(Piece::Text(t)) => text.push_str(&t),
            Some(Piece::End(r)) => break r,
            Some(Piece::Error(e)) => return Err(e),
            None => return Err(ApiError::internal("the completion ended without a reason")),
        }
    };
    Ok(Json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": Value::Null,
            "finish_reason": reason.as_str(),
        }],
        "usage": gen.usage(meta.prompt_tokens),
    }))
    .into_response())
}

fn chunk(meta: &ResponseMeta, delta: Value, finish: Option<&str>) -> Event {
    let body = json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": Value::Null,
        "choices": [{"index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish}],
    });
    Event::default().data(body.to_string())
}

/// Stream states: role chunk first, then content chunks, the finish chunk, an optional usage
/// chunk, and `[DONE]`.
enum Phase {
    Start,
    Body,
    Usage,
    Done,
    Closed,
}

fn stream_response(
    gen: Generation,
    meta: ResponseMeta,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let state = (gen, meta, Phase::Start);
    let s = stream::unfold(state, move |(mut gen, meta, phase)| async move {
        match phase {
            Phase::Start => {
                let ev = chunk(&meta, json!({"role": "assistant", "content": ""}), None);
                Some((Ok(ev), (gen, meta, Phase::Body)))
            }
            Phase::Body => match gen.next_piece().await {
                Some(Piece::Text(t)) => {
                    let ev = chunk(&meta, json!({"content": t}), None);
                    Some((Ok(ev), (gen, meta, Phase::Body)))
                }
                Some(Piece::End(r)) => {
                    let ev = chunk(&meta, json!({}), Some(r.as_str()));
                    let next = if include_usage {
                        Phase::Usage
                    } else {
                        Phase::Done
                    };
                    Some((Ok(ev), (gen, meta, next)))
                }
                Some(Piece::Error(e)) => {
                    let ev = Event::default().data(e.body().to_string());
                    Some((Ok(ev), (gen, meta, Phase::Done)))
                }
                None => Some((
                    Ok(Event::default().data("[DONE]")),
                    (gen, meta, Phase::Closed),
                )),
            },
            Phase::Usage => {
                let body = json!({
                    "id": meta.id,
                    "object": "chat.completion.chunk",
                    "created": meta.created,
                    "model": meta.model,
                    "choices": [],
                    "usage": gen.usage(meta.prompt_tokens),
                });
                let ev = Event::default().data(body.to_string());
                Some((Ok(ev), (gen, meta, Phase::Done)))
            }
            Phase::Done => Some((
                Ok(Event::default().data("[DONE]")),
                (gen, meta, Phase::Closed),
            )),
            Phase::Closed => None,
        }
    });
    Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
