//! Seed corpora, from the repository's own files: the tiny transformers-made models, tokenizer
//! and chat-template fixtures, a hand-built GGUF (the importer's test builder), caches saved by
//! `kvzip-cache`, and eval data in the official formats; plus the head of a real GGUF when
//! one has been fetched.

use std::path::{Path, PathBuf};

use kvzip_cache::{CacheFileMeta, KvCache};

use crate::mutate::pack;

#[path = "../../kvzip-hub/tests/gguf_common/mod.rs"]
#[allow(dead_code, clippy::all)]
mod gguf_common;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn read(path: PathBuf) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// GPT-2's byte → printable character map (the byte-level BPE alphabet).
fn byte_chars() -> Vec<String> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).collect();
    printable.extend('¡' as u32..='¬' as u32);
    printable.extend('®' as u32..='ÿ' as u32);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap_or('?').to_string()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?').to_string()
            }
        })
        .collect()
}

/// GGUF metadata of a tiny llama with a byte-level BPE vocabulary: `(builder, vocab size)`.
fn tiny_llama(
    h: u64,
    ffn: u64,
    layers: u32,
    heads: u32,
    kv: u32,
) -> (gguf_common::GgufBuilder, u64) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(byte_chars());
    tokens.push("Ġt".into());
    let mut types = vec![3; 3];
    types.extend(vec![1; tokens.len() - 3]);
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut b = gguf_common::GgufBuilder::new();
    b.str("general.architecture", "llama")
        .u32("llama.block_count", layers)
        .u32("llama.context_length", 64)
        .u32("llama.embedding_length", h as u32)
        .u32("llama.feed_forward_length", ffn as u32)
        .u32("llama.attention.head_count", heads)
        .u32("llama.attention.head_count_kv", kv)
        .f32("llama.rope.freq_base", 10000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str_array("tokenizer.ggml.tokens", &refs)
        .i32_array("tokenizer.ggml.token_type", &types)
        .str_array("tokenizer.ggml.merges", &["Ġ t"])
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .str(
            "tokenizer.chat_template",
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        );
    (b, tokens.len() as u64)
}

fn ramp(n: u64) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
        .collect()
}

/// A one-layer llama GGUF with a byte-level BPE vocabulary and f32 tensors.
pub fn tiny_gguf() -> Vec<u8> {
    let (h, ffn, kv, hd) = (16u64, 32u64, 1u32, 8u64);
    let (mut b, vocab) = tiny_llama(h, ffn, 1, 2, kv);
    b.tensor_f32("token_embd.weight", &[h, vocab], &ramp(h * vocab));
    b.tensor_f32("blk.0.attn_norm.weight", &[h], &ramp(h));
    b.tensor_f32("blk.0.attn_q.weight", &[h, h], &ramp(h * h));
    b.tensor_f32(
        "blk.0.attn_k.weight",
        &[h, kv as u64 * hd],
        &ramp(h * kv as u64 * hd),
    );
    b.tensor_f32(
        "blk.0.attn_v.weight",
        &[h, kv as u64 * hd],
        &ramp(h * kv as u64 * hd),
    );
    b.tensor_f32("blk.0.attn_output.weight", &[h, h], &ramp(h * h));
    b.tensor_f32("blk.0.ffn_norm.weight", &[h], &ramp(h));
    b.tensor_f32("blk.0.ffn_gate.weight", &[h, ffn], &ramp(h * ffn));
    b.tensor_f32("blk.0.ffn_up.weight", &[h, ffn], &ramp(h * ffn));
    b.tensor_f32("blk.0.ffn_down.weight", &[ffn, h], &ramp(h * ffn));
    b.tensor_f32("output_norm.weight", &[h], &ramp(h));
    b.build()
}

/// ggml quantization types the CPU engine keeps as stored: (GGUF type id, values per block,
/// bytes per block, byte offsets of the block's f16 scales).
const QUANT_TYPES: [(u32, u64, usize, &[usize]); 7] = [
    (2, 32, 18, &[0]),       // Q4_0
    (3, 32, 20, &[0, 2]),    // Q4_1
    (6, 32, 22, &[0]),       // Q5_0
    (8, 32, 34, &[0]),       // Q8_0
    (12, 256, 144, &[0, 2]), // Q4_K
    (13, 256, 176, &[0, 2]), // Q5_K
    (14, 256, 210, &[208]),  // Q6_K
];

