//! `tokenizer.json` and `tokenizer_config.json` from a GGUF vocabulary.
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE rebuilt from `tokens` + `merges`, with the
//!   pre-tokenizer named by `tokenizer.ggml.pre` written the way the model's own HF
//!   `tokenizer.json` writes it (`smollm`: isolated digits then GPT-2 byte-level regex; `qwen2`:
//!   NFC, the Qwen2 split regex, byte-level without regex; `llama-bpe`/`llama3`: the LLaMA-3 regex;
//!   `default`/`gpt2`: GPT-2 byte-level). Tokens of type 3 (control) become special added tokens,
//!   type 4 (user-defined) non-special added tokens.
//! - `tokenizer.ggml.model = "llama"` (SentencePiece, Gemma 3): an existing HF `tokenizer.json` is
//!   used, after checking its vocabulary is the GGUF's, id for id (see [`check_sentencepiece_vocab`]).

use std::path::Path;

use serde_json::{json, Map, Value};

use super::reader::GgufFile;
use super::{GgufError, Result};

/// llama.cpp token type of control tokens (`<|im_start|>`, `<bos>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp token type of user-defined added tokens (`<tool_call>`, ...).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Qwen2's split regex (HF `Qwen2Tokenizer` / llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// LLaMA 3's split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The vocabulary fields shared by both tokenizer kinds.
struct Vocab<'a> {
    tokens: Vec<&'a str>,
    types: Vec<i64>,
}

fn vocab(file: &GgufFile) -> Result<Vocab<'_>> {
    let tokens = file
        .opt_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta_missing(file, "tokenizer.ggml.tokens"))?;
    let types = file
        .opt_i64_array("tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![1; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(import_err(
            file,
            format!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                types.len(),
                tokens.len()
            ),
        ));
    }
    Ok(Vocab { tokens, types })
}

/// Builds `tokenizer.json` for a `gpt2` (byte-level BPE) GGUF vocabulary.
pub fn build_bpe_tokenizer_json(file: &GgufFile) -> Result<Value> {
    let v = vocab(file)?;
    let merges = file
        .opt_str_array("tokenizer.ggml.merges")?
        .ok_or_else(|| meta_missing(file, "tokenizer.ggml.merges"))?;
    let pre = file.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let (normalizer, pre_tokenizer) = bpe_pre_tokenizer(file, pre)?;

    let mut vocab_map = Map::with_capacity(v.tokens.len());
    for (id, tok) in v.tokens.iter().enumerate() {
        if vocab_map.insert(tok.to_string(), json!(id)).is_some() {
            return Err(import_err(
                file,
                format!("token {tok:?} appears twice in the vocabulary"),
            ));
        }
    }
    let merge_pairs = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => Ok(json!([a, b])),
            _ => Err(import_err(
                file,
                format!(
                    "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by one space"
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()?;

    let added = added_tokens(&v);
    let add_bos = file
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let post_processor = match (add_bos, special_token(file, &v, "bos_token_id")?) {
        (true, Some((bos_id, bos))) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }),
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merge_pairs,
        },
    }))
}

/// `(normalizer, pre_tokenizer)` for a llama.cpp `tokenizer.ggml.pre` name.
fn bpe_pre_tokenizer(file: &GgufFile, pre: &str) -> Result<(Value, Value)> {
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        ]})
    };
    let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    Ok(match pre {
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                gpt2,
            ]}),
        ),
        "qwen2" | "deepseek-r1-qwen" => (json!({"type": "NFC"}), split(QWEN2_SPLIT)),
        "llama3" | "llama-v3" | "llama-bpe" => (Value::Null, split(LLAMA3_SPLIT)),
        "default" | "gpt2" | "gpt-2" => (Value::Null, gpt2),
        other => {
            return Err(import_err(
                file,
                format!(
                    "tokenizer.ggml.pre {other:?} is not supported (supported: smollm, qwen2, \
                     deepseek-r1-qwen, llama3, llama-bpe, default, gpt2)"
                ),
            ))
        }
    })
}

fn added_tokens(v: &Vocab<'_>) -> Vec<Value> {
    v.tokens
        .iter()
        .zip(&v.types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, (tok, &t))| {
            json!({
                "id": id,
                "content": tok,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": t == TOKEN_TYPE_CONTROL,
            })
        })
        .collect()
}

/// `(id, string)` of the special token whose id is in `tokenizer.ggml.<key>`, if present.
fn special_token<'a>(
    file: &GgufFile,
    v: &Vocab<'a>,
    key: &str,
) -> Result<Option<(usize, &'a str)>> {
    let full = format!("tokenizer.ggml.{key}");
    match file.opt_u64(&full)? {
        None => Ok(None),
        Some(id) => v
            .tokens
            .get(id as usize)
            .map(|t| Some((id as usize, *t)))
            .ok_or_else(|| {
                import_err(
                    file,
                    format!(
                        "{full} = {id} is beyond the vocabulary ({} tokens)",
                        v.tokens.len()
                    ),
                )
            }),
    }
}

