//! Check before work, refuse the impossible: every limit is checked before any prefill, bad
//! flags are errors (not silently ignored), and a user's file is never replaced.

use std::process::{Command, Output};

use kvzip_hub::fetch::{default_cache_dir, fetch_gguf, known_model};

const MODEL: &str = "smollm2-135m-instruct";

fn kvzip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvzip"))
        .args(args)
        .output()
        .expect("run kvzip")
}

fn fails_with(args: &[&str], needle: &str) {
    let out = kvzip(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn limits_and_flags_are_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx.txt");
    std::fs::write(&ctx, "My name is Kim.").unwrap();
    let ctx = ctx.to_str().unwrap();
    // A prompt that cannot fit with the tokens to generate: refused before the prefill.
    let long = "word ".repeat(8150);
    fails_with(
        &[
            "generate",
            "--model",
            MODEL,
            "--prompt",
            &long,
            "--max-new-tokens",
            "200",
        ],
        "--max-new-tokens",
    );
    // A context that fits, but not with one reconstruction chunk after it: names --chunk.
    let big = tmp.path().join("big.txt");
    std::fs::write(&big, "word ".repeat(7000)).unwrap();
    fails_with(
        &[
            "run",
            "--model",
            MODEL,
            "--context",
            big.to_str().unwrap(),
            "--query",
            "q",
        ],
        "--chunk",
    );
    for bad in ["1.5", "NaN", "inf", "0", "-0.1"] {
        let flag = format!("--ratio={bad}");
        let args = [
            "run",
            "--model",
            MODEL,
            "--context",
            ctx,
            "--query",
            "q",
            &flag,
        ];
        fails_with(&args, "(0, 1]");
    }
    fails_with(
        &["run", "--model", MODEL, "--context", ctx, "--query", "  "],
        "empty",
    );
    let blank = tmp.path().join("blank.txt");
    std::fs::write(&blank, " \n\t ").unwrap();
    fails_with(
        &[
            "run",
            "--model",
            MODEL,
            "--context",
            blank.to_str().unwrap(),
            "--query",
            "q",
        ],
        "empty",
    );
    for flag in [
        ["--ratio", "0.5"],
        ["--level", "head"],
        ["--kv-type", "retain"],
        ["--context", ctx],
    ] {
        let mut args = vec![
            "run",
            "--model",
            MODEL,
            "--load-cache",
            "x.kvc",
            "--query",
            "q",
        ];
        args.extend_from_slice(&flag);
        fails_with(&args, "cannot be used with");
    }
    fails_with(
        &[
            "eval",
            "--model",
            MODEL,
            "--data",
            "kv-retrieval",
            "--keys",
            "0",
        ],
        "--keys",
    );
}

#[test]
fn import_never_replaces_a_users_file() {
    let cache = default_cache_dir().unwrap();
    let gguf = fetch_gguf(known_model(MODEL).unwrap(), &cache).expect("gguf");
    let tmp = tempfile::tempdir().unwrap();
    let precious = tmp.path().join("notes.txt");
    std::fs::write(&precious, "my notes").unwrap();
    fails_with(
        &[
            "import-gguf",
            gguf.to_str().unwrap(),
            "--out",
            precious.to_str().unwrap(),
            "--overwrite",
        ],
        "is a file",
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "my notes");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "nothing else left behind: {left:?}");
}
