//! A directory of contexts: `<id>.kvzip` (the serialized cache) and `<id>.json` (its record),
//! each written to a temporary file, synced, then renamed into place; the record is written
//! last, so a context is either wholly visible or absent.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{valid_context_id, verify, ContextInfo, ContextStore, StoreError};

/// Contexts in a local directory (the default store).
pub struct DirStore {
    dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

impl DirStore {
    /// Opens (creating if needed) the directory `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io(format!(
            "creating the context store directory {} (pass another --store)",
            dir.display()
        )))?;
        Ok(Self { dir })
    }

    fn paths(&self, id: &str) -> Result<(PathBuf, PathBuf), StoreError> {
        if !valid_context_id(id) {
            return Err(StoreError::Corrupt(format!("{id:?} is not a context id")));
        }
        Ok((
            self.dir.join(format!("{id}.kvzip")),
            self.dir.join(format!("{id}.json")),
        ))
    }

    /// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync,
    /// rename).
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let what = format!("writing {}", path.display());
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io(what.clone()))?;
        tmp.write_all(bytes).map_err(io(what.clone()))?;
        tmp.as_file().sync_all().map_err(io(what.clone()))?;
        tmp.persist(path).map_err(|e| StoreError::Io {
            what,
            source: e.error,
        })?;
        Ok(())
    }

    fn read_info(&self, path: &Path) -> Result<Option<ContextInfo>, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StoreError::Corrupt(format!(
                "{}: not a context record ({e}); delete it",
                path.display()
            ))
        })
    }
}

impl ContextStore for DirStore {
    fn put(&self, info: &ContextInfo, data: &[u8]) -> Result<(), StoreError> {
        let (data_path, info_path) = self.paths(&info.id)?;
        let record = serde_json::to_vec_pretty(info)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode the record: {e}")))?;
        self.write_atomic(&data_path, data)?;
        self.write_atomic(&info_path, &record)
    }

    fn info(&self, id: &str) -> Result<Option<ContextInfo>, StoreError> {
        let (_, info_path) = self.paths(id)?;
        self.read_info(&info_path)
    }

    fn data(&self, info: &ContextInfo) -> Result<Vec<u8>, StoreError> {
        let (data_path, _) = self.paths(&info.id)?;
        let data = std::fs::read(&data_path).map_err(io(format!(
            "reading {} (the record exists but its data does not; delete the context)",
            data_path.display()
        )))?;
        verify(info, &data, &data_path.display().to_string())?;
        Ok(data)
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let (data_path, info_path) = self.paths(id)?;
        let existed = match std::fs::remove_file(&info_path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io(format!("removing {}", info_path.display()))(e)),
        };
        match std::fs::remove_file(&data_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", data_path.display()))(e)),
        }
        Ok(existed)
    }

    fn list(&self) -> Result<Vec<ContextInfo>, StoreError> {
        let what = format!("listing {}", self.dir.display());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(what.clone()))? {
            let path = entry.map_err(io(what.clone()))?.path();
            let is_record = path.extension().is_some_and(|e| e == "json")
                && path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(valid_context_id);
            if is_record {
                if let Some(info) = self.read_info(&path)? {
                    out.push(info);
                }
            }
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("dir:{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_store_round_trip_and_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::open(tmp.path().join("contexts")).unwrap();
        let dir = tmp.path().join("contexts");
        super::super::tests::exercise(&store, |id| {
            let p = dir.join(format!("{id}.kvzip"));
            let mut b = std::fs::read(&p).unwrap();
            b[1000] ^= 1;
            std::fs::write(&p, b).unwrap();
        });
        // Nothing half-written stays behind.
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