/// Builds `tokenizer_config.json`: chat template, special tokens, added tokens, BOS/EOS flags.
///
/// `base` (e.g. the shipped Gemma 3 `tokenizer_config.json`) supplies defaults that GGUF values
/// override; `tokenizer_class` is used when `base` has none.
pub fn build_tokenizer_config(
    file: &GgufFile,
    base: Option<Value>,
    tokenizer_class: &str,
) -> Result<Value> {
    let v = vocab(file)?;
    let mut c = match base {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let mut decoder = Map::new();
    for tok in added_tokens(&v) {
        let id = tok["id"].to_string();
        let mut entry = tok;
        if let Some(m) = entry.as_object_mut() {
            m.remove("id");
        }
        decoder.insert(id, entry);
    }
    if !c.contains_key("added_tokens_decoder") {
        c.insert("added_tokens_decoder".into(), Value::Object(decoder));
    }
    for (name, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some((_, tok)) = special_token(file, &v, key)? {
            c.insert(name.into(), json!(tok));
        }
    }
    for (name, key) in [
        ("add_bos_token", "tokenizer.ggml.add_bos_token"),
        ("add_eos_token", "tokenizer.ggml.add_eos_token"),
    ] {
        if let Some(b) = file.opt_bool(key)? {
            c.insert(name.into(), json!(b));
        } else if !c.contains_key(name) {
            c.insert(name.into(), json!(false));
        }
    }
    if let Some(t) = file.opt_str("tokenizer.chat_template")? {
        c.insert("chat_template".into(), json!(t));
    }
    c.entry("tokenizer_class").or_insert(json!(tokenizer_class));
    c.entry("clean_up_tokenization_spaces")
        .or_insert(json!(false));
    for arch_ctx in file
        .metadata
        .iter()
        .filter(|(k, _)| k.ends_with(".context_length"))
    {
        if let Some(n) = arch_ctx.1.as_u64() {
            c.entry("model_max_length").or_insert(json!(n));
        }
    }
    Ok(Value::Object(c))
}

/// Checks that an HF SentencePiece-BPE `tokenizer.json` (`model.vocab`) has exactly the GGUF's
/// tokens, id for id. GGUF stores tokens made only of spaces with real spaces where HF writes
/// `▁` (U+2581); those are compared after that substitution.
pub fn check_sentencepiece_vocab(
    file: &GgufFile,
    tokenizer_json: &Value,
    source: &Path,
) -> Result<()> {
    let v = vocab(file)?;
    let mismatch = |what: String| GgufError::Import {
        path: file.path().to_path_buf(),
        what: format!(
            "tokenizer {} does not match the GGUF vocabulary: {what}",
            source.display()
        ),
    };
    let hf_vocab = tokenizer_json
        .pointer("/model/vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| mismatch("it has no model.vocab object".into()))?;
    if hf_vocab.len() != v.tokens.len() {
        return Err(mismatch(format!(
            "{} tokens vs {} in the GGUF",
            hf_vocab.len(),
            v.tokens.len()
        )));
    }
    let mut by_id: Vec<Option<&str>> = vec![None; v.tokens.len()];
    for (tok, id) in hf_vocab {
        let slot = id
            .as_u64()
            .and_then(|i| by_id.get_mut(i as usize))
            .ok_or_else(|| {
                mismatch(format!("token {tok:?} has id {id}, outside the vocabulary"))
            })?;
        *slot = Some(tok.as_str());
    }
    for (id, (gguf_tok, hf_tok)) in v.tokens.iter().zip(&by_id).enumerate() {
        let hf_tok = hf_tok.ok_or_else(|| mismatch(format!("no token has id {id}")))?;
        let same = *gguf_tok == hf_tok
            || (!gguf_tok.is_empty()
                && gguf_tok.chars().all(|c| c == ' ')
                && hf_tok.chars().all(|c| c == '\u{2581}')
                && hf_tok.chars().count() == gguf_tok.len());
        if !same {
            return Err(mismatch(format!(
                "id {id} is {hf_tok:?} there but {gguf_tok:?} in the GGUF"
            )));
        }
    }
    Ok(())
}

fn meta_missing(file: &GgufFile, key: &str) -> GgufError {
    GgufError::Metadata {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        problem: "missing".into(),
    }
}

fn import_err(file: &GgufFile, what: String) -> GgufError {
    GgufError::Import {
        path: file.path().to_path_buf(),
        what,
    }
}
