//! `kvzip serve` end to end: the real server on loopback with the default model, driven by the
//! official `openai` Python client and by raw HTTP. Answers equal `kvzip run` (greedy), two
//! servers share contexts through one Redis, keys cannot see each other's contexts, every
//! malformed request gets an OpenAI-style 4xx error, a full queue answers 429 with
//! Retry-After, and SIGTERM lets running requests finish.

mod serve_support;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use kvzip_serve::testing::TestRedis;
use serde_json::{json, Value};
use serve_support::*;

/// One server test at a time: they share two CPU cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MAX_TOKENS: usize = 24;

/// A metric's value from `/metrics` text.
fn metric(base: &str, name: &str) -> f64 {
    let text = call(base, "GET", "/metrics", None, None).body;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
        .trim()
        .parse()
        .expect("metric value")
}

/// `kvzip run` answers on the same document, ratio and token limit.
fn kvzip_run_answers(dir: &std::path::Path) -> (Vec<String>, Value) {
    let doc = dir.join("doc.txt");
    std::fs::write(&doc, DOCUMENT).expect("write doc");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--model".into(),
        MODEL.into(),
        "--context".into(),
        doc.display().to_string(),
        "--ratio".into(),
        "0.3".into(),
        "--max-new-tokens".into(),
        MAX_TOKENS.to_string(),
        "--json".into(),
    ];
    for q in QUESTIONS {
        args.push("--query".into());
        args.push(q.into());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kvzip"))
        .args(&args)
        .output()
        .expect("run kvzip");
    assert!(
        out.status.success(),
        "kvzip run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("kvzip run JSON");
    let answers = v["answers"]
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| a["answer"].as_str().expect("answer").to_owned())
        .collect();
    (answers, v)
}

#[test]
fn openai_client_streams_equal_kvzip_run() {
    let _g = serial();
    let dir = scratch("openai");
    let store = dir.join("store");
    let srv = ServerProc::start(&["--store", store.to_str().unwrap(), "--max-batch", "8"]);
    let ctx = create_context(&srv.base, None, DOCUMENT, 0.3);
    let id = ctx["id"].as_str().expect("id").to_owned();
    let (expected, run) = kvzip_run_answers(&dir);
    assert_eq!(
        ctx["ratio_real"], run["ratio_real"],
        "same pruning as kvzip run"
    );
    assert_eq!(ctx["kv_bytes_kept"], run["kv_bytes_kept"]);
    assert_eq!(ctx["tokens"], run["n_ctx"]);

    let py = openai_python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new(&py)
        .args([
            script,
            &srv.base,
            "unused-key",
            MODEL,
            &id,
            &MAX_TOKENS.to_string(),
            &serde_json::to_string(&QUESTIONS).unwrap(),
        ])
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "openai client failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        srv.log()
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    assert_eq!(got["models"], json!([MODEL]));
    let streamed = got["stream"].as_array().expect("stream results");
    assert_eq!(streamed.len(), QUESTIONS.len());
    for (i, s) in streamed.iter().enumerate() {
        let text = s["text"].as_str().expect("text").trim();
        assert_eq!(
            text, expected[i],
            "question {:?}: streamed answer differs from kvzip run",
            QUESTIONS[i]
        );
        assert!(["stop", "length"].contains(&s["finish_reason"].as_str().unwrap_or("")));
        let usage = &s["usage"];
        assert!(usage["completion_tokens"].as_u64().unwrap() >= 1);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
    }
    assert_eq!(got["plain"]["text"].as_str().unwrap().trim(), expected[0]);
    assert_eq!(got["not_found"]["status"], 404);
    // The eight requests decoded together: far fewer batched steps than tokens.
    let steps = metric(&srv.base, "kvzip_decode_steps_total");
    let tokens = metric(&srv.base, "kvzip_generated_tokens_total");
    assert!(
        steps * 2.0 < tokens,
        "{steps} decode steps for {tokens} tokens: the requests were not batched"
    );
    // The shared context was never changed: answering again gives the same text.
    assert_eq!(
        ask(&srv.base, None, &id, QUESTIONS[1], MAX_TOKENS).trim(),
        expected[1]
    );
}

