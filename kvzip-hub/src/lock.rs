//! Exclusive cross-process locks (`flock`) held for a scope: two processes that fetch or import
//! models into the same folder at once take turns instead of deleting each other's half-built
//! folders. The lock is taken on the folder itself, so nothing is left behind.

use std::fs::{File, OpenOptions};
use std::path::Path;

/// An exclusive lock on a folder (or file), released when dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until this process holds the exclusive lock on `path`: an existing folder, or a
    /// file (created if missing).
    pub fn acquire(path: &Path) -> std::io::Result<Self> {
        let file = if path.is_dir() {
            File::open(path)?
        } else {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)?
        };
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            loop {
                // SAFETY: the descriptor belongs to `file`, which outlives the call.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    break;
                }
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn holders_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (path, inside) = (path.clone(), inside.clone());
                std::thread::spawn(move || {
                    let _lock = FileLock::acquire(&path).unwrap();
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders at once"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
