//! `cargo xtask load`: a load test of `kvzip serve` on loopback.
//!
//! Builds the release `kvzip`, starts `kvzip serve` (default model, CPU unless `--device`),
//! compresses `--contexts` Paul Graham essays, then sends `--requests` streaming completions
//! (`--max-tokens` each) from `--concurrency` client threads, round-robin over the contexts.
//! Checks every request got exactly one complete response (no errors, none lost, no duplicate
//! ids) and that device KV memory stayed within `--kv-budget`; reports p50/p99 time to first
//! token, latency, aggregate tokens/s and peak server memory as JSON (`--out`).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{repo_root, run};

/// Options of the load test.
struct Opts {
    requests: usize,
    concurrency: usize,
    contexts: usize,
    max_tokens: usize,
    context_chars: usize,
    kv_budget: String,
    device: String,
    model: String,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        requests: 1000,
        concurrency: 64,
        contexts: 8,
        max_tokens: 16,
        context_chars: 4000,
        kv_budget: "3GiB".into(),
        device: "cpu".into(),
        model: "smollm2-135m-instruct".into(),
        out: PathBuf::from("bench/serve/load-cpu.json"),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--requests" => o.requests = val()?.parse()?,
            "--concurrency" => o.concurrency = val()?.parse()?,
            "--contexts" => o.contexts = val()?.parse()?,
            "--max-tokens" => o.max_tokens = val()?.parse()?,
            "--context-chars" => o.context_chars = val()?.parse()?,
            "--kv-budget" => o.kv_budget = val()?,
            "--device" => o.device = val()?,
            "--model" => o.model = val()?,
            "--out" => o.out = PathBuf::from(val()?),
            other => bail!(
                "unknown flag {other}; flags: --requests --concurrency --contexts --max-tokens \
                 --context-chars --kv-budget --device --model --out"
            ),
        }
    }
    if o.requests == 0 || o.concurrency == 0 || o.contexts == 0 || o.max_tokens == 0 {
        bail!("--requests, --concurrency, --contexts and --max-tokens must be positive");
    }
    Ok(o)
}

