//! `kvzip run` sends each query as the user wrote it (as the reference quick start does:
//! `"\n\n" + query` after the QA system prompt); `--task qa` applies the task's query format
//! (`Q: …`). A base model without a chat template (gemma3-270m) gets the plain-text prompt
//! format with its BOS, and says so.

use std::process::Command;

use kvzip_hub::fetch::{default_cache_dir, fetch_model};
use kvzip_templates::{format_query, PromptPieces, Task, Tokenizer};
use serde_json::Value;

const CONTEXT: &str =
    "This is my basic profile. My name is Kim living in Seoul. My major is computer science.";
const QUERY: &str = "What is my name?";

fn run(model: &str, extra: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx.txt");
    std::fs::write(&ctx, CONTEXT).unwrap();
    let mut args = vec!["run", "--model", model, "--context", ctx.to_str().unwrap()];
    args.extend_from_slice(&["--query", QUERY, "--max-new-tokens", "12", "--json"]);
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_kvzip"))
        .args(&args)
        .output()
        .expect("run kvzip");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kvzip {args:?}: {stderr}");
    (serde_json::from_slice(&out.stdout).expect("JSON"), stderr)
}

fn query_ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v["answers"][0]["query_ids"].clone()).expect("query_ids")
}

#[test]
fn run_sends_the_query_as_written_and_formats_it_only_with_task() {
    let model = "smollm2-135m-instruct";
    let dir = fetch_model(model, &default_cache_dir().unwrap()).expect("model");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let prompt = PromptPieces::from_chat_template(&tok.chat_template().unwrap(), Task::Qa)
        .unwrap()
        .encode(&tok)
        .unwrap();
    let (plain, _) = run(model, &[]);
    assert_eq!(
        query_ids(&plain),
        prompt.query_input_ids(&tok, QUERY).unwrap()
    );
    let (qa, _) = run(model, &["--task", "qa"]);
    assert_eq!(
        query_ids(&qa),
        prompt
            .query_input_ids(&tok, &format_query(Task::Qa, QUERY))
            .unwrap()
    );
    assert_ne!(query_ids(&plain), query_ids(&qa));
}

#[test]
fn a_base_model_gets_the_plain_format_with_its_bos() {
    let model = "gemma3-270m";
    let dir = fetch_model(model, &default_cache_dir().unwrap()).expect("model");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(
        tok.chat_template().is_err(),
        "the base model is imported without a chat template"
    );
    let (v, stderr) = run(model, &[]);
    assert!(stderr.contains("no chat template"), "{stderr}");
    let pieces = PromptPieces::plain(Some("<bos>"), Task::Qa)
        .encode(&tok)
        .unwrap();
    assert_eq!(
        v["n_sys"].as_u64().unwrap() as usize,
        pieces.system_ids.len()
    );
    assert_eq!(pieces.system_ids[0], tok.token_to_id("<bos>").unwrap());
    assert_eq!(
        query_ids(&v),
        pieces.query_input_ids(&tok, QUERY).unwrap(),
        "query + `\\nAnswer:`"
    );
}