/// `n` values of quantization type `QUANT_TYPES[t]` as blocks of pseudo-random codes with small
/// finite scales (so the seed imports, loads and runs).
fn quant_blocks(t: usize, n: u64, seed: u64) -> Vec<u8> {
    let (_, per, size, scales) = QUANT_TYPES[t];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity((n / per) as usize * size);
    for _ in 0..n / per {
        let start = out.len();
        for _ in 0..size {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.push((state >> 33) as u8);
        }
        for &at in scales {
            out[start + at..start + at + 2].copy_from_slice(&0x2000u16.to_le_bytes());
            // ~0.0078
        }
    }
    out
}

/// A two-layer llama GGUF whose matrices use every quantization type the CPU engine keeps as
/// stored (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K; rows of 256 so the K-quants fit), so the
/// fuzzed import, load and forward run the quantized paths.
pub fn tiny_quant_gguf() -> Vec<u8> {
    let (h, ffn, kv, hd) = (256u64, 256u64, 1u32, 128u64);
    let (mut b, vocab) = tiny_llama(h, ffn, 2, 2, kv);
    let id = |t: usize| QUANT_TYPES[t % QUANT_TYPES.len()].0;
    b.tensor(
        "token_embd.weight",
        &[h, vocab],
        id(3),
        quant_blocks(3, h * vocab, 1),
    );
    let mut t = 0usize;
    for l in 0..2 {
        b.tensor_f32(&format!("blk.{l}.attn_norm.weight"), &[h], &ramp(h));
        b.tensor_f32(&format!("blk.{l}.ffn_norm.weight"), &[h], &ramp(h));
        for (name, rows) in [
            ("attn_q", h),
            ("attn_k", kv as u64 * hd),
            ("attn_v", kv as u64 * hd),
            ("attn_output", h),
            ("ffn_gate", ffn),
            ("ffn_up", ffn),
            ("ffn_down", h),
        ] {
            let ty = t % QUANT_TYPES.len();
            b.tensor(
                &format!("blk.{l}.{name}.weight"),
                &[256, rows],
                id(ty),
                quant_blocks(ty, 256 * rows, 10 + t as u64),
            );
            t += 1;
        }
    }
    b.tensor_f32("output_norm.weight", &[h], &ramp(h));
    b.tensor(
        "output.weight",
        &[h, vocab],
        id(6),
        quant_blocks(6, h * vocab, 99),
    );
    b.build()
}

/// GGUF seeds: the tiny model, and the first 1.5 MB of a fetched real GGUF (its metadata).
pub fn gguf() -> Vec<Vec<u8>> {
    let mut out = vec![tiny_gguf(), tiny_quant_gguf()];
    if let Ok(home) = kvzip_hub::fetch::default_cache_dir() {
        if let Some(mut real) = read(home.join("gguf/smollm2-135m-instruct.gguf")) {
            real.truncate(1_500_000);
            out.push(real);
        }
    }
    out
}

/// The files of [`tiny_quant_gguf`] imported into a model directory (GGUF blocks kept as
/// stored, as `kvzip import-gguf` writes them), packed; `None` if the import fails.
fn imported_quant_dir() -> Option<Vec<u8>> {
    let tmp = tempfile::tempdir().ok()?;
    let gguf = tmp.path().join("tiny.gguf");
    std::fs::write(&gguf, tiny_quant_gguf()).ok()?;
    let out = tmp.path().join("model");
    let opts = crate::targets::offline_import_options(tmp.path());
    kvzip_hub::gguf::import_gguf(&gguf, &out, &opts).ok()?;
    let files = ["config.json", "model.safetensors", "kvzip_import.json"]
        .iter()
        .filter_map(|f| Some((f.to_string(), read(out.join(f))?)))
        .collect::<Vec<_>>();
    Some(pack(&files))
}

/// Model-directory seeds: the tiny transformers-made parity models, and a directory imported
/// from a GGUF with every quantization type kept as stored.
pub fn model_dirs() -> Vec<Vec<u8>> {
    let root = repo().join("tests/fixtures/parity");
    let mut dirs: Vec<Vec<u8>> = imported_quant_dir().into_iter().collect();
    dirs.extend(
        ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3"]
            .iter()
            .filter_map(|a| {
                let dir = root.join(a);
                Some(pack(&[
                    ("config.json".into(), read(dir.join("config.json"))?),
                    (
                        "model.safetensors".into(),
                        read(dir.join("model.safetensors"))?,
                    ),
                ]))
            }),
    );
    dirs
}

