//! Chat templates rendered by us vs. by transformers' `apply_chat_template(tokenize=False)`
//! (fixtures from scripts/make_template_fixtures.py).

use kvzip_templates::{ChatMessage, ChatTemplate, ModelFamily, PromptPieces, Task};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/chat_templates.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture readable"))
        .expect("fixture is JSON")
}

fn template(fx: &Value, name: &str) -> ChatTemplate {
    let source = fx["templates"][name].as_str().expect("template source");
    let bos_eos = &fx["bos_eos"][name];
    ChatTemplate::new(source, bos_eos[0].as_str(), bos_eos[1].as_str()).expect("template compiles")
}

#[test]
fn renders_exactly_like_transformers() {
    let fx = fixture();
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() > 50, "fixture has too few cases");
    let mut checked_errors = 0;
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let conversation = case["conversation"].as_str().unwrap();
        let messages: Vec<ChatMessage> =
            serde_json::from_value(fx["conversations"][conversation].clone()).unwrap();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let extra = case["extra"].as_object().unwrap();
        let result = template(&fx, name).render_with(&messages, add_generation_prompt, extra);
        let label = format!("template {name}, conversation {conversation}, add_generation_prompt {add_generation_prompt}, extra {extra:?}");
        match (&case["expected"], &case["error"]) {
            (Value::String(expected), _) => {
                let rendered = result.unwrap_or_else(|e| panic!("{label}: unexpected error {e}"));
                assert_eq!(&rendered, expected, "{label}");
            }
            (_, Value::String(message)) => {
                let err = result.expect_err(&label).to_string();
                assert!(
                    err.contains(message.as_str()),
                    "{label}: error {err:?} lacks {message:?}"
                );
                checked_errors += 1;
            }
            _ => panic!("{label}: case has neither expected nor error"),
        }
    }
    assert!(
        checked_errors >= 2,
        "the raise_exception cases were not exercised"
    );
}

#[test]
fn pieces_from_chat_templates_match_kvzip_families() {
    let fx = fixture();
    for task in [Task::Qa, Task::Gsm] {
        for (name, family) in [
            ("qwen2.5", ModelFamily::Qwen),
            ("smollm2", ModelFamily::Qwen),
            ("qwen3-like", ModelFamily::Qwen3),
            ("gemma3", ModelFamily::Gemma3),
        ] {
            let derived = PromptPieces::from_chat_template(&template(&fx, name), task).unwrap();
            assert_eq!(
                derived,
                PromptPieces::for_family(family, task),
                "template {name}, task {task:?}"
            );
        }
    }
    // Llama 3's own template differs from KVzip's hand-written one: a period after the system
    // message and no blank line before <|eot_id|>.
    let llama = PromptPieces::from_chat_template(&template(&fx, "llama3"), Task::Qa).unwrap();
    assert_eq!(
        llama.prefix,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\n\
         Given the context, answer to the following question or request without explanation.\n\n"
    );
    assert_eq!(
        llama.postfix,
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn system_role_rejected_falls_back_to_user_prefix() {
    let source = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}\
                  {% endif %}<u>{{ m.content }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}";
    let template = ChatTemplate::new(source, None, None).unwrap();
    let pieces = PromptPieces::from_chat_template(&template, Task::Gsm).unwrap();
    assert_eq!(pieces.prefix, "<u>You are a helpful assistant.\n\nGiven the context, answer to the following reasoning question.\n\n");
    assert_eq!(pieces.postfix, "</u><a>");
}

#[test]
fn kvzip_family_strings_are_exact() {
    let llama = PromptPieces::for_family(ModelFamily::Llama, Task::Qa);
    assert_eq!(
        llama.prefix,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\n\
         Given the context, answer to the following question or request without explanation.\n\n"
    );
    assert_eq!(
        llama.postfix,
        "\n\n<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let fallback = PromptPieces::for_family(ModelFamily::Fallback, Task::Gsm);
    assert_eq!(
        fallback.prefix,
        "<|begin_of_text|>Given the context, answer to the following reasoning question.\n\n"
    );
    assert_eq!(fallback.postfix, "\n\nAnswer: ");
}
