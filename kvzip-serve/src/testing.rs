//! Test support: a Redis server for tests. `KVZIP_TEST_REDIS=redis://host:port` (set by
//! `cargo xtask test`, which installs and starts one) is used as is; otherwise a private
//! `redis-server` is started on a free loopback port and stopped on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Redis server for one test.
pub struct TestRedis {
    url: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl TestRedis {
    /// The shared server of `KVZIP_TEST_REDIS`, or a private one. Panics with the fix when
    /// neither is available (tests must not silently skip).
    pub fn start() -> Self {
        if let Ok(url) = std::env::var("KVZIP_TEST_REDIS") {
            if !url.is_empty() {
                return Self {
                    url,
                    child: None,
                    _dir: None,
                };
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it (apt-get install redis-server) \
                     or run the tests with `cargo xtask test`, which does"
                )
            });
        let url = format!("redis://127.0.0.1:{port}");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not start listening on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            url,
            child: Some(child),
            _dir: Some(dir),
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
