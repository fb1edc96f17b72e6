//! Server metrics, updated lock-free by the HTTP handlers and the engine worker and rendered
//! as Prometheus text by `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token histogram buckets.
const TTFT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Counters and gauges of one server.
#[derive(Default)]
pub struct Metrics {
    /// Requests waiting for a batch slot.
    pub queue_depth: AtomicU64,
    /// Requests decoding now.
    pub batch_size: AtomicU64,
    /// Completions requested (accepted or not).
    pub requests_total: AtomicU64,
    /// Requests refused with 429 (queue full, per-key limit).
    pub rejected_total: AtomicU64,
    /// Requests that ended in an error after being accepted.
    pub failed_total: AtomicU64,
    /// Query tokens fed.
    pub prompt_tokens_total: AtomicU64,
    /// Tokens generated.
    pub generated_tokens_total: AtomicU64,
    /// Batched decode steps run.
    pub decode_steps_total: AtomicU64,
    /// Time in decode steps, µs.
    pub decode_micros_total: AtomicU64,
    /// Generated tokens per second over the last measuring window (×1000).
    pub tokens_per_second_milli: AtomicU64,
    /// Contexts compressed by this server.
    pub contexts_created_total: AtomicU64,
    /// Prefill time of created contexts, µs.
    pub prefill_micros_total: AtomicU64,
    /// Scoring time of created contexts, µs.
    pub scoring_micros_total: AtomicU64,
    /// Contexts resident on the device.
    pub device_contexts: AtomicU64,
    /// KV bytes resident on the device: contexts plus the suffix pool.
    pub device_kv_bytes: AtomicU64,
    /// Highest `device_kv_bytes` seen.
    pub device_kv_bytes_peak: AtomicU64,
    /// The device budget.
    pub device_kv_budget: AtomicU64,
    /// Suffix pool bytes (part of `device_kv_bytes`).
    pub pool_bytes: AtomicU64,
    /// Contexts in the host tier.
    pub host_contexts: AtomicU64,
    /// Bytes in the host tier.
    pub host_bytes: AtomicU64,
    /// The host budget.
    pub host_budget: AtomicU64,
    /// Contexts loaded from the store (not created here).
    pub store_loads_total: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
    ttft_count: AtomicU64,
    ttft_micros_sum: AtomicU64,
}

impl Metrics {
    /// Sets the device KV gauge and raises its peak.
    pub fn set_device_kv(&self, bytes: usize, pool: usize, contexts: usize) {
        self.device_kv_bytes.store(bytes as u64, Relaxed);
        self.device_kv_bytes_peak.fetch_max(bytes as u64, Relaxed);
        self.pool_bytes.store(pool as u64, Relaxed);
        self.device_contexts.store(contexts as u64, Relaxed);
    }

