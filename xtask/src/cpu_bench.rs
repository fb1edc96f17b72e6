//! `cargo xtask cpu-bench`: the CPU engine against llama.cpp on the same GGUF files.
//!
//! llama.cpp is built once from the vendored source of the `llama-cpp-python` sdist on PyPI
//! (pinned version and SHA-256; cmake and ninja from PyPI when missing) into
//! `$KVZIP_HOME/llama.cpp/<version>/`. Both engines then run interleaved in ABBA rounds
//! (llama.cpp, kvzip-rs, kvzip-rs, llama.cpp, …) on each model and prompt length, with the
//! same thread count: llama.cpp through `llama-bench` (prefill of N random tokens; decode of
//! M tokens at depth N), kvzip-rs through `kvzip-bench --cpu-engine` (prefill of N seeded
//! random tokens, M greedy decode steps), each as its own process so that its peak RSS
//! (`wait4` maxrss) is the measured work's alone. KVzip scoring time over prefill time is
//! measured once per model at the longest prompt. Medians go to `bench/cpu/cpu-bench.json`
//! and a markdown table `bench/cpu/cpu-bench.md`.
//!
//! Options: `--models a,b` (default smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct),
//! `--prompts 512,2048`, `--new-tokens 64`, `--rounds 2` (ABBA pairs), `--threads 2`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{repo_root, run};

/// The pinned llama.cpp source: the `llama-cpp-python` sdist and its SHA-256.
const LLAMA_CPP_PYTHON: &str = "0.3.36";
const SDIST_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";

struct Options {
    models: Vec<String>,
    prompts: Vec<usize>,
    new_tokens: usize,
    rounds: usize,
    threads: usize,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        models: vec![
            "smollm2-135m-instruct".into(),
            "qwen2.5-coder-0.5b-instruct".into(),
        ],
        prompts: vec![512, 2048],
        new_tokens: 64,
        rounds: 2,
        threads: 2,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        let number = |v: &String| -> Result<usize> {
            v.parse()
                .with_context(|| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--models" => o.models = value()?.split(',').map(str::to_owned).collect(),
            "--prompts" => {
                o.prompts = value()?
                    .split(',')
                    .map(|v| number(&v.to_owned()))
                    .collect::<Result<_>>()?
            }
            "--new-tokens" => o.new_tokens = number(value()?)?,
            "--rounds" => o.rounds = number(value()?)?.max(1),
            "--threads" => o.threads = number(value()?)?.max(1),
            other => bail!("cpu-bench: unknown option {other:?} (--models, --prompts, --new-tokens, --rounds, --threads)"),
        }
    }
    Ok(o)
}

/// `$KVZIP_HOME`, else `$HOME/.cache/kvzip` (the CLI's cache).
fn kvzip_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("KVZIP_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME").context("set KVZIP_HOME or HOME")?;
    Ok(PathBuf::from(home).join(".cache/kvzip"))
}

/// A program on PATH?
fn on_path(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds `llama-bench` once; returns its path.
fn ensure_llama_cpp(home: &Path) -> Result<PathBuf> {
    let root = home.join("llama.cpp").join(LLAMA_CPP_PYTHON);
    let bin = root.join("build/bin/llama-bench");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&root)?;
    let sdist = root.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"));
    if !sdist.exists() {
        // curl: xtask's HTTP client is built without TLS.
        let index = Command::new("curl")
            .args(["-fsSL", "https://pypi.org/simple/llama-cpp-python/"])
            .output()
            .context("curl (needed to download the llama.cpp source from PyPI)")?;
        if !index.status.success() {
            bail!("curl could not read the PyPI simple index of llama-cpp-python");
        }
        let index = String::from_utf8_lossy(&index.stdout);
        let file = format!("llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz");
        let url = index
            .split("href=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .find(|u| u.contains(&file))
            .map(|u| u.split('#').next().unwrap_or(u).to_owned())
            .with_context(|| format!("{file} is not on the PyPI index"))?;
        eprintln!("cpu-bench: downloading {url}");
        let tmp = root.join(".sdist.part");
        run(Command::new("curl")
            .args(["-fsSL", "-o"])
            .arg(&tmp)
            .arg(&url))?;
        std::fs::rename(&tmp, &sdist)?;
    }
    let sum = Command::new("sha256sum").arg(&sdist).output()?;
    let got = String::from_utf8_lossy(&sum.stdout);
    if !got.starts_with(SDIST_SHA256) {
        let _ = std::fs::remove_file(&sdist);
        bail!(
            "{} has SHA-256 {}, expected {SDIST_SHA256}; removed, rerun to download again",
            sdist.display(),
            got.split_whitespace().next().unwrap_or("?")
        );
    }
    let src = root.join(format!(
        "llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
    ));
    if !src.exists() {
        run(Command::new("tar")
            .arg("-xzf")
            .arg(&sdist)
            .arg("-C")
            .arg(&root))?;
    }
    // cmake + ninja: from PATH, else a private venv filled from PyPI.
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if !on_path("cmake") || !on_path("ninja") {
        let venv = home.join("build-venv");
        if !venv.join("bin/cmake").exists() {
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
            run(Command::new(venv.join("bin/pip")).args(["install", "-q", "cmake", "ninja"]))?;
        }
        let mut dirs = vec![venv.join("bin")];
        dirs.extend(std::env::split_paths(&path));
        path = std::env::join_paths(dirs)?;
    }
    let build = root.join("build");
    run(Command::new("cmake")
        .env("PATH", &path)
        .arg("-S")
        .arg(&src)
        .arg("-B")
        .arg(&build)
        .args([
            "-G",
            "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
        ]))?;
    run(Command::new("cmake")
        .env("PATH", &path)
        .arg("--build")
        .arg(&build)
        .args(["--target", "llama-bench"]))?;
    if !bin.exists() {
        bail!("the llama.cpp build finished without {}", bin.display());
    }
    Ok(bin)
}

/// Runs `cmd`, returning its stdout and peak RSS in bytes (`wait4`'s maxrss of that child).
fn run_measured(cmd: &mut Command) -> Result<(String, u64)> {
    eprintln!("+ {cmd:?}");
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.context("child stdout")?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text)?;
    let mut status = 0;
    // SAFETY: rusage is plain data, zero is a valid value; pid is our own unreaped child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 on {cmd:?} failed");
    }
    let status = std::process::ExitStatus::from_raw(status);
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok((text, usage.ru_maxrss as u64 * 1024))
}