/// Tokenizer seeds: the tiny byte-level BPE and SentencePiece fixtures.
pub fn tokenizers() -> Vec<Vec<u8>> {
    let root = repo().join("kvzip-templates/tests/fixtures");
    ["tiny-chatml", "tiny-sp"]
        .iter()
        .filter_map(|t| {
            let dir = root.join(t);
            Some(pack(&[
                ("tokenizer.json".into(), read(dir.join("tokenizer.json"))?),
                (
                    "tokenizer_config.json".into(),
                    read(dir.join("tokenizer_config.json"))?,
                ),
            ]))
        })
        .collect()
}

/// Chat-template seeds: the real templates of the fixtures, and hostile ones.
pub fn templates() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    if let Some(bytes) = read(repo().join("kvzip-templates/tests/fixtures/chat_templates.json")) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            if let Some(t) = v["templates"].as_object() {
                out.extend(
                    t.values()
                        .filter_map(|x| x.as_str())
                        .map(|s| s.as_bytes().to_vec()),
                );
            }
        }
    }
    for hostile in [
        "{% for i in range(100000000) %}x{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{{ 'a' * 100000 }}{% for m in messages %}{{ m.content * 1000 }}{% endfor %}",
        "{% for a in range(1000) %}{% for b in range(1000) %}{{ a * b }}{% endfor %}{% endfor %}",
        "{{ messages[0]['content'][::-1] }}{{ raise_exception('no') }}",
        "{% set x = namespace(v='') %}{% for i in range(100000) %}{% set x.v = x.v ~ i %}{% endfor %}{{ x.v }}",
        "{{ messages | tojson(indent=100000) }}",
    ] {
        out.push(hostile.as_bytes().to_vec());
    }
    out
}

/// Cache-file seeds: small caches saved by `kvzip-cache` (several shapes, compacted or not).
pub fn cache_files() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (layers, heads, hd, rows) in [(1usize, 1usize, 4usize, 3usize), (2, 2, 8, 7), (3, 1, 2, 1)]
    {
        let Ok(mut cache) = KvCache::uniform(layers, heads, hd) else {
            continue;
        };
        let pos = cache.next_positions(rows);
        let kv: Vec<f32> = (0..rows * heads * hd)
            .map(|i| i as f32 * 0.25 - 1.0)
            .collect();
        for l in 0..layers {
            let _ = cache.append(l, &kv, &kv, &pos);
        }
        cache.set_spans(1, rows - 1);
        let meta = CacheFileMeta {
            model_id: "wfp-0123".into(),
            ratio_requested: Some(0.3),
            token_ids: (0..rows as u32).collect(),
            ..Default::default()
        };
        if let Ok(bytes) = cache.to_bytes("seed", &meta) {
            out.push(bytes);
        }
    }
    out
}

/// Eval-data seed sections: a SQuAD article, GSM8K lines and an essay, in the official formats.
pub fn eval_data() -> Vec<(String, Vec<u8>)> {
    let squad = serde_json::json!({"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "The Harbor Street Library opened in 1911.", "qas": [
            {"id": "1", "question": "When did it open?", "answers": [{"text": "1911", "answer_start": 37}]},
            {"id": "2", "question": "What opened?", "answers": [{"text": "The Harbor Street Library", "answer_start": 0}]}]}]}]});
    let gsm = "{\"question\": \"Tom has 3 apples. He buys 2 more. How many apples does he have?\", \"answer\": \"3 + 2 = <<3+2=5>>5\\n#### 5\"}\n\
               {\"question\": \"A box holds 4 pens. How many pens are in 3 boxes?\", \"answer\": \"4 * 3 = 12\\n#### 12\"}\n";
    let essay = "Alpha beta gamma delta. Epsilon zeta eta theta. Iota kappa lambda mu. ".repeat(20);
    vec![
        (
            "squad.json".into(),
            serde_json::to_vec(&squad).unwrap_or_default(),
        ),
        ("gsm8k.jsonl".into(), gsm.as_bytes().to_vec()),
        ("essays/a.txt".into(), essay.as_bytes().to_vec()),
    ]
}