#[test]
fn two_servers_share_contexts_through_redis() {
    let _g = serial();
    let redis = TestRedis::start();
    let a = ServerProc::start(&["--store", redis.url()]);
    let b = ServerProc::start(&["--store", redis.url()]);
    let ctx = create_context(&a.base, None, DOCUMENT, 0.3);
    let id = ctx["id"].as_str().unwrap();
    let from_a = ask(&a.base, None, id, QUESTIONS[5], MAX_TOKENS);
    let from_b = ask(&b.base, None, id, QUESTIONS[5], MAX_TOKENS);
    assert_eq!(from_a, from_b, "server B answers from server A's context");
    assert_eq!(metric(&b.base, "kvzip_contexts_created_total"), 0.0);
    assert_eq!(metric(&b.base, "kvzip_context_store_loads_total"), 1.0);
    let listed = call(&b.base, "GET", "/v1/contexts", None, None).json();
    assert!(listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["id"] == id));
    let got = call(&b.base, "GET", &format!("/v1/contexts/{id}"), None, None).json();
    assert_eq!(got["kv_bytes_kept"], ctx["kv_bytes_kept"]);
    // Deleted through B: gone for A too.
    let del = call(&b.base, "DELETE", &format!("/v1/contexts/{id}"), None, None);
    assert_eq!(del.status, 200, "{}", del.body);
    let gone = call(&a.base, "GET", &format!("/v1/contexts/{id}"), None, None);
    assert_eq!(gone.status, 404);
}

#[test]
fn a_key_cannot_see_another_keys_context() {
    let _g = serial();
    let dir = scratch("keys");
    let store = dir.join("store");
    let srv = ServerProc::start(&[
        "--store",
        store.to_str().unwrap(),
        "--api-key",
        "key-one",
        "--api-key",
        "key-two",
    ]);
    let base = &srv.base;
    assert_eq!(call(base, "GET", "/health", None, None).status, 200);
    for path in ["/v1/models", "/v1/contexts", "/metrics"] {
        let r = call(base, "GET", path, None, None);
        assert_eq!(r.status, 401, "{path} without a key");
        assert_eq!(r.json()["error"]["type"], "authentication_error");
        assert_eq!(call(base, "GET", path, Some("wrong"), None).status, 401);
    }
    let ctx = create_context(base, Some("key-one"), DOCUMENT, 0.5);
    let id = ctx["id"].as_str().unwrap();
    assert!(
        id.starts_with("ctx-") && id.len() == 36,
        "unguessable id: {id}"
    );
    let path = format!("/v1/contexts/{id}");
    assert_eq!(call(base, "GET", &path, Some("key-one"), None).status, 200);
    let other = call(base, "GET", &path, Some("key-two"), None);
    assert_eq!(other.status, 404);
    assert_eq!(other.json()["error"]["code"], "context_not_found");
    let list = call(base, "GET", "/v1/contexts", Some("key-two"), None).json();
    assert_eq!(list["data"], json!([]));
    let chat = post(
        base,
        "/v1/chat/completions",
        Some("key-two"),
        &json!({"model": MODEL, "context_id": id, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(chat.status, 404, "{}", chat.body);
    assert_eq!(
        call(base, "DELETE", &path, Some("key-two"), None).status,
        404
    );
    assert!(!ask(base, Some("key-one"), id, QUESTIONS[0], 8).is_empty());
    assert_eq!(
        call(base, "DELETE", &path, Some("key-one"), None).status,
        200
    );
    assert_eq!(call(base, "GET", &path, Some("key-one"), None).status, 404);
}

/// Asserts an OpenAI-style error object with `status`.
fn expect_error(r: &Reply, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.body);
    let v = r.json();
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| m.len() > 10),
        "{what}: error without a message: {}",
        r.body
    );
    assert!(e["type"].is_string(), "{what}: error without a type");
}

