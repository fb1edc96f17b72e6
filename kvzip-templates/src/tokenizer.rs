//! [`Tokenizer`]: a `tokenizer.json` plus the special tokens and chat template of a model directory.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::decode_stream::DecodeStream;
use crate::error::{Result, TemplateError};

/// Special tokens of a model, gathered from `tokenizer_config.json`, `config.json` and
/// `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence id: `tokenizer_config.json` `bos_token`, else `generation_config.json`
    /// / `config.json` `bos_token_id`.
    pub bos_id: Option<u32>,
    /// Every id that ends generation, in order of first appearance: `generation_config.json`
    /// `eos_token_id`, `config.json` `eos_token_id` (each an int or a list), then the id of
    /// `tokenizer_config.json` `eos_token`. Gemma 3 gives `[1, 106]`.
    pub eos_ids: Vec<u32>,
    /// Padding id: `tokenizer_config.json` `pad_token`, else `pad_token_id` of the configs.
    pub pad_id: Option<u32>,
    /// BOS string as templates see it (`bos_token` variable).
    pub bos_token: Option<String>,
    /// EOS string as templates see it (`eos_token` variable).
    pub eos_token: Option<String>,
    /// Padding string.
    pub pad_token: Option<String>,
    /// Unknown-token string.
    pub unk_token: Option<String>,
}

/// A HF `tokenizers` tokenizer with the model's special tokens and chat template.
///
/// Encoding never adds special tokens (`add_special_tokens=false`, as KVzip does); special-token
/// strings that occur inside the text (e.g. `<|im_start|>`) are still recognised as single tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    chat_template: Option<String>,
    source: PathBuf,
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| TemplateError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TemplateError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A token field of `tokenizer_config.json`: a string, `{"content": ...}` or null.
fn token_field(config: Option<&Value>, path: &Path, field: &str) -> Result<Option<String>> {
    let Some(value) = config.and_then(|c| c.get(field)) else {
        return Ok(None);
    };
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(map) => match map.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid(
                path,
                field,
                "is an object without a string `content`",
            )),
        },
        _ => Err(invalid(
            path,
            field,
            "must be a string, an object with `content`, or null",
        )),
    }
}

/// An id field of `config.json` / `generation_config.json`: an integer, a list of integers or null.
fn id_field(config: Option<&Value>, path: &Path, field: &str) -> Result<Vec<u32>> {
    let Some(value) = config.and_then(|c| c.get(field)) else {
        return Ok(Vec::new());
    };
    let to_id = |v: &Value| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| {
                invalid(
                    path,
                    field,
                    "must be a non-negative integer or a list of them",
                )
            })
    };
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items.iter().map(to_id).collect(),
        other => Ok(vec![to_id(other)?]),
    }
}

fn invalid(path: &Path, field: &str, problem: &str) -> TemplateError {
    TemplateError::InvalidField {
        path: path.to_path_buf(),
        field: field.to_string(),
        problem: problem.to_string(),
    }
}