/// One llama.cpp measurement: prefill tok/s at `n`, decode tok/s at depth `n`, peak RSS.
fn llama_cpp(bin: &Path, gguf: &Path, n: usize, new: usize, threads: usize) -> Result<Value> {
    let (pp_text, pp_rss) = run_measured(
        Command::new(bin)
            .arg("-m")
            .arg(gguf)
            .args(["-p", &n.to_string(), "-n", "0", "-r", "1", "-o", "json"])
            .args(["-t", &threads.to_string()]),
    )?;
    let (tg_text, tg_rss) = run_measured(
        Command::new(bin)
            .arg("-m")
            .arg(gguf)
            .args(["-p", "0", "-n", &new.to_string(), "-d", &n.to_string()])
            .args(["-r", "1", "-o", "json", "-t", &threads.to_string()]),
    )?;
    let ts = |text: &str, what: &str| -> Result<f64> {
        let v: Value = serde_json::from_str(text)
            .with_context(|| format!("llama-bench {what} output is not JSON: {text}"))?;
        v.as_array()
            .and_then(|a| a.first())
            .and_then(|r| r["avg_ts"].as_f64())
            .with_context(|| format!("llama-bench {what}: no avg_ts in {text}"))
    };
    Ok(json!({
        "prefill_tok_s": ts(&pp_text, "prefill")?,
        "decode_tok_s": ts(&tg_text, "decode")?,
        "peak_rss_bytes": pp_rss.max(tg_rss),
    }))
}

