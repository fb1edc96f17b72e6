//! Loading bad inputs gives errors that name the file and the tensor or field; nothing panics.

use kvzip_models::engine::Engine;
use kvzip_models::{ModelError, RawConfig};
use kvzip_tests::{copy_to_temp, parity_dir};

fn load_err(dir: &std::path::Path) -> ModelError {
    match Engine::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_safetensors_names_file() {
    let tmp = copy_to_temp(&parity_dir("qwen2"));
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(tmp.path()).to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn corrupt_safetensors_header_names_file() {
    let tmp = copy_to_temp(&parity_dir("qwen3"));
    let path = tmp.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    let msg = load_err(tmp.path()).to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(
        msg.contains("not a valid safetensors") || msg.contains("truncated"),
        "{msg}"
    );
    // Every prefix of the file is rejected cleanly too.
    let good = std::fs::read(parity_dir("qwen3").join("model.safetensors")).unwrap();
    for cut in [0, 4, 8, 9, 100, 1000] {
        std::fs::write(&path, &good[..cut]).unwrap();
        let _ = load_err(tmp.path());
    }
}

#[test]
fn config_missing_field_names_field() {
    let tmp = copy_to_temp(&parity_dir("qwen2"));
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    match load_err(tmp.path()) {
        ModelError::Config { path: p, field, .. } => {
            assert!(p.ends_with("config.json"));
            assert_eq!(field, "hidden_size");
        }
        e => panic!("expected a config error, got {e}"),
    }
}

#[test]
fn wrong_tensor_shape_names_tensor() {
    let tmp = copy_to_temp(&parity_dir("qwen2"));
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let inter = cfg["intermediate_size"].as_u64().unwrap();
    cfg["intermediate_size"] = serde_json::json!(inter + 8);
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    match load_err(tmp.path()) {
        ModelError::Weights { path, tensor, msg } => {
            assert!(path.ends_with("model.safetensors"), "{}", path.display());
            assert!(tensor.contains("mlp"), "{tensor}");
            assert!(msg.contains("shape"), "{msg}");
        }
        e => panic!("expected a weights error, got {e}"),
    }
}

#[test]
fn missing_tensor_and_missing_shard_are_errors() {
    let tmp = copy_to_temp(&parity_dir("llama"));
    let index = tmp.path().join("model.safetensors.index.json");
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    let shard = idx["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_file(tmp.path().join(&shard)).unwrap();
    let msg = load_err(tmp.path()).to_string();
    assert!(msg.contains(&shard), "{msg}");
}

#[test]
fn unsupported_architecture_is_clear() {
    let tmp = copy_to_temp(&parity_dir("qwen2"));
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let msg = load_err(tmp.path()).to_string();
    assert!(
        msg.contains("MambaForCausalLM") && msg.contains("LlamaForCausalLM"),
        "{msg}"
    );
}

#[test]
fn gemma3_multimodal_config_reads_text_config() {
    let mm = RawConfig::load(
        &kvzip_tests::fixtures_dir().join("parity/gemma3_multimodal_config/config.json"),
    )
    .unwrap();
    assert_eq!(mm.architecture, "Gemma3ForConditionalGeneration");
    let text = RawConfig::load(&parity_dir("gemma3").join("config.json")).unwrap();
    let (a, b) = (mm.base_spec().unwrap(), text.base_spec().unwrap());
    assert_eq!(
        (
            a.hidden_size,
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
            a.n_layers()
        ),
        (
            b.hidden_size,
            b.n_heads,
            b.n_kv_heads,
            b.head_dim,
            b.n_layers()
        )
    );
}

/// Rewrites one config field of a copy of the llama fixture and returns the load error.
fn config_err(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let tmp = copy_to_temp(&parity_dir("llama"));
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    load_err(tmp.path()).to_string()
}

#[test]
fn impossible_config_values_are_refused_naming_the_field() {
    // transformers 5.x spelling (`rope_parameters`) and 4.x (`rope_theta` + `rope_scaling`).
    let msg = config_err(|c| {
        c["rope_parameters"]["rope_theta"] = 0.0.into();
    });
    assert!(msg.contains("rope_theta") && msg.contains("> 0"), "{msg}");
    let msg = config_err(|c| {
        c.remove("rope_parameters");
        c.insert("rope_theta".into(), (-1.0).into());
    });
    assert!(msg.contains("rope_theta") && msg.contains("> 0"), "{msg}");
    let msg = config_err(|c| {
        c.remove("rope_parameters");
        c.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 0.0}),
        );
    });
    assert!(msg.contains("factor") && msg.contains("> 0"), "{msg}");
    // Sizes beyond any real model are refused before anything is allocated.
    let msg = config_err(|c| {
        c.insert("num_hidden_layers".into(), 4_294_967_296u64.into());
    });
    assert!(
        msg.contains("num_hidden_layers") && msg.contains("corrupt"),
        "{msg}"
    );
    let msg = config_err(|c| {
        c.insert("vocab_size".into(), 1_000_000_000u64.into());
    });
    assert!(msg.contains("vocab_size"), "{msg}");
    // Within the limits but more than this machine has: refused by the memory check.
    let msg = config_err(|c| {
        c.insert("num_hidden_layers".into(), 1024.into());
        c.insert("hidden_size".into(), 65536.into());
        c.insert("intermediate_size".into(), 262144.into());
    });
    assert!(msg.contains("GiB") && msg.contains("available"), "{msg}");
}
