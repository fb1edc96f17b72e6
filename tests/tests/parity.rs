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

/// The fixture in `src` copied to a temp dir with every weight stored as bf16 (values rounded
/// once, as a bf16 checkpoint would hold them).
fn bf16_copy(src: &Path) -> tempfile::TempDir {
    let dir = copy_to_temp(src);
    for entry in std::fs::read_dir(dir.path()).expect("temp dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("model") && name.ends_with(".safetensors") {
            rewrite_as_bf16(&path);
        }
    }
    dir
}

/// Rewrites the f32 safetensors file `path` with every tensor rounded to bf16.
fn rewrite_as_bf16(path: &Path) {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView};
    let bytes = std::fs::read(path).expect("fixture weights");
    let st = SafeTensors::deserialize(&bytes).expect("fixture safetensors");
    let mut converted: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F32, "{name}: fixtures are f32");
        let data: Vec<u8> = view
            .data()
            .chunks_exact(4)
            .flat_map(|c| {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                half::bf16::from_f32(v).to_le_bytes()
            })
            .collect();
        converted.push((name, view.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView<'_>)> = converted
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::BF16, s.clone(), d).expect("bf16 view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).expect("write bf16 weights");
}

/// Loads `dir` on the CPU with `hw` host weights (`what` labels the load) and returns the
/// prefill logits of every position of `ids`, 8 greedy tokens after `ids`, their step logits
/// and the weight bytes held: what the as-stored-vs-f32 tests compare.
fn logits_and_greedy(
    dir: &Path,
    ids: &[u32],
    hw: kvzip_models::HostWeights,
    what: &str,
) -> (Vec<f32>, Vec<u32>, Vec<f32>, usize) {
    let model = kvzip_models::load_model_dir_with(dir, &kvzip_models::Device::Cpu, hw).expect(what);
    let engine = Engine::new(model);
    let mut cache = engine.new_cache().expect("cache");
    let logits = engine
        .prefill(&mut cache, ids, LogitsMode::All)
        .expect("prefill runs");
    let mut cache = engine.new_cache().expect("cache");
    let mut opts = GenerateOptions::greedy(engine.spec(), 8);
    opts.stop_tokens.clear();
    let gen = engine
        .generate(&mut cache, ids, &opts, true, &mut |_| true)
        .expect("generate runs");
    (
        logits,
        gen.tokens,
        gen.step_logits.concat(),
        engine.model().weight_bytes(),
    )
}

/// bf16 checkpoints run on the CPU with their matrices kept as bf16 (fused widen-and-dot GEMV,
/// panel GEMM): logits at every prefill position and every greedy decode step equal those of
/// the same weights widened to f32 at load, within 1e-4, and the greedy tokens are identical.
#[test]
fn bf16_weights_as_stored_equal_widened_f32() {
    use kvzip_models::HostWeights;
    for name in ["llama", "qwen2", "gemma3", "phi3"] {
        let dir = bf16_copy(&parity_dir(name));
        let golden = Golden::open(&parity_dir(name).join("golden.safetensors"));
        let ids = golden.token_ids("input_ids");
        let run = |hw: HostWeights| logits_and_greedy(dir.path(), &ids, hw, "bf16 copy loads");
        let (compact, f32_path) = (run(HostWeights::AsStoredExact), run(HostWeights::F32));
        let prefill = max_abs_diff(&compact.0, &f32_path.0);
        let decode = max_abs_diff(&compact.2, &f32_path.2);
        assert!(
            prefill <= 1e-4,
            "{name}: prefill logits differ by {prefill}"
        );
        assert!(decode <= 1e-4, "{name}: decode logits differ by {decode}");
        assert_eq!(compact.1, f32_path.1, "{name}: greedy tokens differ");
        assert!(
            compact.3 < f32_path.3,
            "{name}: bf16 weights should take fewer bytes ({} vs {})",
            compact.3,
            f32_path.3
        );
        eprintln!(
            "{name}: bf16 as stored vs f32: prefill {prefill:.2e}, decode {decode:.2e}, weights {} vs {} bytes",
            compact.3, f32_path.3
        );
    }
}

/// The fixture in `src` copied to a temp dir with every weight matrix whose rows are whole
/// 32-element blocks quantized as a GGUF import stores it (`U8` ggml rows + `ggml_type.*`
/// metadata): `v_proj` and the embedding in Q8_0, everything else in Q4_0 (so stacked q/k/v
/// mix block types, as real Q4_K_M files do).
fn quantized_copy(src: &Path) -> tempfile::TempDir {
    let dir = copy_to_temp(src);
    for entry in std::fs::read_dir(dir.path()).expect("temp dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("model") && name.ends_with(".safetensors") {
            rewrite_quantized(&path);
        }
    }
    dir
}

