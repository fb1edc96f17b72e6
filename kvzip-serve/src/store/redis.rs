//! Contexts in Redis, shared by every server pointed at it. Keys (prefix `kvzip`):
//! `kvzip:ctx:{id}:chunk:{i}` hold the serialized cache in chunks of [`CHUNK_BYTES`],
//! `kvzip:ctx:{id}:info` the JSON record (written after every chunk: the commit point), and
//! the set `kvzip:contexts` the ids. Reads check the record's size and SHA-256.

use std::sync::Mutex;
use std::time::Duration;

use super::resp::{Connection, Reply};
use super::{valid_context_id, verify, ContextInfo, ContextStore, StoreError};

/// Bytes per chunk value.
pub const CHUNK_BYTES: usize = 4 << 20;
const PREFIX: &str = "kvzip";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A Redis-backed store (`--store redis://[:password@]host:port[/db]`).
pub struct RedisStore {
    addr: String,
    password: Option<String>,
    db: Option<u32>,
    pool: Mutex<Vec<Connection>>,
}

/// The record as stored: the context's info plus its chunk count.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    info: ContextInfo,
    chunks: usize,
}

fn info_key(id: &str) -> String {
    format!("{PREFIX}:ctx:{id}:info")
}

fn chunk_key(id: &str, i: usize) -> String {
    format!("{PREFIX}:ctx:{id}:chunk:{i}")
}

fn set_key() -> String {
    format!("{PREFIX}:contexts")
}

impl RedisStore {
    /// Parses `url`, connects once (so a wrong address fails at start-up) and keeps the
    /// connection for reuse.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| {
            StoreError::Config(format!(
                "--store {url}: {why}; expected redis://[:password@]host:port[/db]"
            ))
        };
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| bad("not a redis:// URL"))?;
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let password = auth.map(|a| a.rsplit_once(':').map_or(a, |(_, p)| p).to_owned());
        let (hostport, db) = match hostpart.split_once('/') {
            Some((h, "")) => (h, None),
            Some((h, d)) => (
                h,
                Some(d.parse::<u32>().map_err(|_| bad("bad database number"))?),
            ),
            None => (hostpart, None),
        };
        if hostport.is_empty() {
            return Err(bad("no host"));
        }
        let addr = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:6379")
        };
        let store = Self {
            addr,
            password: password.filter(|p| !p.is_empty()),
            db,
            pool: Mutex::new(Vec::new()),
        };
        let mut conn = store.connect()?;
        conn.call(&[b"PING"])?.ok()?;
        store.give_back(conn);
        Ok(store)
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let mut conn = Connection::connect(&self.addr, TIMEOUT)?;
        if let Some(p) = &self.password {
            conn.call(&[b"AUTH", p.as_bytes()])?.ok()?;
        }
        if let Some(db) = self.db {
            conn.call(&[b"SELECT", db.to_string().as_bytes()])?.ok()?;
        }
        Ok(conn)
    }

    fn take(&self) -> Result<Connection, StoreError> {
        let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
        match pooled {
            Some(c) => Ok(c),
            None => self.connect(),
        }
    }

    fn give_back(&self, conn: Connection) {
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < 16 {
                p.push(conn);
            }
        }
    }

    /// Runs `f` on a pooled connection; a connection that saw an error is dropped.
    fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut conn = self.take()?;
        let out = f(&mut conn)?;
        self.give_back(conn);
        Ok(out)
    }

    fn read_record(conn: &mut Connection, id: &str) -> Result<Option<Record>, StoreError> {
        let Some(bytes) = conn.call(&[b"GET", info_key(id).as_bytes()])?.bulk()? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StoreError::Corrupt(format!(
                "redis key {}: not a context record ({e}); delete the context",
                info_key(id)
            ))
        })
    }
}

fn check_id(id: &str) -> Result<(), StoreError> {
    if valid_context_id(id) {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!("{id:?} is not a context id")))
    }
}

