//! Token ids against transformers (`tokenizer(text, add_special_tokens=False)`) with two tiny
//! committed tokenizers: byte-level BPE with ChatML tokens, and a Gemma-style byte-fallback BPE.

use std::path::PathBuf;

use kvzip_templates::{
    format_query, ModelFamily, PromptPieces, Task, TemplateError, Tokenizer, SCORING_CHUNK_TOKENS,
};
use serde_json::Value;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn ids_fixture() -> Value {
    let text = std::fs::read_to_string(fixture_dir("tiny_ids.json")).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).expect("id list")
}

fn family(name: &str) -> ModelFamily {
    match name {
        "llama" => ModelFamily::Llama,
        "qwen" => ModelFamily::Qwen,
        "qwen3" => ModelFamily::Qwen3,
        "gemma3" => ModelFamily::Gemma3,
        _ => ModelFamily::Fallback,
    }
}

#[test]
fn probes_match_transformers() {
    let fx = ids_fixture();
    for name in ["tiny-chatml", "tiny-sp"] {
        let tokenizer = Tokenizer::from_dir(fixture_dir(name)).unwrap();
        for probe in fx[name]["probes"].as_array().unwrap() {
            let text = probe["text"].as_str().unwrap();
            assert_eq!(
                tokenizer.encode(text).unwrap(),
                ids(&probe["ids"]),
                "{name}: {text:?}"
            );
        }
        let context = fx[name]["context"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode(context).unwrap(),
            ids(&fx[name]["context_ids"]),
            "{name}: context"
        );
    }
}

#[test]
fn kvzip_pieces_match_transformers() {
    let fx = ids_fixture();
    for name in ["tiny-chatml", "tiny-sp"] {
        let tokenizer = Tokenizer::from_dir(fixture_dir(name)).unwrap();
        let context_ids = ids(&fx[name]["context_ids"]);
        assert!(
            context_ids.len() > SCORING_CHUNK_TOKENS,
            "{name}: context must span several chunks"
        );
        for case in fx[name]["families"].as_array().unwrap() {
            let task = if case["task"] == "gsm" {
                Task::Gsm
            } else {
                Task::Qa
            };
            let label = format!("{name}: {} {task:?}", case["family"]);
            let pieces = PromptPieces::for_family(family(case["family"].as_str().unwrap()), task);
            assert_eq!(
                pieces.prefix,
                case["system_prompt"].as_str().unwrap(),
                "{label}"
            );
            let prompt_ids = pieces.encode(&tokenizer).unwrap();
            assert_eq!(
                prompt_ids.system_ids,
                ids(&case["system_ids"]),
                "{label}: system"
            );
            assert_eq!(
                prompt_ids.postfix_ids,
                ids(&case["postfix_ids"]),
                "{label}: postfix"
            );
            assert_eq!(
                prompt_ids.repeat_first_ids,
                ids(&fx[name]["repeat_first_ids"]),
                "{label}"
            );
            assert_eq!(
                prompt_ids.repeat_next_ids,
                ids(&fx[name]["repeat_next_ids"]),
                "{label}"
            );

            let query = format_query(task, case["question"].as_str().unwrap());
            let query_ids = prompt_ids.query_input_ids(&tokenizer, &query).unwrap();
            let expected = [ids(&case["query_ids"]), prompt_ids.postfix_ids.clone()].concat();
            assert_eq!(query_ids, expected, "{label}: query");

            for (key, chunk) in [
                ("reconstruction_2000", SCORING_CHUNK_TOKENS),
                ("reconstruction_700", 700),
            ] {
                let got = prompt_ids
                    .reconstruction_inputs(&context_ids, chunk)
                    .unwrap();
                let want = case[key].as_array().unwrap();
                assert_eq!(got.len(), want.len(), "{label}: {key} chunk count");
                for (g, w) in got.iter().zip(want) {
                    assert_eq!(g.input_ids, ids(&w["input_ids"]), "{label}: {key}");
                    let range = ids(&w["ctx_range"]);
                    assert_eq!(
                        g.ctx_range,
                        range[0] as usize..range[1] as usize,
                        "{label}: {key}"
                    );
                }
            }
        }
    }
}

#[test]
fn piecewise_encoding_concatenates_pieces() {
    let tokenizer = Tokenizer::from_dir(fixture_dir("tiny-chatml")).unwrap();
    let pieces = ["<|im_start|>user\n", "in t", "he end<|im_end|>"];
    let expected: Vec<u32> = pieces
        .iter()
        .flat_map(|p| tokenizer.encode(p).unwrap())
        .collect();
    assert_eq!(tokenizer.encode_pieces(&pieces).unwrap(), expected);
    assert_ne!(
        expected,
        tokenizer.encode(&pieces.concat()).unwrap(),
        "a boundary inside a word must matter"
    );
    assert_eq!(
        tokenizer.encode("<|im_start|>").unwrap(),
        vec![1],
        "special-token strings are single ids"
    );
}

