//! Wire types: the OpenAI chat-completions schema (request, response, stream chunk, error
//! object) plus kvzip's context endpoints.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An error answered as OpenAI's error object
/// `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message saying what was wrong and how to fix it.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, if one.
    pub param: Option<String>,
    /// Machine-readable code (`context_not_found`, `queue_full`, ...).
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (`Retry-After`), for `429`/`503`.
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// `400`: the request is malformed or asks for something invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// `400` about one field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    /// `401`: missing or unknown API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
            .with_code("invalid_api_key")
    }

    /// `404`: no such resource (or not visible to this key).
    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).with_code(code)
    }

    /// `413`: the body is larger than the server accepts.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            message,
        )
        .with_code("request_too_large")
    }

    /// `429`: too many requests (queue full or per-key concurrency), retry later.
    pub fn too_many(message: impl Into<String>, code: &'static str, retry_after_s: u64) -> Self {
        let mut e =
            Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message).with_code(code);
        e.retry_after_s = Some(retry_after_s);
        e
    }

    /// `503`: the server is shutting down or cannot take the work now.
    pub fn unavailable(message: impl Into<String>, retry_after_s: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .with_code("unavailable");
        e.retry_after_s = Some(retry_after_s);
        e
    }

    /// `504`: the request ran past the server's request timeout.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message).with_code("timeout")
    }

    /// `500`: something failed inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// Sets the faulty field.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON error object.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// One chat message of a request. `content` is a string or an array of `{type: "text", text}`
/// parts (other part types are rejected).
#[derive(Debug, Clone, Deserialize)]
pub struct RequestMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// Text or text parts.
    #[serde(default)]
    pub content: Option<Value>,
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions` body (OpenAI's schema plus `context_id`). Unknown fields are
/// ignored, as OpenAI-compatible servers do.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Must name the served model (see `GET /v1/models`).
    pub model: String,
    /// The conversation.
    pub messages: Vec<RequestMessage>,
    /// A compressed context (from `POST /v1/contexts`) to answer from.
    #[serde(default)]
    pub context_id: Option<String>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature in `[0, 2]`; 0 is greedy. OpenAI's default is 1.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass in `(0, 1]`.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Seed of the sampler (same seed, same request: same tokens).
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings (not included in the output).
    #[serde(default)]
    pub stop: Option<StopField>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices; only 1 is served.
    #[serde(default)]
    pub n: Option<i64>,
    /// Log-probabilities are not served; `true` is rejected.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Tools are not served; a non-empty list is rejected.
    #[serde(default)]
    pub tools: Option<Value>,
}

/// Token counts of a completion.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Usage {
    /// Tokens fed for this request (its query; the context's tokens are not re-fed).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Sum of both.
    pub total_tokens: usize,
}

/// `POST /v1/contexts` body: `text`, or `messages` rendered as a transcript.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContextRequest {
    /// The context text (a document, code, a chat history).
    #[serde(default)]
    pub text: Option<String>,
    /// Alternatively, a conversation; rendered one `role: content` line per message.
    #[serde(default)]
    pub messages: Option<Vec<RequestMessage>>,
    /// Fraction of context KV pairs kept, in `(0, 1]`.
    #[serde(default)]
    pub ratio: Option<f64>,
    /// `pair` (default), `pair-uniform` or `head`.
    #[serde(default)]
    pub level: Option<String>,
    /// `evict` (default): the pruned pairs are removed for good.
    #[serde(default)]
    pub kv_type: Option<String>,
}

/// The text of a message's `content` (a string, or the concatenated text parts).
pub fn message_text(m: &RequestMessage, index: usize, field: &str) -> Result<String, ApiError> {
    let param = format!("{field}[{index}].content");
    match &m.content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => return Err(ApiError::invalid_param(
                        &format!("{param}[{j}]"),
                        "only text content parts ({\"type\": \"text\", \"text\": ...}) are served",
                    )),
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid_param(
            &param,
            "content must be a string or an array of text parts",
        )),
    }
}

/// A fresh unguessable id: `prefix` + 32 hex characters (128 bits from the OS's random
/// source).
pub fn random_id(prefix: &str) -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::internal(format!("the OS random source failed: {e}")))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{prefix}{hex}"))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