/// One kvzip-rs measurement (see kvzip-bench's `--cpu-engine`).
fn kvzip(
    bench: &Path,
    dir: &Path,
    n: usize,
    new: usize,
    threads: usize,
    score: bool,
) -> Result<Value> {
    let mut cmd = Command::new(bench);
    cmd.arg("--cpu-engine")
        .arg(dir)
        .args([
            "--prompt-tokens",
            &n.to_string(),
            "--new-tokens",
            &new.to_string(),
        ])
        .env("RAYON_NUM_THREADS", threads.to_string());
    if score {
        cmd.arg("--score");
    }
    let (text, rss) = run_measured(&mut cmd)?;
    let mut v: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("kvzip-bench output is not JSON: {text}"))?;
    v["peak_rss_bytes"] = json!(rss);
    Ok(v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn medians(runs: &[Value], key: &str) -> f64 {
    median(runs.iter().filter_map(|r| r[key].as_f64()).collect())
}

/// Entry point of `cargo xtask cpu-bench`.
pub fn main(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let root = repo_root();
    let home = kvzip_home()?;
    let llama = ensure_llama_cpp(&home)?;
    run(Command::new("cargo")
        .args(["build", "--release", "-p", "kvzip-bench", "-p", "kvzip-cli"])
        .current_dir(&root))?;
    let bench = root.join("target/release/kvzip-bench");
    let cli = root.join("target/release/kvzip");
    let mut rows = Vec::new();
    for model in &o.models {
        // The CLI fetches the GGUF from PyPI and imports it once (cached).
        run(Command::new(&cli).args(["fetch", model]))?;
        let gguf = home.join("gguf").join(format!("{model}.gguf"));
        let dir = home.join("models").join(model);
        if !gguf.exists() || !dir.exists() {
            bail!(
                "{model}: expected {} and {} after fetch",
                gguf.display(),
                dir.display()
            );
        }
        for &n in &o.prompts {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for round in 0..o.rounds {
                // ABBA: the order flips every round so drift cancels.
                if round % 2 == 0 {
                    theirs.push(llama_cpp(&llama, &gguf, n, o.new_tokens, o.threads)?);
                    ours.push(kvzip(&bench, &dir, n, o.new_tokens, o.threads, false)?);
                } else {
                    ours.push(kvzip(&bench, &dir, n, o.new_tokens, o.threads, false)?);
                    theirs.push(llama_cpp(&llama, &gguf, n, o.new_tokens, o.threads)?);
                }
            }
            let (pp, tg) = (
                medians(&ours, "prefill_tok_s"),
                medians(&ours, "decode_tok_s"),
            );
            let (lpp, ltg) = (
                medians(&theirs, "prefill_tok_s"),
                medians(&theirs, "decode_tok_s"),
            );
            let (rss, lrss) = (
                medians(&ours, "peak_rss_bytes"),
                medians(&theirs, "peak_rss_bytes"),
            );
            rows.push(json!({
                "model": model, "prompt_tokens": n, "new_tokens": o.new_tokens,
                "kvzip": {"prefill_tok_s": pp, "decode_tok_s": tg, "peak_rss_bytes": rss},
                "llama_cpp": {"prefill_tok_s": lpp, "decode_tok_s": ltg, "peak_rss_bytes": lrss},
                "ratio": {"prefill": pp / lpp, "decode": tg / ltg, "peak_rss": rss / lrss},
                "runs": {"kvzip": ours, "llama_cpp": theirs},
            }));
        }
        let n = *o.prompts.iter().max().unwrap_or(&2048);
        let score = kvzip(&bench, &dir, n, o.new_tokens, o.threads, true)?;
        rows.push(json!({"model": model, "prompt_tokens": n, "scoring": score}));
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let report = json!({
        "command": format!("cargo xtask cpu-bench {}", args.join(" ")),
        "llama_cpp": format!("llama-cpp-python {LLAMA_CPP_PYTHON} sdist (vendored llama.cpp), llama-bench"),
        "threads": o.threads, "rounds": o.rounds, "cpu": cpu.trim_start_matches("model name").trim_start_matches([' ', '\t', ':']),
        "rows": rows,
    });
    let out = root.join("bench/cpu");
    std::fs::create_dir_all(&out)?;
    let write = |name: &str, text: &str| -> Result<()> {
        let tmp = out.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, out.join(name))?;
        Ok(())
    };
    write("cpu-bench.json", &serde_json::to_string_pretty(&report)?)?;
    let mut md = String::from(
        "| model | prompt | prefill tok/s (ours / llama.cpp = ratio) | decode tok/s (ours / llama.cpp = ratio) | peak RSS MB (ours / llama.cpp = ratio) |\n|---|---|---|---|---|\n",
    );
    let mut scoring = String::new();
    for r in report["rows"].as_array().into_iter().flatten() {
        if let Some(s) = r.get("scoring") {
            scoring.push_str(&format!(
                "- {} at {} tokens: scoring {:.0} ms / prefill {:.0} ms = {:.2}× prefill\n",
                r["model"].as_str().unwrap_or("?"),
                r["prompt_tokens"],
                s["scoring_ms"].as_f64().unwrap_or(f64::NAN),
                s["prefill_ms"].as_f64().unwrap_or(f64::NAN),
                s["scoring_over_prefill"].as_f64().unwrap_or(f64::NAN)
            ));
            continue;
        }
        let f = |a: &str, k: &str| r[a][k].as_f64().unwrap_or(f64::NAN);
        md.push_str(&format!(
            "| {} | {} | {:.0} / {:.0} = {:.2} | {:.1} / {:.1} = {:.2} | {:.0} / {:.0} = {:.2} |\n",
            r["model"].as_str().unwrap_or("?"),
            r["prompt_tokens"],
            f("kvzip", "prefill_tok_s"),
            f("llama_cpp", "prefill_tok_s"),
            f("ratio", "prefill"),
            f("kvzip", "decode_tok_s"),
            f("llama_cpp", "decode_tok_s"),
            f("ratio", "decode"),
            f("kvzip", "peak_rss_bytes") / 1e6,
            f("llama_cpp", "peak_rss_bytes") / 1e6,
            f("ratio", "peak_rss"),
        ));
    }
    md.push_str(&format!(
        "\nKVzip scoring on the CPU:\n{scoring}\n{} threads, {} ABBA rounds, medians; `{}`.\n",
        o.threads,
        o.rounds,
        report["command"].as_str().unwrap_or("")
    ));
    write("cpu-bench.md", &md)?;
    print!("{md}");
    Ok(())
}