/// The essays folder of the shared data (`$KVZIP_DATA_DIR/pg-essays`, else `../shared/data`).
fn essays_dir() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(d) = std::env::var("KVZIP_DATA_DIR") {
        candidates.push(PathBuf::from(d));
    }
    candidates.push(repo_root().join("../shared/data"));
    candidates.push(repo_root().join("shared/data"));
    candidates
        .into_iter()
        .map(|d| d.join("pg-essays"))
        .find(|d| d.is_dir())
        .context("no pg-essays folder: set KVZIP_DATA_DIR to the shared data folder")
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(o: &Opts, store: &Path) -> Result<Server> {
    let exe = repo_root().join("target/release/kvzip");
    let mut child = Command::new(&exe)
        .args([
            "serve", "--port", "0", "--model", &o.model, "--device", &o.device,
        ])
        .arg("--store")
        .arg(store)
        .args(["--kv-budget", &o.kv_budget])
        .args(["--max-batch", &o.concurrency.to_string()])
        .args(["--max-queue", &(o.concurrency * 4).to_string()])
        .args(["--max-concurrent-per-key", &(o.concurrency * 4).to_string()])
        .args(["--max-tokens", &o.max_tokens.to_string()])
        .args(["--max-suffix-tokens", &(o.max_tokens + 64).to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", exe.display()))?;
    let stderr = child.stderr.take().context("server stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            if let Some(rest) = line.strip_prefix("kvzip serve: http://") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(600))
        .context("the server did not start")?;
    Ok(Server {
        child,
        base: format!("http://{addr}"),
    })
}

/// What one request saw.
#[derive(Default, Clone)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    id: Option<String>,
    ttft_s: f64,
    latency_s: f64,
    completion_tokens: u64,
    done: bool,
}

fn one_request(
    agent: &ureq::Agent,
    base: &str,
    model: &str,
    context: &str,
    question: &str,
    max_tokens: usize,
) -> Outcome {
    let t0 = Instant::now();
    let body = json!({
        "model": model,
        "context_id": context,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut out = Outcome::default();
    let resp = match agent
        .post(&format!("{base}/v1/chat/completions"))
        .send_string(&body.to_string())
    {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            out.error = Some(format!("{code}: {}", r.into_string().unwrap_or_default()));
            return out;
        }
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    for line in BufReader::new(resp.into_reader()).lines() {
        let Ok(line) = line else {
            out.error = Some("stream cut".into());
            return out;
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            out.done = true;
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            out.error = Some(format!("bad chunk {data}"));
            return out;
        };
        if v.get("error").is_some() {
            out.error = Some(data.to_owned());
            return out;
        }
        out.id = v["id"].as_str().map(str::to_owned);
        let has_text = v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty());
        if has_text && out.ttft_s == 0.0 {
            out.ttft_s = t0.elapsed().as_secs_f64();
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            out.completion_tokens = n;
        }
    }
    out.latency_s = t0.elapsed().as_secs_f64();
    if out.ttft_s == 0.0 {
        out.ttft_s = out.latency_s;
    }
    out.ok = out.done && out.error.is_none() && out.completion_tokens > 0;
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `cargo xtask load [flags]`.
pub fn load(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let mut build = Command::new("cargo");
    build.args(["build", "--release", "-p", "kvzip-cli"]);
    if o.device.starts_with("cuda") {
        build.args(["--features", "cuda"]);
    }
    run(build.current_dir(repo_root()))?;
    let store = std::env::temp_dir().join(format!("kvzip-load-{}", std::process::id()));
    let server = start_server(&o, &store)?;
    let base = server.base.clone();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .max_idle_connections_per_host(o.concurrency)
        .build();

    let models: Value = agent
        .get(&format!("{base}/v1/models"))
        .call()?
        .into_json()?;
    let model = models["data"][0]["id"]
        .as_str()
        .context("GET /v1/models lists no model")?
        .to_owned();
    let mut files: Vec<PathBuf> = std::fs::read_dir(essays_dir()?)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut contexts = Vec::new();
    for f in files.iter().cycle().take(o.contexts) {
        let text = std::fs::read_to_string(f)?;
        let mut end = o.context_chars.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let body = json!({"text": &text[..end], "ratio": 0.3});
        let t0 = Instant::now();
        let r: Value = agent
            .post(&format!("{base}/v1/contexts"))
            .send_string(&body.to_string())
            .with_context(|| format!("compress {}", f.display()))?
            .into_json()?;
        eprintln!(
            "context {} from {}: {} tokens, ratio_real {:.3}, {:.1} s",
            r["id"].as_str().unwrap_or("?"),
            f.file_name().unwrap_or_default().to_string_lossy(),
            r["tokens"],
            r["ratio_real"].as_f64().unwrap_or(0.0),
            t0.elapsed().as_secs_f64()
        );
        contexts.push(r);
    }
    let ids: Vec<String> = contexts
        .iter()
        .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let questions = [
        "What is the main point of this essay?",
        "Summarize the first paragraph.",
        "Who is the author talking to?",
        "What example does the author give?",
        "What does the author recommend?",
        "What is the title of this essay?",
        "Name one idea from the text.",
        "What problem does the essay describe?",
    ];

    // Monitor memory while the load runs.
    let pid = server.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let peak_rss_kb = Arc::new(AtomicUsize::new(0));
    let monitor = {
        let (stop, peak, agent, base) = (
            stop.clone(),
            peak_rss_kb.clone(),
            agent.clone(),
            base.clone(),
        );
        std::thread::spawn(move || {
            let mut peak_device = 0f64;
            while !stop.load(SeqCst) {
                if let Some(kb) = proc_status_kb(pid, "VmRSS:") {
                    peak.fetch_max(kb as usize, SeqCst);
                }
                if let Ok(r) = agent.get(&format!("{base}/metrics")).call() {
                    let text = r.into_string().unwrap_or_default();
                    peak_device = peak_device.max(metric(&text, "kvzip_kv_bytes{tier=\"device\"}"));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            peak_device
        })
    };

    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(o.requests)));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..o.concurrency)
        .map(|_| {
            let (next, outcomes, agent, base, ids, model) = (
                next.clone(),
                outcomes.clone(),
                agent.clone(),
                base.clone(),
                ids.clone(),
                model.clone(),
            );
            let (n, max_tokens) = (o.requests, o.max_tokens);
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, SeqCst);
                if i >= n {
                    break;
                }
                let out = one_request(
                    &agent,
                    &base,
                    &model,
                    &ids[i % ids.len()],
                    questions[i % questions.len()],
                    max_tokens,
                );
                outcomes.lock().unwrap().push(out);
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    stop.store(true, SeqCst);
    let peak_device_sampled = monitor.join().unwrap_or(f64::NAN);
    let metrics_text = agent
        .get(&format!("{base}/metrics"))
        .call()?
        .into_string()?;
    let server_hwm_kb = proc_status_kb(pid, "VmHWM:");

    let outcomes = outcomes.lock().unwrap().clone();
    let errors: Vec<&String> = outcomes.iter().filter_map(|x| x.error.as_ref()).collect();
    let lost = outcomes
        .iter()
        .filter(|x| x.error.is_none() && !x.done)
        .count()
        + o.requests.saturating_sub(outcomes.len());
    let mut seen = HashSet::new();
    let duplicated = outcomes
        .iter()
        .filter_map(|x| x.id.as_ref())
        .filter(|id| !seen.insert((*id).clone()))
        .count();
    let ok: Vec<&Outcome> = outcomes.iter().filter(|x| x.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().map(|x| x.ttft_s).collect();
    let mut lat: Vec<f64> = ok.iter().map(|x| x.latency_s).collect();
    ttft.sort_by(f64::total_cmp);
    lat.sort_by(f64::total_cmp);
    let tokens: u64 = ok.iter().map(|x| x.completion_tokens).sum();
    let budget = metric(&metrics_text, "kvzip_kv_budget_bytes{tier=\"device\"}");
    let peak_device = metric(&metrics_text, "kvzip_kv_bytes_peak{tier=\"device\"}");
    let report = json!({
        "device": o.device,
        "model": o.model,
        "requests": o.requests,
        "concurrency": o.concurrency,
        "contexts": o.contexts,
        "context_tokens": contexts.iter().map(|c| c["tokens"].clone()).collect::<Vec<_>>(),
        "max_tokens": o.max_tokens,
        "completed": ok.len(),
        "errors": errors.len(),
        "first_errors": errors.iter().take(5).collect::<Vec<_>>(),
        "lost": lost,
        "duplicated": duplicated,
        "wall_s": wall,
        "ttft_s": {"p50": percentile(&ttft, 0.5), "p99": percentile(&ttft, 0.99), "max": ttft.last()},
        "latency_s": {"p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99)},
        "completion_tokens": tokens,
        "tokens_per_s": tokens as f64 / wall,
        "requests_per_s": ok.len() as f64 / wall,
        "decode_steps": metric(&metrics_text, "kvzip_decode_steps_total"),
        "mean_batch": metric(&metrics_text, "kvzip_generated_tokens_total") / metric(&metrics_text, "kvzip_decode_steps_total").max(1.0),
        "kv_budget_bytes": budget,
        "device_kv_peak_bytes": peak_device,
        "device_kv_peak_sampled_bytes": peak_device_sampled,
        "server_peak_rss_bytes": server_hwm_kb.map(|k| k * 1024),
        "server_peak_rss_sampled_bytes": peak_rss_kb.load(SeqCst) * 1024,
    });
    let out = repo_root().join(&o.out);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", out.display());
    drop(server);
    let _ = std::fs::remove_dir_all(&store);
    if !errors.is_empty() || lost > 0 || duplicated > 0 || ok.len() != o.requests {
        bail!(
            "load test failed: {} errors, {lost} lost, {duplicated} duplicated",
            errors.len()
        );
    }
    if peak_device > budget {
        bail!("device KV peak {peak_device} bytes exceeded the budget {budget}");
    }
    Ok(())
}