#[test]
fn malformed_requests_get_openai_errors() {
    let _g = serial();
    let dir = scratch("malformed");
    let store = dir.join("store");
    let srv = ServerProc::start(&[
        "--store",
        store.to_str().unwrap(),
        "--max-body-bytes",
        "8KiB",
        "--max-context-tokens",
        "400",
        "--max-tokens",
        "32",
        "--max-suffix-tokens",
        "96",
    ]);
    let base = &srv.base;
    let ctx = create_context(base, None, DOCUMENT, 0.3);
    let id = ctx["id"].as_str().unwrap();
    let chat = |body: Value| post(base, "/v1/chat/completions", None, &body);
    let msgs = json!([{"role": "user", "content": "When did the library open?"}]);
    let ok = |extra: Value| {
        let mut b = json!({"model": MODEL, "context_id": id, "messages": msgs, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let raw = |body: &str| call(base, "POST", "/v1/chat/completions", None, Some(body));

    expect_error(&raw("{not json"), 400, "invalid JSON");
    expect_error(&raw(""), 400, "empty body");
    expect_error(&raw("[1, 2]"), 400, "JSON of the wrong shape");
    expect_error(&raw(r#"{"messages": []}"#), 400, "missing model");
    expect_error(&chat(ok(json!({"model": "gpt-9"}))), 404, "unknown model");
    expect_error(&chat(ok(json!({"messages": []}))), 400, "empty messages");
    expect_error(
        &chat(ok(
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
        )),
        400,
        "bad role",
    );
    expect_error(
        &chat(ok(json!({"messages": [{"role": "user", "content": 7}]}))),
        400,
        "content not text",
    );
    expect_error(
        &chat(ok(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        )),
        400,
        "image part",
    );
    expect_error(
        &chat(ok(
            json!({"messages": [{"role": "assistant", "content": "x"}]}),
        )),
        400,
        "last message not user",
    );
    expect_error(&chat(ok(json!({"temperature": 3.0}))), 400, "temperature");
    expect_error(
        &chat(ok(json!({"temperature": "hot"}))),
        400,
        "temperature type",
    );
    expect_error(&chat(ok(json!({"top_p": 0.0}))), 400, "top_p");
    expect_error(&chat(ok(json!({"max_tokens": 0}))), 400, "max_tokens 0");
    expect_error(
        &chat(ok(json!({"max_tokens": 1000}))),
        400,
        "max_tokens over the limit",
    );
    expect_error(
        &chat(ok(json!({"max_tokens": -5}))),
        400,
        "negative max_tokens",
    );
    expect_error(&chat(ok(json!({"n": 2}))), 400, "n");
    expect_error(
        &chat(ok(json!({"stop": ["a", "b", "c", "d", "e"]}))),
        400,
        "five stops",
    );
    expect_error(&chat(ok(json!({"logprobs": true}))), 400, "logprobs");
    expect_error(
        &chat(ok(
            json!({"messages": [{"role": "user", "content": "word ".repeat(200)}]}),
        )),
        400,
        "query longer than a slot",
    );
    expect_error(
        &chat(ok(
            json!({"context_id": "ctx-00000000000000000000000000000000"}),
        )),
        404,
        "unknown context",
    );
    expect_error(
        &chat(ok(json!({"context_id": "../../etc/passwd"}))),
        404,
        "path in context id",
    );
    let big = format!(
        r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(10_000)
    );
    expect_error(&raw(&big), 413, "body over --max-body-bytes");

    let ctx_req = |body: Value| post(base, "/v1/contexts", None, &body);
    expect_error(
        &ctx_req(json!({"text": DOCUMENT, "ratio": 0.0})),
        400,
        "ratio 0",
    );
    expect_error(
        &ctx_req(json!({"text": DOCUMENT, "ratio": 1.5})),
        400,
        "ratio 1.5",
    );
    expect_error(
        &ctx_req(json!({"text": DOCUMENT, "level": "galaxy"})),
        400,
        "level",
    );
    expect_error(
        &ctx_req(json!({"text": DOCUMENT, "kv_type": "retain"})),
        400,
        "kv_type retain",
    );
    expect_error(
        &ctx_req(json!({"text": DOCUMENT, "kv_type": "zip"})),
        400,
        "kv_type",
    );
    expect_error(&ctx_req(json!({"text": "  "})), 400, "empty context");
    expect_error(&ctx_req(json!({})), 400, "neither text nor messages");
    expect_error(
        &ctx_req(json!({"text": "a", "messages": []})),
        400,
        "both text and messages",
    );
    expect_error(
        &ctx_req(json!({"text": DOCUMENT, "colour": "red"})),
        400,
        "unknown field",
    );
    let long = "The harbor is quiet tonight. ".repeat(80);
    expect_error(
        &ctx_req(json!({"text": long})),
        400,
        "context over --max-context-tokens",
    );
    expect_error(
        &call(base, "GET", "/v1/contexts/ctx-zz", None, None),
        404,
        "malformed id",
    );
    expect_error(
        &call(base, "GET", "/v2/everything", None, None),
        404,
        "unknown endpoint",
    );
    expect_error(
        &call(base, "PUT", "/v1/chat/completions", None, Some("{}")),
        405,
        "wrong method",
    );

    // After all of that the server still answers.
    assert!(!ask(base, None, id, QUESTIONS[0], 4).is_empty());
    assert!(
        srv.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        srv.log()
    );
}

/// Streams a completion, returning the data lines; `on_first` runs after the first chunk.
fn stream_lines(
    base: &str,
    key: &str,
    id: &str,
    max_tokens: usize,
    on_first: impl FnOnce(),
) -> Vec<String> {
    let body = json!({
        "model": MODEL, "context_id": id, "stream": true, "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Tell me everything about the library."}],
    });
    let resp = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(&body.to_string())
        .expect("stream request");
    let mut lines = Vec::new();
    let mut on_first = Some(on_first);
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.expect("read stream");
        if let Some(d) = line.strip_prefix("data: ") {
            lines.push(d.to_owned());
            if let Some(f) = on_first.take() {
                f();
            }
        }
    }
    lines
}

#[test]
fn full_queue_gets_429_and_sigterm_drains() {
    let _g = serial();
    let dir = scratch("queue");
    let store = dir.join("store");
    let mut srv = ServerProc::start(&[
        "--store",
        store.to_str().unwrap(),
        "--api-key",
        "a",
        "--api-key",
        "b",
        "--api-key",
        "c",
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--max-concurrent-per-key",
        "1",
        "--max-tokens",
        "200",
        "--max-suffix-tokens",
        "256",
    ]);
    let base = srv.base.clone();
    let ctx = create_context(&base, Some("a"), DOCUMENT, 0.3);
    let id = ctx["id"].as_str().unwrap().to_owned();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (b0, id0) = (base.clone(), id.clone());
    // `a` streams a long answer: it holds the only batch slot.
    let long = std::thread::spawn(move || {
        stream_lines(&b0, "a", &id0, 200, move || {
            let _ = started_tx.send(());
        })
    });
    started_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("first chunk");
    // A second request of key `a` is over its concurrency limit.
    let r = post(
        &base,
        "/v1/chat/completions",
        Some("a"),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    expect_error(&r, 429, "per-key concurrency");
    assert_eq!(r.json()["error"]["code"], "concurrency_limit");
    // `b` waits in the queue (its one place); `c` finds the queue full.
    let b1 = base.clone();
    let queued = std::thread::spawn(move || {
        post(
            &b1,
            "/v1/chat/completions",
            Some("b"),
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = post(
        &base,
        "/v1/chat/completions",
        Some("c"),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    expect_error(&r, 429, "queue full");
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert_eq!(r.retry_after.as_deref(), Some("1"), "Retry-After on 429");
    // SIGTERM while `a` streams and `b` waits: both finish, then the server exits cleanly.
    srv.terminate();
    let lines = long.join().expect("stream thread");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("[DONE]"),
        "the running stream finished"
    );
    let finish = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["choices"][0]["finish_reason"].as_str().map(str::to_owned))
        .next_back();
    assert!(
        finish.is_some(),
        "the stream ended with a finish reason: {lines:?}"
    );
    let b = queued.join().expect("queued thread");
    assert_eq!(
        b.status, 200,
        "the queued request was served during the drain: {}",
        b.body
    );
    let status = srv.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        srv.log()
    );
    assert!(srv.log().contains("shutting down"));
}
