//! End-to-end import of tiny hand-built GGUF models (llama with a byte-level BPE vocabulary,
//! gemma3 with a SentencePiece vocabulary and a supplied tokenizer.json).

mod gguf_common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use gguf_common::{q8_0_blocks, GgufBuilder};
use kvzip_hub::gguf::names::permute_qk_rows;
use kvzip_hub::gguf::{dequantize, import_gguf, GgmlType, ImportOptions};
use serde_json::Value;

/// GPT-2's byte → printable character map.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).collect();
    printable.extend('¡' as u32..='¬' as u32);
    printable.extend('®' as u32..='ÿ' as u32);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

const H: usize = 32; // hidden
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 8;
const FFN: usize = 64;

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
        .collect()
}

/// A one-layer llama GGUF; returns (bytes, the HF-order q_proj and k_proj).
fn tiny_llama() -> (Vec<u8>, Vec<f32>, Vec<f32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(byte_chars().iter().map(|c| c.to_string()));
    tokens.extend(["Ġt", "he", "Ġthe"].iter().map(|s| s.to_string()));
    let mut types = vec![3; 3];
    types.extend(vec![1; tokens.len() - 3]);
    let tok_refs: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
    let vocab = tokens.len();

    let q_hf = ramp(H * H, 0.01);
    let k_hf = ramp(KV * HD * H, 0.02);
    let mut b = GgufBuilder::new();
    b.str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 128)
        .u32("llama.embedding_length", H as u32)
        .u32("llama.feed_forward_length", FFN as u32)
        .u32("llama.attention.head_count", HEADS as u32)
        .u32("llama.attention.head_count_kv", KV as u32)
        .f32("llama.rope.freq_base", 100000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .str_array("tokenizer.ggml.tokens", &tok_refs)
        .i32_array("tokenizer.ggml.token_type", &types)
        .str_array("tokenizer.ggml.merges", &["Ġ t", "h e", "Ġt he"])
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .bool("tokenizer.ggml.add_bos_token", false)
        .str(
            "tokenizer.chat_template",
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        );
    let embd: Vec<f32> = (0..vocab * H)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.5)
        .collect();
    b.tensor(
        "token_embd.weight",
        &[H as u64, vocab as u64],
        8,
        q8_0_blocks(&embd, 0.5),
    );
    b.tensor_f32("blk.0.attn_norm.weight", &[H as u64], &ramp(H, 0.1));
    let q_gguf = permute_qk_rows(&q_hf, H, H, HEADS).unwrap();
    let k_gguf = permute_qk_rows(&k_hf, KV * HD, H, KV).unwrap();
    b.tensor_f32("blk.0.attn_q.weight", &[H as u64, H as u64], &q_gguf);
    b.tensor_f32(
        "blk.0.attn_k.weight",
        &[H as u64, (KV * HD) as u64],
        &k_gguf,
    );
    b.tensor_f32(
        "blk.0.attn_v.weight",
        &[H as u64, (KV * HD) as u64],
        &ramp(KV * HD * H, 0.03),
    );
    b.tensor_f32(
        "blk.0.attn_output.weight",
        &[H as u64, H as u64],
        &ramp(H * H, 0.04),
    );
    b.tensor_f32("blk.0.ffn_norm.weight", &[H as u64], &ramp(H, 0.2));
    b.tensor_f32(
        "blk.0.ffn_gate.weight",
        &[H as u64, FFN as u64],
        &ramp(H * FFN, 0.05),
    );
    b.tensor_f32(
        "blk.0.ffn_up.weight",
        &[H as u64, FFN as u64],
        &ramp(H * FFN, 0.06),
    );
    b.tensor_f32(
        "blk.0.ffn_down.weight",
        &[FFN as u64, H as u64],
        &ramp(H * FFN, 0.07),
    );
    b.tensor_f32("output_norm.weight", &[H as u64], &ramp(H, 0.3));
    b.tensor_f32("rope_freqs.weight", &[4], &[1.0; 4]);
    (b.build(), q_hf, k_hf, tokens)
}

