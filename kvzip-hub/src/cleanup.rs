//! Paths to remove if the process is interrupted (SIGINT/SIGTERM) while they are half-built:
//! an import's temporary directory, a download in progress. The CLI's signal handler calls
//! [`remove_registered`]; a [`Registration`] unregisters its path when dropped.

use std::path::PathBuf;
use std::sync::Mutex;

static PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Keeps `path` registered until dropped.
pub struct Registration(PathBuf);

/// Registers `path` for removal on interruption.
pub fn register(path: impl Into<PathBuf>) -> Registration {
    let path = path.into();
    if let Ok(mut p) = PATHS.lock() {
        p.push(path.clone());
    }
    Registration(path)
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut p) = PATHS.lock() {
            p.retain(|x| x != &self.0);
        }
    }
}

/// Removes every registered path (files or directories); returns how many were removed.
pub fn remove_registered() -> usize {
    let paths = match PATHS.lock() {
        Ok(mut p) => std::mem::take(&mut *p),
        Err(_) => return 0,
    };
    let mut n = 0;
    for p in paths {
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p).is_ok()
        } else {
            std::fs::remove_file(&p).is_ok()
        };
        n += usize::from(removed);
    }
    n
}
