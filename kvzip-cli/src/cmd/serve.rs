//! `kvzip serve`: the OpenAI-compatible server (see the `kvzip-serve` crate).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use kvzip_serve::config::parse_bytes;
use kvzip_serve::{open_store, ServeConfig, ServedModel, Server};
use kvzip_templates::Task;

use crate::common::{load_model, ModelArgs};

fn bytes_arg(s: &str) -> std::result::Result<usize, String> {
    parse_bytes(s)
}

/// Arguments of `kvzip serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Accepted Bearer key; repeat for several. Without any, requests need no key. Also read
    /// from KVZIP_API_KEYS (comma-separated).
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// Where compressed contexts are kept: a directory (default: <kvzip home>/contexts) or
    /// redis://HOST:PORT to share them between servers.
    #[arg(long)]
    pub store: Option<String>,
    /// Device KV memory for resident contexts plus the batch's suffixes (e.g. 4GiB).
    #[arg(long, default_value = "4GiB", value_parser = bytes_arg)]
    pub kv_budget: usize,
    /// Host memory for serialized contexts (second tier).
    #[arg(long, default_value = "4GiB", value_parser = bytes_arg)]
    pub host_cache_budget: usize,
    /// Most requests decoding together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; beyond it: 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Tokens of query + answer one request may hold (reserved per batch slot).
    #[arg(long, default_value_t = 512)]
    pub max_suffix_tokens: usize,
    /// Largest max_tokens of a completion.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Most tokens in one context to compress.
    #[arg(long, default_value_t = 32768)]
    pub max_context_tokens: usize,
    /// Largest request body (e.g. 16MiB).
    #[arg(long, default_value = "16MiB", value_parser = bytes_arg)]
    pub max_body_bytes: usize,
    /// Requests one key may have in flight.
    #[arg(long, default_value_t = 64)]
    pub max_concurrent_per_key: usize,
    /// Seconds a request may take from arrival to its last token.
    #[arg(long, default_value_t = 300)]
    pub request_timeout: u64,
    /// Seconds SIGTERM waits for running requests.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Ratio used when POST /v1/contexts gives none.
    #[arg(long, default_value_t = 0.3)]
    pub ratio: f64,
    /// Reconstruction chunk size in context tokens.
    #[arg(long, default_value_t = kvzip_models::engine::kvzip::DEFAULT_SCORING_CHUNK)]
    pub chunk: usize,
}

/// `kvzip serve`.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let prompt = model.prompt_ids(Task::Qa)?;
    let stop_tokens = model.stop_tokens();
    let store_spec = match &args.store {
        Some(s) => s.clone(),
        None => {
            let home = kvzip_hub::fetch::default_cache_dir()
                .context("cannot determine the kvzip cache directory; pass --store")?;
            home.join("contexts").display().to_string()
        }
    };
    let store = open_store(&store_spec).with_context(|| format!("--store {store_spec}"))?;
    let mut cfg = ServeConfig::new(model.name.clone(), model.model_id.clone());
    cfg.api_keys = args.api_keys.clone();
    if let Ok(env) = std::env::var("KVZIP_API_KEYS") {
        cfg.api_keys.extend(
            env.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from),
        );
    }
    if args.max_batch == 0 || args.max_queue == 0 || args.max_suffix_tokens < 2 {
        return Err(anyhow!(
            "--max-batch and --max-queue must be at least 1, --max-suffix-tokens at least 2"
        ));
    }
    cfg.budgets.device_kv_bytes = args.kv_budget;
    cfg.budgets.host_cache_bytes = args.host_cache_budget;
    cfg.max_batch = args.max_batch;
    cfg.max_queue = args.max_queue;
    cfg.default_ratio = args.ratio;
    cfg.scoring_chunk = args.chunk;
    cfg.drain_timeout = Duration::from_secs(args.drain_timeout);
    cfg.limits.max_suffix_tokens = args.max_suffix_tokens;
    cfg.limits.max_tokens = args.max_tokens;
    cfg.limits.max_context_tokens = args.max_context_tokens;
    cfg.limits.max_body_bytes = args.max_body_bytes;
    cfg.limits.max_concurrent_per_key = args.max_concurrent_per_key;
    cfg.limits.request_timeout = Duration::from_secs(args.request_timeout);
    let served = ServedModel {
        engine: model.engine,
        tokenizer: model.tokenizer,
        prompt,
        stop_tokens,
    };
    let server = Server::new(served, store, cfg).map_err(|e| anyhow!("{}", e.message))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime
        .block_on(server.run_until_signal(SocketAddr::new(args.host, args.port)))
        .with_context(|| format!("serving on {}:{}", args.host, args.port))
}