    /// Records one time to first token.
    pub fn observe_ttft(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, bound) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            if s <= bound {
                b.fetch_add(1, Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Relaxed);
        self.ttft_micros_sum
            .fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Prometheus text exposition; `store` is `(contexts, bytes)` of the store tier when known.
    pub fn render(&self, store: Option<(usize, usize)>) -> String {
        let mut out = String::new();
        let g = |a: &AtomicU64| a.load(Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let secs = |micros: u64| micros as f64 / 1e6;
        metric(
            "kvzip_queue_depth",
            "gauge",
            "Requests waiting for a batch slot.",
            &[("", g(&self.queue_depth) as f64)],
        );
        metric(
            "kvzip_batch_size",
            "gauge",
            "Requests decoding together now.",
            &[("", g(&self.batch_size) as f64)],
        );
        metric(
            "kvzip_requests_total",
            "counter",
            "Chat completion requests received.",
            &[("", g(&self.requests_total) as f64)],
        );
        metric(
            "kvzip_requests_rejected_total",
            "counter",
            "Requests refused with 429.",
            &[("", g(&self.rejected_total) as f64)],
        );
        metric(
            "kvzip_requests_failed_total",
            "counter",
            "Accepted requests that ended in an error.",
            &[("", g(&self.failed_total) as f64)],
        );
        metric(
            "kvzip_prompt_tokens_total",
            "counter",
            "Query tokens fed.",
            &[("", g(&self.prompt_tokens_total) as f64)],
        );
        metric(
            "kvzip_generated_tokens_total",
            "counter",
            "Tokens generated.",
            &[("", g(&self.generated_tokens_total) as f64)],
        );
        metric(
            "kvzip_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last second of decoding.",
            &[("", g(&self.tokens_per_second_milli) as f64 / 1e3)],
        );
        metric(
            "kvzip_decode_steps_total",
            "counter",
            "Batched decode steps.",
            &[("", g(&self.decode_steps_total) as f64)],
        );
        metric(
            "kvzip_decode_seconds_total",
            "counter",
            "Time spent in batched decode steps.",
            &[("", secs(g(&self.decode_micros_total)))],
        );
        metric(
            "kvzip_contexts_created_total",
            "counter",
            "Contexts compressed by this server.",
            &[("", g(&self.contexts_created_total) as f64)],
        );
        metric(
            "kvzip_context_prefill_seconds_total",
            "counter",
            "Prefill time of compressed contexts.",
            &[("", secs(g(&self.prefill_micros_total)))],
        );
        metric(
            "kvzip_context_scoring_seconds_total",
            "counter",
            "Reconstruction scoring time of compressed contexts.",
            &[("", secs(g(&self.scoring_micros_total)))],
        );
        metric(
            "kvzip_context_store_loads_total",
            "counter",
            "Contexts loaded from the store (compressed elsewhere or earlier).",
            &[("", g(&self.store_loads_total) as f64)],
        );
        let (sc, sb) = store.map_or((f64::NAN, f64::NAN), |(c, b)| (c as f64, b as f64));
        metric(
            "kvzip_contexts",
            "gauge",
            "Compressed contexts per tier.",
            &[
                ("{tier=\"device\"}", g(&self.device_contexts) as f64),
                ("{tier=\"host\"}", g(&self.host_contexts) as f64),
                ("{tier=\"store\"}", sc),
            ],
        );
        metric("kvzip_kv_bytes", "gauge", "KV bytes per tier (device: contexts plus the suffix pool; host and store: serialized caches).", &[
            ("{tier=\"device\"}", g(&self.device_kv_bytes) as f64),
            ("{tier=\"host\"}", g(&self.host_bytes) as f64),
            ("{tier=\"store\"}", sb),
        ]);
        metric(
            "kvzip_kv_bytes_peak",
            "gauge",
            "Highest device KV bytes since start.",
            &[("{tier=\"device\"}", g(&self.device_kv_bytes_peak) as f64)],
        );
        metric(
            "kvzip_kv_budget_bytes",
            "gauge",
            "Configured budgets.",
            &[
                ("{tier=\"device\"}", g(&self.device_kv_budget) as f64),
                ("{tier=\"host\"}", g(&self.host_budget) as f64),
            ],
        );
        metric(
            "kvzip_suffix_pool_bytes",
            "gauge",
            "Device KV bytes of the batch's private suffixes (reserved).",
            &[("", g(&self.pool_bytes) as f64)],
        );
        let _ = writeln!(
            out,
            "# HELP kvzip_time_to_first_token_seconds Arrival to first generated token.\n# TYPE kvzip_time_to_first_token_seconds histogram"
        );
        for (b, bound) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            let _ = writeln!(
                out,
                "kvzip_time_to_first_token_seconds_bucket{{le=\"{bound}\"}} {}",
                g(b)
            );
        }
        let count = g(&self.ttft_count);
        let _ = writeln!(
            out,
            "kvzip_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {count}\nkvzip_time_to_first_token_seconds_sum {}\nkvzip_time_to_first_token_seconds_count {count}",
            secs(g(&self.ttft_micros_sum))
        );
        out
    }
}
