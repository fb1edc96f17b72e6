//! The third context tier: compressed caches kept outside the process, in the cache file
//! format ([`kvzip_cache::KvCache::to_bytes`]) with a JSON record beside each. A local
//! directory by default ([`DirStore`]); `redis://HOST:PORT` shares contexts between servers
//! ([`RedisStore`]: chunked values, checksummed). Every read checks the record's SHA-256.

mod dir;
mod redis;
mod resp;

pub use dir::DirStore;
pub use redis::RedisStore;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors of a context store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done (and on which file / server).
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The store holds something that is not a valid context (or fails its checksum).
    #[error("{0}")]
    Corrupt(String),
    /// The Redis server answered with an error or an unexpected reply.
    #[error("redis: {0}")]
    Redis(String),
    /// The `--store` value cannot be used.
    #[error("{0}")]
    Config(String),
}

/// Description of a compressed context: what `GET /v1/contexts/{id}` shows, plus owner and
/// integrity data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContextInfo {
    /// `ctx-` + 32 hex characters.
    pub id: String,
    /// SHA-256 (hex) of the API key that created it (`"public"` without keys).
    pub owner: String,
    /// Model identity (`name@hash`); other models cannot load it.
    pub model_id: String,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Context tokens compressed.
    pub tokens: usize,
    /// System-prompt tokens before the context (kept in full).
    pub n_sys: usize,
    /// Ratio asked for.
    pub ratio: f64,
    /// Kept / total context KV pairs.
    pub ratio_real: f64,
    /// Selection level.
    pub level: String,
    /// `evict`.
    pub kv_type: String,
    /// Context KV bytes before pruning.
    pub kv_bytes_full: usize,
    /// Context KV bytes kept.
    pub kv_bytes_kept: usize,
    /// Prefill, scoring and prune wall time, ms.
    pub timings_ms: ContextTimingsMs,
    /// Size of the serialized cache, bytes.
    pub size_bytes: usize,
    /// SHA-256 (hex) of the serialized cache.
    pub sha256: String,
}

/// Wall-clock timings of a context's compression, ms.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct ContextTimingsMs {
    /// Prefill of system prompt + context.
    pub prefill: f64,
    /// Reconstruction scoring passes.
    pub scoring: f64,
    /// Selection and compaction.
    pub prune: f64,
}

/// A store of compressed contexts shared by one or more servers.
pub trait ContextStore: Send + Sync {
    /// Stores `data` (the serialized cache) under `info.id`; the record becomes visible only
    /// once the data is complete.
    fn put(&self, info: &ContextInfo, data: &[u8]) -> Result<(), StoreError>;
    /// The record of `id`, if stored.
    fn info(&self, id: &str) -> Result<Option<ContextInfo>, StoreError>;
    /// The serialized cache of a stored record, checked against its size and SHA-256.
    fn data(&self, info: &ContextInfo) -> Result<Vec<u8>, StoreError>;
    /// Removes `id`; `false` if it was not stored.
    fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// Every stored record.
    fn list(&self) -> Result<Vec<ContextInfo>, StoreError>;
    /// Where the store is, for logs (`dir:/path`, `redis://host:port`).
    fn describe(&self) -> String;
}

/// Opens `--store`: `redis://[:password@]host:port[/db]` or a directory path (created if
/// missing).
pub fn open_store(spec: &str) -> Result<Box<dyn ContextStore>, StoreError> {
    if spec.starts_with("redis://") {
        Ok(Box::new(RedisStore::open(spec)?))
    } else if spec.contains("://") {
        Err(StoreError::Config(format!(
            "--store {spec}: unknown scheme; use a directory path or redis://HOST:PORT"
        )))
    } else {
        Ok(Box::new(DirStore::open(spec)?))
    }
}

/// SHA-256 of `data` in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `id` has the shape of a context id (`ctx-` + 32 lowercase hex): ids reach file
/// names and keys only after this check.
pub fn valid_context_id(id: &str) -> bool {
    id.strip_prefix("ctx-").is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Checks `data` against the record's size and checksum.
fn verify(info: &ContextInfo, data: &[u8], origin: &str) -> Result<(), StoreError> {
    if data.len() != info.size_bytes {
        return Err(StoreError::Corrupt(format!(
            "{origin}: context {} has {} bytes, its record says {}; delete it and compress the context again",
            info.id,
            data.len(),
            info.size_bytes
        )));
    }
    let sum = sha256_hex(data);
    if sum != info.sha256 {
        return Err(StoreError::Corrupt(format!(
            "{origin}: context {} fails its SHA-256 check ({sum} != {}); delete it and compress the context again",
            info.id, info.sha256
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A record for `id` over `data`.
    pub(crate) fn info_for(id: &str, data: &[u8]) -> ContextInfo {
        ContextInfo {
            id: id.into(),
            owner: "public".into(),
            model_id: "toy@0".into(),
            created: 1,
            tokens: 10,
            n_sys: 2,
            ratio: 0.3,
            ratio_real: 0.3,
            level: "pair".into(),
            kv_type: "evict".into(),
            kv_bytes_full: 100,
            kv_bytes_kept: 30,
            timings_ms: ContextTimingsMs::default(),
            size_bytes: data.len(),
            sha256: sha256_hex(data),
        }
    }

    /// Put/get/list/delete round trip and checksum failure, for any store.
    pub(crate) fn exercise(store: &dyn ContextStore, corrupt: impl FnOnce(&str)) {
        let id = "ctx-0123456789abcdef0123456789abcdef";
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let info = info_for(id, &data);
        assert!(store.info(id).unwrap().is_none());
        store.put(&info, &data).unwrap();
        assert_eq!(store.info(id).unwrap().as_ref(), Some(&info));
        assert_eq!(store.data(&info).unwrap(), data);
        assert!(store.list().unwrap().iter().any(|i| i.id == id));
        corrupt(id);
        let err = store.data(&info).unwrap_err().to_string();
        assert!(err.contains(id), "{err}");
        assert!(store.delete(id).unwrap());
        assert!(!store.delete(id).unwrap());
        assert!(store.info(id).unwrap().is_none());
        assert!(!store.list().unwrap().iter().any(|i| i.id == id));
    }

    #[test]
    fn ids_are_checked_before_use() {
        assert!(valid_context_id("ctx-0123456789abcdef0123456789abcdef"));
        assert!(!valid_context_id("ctx-../../etc/passwd"));
        assert!(!valid_context_id("ctx-0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_context_id("0123456789abcdef0123456789abcdef"));
    }
}