impl ContextStore for RedisStore {
    fn put(&self, info: &ContextInfo, data: &[u8]) -> Result<(), StoreError> {
        check_id(&info.id)?;
        let chunks: Vec<&[u8]> = data.chunks(CHUNK_BYTES).collect();
        let record = serde_json::to_vec(&Record {
            info: info.clone(),
            chunks: chunks.len(),
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot encode the record: {e}")))?;
        let keys: Vec<String> = (0..chunks.len()).map(|i| chunk_key(&info.id, i)).collect();
        self.with_conn(|c| {
            // Chunks in batches (bounded pipeline memory), then the record: readers only see a
            // context once all of it is there.
            for (ks, cs) in keys.chunks(8).zip(chunks.chunks(8)) {
                let cmds: Vec<Vec<&[u8]>> = ks
                    .iter()
                    .zip(cs)
                    .map(|(k, v)| vec![b"SET".as_slice(), k.as_bytes(), v])
                    .collect();
                for r in c.pipeline(&cmds)? {
                    r.ok()?;
                }
            }
            let ik = info_key(&info.id);
            let sk = set_key();
            let cmds = vec![
                vec![b"SET".as_slice(), ik.as_bytes(), &record],
                vec![b"SADD".as_slice(), sk.as_bytes(), info.id.as_bytes()],
            ];
            for r in c.pipeline(&cmds)? {
                r.ok()?;
            }
            Ok(())
        })
    }

    fn info(&self, id: &str) -> Result<Option<ContextInfo>, StoreError> {
        check_id(id)?;
        self.with_conn(|c| Ok(Self::read_record(c, id)?.map(|r| r.info)))
    }

    fn data(&self, info: &ContextInfo) -> Result<Vec<u8>, StoreError> {
        check_id(&info.id)?;
        let origin = format!("redis://{}/{}", self.addr, info_key(&info.id));
        self.with_conn(|c| {
            let record = Self::read_record(c, &info.id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("{origin}: the context was deleted"))
            })?;
            let keys: Vec<String> = (0..record.chunks).map(|i| chunk_key(&info.id, i)).collect();
            let mut data = Vec::with_capacity(info.size_bytes);
            for ks in keys.chunks(8) {
                let cmds: Vec<Vec<&[u8]>> =
                    ks.iter().map(|k| vec![b"GET".as_slice(), k.as_bytes()]).collect();
                for (k, r) in ks.iter().zip(c.pipeline(&cmds)?) {
                    let part = r.bulk()?.ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "{origin}: chunk {k} is missing; delete the context and compress it again"
                        ))
                    })?;
                    data.extend_from_slice(&part);
                }
            }
            verify(&record.info, &data, &origin)?;
            Ok(data)
        })
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        check_id(id)?;
        self.with_conn(|c| {
            let record = Self::read_record(c, id)?;
            let ik = info_key(id);
            let sk = set_key();
            let removed = c.call(&[b"DEL", ik.as_bytes()])?.int()? > 0;
            c.call(&[b"SREM", sk.as_bytes(), id.as_bytes()])?.ok()?;
            if let Some(r) = record {
                let keys: Vec<String> = (0..r.chunks).map(|i| chunk_key(id, i)).collect();
                for ks in keys.chunks(64) {
                    let mut cmd: Vec<&[u8]> = vec![b"DEL"];
                    cmd.extend(ks.iter().map(|k| k.as_bytes()));
                    c.call(&cmd)?.ok()?;
                }
            }
            Ok(removed)
        })
    }

    fn list(&self) -> Result<Vec<ContextInfo>, StoreError> {
        self.with_conn(|c| {
            let sk = set_key();
            let ids: Vec<String> = c
                .call(&[b"SMEMBERS", sk.as_bytes()])?
                .array()?
                .into_iter()
                .filter_map(|r| match r {
                    Reply::Bulk(Some(b)) => String::from_utf8(b).ok(),
                    _ => None,
                })
                .filter(|id| valid_context_id(id))
                .collect();
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(r) = Self::read_record(c, &id)? {
                    out.push(r.info);
                }
            }
            out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
            Ok(out)
        })
    }

    fn describe(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against `KVZIP_TEST_REDIS` (set by `cargo xtask test`); without it the test
    /// starts a private `redis-server` if one is installed.
    #[test]
    fn redis_store_round_trip_and_checksum() {
        let server = crate::testing::TestRedis::start();
        let store = RedisStore::open(server.url()).expect("redis store");
        super::super::tests::exercise(&store, |id| {
            let mut c = store.take().unwrap();
            let k = chunk_key(id, 0);
            let mut v = c
                .call(&[b"GET", k.as_bytes()])
                .unwrap()
                .bulk()
                .unwrap()
                .unwrap();
            v[10] ^= 1;
            c.call(&[b"SET", k.as_bytes(), &v]).unwrap().ok().unwrap();
        });
        // Chunks and record are gone after delete.
        let mut c = store.take().unwrap();
        let left = c
            .call(&[b"KEYS", b"kvzip:ctx:ctx-0123456789abcdef0123456789abcdef*"])
            .unwrap()
            .array()
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn bad_urls_are_explained() {
        for url in ["redis://", "redis://host:1/notadb"] {
            let e = RedisStore::open(url).err().expect("error").to_string();
            assert!(e.contains("redis://[:password@]host:port"), "{e}");
        }
    }
}
