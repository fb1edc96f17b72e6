//! The fuzz targets: each runs one input through a parser and what consumes its output, in a
//! scratch directory, and reports `Ok` or the error text. A panic (caught by the driver), an
//! abort or a hang is a bug; an error is the expected outcome of bad input.

use std::path::Path;

use kvzip_cache::{DeviceKv, KvCache};
use kvzip_eval::datasets::{load, load_gsm8k, load_squad, DataOptions, DatasetName, WordCount};
use kvzip_hub::gguf::{import_gguf, GgufFile, ImportOptions};
use kvzip_models::engine::Engine;
use kvzip_models::LogitsMode;
use kvzip_templates::{ChatMessage, ChatTemplate, Tokenizer};

use crate::mutate::pack;
use crate::seeds;

/// A fuzz target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// GGUF reading and import (then load of the imported model and tokenizer).
    Gguf,
    /// A model directory: `config.json` + `model.safetensors`, loaded and run on 3 tokens.
    ModelDir,
    /// `tokenizer.json` + `tokenizer_config.json`: load, encode, decode, chat template.
    Tokenizer,
    /// Chat-template rendering of hostile templates.
    ChatTemplate,
    /// The compressed-cache file format.
    CacheFile,
    /// Eval data loaders: SQuAD JSON, GSM8K JSONL, essay folders.
    EvalData,
}

/// Every target, in the order `cargo xtask fuzz all` runs them.
pub const ALL: [Target; 6] = [
    Target::Gguf,
    Target::ModelDir,
    Target::Tokenizer,
    Target::ChatTemplate,
    Target::CacheFile,
    Target::EvalData,
];

impl Target {
    /// CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Gguf => "gguf",
            Target::ModelDir => "model-dir",
            Target::Tokenizer => "tokenizer",
            Target::ChatTemplate => "chat-template",
            Target::CacheFile => "cache-file",
            Target::EvalData => "eval-data",
        }
    }

    /// The target named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        ALL.iter().copied().find(|t| t.name() == s)
    }

    /// Whether inputs are containers of named files.
    pub fn container(self) -> bool {
        matches!(
            self,
            Target::ModelDir | Target::Tokenizer | Target::EvalData
        )
    }

    /// Seed inputs from real files (and hand-made ones where real files are too large).
    pub fn seeds(self) -> Vec<Vec<u8>> {
        match self {
            Target::Gguf => seeds::gguf(),
            Target::ModelDir => seeds::model_dirs(),
            Target::Tokenizer => seeds::tokenizers(),
            Target::ChatTemplate => seeds::templates(),
            Target::CacheFile => seeds::cache_files(),
            Target::EvalData => vec![pack(&seeds::eval_data())],
        }
    }

    /// Runs one input with `scratch` as working directory.
    pub fn run(self, input: &[u8], scratch: &Path) -> Result<(), String> {
        let e = |x: &dyn std::fmt::Display| x.to_string();
        match self {
            Target::Gguf => {
                let path = scratch.join("in.gguf");
                write(&path, input)?;
                GgufFile::open(&path).map_err(|x| e(&x))?;
                let out = scratch.join("model");
                let opts = offline_import_options(scratch);
                let res = import_gguf(&path, &out, &opts).map_err(|x| e(&x));
                if res.is_ok() {
                    load_and_run(&out)?;
                    Tokenizer::from_dir(&out).map_err(|x| e(&x))?;
                }
                let _ = std::fs::remove_dir_all(&out);
                res.map(|_| ())
            }
            Target::ModelDir => {
                let dir = unpack_into(input, scratch, "model")?;
                load_and_run(&dir)
            }
            Target::Tokenizer => {
                let dir = unpack_into(input, scratch, "tok")?;
                let tok = Tokenizer::from_dir(&dir).map_err(|x| e(&x))?;
                let ids = tok
                    .encode_prompt("Hello <|im_end|> wörld 🙂  \n\t")
                    .map_err(|x| e(&x))?;
                tok.decode(&ids, false).map_err(|x| e(&x))?;
                let mut stream = tok.decode_stream(true);
                for id in ids.iter().chain([0u32, u32::MAX].iter()) {
                    let _ = stream.step(*id);
                }
                if let Ok(t) = tok.chat_template() {
                    render(&t)?;
                }
                Ok(())
            }
            Target::ChatTemplate => {
                let src = String::from_utf8_lossy(input);
                let t = ChatTemplate::new(&src, Some("<s>"), Some("</s>")).map_err(|x| e(&x))?;
                render(&t)
            }
            Target::CacheFile => {
                let (cache, meta) =
                    KvCache::from_bytes_in(DeviceKv::host(), "fuzz", input).map_err(|x| e(&x))?;
                let _ = (cache.bytes(), meta.check(Path::new("fuzz"), "m", None));
                Ok(())
            }
            Target::EvalData => {
                let dir = unpack_into(input, scratch, "data")?;
                let squad = load_squad(&dir.join("squad.json"), 8).map(|_| ());
                let gsm = load_gsm8k(&dir.join("gsm8k.jsonl"), 8, &WordCount).map(|_| ());
                let opts = DataOptions {
                    data_file: Some(dir.join("essays")),
                    num: 2,
                    context_tokens: vec![40, 80],
                    depths: vec![0, 50],
                    ..DataOptions::default()
                };
                let needle = load(DatasetName::Needle, &opts, &WordCount).map(|_| ());
                squad.and(gsm).and(needle).map_err(|x| e(&x))
            }
        }
    }
}

/// `import-gguf` options that need no network, with every file under `scratch`.
pub(crate) fn offline_import_options(scratch: &Path) -> ImportOptions {
    ImportOptions {
        // No network: a SentencePiece vocabulary needs this (empty) folder.
        sentencepiece_tokenizer_dir: Some(scratch.join("no-tokenizer")),
        cache_dir: Some(scratch.to_path_buf()),
        overwrite: true,
        ..ImportOptions::default()
    }
}

fn write(path: &Path, data: &[u8]) -> Result<(), String> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    std::fs::write(path, data).map_err(|e| e.to_string())
}

/// Writes a container's sections as files of a fresh `scratch/name` directory.
fn unpack_into(input: &[u8], scratch: &Path, name: &str) -> Result<std::path::PathBuf, String> {
    let dir = scratch.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for (file, data) in crate::mutate::unpack(input) {
        // Section names are file names inside the directory only.
        let safe: String = file
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' || c == '/' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if safe.is_empty() || safe.contains("..") || safe.starts_with('/') {
            continue;
        }
        write(&dir.join(safe), &data)?;
    }
    Ok(dir)
}

/// Loads a model directory on the CPU and runs 3 tokens through it.
fn load_and_run(dir: &Path) -> Result<(), String> {
    let engine = Engine::load(dir).map_err(|e| e.to_string())?;
    let mut cache = engine.new_cache().map_err(|e| e.to_string())?;
    let vocab = engine.spec().vocab_size as u32;
    let ids: Vec<u32> = [1u32, 2, 3].iter().map(|i| i % vocab.max(1)).collect();
    engine
        .prefill(&mut cache, &ids, LogitsMode::Last)
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn render(t: &ChatTemplate) -> Result<(), String> {
    let msgs = [
        ChatMessage::new("system", "be brief"),
        ChatMessage::new("user", "hi {{ 7*7 }} <|im_end|>"),
        ChatMessage::new("assistant", "hello"),
        ChatMessage::new("user", "again"),
    ];
    t.render(&msgs, true).map_err(|e| e.to_string())?;
    Ok(())
}
