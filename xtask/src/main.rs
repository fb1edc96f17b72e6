//! `cargo xtask <task>`: developer tasks that are not plain cargo commands.
//!
//! - `test`: the README test command: installs what the tests need (redis-server), starts a
//!   private Redis for the server tests, runs `cargo test --workspace`, stops Redis.
//! - `fuzz TARGET|all --seconds N`: mutation fuzzing of every parser (see `fuzz.rs`), figures
//!   to `bench/fuzz/`.
//! - `load`: load test of `kvzip serve` on loopback (see `load.rs`), JSON to `bench/serve/`.
//! - `cpu-bench`: the CPU engine against llama.cpp (built from the `llama-cpp-python` sdist)
//!   on the same GGUF files, ABBA rounds, JSON + markdown to `bench/cpu/` (see `cpu_bench.rs`).
//! - `ci`: run `.ci/run` (fmt, clippy, cuda build check, tests) exactly as CI does.
//! - `fixtures [parity|scores|templates|real]`: regenerate committed fixtures with the Python
//!   scripts in `scripts/` (needs a Python with torch + transformers; set `KVZIP_PYTHON`).
//! - `gpu`: build the GPU bundle here (no GPU needed): every CUDA test binary (`cuda_*`,
//!   `gpu_*`, `kvzip_flow`) and the release `kvzip-bench`, copied into `.gpu/bundle/` and packed
//!   into `.gpu/bundle.tar.xz` (git-ignored; carry it to the GPU machine), then run
//!   `bash scripts/gpu/run-all.sh` there
//!   (tests, memcheck, benchmark, HF peer). `KVZIP_OLD_BENCH=/path/to/kvzip-bench` also copies
//!   an earlier build's benchmark into `.gpu/bundle/old/`, which run-all.sh then measures in
//!   the same call, interleaved with the new one (regression checks).
//! - `bench`: on a machine with a GPU, build and run `kvzip-bench` and the HF peer
//!   (`scripts/gpu/hf_peer.py`), writing `bench/gpu/kvzip.json` and `bench/gpu/hf_peer.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod cpu_bench;
mod fuzz;
mod load;
mod testing;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn fixtures(which: &[String]) -> Result<()> {
    let python = std::env::var("KVZIP_PYTHON").unwrap_or_else(|_| "python3".into());
    let all = ["parity", "scores", "templates", "real"];
    let selected: Vec<&str> = if which.is_empty() {
        all.to_vec()
    } else {
        which.iter().map(String::as_str).collect()
    };
    for name in selected {
        let script = match name {
            "parity" => "scripts/make_parity_fixtures.py",
            "scores" => "scripts/make_score_fixtures.py",
            "templates" => "scripts/make_template_fixtures.py",
            "real" => "scripts/make_real_model_fixtures.py",
            other => bail!("unknown fixture set {other:?}; expected one of {all:?}"),
        };
        run(Command::new(&python).arg(script).current_dir(repo_root()))?;
    }
    Ok(())
}

