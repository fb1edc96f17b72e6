//! Optional check against the real tokenizers (too big to commit): set `KVZIP_REAL_TOKENIZERS` to a
//! directory with `gemma3/`, `llama3/`, `qwen2.5/`, `smollm2/` model directories (see
//! scripts/make_template_fixtures.py for where they come from). Without it the test only says so.

use std::path::PathBuf;

use kvzip_templates::{ModelFamily, PromptPieces, Task, Tokenizer};
use serde_json::Value;

#[test]
fn real_tokenizers_match_transformers_when_available() {
    let Some(root) = std::env::var_os("KVZIP_REAL_TOKENIZERS").map(PathBuf::from) else {
        eprintln!("KVZIP_REAL_TOKENIZERS not set: real-tokenizer comparison not run");
        return;
    };
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/real_ids.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (name, expected) in fx.as_object().unwrap() {
        let tokenizer = Tokenizer::from_dir(root.join(name)).unwrap();
        for probe in expected["probes"].as_array().unwrap() {
            let text = probe["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(probe["ids"].clone()).unwrap();
            assert_eq!(tokenizer.encode(text).unwrap(), want, "{name}: {text:?}");
            let decoded = tokenizer.decode(&want, false).unwrap();
            assert_eq!(
                tokenizer.encode(&decoded).unwrap(),
                want,
                "{name}: decode/encode round trip of {text:?}"
            );
        }
        let special = tokenizer.special_tokens();
        assert_eq!(
            special.bos_token.as_deref(),
            expected["bos_token"].as_str(),
            "{name}: bos"
        );
        assert_eq!(
            special.eos_token.as_deref(),
            expected["eos_token"].as_str(),
            "{name}: eos"
        );
        let pieces =
            PromptPieces::from_chat_template(&tokenizer.chat_template().unwrap(), Task::Qa)
                .unwrap();
        let family = match name.as_str() {
            "gemma3" => Some(ModelFamily::Gemma3),
            "qwen2.5" | "smollm2" => Some(ModelFamily::Qwen),
            _ => None,
        };
        if let Some(family) = family {
            assert_eq!(pieces, PromptPieces::for_family(family, Task::Qa), "{name}");
        }
    }
}