/// Rewrites the f32 safetensors file `path` with its matrices quantized (see
/// [`quantized_copy`]).
fn rewrite_quantized(path: &Path) {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView};
    let bytes = std::fs::read(path).expect("fixture weights");
    let st = SafeTensors::deserialize(&bytes).expect("fixture safetensors");
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut meta = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if shape.len() != 2 || shape[1] % 32 != 0 {
            out.push((name, Dtype::F32, shape, view.data().to_vec()));
            continue;
        }
        let q8 = name.contains("v_proj") || name.contains("embed_tokens");
        let rows: Vec<u8> = values
            .chunks_exact(32)
            .flat_map(|b| {
                if q8 {
                    quantize_q8_0(b)
                } else {
                    quantize_q4_0(b)
                }
            })
            .collect();
        let ty = if q8 { "Q8_0" } else { "Q4_0" };
        meta.insert(format!("ggml_type.{name}"), format!("{ty}:{}", shape[1]));
        let row_bytes = rows.len() / shape[0];
        out.push((name, Dtype::U8, vec![shape[0], row_bytes], rows));
    }
    let views: Vec<(String, TensorView<'_>)> = out
        .iter()
        .map(|(n, t, s, d)| (n.clone(), TensorView::new(*t, s.clone(), d).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, &Some(meta), path).expect("write quantized weights");
}

/// One Q8_0 block: `d = max|x| / 127` (f16), 32 `i8`.
fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut b = half::f16::from_f32(d).to_le_bytes().to_vec();
    b.extend(x.iter().map(|v| ((v * inv).round() as i8) as u8));
    b
}

/// One Q4_0 block: `d = max|x| / 7` (f16), nibbles `q + 8` (element j low, j + 16 high).
fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 7.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
    let mut b = half::f16::from_f32(d).to_le_bytes().to_vec();
    b.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    b
}

/// GGUF-quantized checkpoints run on the CPU with their matrices kept as stored (fused
/// decode-and-dot GEMV, decode-into-panel GEMM): logits at every prefill position and every
/// greedy decode step equal those of the same weights dequantized to f32 at load, within 1e-4,
/// the greedy tokens are identical, and the weights take a fraction of the f32 bytes.
#[test]
fn quantized_weights_as_stored_equal_dequantized_f32() {
    use kvzip_models::HostWeights;
    for name in ["llama", "qwen2", "gemma3", "phi3"] {
        let dir = quantized_copy(&parity_dir(name));
        let golden = Golden::open(&parity_dir(name).join("golden.safetensors"));
        let ids = golden.token_ids("input_ids");
        let run = |hw: HostWeights| logits_and_greedy(dir.path(), &ids, hw, "quantized copy loads");
        let (compact, f32_path) = (run(HostWeights::AsStoredExact), run(HostWeights::F32));
        let prefill = max_abs_diff(&compact.0, &f32_path.0);
        let decode = max_abs_diff(&compact.2, &f32_path.2);
        assert!(
            prefill <= 1e-4,
            "{name}: prefill logits differ by {prefill}"
        );
        assert!(decode <= 1e-4, "{name}: decode logits differ by {decode}");
        assert_eq!(compact.1, f32_path.1, "{name}: greedy tokens differ");
        assert!(
            compact.3 * 3 < f32_path.3,
            "{name}: quantized weights should take under a third of the f32 bytes ({} vs {})",
            compact.3,
            f32_path.3
        );
        eprintln!(
            "{name}: quantized as stored vs f32: prefill {prefill:.2e}, decode {decode:.2e}, weights {} vs {} bytes",
            compact.3, f32_path.3
        );
    }
}