/// Builds the CUDA test binaries and the release benchmark into `.gpu/bundle`.
fn gpu_bundle() -> Result<()> {
    let root = repo_root();
    let bundle = root.join(".gpu/bundle");
    if bundle.exists() {
        std::fs::remove_dir_all(&bundle).with_context(|| format!("clear {}", bundle.display()))?;
    }
    std::fs::create_dir_all(bundle.join("tests"))?;
    let output = Command::new("cargo")
        .args([
            "test",
            "--no-run",
            "--features",
            "cuda",
            "-p",
            "kvzip-kernels",
            "-p",
            "kvzip-cache",
            "-p",
            "kvzip-tests",
            "--message-format=json",
        ])
        .current_dir(&root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the CUDA test binaries failed");
    }
    let mut copied = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        if name.starts_with("cuda_")
            || name.starts_with("gpu_")
            || name == "kvzip_flow"
            || name == "batch"
        {
            let dest = bundle.join("tests").join(name);
            std::fs::copy(exe, &dest).with_context(|| format!("copy {exe}"))?;
            strip(&dest);
            copied += 1;
        }
    }
    if copied == 0 {
        bail!("no cuda_* / gpu_* / kvzip_flow test binaries were built");
    }
    run(Command::new("cargo")
        .args([
            "build",
            "--release",
            "--features",
            "cuda",
            "-p",
            "kvzip-bench",
        ])
        .current_dir(&root))?;
    std::fs::copy(
        root.join("target/release/kvzip-bench"),
        bundle.join("kvzip-bench"),
    )?;
    strip(&bundle.join("kvzip-bench"));
    // The CLI too, for end-to-end runs on the GPU machine (`kvzip run --device cuda`).
    run(Command::new("cargo")
        .args([
            "build",
            "--release",
            "--features",
            "cuda",
            "-p",
            "kvzip-cli",
        ])
        .current_dir(&root))?;
    std::fs::copy(root.join("target/release/kvzip"), bundle.join("kvzip"))?;
    strip(&bundle.join("kvzip"));
    if let Some(old) = std::env::var_os("KVZIP_OLD_BENCH") {
        std::fs::create_dir_all(bundle.join("old"))?;
        std::fs::copy(&old, bundle.join("old/kvzip-bench"))
            .with_context(|| format!("copy KVZIP_OLD_BENCH {}", Path::new(&old).display()))?;
        strip(&bundle.join("old/kvzip-bench"));
    }
    let size: u64 = walk_size(&bundle);
    // The binaries compress about 10x (mostly debug-free code and embedded cubins); the archive
    // is what travels to the GPU machine (`carry: [".gpu/bundle.tar.xz"]`), and run-all.sh
    // unpacks it there.
    let archive = root.join(".gpu/bundle.tar.xz");
    run(Command::new("tar")
        .arg("-cJf")
        .arg(&archive)
        .arg("-C")
        .arg(root.join(".gpu"))
        .arg("bundle"))?;
    let packed = std::fs::metadata(&archive)?.len();
    eprintln!(
        "bundle: {copied} test binaries + kvzip-bench, {:.1} MiB in {} ({:.1} MiB as {})",
        size as f64 / (1 << 20) as f64,
        bundle.display(),
        packed as f64 / (1 << 20) as f64,
        archive.display()
    );
    if packed > 60 << 20 {
        bail!("the bundle archive is over 60 MiB; the GPU machine takes 64 MiB per call");
    }
    Ok(())
}

/// Drops debug info from a carried binary when `strip` exists (keeps the bundle small).
fn strip(path: &Path) {
    let _ = Command::new("strip").arg("--strip-all").arg(path).status();
}

fn walk_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        walk_size(&p)
                    } else {
                        e.metadata().map_or(0, |m| m.len())
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Runs the benchmark and the HF peer on this machine's GPU.
fn bench(extra: &[String]) -> Result<()> {
    let root = repo_root();
    run(Command::new("cargo")
        .args([
            "run",
            "--release",
            "--features",
            "cuda",
            "-p",
            "kvzip-bench",
            "--",
            "--out",
            "bench/gpu/kvzip.json",
        ])
        .args(extra)
        .current_dir(&root))?;
    let python = std::env::var("KVZIP_PYTHON").unwrap_or_else(|_| "python3".into());
    run(Command::new(python)
        .args(["scripts/gpu/hf_peer.py", "--out", "bench/gpu/hf_peer.json"])
        .current_dir(&root))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => testing::test(&args[1..]),
        Some("load") => load::load(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("cpu-bench") => cpu_bench::main(&args[1..]),
        Some("ci") => run(Command::new("bash").arg(".ci/run").current_dir(repo_root())),
        Some("fixtures") => fixtures(&args[1..]),
        Some("gpu") => gpu_bundle(),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask test [cargo test args] | load [flags] | fuzz TARGET|all --seconds N | ci | gpu | bench [kvzip-bench args] | fixtures [parity|scores|templates|real]"
            );
            bail!("no task given")
        }
    }
}
