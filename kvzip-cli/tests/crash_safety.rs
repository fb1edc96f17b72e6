//! Crash safety: writers killed with SIGKILL at arbitrary moments never leave a partial file
//! that a later run takes for valid. `--save-cache` keeps the previous cache intact or
//! replaces it whole; an interrupted `import-gguf` publishes nothing (and the next import
//! removes its leftovers); an interrupted `eval` resumes from complete example files.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvzip_hub::fetch::{default_cache_dir, fetch_gguf, known_model};

const MODEL: &str = "smollm2-135m-instruct";

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kvzip"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kvzip")
}

fn ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kvzip"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kill points spread over a writer's run (deterministic, milliseconds).
const KILL_AFTER_MS: [u64; 6] = [150, 600, 1100, 1700, 2600, 4000];

fn kill_after(mut child: Child, ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

#[test]
fn killed_save_cache_leaves_the_previous_or_the_new_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx.txt");
    std::fs::write(&ctx, "My name is Kim and I live in Seoul. ".repeat(40)).unwrap();
    let cache = tmp.path().join("doc.kvc");
    let (c, k) = (ctx.to_str().unwrap(), cache.to_str().unwrap());
    ok(&[
        "run",
        "--model",
        MODEL,
        "--context",
        c,
        "--query",
        "Name?",
        "--max-new-tokens",
        "2",
        "--save-cache",
        k,
    ]);
    for (i, ms) in KILL_AFTER_MS.iter().enumerate() {
        let ratio = format!("{}", 0.2 + 0.1 * i as f64);
        let child = spawn(&[
            "run",
            "--model",
            MODEL,
            "--context",
            c,
            "--query",
            "Name?",
            "--max-new-tokens",
            "2",
            "--ratio",
            &ratio,
            "--save-cache",
            k,
        ]);
        kill_after(child, *ms);
        // Whatever the moment, the named file is a whole, valid cache.
        ok(&[
            "run",
            "--model",
            MODEL,
            "--load-cache",
            k,
            "--query",
            "Where?",
            "--max-new-tokens",
            "2",
        ]);
    }
}

#[test]
fn killed_import_publishes_nothing_and_is_cleaned_up() {
    let gguf = fetch_gguf(known_model(MODEL).unwrap(), &default_cache_dir().unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imported");
    let (g, o) = (gguf.to_str().unwrap(), out.to_str().unwrap());
    for ms in &KILL_AFTER_MS[..3] {
        kill_after(spawn(&["import-gguf", g, "--out", o]), *ms);
        // Either nothing was published or the whole model was.
        if out.exists() {
            for f in [
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "kvzip_import.json",
            ] {
                assert!(out.join(f).is_file(), "published without {f}");
            }
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
    ok(&["import-gguf", g, "--out", o]);
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["imported".to_string()], "leftovers: {left:?}");
}

fn all_json_valid(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_json_valid(&p);
        } else if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&p).unwrap();
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("{} is not whole JSON: {e}", p.display()));
        }
    }
}

/// A small passkey eval of `num` examples with two methods, writing to `out`.
fn eval_args<'a>(num: &'a str, out: &'a str) -> [&'a str; 15] {
    [
        "eval",
        "--model",
        MODEL,
        "--data",
        "passkey",
        "--num",
        num,
        "--context-tokens",
        "120",
        "--ratios",
        "0.5",
        "--methods",
        "kvzip,snapkv",
        "--out",
        out,
    ]
}

#[test]
fn killed_eval_resumes_from_whole_example_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let args = eval_args("4", o);
    for ms in &KILL_AFTER_MS[1..4] {
        kill_after(spawn(&args), *ms);
        if out.exists() {
            all_json_valid(&out);
        }
    }
    let mut json = args.to_vec();
    json.push("--json");
    let summary: serde_json::Value = serde_json::from_str(&ok(&json)).unwrap();
    assert!(summary["kvzip"].is_array(), "{summary}");
    all_json_valid(&out);
}

/// SIGTERM / SIGINT at points spread over an eval: the process exits 130 at once (never an
/// abort: the handler ends it with `_exit` while the main thread is still working, so no
/// library teardown runs under it), every example file left is whole JSON, and a rerun resumes.
#[test]
fn terminated_eval_exits_130_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let args = eval_args("3", o);
    for (i, ms) in KILL_AFTER_MS[1..5].iter().enumerate() {
        let signal = if i % 2 == 0 { "-TERM" } else { "-INT" };
        let mut child = spawn(&args);
        std::thread::sleep(Duration::from_millis(*ms));
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        let status = child.wait().unwrap();
        if sent.success() {
            // 0 when the run finished before the signal landed.
            assert!(
                matches!(status.code(), Some(130) | Some(0)),
                "kill {signal} after {ms} ms: {status:?}"
            );
        }
        if out.exists() {
            all_json_valid(&out);
        }
    }
    let mut json = args.to_vec();
    json.push("--json");
    let summary: serde_json::Value = serde_json::from_str(&ok(&json)).unwrap();
    assert!(summary["kvzip"].is_array(), "{summary}");
    all_json_valid(&out);
}
