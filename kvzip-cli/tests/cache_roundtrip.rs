//! Process-level test of `kvzip run --save-cache` / `--load-cache` on the default model (fetched
//! by the CLI when missing): a cache compressed by one process answers identically in another,
//! and truncated, foreign or mismatched cache files are clear errors, not panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const CONTEXT: &str =
    "This is my basic profile. My name is Kim living in Seoul. My major is computer science.";
const QUERIES: [&str; 2] = ["What is my name?", "Do I live in Seoul?"];

/// A fresh scratch directory for one test under cargo's per-target temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cache_roundtrip-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn kvzip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvzip"))
        .args(args)
        .output()
        .expect("run the kvzip binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `kvzip run ... --json` and parses its one JSON object; panics with stderr on failure.
fn run_json(args: &[&str]) -> Value {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    for q in QUERIES {
        all.extend_from_slice(&["--query", q]);
    }
    all.extend_from_slice(&["--max-new-tokens", "24", "--json"]);
    let out = kvzip(&all);
    assert!(
        out.status.success(),
        "kvzip {all:?} failed: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", text(&out.stdout)))
}

fn answers(v: &Value) -> Vec<(String, String)> {
    v["answers"]
        .as_array()
        .expect("answers list")
        .iter()
        .map(|a| {
            (
                a["query"].as_str().expect("query").to_owned(),
                a["answer"].as_str().expect("answer").to_owned(),
            )
        })
        .collect()
}

/// Writes the context and compresses it into `<dir>/ctx.kvc` in one process; returns the
/// cache path and that process's JSON.
fn save_cache(dir: &Path) -> (PathBuf, Value) {
    let context = dir.join("context.txt");
    std::fs::write(&context, CONTEXT).expect("write context");
    let cache = dir.join("ctx.kvc");
    let saved = run_json(&[
        "--context",
        context.to_str().unwrap(),
        "--ratio",
        "0.3",
        "--save-cache",
        cache.to_str().unwrap(),
    ]);
    assert!(cache.is_file(), "--save-cache wrote no file");
    (cache, saved)
}

/// Asserts `kvzip run --load-cache <path>` fails cleanly: non-zero exit, the file named in
/// stderr, no panic.
fn assert_load_fails(path: &Path, extra: &[&str], what: &str) -> String {
    let mut args = vec!["run", "--load-cache", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--query", QUERIES[0], "--json"]);
    let out = kvzip(&args);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{what}: loading succeeded");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: exit status {:?}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{what}: panic: {stderr}");
    assert!(
        stderr.contains(path.to_str().unwrap()),
        "{what}: stderr does not name {}: {stderr}",
        path.display()
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: printed {}",
        text(&out.stdout)
    );
    stderr
}

#[test]
fn saved_cache_answers_identically_in_another_process() {
    let dir = scratch("roundtrip");
    let (cache, saved) = save_cache(&dir);
    let loaded = run_json(&["--load-cache", cache.to_str().unwrap()]);
    assert_eq!(
        answers(&loaded),
        answers(&saved),
        "answers differ after reload"
    );
    for key in [
        "n_sys",
        "n_ctx",
        "ratio_real",
        "kv_bytes_full",
        "kv_bytes_kept",
    ] {
        assert_eq!(loaded[key], saved[key], "{key}");
    }
    let kept = saved["kv_bytes_kept"].as_f64().unwrap();
    let full = saved["kv_bytes_full"].as_f64().unwrap();
    assert!(
        (kept / full - 0.3).abs() <= 0.005,
        "kept/full = {}",
        kept / full
    );
    assert!(
        answers(&saved)[0].1.contains("Kim"),
        "quick start name answer: {:?}",
        answers(&saved)[0]
    );
    // The write was atomic: only the context and the cache are in the directory.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["context.txt", "ctx.kvc"]);
    // Loading it twice more gives the same answers again (the file is not modified).
    let again = run_json(&["--load-cache", cache.to_str().unwrap()]);
    assert_eq!(answers(&again), answers(&saved));
}

#[test]
fn bad_cache_files_are_clear_errors() {
    let dir = scratch("bad");
    let (cache, _) = save_cache(&dir);
    let bytes = std::fs::read(&cache).unwrap();

    for (i, cut) in [0, 5, 200, bytes.len() / 2, bytes.len() - 1]
        .into_iter()
        .enumerate()
    {
        let path = dir.join(format!("truncated-{i}.kvc"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = assert_load_fails(&path, &[], &format!("truncated to {cut} bytes"));
        assert!(
            err.contains("truncated") || err.contains("safetensors") || err.contains("header"),
            "truncated to {cut}: unclear error: {err}"
        );
    }

    // A model weight file is a safetensors file, but not a cache.
    let foreign = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/parity/qwen2/model.safetensors");
    let foreign = foreign.canonicalize().expect("parity fixture present");
    let err = assert_load_fails(&foreign, &[], "model weights");
    assert!(err.contains("not a kvzip cache"), "{err}");

    // Plain text, and a missing file.
    let text_file = dir.join("context.txt");
    assert_load_fails(&text_file, &[], "text file");
    assert_load_fails(&dir.join("missing.kvc"), &[], "missing file");

    // A cache made with another task's system prompt is refused.
    let err = assert_load_fails(&cache, &["--task", "gsm"], "other task");
    assert!(err.contains("system prompt"), "{err}");
}