#[test]
fn decoding_matches_transformers() {
    let fx = ids_fixture();
    for name in ["tiny-chatml", "tiny-sp"] {
        let tokenizer = Tokenizer::from_dir(fixture_dir(name)).unwrap();
        for case in fx[name]["decodes"].as_array().unwrap() {
            let skip = case["skip_special_tokens"].as_bool().unwrap();
            let text = tokenizer.decode(&ids(&case["ids"]), skip).unwrap();
            assert_eq!(
                text,
                case["text"].as_str().unwrap(),
                "{name}, skip_special_tokens {skip}"
            );
        }
    }
}

#[test]
fn streaming_yields_whole_characters_and_the_full_text() {
    let texts = [
        "Naïve café 🙂 日本語 — «ok»",
        "<|im_start|>assistant\n  Ünï 🙂🙂 x<|im_end|>",
        "<bos>plain ascii  text",
    ];
    for name in ["tiny-chatml", "tiny-sp"] {
        let tokenizer = Tokenizer::from_dir(fixture_dir(name)).unwrap();
        for text in texts {
            let ids = tokenizer.encode(text).unwrap();
            for skip in [false, true] {
                let mut stream = tokenizer.decode_stream(skip);
                let mut deltas = Vec::new();
                for &id in &ids {
                    if let Some(delta) = stream.step(id).unwrap() {
                        deltas.push(delta);
                    }
                }
                assert_eq!(
                    stream.flush().unwrap(),
                    None,
                    "{name}: nothing pending at the end"
                );
                let streamed: String = deltas.concat();
                assert_eq!(
                    streamed,
                    tokenizer.decode(&ids, skip).unwrap(),
                    "{name}: {text:?} skip {skip}"
                );
                assert!(
                    deltas.iter().all(|d| !d.contains('\u{FFFD}')),
                    "{name}: partial character in {deltas:?}"
                );
            }
        }
        // Non-ASCII characters are split over several ids in these tiny vocabularies.
        let emoji_ids = tokenizer.encode("🙂").unwrap();
        assert!(
            emoji_ids.len() > 1,
            "{name}: the emoji should need several byte tokens"
        );
        let mut stream = tokenizer.decode_stream(false);
        let (last, head) = emoji_ids.split_last().unwrap();
        for &id in head {
            assert_eq!(
                stream.step(id).unwrap(),
                None,
                "{name}: no partial character released"
            );
        }
        assert_eq!(stream.step(*last).unwrap().as_deref(), Some("🙂"));
        // A truncated character is released by flush as U+FFFD.
        let mut stream = tokenizer.decode_stream(false);
        assert_eq!(stream.step(emoji_ids[0]).unwrap(), None);
        assert!(stream
            .flush()
            .unwrap()
            .is_some_and(|t| t.contains('\u{FFFD}')));
    }
}

#[test]
fn special_tokens_come_from_the_config_files() {
    let chatml = Tokenizer::from_dir(fixture_dir("tiny-chatml")).unwrap();
    let special = chatml.special_tokens();
    assert_eq!(special.bos_id, Some(1));
    assert_eq!(
        special.eos_ids,
        vec![2, 0],
        "generation_config list first, then config / tokenizer_config"
    );
    assert_eq!(special.pad_id, Some(0));
    assert_eq!(special.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(chatml.is_special(2) && !chatml.is_special(100));

    let sp = Tokenizer::from_dir(fixture_dir("tiny-sp")).unwrap();
    let special = sp.special_tokens();
    assert_eq!(
        special.bos_token.as_deref(),
        Some("<bos>"),
        "object form {{content: ...}} is read"
    );
    assert_eq!(special.bos_id, Some(2));
    assert_eq!(special.eos_ids, vec![1, 5], "Gemma-style eos list");
    // The directory's own chat template (Gemma 3's) gives KVzip's Gemma pieces.
    let pieces = PromptPieces::from_chat_template(&sp.chat_template().unwrap(), Task::Qa).unwrap();
    assert_eq!(
        pieces,
        PromptPieces::for_family(ModelFamily::Gemma3, Task::Qa)
    );
}

#[test]
fn bad_files_give_errors_naming_file_and_field() {
    let missing = Tokenizer::from_dir("/nonexistent/model").unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("/nonexistent/model/tokenizer.json"),
        "{missing}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir("tiny-chatml/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|nope|>"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, TemplateError::InvalidField { field, .. } if field == "eos_token"),
        "{err}"
    );
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": "two"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("generation_config.json") && err.contains("eos_token_id"),
        "{err}"
    );

    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("not valid JSON"),
        "{err}"
    );

    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let err = tokenizer.chat_template().unwrap_err().to_string();
    assert!(err.contains("no chat template"), "{err}");

    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("cannot load tokenizer"), "{err}");
}
