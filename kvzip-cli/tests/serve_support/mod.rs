//! Helpers of the server tests: start the real `kvzip serve` on a free loopback port, talk raw
//! HTTP to it, and find a Python with the official `openai` client (a venv is made on first
//! use, from PyPI).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `openai` package version the tests pin.
pub const OPENAI_VERSION: &str = "3.51.0";

/// The model the server tests run (the small one, for speed), as the server reports it.
pub const MODEL: &str = "smollm2-135m-instruct";

/// A running `kvzip serve` process (killed on drop if still running).
pub struct ServerProc {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: Arc<Mutex<Vec<String>>>,
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

impl ServerProc {
    /// Starts `kvzip serve --port 0 <args>` and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvzip"))
            .arg("serve")
            .args(["--port", "0", "--model", MODEL])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kvzip serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("kvzip serve: http://") {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "kvzip serve did not start; its stderr:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Self {
            child,
            base: format!("http://{addr}"),
            log,
        }
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit (at most `timeout`); its exit status.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                t0.elapsed() < timeout,
                "the server did not exit; stderr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, headers we look at, body.
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, if sent.
    pub retry_after: Option<String>,
    /// Body text.
    pub body: String,
}

impl Reply {
    /// The body as JSON (panics with the body otherwise).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .build()
}

fn into_reply(r: Result<ureq::Response, ureq::Error>) -> Reply {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed without a response: {e}"),
    };
    Reply {
        status: resp.status(),
        retry_after: resp.header("retry-after").map(str::to_owned),
        body: resp.into_string().expect("read body"),
    }
}

/// Sends `method path` with an optional key and raw body.
pub fn call(base: &str, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Reply {
    let mut req = agent().request(method, &format!("{base}{path}"));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    into_reply(match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    })
}

/// POSTs a JSON value.
pub fn post(base: &str, path: &str, key: Option<&str>, body: &Value) -> Reply {
    call(base, "POST", path, key, Some(&body.to_string()))
}

/// Creates a context; returns its JSON (panics unless 200).
pub fn create_context(base: &str, key: Option<&str>, text: &str, ratio: f64) -> Value {
    let r = post(
        base,
        "/v1/contexts",
        key,
        &serde_json::json!({"text": text, "ratio": ratio}),
    );
    assert_eq!(r.status, 200, "create context: {}", r.body);
    r.json()
}

/// A greedy, non-streaming completion on `context_id`; returns the message text.
pub fn ask(
    base: &str,
    key: Option<&str>,
    context_id: &str,
    question: &str,
    max_tokens: usize,
) -> String {
    let body = serde_json::json!({
        "model": MODEL,
        "context_id": context_id,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
    });
    let r = post(base, "/v1/chat/completions", key, &body);
    assert_eq!(r.status, 200, "completion: {}", r.body);
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned()
}

/// A Python interpreter with `openai` installed: `$KVZIP_HOME/test-venv` (created and
/// filled from PyPI on first use).
pub fn openai_python() -> PathBuf {
    let home = kvzip_hub::fetch::default_cache_dir().expect("kvzip home");
    let venv = home.join("test-venv");
    let py = venv.join("bin").join("python");
    let has_openai = |py: &Path| {
        Command::new(py)
            .args([
                "-c",
                &format!("import openai, sys; sys.exit(openai.__version__ != '{OPENAI_VERSION}')"),
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if py.exists() && has_openai(&py) {
        return py;
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 -m venv {} failed (install python3-venv)",
        venv.display()
    );
    let ok = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("openai=={OPENAI_VERSION}"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "pip install openai=={OPENAI_VERSION} failed");
    assert!(
        has_openai(&py),
        "openai is still not importable from {}",
        py.display()
    );
    py
}

/// A context of a few hundred tokens with facts to ask about.
pub const DOCUMENT: &str = "The Harbor Street Library opened in 1911 in the town of Millbrook. \
Its first librarian was Agnes Whitfield, who ran it for thirty-two years and started the \
children's reading room in 1923. The building was designed by the architect Samuel Ortega and \
is made of red sandstone quarried at Cedar Hill. In 1958 a fire destroyed the east wing; it was \
rebuilt two years later with money raised at a series of summer fairs. The library holds about \
48,000 books, a collection of nautical maps donated by Captain Elias Brand, and the diaries of \
the Millbrook lighthouse keepers from 1870 to 1935. Since 2004 it has been open on Sundays from \
noon to five. The current director, Priya Raman, introduced a seed library in 2019 where \
residents borrow tomato, bean and squash seeds and return seeds from their harvest. The reading \
garden behind the building has a bronze statue of a heron by the sculptor Lena Maas. Every \
October the library hosts a lantern walk along the harbor that ends at the old ferry pier.";

/// Questions about [`DOCUMENT`].
pub const QUESTIONS: [&str; 8] = [
    "When did the library open?",
    "Who was the first librarian?",
    "What is the building made of?",
    "What happened in 1958?",
    "How many books does the library hold?",
    "Who is the current director?",
    "What did the director introduce in 2019?",
    "What is the statue in the reading garden?",
];