/// The chat template of `tokenizer_config.json`: a string, or a list of `{name, template}` from
/// which `default` is taken.
fn chat_template_field(config: Option<&Value>, path: &Path) -> Result<Option<String>> {
    let Some(value) = config.and_then(|c| c.get("chat_template")) else {
        return Ok(None);
    };
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(items) => {
            let named = items
                .iter()
                .find(|item| item.get("name").and_then(Value::as_str) == Some("default"));
            match named
                .and_then(|item| item.get("template"))
                .and_then(Value::as_str)
            {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(invalid(
                    path,
                    "chat_template",
                    "is a list without a `default` entry with a `template` string",
                )),
            }
        }
        _ => Err(invalid(
            path,
            "chat_template",
            "must be a string or a list of {name, template}",
        )),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory, together with `tokenizer_config.json`,
    /// `config.json`, `generation_config.json` and `chat_template.jinja` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        let inner = load_tokenizer_json(&tokenizer_path)?;
        let tok_config_path = dir.join("tokenizer_config.json");
        let tok_config = read_optional_json(&tok_config_path)?;
        let config_path = dir.join("config.json");
        let config = read_optional_json(&config_path)?;
        let gen_path = dir.join("generation_config.json");
        let gen_config = read_optional_json(&gen_path)?;

        let lookup = |token: &Option<String>, field: &str| -> Result<Option<u32>> {
            match token {
                None => Ok(None),
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| {
                    invalid(
                        &tok_config_path,
                        field,
                        &format!("names {t:?}, which is not in {}", tokenizer_path.display()),
                    )
                }),
            }
        };
        let tc = tok_config.as_ref();
        let bos_token = token_field(tc, &tok_config_path, "bos_token")?;
        let eos_token = token_field(tc, &tok_config_path, "eos_token")?;
        let pad_token = token_field(tc, &tok_config_path, "pad_token")?;
        let unk_token = token_field(tc, &tok_config_path, "unk_token")?;

        let first = |lists: [Vec<u32>; 2]| lists.into_iter().flatten().next();
        let bos_id = match lookup(&bos_token, "bos_token")? {
            Some(id) => Some(id),
            None => first([
                id_field(gen_config.as_ref(), &gen_path, "bos_token_id")?,
                id_field(config.as_ref(), &config_path, "bos_token_id")?,
            ]),
        };
        let pad_id = match lookup(&pad_token, "pad_token")? {
            Some(id) => Some(id),
            None => first([
                id_field(gen_config.as_ref(), &gen_path, "pad_token_id")?,
                id_field(config.as_ref(), &config_path, "pad_token_id")?,
            ]),
        };
        let mut eos_ids = Vec::new();
        let candidates = [
            id_field(gen_config.as_ref(), &gen_path, "eos_token_id")?,
            id_field(config.as_ref(), &config_path, "eos_token_id")?,
            lookup(&eos_token, "eos_token")?.into_iter().collect(),
        ];
        for id in candidates.into_iter().flatten() {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let bos_token = bos_token.or_else(|| bos_id.and_then(|id| inner.id_to_token(id)));
        let eos_token = eos_token.or_else(|| eos_ids.first().and_then(|&id| inner.id_to_token(id)));

        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&jinja_path) {
            Ok(text) => Some(text),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                chat_template_field(tc, &tok_config_path)?
            }
            Err(source) => {
                return Err(TemplateError::Io {
                    path: jinja_path,
                    source,
                })
            }
        };

        Ok(Self {
            inner,
            special: SpecialTokens {
                bos_id,
                eos_ids,
                pad_id,
                bos_token,
                eos_token,
                pad_token,
                unk_token,
            },
            chat_template,
            source: dir.to_path_buf(),
        })
    }

    /// Loads a bare `tokenizer.json` (no special-token configuration, no chat template).
    pub fn from_file(tokenizer_json: impl AsRef<Path>) -> Result<Self> {
        let path = tokenizer_json.as_ref();
        Ok(Self {
            inner: load_tokenizer_json(path)?,
            special: SpecialTokens::default(),
            chat_template: None,
            source: path.to_path_buf(),
        })
    }

    /// Token ids of `text`, without BOS/EOS (`add_special_tokens=false`); special-token strings in
    /// the text become their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding =
            self.inner
                .encode_fast(text, false)
                .map_err(|e| TemplateError::Tokenize {
                    operation: "encode",
                    message: e.to_string(),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of a raw prompt (text fed without a chat template) as transformers'
    /// `tokenizer(text)` gives them: with the tokenizer's own special tokens
    /// (`add_special_tokens=true`: Gemma's BOS; nothing for byte-level BPE models like Qwen).
    /// Base models degenerate without the BOS they were trained with.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| TemplateError::Tokenize {
                operation: "encode",
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Piecewise encoding (KVZIP-SPEC §0): each piece is encoded on its own with [`Self::encode`]
    /// and the id lists are concatenated. This differs from encoding the concatenated text at the
    /// piece boundaries, and is what KVzip does.
    pub fn encode_pieces(&self, pieces: &[&str]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in pieces {
            ids.extend(self.encode(piece)?);
        }
        Ok(ids)
    }

    /// Text of `ids`; with `skip_special_tokens`, special tokens (BOS, `<|im_end|>`, ...) are dropped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TemplateError::Tokenize {
                operation: "decode",
                message: e.to_string(),
            })
    }

    /// A streaming detokenizer that turns ids, pushed one at a time, into text deltas.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<&Tokenizer> {
        DecodeStream::new(self, skip_special_tokens)
    }

    /// Id of a token string (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is an added token marked `special` in `tokenizer.json`.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The special tokens of the model.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Jinja source of the model's chat template, if it has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The model's chat template, compiled, with this tokenizer's `bos_token` / `eos_token`.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let source =
            self.chat_template
                .as_deref()
                .ok_or_else(|| TemplateError::MissingChatTemplate {
                    dir: self.source.clone(),
                })?;
        ChatTemplate::new(
            source,
            self.special.bos_token.as_deref(),
            self.special.eos_token.as_deref(),
        )
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        return Err(TemplateError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let load_err = |message: String| TemplateError::TokenizerLoad {
        path: path.to_path_buf(),
        message,
    };
    // The tokenizers crate panics on some malformed files (it unwraps nested JSON errors):
    // check the JSON first, and contain any panic of its loader as an error.
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|e| load_err(format!("not valid JSON ({e}); the file is corrupt")))?;
    std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
        .map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            load_err(format!("the tokenizer library rejected it ({why})"))
        })?
        .map_err(|e| load_err(e.to_string()))
}