fn read_tensors(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let quant = meta.metadata().clone().unwrap_or_default();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            // Imports keep quantized matrices as stored (U8 rows + "ggml_type.<name>":
            // "<TYPE>:<cols>") and store the rest as bf16 (rounded to nearest even).
            if let Some(spec) = quant.get(&format!("ggml_type.{name}")) {
                assert_eq!(view.dtype(), safetensors::Dtype::U8);
                let (ty, cols) = spec.split_once(':').unwrap();
                let ty = GgmlType::from_name(ty).unwrap();
                let cols: usize = cols.parse().unwrap();
                let rows = view.shape()[0];
                let data = dequantize(ty, view.data(), rows * cols, &name).unwrap();
                return (name, (vec![rows, cols], data));
            }
            assert_eq!(view.dtype(), safetensors::Dtype::BF16);
            let data = view
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// `values` as they come back from a bf16 store.
fn bf16_rounded(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

#[test]
fn imports_a_tiny_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, q_hf, k_hf, tokens) = tiny_llama();
    let gguf = tmp.path().join("tiny.gguf");
    fs::write(&gguf, bytes).unwrap();
    let out = tmp.path().join("models").join("tiny");
    let report = import_gguf(&gguf, &out, &ImportOptions::default()).unwrap();
    assert_eq!(
        report.skipped_tensors,
        vec!["rope_freqs.weight".to_string()]
    );
    assert!(report.tie_word_embeddings);

    let cfg = json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["head_dim"], 8);
    assert_eq!(cfg["vocab_size"], tokens.len());
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["eos_token_id"], 2);

    let t = read_tensors(&out);
    assert!(!t.contains_key("lm_head.weight"));
    let (shape, q) = &t["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(shape, &vec![H, H]);
    assert_eq!(q, &bf16_rounded(&q_hf), "Q permutation undone");
    assert_eq!(
        t["model.layers.0.self_attn.k_proj.weight"].1,
        bf16_rounded(&k_hf),
        "K permutation undone"
    );
    assert_eq!(t["model.layers.0.mlp.down_proj.weight"].0, vec![H, FFN]);
    assert_eq!(t["model.embed_tokens.weight"].1[..3], [-4.0, -3.5, -3.0]);
    assert_eq!(
        t["model.layers.0.post_attention_layernorm.weight"].1,
        bf16_rounded(&ramp(H, 0.2))
    );
    assert_eq!(t.len(), 11);

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let the = tokens.iter().position(|s| s == "Ġthe").unwrap() as u32;
    let enc = tok.encode("<|im_start|> the", false).unwrap();
    assert_eq!(enc.get_ids(), &[1, the]);
    assert_eq!(tok.decode(&[the], false).unwrap(), " the");
    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert!(tc["chat_template"].as_str().unwrap().contains("messages"));
    assert_eq!(tc["added_tokens_decoder"]["2"]["special"], true);

    // refuses to overwrite; leaves nothing behind
    let err = import_gguf(&gguf, &out, &ImportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let again = ImportOptions {
        overwrite: true,
        ..ImportOptions::default()
    };
    import_gguf(&gguf, &out, &again).unwrap();
    let leftovers: Vec<_> = fs::read_dir(out.parent().unwrap()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temp dirs left: {leftovers:?}");
}

/// Several imports of one destination at once (two `kvzip run` fetching the default model in a
/// fresh cache): they take turns under a lock, none deletes another's half-built folder, every
/// one succeeds and the result is whole.
#[test]
fn concurrent_imports_of_one_destination_all_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, _, _, _) = tiny_llama();
    let gguf = tmp.path().join("tiny.gguf");
    fs::write(&gguf, bytes).unwrap();
    let out = tmp.path().join("models").join("tiny");
    let opts = ImportOptions {
        overwrite: true,
        ..ImportOptions::default()
    };
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (gguf, out, opts) = (gguf.clone(), out.clone(), opts.clone());
            std::thread::spawn(move || import_gguf(&gguf, &out, &opts).map(|_| ()))
        })
        .collect();
    for h in handles {
        h.join().unwrap().expect("every concurrent import succeeds");
    }
    assert_eq!(
        json(&out.join("config.json"))["architectures"][0],
        "LlamaForCausalLM"
    );
    assert!(read_tensors(&out).contains_key("model.embed_tokens.weight"));
    let leftovers: Vec<_> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".importing-") || n.contains(".replaced-"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn corrupt_files_fail_without_creating_the_model_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, ..) = tiny_llama();
    for cut in [10, bytes.len() / 3, bytes.len() - 1] {
        let gguf = tmp.path().join("cut.gguf");
        fs::write(&gguf, &bytes[..cut]).unwrap();
        let out = tmp.path().join("out");
        assert!(import_gguf(&gguf, &out, &ImportOptions::default()).is_err());
        assert!(!out.exists());
    }
    let mut b = GgufBuilder::new();
    b.str("general.architecture", "mamba");
    let gguf = tmp.path().join("mamba.gguf");
    fs::write(&gguf, b.build()).unwrap();
    let err = import_gguf(&gguf, &tmp.path().join("m"), &ImportOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("\"mamba\" is not supported"),
        "{err}"
    );
}

