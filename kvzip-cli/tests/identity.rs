//! Identity by content: caches and head-score files record a fingerprint of the weights, not
//! the directory name. A renamed model directory still loads its caches; a head-score file of
//! another model with the same shapes is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvzip_hub::fetch::{default_cache_dir, fetch_model};

const CONTEXT: &str =
    "This is my basic profile. My name is Kim living in Seoul. My major is computer science.";

fn kvzip(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvzip"))
        .args(args)
        .output()
        .expect("run kvzip")
}

/// A copy of `src` under `dst` made of hard links (no weight bytes copied); `config` replaces
/// config.json when given.
fn linked_copy(src: &Path, dst: &Path, config: Option<String>) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let to = dst.join(e.file_name());
        if e.file_name() == "config.json" {
            if let Some(c) = &config {
                std::fs::write(&to, c).unwrap();
                continue;
            }
        }
        std::fs::hard_link(e.path(), &to)
            .or_else(|_| std::fs::copy(e.path(), &to).map(|_| ()))
            .unwrap();
    }
}

#[test]
fn caches_follow_the_weights_not_the_directory_name() {
    let src = fetch_model("smollm2-135m-instruct", &default_cache_dir().unwrap()).expect("model");
    let tmp = tempfile::tempdir().unwrap();
    let renamed = tmp.path().join("renamed-model");
    linked_copy(&src, &renamed, None);
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let other_config = config.replacen('{', "{\"kvzip_test_other_model\": true, ", 1);
    let other = tmp.path().join("other-model");
    linked_copy(&src, &other, Some(other_config));
    let ctx = tmp.path().join("ctx.txt");
    std::fs::write(&ctx, CONTEXT).unwrap();
    let cache: PathBuf = tmp.path().join("c.kvc");
    let s = |p: &Path| p.to_str().unwrap().to_owned();

    let out = kvzip(&[
        "run",
        "--model",
        &s(&src),
        "--context",
        &s(&ctx),
        "--query",
        "What is my name?",
        "--max-new-tokens",
        "8",
        "--save-cache",
        &s(&cache),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The renamed directory loads the cache and answers the same.
    let out = kvzip(&[
        "run",
        "--model",
        &s(&renamed),
        "--load-cache",
        &s(&cache),
        "--query",
        "What is my name?",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "renamed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["answers"][0]["answer"], first["answers"][0]["answer"]);
    // Other weights (same shapes) refuse it.
    let out = kvzip(&[
        "run",
        "--model",
        &s(&other),
        "--load-cache",
        &s(&cache),
        "--query",
        "q",
    ]);
    assert!(!out.status.success(), "another model loaded the cache");

    // Head scores: the renamed copy accepts them, the other model refuses them.
    let hs = tmp.path().join("hs.safetensors");
    let out = kvzip(&[
        "head-scores",
        "--model",
        &s(&src),
        "--context",
        &s(&ctx),
        "--out",
        &s(&hs),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_hs = |model: &Path| {
        kvzip(&[
            "run",
            "--model",
            &s(model),
            "--context",
            &s(&ctx),
            "--head-scores",
            &s(&hs),
            "--query",
            "What is my name?",
            "--max-new-tokens",
            "4",
            "--ratio",
            "0.5",
        ])
    };
    let ok = run_hs(&renamed);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = run_hs(&other);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("computed for model"),
        "{err}"
    );
}
