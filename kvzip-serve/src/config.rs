//! Server settings: limits on what one request may ask for, memory budgets of the cache
//! tiers, and batching.

use std::time::Duration;

/// Per-request limits. A request beyond any of them gets a `400`/`413` error naming the limit
/// and the flag that raises it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, bytes (`--max-body-bytes`).
    pub max_body_bytes: usize,
    /// Most context tokens one `POST /v1/contexts` may compress (`--max-context-tokens`).
    pub max_context_tokens: usize,
    /// Largest `max_tokens` of a completion (`--max-tokens`).
    pub max_tokens: usize,
    /// Rows of private KV per running request: query tokens + generated tokens
    /// (`--max-suffix-tokens`). Every batch slot reserves this many rows up front.
    pub max_suffix_tokens: usize,
    /// Requests one API key may have in flight (queued or running) at once
    /// (`--max-concurrent-per-key`).
    pub max_concurrent_per_key: usize,
    /// Wall-clock limit of one request from arrival to its last token (`--request-timeout`).
    pub request_timeout: Duration,
    /// Most stop strings per request (OpenAI allows 4).
    pub max_stop: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            max_context_tokens: 32_768,
            max_tokens: 512,
            max_suffix_tokens: 1024,
            max_concurrent_per_key: 64,
            request_timeout: Duration::from_secs(300),
            max_stop: 4,
        }
    }
}

/// Memory budgets of the context tiers, bytes.
#[derive(Debug, Clone)]
pub struct Budgets {
    /// KV bytes on the compute device: contexts resident there plus the batch's suffix pool
    /// (`--kv-budget`). Requests wait in the queue until their context fits.
    pub device_kv_bytes: usize,
    /// Serialized contexts kept in host memory as the second tier (`--host-cache-budget`).
    pub host_cache_bytes: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            device_kv_bytes: 4 << 30,
            host_cache_bytes: 4 << 30,
        }
    }
}

/// Everything the server needs besides the model.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Name reported as the model (`GET /v1/models`, the `model` field of responses) and the
    /// only value accepted in a request's `model` field.
    pub model_name: String,
    /// Model identity recorded with every stored context (`name@hash`): a server only loads
    /// contexts made by the same weights.
    pub model_id: String,
    /// Bearer keys; empty means no authentication (every request belongs to one owner).
    pub api_keys: Vec<String>,
    /// Per-request limits.
    pub limits: Limits,
    /// Tier budgets.
    pub budgets: Budgets,
    /// Most requests decoding together (`--max-batch`): the suffix pool's slots.
    pub max_batch: usize,
    /// Most requests waiting for a slot (`--max-queue`); beyond it requests get `429`.
    pub max_queue: usize,
    /// Ratio used when `POST /v1/contexts` gives none.
    pub default_ratio: f64,
    /// Reconstruction chunk size, context tokens (KVZIP-SPEC §1.1).
    pub scoring_chunk: usize,
    /// How long SIGTERM waits for running requests before the server exits.
    pub drain_timeout: Duration,
}

impl ServeConfig {
    /// Defaults for a model called `model_name` with identity `model_id`.
    pub fn new(model_name: impl Into<String>, model_id: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            model_id: model_id.into(),
            api_keys: Vec::new(),
            limits: Limits::default(),
            budgets: Budgets::default(),
            max_batch: 32,
            max_queue: 256,
            default_ratio: 0.3,
            scoring_chunk: 2000,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Parses a byte size such as `4GiB`, `512MiB`, `2G`, `1000000` (plain bytes).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: use e.g. 4GiB, 512MiB or a byte count"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?}; use B, KiB, MiB, GiB, TiB (or kB, MB, GB, TB)"
            ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > usize::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("512mib").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2G").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_bytes("77").unwrap(), 77);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
    }
}
