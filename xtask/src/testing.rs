//! `cargo xtask test`: everything the test suite needs, then `cargo test --workspace`.
//!
//! Installs `redis-server` from the OS package manager when it is missing (apt-get, as root
//! or through sudo), starts a private one on a free loopback port for the server tests
//! (`KVZIP_TEST_REDIS`), runs the tests, and stops Redis afterwards whatever the outcome.
//! The `openai` Python client is installed by the server tests themselves into
//! `$KVZIP_HOME/test-venv` (from PyPI) on first use.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{repo_root, run};

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs `redis-server` with apt-get when it is not on the PATH.
pub fn ensure_redis() -> Result<()> {
    if have("redis-server") {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("redis-server is missing and there is no apt-get: install Redis with your package manager");
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| {
        let mut all: Vec<&str> = sudo.to_vec();
        all.push("apt-get");
        all.extend_from_slice(args);
        let mut cmd = Command::new(all[0]);
        cmd.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    eprintln!("xtask: installing redis-server (apt-get)");
    if apt(&["install", "-y", "-q", "redis-server"]).is_err() {
        apt(&["update", "-q"])?;
        apt(&["install", "-y", "-q", "redis-server"])?;
    }
    if !have("redis-server") {
        bail!("redis-server is still missing after apt-get install");
    }
    Ok(())
}

/// A private redis-server, killed on drop.
pub struct Redis {
    child: Child,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    _dir: tempdir::TempDir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Redis {
    /// Starts redis-server on a free loopback port, without persistence.
    pub fn start() -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("kvzip-redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .context("start redis-server")?;
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t0.elapsed() > Duration::from_secs(15) {
                bail!("redis-server did not listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: tempdir::TempDir(dir),
        })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cargo xtask test [cargo test args]`.
pub fn test(extra: &[String]) -> Result<()> {
    ensure_redis()?;
    let redis = Redis::start()?;
    eprintln!("xtask: redis for the tests at {}", redis.url);
    let result = run(Command::new("cargo")
        .args(["test", "--workspace"])
        .args(extra)
        .env("KVZIP_TEST_REDIS", &redis.url)
        .current_dir(repo_root()));
    drop(redis);
    eprintln!("xtask: redis stopped");
    result
}