fn tiny_gemma(tokens: &[&str]) -> Vec<u8> {
    let (h, hd, ffn) = (32u64, 8u64, 32u64);
    let mut b = GgufBuilder::new();
    b.str("general.architecture", "gemma3")
        .u32("gemma3.block_count", 6)
        .u32("gemma3.context_length", 256)
        .u32("gemma3.embedding_length", h as u32)
        .u32("gemma3.feed_forward_length", ffn as u32)
        .u32("gemma3.attention.head_count", 1)
        .u32("gemma3.attention.head_count_kv", 1)
        .u32("gemma3.attention.key_length", hd as u32)
        .u32("gemma3.attention.value_length", hd as u32)
        .u32("gemma3.attention.sliding_window", 16)
        .f32("gemma3.rope.freq_base", 1e6)
        .str("tokenizer.ggml.model", "llama")
        .str_array("tokenizer.ggml.tokens", tokens)
        .i32_array("tokenizer.ggml.token_type", &[3, 3, 3, 2, 1, 1, 1, 1])
        .u32("tokenizer.ggml.bos_token_id", 2)
        .u32("tokenizer.ggml.eos_token_id", 1);
    let embd: Vec<f32> = (0..tokens.len() as u64 * h)
        .map(|i| (i % 5) as f32)
        .collect();
    b.tensor_f32("token_embd.weight", &[h, tokens.len() as u64], &embd);
    for l in 0..6 {
        for (n, len) in [
            ("attn_norm", h),
            ("post_attention_norm", h),
            ("ffn_norm", h),
            ("post_ffw_norm", h),
            ("attn_q_norm", hd),
            ("attn_k_norm", hd),
        ] {
            b.tensor_f32(
                &format!("blk.{l}.{n}.weight"),
                &[len],
                &vec![1.25; len as usize],
            );
        }
        for (n, i, o) in [
            ("attn_q", h, hd),
            ("attn_k", h, hd),
            ("attn_v", h, hd),
            ("attn_output", hd, h),
            ("ffn_gate", h, ffn),
            ("ffn_up", h, ffn),
            ("ffn_down", ffn, h),
        ] {
            b.tensor_f32(
                &format!("blk.{l}.{n}.weight"),
                &[i, o],
                &ramp((i * o) as usize, 0.01),
            );
        }
    }
    b.tensor_f32("output_norm.weight", &[h], &vec![3.0; h as usize]);
    b.build()
}

fn sp_tokenizer_json(tokens: &[&str]) -> String {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.replace(' ', "\u{2581}"), i.into()))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": [["\u{2581}", "a"]]}
    })
    .to_string()
}

#[test]
fn imports_a_tiny_gemma3_with_a_supplied_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "  ",
        "a",
        "\u{2581}",
        "\u{2581}a",
    ];
    let gguf = tmp.path().join("g.gguf");
    fs::write(&gguf, tiny_gemma(&tokens)).unwrap();
    let tok_dir = tmp.path().join("tok");
    fs::create_dir(&tok_dir).unwrap();
    fs::write(tok_dir.join("tokenizer.json"), sp_tokenizer_json(&tokens)).unwrap();
    fs::write(
        tok_dir.join("tokenizer_config.json"),
        r#"{"chat_template": "T", "eos_token": "<end_of_turn>"}"#,
    )
    .unwrap();
    let opts = ImportOptions {
        sentencepiece_tokenizer_dir: Some(tok_dir.clone()),
        ..ImportOptions::default()
    };
    let out = tmp.path().join("gemma");
    import_gguf(&gguf, &out, &opts).unwrap();

    let cfg = json(&out.join("config.json"));
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(cfg["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(cfg["head_dim"], 8);
    assert_eq!(cfg["query_pre_attn_scalar"], 8);
    assert_eq!(cfg["sliding_window"], 16);
    assert_eq!(cfg["rope_local_base_freq"], 10000.0);
    assert_eq!(cfg["layer_types"][4], "sliding_attention");
    assert_eq!(cfg["layer_types"][5], "full_attention");
    assert_eq!(cfg["final_logit_softcapping"], Value::Null);
    let t = read_tensors(&out);
    for n in [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "self_attn.q_norm",
        "self_attn.k_norm",
    ] {
        assert!(
            t[&format!("model.layers.3.{n}.weight")]
                .1
                .iter()
                .all(|&w| w == 0.25),
            "{n}"
        );
    }
    assert!(t["model.norm.weight"].1.iter().all(|&w| w == 2.0));
    assert_eq!(
        t["model.layers.0.self_attn.q_proj.weight"].1,
        bf16_rounded(&ramp(32 * 8, 0.01)),
        "no permutation"
    );
    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["chat_template"], "T");
    assert_eq!(tc["eos_token"], "<eos>", "GGUF eos overrides");
    assert_eq!(tc["bos_token"], "<bos>");
    tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();

    // a tokenizer.json whose vocabulary differs is refused, naming the id
    let mut other = tokens;
    other[5] = "b";
    fs::write(tok_dir.join("tokenizer.json"), sp_tokenizer_json(&other)).unwrap();
    let err = import_gguf(&gguf, &tmp.path().join("g2"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("id 5") && err.contains("does not match"),
        "{err}"
    );
}
