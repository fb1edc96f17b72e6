//! Synthetic models at a chosen head dim, for comparing devices on identical weights.
//!
//! The tiny HF parity fixtures use head dims 16 to 32, below what the CUDA attention kernels are
//! built for (64 / 128 / 256). [`make_model`] takes a fixture's config as is, raises its head
//! dim, and writes fresh seeded weights rounded to bf16 (so a bf16 device and the f32 CPU see
//! identical values) under the architecture's own weight names (Phi-3's fused projections).

use std::collections::HashMap;
use std::path::Path;

use kvzip_kernels::sampling::Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::parity_dir;

/// Every parity fixture with the head dim its synthetic GPU model uses (each kernel head dim
/// is covered).
pub const ARCHS: [(&str, usize); 6] = [
    ("llama", 64),
    ("qwen2", 128),
    ("qwen3", 128),
    ("gemma3", 256),
    ("mistral", 64),
    ("phi3", 128),
];

/// [`ARCHS`], or only those named in `KVZIP_TEST_ARCH` (comma separated): sanitizer runs
/// take one architecture per process to bound their host memory.
pub fn selected_archs() -> Vec<(&'static str, usize)> {
    let only = std::env::var("KVZIP_TEST_ARCH").unwrap_or_default();
    let names: Vec<&str> = only
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    ARCHS
        .into_iter()
        .filter(|(name, _)| names.is_empty() || names.contains(name))
        .collect()
}

/// Writes fixture `name`'s config with `head_dim` (and room for 4096 positions) and seeded
/// bf16-exact F32 weights into `dir`.
pub fn make_model(name: &str, head_dim: usize, dir: &Path) {
    let src = parity_dir(name);
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).expect("config"))
            .expect("json");
    let c = if cfg.get("text_config").is_some() {
        cfg.get_mut("text_config").expect("text_config")
    } else {
        &mut cfg
    };
    c["head_dim"] = json!(head_dim);
    c["max_position_embeddings"] = json!(4096);
    if name == "gemma3" {
        c["query_pre_attn_scalar"] = json!(head_dim);
    }
    if name == "phi3" {
        // The longrope factor lists have one entry per rotated pair: rebuild them for the new
        // head dim by cycling the fixture's values.
        let rope = c["rope_parameters"]
            .as_object_mut()
            .expect("rope_parameters");
        let prf = rope
            .get("partial_rotary_factor")
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        let half = ((head_dim as f64 * prf) as usize) / 2;
        for key in ["short_factor", "long_factor"] {
            let old: Vec<f64> = rope[key]
                .as_array()
                .expect("factor list")
                .iter()
                .map(|v| v.as_f64().expect("number"))
                .collect();
            rope[key] = json!((0..half).map(|i| old[i % old.len()]).collect::<Vec<_>>());
        }
    }
    let get = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    let (v, h, i, n_layers) = (
        get("vocab_size"),
        get("hidden_size"),
        get("intermediate_size"),
        get("num_hidden_layers"),
    );
    let (nq, nkv) = (get("num_attention_heads"), get("num_key_value_heads"));
    let tied = c["tie_word_embeddings"].as_bool().unwrap_or(false);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&cfg).expect("ser"),
    )
    .expect("write config");

    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !tied {
        shapes.push(("lm_head.weight".into(), vec![v, h]));
    }
    let (qd, kvd) = (nq * head_dim, nkv * head_dim);
    for l in 0..n_layers {
        let p = format!("model.layers.{l}");
        let mut add = |n: &str, s: Vec<usize>| shapes.push((format!("{p}.{n}"), s));
        add("input_layernorm.weight", vec![h]);
        add("post_attention_layernorm.weight", vec![h]);
        if name == "gemma3" {
            add("pre_feedforward_layernorm.weight", vec![h]);
            add("post_feedforward_layernorm.weight", vec![h]);
        }
        if name == "phi3" {
            add("self_attn.qkv_proj.weight", vec![qd + 2 * kvd, h]);
            add("mlp.gate_up_proj.weight", vec![2 * i, h]);
        } else {
            add("self_attn.q_proj.weight", vec![qd, h]);
            add("self_attn.k_proj.weight", vec![kvd, h]);
            add("self_attn.v_proj.weight", vec![kvd, h]);
            add("mlp.gate_proj.weight", vec![i, h]);
            add("mlp.up_proj.weight", vec![i, h]);
        }
        add("self_attn.o_proj.weight", vec![h, qd]);
        if name == "qwen2" {
            add("self_attn.q_proj.bias", vec![qd]);
            add("self_attn.k_proj.bias", vec![kvd]);
            add("self_attn.v_proj.bias", vec![kvd]);
        }
        if name == "qwen3" || name == "gemma3" {
            add("self_attn.q_norm.weight", vec![head_dim]);
            add("self_attn.k_norm.weight", vec![head_dim]);
        }
        add("mlp.down_proj.weight", vec![h, i]);
    }
    let mut rng = Rng::new(0x6b767a69 ^ head_dim as u64);
    let mut data: HashMap<String, (Vec<usize>, Vec<u8>)> = HashMap::new();
    for (n, s) in &shapes {
        let count: usize = s.iter().product();
        let (lo, hi) = if n.ends_with("norm.weight") {
            if name == "gemma3" {
                (-0.1, 0.1)
            } else {
                (0.8, 1.2)
            }
        } else if n.contains("embed") {
            (-1.0, 1.0)
        } else if n.ends_with("bias") {
            (-0.1, 0.1)
        } else {
            let a = 1.5 / (*s.last().unwrap_or(&1) as f32).sqrt();
            (-a, a)
        };
        let vals = rng.uniform_vec(count, lo, hi);
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_f32().to_le_bytes())
            .collect();
        data.insert(n.clone(), (s.clone(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, (s, b))| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors"))
        .expect("write weights");
}

/// `n` seeded ids below `vocab`.
pub fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| (r.next_u64() % vocab as u64) as u32)
        .collect()
}

/// `‖got − want‖ / ‖want‖` in f64.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!(num.is_finite(), "non-finite output");
    (num / den.max(1e-30)).sqrt()
}
