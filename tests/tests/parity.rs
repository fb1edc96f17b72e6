//! Logit parity with HF transformers on tiny random-weight models of every architecture
//! (fixtures from `scripts/make_parity_fixtures.py`): every prefill position and 8 greedy
//! decode steps within 1e-3 (f32), identical greedy tokens.

use std::path::Path;

use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_models::LogitsMode;
use kvzip_tests::{copy_to_temp, max_abs_diff, parity_dir, Golden};

const TOL: f32 = 1e-3;

fn check_parity(model_dir: &Path, golden_dir: &Path, prefill_chunk: usize) {
    check_parity_with(
        model_dir,
        &golden_dir.join("golden.safetensors"),
        prefill_chunk,
    );
}

/// Checks the model in `model_dir` against the golden file `golden_path` (see
/// tests/fixtures/parity/README.md), feeding the prompt in `prefill_chunk`-token chunks.
fn check_parity_with(model_dir: &Path, golden_path: &Path, prefill_chunk: usize) {
    let golden = Golden::open(golden_path);
    let ids = golden.token_ids("input_ids");
    let want_prefill = golden.f32("prefill_logits");
    let want_decode_ids = golden.token_ids("decode_ids");
    let want_decode = golden.f32("decode_logits");
    let vocab = golden.shape("prefill_logits")[1];

    let mut engine = Engine::load(model_dir).expect("fixture model loads");
    engine.prefill_chunk = prefill_chunk;
    assert_eq!(engine.spec().vocab_size, vocab);

    // Prefill: logits at every position.
    let mut cache = engine.new_cache().expect("cache");
    let got = engine
        .prefill(&mut cache, &ids, LogitsMode::All)
        .expect("prefill runs");
    assert_eq!(got.len(), want_prefill.len());
    let mut max_prefill = 0.0f32;
    for p in 0..ids.len() {
        let d = max_abs_diff(
            &got[p * vocab..(p + 1) * vocab],
            &want_prefill[p * vocab..(p + 1) * vocab],
        );
        assert!(d <= TOL, "prefill position {p}: max |diff| {d} > {TOL}");
        max_prefill = max_prefill.max(d);
    }

    // Greedy decode: the engine's own generation loop, with per-step logits.
    let mut cache = engine.new_cache().expect("cache");
    let mut opts = GenerateOptions::greedy(engine.spec(), want_decode_ids.len() + 1);
    opts.stop_tokens.clear();
    let gen = engine
        .generate(&mut cache, &ids, &opts, true, &mut |_| true)
        .expect("generate runs");
    assert_eq!(
        &gen.tokens[..want_decode_ids.len()],
        &want_decode_ids[..],
        "greedy tokens differ"
    );
    // step_logits[0] are the last prefill logits; step_logits[i + 1] follow decode_ids[i].
    let mut max_decode = 0.0f32;
    for i in 0..want_decode_ids.len() {
        let d = max_abs_diff(
            &gen.step_logits[i + 1],
            &want_decode[i * vocab..(i + 1) * vocab],
        );
        assert!(d <= TOL, "decode step {i}: max |diff| {d} > {TOL}");
        max_decode = max_decode.max(d);
    }
    eprintln!(
        "{} (chunk {prefill_chunk}): max |logit diff| prefill {max_prefill:.3e}, decode {max_decode:.3e}",
        golden_path.display()
    );
}

fn parity(name: &str) {
    let dir = parity_dir(name);
    // Whole prompt in one chunk, then in uneven chunks (exercises chunked prefill and, for
    // Gemma3, sliding-window trimming between chunks).
    check_parity(&dir, &dir, 4096);
    check_parity(&dir, &dir, 77);
}

#[test]
fn parity_llama() {
    parity("llama");
}

#[test]
fn parity_qwen2() {
    parity("qwen2");
}

#[test]
fn parity_qwen3() {
    parity("qwen3");
}

#[test]
fn parity_gemma3() {
    parity("gemma3");
}

/// Sliding window 48 on every layer, GQA with one kv head, explicit head_dim.
#[test]
fn parity_mistral() {
    parity("mistral");
}

/// Fused qkv_proj / gate_up_proj, longrope with partial rotary. `golden.safetensors` (320
/// tokens, every chunk of 77 past original_max_position_embeddings 64) uses the LONG factors;
/// `golden_short.safetensors` (40 prompt + 8 decoded tokens, largest position 47) the SHORT ones.
#[test]
fn parity_phi3() {
    parity("phi3");
    let dir = parity_dir("phi3");
    let short = dir.join("golden_short.safetensors");
    check_parity_with(&dir, &short, 4096);
    check_parity_with(&dir, &short, 16);
}

/// The same models with their configs written in the transformers 4.x spelling
/// (`rope_theta`/`rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`).
#[test]
fn parity_legacy_config_spelling() {
    for name in ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3"] {
        let src = parity_dir(name);
        let tmp = copy_to_temp(&src);
        let legacy = kvzip_tests::fixtures_dir()
            .join("parity/legacy_configs")
            .join(format!("{name}.json"));
        std::fs::copy(legacy, tmp.path().join("config.json")).expect("copy legacy config");
        check_parity(tmp.path(), &src, 4096);
    }
}
