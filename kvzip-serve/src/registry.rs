//! The context tiers as the HTTP side sees them: the host tier (serialized caches in memory,
//! LRU within a byte budget) in front of the store, with ownership checks. The device tier
//! lives in the engine worker.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::store::{valid_context_id, ContextInfo, ContextStore, StoreError};

/// Serialized contexts in host memory, least recently used evicted first.
pub struct HostTier {
    inner: Mutex<HostInner>,
    budget: usize,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct HostInner {
    map: HashMap<String, (Arc<Vec<u8>>, u64)>,
    bytes: usize,
    tick: u64,
}

impl HostTier {
    /// A tier holding at most `budget` bytes.
    pub fn new(budget: usize, metrics: Arc<Metrics>) -> Self {
        metrics.host_budget.store(budget as u64, Relaxed);
        Self {
            inner: Mutex::new(HostInner::default()),
            budget,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HostInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, inner: &HostInner) {
        self.metrics
            .host_contexts
            .store(inner.map.len() as u64, Relaxed);
        self.metrics.host_bytes.store(inner.bytes as u64, Relaxed);
    }

    /// The bytes of `id`, marking it recently used.
    pub fn get(&self, id: &str) -> Option<Arc<Vec<u8>>> {
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        g.map.get_mut(id).map(|e| {
            e.1 = tick;
            e.0.clone()
        })
    }

    /// Keeps `bytes` for `id`, evicting least recently used entries to stay in budget (an
    /// entry larger than the whole budget is not kept).
    pub fn insert(&self, id: &str, bytes: Arc<Vec<u8>>) {
        if bytes.len() > self.budget {
            return;
        }
        let mut g = self.lock();
        if let Some((old, _)) = g.map.remove(id) {
            g.bytes -= old.len();
        }
        while g.bytes + bytes.len() > self.budget {
            let Some(victim) = g
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((old, _)) = g.map.remove(&victim) {
                g.bytes -= old.len();
            }
        }
        g.tick += 1;
        let tick = g.tick;
        g.bytes += bytes.len();
        g.map.insert(id.to_owned(), (bytes, tick));
        self.publish(&g);
    }

    /// Drops `id`.
    pub fn remove(&self, id: &str) {
        let mut g = self.lock();
        if let Some((old, _)) = g.map.remove(id) {
            g.bytes -= old.len();
        }
        self.publish(&g);
    }
}

/// Owner tag of an API key: its SHA-256 (keys themselves are never stored).
pub fn owner_of(key: Option<&str>) -> String {
    match key {
        Some(k) => crate::store::sha256_hex(k.as_bytes()),
        None => "public".to_owned(),
    }
}

/// Store access with ownership: what the context endpoints and completions use.
pub struct Contexts {
    store: Arc<dyn ContextStore>,
    /// The host tier.
    pub host: Arc<HostTier>,
    model_id: String,
    metrics: Arc<Metrics>,
    /// `(contexts, bytes)` in the store, refreshed by `store_stats`.
    stats: Mutex<Option<(std::time::Instant, (usize, usize))>>,
}

fn store_err(e: StoreError) -> ApiError {
    ApiError::internal(format!("context store: {e}"))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no context {id:?}"), "context_not_found").with_param("context_id")
}

/// Runs blocking store I/O off the async workers.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
) -> Result<R, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
        .map_err(store_err)
}

impl Contexts {
    /// Contexts of model `model_id` in `store`, cached in `host`.
    pub fn new(
        store: Arc<dyn ContextStore>,
        host: Arc<HostTier>,
        model_id: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            host,
            model_id,
            metrics,
            stats: Mutex::new(None),
        }
    }

    /// Where contexts are stored.
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The record of `id` if it exists, belongs to `owner` and to this model; otherwise
    /// `404` (another key's context is indistinguishable from a missing one).
    pub async fn lookup(&self, id: &str, owner: &str) -> Result<ContextInfo, ApiError> {
        if !valid_context_id(id) {
            return Err(not_found(id));
        }
        let store = self.store.clone();
        let key = id.to_owned();
        let info = blocking(move || store.info(&key)).await?;
        match info {
            Some(i) if i.owner == owner && i.model_id == self.model_id => Ok(i),
            _ => Err(not_found(id)),
        }
    }

    /// The serialized cache of `info`: from the host tier, else from the store (then kept in
    /// the host tier).
    pub async fn bytes(&self, info: &ContextInfo) -> Result<Arc<Vec<u8>>, ApiError> {
        if let Some(b) = self.host.get(&info.id) {
            return Ok(b);
        }
        let store = self.store.clone();
        let i = info.clone();
        let data = Arc::new(blocking(move || store.data(&i)).await?);
        self.metrics.store_loads_total.fetch_add(1, Relaxed);
        self.host.insert(&info.id, data.clone());
        Ok(data)
    }

    /// Stores a new context and keeps it in the host tier.
    pub async fn put(&self, info: ContextInfo, data: Arc<Vec<u8>>) -> Result<(), ApiError> {
        let store = self.store.clone();
        let d = data.clone();
        let i = info.clone();
        blocking(move || store.put(&i, &d)).await?;
        self.host.insert(&info.id, data);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Deletes `id` if `owner` owns it.
    pub async fn delete(&self, id: &str, owner: &str) -> Result<(), ApiError> {
        self.lookup(id, owner).await?;
        let store = self.store.clone();
        let key = id.to_owned();
        blocking(move || store.delete(&key)).await?;
        self.host.remove(id);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Every context of `owner` for this model, oldest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<ContextInfo>, ApiError> {
        let store = self.store.clone();
        let all = blocking(move || store.list()).await?;
        Ok(all
            .into_iter()
            .filter(|i| i.owner == owner && i.model_id == self.model_id)
            .collect())
    }

    /// `(contexts, serialized bytes)` in the store, refreshed at most every 10 s; `None` when
    /// the store cannot be listed.
    pub async fn store_stats(&self) -> Option<(usize, usize)> {
        let cached = *self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, s)) = cached {
            if at.elapsed().as_secs() < 10 {
                return Some(s);
            }
        }
        let store = self.store.clone();
        let all = blocking(move || store.list()).await.ok()?;
        let s = (all.len(), all.iter().map(|i| i.size_bytes).sum());
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), s));
        Some(s)
    }
}
